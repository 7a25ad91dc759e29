//! Decode-path linear layers: Burn's `linear` against `kernels::linear`, in GB/s, beside a
//! 1 GiB device copy for reference.
//!
//! ```text
//! # H100 (bf16, CubeBackend<CudaRuntime>); add `burn/autotune` for Burn's autotuned matmul:
//! cargo run --release -p kernels --features cuda --example linear_bench
//! cargo run --release -p kernels --features cuda,burn/autotune --example linear_bench -- --sweep
//! # Fusion<CubeBackend<CudaRuntime>> instead of the plain backend:
//! cargo run --release -p kernels --features cuda --example linear_bench -- --fusion
//! # smoke test on wgpu (f32, small shapes):
//! cargo run --release -p kernels --example linear_bench -- --quick
//! ```
//!
//! Options: `--quick` (small shapes), `--fusion` (time `Fusion<CubeBackend>`), `--sweep` (also
//! time the kernel under other launch tunings, on the plain backend), `--dtype f32|f16|bf16`
//! (default bf16 on CUDA, f32 on wgpu), `--m-sweep` (M = 1..64 on 4096 × 4096, to choose
//! `BURN_DECODE_LINEAR_MAX_M`).
//!
//! Timing: each sample enqueues enough back-to-back calls to last ~2 ms and then syncs the
//! device (`B::sync`); the median per-call time over 21 samples is reported. Calls rotate over
//! enough weight copies (≥ 256 MiB in all) that the weights never stay in the L2 cache (50 MiB on
//! an H100), as in a real decode step. Bytes moved = weights + x + y.

use std::time::Instant;

use burn::tensor::{DType, Distribution, Tensor, TensorPrimitive, backend::Backend};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use kernels::{
    LinearBackend,
    linear::{LinearTuning, launch, plan_for},
};

#[cfg(feature = "cuda")]
mod runtime {
    pub use cubecl::cuda::{CudaDevice as Device, CudaRuntime as Runtime};
    pub type BoolElem = u8;
    pub const NAME: &str = "cuda";
    pub const DEFAULT_DTYPE: burn::tensor::DType = burn::tensor::DType::BF16;
}

#[cfg(not(feature = "cuda"))]
mod runtime {
    pub use burn::backend::wgpu::{WgpuDevice as Device, WgpuRuntime as Runtime};
    pub type BoolElem = u32;
    pub const NAME: &str = "wgpu";
    pub const DEFAULT_DTYPE: burn::tensor::DType = burn::tensor::DType::F32;
}

use runtime::{BoolElem, Device, Runtime};

type Cube = CubeBackend<Runtime, f32, i32, BoolElem>;

const SAMPLES: usize = 21;
const SAMPLE_SECONDS: f64 = 2e-3;

struct Args {
    quick: bool,
    fusion: bool,
    sweep: bool,
    m_sweep: bool,
    dtype: DType,
}

impl Args {
    /// Weight bytes the timed calls rotate over: 256 MiB (5× an H100's L2), 16 MiB with
    /// `--quick`.
    fn rotation_bytes(&self) -> usize {
        if self.quick { 16 << 20 } else { 256 << 20 }
    }
}

fn parse_args() -> Args {
    let mut args = Args {
        quick: false,
        fusion: false,
        sweep: false,
        m_sweep: false,
        dtype: runtime::DEFAULT_DTYPE,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--fusion" => args.fusion = true,
            "--sweep" => args.sweep = true,
            "--m-sweep" => args.m_sweep = true,
            "--dtype" => {
                args.dtype = match it.next().as_deref() {
                    Some("f32") => DType::F32,
                    Some("f16") => DType::F16,
                    Some("bf16") => DType::BF16,
                    other => panic!("--dtype f32|f16|bf16, got {other:?}"),
                }
            }
            other => panic!("unknown argument {other} (see the example's doc comment)"),
        }
    }
    args
}

/// Median seconds per call of `f`, which enqueues device work and returns its output (kept
/// alive until the sample's sync so that nothing is skipped).
fn time<B: Backend, T>(device: &B::Device, mut f: impl FnMut() -> T) -> f64 {
    let sync = || B::sync(device).expect("device sync");
    for _ in 0..3 {
        drop(f());
    }
    sync();
    let t = Instant::now();
    let out = f();
    sync();
    drop(out);
    let one = t.elapsed().as_secs_f64();
    let calls = ((SAMPLE_SECONDS / one.max(1e-7)).ceil() as usize).clamp(1, 500);
    let mut per_call: Vec<f64> = (0..SAMPLES)
        .map(|_| {
            let mut keep = Vec::with_capacity(calls);
            let t = Instant::now();
            for _ in 0..calls {
                keep.push(f());
            }
            sync();
            let dt = t.elapsed().as_secs_f64() / calls as f64;
            drop(keep);
            dt
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    per_call[SAMPLES / 2]
}

fn gbps(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e9
}

/// `bytes` of f32 read and written once (`a + 1`): `2 * bytes` moved per call.
fn copy_bandwidth<B: Backend>(device: &B::Device, bytes: usize) -> f64 {
    let a = Tensor::<B, 1>::random([bytes / 4], Distribution::Uniform(-1.0, 1.0), device);
    let s = time::<B, _>(device, || a.clone() + 1.0);
    gbps(2 * bytes, s)
}

struct Weights<B: Backend> {
    copies: Vec<Tensor<B, 2>>,
}

impl<B: Backend> Weights<B> {
    /// Enough copies of a `[k, n]` weight to fill `rotation` bytes (at least 2).
    fn new(k: usize, n: usize, dtype: DType, rotation: usize, device: &B::Device) -> Self {
        let bytes = k * n * dtype.size();
        let count = rotation.div_ceil(bytes).clamp(2, 64);
        let copies = (0..count)
            .map(|_| {
                Tensor::<B, 2>::random([k, n], Distribution::Uniform(-0.05, 0.05), device)
                    .cast(dtype)
            })
            .collect();
        Self { copies }
    }
}

fn rel_l2<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    let a = a.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
    let b = b.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(&b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Burn's `linear` and `kernels::linear` on `[1, m, k] x [k, n]`; prints one line.
fn bench_shape<B: LinearBackend>(
    device: &B::Device,
    args: &Args,
    (m, k, n): (usize, usize, usize),
    copy_gbps: f64,
) {
    let dtype = args.dtype;
    let w = Weights::<B>::new(k, n, dtype, args.rotation_bytes(), device);
    let x = Tensor::<B, 3>::random([1, m, k], Distribution::Uniform(-1.0, 1.0), device).cast(dtype);
    let bytes = (k * n + m * k + m * n) * dtype.size();

    let err = rel_l2(
        kernels::linear(x.clone(), w.copies[0].clone(), None),
        burn::tensor::module::linear(x.clone(), w.copies[0].clone(), None),
    );
    let mut i = 0;
    let t_burn = time::<B, _>(device, || {
        i += 1;
        burn::tensor::module::linear(x.clone(), w.copies[i % w.copies.len()].clone(), None)
    });
    let t_ours = time::<B, _>(device, || {
        i += 1;
        kernels::linear(x.clone(), w.copies[i % w.copies.len()].clone(), None)
    });
    println!(
        "| {m:>2} x {k:>5} -> {n:>5} | {:>9.1} | {:>7.0} | {:>9.1} | {:>7.0} | {:>5.0}% | {:>5.2}x | {err:.1e} |",
        t_burn * 1e6,
        gbps(bytes, t_burn),
        t_ours * 1e6,
        gbps(bytes, t_ours),
        100.0 * gbps(bytes, t_ours) / copy_gbps,
        t_burn / t_ours,
    );
}

fn run<B: LinearBackend>(
    device: &B::Device,
    name: &str,
    args: &Args,
    shapes: &[(usize, usize, usize)],
) {
    let copy_bytes = if args.quick { 64 << 20 } else { 1 << 30 };
    let copy = copy_bandwidth::<B>(device, copy_bytes);
    println!(
        "\n{name}, {:?}: device copy ({} MiB read + written) {copy:.0} GB/s\n",
        args.dtype,
        copy_bytes >> 20
    );
    println!(
        "| m x     k ->     n | burn (µs) | burn GB/s | ours (µs) | ours GB/s | of copy | speedup | rel diff |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &shape in shapes {
        bench_shape::<B>(device, args, shape, copy);
    }
}

/// The kernel alone under other launch tunings (plain `CubeBackend` only).
fn sweep<R, F, I, BT>(device: &R::Device, args: &Args, shapes: &[(usize, usize, usize)])
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    type B<R, F, I, BT> = CubeBackend<R, F, I, BT>;
    let client = R::client(device);
    let dtype = args.dtype;
    println!("\nlaunch tunings (kernel only, GB/s):");
    let mut tunings = vec![("default".to_string(), LinearTuning::default())];
    for cubes in [2, 4, 8] {
        for unroll in [4, 8] {
            for lanes in [32, 16] {
                tunings.push((
                    format!("cubes/SM {cubes}, unroll {unroll}, lanes {lanes}"),
                    LinearTuning {
                        cubes_per_sm: Some(cubes),
                        unroll: Some(unroll),
                        lanes: Some(lanes),
                        ..Default::default()
                    },
                ));
            }
        }
    }
    for splits in [1, 8, 16, 32, 64] {
        tunings.push((
            format!("splits {splits}"),
            LinearTuning {
                splits: Some(splits),
                ..Default::default()
            },
        ));
    }
    for &(m, k, n) in shapes {
        let w = Weights::<B<R, F, I, BT>>::new(k, n, dtype, args.rotation_bytes(), device);
        let x =
            Tensor::<B<R, F, I, BT>, 2>::random([m, k], Distribution::Uniform(-1.0, 1.0), device)
                .cast(dtype);
        let bytes = (k * n + m * k + m * n) * dtype.size();
        for (label, tuning) in &tunings {
            let plan = plan_for(&client, dtype, m, k, n, false, tuning);
            let mut i = 0;
            let t = time::<B<R, F, I, BT>, _>(device, || {
                i += 1;
                let w = w.copies[i % w.copies.len()].clone();
                let y = launch::linear::<R>(
                    x.clone().into_primitive().tensor(),
                    w.into_primitive().tensor(),
                    None,
                    tuning,
                );
                Tensor::<B<R, F, I, BT>, 2>::from_primitive(TensorPrimitive::Float(y))
            });
            println!(
                "{m:>2} x {k:>5} -> {n:>5} | {label:<36} | {:>7.1} µs | {:>6.0} GB/s | tiles {:>3} x splits {:>2}, {} threads, lanes {}, k groups {}, unroll {}",
                t * 1e6,
                gbps(bytes, t),
                plan.col_tiles,
                plan.splits,
                plan.config.threads(),
                plan.config.lanes,
                plan.config.k_groups,
                plan.config.unroll,
            );
        }
    }
}

fn main() {
    let args = parse_args();
    let device = Device::default();
    let client = <Runtime as cubecl::Runtime>::client(&device);
    let hw = &client.properties().hardware;
    println!(
        "{} device: SMs {:?}, shared {} B/cube, max vector {}, SIMT kernel for m <= {} (f32), {} (f16/bf16)",
        runtime::NAME,
        hw.num_streaming_multiprocessors,
        hw.max_shared_memory_size,
        hw.max_vector_size,
        kernels::linear_max_m(DType::F32),
        kernels::linear_max_m(DType::BF16),
    );
    let mut shapes: Vec<(usize, usize, usize)> = if args.quick {
        vec![(1, 1024, 1024), (1, 1024, 3584), (1, 3584, 1024)]
    } else {
        vec![
            (1, 4096, 4096),
            (1, 4096, 14336),
            (1, 14336, 4096),
            (1, 4096, 1024),
        ]
    };
    if args.m_sweep {
        let (k, n) = if args.quick {
            (1024, 1024)
        } else {
            (4096, 4096)
        };
        shapes.extend([2, 4, 8, 16, 32, 64].map(|m| (m, k, n)));
    }
    for &(m, k, n) in &shapes {
        let plan = plan_for(
            &client,
            args.dtype,
            m,
            k,
            n,
            false,
            &LinearTuning::default(),
        );
        println!("plan {m} x {k} -> {n}: {plan:?}");
    }
    if args.fusion {
        #[cfg(feature = "fusion")]
        run::<burn_fusion::Fusion<Cube>>(&device, "Fusion<CubeBackend>", &args, &shapes);
        #[cfg(not(feature = "fusion"))]
        panic!("--fusion needs the `fusion` feature");
    } else {
        run::<Cube>(&device, "CubeBackend", &args, &shapes);
    }
    if args.sweep {
        let sweep_shapes: Vec<_> = shapes.iter().copied().filter(|s| s.0 == 1).collect();
        sweep::<Runtime, f32, i32, BoolElem>(&device, &args, &sweep_shapes);
    }
}
