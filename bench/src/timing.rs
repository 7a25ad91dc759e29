//! Wall-clock timing of device work: warm-up first, a device sync before every clock read, and
//! the median of several samples.

use std::time::Instant;

use burn::tensor::backend::Backend;
use serde::Serialize;

/// Summary of repeated measurements, in milliseconds per call.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub samples: usize,
    /// Calls per sample (several when one call is too short to time on its own).
    pub calls_per_sample: usize,
    /// Median host time per call spent before the closing sync: what enqueueing the work costs
    /// the CPU. Close to `median_ms`, the device waited for the host (dispatch-bound); far
    /// below it, the device was the bottleneck. Meaningless when `f` itself syncs.
    pub host_ms: f64,
}

/// Times `f` (which enqueues device work) on `device`: `warmup` untimed calls, then `samples`
/// samples of enough back-to-back calls to last about `min_sample_ms`, each closed by a sync.
pub fn time_device<B: Backend>(
    device: &B::Device,
    warmup: usize,
    samples: usize,
    min_sample_ms: f64,
    mut f: impl FnMut(),
) -> Timing {
    let sync = || B::sync(device).expect("device sync");
    for _ in 0..warmup.max(1) {
        f();
    }
    sync();
    // Calibrate the number of calls per sample from one timed call.
    let t = Instant::now();
    f();
    sync();
    let one = t.elapsed().as_secs_f64() * 1e3;
    let calls = ((min_sample_ms / one.max(1e-6)).ceil() as usize).clamp(1, 1000);
    time_calls::<B>(device, calls, samples, f)
}

/// Times `f` without warm-up: `samples` samples of `calls` back-to-back calls, each closed by a
/// sync on `device`.
pub fn time_calls<B: Backend>(
    device: &B::Device,
    calls: usize,
    samples: usize,
    mut f: impl FnMut(),
) -> Timing {
    let calls = calls.max(1);
    let (mut per_call, mut host): (Vec<f64>, Vec<f64>) = (0..samples.max(1))
        .map(|_| {
            let t = Instant::now();
            for _ in 0..calls {
                f();
            }
            let enqueued = t.elapsed().as_secs_f64();
            B::sync(device).expect("device sync");
            let per = |s: f64| s * 1e3 / calls as f64;
            (per(t.elapsed().as_secs_f64()), per(enqueued))
        })
        .unzip();
    per_call.sort_by(f64::total_cmp);
    host.sort_by(f64::total_cmp);
    Timing {
        host_ms: host[host.len() / 2],
        median_ms: per_call[per_call.len() / 2],
        min_ms: per_call[0],
        max_ms: per_call[per_call.len() - 1],
        samples: per_call.len(),
        calls_per_sample: calls,
    }
}
