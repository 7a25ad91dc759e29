//! The skinny linear kernel against an independent f64 reference on the host.
//!
//! # Running
//! - wgpu (default): `cargo test --release -p kernels --test linear`
//! - CUDA: `cargo test --release -p kernels --features cuda --test linear`
//!
//! The kernel runs on `CubeBackend<R, f32, i32, BT>` for the runtime selected at compile time:
//! wgpu's default device (Mesa's lavapipe on a machine without a GPU: f32 and f16, no bf16,
//! 4-wide vectors, 32 KiB of shared memory) or CUDA device 0 with `--features cuda` (where f16
//! and bf16 are required, and 16-byte vectors of 8 halves are used). Tests for a dtype the wgpu
//! device lacks print a note and return.
//!
//! Inputs are fresh seeded draws in [-1, 1) (never zeros), rounded to the tested dtype before
//! the f64 reference sees them. Tolerances: relative L2 error ‖y − ref‖ / ‖ref‖ ≤ 1e-5 for f32,
//! ≤ 1e-2 for f16/bf16.

use std::time::Instant;

use burn::tensor::{DType, Tensor, TensorPrimitive, backend::Backend};
use burn_cubecl::CubeBackend;
use cubecl::Runtime as _;
use kernels::{
    LinearBackend,
    linear::{LinearTuning, MAX_M, cmma_usable, launch, plan_cmma_for, plan_for},
};
use rand::{SeedableRng, rngs::StdRng};

mod common;

use common::{
    assert_close, draw, read, rel_l2, round_bf16, round_f16, round_f32, runtime, supports, tensor,
};
use runtime::{BoolElem, Device, Runtime};

/// The unfused CubeCL backend on the test runtime.
type Cube = CubeBackend<Runtime, f32, i32, BoolElem>;

// ---------------------------------------------------------------------------------------------
// Problems, inputs and the f64 reference.

#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    k: usize,
    n: usize,
    bias: bool,
}

impl Case {
    fn new(m: usize, k: usize, n: usize, bias: bool) -> Self {
        Self { m, k, n, bias }
    }
    fn seed(&self) -> u64 {
        (self.m * 1_000_003 + self.k * 7_919 + self.n * 31 + self.bias as usize) as u64
    }
}

/// Host copies of the inputs, already rounded to the device dtype. `x: [m, k]`, `w: [k, n]`.
struct Inputs {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Option<Vec<f32>>,
}

fn make_inputs(case: &Case, round: fn(f32) -> f32) -> Inputs {
    let mut rng = StdRng::seed_from_u64(case.seed());
    Inputs {
        x: draw(&mut rng, case.m * case.k, round),
        w: draw(&mut rng, case.k * case.n, round),
        b: case.bias.then(|| draw(&mut rng, case.n, round)),
    }
}

/// `y = x w + b` in f64.
fn reference(case: &Case, inp: &Inputs) -> Vec<f64> {
    let (m, k, n) = (case.m, case.k, case.n);
    let mut y = vec![0.0f64; m * n];
    for r in 0..m {
        let row = &mut y[r * n..(r + 1) * n];
        if let Some(b) = &inp.b {
            for (o, &bv) in row.iter_mut().zip(b) {
                *o = bv as f64;
            }
        }
        for kk in 0..k {
            let xv = inp.x[r * k + kk] as f64;
            let wrow = &inp.w[kk * n..(kk + 1) * n];
            for (o, &wv) in row.iter_mut().zip(wrow) {
                *o += xv * wv as f64;
            }
        }
    }
    y
}

fn rounding(dtype: DType) -> (fn(f32) -> f32, f64) {
    match dtype {
        DType::F32 => (round_f32, 1e-5),
        DType::F16 => (round_f16, 1e-2),
        DType::BF16 => (round_bf16, 1e-2),
        other => panic!("no test tolerance for {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Running the kernel.

/// How the operands are laid out on the device.
#[derive(Clone, Copy, Debug, Default)]
enum Layout {
    /// Contiguous `x: [m, k]`, `w: [k, n]`, `b: [n]`.
    #[default]
    Contiguous,
    /// `x` is the transpose of a contiguous `[k, m]` tensor (strides `[1, m]`).
    XTransposed,
    /// `w` is the column slice `offset..offset + n` of a contiguous `[k, n + pad]` matrix, and
    /// `b` the slice `offset..offset + n` of a `[n + pad]` vector.
    WColumnSlice { offset: usize, pad: usize },
    /// `w` is the transpose of a contiguous `[n, k]` tensor (the launcher copies it).
    WTransposed,
}

struct DeviceInputs<B: Backend> {
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    b: Option<Tensor<B, 1>>,
}

fn upload<B: Backend>(
    case: &Case,
    inp: &Inputs,
    dtype: DType,
    layout: Layout,
    device: &B::Device,
) -> DeviceInputs<B> {
    let (m, k, n) = (case.m, case.k, case.n);
    let transpose = |data: &[f32], rows: usize, cols: usize| -> Vec<f32> {
        let mut t = vec![0.0f32; data.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = data[r * cols + c];
            }
        }
        t
    };
    let x = match layout {
        Layout::XTransposed => {
            tensor::<B, 2>(&transpose(&inp.x, m, k), [k, m], dtype, device).transpose()
        }
        _ => tensor::<B, 2>(&inp.x, [m, k], dtype, device),
    };
    let (w, b) = match layout {
        Layout::WColumnSlice { offset, pad } => {
            let wide = n + pad;
            let mut w_full = vec![f32::NAN; k * wide];
            for r in 0..k {
                w_full[r * wide + offset..r * wide + offset + n]
                    .copy_from_slice(&inp.w[r * n..(r + 1) * n]);
            }
            let w =
                tensor::<B, 2>(&w_full, [k, wide], dtype, device).slice([0..k, offset..offset + n]);
            let b = inp.b.as_ref().map(|b| {
                let mut b_full = vec![f32::NAN; wide];
                b_full[offset..offset + n].copy_from_slice(b);
                tensor::<B, 1>(&b_full, [wide], dtype, device).slice(offset..offset + n)
            });
            (w, b)
        }
        Layout::WTransposed => (
            tensor::<B, 2>(&transpose(&inp.w, k, n), [n, k], dtype, device).transpose(),
            inp.b
                .as_ref()
                .map(|b| tensor::<B, 1>(b, [n], dtype, device)),
        ),
        _ => (
            tensor::<B, 2>(&inp.w, [k, n], dtype, device),
            inp.b
                .as_ref()
                .map(|b| tensor::<B, 1>(b, [n], dtype, device)),
        ),
    };
    DeviceInputs { x, w, b }
}

/// Runs the CubeCL launcher directly (so the kernel is certainly what runs) and checks it.
fn check_kernel(case: Case, dtype: DType, layout: Layout, tuning: LinearTuning) {
    let device = Device::default();
    let (round, tol) = rounding(dtype);
    let inp = make_inputs(&case, round);
    let start = Instant::now();
    let expected = reference(&case, &inp);
    let t_ref = start.elapsed();
    let d = upload::<Cube>(&case, &inp, dtype, layout, &device);
    let client = Runtime::client(&device);
    let plan = plan_for(&client, dtype, case.m, case.k, case.n, case.bias, &tuning);
    let start = Instant::now();
    let out = launch::linear::<Runtime>(
        d.x.into_primitive().tensor(),
        d.w.into_primitive().tensor(),
        d.b.map(|b| b.into_primitive().tensor()),
        &tuning,
    );
    let out = Tensor::<Cube, 2>::from_primitive(TensorPrimitive::Float(out));
    assert_eq!(out.dims(), [case.m, case.n]);
    assert_eq!(out.dtype(), dtype, "the output dtype must follow x");
    let got = read(out);
    let err = rel_l2(&got, &expected);
    println!(
        "{case:?} {dtype:?} {layout:?}: rel_l2 {err:.2e} (kernel {:.0?}, reference {t_ref:.0?}); \
         tiles {} x splits {} of {} rows, {} threads (lanes {}, row groups {} x {}, k groups {}, \
         unroll {}, V {})",
        start.elapsed(),
        plan.col_tiles,
        plan.splits,
        plan.k_chunk,
        plan.config.threads(),
        plan.config.lanes,
        plan.config.row_groups,
        plan.config.rows_per_thread,
        plan.config.k_groups,
        plan.config.unroll,
        plan.config.vector_size,
    );
    assert!(
        err <= tol,
        "rel L2 error {err:e} > {tol:e} for {case:?} {dtype:?} {layout:?} {tuning:?}"
    );
}

fn check(case: Case, dtype: DType) {
    check_kernel(case, dtype, Layout::Contiguous, LinearTuning::default());
}

const MS: [usize; 4] = [1, 3, 17, 64];
const KS: [usize; 4] = [64, 576, 1536, 4096];
const NS: [usize; 4] = [1, 100, 576, 4096 + 7];

/// Every `m` meets every `K` and every `N` once (a Latin square over (K, N)), with the bias on
/// for half of them: 16 cases per dtype, the biggest 64 × 4096 × 4103.
fn grid(dtype: DType, bias_phase: usize) {
    for (i, &m) in MS.iter().enumerate() {
        for (j, &k) in KS.iter().enumerate() {
            let n = NS[(i + j) % NS.len()];
            check(
                Case::new(m, k, n, (i + j + bias_phase).is_multiple_of(2)),
                dtype,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: the kernel on the test runtime.

#[test]
fn grid_f32() {
    grid(DType::F32, 0);
}

#[test]
fn grid_f16() {
    if supports(DType::F16) {
        grid(DType::F16, 1);
    }
}

#[test]
fn grid_bf16() {
    if supports(DType::BF16) {
        grid(DType::BF16, 0);
    }
}

/// The Llama-3-8B decode shape (one token, 4096 → 4096 and 4096 → 1024), with and without bias.
#[test]
fn decode_shapes_f32() {
    check(Case::new(1, 4096, 4096, false), DType::F32);
    check(Case::new(1, 4096, 1024, true), DType::F32);
    check(Case::new(2, 1024, 4096, true), DType::F32);
}

#[test]
fn decode_shapes_half() {
    for dtype in [DType::F16, DType::BF16] {
        if supports(dtype) {
            check(Case::new(1, 4096, 4096, true), dtype);
            check(Case::new(16, 2048, 1024, false), dtype);
        }
    }
}

/// Forced K splits (the two-pass path), uneven chunks and K tails, with and without bias.
#[test]
fn forced_splits() {
    for (case, splits) in [
        (Case::new(1, 1536, 576, true), 3),
        (Case::new(1, 577, 100, false), 7),
        (Case::new(5, 1000, 264, true), 5),
        (Case::new(17, 4096, 100, true), 64),
        (Case::new(64, 333, 40, true), 2),
        (Case::new(3, 64, 1, true), 4),
    ] {
        let tuning = LinearTuning {
            splits: Some(splits),
            ..Default::default()
        };
        check_kernel(case, DType::F32, Layout::Contiguous, tuning);
        if case.m == 5 && supports(DType::F16) {
            check_kernel(case, DType::F16, Layout::Contiguous, tuning);
        }
    }
}

/// Rows of `x` split across cubes (grid z): forced, uneven last blocks, with and without bias.
#[test]
fn row_blocks() {
    for (case, blocks) in [
        (Case::new(64, 130, 200, true), 8),
        (Case::new(64, 576, 96, false), 3),
        (Case::new(17, 300, 72, true), 3),
        (Case::new(33, 1000, 40, false), 2),
        (Case::new(9, 64, 7, true), 2),
    ] {
        let tuning = LinearTuning {
            row_blocks: Some(blocks),
            ..Default::default()
        };
        check_kernel(case, DType::F32, Layout::Contiguous, tuning);
        check_kernel(case, DType::F32, Layout::XTransposed, tuning);
    }
}

/// Other thread layouts, unrolls, vector widths and a tiny shared-memory budget.
#[test]
fn tuned_layouts() {
    let tunings = [
        LinearTuning {
            lanes: Some(8),
            ..Default::default()
        },
        LinearTuning {
            lanes: Some(16),
            unroll: Some(2),
            splits: Some(4),
            ..Default::default()
        },
        LinearTuning {
            unroll: Some(1),
            max_vector_size: Some(1),
            ..Default::default()
        },
        LinearTuning {
            threads: Some(64),
            unroll: Some(3),
            splits: Some(3),
            ..Default::default()
        },
        LinearTuning {
            shared_memory: Some(6 * 1024),
            ..Default::default()
        },
        LinearTuning {
            cubes_per_sm: Some(64),
            ..Default::default()
        },
    ];
    for (i, tuning) in tunings.into_iter().enumerate() {
        for case in [
            Case::new(1, 1000, 520, i % 2 == 0),
            Case::new(9, 300, 72, i % 2 == 1),
            Case::new(64, 130, 200, true),
        ] {
            check_kernel(case, DType::F32, Layout::Contiguous, tuning);
        }
    }
}

/// Strided `x`, a column slice of a wider weight (row stride ≠ n, offset buffers), and a
/// transposed weight view.
#[test]
fn strided_operands() {
    for (case, layout) in [
        (Case::new(3, 576, 100, true), Layout::XTransposed),
        (Case::new(1, 600, 100, true), Layout::XTransposed),
        (
            Case::new(2, 512, 100, true),
            Layout::WColumnSlice { offset: 4, pad: 12 },
        ),
        (
            Case::new(17, 300, 96, true),
            Layout::WColumnSlice { offset: 3, pad: 5 },
        ),
        (
            Case::new(1, 1000, 64, false),
            Layout::WColumnSlice { offset: 8, pad: 8 },
        ),
        (Case::new(4, 256, 100, true), Layout::WTransposed),
    ] {
        check_kernel(case, DType::F32, layout, LinearTuning::default());
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: the tensor-core kernel (f16/bf16, 9..=64 rows; CUDA only).

/// Runs the tensor-core launcher directly and checks it; returns false (after a note) where
/// the device or the inputs do not take it.
fn check_cmma(case: Case, dtype: DType, layout: Layout, tuning: LinearTuning) -> bool {
    let device = Device::default();
    let (round, tol) = rounding(dtype);
    let inp = make_inputs(&case, round);
    let expected = reference(&case, &inp);
    let d = upload::<Cube>(&case, &inp, dtype, layout, &device);
    let (x, w) = (d.x.into_primitive().tensor(), d.w.into_primitive().tensor());
    let b = d.b.map(|b| b.into_primitive().tensor());
    if !cmma_usable(&x, &w, b.as_ref()) {
        println!(
            "{case:?} {dtype:?} {layout:?}: no tensor-core kernel on {}",
            runtime::NAME
        );
        return false;
    }
    let out = launch::linear_cmma::<Runtime>(x, w, b, &tuning);
    let out = Tensor::<Cube, 2>::from_primitive(TensorPrimitive::Float(out));
    assert_eq!(out.dims(), [case.m, case.n]);
    assert_eq!(out.dtype(), dtype, "the output dtype must follow x");
    let err = rel_l2(&read(out), &expected);
    println!("{case:?} {dtype:?} {layout:?} {tuning:?}: rel_l2 {err:.2e}");
    assert!(
        err <= tol,
        "rel L2 error {err:e} > {tol:e} for {case:?} {dtype:?} {layout:?} {tuning:?} (tensor cores)"
    );
    true
}

/// Rows 9..=64 (partial row fragments), the SmolLM2 tree shapes (the small-product plan: 2
/// planes, K splits) and Llama-3-8B's, bias on and off, in both half dtypes.
#[test]
fn tensor_cores_grid() {
    let cases = [
        Case::new(64, 576, 960, true),
        Case::new(64, 576, 576, false),
        Case::new(64, 576, 3072, true),
        Case::new(64, 1536, 576, false),
        Case::new(9, 576, 3072, false),
        Case::new(17, 64, 48, true),
        Case::new(33, 4096, 1024, true),
        Case::new(64, 4096, 6144, false),
        Case::new(50, 14336, 4096, false),
        Case::new(16, 256, 16, true),
    ];
    for dtype in [DType::BF16, DType::F16] {
        if !supports(dtype) {
            continue;
        }
        for case in cases {
            if !check_cmma(case, dtype, Layout::Contiguous, LinearTuning::default()) {
                return;
            }
        }
    }
}

/// Forced K splits (uneven last chunk), other plane counts and unrolls, a small shared-memory
/// budget (shorter staged tiles), strided `x` and a column slice of a wider weight.
#[test]
fn tensor_cores_layouts() {
    let dtype = DType::BF16;
    if !supports(dtype) {
        return;
    }
    let runs = [
        (
            Case::new(64, 1008, 256, true),
            Layout::Contiguous,
            LinearTuning {
                splits: Some(3),
                ..Default::default()
            },
        ),
        (
            Case::new(24, 4096, 512, true),
            Layout::Contiguous,
            LinearTuning {
                splits: Some(64),
                ..Default::default()
            },
        ),
        (
            Case::new(64, 576, 320, false),
            Layout::Contiguous,
            LinearTuning {
                threads: Some(64),
                unroll: Some(3),
                ..Default::default()
            },
        ),
        (
            // Four stages in flight over 9 stages of 64 rows (the last pass partly empty).
            Case::new(48, 576, 128, true),
            Layout::Contiguous,
            LinearTuning {
                stages: Some(4),
                splits: Some(1),
                ..Default::default()
            },
        ),
        (
            // Three in flight over 32 stages of 32 rows.
            Case::new(64, 1024, 192, false),
            Layout::Contiguous,
            LinearTuning {
                stages: Some(3),
                unroll: Some(2),
                splits: Some(1),
                ..Default::default()
            },
        ),
        (
            Case::new(40, 576, 192, true),
            Layout::Contiguous,
            // Stages shrink from 64 to 16 K rows to fit.
            LinearTuning {
                shared_memory: Some(10 * 1024),
                ..Default::default()
            },
        ),
        (
            Case::new(64, 320, 96, true),
            Layout::XTransposed,
            LinearTuning::default(),
        ),
        (
            Case::new(20, 512, 96, true),
            Layout::WColumnSlice {
                offset: 32,
                pad: 48,
            },
            LinearTuning::default(),
        ),
    ];
    for (case, layout, tuning) in runs {
        if !check_cmma(case, dtype, layout, tuning) {
            return;
        }
    }
}

/// What the tensor-core kernel refuses: f32, a row count or shape it is not written for, and a
/// weight slice that breaks the 32-byte alignment of its fragments.
#[test]
fn tensor_cores_refusals() {
    let device = Device::default();
    let usable = |case: Case, dtype: DType, layout: Layout| {
        let inp = make_inputs(&case, rounding(dtype).0);
        let d = upload::<Cube>(&case, &inp, dtype, layout, &device);
        let b = d.b.map(|b| b.into_primitive().tensor());
        cmma_usable(
            &d.x.into_primitive().tensor(),
            &d.w.into_primitive().tensor(),
            b.as_ref(),
        )
    };
    let half = if supports(DType::BF16) {
        DType::BF16
    } else {
        DType::F16
    };
    assert!(!usable(
        Case::new(64, 256, 256, false),
        DType::F32,
        Layout::Contiguous
    ));
    assert!(!usable(
        Case::new(64, 256, 100, false),
        half,
        Layout::Contiguous
    ));
    assert!(!usable(
        Case::new(64, 200, 256, false),
        half,
        Layout::Contiguous
    ));
    let some = usable(Case::new(64, 256, 256, true), half, Layout::Contiguous);
    println!(
        "tensor-core kernel on {} for {half:?}: {some}",
        runtime::NAME
    );
}

// ---------------------------------------------------------------------------------------------
// Tests: the public API on each kind of backend.

/// `kernels::linear` with rank-3 and rank-1 inputs, through `B::linear_skinny` (or Burn's
/// `linear` above `MAX_M` rows), against the f64 reference.
fn check_public<B: LinearBackend>(device: &B::Device, dtype: DType) {
    let (round, tol) = rounding(dtype);
    let tol = tol.max(1e-5);
    // [2, 3, k] → 6 rows; [k] → 1 row; [1, 65, k] → 65 rows (Burn's path).
    for (lead, k, n, bias) in [
        (vec![2usize, 3], 300usize, 200usize, true),
        (vec![], 256, 48, true),
        (vec![1, 1], 4096, 512, false),
        // A 64-node tree: the tensor-core kernel for f16/bf16 where the device has one.
        (vec![4, 16], 576, 192, true),
        // More than MAX_M rows: Burn's linear.
        (vec![1, MAX_M + 1], 128, 72, true),
    ] {
        let m: usize = lead.iter().product();
        let case = Case::new(m, k, n, bias);
        let inp = make_inputs(&case, round);
        let expected = reference(&case, &inp);
        let w = tensor::<B, 2>(&inp.w, [k, n], dtype, device);
        let b = inp
            .b
            .as_ref()
            .map(|b| tensor::<B, 1>(b, [n], dtype, device));
        let what = format!(
            "{} {lead:?} x {k} -> {n} {dtype:?}",
            std::any::type_name::<B>()
        );
        let got = match lead.len() {
            0 => {
                let x = tensor::<B, 1>(&inp.x, [k], dtype, device);
                let y = kernels::linear(x, w, b);
                assert_eq!(y.dims(), [n]);
                assert_eq!(y.dtype(), dtype);
                read(y)
            }
            2 => {
                let x = tensor::<B, 3>(&inp.x, [lead[0], lead[1], k], dtype, device);
                let y = kernels::linear(x, w, b);
                assert_eq!(y.dims(), [lead[0], lead[1], n]);
                assert_eq!(y.dtype(), dtype);
                read(y)
            }
            _ => unreachable!(),
        };
        // Above MAX_M rows the product is Burn's matmul, which on CUDA may use TF32 tensor cores
        // for f32 (10-bit mantissa: measured 2.6e-4 relative on an H100), so only there the
        // f32 bound is the one of a 10-bit-mantissa product.
        let tol = if m > MAX_M { tol.max(2e-3) } else { tol };
        assert_close(&what, &got, &expected, tol);
        println!("{what}: ok");
    }
}

#[test]
fn public_api_cube() {
    check_public::<Cube>(&Device::default(), DType::F32);
    for dtype in [DType::F16, DType::BF16] {
        if supports(dtype) {
            check_public::<Cube>(&Device::default(), dtype);
        }
    }
}

#[cfg(feature = "fusion")]
#[test]
fn public_api_fusion() {
    type Fused = burn_fusion::Fusion<Cube>;
    let device = Device::default();
    check_public::<Fused>(&device, DType::F32);

    // Fused element-wise ops around the custom op, and the output feeding another linear.
    let case = Case::new(3, 200, 120, true);
    let inp = make_inputs(&case, round_f32);
    let expected = reference(&case, &inp);
    let x = tensor::<Fused, 2>(&inp.x, [3, 200], DType::F32, &device);
    let w = tensor::<Fused, 2>(&inp.w, [200, 120], DType::F32, &device);
    let b = tensor::<Fused, 1>(inp.b.as_ref().unwrap(), [120], DType::F32, &device);
    let x = (x * 2.0) * 0.5;
    let y = kernels::linear(x, w.clone(), Some(b.clone())) * 3.0 - 1.0;
    let got: Vec<f32> = read(y.clone()).iter().map(|&o| (o + 1.0) / 3.0).collect();
    assert_close("fused chain", &got, &expected, 1e-5);
    // A second product on the fused result: y2 = ((y + 1) / 3) w2.
    let w2 = tensor::<Fused, 2>(&inp.w[..120 * 200], [120, 200], DType::F32, &device);
    let y2 = kernels::linear((y + 1.0) / 3.0, w2, None);
    let y2_ref = {
        let c2 = Case::new(3, 120, 200, false);
        let inp2 = Inputs {
            x: got.clone(),
            w: inp.w[..120 * 200].to_vec(),
            b: None,
        };
        reference(&c2, &inp2)
    };
    assert_close("chained products", &read(y2), &y2_ref, 1e-5);
}

#[cfg(feature = "flex")]
#[test]
fn public_api_flex() {
    check_public::<burn::backend::Flex>(&Default::default(), DType::F32);
}

/// Prints the device's properties and the plans of the Llama-3-8B decode shapes on it (run
/// with `--nocapture`).
#[test]
fn device_plans() {
    let client = Runtime::client(&Device::default());
    let hw = &client.properties().hardware;
    println!(
        "{} device: SMs {:?}, cpu cores {:?}, shared {} B, max units/cube {}, max vector {}",
        runtime::NAME,
        hw.num_streaming_multiprocessors,
        hw.num_cpu_cores,
        hw.max_shared_memory_size,
        hw.max_units_per_cube,
        hw.max_vector_size,
    );
    for (m, k, n) in [
        (1, 4096, 4096),
        (1, 4096, 1024),
        (1, 4096, 14336),
        (1, 14336, 4096),
        (16, 4096, 4096),
        (64, 4096, 4096),
    ] {
        for dtype in [DType::F32, DType::BF16] {
            let plan = plan_for(&client, dtype, m, k, n, false, &LinearTuning::default());
            println!("{m} x {k} -> {n} {dtype:?}: {plan:?}");
            assert!(plan.config.shared_bytes() <= hw.max_shared_memory_size);
            assert!(plan.config.threads() <= hw.max_units_per_cube as usize);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU in the K-split reduction (a fused gate/up projection).

/// `launch::linear_swiglu` gives the same bits as the product followed by the SwiGLU kernel,
/// and `silu(g)·u` of the f64 reference within tolerance: K splits forced (rows 1–17, with and
/// without bias, the reduction applies SwiGLU) and one split (the caller finishes). The public
/// `kernels::linear_swiglu` agrees with the two ops as well.
#[test]
fn swiglu_in_the_reduction() {
    let device = Device::default();
    let client = Runtime::client(&device);
    let cases = [
        (Case::new(1, 1536, 2 * 576, false), 4),
        (Case::new(3, 576, 2 * 320, true), 3),
        (Case::new(17, 1024, 2 * 64, true), 8),
        (Case::new(2, 256, 2 * 96, false), 1),
        // More splits than the reduction's 16 split lanes: two loads per thread.
        (Case::new(1, 8192, 2 * 64, true), 24),
    ];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        if !supports(dtype) {
            continue;
        }
        let (round, tol) = rounding(dtype);
        let mut in_reduction = 0;
        for (case, splits) in cases {
            let inp = make_inputs(&case, round);
            let y = reference(&case, &inp);
            let (m, n, f) = (case.m, case.n, case.n / 2);
            let expected: Vec<f64> = (0..m * f)
                .map(|i| {
                    let (r, c) = (i / f, i % f);
                    let (g, u) = (y[r * n + c], y[r * n + f + c]);
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            let tuning = LinearTuning {
                splits: Some(splits),
                ..Default::default()
            };
            let plan = plan_for(&client, dtype, m, case.k, n, case.bias, &tuning);
            let d = upload::<Cube>(&case, &inp, dtype, Layout::Contiguous, &device);
            let prims = || {
                (
                    d.x.clone().into_primitive().tensor(),
                    d.w.clone().into_primitive().tensor(),
                    d.b.clone().map(|b| b.into_primitive().tensor()),
                )
            };
            let halves =
                |y: Tensor<Cube, 2>| kernels::swiglu(y.clone().narrow(1, 0, f), y.narrow(1, f, f));
            let (x, w, b) = prims();
            let (out, fused) = launch::linear_swiglu::<Runtime>(x, w, b, &tuning);
            assert_eq!(fused, plan.splits > 1, "{case:?}: {plan:?}");
            in_reduction += usize::from(fused);
            let out = Tensor::<Cube, 2>::from_primitive(TensorPrimitive::Float(out));
            let out = if fused { out } else { halves(out) };
            let (x, w, b) = prims();
            let two_ops = halves(Tensor::from_primitive(TensorPrimitive::Float(
                launch::linear::<Runtime>(x, w, b, &tuning),
            )));
            let name = format!("{case:?} {dtype:?} splits {}", plan.splits);
            let got = read(out);
            assert_eq!(got, read(two_ops), "{name}: not the two ops' bits");
            assert_close(&name, &got, &expected, tol);
            let public = kernels::linear_swiglu(d.x.clone(), d.w.clone(), d.b.clone());
            let plain = kernels::linear(d.x.clone(), d.w.clone(), d.b.clone());
            assert_eq!(
                read(public),
                read(halves(plain)),
                "{name}: kernels::linear_swiglu"
            );
        }
        assert_eq!(
            in_reduction, 4,
            "the forced splits must reach the reduction's SwiGLU"
        );
    }
}

/// The tensor-core kernel's K-split reduction with SwiGLU (`launch::linear_cmma_swiglu`, CUDA
/// only): the same bits as its product followed by the SwiGLU kernel, rows 9–64, with and
/// without bias.
#[test]
fn tensor_cores_swiglu_in_the_reduction() {
    let device = Device::default();
    for dtype in [DType::F16, DType::BF16] {
        if !supports(dtype) {
            continue;
        }
        let (round, tol) = rounding(dtype);
        for case in [
            Case::new(64, 1024, 2 * 512, false),
            Case::new(9, 576, 2 * 1536, true),
        ] {
            let inp = make_inputs(&case, round);
            let y = reference(&case, &inp);
            let (n, f) = (case.n, case.n / 2);
            let expected: Vec<f64> = (0..case.m * f)
                .map(|i| {
                    let (g, u) = (y[i / f * n + i % f], y[i / f * n + f + i % f]);
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            let d = upload::<Cube>(&case, &inp, dtype, Layout::Contiguous, &device);
            let prims = || {
                (
                    d.x.clone().into_primitive().tensor(),
                    d.w.clone().into_primitive().tensor(),
                    d.b.clone().map(|b| b.into_primitive().tensor()),
                )
            };
            let (x, w, b) = prims();
            if !cmma_usable(&x, &w, b.as_ref()) {
                println!(
                    "{case:?} {dtype:?}: no tensor-core kernel on {}",
                    runtime::NAME
                );
                return;
            }
            let tuning = LinearTuning {
                splits: Some(4),
                ..Default::default()
            };
            let halves =
                |y: Tensor<Cube, 2>| kernels::swiglu(y.clone().narrow(1, 0, f), y.narrow(1, f, f));
            let (out, fused) = launch::linear_cmma_swiglu::<Runtime>(x, w, b, &tuning);
            assert!(
                fused,
                "{case:?}: four K splits must end in the SwiGLU reduction"
            );
            let (x, w, b) = prims();
            let two_ops = halves(Tensor::from_primitive(TensorPrimitive::Float(
                launch::linear_cmma::<Runtime>(x, w, b, &tuning),
            )));
            let got = read(Tensor::<Cube, 2>::from_primitive(TensorPrimitive::Float(
                out,
            )));
            let name = format!("{case:?} {dtype:?} (tensor cores)");
            assert_eq!(got, read(two_ops), "{name}: not the two ops' bits");
            assert_close(&name, &got, &expected, tol);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU computed by the down projection as it stages its input.

/// `kernels::fused::launch::mlp_add_rms_norm` (the gate/up product, the down projection
/// computing SwiGLU of it while staging, the residual add and the norm) gives the same bits as
/// the two ops it replaces (`linear_swiglu`, then `linear_add_rms_norm`), and the f64 reference
/// within tolerance: with the gate/up product split along K (the down projection adds its
/// partial sums, in the order of the split's reduction pass) and
/// finished (it reads the product), with and without biases, one row to many, K splits of the
/// down projection or none. The public `kernels::mlp_add_rms_norm` (rank 3) agrees with the two
/// public ops on the plain and the fusion backend.
#[test]
fn mlp_folds_swiglu_into_the_down_projection() {
    // (rows, hidden k, intermediate f, output n, bias, forced K splits of both products)
    let cases = [
        (1, 576, 1536, 576, false, Some(4)),
        (1, 576, 1536, 576, false, None),
        (3, 256, 320, 96, true, Some(3)),
        (17, 128, 512, 64, true, Some(8)),
        (2, 96, 200, 96, false, Some(1)),
        // Many gate/up splits (the planner caps the 24 asked for, 16 on lavapipe).
        (1, 8192, 64, 128, true, Some(24)),
        // Eight rows (the f16/bf16 SIMT limit), a width no multiple of the vector size.
        (8, 300, 100, 202, true, Some(2)),
        // Halves that are not whole vectors: the two ops reduce, then run SwiGLU's launch.
        (1, 96, 102, 64, false, Some(2)),
    ];
    check_mlp_fold(false, &cases);
}

/// [`mlp_folds_swiglu_into_the_down_projection`] on the tensor-core kernel (CUDA only): a
/// Medusa tree step's rows (9 to 64) of f16/bf16, SmolLM2's MLP with the gate/up product split
/// along K (forced, and as planned) or finished, with and without biases.
#[test]
fn tensor_cores_mlp_fold() {
    let cases = [
        (64, 576, 1536, 576, false, Some(4)),
        (64, 576, 1536, 576, false, None),
        (64, 576, 1536, 576, true, Some(1)),
        (9, 256, 512, 128, true, Some(3)),
        (33, 1024, 256, 512, false, Some(8)),
        // A finished gate/up product (4 MiB of weights: no split is planned) into a down
        // projection split along K.
        (64, 256, 4096, 128, false, None),
    ];
    check_mlp_fold(true, &cases);
}

/// An MLP fold case: rows, hidden `k`, intermediate `f`, output `n`, biases, forced K splits of
/// both products.
type MlpCase = (usize, usize, usize, usize, bool, Option<usize>);

/// `kernels::fused::launch::mlp_add_rms_norm` on the SIMT or the tensor-core kernel against
/// the two ops on the same kernel (bits) and the f64 reference, and the public op against the
/// two public ops, for `(rows, k, f, n, bias, forced splits)` cases.
fn check_mlp_fold(tensor_cores: bool, cases: &[MlpCase]) {
    let device = Device::default();
    let client = Runtime::client(&device);
    let eps = 1e-5;
    let dtypes: &[DType] = if tensor_cores {
        &[DType::F16, DType::BF16]
    } else {
        &[DType::F32, DType::F16, DType::BF16]
    };
    'dtypes: for &dtype in dtypes {
        if !supports(dtype) {
            continue;
        }
        let (round, tol) = rounding(dtype);
        let mut gate_up_split = 0;
        for &(m, k, f, n, bias, splits) in cases {
            let gu_case = Case::new(m, k, 2 * f, bias);
            let gu = make_inputs(&gu_case, round);
            let mut rng = StdRng::seed_from_u64(gu_case.seed() + 7);
            let w_down = draw(&mut rng, f * n, round);
            let b_down = bias.then(|| draw(&mut rng, n, round));
            let r = draw(&mut rng, m * n, round);
            let g = draw(&mut rng, n, round);

            // f64 reference: SwiGLU of the gate/up product, the down product, add, norm.
            let y = reference(&gu_case, &gu);
            let act: Vec<f32> = (0..m * f)
                .map(|i| {
                    let (row, c) = (i / f, i % f);
                    let (gv, uv) = (y[row * 2 * f + c], y[row * 2 * f + f + c]);
                    (gv / (1.0 + (-gv).exp()) * uv) as f32
                })
                .collect();
            let down_case = Case::new(m, f, n, bias);
            let down_inputs = Inputs {
                x: act,
                w: w_down.clone(),
                b: b_down.clone(),
            };
            let [h_ref, normed_ref] =
                add_norm_reference(&reference(&down_case, &down_inputs), &r, &g, n, eps);

            let tuning = LinearTuning {
                splits,
                ..Default::default()
            };
            let d = upload::<Cube>(&gu_case, &gu, dtype, Layout::Contiguous, &device);
            if tensor_cores {
                let (x, w, b) = (
                    d.x.clone().into_primitive().tensor(),
                    d.w.clone().into_primitive().tensor(),
                    d.b.clone().map(|b| b.into_primitive().tensor()),
                );
                if !cmma_usable(&x, &w, b.as_ref()) {
                    println!("{dtype:?}: no tensor-core kernel on {}", runtime::NAME);
                    continue 'dtypes;
                }
            }
            let plan_splits = if tensor_cores {
                plan_cmma_for(&client, dtype, m, k, 2 * f, bias, &tuning)
                    .expect("a tensor-core plan")
                    .splits
            } else {
                plan_for(&client, dtype, m, k, 2 * f, bias, &tuning).splits
            };
            gate_up_split += usize::from(plan_splits > 1);
            let wd = tensor::<Cube, 2>(&w_down, [f, n], dtype, &device);
            let bd = b_down
                .as_ref()
                .map(|b| tensor::<Cube, 1>(b, [n], dtype, &device));
            let residual = tensor::<Cube, 2>(&r, [m, n], dtype, &device);
            let gamma = tensor::<Cube, 1>(&g, [n], dtype, &device);
            let prim = |t: Tensor<Cube, 2>| t.into_primitive().tensor();
            let prim1 = |t: Option<Tensor<Cube, 1>>| t.map(|b| b.into_primitive().tensor());
            let wrap = |t| Tensor::<Cube, 2>::from_primitive(TensorPrimitive::Float(t));

            let (h, normed) = kernels::fused::launch::mlp_add_rms_norm::<Runtime>(
                prim(d.x.clone()),
                prim(d.w.clone()),
                prim1(d.b.clone()),
                prim(wd.clone()),
                prim1(bd.clone()),
                prim(residual.clone()),
                gamma.clone().into_primitive().tensor(),
                eps,
                tensor_cores,
                &tuning,
            );
            let (h, normed) = (read(wrap(h)), read(wrap(normed)));

            let two_op_swiglu = if tensor_cores {
                launch::linear_cmma_swiglu::<Runtime>
            } else {
                launch::linear_swiglu::<Runtime>
            };
            let (act, swiglu_done) = two_op_swiglu(
                prim(d.x.clone()),
                prim(d.w.clone()),
                prim1(d.b.clone()),
                &tuning,
            );
            let act = wrap(act);
            let act = if swiglu_done {
                act
            } else {
                kernels::swiglu(act.clone().narrow(1, 0, f), act.narrow(1, f, f))
            };
            let (h2, normed2, _) = kernels::fused::launch::linear_add_rms_norm::<Runtime>(
                prim(act),
                prim(wd.clone()),
                prim1(bd.clone()),
                prim(residual.clone()),
                gamma.clone().into_primitive().tensor(),
                eps,
                tensor_cores,
                &tuning,
            );
            let name = format!(
                "m {m} k {k} f {f} n {n} bias {bias} {dtype:?} tensor cores {tensor_cores}, \
                 gate/up splits {plan_splits}"
            );
            assert_eq!(h, read(wrap(h2)), "{name}: h is not the two ops' bits");
            assert_eq!(
                normed,
                read(wrap(normed2)),
                "{name}: norm is not the two ops' bits"
            );
            assert_close(&format!("{name} h"), &h, &h_ref, tol);
            assert_close(&format!("{name} norm"), &normed, &normed_ref, tol);

            // The public op on rank 3 against the two public ops, plain and fused backends.
            let two_ops = {
                let act = kernels::linear_swiglu(d.x.clone(), d.w.clone(), d.b.clone());
                let (h, normed) = kernels::linear_add_rms_norm(
                    act,
                    wd.clone(),
                    bd.clone(),
                    residual.clone(),
                    gamma.clone(),
                    eps,
                );
                (read(h), read(normed))
            };
            let (h, normed) = kernels::mlp_add_rms_norm(
                d.x.clone().reshape([1, m, k]),
                d.w.clone(),
                d.b.clone(),
                wd.clone(),
                bd.clone(),
                residual.clone().reshape([1, m, n]),
                gamma.clone(),
                eps,
            );
            assert_eq!(h.dims(), [1, m, n]);
            assert_eq!(
                (read(h), read(normed)),
                two_ops,
                "{name}: kernels::mlp_add_rms_norm"
            );
            #[cfg(feature = "fusion")]
            {
                type Fused = burn_fusion::Fusion<Cube>;
                let up2 =
                    |v: &[f32], shape: [usize; 2]| tensor::<Fused, 2>(v, shape, dtype, &device);
                let up1 = |v: &[f32], len: usize| tensor::<Fused, 1>(v, [len], dtype, &device);
                let (h, normed) = kernels::mlp_add_rms_norm(
                    up2(&gu.x, [m, k]).reshape([1, m, k]),
                    up2(&gu.w, [k, 2 * f]),
                    gu.b.as_ref().map(|b| up1(b, 2 * f)),
                    up2(&w_down, [f, n]),
                    b_down.as_ref().map(|b| up1(b, n)),
                    up2(&r, [m, n]).reshape([1, m, n]),
                    up1(&g, n),
                    eps,
                );
                assert_eq!((read(h), read(normed)), two_ops, "{name}: on Fusion");
            }
        }
        // Three cases of each list force a gate/up split (whatever the device's size).
        assert!(
            gate_up_split >= 3,
            "the forced splits must reach the down projection's staging ({gate_up_split})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The K split's partial sums added inside the RMSNorm that follows the product.

/// `h = r + (x w + b)` and `h / sqrt(mean(h²) + eps) · γ` in f64, per row.
fn add_norm_reference(y: &[f64], r: &[f32], gamma: &[f32], n: usize, eps: f64) -> [Vec<f64>; 2] {
    let h: Vec<f64> = y.iter().zip(r).map(|(&y, &r)| y + r as f64).collect();
    let normed = h
        .chunks(n)
        .flat_map(|row| {
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / n as f64 + eps).sqrt();
            row.iter()
                .zip(gamma)
                .map(move |(&v, &g)| v * inv * g as f64)
        })
        .collect();
    [h, normed]
}

/// `kernels::fused::launch::linear_add_rms_norm` gives the same bits as the product followed
/// by the `add_rms_norm` kernel, and the f64 reference within tolerance: K splits forced
/// (rows 1–17, with and without bias: the norm adds the partial sums, also past the
/// reduction's 16 split lanes) and one split (the product finishes itself). The public
/// `kernels::linear_add_rms_norm` (rank 3) agrees with the two public ops, on the plain and
/// the fusion backend.
#[test]
fn norm_adds_the_split_sums() {
    let device = Device::default();
    let client = Runtime::client(&device);
    let eps = 1e-5;
    let cases = [
        (Case::new(1, 1536, 576, false), 4),
        (Case::new(3, 576, 320, true), 3),
        (Case::new(17, 1024, 64, true), 8),
        (Case::new(2, 256, 96, false), 1),
        (Case::new(1, 8192, 64, true), 24),
        // A width that is no multiple of the vector size.
        (Case::new(2, 300, 202, true), 2),
        // Rows wider than a cube's threads: several columns per thread.
        (Case::new(1, 1024, 4096, true), 4),
    ];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        if !supports(dtype) {
            continue;
        }
        let (round, tol) = rounding(dtype);
        let mut in_norm = 0;
        for (case, splits) in cases {
            let (m, n) = (case.m, case.n);
            let inp = make_inputs(&case, round);
            let mut rng = StdRng::seed_from_u64(case.seed() + 1);
            let r = draw(&mut rng, m * n, round);
            let g = draw(&mut rng, n, round);
            let [h_ref, normed_ref] = add_norm_reference(&reference(&case, &inp), &r, &g, n, eps);
            let tuning = LinearTuning {
                splits: Some(splits),
                ..Default::default()
            };
            let plan = plan_for(&client, dtype, m, case.k, n, case.bias, &tuning);
            let d = upload::<Cube>(&case, &inp, dtype, Layout::Contiguous, &device);
            let residual = tensor::<Cube, 2>(&r, [m, n], dtype, &device);
            let gamma = tensor::<Cube, 1>(&g, [n], dtype, &device);
            let prim = |t: Tensor<Cube, 2>| t.into_primitive().tensor();
            let (h, normed, fused) = kernels::fused::launch::linear_add_rms_norm::<Runtime>(
                prim(d.x.clone()),
                prim(d.w.clone()),
                d.b.clone().map(|b| b.into_primitive().tensor()),
                prim(residual.clone()),
                gamma.clone().into_primitive().tensor(),
                eps,
                false,
                &tuning,
            );
            assert_eq!(fused, plan.splits > 1, "{case:?}: {plan:?}");
            in_norm += usize::from(fused);
            let wrap = |t| Tensor::<Cube, 2>::from_primitive(TensorPrimitive::Float(t));
            let (h, normed) = (read(wrap(h)), read(wrap(normed)));
            let y = wrap(launch::linear::<Runtime>(
                prim(d.x.clone()),
                prim(d.w.clone()),
                d.b.clone().map(|b| b.into_primitive().tensor()),
                &tuning,
            ));
            let (h2, normed2) = kernels::add_rms_norm(residual.clone(), y, gamma.clone(), eps);
            let name = format!("{case:?} {dtype:?} splits {}", plan.splits);
            assert_eq!(h, read(h2), "{name}: h is not the two ops' bits");
            assert_eq!(
                normed,
                read(normed2),
                "{name}: norm is not the two ops' bits"
            );
            assert_close(&format!("{name} h"), &h, &h_ref, tol);
            assert_close(&format!("{name} norm"), &normed, &normed_ref, tol);

            // The public op on rank 3, plain and fused backends.
            let public = |x: Tensor<Cube, 2>, residual: Tensor<Cube, 2>| {
                let (h, normed) = kernels::linear_add_rms_norm(
                    x.reshape([1, m, case.k]),
                    d.w.clone(),
                    d.b.clone(),
                    residual.reshape([1, m, n]),
                    gamma.clone(),
                    eps,
                );
                assert_eq!(h.dims(), [1, m, n]);
                (read(h), read(normed))
            };
            let two_ops = {
                let y = kernels::linear(d.x.clone(), d.w.clone(), d.b.clone());
                let (h, normed) = kernels::add_rms_norm(residual.clone(), y, gamma.clone(), eps);
                (read(h), read(normed))
            };
            assert_eq!(
                public(d.x.clone(), residual.clone()),
                two_ops,
                "{name}: kernels::linear_add_rms_norm"
            );
            #[cfg(feature = "fusion")]
            {
                type Fused = burn_fusion::Fusion<Cube>;
                let up =
                    |v: &[f32], shape: [usize; 3]| tensor::<Fused, 3>(v, shape, dtype, &device);
                let (h, normed) = kernels::linear_add_rms_norm(
                    up(&inp.x, [1, m, case.k]),
                    up(&inp.w, [1, case.k, n]).reshape([case.k, n]),
                    inp.b
                        .as_ref()
                        .map(|b| tensor::<Fused, 1>(b, [n], dtype, &device)),
                    up(&r, [1, m, n]),
                    tensor::<Fused, 1>(&g, [n], dtype, &device),
                    eps,
                );
                assert_eq!((read(h), read(normed)), two_ops, "{name}: on Fusion");
            }
        }
        assert_eq!(
            in_norm, 6,
            "the forced splits must reach the norm's reduction"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The K split's partial sums of a fused q/k/v projection finished inside RoPE + cache write.

/// `(i + d/2) % d`: the dimension each one rotates with.
fn swap_of<B: Backend>(d: usize, device: &B::Device) -> Tensor<B, 1, burn::tensor::Int> {
    let idx = (0..d).map(|i| ((i + d / 2) % d) as i64).collect();
    Tensor::from_data(burn::tensor::TensorData::new(idx, [d]), device)
}

/// What `linear_rope_cache` must reproduce from a finished fused q/k/v product
/// `y: [batch · seq, (n_heads + 2 · n_kv) · head_dim]`: the public RoPE on its heads, then the
/// public cache write; `[q, k cache, v cache]` on the host. `heads`: `[batch, n_heads, n_kv]`.
fn rope_then_cache<B: kernels::FusedOpsBackend>(
    y: Tensor<B, 2>,
    [batch, nh, nkv]: [usize; 3],
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    [k_cache, v_cache]: [Tensor<B, 4>; 2],
    start: usize,
) -> [Vec<f32>; 3] {
    let ([m, n], d) = (y.dims(), cos.dims()[1]);
    let swap = swap_of(d, &y.device());
    let rotated = kernels::rope(
        y.reshape([batch, m / batch, n / d, d]),
        cos,
        sin,
        swap,
        nh + nkv,
    );
    let (kc, vc) = kernels::cache_write(
        k_cache,
        v_cache,
        rotated.clone().narrow(1, nh, nkv),
        rotated.clone().narrow(1, nh + nkv, nkv),
        start,
    );
    [read(rotated.narrow(1, 0, nh)), read(kc), read(vc)]
}

/// `kernels::fused::launch::linear_rope_cache` gives the same bits as the product followed by
/// the RoPE and cache-write kernels, and the f64 reference within tolerance (queries rotated,
/// keys rotated into the cache rows, values copied, other cache rows untouched), whether the
/// product split along K (forced: batch 1–2, 1–3 tokens, with and without bias, past 16 split
/// lanes) or not; the public `kernels::linear_rope_cache` agrees with the public ops in a row,
/// on the plain and the fusion backend.
#[test]
fn rope_and_cache_take_the_split_sums() {
    let device = Device::default();
    let client = Runtime::client(&device);
    // (batch, seq, k, n_heads, n_kv, head_dim, bias, splits)
    let cases = [
        (1, 1, 1024, 3, 1, 16, false, 4),
        (2, 3, 300, 4, 2, 8, true, 3),
        (1, 1, 16384, 2, 1, 8, true, 24),
        (1, 2, 128, 2, 2, 8, false, 1),
        // Unsplit, with bias and batch 2; and a Medusa tree's 32 rows per sequence.
        (2, 3, 300, 4, 2, 8, true, 1),
        (2, 32, 64, 2, 1, 16, true, 1),
    ];
    let (cap, start) = (40, 2);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        if !supports(dtype) {
            continue;
        }
        let (round, tol) = rounding(dtype);
        let mut split = 0;
        for (b, s, k, nh, nkv, d, bias, splits) in cases {
            let heads = nh + 2 * nkv;
            let (m, n) = (b * s, heads * d);
            let case = Case::new(m, k, n, bias);
            let inp = make_inputs(&case, round);
            let y = reference(&case, &inp);
            let mut rng = StdRng::seed_from_u64(case.seed() + 2);
            let cos = draw(&mut rng, s * d, round);
            let sin = draw(&mut rng, s * d, round);
            let cache_len = b * nkv * cap * d;
            let k0 = draw(&mut rng, cache_len, round);
            let v0 = draw(&mut rng, cache_len, round);
            // f64: rotated queries, and the caches with rotated keys and values at start.. .
            let half = d / 2;
            let value = |bb: usize, ss: usize, h: usize, i: usize| {
                let row = (bb * s + ss) * n + h * d;
                if h >= nh + nkv {
                    return y[row + i];
                }
                let partner = if i < half { i + half } else { i - half };
                y[row + i] * cos[ss * d + i] as f64 + y[row + partner] * sin[ss * d + i] as f64
            };
            let mut q_ref = vec![0.0f64; b * nh * s * d];
            let mut k_ref: Vec<f64> = k0.iter().map(|&v| v as f64).collect();
            let mut v_ref: Vec<f64> = v0.iter().map(|&v| v as f64).collect();
            for bb in 0..b {
                for ss in 0..s {
                    for i in 0..d {
                        for h in 0..nh {
                            q_ref[((bb * nh + h) * s + ss) * d + i] = value(bb, ss, h, i);
                        }
                        for h in 0..nkv {
                            let at = ((bb * nkv + h) * cap + start + ss) * d + i;
                            k_ref[at] = value(bb, ss, nh + h, i);
                            v_ref[at] = value(bb, ss, nh + nkv + h, i);
                        }
                    }
                }
            }
            let tuning = LinearTuning {
                splits: Some(splits),
                ..Default::default()
            };
            let plan = plan_for(&client, dtype, m, k, n, bias, &tuning);
            let name = format!(
                "{b}x{s} {k} -> {nh}+2x{nkv} heads of {d} {dtype:?} splits {}",
                plan.splits
            );
            println!("{name}");
            split += usize::from(plan.splits > 1);
            let d_in = upload::<Cube>(&case, &inp, dtype, Layout::Contiguous, &device);
            let table = |v: &[f32]| tensor::<Cube, 2>(v, [s, d], dtype, &device);
            let cache = |v: &[f32]| tensor::<Cube, 4>(v, [b, nkv, cap, d], dtype, &device);
            let prim2 = |t: Tensor<Cube, 2>| t.into_primitive().tensor();
            let prim4 = |t: Tensor<Cube, 4>| t.into_primitive().tensor();
            let wrap4 = |t| Tensor::<Cube, 4>::from_primitive(TensorPrimitive::Float(t));
            let out = kernels::fused::launch::linear_rope_cache::<Runtime>(
                prim2(d_in.x.clone()),
                prim2(d_in.w.clone()),
                d_in.b.clone().map(|b| b.into_primitive().tensor()),
                prim2(table(&cos)),
                prim2(table(&sin)),
                prim4(cache(&k0)),
                prim4(cache(&v0)),
                start,
                nh,
                false,
                &tuning,
            );
            let got = [out.0, out.1, out.2].map(|t| read(wrap4(t)));
            // The product, then the RoPE and cache-write kernels.
            let yd = Tensor::<Cube, 2>::from_primitive(TensorPrimitive::Float(launch::linear::<
                Runtime,
            >(
                prim2(d_in.x.clone()),
                prim2(d_in.w.clone()),
                d_in.b.clone().map(|b| b.into_primitive().tensor()),
                &tuning,
            )));
            let two_ops = rope_then_cache(
                yd,
                [b, nh, nkv],
                table(&cos),
                table(&sin),
                [cache(&k0), cache(&v0)],
                start,
            );
            assert_eq!(got, two_ops, "{name}: not the ops' bits");
            for (what, got, expected) in [
                ("q", &got[0], &q_ref),
                ("k cache", &got[1], &k_ref),
                ("v cache", &got[2], &v_ref),
            ] {
                assert_close(&format!("{name} {what}"), got, expected, tol);
            }

            // The public op, plain and fused backends.
            let public = kernels::linear_rope_cache(
                d_in.x.clone().reshape([b, s, k]),
                d_in.w.clone(),
                d_in.b.clone(),
                table(&cos),
                table(&sin),
                swap_of(d, &device),
                cache(&k0),
                cache(&v0),
                start,
                nh,
            );
            let public_ops = rope_then_cache(
                kernels::linear(d_in.x.clone(), d_in.w.clone(), d_in.b.clone()),
                [b, nh, nkv],
                table(&cos),
                table(&sin),
                [cache(&k0), cache(&v0)],
                start,
            );
            assert_eq!(
                [read(public.0), read(public.1), read(public.2)],
                public_ops,
                "{name}: kernels::linear_rope_cache"
            );
            #[cfg(feature = "fusion")]
            {
                type Fused = burn_fusion::Fusion<Cube>;
                let fused = kernels::linear_rope_cache(
                    tensor::<Fused, 3>(&inp.x, [b, s, k], dtype, &device),
                    tensor::<Fused, 2>(&inp.w, [k, n], dtype, &device),
                    inp.b
                        .as_ref()
                        .map(|v| tensor::<Fused, 1>(v, [n], dtype, &device)),
                    tensor::<Fused, 2>(&cos, [s, d], dtype, &device),
                    tensor::<Fused, 2>(&sin, [s, d], dtype, &device),
                    swap_of(d, &device),
                    tensor::<Fused, 4>(&k0, [b, nkv, cap, d], dtype, &device),
                    tensor::<Fused, 4>(&v0, [b, nkv, cap, d], dtype, &device),
                    start,
                    nh,
                );
                assert_eq!(
                    [read(fused.0), read(fused.1), read(fused.2)],
                    public_ops,
                    "{name}: on Fusion"
                );
            }
        }
        assert!(
            split >= 2 && split < cases.len(),
            "the cases must cover split and unsplit products ({split} of {} split)",
            cases.len()
        );
    }
}

/// The tensor-core kernel's K split folded into the norm and into RoPE + cache write (CUDA
/// only; f16/bf16 at 64 rows, as a Medusa tree step): the same bits as `launch::linear_cmma`
/// followed by the unfolded ops.
#[test]
fn tensor_cores_fold_into_norm_and_rope() {
    let device = Device::default();
    let eps = 1e-5;
    for dtype in [DType::F16, DType::BF16] {
        if !supports(dtype) {
            continue;
        }
        let (round, _) = rounding(dtype);
        let tuning = LinearTuning {
            splits: Some(4),
            ..Default::default()
        };
        let (nh, nkv, d, cap, start) = (4, 2, 64, 128, 10);
        let case = Case::new(64, 1024, (nh + 2 * nkv) * d, true);
        let (m, n) = (case.m, case.n);
        let inp = make_inputs(&case, round);
        let dev = upload::<Cube>(&case, &inp, dtype, Layout::Contiguous, &device);
        let prim2 = |t: Tensor<Cube, 2>| t.into_primitive().tensor();
        let prims = || {
            (
                prim2(dev.x.clone()),
                prim2(dev.w.clone()),
                dev.b.clone().map(|b| b.into_primitive().tensor()),
            )
        };
        let (x, w, b) = prims();
        if !cmma_usable(&x, &w, b.as_ref()) {
            println!("{dtype:?}: no tensor-core kernel on {}", runtime::NAME);
            return;
        }
        let product = || {
            let (x, w, b) = prims();
            Tensor::<Cube, 2>::from_primitive(TensorPrimitive::Float(
                launch::linear_cmma::<Runtime>(x, w, b, &tuning),
            ))
        };
        let mut rng = StdRng::seed_from_u64(case.seed() + 3);
        let r = tensor::<Cube, 2>(&draw(&mut rng, m * n, round), [m, n], dtype, &device);
        let g = tensor::<Cube, 1>(&draw(&mut rng, n, round), [n], dtype, &device);
        let (h, normed, fused) = kernels::fused::launch::linear_add_rms_norm::<Runtime>(
            x,
            w,
            b,
            prim2(r.clone()),
            g.clone().into_primitive().tensor(),
            eps,
            true,
            &tuning,
        );
        assert!(fused, "{dtype:?}: four K splits must reach the norm");
        let wrap2 = |t| Tensor::<Cube, 2>::from_primitive(TensorPrimitive::Float(t));
        let (h2, normed2) = kernels::add_rms_norm(r, product(), g, eps);
        assert_eq!(read(wrap2(h)), read(h2), "{dtype:?}: h (tensor cores)");
        assert_eq!(
            read(wrap2(normed)),
            read(normed2),
            "{dtype:?}: norm (tensor cores)"
        );

        let table =
            |rng: &mut StdRng| tensor::<Cube, 2>(&draw(rng, m * d, round), [m, d], dtype, &device);
        let (cos, sin) = (table(&mut rng), table(&mut rng));
        let cache = |rng: &mut StdRng| {
            tensor::<Cube, 4>(
                &draw(rng, nkv * cap * d, round),
                [1, nkv, cap, d],
                dtype,
                &device,
            )
        };
        let (k0, v0) = (cache(&mut rng), cache(&mut rng));
        let (x, w, b) = prims();
        let got = kernels::fused::launch::linear_rope_cache::<Runtime>(
            x,
            w,
            b,
            prim2(cos.clone()),
            prim2(sin.clone()),
            k0.clone().into_primitive().tensor(),
            v0.clone().into_primitive().tensor(),
            start,
            nh,
            true,
            &tuning,
        );
        let got = [got.0, got.1, got.2]
            .map(|t| read(Tensor::<Cube, 4>::from_primitive(TensorPrimitive::Float(t))));
        assert_eq!(
            got,
            rope_then_cache(product(), [1, nh, nkv], cos, sin, [k0, v0], start),
            "{dtype:?}: q, k and v caches (tensor cores)"
        );
    }
}
