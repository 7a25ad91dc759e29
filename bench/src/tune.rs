//! A sweep over the skinny linear kernels' plan knobs ([`LinearTuning`]) on the projection
//! shapes of a model config (Llama-3-8B unless the bench names a random preset) in bf16: one
//! row of `x` (a decode step, the SIMT kernel) and 64 rows (a Medusa tree step, the
//! tensor-core kernel, beside Burn's matmul), to see how far the default plan is from the best
//! one the kernels can run, and which knob matters.

use burn::tensor::{DType, Distribution, Tensor, backend::Backend};
use burn_cubecl::{CubeBackend, CubeRuntime, tensor::CubeTensor};
use kernels::linear::{LinearProblem, LinearTuning, cmma_usable, launch, plan_cmma, plan_for};
use model::LlamaConfig;
use serde::Serialize;

use crate::timing::time_calls;

#[derive(Debug, Clone, Serialize)]
pub struct TuneRow {
    /// Rows of `x`.
    pub m: usize,
    pub shape: String,
    pub k: usize,
    pub n: usize,
    pub tuning: String,
    /// Grid and layout the planner chose for these knobs.
    pub plan: String,
    pub median_us: f64,
    /// Host time per product spent enqueueing it: close to `median_us`, the timing measures
    /// dispatch rather than the device.
    pub host_us: f64,
    pub gbps: f64,
}

type B<R> = CubeBackend<R, f32, i32, u8>;

fn bf16<R: CubeRuntime>(shape: [usize; 2], device: &R::Device) -> CubeTensor<R> {
    Tensor::<B<R>, 2>::random(shape, Distribution::Default, device)
        .cast(DType::BF16)
        .into_primitive()
        .tensor()
}

/// Which implementation a timed product runs.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// The SIMT skinny kernel ([`launch::linear`]).
    Simt(LinearTuning),
    /// The tensor-core kernel ([`launch::linear_cmma`]).
    Cmma(LinearTuning),
    /// Burn's `linear` (its autotuned matmul).
    Burn,
}

/// Median microseconds per product (device done, and host time enqueueing) over 7 batches of
/// `4 × ws.len()` products, rotating the weights, after one untimed pass over them.
fn time_us<R: CubeRuntime>(
    device: &R::Device,
    x: &CubeTensor<R>,
    ws: &[CubeTensor<R>],
    path: Path,
) -> (f64, f64) {
    let mut i = 0;
    let mut run = || {
        let w = ws[i % ws.len()].clone();
        let _ = match path {
            Path::Simt(tuning) => launch::linear(x.clone(), w, None, &tuning),
            Path::Cmma(tuning) => launch::linear_cmma(x.clone(), w, None, &tuning),
            Path::Burn => <B<R> as burn::tensor::ops::ModuleOps<B<R>>>::linear(x.clone(), w, None),
        };
        i += 1;
    };
    for _ in 0..ws.len() {
        run();
    }
    B::<R>::sync(device).expect("device sync");
    let t = time_calls::<B<R>>(device, 4 * ws.len(), 7, run);
    (1e3 * t.median_ms, 1e3 * t.host_ms)
}

/// The projection shapes of one layer of `config`: (name, k, n).
fn shapes(config: &LlamaConfig) -> [(&'static str, usize, usize); 4] {
    let (h, d, ffn) = (
        config.hidden_size,
        config.head_dim(),
        config.intermediate_size,
    );
    let (q, kv) = (config.num_attention_heads * d, config.num_kv_heads() * d);
    [
        ("q/k/v (fused)", h, q + 2 * kv),
        ("o", q, h),
        ("gate/up (fused)", h, 2 * ffn),
        ("down", ffn, h),
    ]
}

/// Enough copies of a `[k, n]` bf16 weight that no product finds its weights in L2 (50 MiB).
fn weights<R: CubeRuntime>(k: usize, n: usize, device: &R::Device) -> Vec<CubeTensor<R>> {
    let copies = ((256usize << 20) / (k * n * 2)).max(2);
    (0..copies).map(|_| bf16::<R>([k, n], device)).collect()
}

/// Times every combination of the knobs on each shape of `config`, one row of `x` (SIMT
/// kernel); the first row of each shape is the default plan.
pub fn sweep<R: CubeRuntime>(device: &R::Device, config: &LlamaConfig) -> Vec<TuneRow> {
    let client = R::client(device);
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
    for (name, k, n) in shapes(config) {
        let ws = weights::<R>(k, n, device);
        let x = bf16::<R>([1, k], device);
        for tuning in &knobs {
            let plan = plan_for(&client, DType::BF16, 1, k, n, false, tuning);
            let (us, host_us) = time_us::<R>(device, &x, &ws, Path::Simt(*tuning));
            let c = plan.config;
            rows.push(TuneRow {
                m: 1,
                shape: name.into(),
                k,
                n,
                tuning: knob_label(tuning),
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
                host_us,
                gbps: (k * n * 2) as f64 / (us * 1e-6) / 1e9,
            });
        }
    }
    rows
}

fn knob_label(tuning: &LinearTuning) -> String {
    if *tuning == LinearTuning::default() {
        return "default".into();
    }
    let mut s = format!(
        "splits {} cubes/SM {} U {} lanes {} threads {}",
        tuning.splits.unwrap_or(0),
        tuning.cubes_per_sm.unwrap_or(0),
        tuning.unroll.unwrap_or(0),
        tuning.lanes.unwrap_or(0),
        tuning.threads.unwrap_or(0)
    );
    if let Some(stages) = tuning.stages {
        s += &format!(" stages {stages}");
    }
    s
}

/// A Medusa tree step's products (`m` rows, bf16) on the shapes of `config`: Burn's matmul, the
/// SIMT kernel's default plan, then the tensor-core kernel's default plan and its knob
/// combinations. The first row of each shape is Burn's matmul, the baseline the tree step used
/// before the tensor-core kernel.
pub fn sweep_tree<R: CubeRuntime>(
    device: &R::Device,
    m: usize,
    config: &LlamaConfig,
) -> Vec<TuneRow> {
    let client = R::client(device);
    let hw = &client.properties().hardware;
    let sms = hw.num_streaming_multiprocessors.unwrap_or(16) as usize;
    let shared = hw.max_shared_memory_size;
    let mut knobs = vec![LinearTuning::default()];
    // K splits past the planner's cap (the f32 partials at most a quarter of the weight bytes;
    // splits of >= 128 K rows for products under 4 MiB), which may pay while the partials stay
    // in L2.
    // 64-thread cubes (two planes, 32 columns) double the cubes of a narrow product.
    for splits in [2, 4, 8, 12, 16] {
        for unroll in [2, 4] {
            for threads in [64, 128, 256] {
                knobs.push(LinearTuning {
                    splits: Some(splits),
                    unroll: Some(unroll),
                    threads: Some(threads),
                    ..Default::default()
                });
            }
        }
    }
    let mut rows = Vec::new();
    for (name, k, n) in shapes(config) {
        let ws = weights::<R>(k, n, device);
        let x = bf16::<R>([m, k], device);
        let row = |tuning: String, plan: String, (us, host_us): (f64, f64)| TuneRow {
            m,
            shape: name.into(),
            k,
            n,
            tuning,
            plan,
            median_us: us,
            host_us,
            gbps: (k * n * 2) as f64 / (us * 1e-6) / 1e9,
        };
        rows.push(row(
            "burn matmul".into(),
            "autotuned".into(),
            time_us::<R>(device, &x, &ws, Path::Burn),
        ));
        let simt = LinearTuning::default();
        let plan = plan_for(&client, DType::BF16, m, k, n, false, &simt);
        rows.push(row(
            "simt default".into(),
            format!(
                "{}x{}x{} cubes",
                plan.col_tiles, plan.splits, plan.row_blocks
            ),
            time_us::<R>(device, &x, &ws, Path::Simt(simt)),
        ));
        if !cmma_usable(&x, &ws[0], None) {
            continue;
        }
        for tuning in &knobs {
            let problem = LinearProblem {
                m,
                k,
                n,
                elem_size: 2,
                vector_size: 8,
                bias: false,
            };
            let Some(plan) = plan_cmma(&problem, sms, shared, tuning) else {
                continue;
            };
            let c = plan.config;
            rows.push(row(
                format!("tensor cores, {}", knob_label(tuning)),
                format!(
                    "{}x{} cubes of {} planes (BK {}), k_chunk {}",
                    plan.col_tiles, plan.splits, c.warps, c.block_k, plan.k_chunk
                ),
                time_us::<R>(device, &x, &ws, Path::Cmma(*tuning)),
            ));
        }
    }
    rows
}

/// Per shape (of each row count): the fixed rows (the default plan, or Burn's matmul, the SIMT
/// kernel and the tensor-core kernel's default plan), then the five fastest others.
pub fn markdown(rows: &[TuneRow], device: &str) -> String {
    let mut s = String::new();
    let mut ms: Vec<usize> = rows.iter().map(|r| r.m).collect();
    ms.dedup();
    for m in ms {
        let of_m: Vec<&TuneRow> = rows.iter().filter(|r| r.m == m).collect();
        s += &format!(
            "## Skinny linear plan sweep ({device}, bf16, {m} row{})\n\n| shape | knobs | plan \
             | µs | host µs | GB/s |\n|---|---|---|---:|---:|---:|\n",
            if m == 1 { "" } else { "s" }
        );
        let mut shapes: Vec<&str> = of_m.iter().map(|r| r.shape.as_str()).collect();
        shapes.dedup();
        for shape in shapes {
            let of: Vec<&TuneRow> = of_m.iter().copied().filter(|r| r.shape == shape).collect();
            let is_fixed = |r: &TuneRow| {
                matches!(
                    r.tuning.as_str(),
                    "default" | "burn matmul" | "simt default" | "tensor cores, default"
                )
            };
            let fixed = of.iter().take_while(|r| is_fixed(r)).count();
            let mut rest: Vec<&TuneRow> = of.iter().copied().skip(fixed).collect();
            rest.sort_by(|a, b| a.median_us.total_cmp(&b.median_us));
            for r in of
                .iter()
                .copied()
                .take(fixed)
                .chain(rest.into_iter().take(5))
            {
                s += &format!(
                    "| {} | {} | {} | {:.1} | {:.1} | {:.0} |\n",
                    r.shape, r.tuning, r.plan, r.median_us, r.host_us, r.gbps
                );
            }
        }
        s += "\n";
    }
    s
}
