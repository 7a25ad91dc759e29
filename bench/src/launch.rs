//! Where the host time of one kernel launch goes, on a CubeCL runtime.
//!
//! A batch-1 decode step at 8B scale is ~460 small launches, and the step measured ~24 µs per
//! launch of host time (docs/benchmarks/2026-11-28-h200x2-fused-ops). This probe splits that cost
//! by launching the same trivial kernel (nine cubes of 64 threads) back to back in variants that
//! differ in one thing each:
//! - `array`: arguments as CubeCL arrays, whose only metadata (lengths) travels with the launch;
//! - `tensor`: the same kernel reading shapes and strides, which CubeCL uploads to the device
//!   before every launch (a pinned staging copy, an allocation and a host-to-device copy);
//! - `array + fresh output`: as `array`, with a newly allocated output each time (what every
//!   tensor op does);
//! - through Burn: an elementwise `x + 1` and our RMSNorm on one row (576 values).

use burn::tensor::{Distribution, backend::Backend};
use burn_cubecl::{CubeBackend, CubeRuntime};
use cubecl::prelude::*;
use serde::Serialize;

use crate::timing::time_calls;

#[cube(launch_unchecked)]
fn add_one_array(x: &Array<f32>, out: &mut Array<f32>) {
    if ABSOLUTE_POS < out.len() {
        out[ABSOLUTE_POS] = x[ABSOLUTE_POS] + 1.0;
    }
}

#[cube(launch_unchecked)]
fn add_one_tensor(x: &Tensor<f32>, out: &mut Tensor<f32>) {
    let i = ABSOLUTE_POS;
    if i < out.shape(0) {
        out[i * out.stride(0)] = x[i * x.stride(0)] + 1.0;
    }
}

/// Host and total time per launch of one variant, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LaunchCost {
    pub variant: String,
    /// Median over samples of (time to enqueue the batch) / launches: the calling thread's
    /// share.
    pub host_us: f64,
    /// Median over samples of (time until the device finished the batch) / launches.
    pub total_us: f64,
    pub launches_per_sample: usize,
}

/// Times `launch` (one kernel launch per call) in `samples` batches of `n`, each closed by a
/// device sync, after 100 untimed launches.
fn time_launches<R: CubeRuntime>(
    device: &R::Device,
    variant: &str,
    n: usize,
    samples: usize,
    mut launch: impl FnMut(),
) -> LaunchCost {
    for _ in 0..n.min(100) {
        launch();
    }
    B::<R>::sync(device).expect("device sync");
    let t = time_calls::<B<R>>(device, n, samples, launch);
    LaunchCost {
        variant: variant.into(),
        host_us: 1e3 * t.host_ms,
        total_us: 1e3 * t.median_ms,
        launches_per_sample: n,
    }
}

type B<R> = CubeBackend<R, f32, i32, u8>;

/// Runs every variant on `device` with `n` launches per sample, first on a fresh device, then
/// again while buffers the size of Llama-3-8B's bf16 weights are held (each layer's nine
/// matrices and norms), in case the allocator's cost grows with what it manages.
pub fn anatomy<R: CubeRuntime>(device: &R::Device, n: usize, samples: usize) -> Vec<LaunchCost> {
    let client = R::client(device);
    let mut costs = variants::<R>(device, n, samples, "");
    let (h, kv, ffn) = (4096usize, 1024usize, 14336usize);
    let per_layer = [
        h * h,
        h * kv,
        h * kv,
        h * h,
        h * ffn,
        h * ffn,
        ffn * h,
        h,
        h,
    ];
    let weights = || -> Vec<_> {
        (0..32)
            .flat_map(|_| per_layer)
            .map(|elems| client.empty(2 * elems))
            .collect()
    };
    let sync = || B::<R>::sync(device).expect("device sync");
    // Persistent first: the dynamic pool keeps its pages after the second round lets go.
    let held = client
        .memory_persistent_allocation((), |_| weights())
        .expect("persistent allocation");
    sync();
    costs.extend(variants::<R>(
        device,
        n,
        samples,
        " [8B weights, persistent pool]",
    ));
    drop(held);
    let held = weights();
    sync();
    costs.extend(variants::<R>(
        device,
        n,
        samples,
        " [8B weights, dynamic pool]",
    ));
    drop(held);
    costs
}

fn variants<R: CubeRuntime>(
    device: &R::Device,
    n: usize,
    samples: usize,
    suffix: &str,
) -> Vec<LaunchCost> {
    let client = R::client(device);
    let len = 576usize;
    let bytes = (len * size_of::<f32>()) as u64;
    let x = client.create_from_slice(f32::as_bytes(&vec![0.5f32; len]));
    let out = client.empty(bytes as usize);
    let count = CubeCount::Static(len.div_ceil(64) as u32, 1, 1);
    let dim = CubeDim::new_1d(64);
    let mut costs = Vec::new();

    // SAFETY (all launches below): the kernels index below `len`, the size of both buffers.
    costs.push(time_launches::<R>(
        device,
        &format!("array{suffix}"),
        n,
        samples,
        || unsafe {
            add_one_array::launch_unchecked::<R>(
                &client,
                count.clone(),
                dim,
                ArrayArg::from_raw_parts(x.clone(), len),
                ArrayArg::from_raw_parts(out.clone(), len),
            )
        },
    ));
    costs.push(time_launches::<R>(
        device,
        &format!("tensor (shape/stride metadata){suffix}"),
        n,
        samples,
        || unsafe {
            add_one_tensor::launch_unchecked::<R>(
                &client,
                count.clone(),
                dim,
                TensorArg::from_raw_parts(x.clone(), [1].into(), [len].into()),
                TensorArg::from_raw_parts(out.clone(), [1].into(), [len].into()),
            )
        },
    ));
    costs.push(time_launches::<R>(
        device,
        &format!("array + fresh output{suffix}"),
        n,
        samples,
        || unsafe {
            let fresh = client.empty(bytes as usize);
            add_one_array::launch_unchecked::<R>(
                &client,
                count.clone(),
                dim,
                ArrayArg::from_raw_parts(x.clone(), len),
                ArrayArg::from_raw_parts(fresh, len),
            )
        },
    ));

    let row = burn::tensor::Tensor::<B<R>, 2>::random([1, len], Distribution::Default, device);
    let gain = burn::tensor::Tensor::<B<R>, 1>::random([len], Distribution::Default, device);
    costs.push(time_launches::<R>(
        device,
        &format!("burn: x + 1{suffix}"),
        n,
        samples,
        || {
            let _ = row.clone() + 1.0;
        },
    ));
    costs.push(time_launches::<R>(
        device,
        &format!("burn: our RMSNorm{suffix}"),
        n,
        samples,
        || {
            let _ = kernels::rms_norm(row.clone(), gain.clone(), 1e-5);
        },
    ));
    costs
}

/// The costs as a Markdown table.
pub fn markdown(costs: &[LaunchCost], device: &str) -> String {
    let mut s = format!(
        "## Launch anatomy ({device})\n\nNine cubes of 64 threads on 576 f32 values, launched \
         back to back; host = the calling thread's time per launch, total = until the device \
         finished.\n\n| variant | host µs | total µs |\n|---|---:|---:|\n"
    );
    for c in costs {
        s += &format!("| {} | {:.2} | {:.2} |\n", c.variant, c.host_us, c.total_us);
    }
    s
}
