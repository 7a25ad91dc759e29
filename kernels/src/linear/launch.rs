//! Host side of the skinny linear layer: input checks, launch planning and the launches.

use burn::tensor::{DType, Shape};
use burn_cubecl::{
    CubeRuntime,
    kernel::{cast, into_contiguous},
    ops::numeric::empty_device_contiguous_dtype,
    tensor::CubeTensor,
};
use cubecl::prelude::*;

use super::cmma::{FRAG, LinearCmmaConfig, PLANE, linear_cmma_kernel};
use super::kernel::{LinearConfig, ReduceConfig, linear_kernel, split_reduce_kernel};
use crate::args::{array_arg, unused_arg};
use crate::cube::launch::{cmma_supported, tensor_cores_enabled};
use crate::fused::kernel::SplitSumConfig;

/// Most rows of `x` the kernel takes (a 64-node Medusa tree). [`fn@crate::linear`] sends larger
/// products to Burn's matmul.
pub const MAX_M: usize = 64;
/// Rows of `x` per thread at most (`RM`): `RM * V` f32 accumulators live in registers.
const MAX_ROWS_PER_THREAD: usize = 8;
/// Threads per cube the planner aims for.
const TARGET_THREADS: usize = 256;
/// Threads along the columns at most: one 32-wide plane reads `32 * 16` contiguous bytes of a
/// weight row.
const MAX_LANES: usize = 32;
/// Threads per cube, and lanes at most, when a thread's accumulators are few (`RM * V <= 16`:
/// a decode step's single row). Measured on an H200 (`cargo run -p bench -- tune`, the
/// Llama-3-8B decode shapes in bf16): 512-thread cubes of 16 lanes streamed the weights
/// 1.1-2.0x faster than 256-thread cubes of 32 lanes (q/k/v 44.6 -> 23.6 µs, o 28.8 -> 23.0,
/// gate/up 99.8 -> 88.8, down 101 -> 51): twice the loads in flight per SM, and twice the
/// column tiles, so half the K split.
const WIDE_THREADS: usize = 512;
const WIDE_MAX_LANES: usize = 16;
/// Shared memory for the staged `x` tile (the portable floor is 32 KiB; the k-group reduction
/// buffer takes at most another 16 KiB: 512 threads × 8 f32, and is budgeted first).
const X_SHARED_BYTES: usize = 16 * 1024;
/// Cubes per multiprocessor the K split aims for. Two cubes per SM, each thread with `U = 8`
/// 16-byte loads in flight, keep 64 KiB (256 threads) or 128 KiB (512 threads) of reads in
/// flight per SM; the whole grid stays resident in one wave while the kernel needs at most 128
/// (256-thread cubes) or 64 (512-thread cubes) registers per thread.
const DEFAULT_CUBES_PER_SM: usize = 2;
/// Upper bound on the K split (bounds the partial buffer and the reduction's loads).
const MAX_SPLITS: usize = 64;
/// Largest vector the kernel uses, in bytes.
const MAX_VECTOR_BYTES: usize = 16;
/// Fewest lanes the planner narrows a cube to when the grid is too small.
const MIN_LANES: usize = 8;
/// Defaults of the tensor-core kernel, measured on an H200 (`cargo run -p bench -- tune`, the
/// Llama-3-8B projections with 64 rows of bf16): 4 planes per cube (64 columns), stages of
/// 64 K rows (`LinearTuning::unroll` = 4 fragments), one stage in flight, K split towards 4
/// cubes per SM: 70 / 55 / 226 / 119 µs for q/k/v, o, gate/up, down (Burn's matmul: 90 / 74 /
/// 187 / 249). Of the 48 combinations swept (cubes per SM 2/4, stages of 32/64 rows, 4/8
/// planes, 1/2/4 stages in flight), this one and the same with 32-row stages had the lowest
/// sum; more stages in flight were not faster. Small products take [`CMMA_SMALL_WARPS`].
const CMMA_WARPS: usize = 4;
/// Fragments of 16 K rows per stage (`LinearTuning::unroll`).
const CMMA_UNROLL: usize = 4;
/// Stages in flight per cube (`LinearTuning::stages`).
pub const CMMA_DEPTH: usize = 1;
/// Cubes per multiprocessor the K split aims for.
const CMMA_CUBES_PER_SM: usize = 4;
/// Weight bytes below which a tensor-core product counts as small: 4 MiB stream in ~1.2 µs at
/// an H200's 3.5 TB/s, less than a launch, so such a product is bound by the latency of its
/// cubes' K loops, not by bandwidth, and the partials' traffic does not matter. SmolLM2's
/// products (0.66–3.5 MB) are small; Llama-3.2-1B's and Llama-3-8B's (8 MiB and up, also
/// unfused) keep the plan measured on the 8B shapes.
const CMMA_SMALL_WEIGHT_BYTES: usize = 4 << 20;
/// Planes per cube of a small product: two (32 columns) give twice the cubes of the default.
const CMMA_SMALL_WARPS: usize = 2;
/// Fewest K rows per split of a small product. Measured on an H200 (`bench tune --model
/// random:smollm2-135m`, 64 rows of bf16, each product with its reduction launch): SmolLM2's
/// q/k/v, o, gate/up and down took 23.0 / 23.5 / 24.8 / 53.8 µs with the previous plan (4
/// planes, no split: 15, 9, 48 and 9 cubes each running the whole K), 14.5 / 16.5 / 16.7 /
/// 16.5 µs with 2 planes and splits of at least 128 rows (the best of 31 combinations per
/// shape: 14.5 / 13.9 / 16.5 / 15.2, within the sweep's run-to-run spread of 1–3 µs). Shorter
/// splits were slower on q/k/v and gate/up (q/k/v at 64 rows: 18.2–21.5), not on o and down.
const CMMA_SMALL_MIN_CHUNK: usize = 128;

/// Knobs for tests and benchmarks; the defaults (all `None`) are what
/// [`crate::LinearBackend::linear_skinny`] uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinearTuning {
    /// Force this many K splits (clamped to `1..=ceil(k / k_step)`, at most 64 by default rule).
    pub splits: Option<usize>,
    /// Cubes per multiprocessor the K split aims for (default 2).
    pub cubes_per_sm: Option<usize>,
    /// Independent weight loads per thread (`U`, default 8 when `RM * V <= 16`, else 4).
    pub unroll: Option<usize>,
    /// Cap on the vector width in elements (default: 16 bytes' worth, e.g. 8 for bf16).
    pub max_vector_size: Option<usize>,
    /// Threads per cube the planner aims for (a power of two; default 512 when `RM * V <= 16`,
    /// else 256, within the device's limit).
    pub threads: Option<usize>,
    /// Lanes along the columns per cube (`TX`, a power of two; default at most 32, or 16 with
    /// 512-thread cubes, narrowed to 16 or 8 when the grid would be small).
    pub lanes: Option<usize>,
    /// Pretend the device has at most this much shared memory per cube (bytes).
    pub shared_memory: Option<usize>,
    /// Force the rows of `x` into this many blocks of cubes (grid z; clamped to
    /// `1..=ceil(m / 8)`).
    pub row_blocks: Option<usize>,
    /// Tensor-core kernel: stages of weights whose loads are in flight at once (default
    /// [`CMMA_DEPTH`]).
    pub stages: Option<usize>,
}

/// A skinny product `[m, k] x [k, n]` as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearProblem {
    /// Rows of `x` (tokens: 1 for a decode step, the tree's nodes for a Medusa step).
    pub m: usize,
    /// Columns of `x`, rows of `w` (the reduction).
    pub k: usize,
    /// Columns of `w` (the output features).
    pub n: usize,
    /// Bytes per element of `x` and `w`.
    pub elem_size: usize,
    /// Vector width in elements (divides `n`).
    pub vector_size: usize,
    /// Bias added to the output.
    pub bias: bool,
}

/// What a launch will do; returned by [`plan`] for inspection in tests and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearPlan {
    /// Comptime configuration of [`fn@linear_kernel`].
    pub config: LinearConfig,
    /// Column tiles (grid x).
    pub col_tiles: usize,
    /// K splits (grid y); more than one adds the [`fn@split_reduce_kernel`] pass.
    pub splits: usize,
    /// Weight rows per split (a multiple of `config.k_step()`).
    pub k_chunk: usize,
    /// Configuration of the reduction pass when `splits > 1`.
    pub reduce: Option<ReduceConfig>,
    /// Blocks of `config.rows_padded()` rows of `x` (grid z), each its own cubes.
    pub row_blocks: usize,
}

impl LinearPlan {
    /// Cubes of the main kernel.
    pub fn cubes(&self) -> usize {
        self.col_tiles * self.splits * self.row_blocks
    }
}

/// Chooses the thread layout, tile sizes and K split for `p` on a device with
/// `multiprocessors` compute units, at most `max_threads` units per cube and `shared_limit`
/// bytes of shared memory per cube.
///
/// - the `m` rows are cut into `RG = ceil(m / 8)` groups of `RM = ceil(m / RG)` rows;
/// - cubes have 512 threads when the accumulators are small (`RM * V <= 16`: one row in bf16,
///   up to four in f32), else 256 (within the device's limit; see `WIDE_THREADS`);
/// - `TX` lanes (32, or 16 with 512-thread cubes; narrowed to 16 or 8 when the grid would be
///   too small) cover consecutive column vectors; the remaining threads split K (`KG`, a power
///   of two);
/// - `U` = 8 independent loads per thread when the accumulators are small, else 4;
/// - when the column tiles cannot fill `2 × multiprocessors` cubes, K is split across cubes:
///   at most 64 ways, at least one `KG * U` step per split, and with the f32 partial sums
///   (written and read once) costing at most a quarter of the weight bytes;
/// - when that still fills less than half of them, the rows are cut into blocks of cubes
///   (grid z) with one K split, if that gives the bigger grid.
pub fn plan(
    p: &LinearProblem,
    multiprocessors: usize,
    max_threads: usize,
    shared_limit: usize,
    tuning: &LinearTuning,
) -> LinearPlan {
    assert!(p.m >= 1, "linear: empty x");
    let whole = plan_block(p, p.m, multiprocessors, max_threads, shared_limit, tuning);
    // Many rows and few cubes (a 64-node tree through a small matrix: the f32 partials cap the
    // K split): give each block of rows its own cubes instead, at one K split. Each block reads
    // the weights again, from L2 when the matrix fits there.
    let target = multiprocessors.max(1) * tuning.cubes_per_sm.unwrap_or(DEFAULT_CUBES_PER_SM);
    let max_blocks = p.m.div_ceil(MAX_ROWS_PER_THREAD);
    let blocks = match tuning.row_blocks {
        Some(b) => b.clamp(1, max_blocks),
        None if 2 * whole.cubes() >= target => 1,
        None => target.div_ceil(whole.cubes()).min(max_blocks),
    };
    if blocks <= 1 {
        return whole;
    }
    let rows = p.m.div_ceil(blocks);
    let tuning = LinearTuning {
        splits: Some(1),
        ..*tuning
    };
    let mut block = plan_block(p, rows, multiprocessors, max_threads, shared_limit, &tuning);
    block.row_blocks = p.m.div_ceil(rows);
    // Only when that is the bigger grid (forcing one K split can cost more than the blocks add).
    if tuning.row_blocks.is_some() || block.cubes() > whole.cubes() {
        block
    } else {
        whole
    }
}

/// [`plan`] for cubes that each take `rows` of the `p.m` rows.
fn plan_block(
    p: &LinearProblem,
    rows: usize,
    multiprocessors: usize,
    max_threads: usize,
    shared_limit: usize,
    tuning: &LinearTuning,
) -> LinearPlan {
    assert!(p.vector_size >= 1 && p.n.is_multiple_of(p.vector_size));
    let v = p.vector_size;
    let n_vec = p.n / v;
    let row_groups = rows.div_ceil(MAX_ROWS_PER_THREAD);
    let rows_per_thread = rows.div_ceil(row_groups);
    let few_accumulators = rows_per_thread * v <= 16;
    let threads = prev_power_of_two(
        tuning
            .threads
            .unwrap_or(if few_accumulators {
                WIDE_THREADS
            } else {
                TARGET_THREADS
            })
            .min(max_threads)
            .max(1),
    );
    assert!(
        row_groups <= threads,
        "linear: {rows} rows need more threads per cube than the device has"
    );
    // Narrow lanes go with the wide cubes they were measured with.
    let lanes_cap = match tuning.lanes {
        None if few_accumulators && threads == WIDE_THREADS => WIDE_MAX_LANES,
        _ => MAX_LANES,
    };
    let lanes_max = n_vec
        .next_power_of_two()
        .min(lanes_cap)
        .min(prev_power_of_two(threads / row_groups));
    let unroll = tuning
        .unroll
        .unwrap_or(if few_accumulators { 8 } else { 4 })
        .max(1);

    // Grid size the K split aims for, and the split the partial sums may cost.
    let target = multiprocessors.max(1) * tuning.cubes_per_sm.unwrap_or(DEFAULT_CUBES_PER_SM);
    let partial_cap = (p.k * p.elem_size / (32 * p.m)).max(1);

    let layout = |lanes: usize| {
        let mut config = LinearConfig {
            vector_size: v,
            lanes,
            row_groups,
            rows_per_thread,
            k_groups: prev_power_of_two((threads / (lanes * row_groups)).max(1)),
            unroll,
            block_k: 1,
            bias: p.bias,
            partial: false,
            swiglu_input: None,
        };
        // Shared memory: the reduction buffer plus at least one `KG * U` step of x.
        while config.k_step() > x_rows_budget(&config, shared_limit)
            && (config.unroll > 1 || config.k_groups > 1)
        {
            if config.unroll > 1 {
                config.unroll /= 2;
            } else {
                config.k_groups /= 2;
            }
        }
        assert!(
            config.k_step() <= x_rows_budget(&config, shared_limit),
            "linear: {} rows of x do not fit in {shared_limit} bytes of shared memory",
            p.m
        );
        let col_tiles = n_vec.div_ceil(lanes);
        let max_useful = p.k.div_ceil(config.k_step()).max(1);
        let splits = match tuning.splits {
            Some(s) => s.clamp(1, max_useful),
            None if col_tiles >= target => 1,
            None => target
                .div_ceil(col_tiles)
                .min(MAX_SPLITS)
                .min(partial_cap)
                .min(max_useful)
                .max(1),
        };
        (config, col_tiles, splits)
    };

    // The widest lanes whose grid reaches half the target; failing that, the biggest grid
    // (narrower lanes give more column tiles but need a longer K step per split).
    let (mut config, col_tiles, splits) = match tuning.lanes {
        Some(l) => layout(prev_power_of_two(l.clamp(1, lanes_max))),
        None => {
            let mut best = layout(lanes_max);
            let mut lanes = lanes_max;
            while 2 * best.1 * best.2 < target && lanes / 2 >= MIN_LANES {
                lanes /= 2;
                let candidate = layout(lanes);
                if candidate.1 * candidate.2 > best.1 * best.2 {
                    best = candidate;
                }
            }
            best
        }
    };

    let k_step = config.k_step();
    let k_chunk = p.k.div_ceil(splits).next_multiple_of(k_step).max(k_step);
    let splits = p.k.div_ceil(k_chunk).max(1);
    let max_bk = (x_rows_budget(&config, shared_limit) / k_step) * k_step;
    config.block_k = max_bk.min(k_chunk);
    config.partial = splits > 1;
    config.bias = p.bias && splits == 1;

    let reduce = (splits > 1).then(|| reduce_config(splits, threads, p.bias));
    LinearPlan {
        config,
        col_tiles,
        splits,
        k_chunk,
        reduce,
        row_blocks: 1,
    }
}

/// Rows of `x` a staged tile may hold: at most [`X_SHARED_BYTES`], and what the device's shared
/// memory leaves after the k-group reduction buffer.
fn x_rows_budget(c: &LinearConfig, shared_limit: usize) -> usize {
    let red = if c.k_groups > 1 {
        4 * c.threads() * c.vector_size
    } else {
        0
    };
    X_SHARED_BYTES.min(shared_limit.saturating_sub(red)) / (4 * c.x_stride())
}

fn prev_power_of_two(x: usize) -> usize {
    if x == 0 {
        0
    } else {
        1 << (usize::BITS - 1 - x.leading_zeros())
    }
}

/// Whether [`linear`] can run these inputs (the backend falls back to Burn's `linear`
/// otherwise): f32/f16/bf16, `x` and `w` of one dtype, `x: [m, k]` with `1 <= m <= MAX_M`,
/// `w: [k, n]` with unit stride along `n`, `k, n >= 1`, and a `[n]` bias.
pub fn supported<R: CubeRuntime>(
    x: &CubeTensor<R>,
    w: &CubeTensor<R>,
    bias: Option<&CubeTensor<R>>,
) -> bool {
    let xs = x.meta.shape();
    xs.num_dims() == 2 && supported_input(x.dtype, xs[0], w, bias) && w.meta.shape()[0] == xs[1]
}

/// [`supported`] for an input of `m` rows in `dtype` that is not a tensor yet (a product the
/// kernel computes while staging it, see [`product_of_swiglu`]).
pub(crate) fn supported_input<R: CubeRuntime>(
    dtype: DType,
    m: usize,
    w: &CubeTensor<R>,
    bias: Option<&CubeTensor<R>>,
) -> bool {
    let float = |d: DType| matches!(d, DType::F32 | DType::F16 | DType::BF16);
    let ws = w.meta.shape();
    ws.num_dims() == 2
        && float(dtype)
        && w.dtype == dtype
        && (1..=MAX_M).contains(&m)
        && ws[0] >= 1
        && ws[1] >= 1
        && w.meta.strides()[1] == 1
        && bias.is_none_or(|b| {
            float(b.dtype) && b.meta.shape().num_dims() == 1 && b.meta.shape()[0] == ws[1]
        })
}

fn element_offset<R: CubeRuntime>(t: &CubeTensor<R>) -> usize {
    t.handle.offset_start.unwrap_or(0) as usize / t.dtype.size()
}

/// Largest vector width (a power of two, at most 16 bytes and the device's limit) that divides
/// `n`, the weights' row stride and the element offsets of the weight and bias buffers.
fn vector_size_for<R: CubeRuntime>(
    w: &CubeTensor<R>,
    bias: Option<&CubeTensor<R>>,
    n: usize,
    tuning: &LinearTuning,
) -> usize {
    let hw_max = w.client.properties().hardware.max_vector_size.max(1);
    let max = (MAX_VECTOR_BYTES / w.dtype.size())
        .min(hw_max)
        .min(tuning.max_vector_size.unwrap_or(usize::MAX))
        .max(1);
    let mut v = prev_power_of_two(max);
    while v > 1 {
        let ok = n.is_multiple_of(v)
            && w.meta.strides()[0].is_multiple_of(v)
            && element_offset(w).is_multiple_of(v)
            && bias.is_none_or(|b| element_offset(b).is_multiple_of(v));
        if ok {
            break;
        }
        v /= 2;
    }
    v
}

/// `x · w (+ bias)` on CubeCL tensors, for `x: [m, k]` (any strides), `w: [k, n]` (row-major,
/// any row stride: a column slice of a wider matrix works), `bias: [n]`; `1 <= m <= MAX_M`.
/// The output is a new contiguous `[m, n]` tensor in the dtype of `x`; all arithmetic is f32.
///
/// # Panics
/// On shapes or dtypes outside [`supported`] (except a non-unit column stride of `w` or a
/// strided bias, which are copied first, and a bias of another float dtype, which is cast).
pub fn linear<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    tuning: &LinearTuning,
) -> CubeTensor<R> {
    finish(product(x, w, bias, tuning), false).0
}

/// [`linear`] for a fused gate/up projection (`w = [gate | up]`): when the product is split
/// along K, its reduction pass applies SwiGLU and the result is `[m, n / 2]` (`true`);
/// otherwise it is the plain `[m, n]` product (`false`), for the caller to finish.
pub fn linear_swiglu<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    tuning: &LinearTuning,
) -> (CubeTensor<R>, bool) {
    finish(product(x, w, bias, tuning), true)
}

/// Whether a reduction pass can apply SwiGLU to an `n`-column product read in vectors of
/// `vector_size`: the halves must be whole vectors.
fn swiglu_fits(n: usize, vector_size: usize) -> bool {
    n.is_multiple_of(2) && (n / 2).is_multiple_of(vector_size)
}

/// A launched skinny product: its output, or the f32 partial sums of a K split that a
/// finishing pass still has to add up ([`finish`], or a consumer that reads them directly,
/// such as [`crate::fused::FusedOpsBackend::linear_add_rms_norm`]).
// One per launch, moved once: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Product<R: CubeRuntime> {
    Done(CubeTensor<R>),
    Split(SplitSums<R>),
}

/// The f32 partial sums `partial[split][row][col]` (`[splits, m, n]`, contiguous) of a K-split
/// product, with what the finishing pass needs.
pub(crate) struct SplitSums<R: CubeRuntime> {
    pub partial: CubeTensor<R>,
    /// `[n]` in the output dtype, unit stride.
    pub bias: Option<CubeTensor<R>>,
    pub splits: usize,
    pub m: usize,
    pub n: usize,
    /// Vector width the product used (divides `n`).
    pub vector_size: usize,
    /// The planned reduction pass (its split lanes fix the order the splits are added in).
    pub reduce: ReduceConfig,
    /// Dtype of the finished product (that of `x`).
    pub dtype: DType,
}

/// Adds up a [`Product`]'s K split (plus bias) into `[m, n]`, or with `swiglu` into SwiGLU of
/// the two column halves, `[m, n / 2]`, when the halves are whole vectors (`true`); a product
/// without a split is returned as it is (`false`).
pub(crate) fn finish<R: CubeRuntime>(product: Product<R>, swiglu: bool) -> (CubeTensor<R>, bool) {
    let s = match product {
        Product::Done(out) => return (out, false),
        Product::Split(s) => s,
    };
    let swiglu = swiglu && swiglu_fits(s.n, s.vector_size);
    let out = empty_device_contiguous_dtype::<R>(
        s.partial.client.clone(),
        s.partial.device.clone(),
        Shape::new([s.m, if swiglu { s.n / 2 } else { s.n }]),
        s.dtype,
    );
    let client = s.partial.client.clone();
    launch_reduce(
        &client,
        ReduceConfig { swiglu, ..s.reduce },
        s.vector_size,
        s.partial,
        s.bias.as_ref(),
        &out,
        s.splits,
        s.m,
        s.n,
    );
    (out, swiglu)
}

/// Launches the SIMT product of [`linear`]; a K split is left unfinished.
pub(crate) fn product<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    tuning: &LinearTuning,
) -> Product<R> {
    product_of(Input::Plain(x), w, bias, tuning)
}

/// Launches the SIMT product `swiglu(gate_up) · w (+ bias)`, SwiGLU computed as the kernel
/// stages its input ([`fn@linear_kernel`]): `gate_up` is a fused gate/up projection's product
/// (`[m, 2k]`, finished or left as its K split's partial sums), `w` is `[k, n]`. The same bits
/// as [`finish`]ing `gate_up` with SwiGLU, then [`product`]; one launch fewer. A K split of
/// this product is left unfinished.
///
/// # Panics
/// As [`product`], or when `gate_up`'s width is not twice `w`'s rows.
pub(crate) fn product_of_swiglu<R: CubeRuntime>(
    gate_up: Product<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    tuning: &LinearTuning,
) -> Product<R> {
    product_of(Input::Swiglu(gate_up), w, bias, tuning)
}

/// What a product multiplies (either kernel).
// One per launch, moved once (as `Product`): the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Input<R: CubeRuntime> {
    /// `x: [m, k]`.
    Plain(CubeTensor<R>),
    /// SwiGLU of the two halves of a product `[m, 2k]` ([`product_of_swiglu`]).
    Swiglu(Product<R>),
}

/// What a product kernel reads for an [`Input`].
struct Staged<R: CubeRuntime> {
    /// The tensor read as `F`: the plain input, or a finished gate/up product.
    x: Option<CubeTensor<R>>,
    /// The partial sums of a split gate/up product, read as f32.
    sums: Option<SplitSums<R>>,
    /// How the kernel computes SwiGLU while staging (`None`: a plain input).
    swiglu: Option<SplitSumConfig>,
    /// The input's `[m, k]` (`k` is half the gate/up product's width).
    m: usize,
    k: usize,
}

impl<R: CubeRuntime> Input<R> {
    fn staged(self) -> Staged<R> {
        match self {
            Input::Plain(x) => {
                let [m, k] = x.meta.shape().dims::<2>();
                Staged {
                    x: Some(x),
                    sums: None,
                    swiglu: None,
                    m,
                    k,
                }
            }
            Input::Swiglu(Product::Done(y)) => {
                let [m, n2] = y.meta.shape().dims::<2>();
                assert!(
                    n2.is_multiple_of(2),
                    "linear: a gate/up product of odd width {n2}"
                );
                let swiglu = SplitSumConfig {
                    splits: 0,
                    split_lanes: 1,
                    bias: false,
                };
                Staged {
                    x: Some(y),
                    sums: None,
                    swiglu: Some(swiglu),
                    m,
                    k: n2 / 2,
                }
            }
            Input::Swiglu(Product::Split(s)) => {
                assert!(
                    s.n.is_multiple_of(2),
                    "linear: a gate/up product of odd width {}",
                    s.n
                );
                let swiglu = SplitSumConfig {
                    splits: s.splits,
                    split_lanes: s.reduce.split_lanes,
                    bias: s.bias.is_some(),
                };
                Staged {
                    m: s.m,
                    k: s.n / 2,
                    x: None,
                    sums: Some(s),
                    swiglu: Some(swiglu),
                }
            }
        }
    }
}

impl<R: CubeRuntime> Staged<R> {
    /// Checks the input against the weight's dtype and device.
    fn check(&self, w: &CubeTensor<R>) {
        let dtype = w.dtype;
        if let Some(x) = &self.x {
            assert_eq!(
                x.dtype, dtype,
                "linear: x is {:?} but the weight is {dtype:?}",
                x.dtype
            );
            x.assert_is_on_same_device(w);
        }
        if let Some(s) = &self.sums {
            assert_eq!(
                s.dtype, dtype,
                "linear: the gate/up product is {:?} but the weight is {dtype:?}",
                s.dtype
            );
            s.partial.assert_is_on_same_device(w);
        }
    }

    /// The kernel's `x`, `x_partial` and `x_bias` arguments and the partial sums' split
    /// stride; parameters a launch does not read are bound to `out` (they are switched off at
    /// compile time).
    fn args(self, out: &CubeTensor<R>) -> (ArrayArg<R>, ArrayArg<R>, ArrayArg<R>, u32) {
        let split_stride = self.sums.as_ref().map_or(0, |s| s.m * s.n);
        let split_stride =
            u32::try_from(split_stride).expect("linear: gate/up partial sums exceed 32 bits");
        match (self.x, self.sums) {
            (Some(x), _) => (array_arg(x), unused_arg(out), unused_arg(out), split_stride),
            (None, Some(s)) => (
                unused_arg(out),
                array_arg(s.partial),
                s.bias.map_or_else(|| unused_arg(out), array_arg),
                split_stride,
            ),
            (None, None) => unreachable!("an input to multiply"),
        }
    }
}

fn product_of<R: CubeRuntime>(
    input: Input<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    tuning: &LinearTuning,
) -> Product<R> {
    let staged = input.staged();
    let (m, k, swiglu_input) = (staged.m, staged.k, staged.swiglu);
    let dtype = w.dtype;
    staged.check(&w);
    assert!(
        matches!(dtype, DType::F32 | DType::F16 | DType::BF16),
        "linear: unsupported dtype {dtype:?} (the CubeCL kernel takes f32, f16 or bf16)"
    );
    let [wk, n] = w.meta.shape().dims::<2>();
    assert_eq!(
        wk, k,
        "linear: x is [{m}, {k}] but the weight is [{wk}, {n}]"
    );
    assert!(
        (1..=MAX_M).contains(&m),
        "linear: the skinny kernel takes 1..={MAX_M} rows, got {m}"
    );
    assert!(k >= 1 && n >= 1, "linear: empty weight [{k}, {n}]");
    assert!(
        (k as u64) * (w.meta.strides()[0].max(n) as u64) < u32::MAX as u64
            && ((MAX_SPLITS * MAX_M * n) as u64) < u32::MAX as u64,
        "linear: weight too large for 32-bit indexing"
    );

    let w = if w.meta.strides()[1] == 1 {
        w
    } else {
        into_contiguous(w)
    };
    let bias = bias.map(|b| prepare_bias(&w, b, n));

    let client = w.client.clone();
    let device = w.device.clone();
    let vector_size = vector_size_for(&w, bias.as_ref(), n, tuning);
    let props = client.properties();
    let hw = &props.hardware;
    let multiprocessors = hw
        .num_streaming_multiprocessors
        .or(hw.num_cpu_cores)
        .unwrap_or(16) as usize;
    let max_threads = hw.max_units_per_cube as usize;
    let shared_limit = shared_limit(hw, tuning);
    let problem = LinearProblem {
        m,
        k,
        n,
        elem_size: dtype.size(),
        vector_size,
        bias: bias.is_some(),
    };
    let plan = plan(&problem, multiprocessors, max_threads, shared_limit, tuning);
    let n_vec = n / vector_size;
    let target = Target::new(&client, &device, plan.splits, m, n, dtype);
    let out = target.buffer();
    let bias_arg = || match &bias {
        Some(b) => array_arg(b.clone()),
        None => unused_arg(out),
    };
    let (x_row_stride, x_col_stride) = staged
        .x
        .as_ref()
        .map_or((0, 0), |x| (x.meta.strides()[0], x.meta.strides()[1]));
    let w_row_vectors = w.meta.strides()[0] / vector_size;
    let (x_arg, partial_arg, x_bias_arg, x_split_stride) = staged.args(out);

    let cfg = LinearConfig {
        swiglu_input,
        ..plan.config
    };
    unsafe {
        linear_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(
                plan.col_tiles as u32,
                plan.splits as u32,
                plan.row_blocks as u32,
            ),
            CubeDim::new_1d(cfg.threads() as u32),
            vector_size,
            x_arg,
            partial_arg,
            x_bias_arg,
            array_arg(w),
            bias_arg(),
            target.out_arg(),
            target.partial_arg(),
            u32::try_from(x_row_stride).expect("linear: x stride exceeds 32 bits"),
            u32::try_from(x_col_stride).expect("linear: x stride exceeds 32 bits"),
            w_row_vectors as u32,
            m as u32,
            k as u32,
            n_vec as u32,
            plan.k_chunk as u32,
            x_split_stride,
            cfg,
            dtype.into(),
        );
    }
    target.into_product(plan.reduce, bias, vector_size)
}

/// Where a product kernel writes: the `[m, n]` output, or with a K split the f32 partial sums
/// `[splits, m, n]` (the parameter switched off at compile time is bound to the other buffer).
struct Target<R: CubeRuntime> {
    out: Option<CubeTensor<R>>,
    partial: Option<CubeTensor<R>>,
    splits: usize,
    m: usize,
    n: usize,
    dtype: DType,
}

impl<R: CubeRuntime> Target<R> {
    fn new(
        client: &ComputeClient<R>,
        device: &R::Device,
        splits: usize,
        m: usize,
        n: usize,
        dtype: DType,
    ) -> Self {
        let empty = |shape: Shape, dtype: DType| {
            empty_device_contiguous_dtype::<R>(client.clone(), device.clone(), shape, dtype)
        };
        let (out, partial) = if splits > 1 {
            (None, Some(empty(Shape::new([splits * m * n]), DType::F32)))
        } else {
            (Some(empty(Shape::new([m, n]), dtype)), None)
        };
        Self {
            out,
            partial,
            splits,
            m,
            n,
            dtype,
        }
    }

    /// The buffer the kernel writes.
    fn buffer(&self) -> &CubeTensor<R> {
        self.out
            .as_ref()
            .or(self.partial.as_ref())
            .expect("an output or partial sums")
    }

    fn out_arg(&self) -> ArrayArg<R> {
        match &self.out {
            Some(o) => array_arg(o.clone()),
            None => unused_arg(self.buffer()),
        }
    }

    fn partial_arg(&self) -> ArrayArg<R> {
        match &self.partial {
            Some(p) => array_arg(p.clone()),
            None => unused_arg(self.buffer()),
        }
    }

    fn into_product(
        self,
        reduce: Option<ReduceConfig>,
        bias: Option<CubeTensor<R>>,
        vector_size: usize,
    ) -> Product<R> {
        match (self.out, self.partial) {
            (Some(out), _) => Product::Done(out),
            (None, Some(partial)) => Product::Split(SplitSums {
                partial,
                bias,
                splits: self.splits,
                m: self.m,
                n: self.n,
                vector_size,
                reduce: reduce.expect("a K split plans its reduction"),
                dtype: self.dtype,
            }),
            (None, None) => unreachable!("Target::new allocates one of them"),
        }
    }
}

/// The bias as the kernels read it: `[n]`, in `x`'s dtype, unit stride.
fn prepare_bias<R: CubeRuntime>(x: &CubeTensor<R>, b: CubeTensor<R>, n: usize) -> CubeTensor<R> {
    assert_eq!(
        b.meta.shape().dims::<1>(),
        [n],
        "linear: bias must be [{n}]"
    );
    x.assert_is_on_same_device(&b);
    let b = if b.dtype == x.dtype {
        b
    } else {
        cast(b, x.dtype)
    };
    if b.meta.strides()[0] == 1 {
        b
    } else {
        into_contiguous(b)
    }
}

/// Sums the f32 partials `[splits, m, n]` of a K split into `out: [m, n]` (+ bias), or with
/// `reduce.swiglu` into SwiGLU of the two column halves, `out: [m, n / 2]`.
#[allow(clippy::too_many_arguments)]
fn launch_reduce<R: CubeRuntime>(
    client: &ComputeClient<R>,
    reduce: ReduceConfig,
    vector_size: usize,
    partial: CubeTensor<R>,
    bias: Option<&CubeTensor<R>>,
    out: &CubeTensor<R>,
    splits: usize,
    m: usize,
    n: usize,
) {
    let n_vec = n / vector_size;
    let half = n_vec / 2;
    let total = if reduce.swiglu { m * half } else { m * n_vec };
    let cubes = total.div_ceil(reduce.lanes);
    unsafe {
        split_reduce_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(cubes as u32, 1, 1),
            CubeDim::new_1d((reduce.lanes * reduce.split_lanes) as u32),
            vector_size,
            array_arg(partial),
            match bias {
                Some(b) => array_arg(b.clone()),
                None => unused_arg(out),
            },
            array_arg(out.clone()),
            splits as u32,
            (m * n_vec) as u32,
            total as u32,
            n_vec as u32,
            half as u32,
            reduce,
            out.dtype.into(),
        );
    }
}

/// The reduction pass for `splits` partial sums, in cubes of about `threads` units.
fn reduce_config(splits: usize, threads: usize, bias: bool) -> ReduceConfig {
    let split_lanes = splits.next_power_of_two().min(16).min(threads);
    ReduceConfig {
        lanes: (threads / split_lanes).max(1),
        split_lanes,
        loads: splits.div_ceil(split_lanes),
        bias,
        swiglu: false,
    }
}

/// What a tensor-core launch will do; returned by [`plan_cmma`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearCmmaPlan {
    /// Comptime configuration of [`fn@linear_cmma_kernel`].
    pub config: LinearCmmaConfig,
    /// Column tiles (grid x).
    pub col_tiles: usize,
    /// K splits (grid y); more than one adds the [`fn@split_reduce_kernel`] pass.
    pub splits: usize,
    /// Weight rows per split (a multiple of 16).
    pub k_chunk: usize,
    /// Configuration of the reduction pass when `splits > 1`.
    pub reduce: Option<ReduceConfig>,
}

impl LinearCmmaPlan {
    /// Cubes of the main kernel.
    pub fn cubes(&self) -> usize {
        self.col_tiles * self.splits
    }
}

/// Chooses the tensor-core launch for `p` (f16/bf16), or `None` when the shapes do not suit
/// it (`n` or `k` not a multiple of 16, more than [`MAX_M`] rows, too little shared memory).
///
/// - planes of one column fragment each, 4 per cube (64 columns; 2 for small products, below;
///   `tuning.threads` overrides, 32 units per plane);
/// - stages of `16 · unroll` K rows (`unroll` 4 by default: 64 rows, 8 KiB of bf16 weights),
///   halved until the cube fits `shared_limit`; `tuning.stages` of them in flight (default 1);
/// - K split across cubes as in [`plan`]: towards `cubes_per_sm` (default 4) cubes per
///   multiprocessor, with the f32 partials costing at most a quarter of the weight bytes and
///   each split at least one stage;
/// - small products (weights under `CMMA_SMALL_WEIGHT_BYTES`, e.g. SmolLM2's) are
///   latency-bound: 2 planes per cube, and the partials' cap gives way to splits of at least
///   `CMMA_SMALL_MIN_CHUNK` K rows.
pub fn plan_cmma(
    p: &LinearProblem,
    multiprocessors: usize,
    shared_limit: usize,
    tuning: &LinearTuning,
) -> Option<LinearCmmaPlan> {
    if !(1..=MAX_M).contains(&p.m)
        || p.k == 0
        || p.n == 0
        || !p.n.is_multiple_of(FRAG)
        || !p.k.is_multiple_of(FRAG)
    {
        return None;
    }
    let small = p.k * p.n * p.elem_size < CMMA_SMALL_WEIGHT_BYTES;
    let warps = tuning
        .threads
        .map(|t| (t / PLANE).clamp(1, 16))
        .unwrap_or(if small { CMMA_SMALL_WARPS } else { CMMA_WARPS });
    let mut config = LinearCmmaConfig {
        vector_size: 16 / p.elem_size,
        warps,
        col_frags: 1,
        row_frags: p.m.div_ceil(FRAG),
        block_k: (FRAG * tuning.unroll.unwrap_or(CMMA_UNROLL).max(1)).min(p.k),
        depth: tuning.stages.unwrap_or(CMMA_DEPTH).clamp(1, 8),
        bias: p.bias,
        partial: false,
        swiglu_input: None,
    };
    while config.shared_bytes(p.elem_size) + 384 > shared_limit && config.block_k > FRAG {
        config.block_k = (config.block_k / 2).next_multiple_of(FRAG);
    }
    if config.shared_bytes(p.elem_size) + 384 > shared_limit {
        return None;
    }
    let col_tiles = p.n.div_ceil(config.cols_per_cube());
    let target = multiprocessors.max(1) * tuning.cubes_per_sm.unwrap_or(CMMA_CUBES_PER_SM);
    let max_useful = p.k.div_ceil(config.block_k).max(1);
    let partial_cap = if small {
        p.k / CMMA_SMALL_MIN_CHUNK
    } else {
        p.k * p.elem_size / (32 * p.m)
    }
    .max(1);
    let splits = match tuning.splits {
        Some(s) => s.clamp(1, max_useful),
        None if col_tiles >= target => 1,
        None => target
            .div_ceil(col_tiles)
            .min(MAX_SPLITS)
            .min(partial_cap)
            .min(max_useful)
            .max(1),
    };
    let k_chunk = p.k.div_ceil(splits).next_multiple_of(FRAG);
    let splits = p.k.div_ceil(k_chunk);
    config.block_k = config.block_k.min(k_chunk);
    config.partial = splits > 1;
    config.bias = p.bias && splits == 1;
    Some(LinearCmmaPlan {
        config,
        col_tiles,
        splits,
        k_chunk,
        reduce: (splits > 1).then(|| reduce_config(splits, TARGET_THREADS, p.bias)),
    })
}

/// Whether a 2-D operand's rows suit the tensor-core kernel's 16-byte vectors and 32-byte
/// aligned fragments: unit column stride, and a row stride and element offset that are
/// multiples of 16 elements.
fn cmma_rows_aligned<R: CubeRuntime>(t: &CubeTensor<R>) -> bool {
    t.meta.strides()[1] == 1
        && t.meta.strides()[0].is_multiple_of(FRAG)
        && element_offset(t).is_multiple_of(FRAG)
}

/// Whether [`linear_cmma`] takes these inputs on this device: [`supported`] inputs in f16 or
/// bf16, `n`, `k`, the weights' row stride and element offset multiples of 16 (any `x`: one
/// whose rows do not suit is copied), a CUDA device
/// with 16×16×16 tensor cores for the dtype ([`crate::cube::launch::cmma_supported`]) and
/// tensor cores not switched off (`BURN_DECODE_CMMA=0`, see
/// [`crate::cube::launch::tensor_cores_enabled`]).
pub fn cmma_usable<R: CubeRuntime>(
    x: &CubeTensor<R>,
    w: &CubeTensor<R>,
    bias: Option<&CubeTensor<R>>,
) -> bool {
    supported(x, w, bias) && cmma_usable_input(x.dtype, x.meta.shape()[0], w, bias)
}

/// [`cmma_usable`] for an input of `m` rows in `dtype` that is not a tensor yet (see
/// [`supported_input`]).
pub(crate) fn cmma_usable_input<R: CubeRuntime>(
    dtype: DType,
    m: usize,
    w: &CubeTensor<R>,
    bias: Option<&CubeTensor<R>>,
) -> bool {
    if !supported_input(dtype, m, w, bias) || !matches!(dtype, DType::F16 | DType::BF16) {
        return false;
    }
    let [k, n] = w.meta.shape().dims::<2>();
    n.is_multiple_of(FRAG)
        && k.is_multiple_of(FRAG)
        && cmma_rows_aligned(w)
        && tensor_cores_enabled()
        && cmma_supported(&w.client, dtype)
}

/// `x · w (+ bias)` on the tensor cores, for inputs [`cmma_usable`] accepts (the contract of
/// [`linear`] otherwise).
///
/// # Panics
/// On inputs [`cmma_usable`] rejects.
pub fn linear_cmma<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    tuning: &LinearTuning,
) -> CubeTensor<R> {
    finish(product_cmma(x, w, bias, tuning), false).0
}

/// [`linear_cmma`] for a fused gate/up projection, as [`linear_swiglu`] is for [`linear`].
pub fn linear_cmma_swiglu<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    tuning: &LinearTuning,
) -> (CubeTensor<R>, bool) {
    finish(product_cmma(x, w, bias, tuning), true)
}

/// [`product_cmma`] with `tensor_cores`, else [`product`].
pub(crate) fn product_on<R: CubeRuntime>(
    tensor_cores: bool,
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    tuning: &LinearTuning,
) -> Product<R> {
    if tensor_cores {
        product_cmma(x, w, bias, tuning)
    } else {
        product(x, w, bias, tuning)
    }
}

/// Whether the tensor-core kernel should compute SwiGLU of a gate/up product while loading
/// its input for `w` (an input of `m` rows in `dtype`, see [`cmma_usable_input`]): only for
/// small products (weights under `CMMA_SMALL_WEIGHT_BYTES`). Every column tile of the grid
/// computes the whole `[m, k]` activation again, reading the gate/up product (or each of its
/// K split's partial sums) per element: cheap beside a launch for SmolLM2's down projection
/// (18 tiles of 1536 × 64), not for Llama-3-8B's (64 tiles of 14336 × 64 activations, each
/// from 4 splits): measured on an H100, the 8B tree step took 28.6 ms with it against 16.4
/// with SwiGLU's own launch, SmolLM2's 3.82 against 3.99.
pub(crate) fn cmma_folds_swiglu<R: CubeRuntime>(
    dtype: DType,
    m: usize,
    w: &CubeTensor<R>,
    bias: Option<&CubeTensor<R>>,
) -> bool {
    let [k, n] = w.meta.shape().dims::<2>();
    cmma_usable_input(dtype, m, w, bias) && k * n * dtype.size() < CMMA_SMALL_WEIGHT_BYTES
}

/// [`product_of_swiglu`] with `tensor_cores` (on [`product_cmma_of`]'s kernel), else
/// [`product_of_swiglu`].
pub(crate) fn product_of_swiglu_on<R: CubeRuntime>(
    tensor_cores: bool,
    gate_up: Product<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    tuning: &LinearTuning,
) -> Product<R> {
    if tensor_cores {
        product_cmma_of(Input::Swiglu(gate_up), w, bias, tuning)
    } else {
        product_of_swiglu(gate_up, w, bias, tuning)
    }
}

/// Launches the tensor-core product of [`linear_cmma`]; a K split is left unfinished.
pub(crate) fn product_cmma<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    tuning: &LinearTuning,
) -> Product<R> {
    assert!(
        cmma_usable(&x, &w, bias.as_ref()),
        "linear_cmma: inputs the tensor-core kernel does not take (see cmma_usable)"
    );
    product_cmma_of(Input::Plain(x), w, bias, tuning)
}

/// [`product_cmma`] of an [`Input`]: with SwiGLU of a gate/up product, computed as the kernel
/// loads its stages ([`fn@linear_cmma_kernel`]'s `swiglu_input`).
fn product_cmma_of<R: CubeRuntime>(
    input: Input<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    tuning: &LinearTuning,
) -> Product<R> {
    let mut staged = input.staged();
    let (m, k, swiglu_input) = (staged.m, staged.k, staged.swiglu);
    let dtype = w.dtype;
    staged.check(&w);
    assert!(
        cmma_usable_input(dtype, m, &w, bias.as_ref()) && w.meta.shape()[0] == k,
        "linear_cmma: inputs the tensor-core kernel does not take (see cmma_usable)"
    );
    let n = w.meta.shape()[1];
    assert!(
        (k as u64) * (w.meta.strides()[0] as u64) < u32::MAX as u64
            && ((MAX_SPLITS * MAX_M * n) as u64) < u32::MAX as u64,
        "linear: weight too large for 32-bit indexing"
    );
    let bias = bias.map(|b| prepare_bias(&w, b, n));
    // The kernel reads `x` (a finished gate/up product too) in 16-byte vectors from 32-byte
    // aligned rows.
    staged.x = staged.x.map(|x| {
        if cmma_rows_aligned(&x) {
            x
        } else {
            into_contiguous(x)
        }
    });
    let x_row = staged.x.as_ref().map_or(0, |x| x.meta.strides()[0]);
    let client = w.client.clone();
    let device = w.device.clone();
    // The width the reduction pass of a K split reads the partial sums in.
    let vector_size = vector_size_for(&w, bias.as_ref(), n, tuning);
    let plan = plan_cmma_for(&client, dtype, m, k, n, bias.is_some(), tuning)
        .expect("linear_cmma: no tensor-core plan fits this device");
    let target = Target::new(&client, &device, plan.splits, m, n, dtype);
    let cfg = LinearCmmaConfig {
        swiglu_input,
        ..plan.config
    };
    let (x_arg, partial_arg, x_bias_arg, x_split_stride) = staged.args(target.buffer());
    unsafe {
        linear_cmma_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(plan.col_tiles as u32, plan.splits as u32, 1),
            CubeDim::new_2d(PLANE as u32, cfg.warps as u32),
            cfg.vector_size,
            x_arg,
            partial_arg,
            x_bias_arg,
            array_arg(w.clone()),
            match &bias {
                Some(b) if cfg.bias => array_arg(b.clone()),
                _ => unused_arg(target.buffer()),
            },
            target.out_arg(),
            target.partial_arg(),
            u32::try_from(x_row).expect("linear: x stride exceeds 32 bits"),
            w.meta.strides()[0] as u32,
            m as u32,
            k as u32,
            n as u32,
            plan.k_chunk as u32,
            x_split_stride,
            cfg,
            dtype.into(),
        );
    }
    target.into_product(plan.reduce, bias, vector_size)
}

/// Shared memory a launch may use: the device's, or less where `tuning` says so.
fn shared_limit(hw: &cubecl::ir::HardwareProperties, tuning: &LinearTuning) -> usize {
    tuning
        .shared_memory
        .unwrap_or(usize::MAX)
        .min(hw.max_shared_memory_size)
}

/// The plan [`linear_cmma`] would use for these shapes on `client`'s device (for tests and
/// benchmarks), `None` where [`plan_cmma`] refuses them.
pub fn plan_cmma_for<R: CubeRuntime>(
    client: &ComputeClient<R>,
    dtype: DType,
    m: usize,
    k: usize,
    n: usize,
    bias: bool,
    tuning: &LinearTuning,
) -> Option<LinearCmmaPlan> {
    let hw = &client.properties().hardware;
    let shared_limit = shared_limit(hw, tuning);
    let problem = LinearProblem {
        m,
        k,
        n,
        elem_size: dtype.size(),
        vector_size: MAX_VECTOR_BYTES / dtype.size(),
        bias,
    };
    let multiprocessors = hw.num_streaming_multiprocessors.unwrap_or(16) as usize;
    plan_cmma(&problem, multiprocessors, shared_limit, tuning)
}

/// The plan [`linear`] would use for these shapes on `client`'s device (for tests and
/// benchmarks; `vector_size` as [`linear`] would choose it for contiguous operands).
pub fn plan_for<R: CubeRuntime>(
    client: &ComputeClient<R>,
    dtype: DType,
    m: usize,
    k: usize,
    n: usize,
    bias: bool,
    tuning: &LinearTuning,
) -> LinearPlan {
    let hw = &client.properties().hardware;
    let max = (MAX_VECTOR_BYTES / dtype.size())
        .min(hw.max_vector_size.max(1))
        .min(tuning.max_vector_size.unwrap_or(usize::MAX))
        .max(1);
    let mut vector_size = prev_power_of_two(max);
    while vector_size > 1 && !n.is_multiple_of(vector_size) {
        vector_size /= 2;
    }
    let multiprocessors = hw
        .num_streaming_multiprocessors
        .or(hw.num_cpu_cores)
        .unwrap_or(16) as usize;
    let shared_limit = shared_limit(hw, tuning);
    plan(
        &LinearProblem {
            m,
            k,
            n,
            elem_size: dtype.size(),
            vector_size,
            bias,
        },
        multiprocessors,
        hw.max_units_per_cube as usize,
        shared_limit,
        tuning,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(m: usize, k: usize, n: usize, elem: usize) -> LinearProblem {
        let mut v = 16 / elem;
        while !n.is_multiple_of(v) {
            v /= 2;
        }
        LinearProblem {
            m,
            k,
            n,
            elem_size: elem,
            vector_size: v,
            bias: true,
        }
    }

    /// Every plan respects the kernel's layout invariants.
    #[test]
    fn cmma_plans() {
        let h100 = 227 * 1024;
        // Shapes the tensor cores do not take.
        let refused = |m, k, n| {
            plan_cmma(&problem(m, k, n, 2), 132, h100, &LinearTuning::default()).is_none()
        };
        assert!(refused(64, 4096, 100));
        assert!(refused(64, 1000, 256));
        assert!(refused(65, 4096, 256));
        for (m, k, n) in [
            (64, 4096, 6144),
            (64, 4096, 4096),
            (64, 4096, 28672),
            (64, 14336, 4096),
            (64, 576, 960),
            (9, 1536, 576),
            (16, 64, 16),
        ] {
            let p = problem(m, k, n, 2);
            let plan = plan_cmma(&p, 132, h100, &LinearTuning::default()).unwrap();
            let c = plan.config;
            assert_eq!(c.rows_padded(), m.next_multiple_of(16));
            assert!(c.rows_padded() - m < 16);
            assert!(plan.col_tiles * c.cols_per_cube() >= n);
            assert!((plan.col_tiles - 1) * c.cols_per_cube() < n);
            assert!(plan.k_chunk.is_multiple_of(16) && c.block_k.is_multiple_of(16));
            assert!(c.block_k <= plan.k_chunk);
            assert!(plan.splits * plan.k_chunk >= k && (plan.splits - 1) * plan.k_chunk < k);
            assert_eq!(c.partial, plan.splits > 1);
            assert_eq!(plan.reduce.is_some(), plan.splits > 1);
            if k * n * 2 < CMMA_SMALL_WEIGHT_BYTES {
                // Small products: two planes, splits of at least CMMA_SMALL_MIN_CHUNK rows.
                assert_eq!(c.warps, CMMA_SMALL_WARPS);
                assert!(plan.splits == 1 || plan.k_chunk >= CMMA_SMALL_MIN_CHUNK);
            } else {
                // The f32 partials cost at most a quarter of the weight bytes.
                assert!(plan.splits == 1 || plan.splits * m * 4 * 2 * 4 <= k * 2);
            }
            assert!(c.shared_bytes(2) <= h100);
        }
        // A small shared-memory budget shortens the stages.
        let small = plan_cmma(
            &problem(64, 4096, 4096, 2),
            132,
            12 * 1024,
            &LinearTuning::default(),
        )
        .unwrap();
        assert!(small.config.shared_bytes(2) + 384 <= 12 * 1024);
        assert!(small.config.block_k < 64);
        // SmolLM2's tree-step products take the small-product plan (within ~1.3 µs of the
        // best swept plan per shape on an H200).
        let smol = |k, n| {
            let plan =
                plan_cmma(&problem(64, k, n, 2), 132, h100, &LinearTuning::default()).unwrap();
            (plan.col_tiles, plan.splits, plan.config.warps)
        };
        assert_eq!(smol(576, 960), (30, 4, 2));
        assert_eq!(smol(576, 3072), (96, 4, 2));
        assert_eq!(smol(1536, 576), (18, 12, 2));
        assert_eq!(smol(576, 576), (18, 4, 2));
        // Llama-3.2-1B's o (exactly 8 MiB), Llama-3-8B's unfused k/v and its o keep the plan
        // tuned on the 8B shapes (4 planes, partials capped).
        for (k, n, splits) in [(2048, 2048, 2), (4096, 1024, 4), (4096, 4096, 4)] {
            assert_eq!(smol(k, n), (n.div_ceil(64), splits, 4), "{k} x {n}");
        }
    }

    #[test]
    fn plans_are_consistent() {
        for (sms, max_threads, shared) in [
            (132, 1024, 227 * 1024),
            (2, 1024, 32 * 1024),
            (8, 256, 16 * 1024),
        ] {
            for m in [1, 2, 3, 5, 8, 9, 17, 33, 63, 64] {
                for k in [1, 7, 64, 576, 1536, 4096, 14336] {
                    for n in [1, 7, 100, 576, 1024, 4096, 4103, 14336] {
                        for elem in [2, 4] {
                            for splits in [None, Some(1), Some(3), Some(1000)] {
                                let p = problem(m, k, n, elem);
                                let tuning = LinearTuning {
                                    splits,
                                    ..Default::default()
                                };
                                let plan = plan(&p, sms, max_threads, shared, &tuning);
                                let c = plan.config;
                                let ctx = format!("{p:?} {tuning:?} {plan:?}");
                                assert!(c.threads() <= max_threads.min(512), "{ctx}");
                                assert!(c.threads() >= 1, "{ctx}");
                                assert!(c.rows_padded() * plan.row_blocks >= m, "{ctx}");
                                assert!((plan.row_blocks - 1) * c.rows_padded() < m, "{ctx}");
                                assert!(plan.row_blocks == 1 || plan.splits == 1, "{ctx}");
                                assert!(c.rows_per_thread <= MAX_ROWS_PER_THREAD, "{ctx}");
                                assert!(c.lanes.is_power_of_two() && c.lanes <= MAX_LANES, "{ctx}");
                                assert!(c.k_groups.is_power_of_two(), "{ctx}");
                                assert!(c.block_k >= c.k_step(), "{ctx}");
                                assert!(c.block_k.is_multiple_of(c.k_step()), "{ctx}");
                                assert!(plan.k_chunk.is_multiple_of(c.k_step()), "{ctx}");
                                assert!(plan.splits * plan.k_chunk >= k, "{ctx}");
                                assert!((plan.splits - 1) * plan.k_chunk < k, "{ctx}");
                                assert!(plan.splits <= MAX_SPLITS.max(k), "{ctx}");
                                assert!(plan.col_tiles * c.lanes * c.vector_size >= n, "{ctx}");
                                assert!(c.shared_bytes() <= shared.min(32 * 1024), "{ctx}");
                                assert_eq!(c.partial, plan.splits > 1, "{ctx}");
                                assert_eq!(c.bias, plan.splits == 1, "{ctx}");
                                match plan.reduce {
                                    Some(r) => {
                                        assert!(plan.splits > 1);
                                        assert!(r.loads * r.split_lanes >= plan.splits, "{ctx}");
                                        assert!(r.lanes * r.split_lanes <= max_threads, "{ctx}");
                                        assert!(
                                            4 * r.lanes * r.split_lanes * c.vector_size
                                                <= shared.min(32 * 1024)
                                        );
                                        assert!(r.bias);
                                    }
                                    None => assert_eq!(plan.splits, 1),
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The decode shapes of Llama-3-8B on a 132-SM H100 fill the device with 16-byte loads.
    #[test]
    fn h100_decode_plans() {
        let h100 = |m, k, n| {
            plan(
                &problem(m, k, n, 2),
                132,
                1024,
                227 * 1024,
                &LinearTuning::default(),
            )
        };
        // One row: 512-thread cubes of 16 lanes x 32 k groups (see `WIDE_THREADS`).
        // q/k/v: 48 column tiles of 128 columns, K split 6 ways (768 rows each).
        let p = h100(1, 4096, 6144);
        assert_eq!(p.config.vector_size, 8);
        assert_eq!(
            (p.config.lanes, p.config.k_groups, p.config.unroll),
            (16, 32, 8)
        );
        assert_eq!((p.col_tiles, p.splits, p.k_chunk), (48, 6, 768));
        // o: 32 tiles x 8 splits of 512 rows.
        let p = h100(1, 4096, 4096);
        assert_eq!((p.col_tiles, p.splits, p.k_chunk), (32, 8, 512));
        // gate/up (fused): 224 tiles x 2 splits.
        let p = h100(1, 4096, 28672);
        assert_eq!((p.col_tiles, p.splits), (224, 2));
        // down: 32 tiles x 8 splits of 1792 rows.
        let p = h100(1, 14336, 4096);
        assert_eq!((p.col_tiles, p.splits, p.k_chunk), (32, 8, 1792));
        for (m, k, n) in [
            (1, 4096, 1024),
            (1, 4096, 4096),
            (1, 4096, 14336),
            (1, 14336, 4096),
            (16, 4096, 4096),
            (64, 4096, 4096),
        ] {
            let p = h100(m, k, n);
            // Enough threads for every SM (two 256-thread cubes' worth, give or take a tile).
            assert!(
                p.cubes() * p.config.threads() >= 128 * 256 && p.cubes() <= 1200,
                "{m}x{k}x{n}: {p:?}"
            );
            let threads = if m == 1 { 512 } else { 256 };
            assert!(p.config.threads() == threads, "{p:?}");
        }
        // A Medusa tree of 64 rows: 8 row groups of 8 rows on 8 lanes, 4 k groups, and a K split
        // kept to 4 (the f32 partials of 64 rows would otherwise outweigh the weights).
        let p = h100(64, 4096, 4096);
        let c = p.config;
        assert_eq!(
            (c.lanes, c.row_groups, c.rows_per_thread, c.k_groups),
            (8, 8, 8, 4)
        );
        assert_eq!((p.col_tiles, p.splits, p.row_blocks), (64, 4, 1));
        // The same tree through SmolLM2's q/k/v in f32 (576 x 960): the partials cap the K split
        // at 1, so the rows go to 8 blocks of 8 instead of 30 cubes for the whole device.
        let p = plan(
            &problem(64, 576, 960, 4),
            132,
            1024,
            227 * 1024,
            &LinearTuning::default(),
        );
        assert_eq!((p.row_blocks, p.config.rows_padded(), p.splits), (8, 8, 1));
        assert!(p.cubes() >= 132, "{p:?}");
    }
}
