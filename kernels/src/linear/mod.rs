//! Skinny linear layers for decoding: `y = x · W (+ b)` with few rows in `x` (a decode step, a
//! Medusa tree) and a big row-major weight `W: [in, out]`, at the memory-bandwidth limit.
//!
//! With `m` rows the product does `2·m` flops per weight element, so for `m` up to a few dozen
//! it is bound by streaming `W` from memory once. The entry point is [`linear`] (same contract
//! as `burn::tensor::module::linear`), which flattens the leading dimensions of `x` into `m`
//! rows and runs [`LinearBackend::linear_skinny`] for `1 <= m <= 64` ([`MAX_M`]), Burn's
//! `linear` otherwise. On CubeCL backends the SIMT kernel ([`fn@kernel::linear_kernel`]) takes
//! `m <= linear_max_m(dtype)` (64 rows for f32, 8 for f16/bf16 by default: see
//! [`HALF_MAX_M`]); more f16/bf16 rows go to the tensor-core kernel ([`cmma`], CUDA) where the
//! device and shapes allow it, else to Burn's `linear`.
//!
//! Backends opt in through [`LinearBackend`]:
//! - `CubeBackend<R, F, I, BT>` (any CubeCL runtime) runs the kernels of [`kernel`] for f32,
//!   f16 and bf16 (whatever `F` is: the dtype is read at run time);
//! - `Fusion<B>` registers a custom fusion operation that runs its inner backend's kernel;
//! - the CPU backends (`flex`, `ndarray`) and `Autodiff<B>` use Burn's `linear`.
//!
//! # Kernel design ([`fn@kernel::linear_kernel`])
//!
//! **Coalesced weight stream.** A cube owns a tile of `TX · V` output columns. Each thread
//! reads `V` consecutive columns of a weight row with one vector load (`V = 16 bytes / element`,
//! i.e. 8 for bf16/f16 and 4 for f32 on CUDA; 4 at most on wgpu), and the `TX` lanes (16 in the
//! 512-thread cubes of one or a few rows, up to 32 otherwise) read `TX · 16` contiguous bytes of that row. The
//! weights go straight from global memory to registers: every thread issues `U` (8, or 4 with
//! many rows) independent loads before it uses any of them. For a row or a few (`RM · V <= 16`)
//! the cubes have 512 threads, two per SM: ~128 KiB of loads in flight per SM. That was measured, not derived: on
//! an H200 (`cargo run -p bench -- tune`) 256-thread cubes of 32 lanes streamed the Llama-3-8B
//! decode shapes at 1.1–2.4 TB/s, 512-thread cubes of 16 lanes at 1.5–2.7 TB/s.
//!
//! **K split.** A cube's threads are `TX` lanes × `RG` row groups × `KG` k groups. The `KG`
//! groups take interleaved weight rows (at any moment a cube reads a contiguous band of
//! `KG · U` rows) and are summed through shared memory at the end. When the column tiles alone
//! cannot fill the device (1×4096 @ 4096×4096 has only 32 tiles of 128 columns), K is also split
//! across cubes (grid y) so that about 2 cubes run per SM: each split writes f32 partial sums
//! and [`fn@kernel::split_reduce_kernel`] adds them, the bias, and casts. On an H100/H200 (132 SMs)
//! the Llama-3-8B decode shapes become 48×6 cubes (q/k/v, 4096→6144), 32×8 (o), 224×2 (gate/up,
//! 4096→28672) and 32×8 (down, 14336→4096, 1792 rows each); the partial sums add under 2% to
//! the weight traffic. When even that leaves the device half idle (many rows through a small
//! matrix, where the partials cap the split), the rows are cut into blocks with cubes of their
//! own instead (grid z; each block reads the weights again, from L2 when they fit there).
//!
//! **Rows of `x`.** `x` is tiny: it is staged per tile of `BK` K-rows in shared memory as f32,
//! laid out `[k][row]` (row stride made odd against bank conflicts), so all lanes of a plane read
//! one broadcast address. Each loaded weight vector is multiplied into `RM <= 8` rows held as
//! f32 accumulators in registers (`RM · V` of them); more rows are spread over `RG = ceil(m/8)`
//! row groups, which load the same weight vectors (the repeats hit L1). With many rows the
//! planner narrows the lanes (16 or 8) rather than splitting K further, so that the f32 partials
//! (`splits · m · n`) stay below a quarter of the weight bytes.
//!
//! **Tails and layouts.** Any `k`, `n` and `1 <= m <= 64`: columns past `n` and rows past `k`
//! are guarded (zeros), rows past `m` are computed on zeros and not written. `V` is the largest
//! power of two that divides `n`, the weights' row stride and the buffer offsets (so a column
//! slice of a wider weight works; an odd `n` runs with `V = 1`). `x` may have any strides.
//!
//! **Portability.** No plane operations; reductions go through shared memory (at most 32 KiB per
//! cube, and never more than the device offers), cubes have at most 512 threads (256 unless a
//! thread's accumulators are few), and the tile sizes come from the device's properties
//! (multiprocessor count, shared memory, units per cube, vector width), so the same kernel runs
//! on CUDA, wgpu/Vulkan (lavapipe included) and the other CubeCL runtimes.
//!
//! **Accumulation** is f32 whatever the input dtype; the output is cast once.

pub mod cmma;
pub mod kernel;
pub mod launch;

#[cfg(feature = "fusion")]
mod fusion;

pub use cmma::LinearCmmaConfig;
pub use kernel::{LinearConfig, ReduceConfig};
pub use launch::{
    LinearCmmaPlan, LinearPlan, LinearProblem, LinearTuning, MAX_M, cmma_usable, plan, plan_cmma,
    plan_cmma_for, plan_for, supported,
};

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{
    DType, Tensor, TensorPrimitive,
    backend::Backend,
    ops::{FloatTensor, ModuleOps},
};
use burn_cubecl::{
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement, tensor::CubeTensor,
};

/// A Burn backend that can run [`linear`] with few rows.
///
/// Implemented for every CubeCL backend (kernel path), `Fusion` over those, the CPU backends
/// enabled by this crate's features and `Autodiff` over any of them (Burn's `linear`).
pub trait LinearBackend: Backend {
    /// `x · weight (+ bias)` for `x: [m, in]`, `weight: [in, out]` (Burn's `Linear` layout),
    /// `bias: [out]`; returns `[m, out]` in the dtype of `x`. Backends without a kernel, and
    /// inputs the kernel does not take (see [`launch::supported`]), use Burn's `linear`.
    fn linear_skinny(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self>;
}

/// [`MAX_ROWS`] before the environment was read.
const UNSET: usize = usize::MAX;
/// [`MAX_ROWS`] once the environment was read and set no limit: the dtype's default applies.
const BY_DTYPE: usize = usize::MAX - 1;
static MAX_ROWS: AtomicUsize = AtomicUsize::new(UNSET);

/// Default row limit of the SIMT skinny kernel for f16/bf16 inputs (f32 takes [`MAX_M`]).
///
/// With many rows, half precision belongs on tensor cores: on an H200, a 64-row product with
/// Llama-3-8B's fused gate/up matrix (4096 × 28672, bf16) took 2.05 ms in the SIMT kernel and
/// 0.25 ms in Burn's matmul, and a Medusa tree step (64 rows) cost 5.4 decode steps with the
/// kernel against 1.6 without; at one row the kernel streams 2–4× faster than Burn's matmul.
/// Past this limit f16/bf16 products take the tensor-core kernel ([`cmma`]) on CUDA: 64-row
/// Llama-3-8B projections in 55–226 µs against Burn's matmul's 74–249 (`launch::plan_cmma`).
/// f32 keeps the kernel up to [`MAX_M`] rows: Burn's f32 matmul on CUDA runs in TF32, so a tree
/// step through it does not reproduce the logits of a decode step (measured: greedy Medusa in
/// f32 then diverged from plain decoding on 1 of 30 Spec-Bench prompts; with the kernel, 0).
pub const HALF_MAX_M: usize = 8;

/// Most rows (`m`, the product of the leading dimensions of `x`) for which [`linear`] takes the
/// SIMT skinny kernel for inputs of `dtype`; larger products go to the tensor-core kernel
/// (f16/bf16 on CUDA, up to [`MAX_M`] rows) or Burn's matmul; 0 switches both kernels off.
/// Defaults to
/// [`MAX_M`] (64) for f32 and [`HALF_MAX_M`] (8) for f16/bf16. An explicit limit applies to
/// every dtype: `BURN_DECODE_LINEAR_MAX_M=<n>` in the environment (clamped to `0..=64`, read
/// once), `BURN_DECODE_LINEAR=reference` for 0 (never), or [`set_linear_max_m`].
/// [`crate::kernels_enabled`] being off (`BURN_DECODE_ATTENTION=reference`, the stock-Burn
/// baseline) also turns the kernel off.
pub fn linear_max_m(dtype: DType) -> usize {
    let explicit = match MAX_ROWS.load(Ordering::Relaxed) {
        UNSET => {
            let rows = if std::env::var("BURN_DECODE_LINEAR").as_deref() == Ok("reference") {
                Some(0)
            } else {
                std::env::var("BURN_DECODE_LINEAR_MAX_M")
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .map(|v| v.min(MAX_M))
            };
            MAX_ROWS.store(rows.unwrap_or(BY_DTYPE), Ordering::Relaxed);
            rows
        }
        BY_DTYPE => None,
        rows => Some(rows),
    };
    explicit.unwrap_or(if dtype == DType::F32 {
        MAX_M
    } else {
        HALF_MAX_M
    })
}

/// Sets [`linear_max_m`] for the whole process and every dtype (clamped to `0..=64`; 0 = never
/// the kernel).
pub fn set_linear_max_m(rows: usize) {
    MAX_ROWS.store(rows.min(MAX_M), Ordering::Relaxed);
}

/// `x · weight (+ bias)` like `burn::tensor::module::linear`, through the skinny kernel when
/// `x` has few rows.
///
/// # Shapes
/// - `x`: `[..., in]` (any rank; the leading dimensions are flattened into `m` rows),
/// - `weight`: `[in, out]`, row-major (Burn's `Linear` layout),
/// - `bias`: `[out]`,
/// - output: `[..., out]` in the dtype of `x`.
///
/// A kernel runs when [`crate::kernels_enabled`] is on and `1 <= m <= linear_max_m(dtype)`
/// (the SIMT kernel) or, for f16/bf16 on a device with tensor cores, `m <= 64` (the
/// tensor-core kernel; `BURN_DECODE_CMMA=0` switches it off); otherwise, and on backends
/// without a kernel, this is Burn's `linear`.
///
/// # Panics
/// On inconsistent shapes.
pub fn linear<B: LinearBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let (m, k, n) = product_dims("linear", &dims, weight.dims(), bias.as_ref());
    if !takes_skinny(x.dtype(), m, k, n) {
        return burn::tensor::module::linear(x, weight, bias);
    }
    let x2: Tensor<B, 2> = x.reshape([m, k]);
    let y = B::linear_skinny(
        x2.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        bias.map(|b| b.into_primitive().tensor()),
    );
    let mut out = dims;
    out[D - 1] = n;
    Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y)).reshape(out)
}

/// `(m, k, n)` of `x · weight (+ bias)` for `x` of shape `x_dims` (`[..., k]`, leading
/// dimensions flattened into `m`).
///
/// # Panics
/// When `weight` is not `[k, n]` or `bias` not `[n]`; `op` names the caller.
pub(crate) fn product_dims<B: Backend>(
    op: &str,
    x_dims: &[usize],
    weight: [usize; 2],
    bias: Option<&Tensor<B, 1>>,
) -> (usize, usize, usize) {
    let k = x_dims[x_dims.len() - 1];
    let m: usize = x_dims[..x_dims.len() - 1].iter().product();
    let [wk, n] = weight;
    assert_eq!(
        k, wk,
        "{op}: x has {k} input features but the weight is [{wk}, {n}]"
    );
    if let Some(b) = bias {
        assert_eq!(b.dims(), [n], "{op}: bias must be [{n}]");
    }
    (m, k, n)
}

/// Whether [`linear`] hands an `[m, k] x [k, n]` product of `dtype` to
/// [`LinearBackend::linear_skinny`] (else Burn's `linear` takes it). Past `linear_max_m` rows
/// the backend still decides: f16/bf16 trees go to the tensor-core kernel where the device has
/// one.
pub(crate) fn takes_skinny(dtype: DType, m: usize, k: usize, n: usize) -> bool {
    let half = matches!(dtype, DType::F16 | DType::BF16);
    let rows_limit = match linear_max_m(dtype) {
        0 => 0,
        limit if half => MAX_M.max(limit),
        limit => limit,
    };
    m > 0 && k > 0 && n > 0 && m <= rows_limit && crate::kernels_enabled()
}

/// The kernel path; inputs outside [`launch::supported`] (other dtypes, more than [`MAX_M`]
/// rows, a transposed weight view, ...) take Burn's `linear` instead.
impl<R, F, I, BT> LinearBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn linear_skinny(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        match skinny_kernel(&x, &weight, bias.as_ref()) {
            Some(SkinnyKernel::Simt) => launch::linear(x, weight, bias, &LinearTuning::default()),
            Some(SkinnyKernel::TensorCores) => {
                launch::linear_cmma(x, weight, bias, &LinearTuning::default())
            }
            None => <Self as ModuleOps<Self>>::linear(x, weight, bias),
        }
    }
}

/// The kernel a CubeCL backend runs for a skinny product.
pub(crate) enum SkinnyKernel {
    /// [`launch::linear`]: up to [`linear_max_m`] rows.
    Simt,
    /// [`launch::linear_cmma`]: f16/bf16 past that, where [`cmma_usable`].
    TensorCores,
}

/// Which kernel takes `x · w (+ bias)` on a CubeCL backend; `None`: Burn's `linear` (kernels
/// off, inputs outside [`supported`], or too many rows for a kernel the device has).
pub(crate) fn skinny_kernel<R: CubeRuntime>(
    x: &CubeTensor<R>,
    w: &CubeTensor<R>,
    bias: Option<&CubeTensor<R>>,
) -> Option<SkinnyKernel> {
    if !crate::kernels_enabled() || !supported(x, w, bias) {
        None
    } else if x.meta.shape()[0] <= linear_max_m(x.dtype) {
        Some(SkinnyKernel::Simt)
    } else if cmma_usable(x, w, bias) {
        Some(SkinnyKernel::TensorCores)
    } else {
        None
    }
}

/// Burn's `linear` on backend primitives (the path of backends without a kernel).
#[cfg(any(feature = "flex", feature = "ndarray", feature = "autodiff"))]
fn burn_linear<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
) -> FloatTensor<B> {
    B::linear(x, weight, bias)
}

#[cfg(feature = "flex")]
impl LinearBackend for burn::backend::Flex {
    fn linear_skinny(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        burn_linear::<Self>(x, weight, bias)
    }
}

#[cfg(feature = "ndarray")]
impl<E, I, Q> LinearBackend for burn::backend::NdArray<E, I, Q>
where
    burn::backend::NdArray<E, I, Q>: burn::tensor::backend::Backend,
    burn::backend::ndarray::NdArrayTensor:
        From<burn::backend::ndarray::SharedArray<E>> + From<burn::backend::ndarray::SharedArray<I>>,
{
    fn linear_skinny(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        burn_linear::<Self>(x, weight, bias)
    }
}

/// Autodiff takes Burn's differentiable `linear` (the kernel has no backward pass).
#[cfg(feature = "autodiff")]
impl<B, C> LinearBackend for burn::backend::Autodiff<B, C>
where
    B: LinearBackend,
    C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy,
{
    fn linear_skinny(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        burn_linear::<Self>(x, weight, bias)
    }
}
