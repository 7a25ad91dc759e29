//! A sweep over the skinny linear kernel's plan knobs ([`LinearTuning`]) on the decode-step
//! projection shapes of Llama-3-8B (one row of `x`, bf16), to see how far the default plan is
//! from the best one the kernel can run, and which knob matters.

use burn::tensor::{DType, Distribution, Tensor, backend::Backend};
use burn_cubecl::{CubeBackend, CubeRuntime, tensor::CubeTensor};
use kernels::linear::{LinearTuning, launch, plan_for};
use serde::Serialize;

use crate::timing::time_calls;

#[derive(Debug, Clone, Serialize)]
pub struct TuneRow {
    pub shape: String,
    pub k: usize,
    pub n: usize,
    pub tuning: String,
    /// Grid and layout the planner chose for these knobs.
    pub plan: String,
    pub median_us: f64,
    pub gbps: f64,
}

type B<R> = CubeBackend<R, f32, i32, u8>;

fn bf16<R: CubeRuntime>(shape: [usize; 2], device: &R::Device) -> CubeTensor<R> {
    Tensor::<B<R>, 2>::random(shape, Distribution::Default, device)
        .cast(DType::BF16)
        .into_primitive()
        .tensor()
}

/// Median microseconds per product over 7 batches of `4 × ws.len()` products, rotating the
/// weights, after one untimed pass over them.
fn time_us<R: CubeRuntime>(
    device: &R::Device,
    x: &CubeTensor<R>,
    ws: &[CubeTensor<R>],
    tuning: &LinearTuning,
) -> f64 {
    let mut i = 0;
    let mut run = || {
        let _ = launch::linear(x.clone(), ws[i % ws.len()].clone(), None, tuning);
        i += 1;
    };
    for _ in 0..ws.len() {
        run();
    }
    B::<R>::sync(device).expect("device sync");
    1e3 * time_calls::<B<R>>(device, 4 * ws.len(), 7, run).median_ms
}

/// Times every combination of the knobs on each shape; the first row of each shape is the
/// default plan.
pub fn sweep<R: CubeRuntime>(device: &R::Device) -> Vec<TuneRow> {
    let client = R::client(device);
    let (h, kv, ffn) = (4096usize, 1024usize, 14336usize);
    let shapes = [
        ("q/k/v (fused)", h, h + 2 * kv),
        ("o", h, h),
        ("gate/up (fused)", h, 2 * ffn),
        ("down", ffn, h),
    ];
    let mut knobs = vec![LinearTuning::default()];
    for cubes_per_sm in [2, 4, 8] {
        for unroll in [4, 8, 16] {
            for lanes in [32, 16, 8] {
                for threads in [256, 512] {
                    knobs.push(LinearTuning {
                        cubes_per_sm: Some(cubes_per_sm),
                        unroll: Some(unroll),
                        lanes: Some(lanes),
                        threads: Some(threads),
                        ..Default::default()
                    });
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (name, k, n) in shapes {
        let bytes = (k * n * 2) as f64;
        // Copies enough that no product finds its weights in L2 (50 MiB).
        let copies = ((256usize << 20) / (k * n * 2)).max(2);
        let ws: Vec<_> = (0..copies).map(|_| bf16::<R>([k, n], device)).collect();
        let x = bf16::<R>([1, k], device);
        for tuning in &knobs {
            let plan = plan_for(&client, DType::BF16, 1, k, n, false, tuning);
            let us = time_us::<R>(device, &x, &ws, tuning);
            let c = plan.config;
            rows.push(TuneRow {
                shape: name.into(),
                k,
                n,
                tuning: if *tuning == LinearTuning::default() {
                    "default".into()
                } else {
                    format!(
                        "cubes/SM {} U {} lanes {} threads {}",
                        tuning.cubes_per_sm.unwrap_or(0),
                        tuning.unroll.unwrap_or(0),
                        tuning.lanes.unwrap_or(0),
                        tuning.threads.unwrap_or(0)
                    )
                },
                plan: format!(
                    "{}x{} cubes of {} (TX {} KG {} U {} BK {}), k_chunk {}",
                    plan.col_tiles,
                    plan.splits,
                    c.threads(),
                    c.lanes,
                    c.k_groups,
                    c.unroll,
                    c.block_k,
                    plan.k_chunk
                ),
                median_us: us,
                gbps: bytes / (us * 1e-6) / 1e9,
            });
        }
    }
    rows
}

/// Per shape: the default plan and the five fastest.
pub fn markdown(rows: &[TuneRow], device: &str) -> String {
    let mut s = format!(
        "## Skinny linear plan sweep ({device}, bf16, 1 row)\n\n| shape | knobs | plan | µs | \
         GB/s |\n|---|---|---|---:|---:|\n"
    );
    let mut shapes: Vec<&str> = rows.iter().map(|r| r.shape.as_str()).collect();
    shapes.dedup();
    for shape in shapes {
        let mut of: Vec<&TuneRow> = rows.iter().filter(|r| r.shape == shape).collect();
        let default = of[0];
        of.sort_by(|a, b| a.median_us.total_cmp(&b.median_us));
        for r in std::iter::once(default).chain(of.into_iter().take(5)) {
            s += &format!(
                "| {} | {} | {} | {:.1} | {:.0} |\n",
                r.shape, r.tuning, r.plan, r.median_us, r.gbps
            );
        }
    }
    s
}
