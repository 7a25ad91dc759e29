//! Host side: input checks, tile/launch planning, and the kernel launches.

use burn::tensor::{DType, Shape};
use burn_cubecl::{
    CubeRuntime, kernel::into_contiguous, ops::numeric::empty_device_contiguous_dtype,
    tensor::CubeTensor,
};
use cubecl::{calculate_cube_count_elemwise, prelude::*};

use super::cmma::{CmmaConfig, FRAG, attention_cmma_kernel};
use super::kernel::PLANE;
use super::kernel::{AttentionConfig, QkvStridesLaunch, attention_kernel, combine_kernel};
use super::mma::{MmaAttentionConfig, attention_mma_kernel};
use crate::FlashAttentionOptions;
use crate::args::{array_arg, unused_arg};

/// Shared memory a launch may use. 32 KiB is the portable floor (wgpu/Vulkan guarantee, Metal,
/// lavapipe); 48 KiB is the most a CUDA block gets without opting in to dynamic shared memory.
const MAX_SHARED_BYTES: usize = 48 * 1024;
/// At most this many rows (`q_len * group`) take the decode configuration: one row block of
/// `next_power_of_two(rows)` rows, key groups to keep every thread busy, and a KV split (see
/// [`Problem::decodes`] for the exception).
pub const DECODE_MAX_ROWS: usize = 64;
/// A KV split never gives a cube fewer keys than this: below it the combine costs more than the
/// extra parallelism brings.
const MIN_KEYS_PER_SPLIT: usize = 256;
/// The smallest query block a prefill launch shrinks to when its grid of 64-row blocks would
/// not cover the device's multiprocessors (see [`plan`]).
const MIN_SMALL_GRID_ROWS: usize = 16;
/// Upper bound on the number of KV splits (bounds the scratch buffer and the combine loop).
const MAX_SPLITS: usize = 64;

/// Knobs for tests and benchmarks; the defaults (all `None`) are what
/// [`crate::FlashAttentionBackend::flash_attention`] uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaunchTuning {
    /// Force this many KV splits (clamped to `1..=kv_len / block_k`). `Some(1)` disables the
    /// split-KV path.
    pub splits: Option<usize>,
    /// Pretend the device has at most this much shared memory per cube (bytes).
    pub shared_memory: Option<usize>,
    /// Force the decode (`Some(true)`) or the prefill (`Some(false)`) tile configuration.
    pub decode: Option<bool>,
    /// Query rows per cube of the portable kernel's prefill configuration (one of its
    /// candidates: 64, 32, 16, 8, 4, 2 or 1; another panics); `None` lets [`plan`] choose.
    /// Ignored by the decode configuration ([`Problem::decodes`], unless `decode` says
    /// otherwise).
    pub block_q: Option<usize>,
    /// Tensor cores for the f16/bf16 prefill kernel: `Some(false)` never, `Some(true)` whenever
    /// the device supports them (ignoring `BURN_DECODE_CMMA`), `None` as
    /// [`tensor_cores_enabled`] says. Problems of at most [`DECODE_MAX_ROWS`] rows (unless
    /// `decode` is `Some(false)`) and f32 never use them.
    pub tensor_cores: Option<bool>,
    /// Among tensor-core launches, the register-level `mma.sync` kernel where it applies
    /// ([`plan_mma`]: `head_dim` a multiple of 32 up to 128): `Some(false)` never
    /// (the `wmma` kernel runs), `Some(true)` wherever the device supports it, `None` as
    /// [`crate::register_mma`] says.
    pub register_mma: Option<bool>,
    /// Planes per cube of the register-level kernel (default 4).
    pub mma_warps: Option<usize>,
    /// 16-row tiles per plane of the register-level kernel (1 or 2).
    pub mma_m_tiles: Option<usize>,
    /// Keys per tile of the register-level kernel (a multiple of 16).
    pub mma_block_k: Option<usize>,
}

/// Whether the tensor-core prefill kernels (and the skinny linear's tensor-core kernel) may
/// be used on devices that support them: true unless the environment variable
/// `BURN_DECODE_CMMA` is `0` or [`set_tensor_cores_enabled`] said otherwise.
pub fn tensor_cores_enabled() -> bool {
    crate::TENSOR_CORES.get()
}

/// Switches [`tensor_cores_enabled`] on or off for the whole process.
pub fn set_tensor_cores_enabled(on: bool) {
    crate::TENSOR_CORES.set(on)
}

/// What a launch will do; returned by [`plan`] for inspection in tests and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchPlan {
    /// The comptime configuration of the main kernel.
    pub config: AttentionConfig,
    /// Row blocks (grid x).
    pub row_blocks: usize,
    /// KV splits (grid z); 1 means no combine kernel.
    pub splits: usize,
    /// Keys per split (a multiple of `block_k`).
    pub chunk_len: usize,
    /// Shared memory of the main kernel, in bytes.
    pub shared_bytes: usize,
}

/// The kernel a launch runs.
enum Launch {
    Mma(MmaPlan),
    Cmma(CmmaPlan),
    Simt(LaunchPlan),
}

/// Problem description needed for planning.
#[derive(Debug, Clone, Copy)]
pub struct Problem {
    /// `batch * n_kv_heads`.
    pub batch_kv_heads: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// New queries.
    pub q_len: usize,
    /// Valid keys.
    pub kv_len: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Bytes per element of q/k/v.
    pub elem_size: usize,
    /// Vector width used for loads (divides `head_dim`).
    pub vector_size: usize,
    /// Causal mask among new tokens.
    pub causal: bool,
    /// Explicit tree mask among new tokens.
    pub tree: bool,
}

impl Problem {
    /// Whether the portable kernel takes its decode configuration unless told otherwise: at
    /// most [`DECODE_MAX_ROWS`] query rows, except where the rows would fill several
    /// `MIN_SMALL_GRID_ROWS`-row prefill blocks while the keys are too few to split at all.
    /// The one decode cube per KV head would then walk every key alone where the prefill
    /// plan's small row blocks run side by side (the seed size, one head of 64 queries
    /// and keys: four 16-row blocks took 0.0385 ms on an H100, one 64-row decode block
    /// 0.0447). Where a split is possible the decode configuration stays, even if its grid is
    /// small: smaller row blocks would read every K/V tile several times (not measured).
    pub fn decodes(&self) -> bool {
        let rows = self.group * self.q_len;
        rows <= DECODE_MAX_ROWS && (rows <= MIN_SMALL_GRID_ROWS || max_splits(self.kv_len, 1) > 1)
    }
}

/// The most KV splits a cache of `kv_len` keys takes with `block_k`-key tiles: chunks of at
/// least [`MIN_KEYS_PER_SPLIT`] keys, at most [`MAX_SPLITS`] of them.
fn max_splits(kv_len: usize, block_k: usize) -> usize {
    kv_len
        .div_ceil(MIN_KEYS_PER_SPLIT.max(block_k))
        .min(MAX_SPLITS)
}

fn shared_bytes(p: &Problem, bq: usize, bk: usize, kg: usize, threads: usize, cpt: usize) -> usize {
    let d = p.head_dim;
    let staged = p.elem_size * (bq * d + bk * (d + p.vector_size) + bk * d);
    let scores = 4 * bq * (bk + 1);
    let reduce = if kg > 1 {
        4 * (threads * cpt * p.vector_size + threads)
    } else {
        0
    };
    staged + scores + reduce
}

/// Threads layout for a tile: `(lanes, key_groups, threads)`.
fn thread_layout(nv: usize, bq: usize, bk: usize) -> (usize, usize, usize) {
    let target = if bq >= 16 { 256 } else { 128 };
    let lanes = nv.next_power_of_two().min((target / bq).max(1));
    let mut key_groups = (target / (bq * lanes)).clamp(1, bk);
    // The score phase maps one key per thread: need at least `bk` threads.
    while bq * key_groups * lanes < bk {
        key_groups *= 2;
    }
    (lanes, key_groups, bq * key_groups * lanes)
}

/// Chooses tile sizes, thread layout and KV split for a problem on a device with
/// `shared_limit` bytes of shared memory per cube and `multiprocessors` compute units.
pub fn plan(
    p: &Problem,
    shared_limit: usize,
    max_threads: usize,
    multiprocessors: usize,
    tuning: &LaunchTuning,
) -> LaunchPlan {
    let rows = p.group * p.q_len;
    let nv = p.head_dim / p.vector_size;
    let decode = tuning.decode.unwrap_or_else(|| p.decodes());
    let budget = shared_limit.min(MAX_SHARED_BYTES);

    // Preferred first. Prefill: big query blocks amortise each K/V tile over more rows; 32-key
    // tiles keep the per-tile synchronisation cheap. Decode: one block holds every row.
    let candidates: Vec<(usize, usize)> = if decode {
        // All rows in one block if it fits, else the biggest block that does.
        let full = rows.next_power_of_two().min(DECODE_MAX_ROWS);
        let mut c = Vec::new();
        let mut bq = full;
        while bq >= 1 {
            c.extend([(bq, 32), (bq, 16)]);
            bq /= 2;
        }
        c.extend([(1, 8), (1, 4)]);
        c
    } else {
        vec![
            (64, 32),
            (32, 32),
            (64, 16),
            (32, 16),
            (16, 32),
            (16, 16),
            (8, 16),
            (8, 8),
            (4, 8),
            (2, 8),
            (1, 8),
            (1, 4),
        ]
    };
    if let Some(b) = tuning.block_q
        && !decode
    {
        assert!(
            candidates.iter().any(|c| c.0 == b),
            "flash_attention: no prefill configuration has {b}-row blocks"
        );
    }
    // Candidates that fit the device, in order of preference.
    let fitting: Vec<_> = candidates
        .iter()
        .filter(|&&(bq, _)| decode || tuning.block_q.is_none_or(|b| b == bq))
        .filter_map(|&(bq, bk)| {
            let (lanes, kg, threads) = thread_layout(nv, bq, bk);
            let cpt = nv.div_ceil(lanes);
            let bytes = shared_bytes(p, bq, bk, kg, threads, cpt);
            (bytes <= budget && threads <= max_threads)
                .then_some((bq, bk, lanes, kg, threads, bytes))
        })
        .collect();
    // A prefill grid of big row blocks may not cover the device even with its KV split (the
    // seed's single head of 256 queries is 4 cubes of 64 rows, too few keys to split): each
    // cube then walks every key tile in turn while most multiprocessors idle. Smaller row
    // blocks, down to `MIN_SMALL_GRID_ROWS`, cut the sequential work per cube and spread it over
    // more of them. Where a split covers the device, the blocks stay big (smaller ones would
    // read each K/V tile more often).
    let max_splits_for = |bk: usize| max_splits(p.kv_len, bk);
    let covers = |bq: usize, bk: usize| {
        rows.div_ceil(bq) * p.batch_kv_heads * max_splits_for(bk) >= multiprocessors
    };
    let chosen = if decode || tuning.block_q.is_some() {
        fitting.first().copied()
    } else {
        fitting
            .iter()
            .filter(|c| c.0 >= MIN_SMALL_GRID_ROWS)
            .find(|c| covers(c.0, c.1))
            .or_else(|| {
                fitting
                    .iter()
                    .filter(|c| c.0 >= MIN_SMALL_GRID_ROWS)
                    .min_by_key(|c| c.0)
            })
            .or(fitting.first())
            .copied()
    };
    let (bq, bk, lanes, key_groups, threads, bytes) = chosen.unwrap_or_else(|| {
        panic!(
            "flash_attention: head_dim {} does not fit in {budget} bytes of shared memory or \
             {max_threads} threads{}",
            p.head_dim,
            match tuning.block_q {
                Some(b) if !decode => format!(" with {b}-row blocks"),
                _ => String::new(),
            }
        )
    });
    let row_blocks = rows.div_ceil(bq);
    let base = row_blocks * p.batch_kv_heads;
    let split_cap = max_splits_for(bk);
    let splits = match tuning.splits {
        Some(s) => s.clamp(1, p.kv_len.div_ceil(bk).max(1)),
        None => {
            // About four cubes per multiprocessor: decode cubes are small (128 threads, ~18 KiB
            // of shared memory) and memory-bound, so several per SM are needed to keep enough
            // loads in flight. A long cache with a small grid (decode) is cut into that many
            // chunks, each merged by the combine kernel.
            let target = 4 * multiprocessors;
            if base >= target {
                1
            } else {
                target.div_ceil(base).min(split_cap).max(1)
            }
        }
    };
    let chunk_len = p.kv_len.div_ceil(splits).next_multiple_of(bk);
    let splits = p.kv_len.div_ceil(chunk_len);

    let config = AttentionConfig {
        nv,
        vector_size: p.vector_size,
        block_q: bq,
        block_k: bk,
        key_groups,
        lanes,
        threads,
        causal: p.causal,
        tree: p.tree,
        partial: splits > 1,
    };
    LaunchPlan {
        config,
        row_blocks,
        splits,
        chunk_len,
        shared_bytes: bytes,
    }
}

/// What a tensor-core launch will do; returned by [`plan_cmma`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmmaPlan {
    /// The comptime configuration of the tensor-core kernel.
    pub config: CmmaConfig,
    /// Row blocks (grid x).
    pub row_blocks: usize,
    /// KV splits (grid z); 1 means no combine kernel.
    pub splits: usize,
    /// Keys per split (a multiple of `block_k`).
    pub chunk_len: usize,
    /// Shared memory of the kernel, in bytes (upper bound).
    pub shared_bytes: usize,
}

/// Chooses the tensor-core configuration for a problem, or `None` where the SIMT kernel runs:
/// at most [`DECODE_MAX_ROWS`] rows (unless `tuning.decode` is `Some(false)`), `head_dim` not a
/// multiple of 16 or above 256, or no tile that fits `shared_limit`. Whether the device and dtype allow tensor cores at all is
/// [`cmma_supported`]'s business, checked before this.
pub fn plan_cmma(
    p: &Problem,
    shared_limit: usize,
    multiprocessors: usize,
    tuning: &LaunchTuning,
) -> Option<CmmaPlan> {
    let rows = p.group * p.q_len;
    // By rows alone, not `Problem::decodes`: the few-row problems that skip the SIMT decode
    // configuration (64 queries and keys) would be one 64-row block here, no better.
    let decode = tuning.decode.unwrap_or(rows <= DECODE_MAX_ROWS);
    if decode
        || p.head_dim == 0
        || !p.head_dim.is_multiple_of(FRAG)
        || p.head_dim > 256
        || !8usize.is_multiple_of(p.vector_size)
        || p.elem_size != 2
    {
        return None;
    }
    // 64 rows (4 planes) by 64 keys: ~112 KiB at d = 128, two cubes per H100 SM.
    let (warps, block_k, bytes) = [(4, 64), (4, 32), (2, 32)]
        .into_iter()
        .find_map(|(w, bk)| {
            let config = CmmaConfig {
                head_dim: p.head_dim,
                vector_size: p.vector_size,
                warps: w,
                block_k: bk,
                causal: false,
                tree: false,
                partial: false,
            };
            let bytes = config.shared_bytes(p.elem_size);
            (bytes <= shared_limit).then_some((w, bk, bytes))
        })?;
    let block_q = FRAG * warps;
    let row_blocks = rows.div_ceil(block_q);
    let base = row_blocks * p.batch_kv_heads;
    let split_cap = max_splits(p.kv_len, block_k);
    let splits = match tuning.splits {
        Some(s) => s.clamp(1, p.kv_len.div_ceil(block_k).max(1)),
        // Same rule as the SIMT plan: split only when the grid cannot fill the device.
        None => {
            let target = 4 * multiprocessors;
            if base >= target {
                1
            } else {
                target.div_ceil(base).min(split_cap).max(1)
            }
        }
    };
    let chunk_len = p.kv_len.div_ceil(splits).next_multiple_of(block_k);
    let splits = p.kv_len.div_ceil(chunk_len);
    Some(CmmaPlan {
        config: CmmaConfig {
            head_dim: p.head_dim,
            vector_size: p.vector_size,
            warps,
            block_k,
            causal: p.causal,
            tree: p.tree,
            partial: splits > 1,
        },
        row_blocks,
        splits,
        chunk_len,
        shared_bytes: bytes,
    })
}

/// Whether the device behind `client` can run the tensor-core kernel for `dtype`: f16/bf16,
/// a CUDA runtime (the only one it has been written and checked for), 32-wide planes with
/// plane shuffles and plane barriers, and 16×16×16 `cmma` with `dtype` inputs and f32
/// accumulators among the configurations the runtime reports.
pub fn cmma_supported<R: CubeRuntime>(client: &ComputeClient<R>, dtype: DType) -> bool {
    use cubecl::ir::features::Plane;
    if !matches!(dtype, DType::F16 | DType::BF16) || R::name(client) != "cuda" {
        return false;
    }
    let props = client.properties();
    let hw = &props.hardware;
    let mma = f32_accumulating(dtype, FRAG, FRAG, FRAG);
    hw.plane_size_min == PLANE as u32
        && hw.plane_size_max == PLANE as u32
        && props.features.plane.contains(Plane::Ops)
        && props.features.plane.contains(Plane::Sync)
        && props.features.matmul.cmma.contains(&mma)
}

/// The tensor-core plan [`attention`] will use for these inputs, if any: `tuning`, the
/// environment switch, device support ([`cmma_supported`]) and [`plan_cmma`] together.
pub fn select_cmma<R: CubeRuntime>(
    client: &ComputeClient<R>,
    dtype: DType,
    problem: &Problem,
    tuning: &LaunchTuning,
) -> Option<CmmaPlan> {
    let wanted = tuning.tensor_cores.unwrap_or_else(tensor_cores_enabled);
    if !wanted || !cmma_supported(client, dtype) {
        return None;
    }
    let (shared_limit, multiprocessors) = device_limits(client, tuning);
    plan_cmma(problem, shared_limit, multiprocessors, tuning)
}

/// Shared memory a cube may use (the device's, or less under `tuning`) and the number of
/// multiprocessors (CPU cores on CPU runtimes) the planners fill.
fn device_limits<R: CubeRuntime>(
    client: &ComputeClient<R>,
    tuning: &LaunchTuning,
) -> (usize, usize) {
    let props = client.properties();
    let shared_limit = tuning
        .shared_memory
        .unwrap_or(usize::MAX)
        .min(props.hardware.max_shared_memory_size);
    let multiprocessors = props
        .hardware
        .num_streaming_multiprocessors
        .or(props.hardware.num_cpu_cores)
        .unwrap_or(16) as usize;
    (shared_limit, multiprocessors)
}

/// What a register-level tensor-core launch will do; returned by [`plan_mma`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmaPlan {
    /// The comptime configuration of [`fn@attention_mma_kernel`].
    pub config: MmaAttentionConfig,
    /// Row blocks (grid x).
    pub row_blocks: usize,
    /// KV splits (grid z), those of the `wmma` plan; 1 means no combine kernel.
    pub splits: usize,
    /// Keys per split, those of the `wmma` plan (a multiple of its key tile, not necessarily
    /// of this kernel's `block_k`).
    pub chunk_len: usize,
    /// Shared memory of the kernel, in bytes (upper bound).
    pub shared_bytes: usize,
}

/// The register-level kernel's configuration for a problem the `wmma` kernel would run as
/// `cmma` (its plan), or `None` where that one stays: `head_dim` not a multiple of 32 or above
/// 128 (its operand loads and register budget), a vector width other than 2, 4 or 8
/// (`cp.async` sizes), tuning knobs it is not written for, or tiles that do not fit
/// `shared_limit`. The KV split is the `wmma` plan's (same splits and chunks, same partial rows
/// for the combine; the row blocks are this kernel's), so the two kernels split alike.
pub fn plan_mma(
    p: &Problem,
    cmma: &CmmaPlan,
    shared_limit: usize,
    tuning: &LaunchTuning,
) -> Option<MmaPlan> {
    // `cp.async` copies 4, 8 or 16 bytes: vectors of 2, 4 or 8 half-precision elements.
    if !p.head_dim.is_multiple_of(32) || p.head_dim > 128 || !matches!(p.vector_size, 2 | 4 | 8) {
        return None;
    }
    // 64 rows (4 planes) by 64 keys: 52 KiB of shared memory at d = 128.
    let config = MmaAttentionConfig {
        head_dim: p.head_dim,
        vector_size: p.vector_size,
        warps: tuning.mma_warps.unwrap_or(4),
        m_tiles: tuning.mma_m_tiles.unwrap_or(1),
        block_k: tuning.mma_block_k.unwrap_or(64),
        causal: p.causal,
        tree: p.tree,
        partial: cmma.splits > 1,
    };
    // Tuning knobs outside what the kernel is written for are refused, not run: keys come in
    // steps of 16 (one `P V` product), and a cube holds at most 32 planes.
    if config.block_k < 16
        || !config.block_k.is_multiple_of(16)
        || config.m_tiles == 0
        || !(1..=32).contains(&config.warps)
    {
        return None;
    }
    let shared_bytes = config.shared_bytes(p.elem_size);
    (shared_bytes <= shared_limit).then(|| MmaPlan {
        config,
        row_blocks: (p.group * p.q_len).div_ceil(config.block_q()),
        splits: cmma.splits,
        chunk_len: cmma.chunk_len,
        shared_bytes,
    })
}

/// Whether the device behind `client` runs `mma.sync` m16n8k16 with `dtype` inputs and f32
/// accumulators (as the runtime reports; CUDA sm_80 and later), on top of
/// [`cmma_supported`]'s conditions. The kernel's `cp.async` and `cp.async.mbarrier.arrive`
/// need sm_80 too, which this implies.
pub fn mma_supported<R: CubeRuntime>(client: &ComputeClient<R>, dtype: DType) -> bool {
    cmma_supported(client, dtype)
        && client
            .properties()
            .features
            .matmul
            .mma
            .contains(&f32_accumulating(dtype, 16, 8, 16))
}

/// The matrix-product shape `m × n × k` with `dtype` operands and f32 accumulators, as the
/// runtime lists what it supports.
fn f32_accumulating(dtype: DType, m: usize, n: usize, k: usize) -> cubecl::ir::features::MmaConfig {
    let elem: cubecl::ir::StorageType = dtype.into();
    cubecl::ir::features::MmaConfig {
        a_type: elem,
        b_type: elem,
        cd_type: DType::F32.into(),
        m: m as u32,
        n: n as u32,
        k: k as u32,
    }
}

/// The register-level plan [`attention`] will use for these inputs, if any (`problem` with the
/// vector width of its loads, up to 8): the tensor-core plan ([`select_cmma`]), `tuning.register_mma` or [`crate::register_mma`], device support
/// ([`mma_supported`]) and [`plan_mma`] together.
pub fn select_mma<R: CubeRuntime>(
    client: &ComputeClient<R>,
    dtype: DType,
    problem: &Problem,
    cmma: &CmmaPlan,
    tuning: &LaunchTuning,
) -> Option<MmaPlan> {
    let wanted = tuning.register_mma.unwrap_or_else(crate::register_mma);
    if !wanted || !mma_supported(client, dtype) {
        return None;
    }
    let (shared_limit, _) = device_limits(client, tuning);
    plan_mma(problem, cmma, shared_limit, tuning)
}

/// Largest vector width in {8, 4, 2, 1}, at most `widest`, that divides `head_dim`, every
/// stride of the tensors and the element offset of their buffers (slices of a bigger buffer).
fn vector_size_for<R: CubeRuntime>(
    tensors: &[&CubeTensor<R>],
    head_dim: usize,
    widest: usize,
) -> usize {
    let max = tensors[0].client.properties().hardware.max_vector_size;
    [8usize, 4, 2, 1]
        .into_iter()
        .filter(|&n| n <= widest)
        .find(|&n| {
            n <= max.max(1)
                && head_dim.is_multiple_of(n)
                && tensors.iter().all(|t| {
                    let offset = t.handle.offset_start.unwrap_or(0) as usize / t.dtype.size();
                    offset.is_multiple_of(n)
                        && t.meta.strides()[..3].iter().all(|s| s.is_multiple_of(n))
                })
        })
        .unwrap_or(1)
}

/// Inner dimension must be unit-stride; anything else is copied once.
fn unit_stride_last<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    if t.meta.strides()[3] == 1 {
        t
    } else {
        into_contiguous(t)
    }
}

fn check_float_dtype(dtype: DType) {
    assert!(
        matches!(dtype, DType::F32 | DType::F16 | DType::BF16),
        "flash_attention: unsupported dtype {dtype:?} (the CubeCL kernel takes f32, f16 or bf16)"
    );
}

/// Runs the attention kernels on CubeCL tensors. `tree_mask` is a `[q_len, q_len]` `u32` tensor
/// (non-zero = visible); see [`crate::flash_attention`] for everything else.
///
/// q, k and v may be strided views (e.g. a `[.., 0..kv_len, ..]` slice of a preallocated cache)
/// as long as `head_dim` is the innermost, unit-stride axis; otherwise they are copied first.
pub fn attention<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    tree_mask: Option<CubeTensor<R>>,
    options: FlashAttentionOptions,
    tuning: &LaunchTuning,
) -> CubeTensor<R> {
    let dtype = q.dtype;
    check_float_dtype(dtype);
    assert!(
        k.dtype == dtype && v.dtype == dtype,
        "flash_attention: q, k, v dtypes differ ({dtype:?}, {:?}, {:?})",
        k.dtype,
        v.dtype
    );
    q.assert_is_on_same_device(&k);
    q.assert_is_on_same_device(&v);

    let q = unit_stride_last(q);
    let k = unit_stride_last(k);
    let v = unit_stride_last(v);

    let [batch, n_heads, q_len, head_dim] = q.meta.shape().dims::<4>();
    let [_, n_kv_heads, kv_cap, _] = k.meta.shape().dims::<4>();
    assert_eq!(v.meta.shape().dims::<4>(), k.meta.shape().dims::<4>());
    assert!(n_kv_heads > 0 && n_heads % n_kv_heads == 0);
    let kv_len = options.kv_len;
    assert!(
        q_len <= kv_len && kv_len <= kv_cap,
        "flash_attention: bad kv_len"
    );
    assert!(
        (kv_len as u64) * (head_dim as u64) < u32::MAX as u64,
        "flash_attention: sequence too long for 32-bit indexing"
    );

    let client = q.client.clone();
    let device = q.device.clone();
    // The kernels write `[batch, q_len, n_heads, head_dim]` (`o_proj`'s input order), returned
    // as the `[batch, n_heads, q_len, head_dim]` view: swapping the axes back and merging the
    // heads is then free where a head-major buffer would take a copy per layer. One query row
    // is the same bytes either way and keeps contiguous strides (a reshape's contiguity check
    // would not see through the swapped stride of a size-1 axis).
    let alloc = |shape: [usize; 4]| {
        empty_device_contiguous_dtype::<R>(client.clone(), device.clone(), Shape::new(shape), dtype)
    };
    let out = if q_len == 1 {
        alloc([batch, n_heads, 1, head_dim])
    } else {
        let mut out = alloc([batch, q_len, n_heads, head_dim]);
        out.meta.swap(1, 2);
        out
    };
    if batch == 0 || n_heads == 0 || q_len == 0 || head_dim == 0 {
        return out;
    }

    let mut vector_size = vector_size_for(&[&q, &k, &v], head_dim, 4);
    let props = client.properties();
    let problem = Problem {
        batch_kv_heads: batch * n_kv_heads,
        group: n_heads / n_kv_heads,
        q_len,
        kv_len,
        head_dim,
        elem_size: dtype.size(),
        vector_size,
        causal: options.causal && tree_mask.is_none(),
        tree: tree_mask.is_some(),
    };
    let (shared_limit, multiprocessors) = device_limits(&client, tuning);
    let max_threads = props.hardware.max_units_per_cube as usize;
    // Tensor cores where possible (f16/bf16 prefill on CUDA), else the portable SIMT kernel.
    let launch = match select_cmma(&client, dtype, &problem, tuning) {
        Some(cmma) => {
            // 16-byte `cp.async` copies where the layout allows.
            let wide = Problem {
                vector_size: vector_size_for(&[&q, &k, &v], head_dim, 8),
                ..problem
            };
            match select_mma(&client, dtype, &wide, &cmma, tuning) {
                Some(mma) => {
                    vector_size = mma.config.vector_size;
                    Launch::Mma(mma)
                }
                None => Launch::Cmma(cmma),
            }
        }
        None => Launch::Simt(plan(
            &problem,
            shared_limit,
            max_threads,
            multiprocessors,
            tuning,
        )),
    };
    let (row_blocks, splits, chunk_len) = match &launch {
        Launch::Mma(p) => (p.row_blocks, p.splits, p.chunk_len),
        Launch::Cmma(p) => (p.row_blocks, p.splits, p.chunk_len),
        Launch::Simt(p) => (p.row_blocks, p.splits, p.chunk_len),
    };

    let mask = tree_mask.map(into_contiguous);
    if let Some(mask) = &mask {
        assert!(
            matches!(
                mask.dtype,
                DType::U32 | DType::Bool(burn::tensor::BoolStore::U32)
            ),
            "flash_attention: the tree mask must be converted to u32 first (got {:?})",
            mask.dtype
        );
    }

    // Without a KV split (or a tree mask) those parameters are switched off at compile time
    // and bound to `out`.
    let rows = problem.group * q_len;
    let (part_o, part_ml) = if splits > 1 {
        let n_rows = splits * problem.batch_kv_heads * rows;
        let f32_buffer = |len: usize| {
            empty_device_contiguous_dtype::<R>(
                client.clone(),
                device.clone(),
                Shape::new([len]),
                DType::F32,
            )
        };
        (
            Some(f32_buffer(n_rows * head_dim)),
            Some(f32_buffer(n_rows * 2)),
        )
    } else {
        (None, None)
    };
    let arg_or_unused = |t: &Option<CubeTensor<R>>| match t {
        Some(t) => array_arg(t.clone()),
        None => unused_arg(&out),
    };
    let stride = |t: &CubeTensor<R>, axis: usize| {
        u32::try_from(t.meta.strides()[axis]).expect("flash_attention: stride exceeds 32 bits")
    };
    let strides = || {
        QkvStridesLaunch::new(
            stride(&q, 0),
            stride(&q, 1),
            stride(&q, 2),
            stride(&k, 0),
            stride(&k, 1),
            stride(&k, 2),
            stride(&v, 0),
            stride(&v, 1),
            stride(&v, 2),
        )
    };

    let cube_count = CubeCount::Static(
        row_blocks as u32,
        problem.batch_kv_heads as u32,
        splits as u32,
    );
    // The three kernels take the same arguments; only the kernel, its cube shape and its
    // comptime configuration differ.
    macro_rules! launch_attention {
        ($kernel:ident, $cube_dim:expr, $config:expr) => {
            unsafe {
                $kernel::launch_unchecked::<R>(
                    &client,
                    cube_count,
                    $cube_dim,
                    vector_size,
                    array_arg(q.clone()),
                    array_arg(k.clone()),
                    array_arg(v.clone()),
                    arg_or_unused(&mask),
                    array_arg(out.clone()),
                    arg_or_unused(&part_o),
                    arg_or_unused(&part_ml),
                    strides(),
                    options.scale,
                    kv_len as u32,
                    q_len as u32,
                    problem.group as u32,
                    n_kv_heads as u32,
                    chunk_len as u32,
                    $config,
                    dtype.into(),
                )
            }
        };
    }
    match launch {
        Launch::Mma(plan) => launch_attention!(
            attention_mma_kernel,
            CubeDim::new_2d(PLANE as u32, plan.config.warps as u32),
            plan.config
        ),
        Launch::Cmma(plan) => launch_attention!(
            attention_cmma_kernel,
            CubeDim::new_2d(PLANE as u32, plan.config.warps as u32),
            plan.config
        ),
        Launch::Simt(plan) => launch_attention!(
            attention_kernel,
            CubeDim::new_1d(plan.config.threads as u32),
            plan.config
        ),
    }

    if splits > 1 {
        // `part_o` is `[row][head_dim]` f32 whichever way the main kernel wrote it (the `mma`
        // kernel as scalars), so any width dividing `head_dim` reads it: the main kernel's
        // (up to 8 after the `mma` plan; `out`'s rows are contiguous).
        let nv = head_dim / vector_size;
        let work = problem.batch_kv_heads * rows * nv;
        let cube_dim = CubeDim::new(&client, work);
        let cube_count = calculate_cube_count_elemwise(&client, work, cube_dim);
        unsafe {
            combine_kernel::launch_unchecked::<R>(
                &client,
                cube_count,
                cube_dim,
                vector_size,
                arg_or_unused(&part_o),
                arg_or_unused(&part_ml),
                array_arg(out.clone()),
                splits as u32,
                problem.batch_kv_heads as u32,
                q_len as u32,
                problem.group as u32,
                n_kv_heads as u32,
                nv,
                dtype.into(),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(rows: usize, group: usize, kv_len: usize, d: usize, elem: usize) -> Problem {
        let vector_size = [4, 2, 1]
            .into_iter()
            .find(|&n| d.is_multiple_of(n))
            .unwrap();
        Problem {
            batch_kv_heads: 8,
            group,
            q_len: rows / group,
            kv_len,
            head_dim: d,
            elem_size: elem,
            vector_size,
            causal: true,
            tree: false,
        }
    }

    /// Every plan the planner can produce respects the kernel's layout invariants.
    #[test]
    fn plans_are_consistent() {
        for budget in [8 * 1024, 16 * 1024, 32 * 1024, 48 * 1024, 228 * 1024] {
            for d in [6, 32, 33, 40, 64, 80, 96, 128, 256] {
                for elem in [2, 4] {
                    for (rows, group) in [
                        (1, 1),
                        (4, 4),
                        (17, 1),
                        (64, 4),
                        (68, 4),
                        (256, 8),
                        (1000, 1),
                    ] {
                        for (decode, block_q) in [
                            (None, None),
                            (Some(true), None),
                            (Some(false), None),
                            (None, Some(16)),
                            (Some(false), Some(8)),
                        ] {
                            let p = problem(rows, group, 5000, d, elem);
                            let tuning = LaunchTuning {
                                decode,
                                block_q,
                                ..Default::default()
                            };
                            if budget < 16 * 1024 && d >= 256 {
                                continue;
                            }
                            // A forced block must fit: 16 f32 rows of d = 256 take more than 48 KiB.
                            if block_q.is_some() && (budget < 32 * 1024 || d >= 256) {
                                continue;
                            }
                            let plan = plan(&p, budget, 1024, 132, &tuning);
                            let c = plan.config;
                            assert!(
                                plan.shared_bytes <= budget.min(MAX_SHARED_BYTES),
                                "{plan:?}"
                            );
                            assert_eq!(c.threads, c.block_q * c.key_groups * c.lanes);
                            assert!(c.threads <= 256 && c.threads >= c.block_k, "{plan:?}");
                            assert_eq!(c.threads % c.block_k, 0);
                            assert_eq!(c.block_k % c.key_groups, 0);
                            assert_eq!(c.nv * c.vector_size, d);
                            assert!(plan.chunk_len.is_multiple_of(c.block_k));
                            assert!(plan.splits * plan.chunk_len >= p.kv_len);
                            assert!((plan.splits - 1) * plan.chunk_len < p.kv_len);
                            assert_eq!(c.partial, plan.splits > 1);
                            assert_eq!(plan.row_blocks, rows.div_ceil(c.block_q));
                            if let Some(b) = block_q
                                && !decode.unwrap_or_else(|| p.decodes())
                            {
                                assert_eq!(c.block_q, b, "{plan:?}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// A prefill grid too small for the device takes smaller row blocks (down to 16 rows);
    /// one that covers it keeps the preferred 64-row blocks; a forced block size is obeyed.
    #[test]
    fn small_grids_take_smaller_row_blocks() {
        // The seed sizes: one head, f32, d = 64, no mask.
        let seed = |n: usize| Problem {
            batch_kv_heads: 1,
            group: 1,
            q_len: n,
            kv_len: n,
            head_dim: 64,
            elem_size: 4,
            vector_size: 4,
            causal: false,
            tree: false,
        };
        let tuning = LaunchTuning::default();
        let plan_on = |p: &Problem, sms: usize, tuning: &LaunchTuning| {
            let plan = plan(p, 48 * 1024, 1024, sms, tuning);
            (plan.config.block_q, plan.row_blocks)
        };
        assert_eq!(plan_on(&seed(256), 132, &tuning), (16, 16));
        // 64 rows and keys: too few keys to split, so not one decode block of every row but
        // the prefill plan's 16-row blocks.
        assert!(!seed(64).decodes());
        assert_eq!(plan_on(&seed(64), 132, &tuning), (16, 4));
        // Few rows, or keys enough for a split (even one that leaves SMs idle): the decode
        // configuration (one block of every row).
        assert!(seed(16).decodes());
        assert_eq!(plan_on(&seed(16), 132, &tuning), (16, 1));
        for (kv_heads, kv_len) in [(32, 2048), (1, 300)] {
            let long = Problem {
                batch_kv_heads: kv_heads,
                kv_len,
                ..seed(64)
            };
            assert!(long.decodes(), "{long:?}");
            assert_eq!(plan_on(&long, 132, &tuning), (64, 1));
        }
        // Few multiprocessors (lavapipe on a small CPU): 64-row blocks already cover them.
        assert_eq!(plan_on(&seed(256), 4, &tuning), (64, 4));
        // Between: the largest block whose grid covers the device.
        assert_eq!(plan_on(&seed(256), 8, &tuning), (32, 8));
        // A large prefill keeps 64-row blocks.
        let big = Problem {
            batch_kv_heads: 32,
            q_len: 2048,
            kv_len: 2048,
            ..seed(0)
        };
        assert_eq!(plan_on(&big, 132, &tuning).0, 64);
        // A small grid whose KV split covers the device keeps 64-row blocks: 4 blocks of a
        // 64-node tree's 256 rows × 8 KV heads × 8 splits of a 2048-key cache.
        let tree = Problem {
            batch_kv_heads: 8,
            group: 4,
            q_len: 64,
            kv_len: 2048,
            tree: true,
            ..seed(0)
        };
        assert_eq!(plan_on(&tree, 132, &tuning), (64, 4));
        let forced = LaunchTuning {
            block_q: Some(64),
            ..Default::default()
        };
        assert_eq!(plan_on(&seed(256), 132, &forced), (64, 4));
    }

    /// Tensor-core plans: only half-precision prefill with `head_dim % 16 == 0`, tiles within
    /// the shared-memory limit, and the same split invariants as the SIMT plan.
    #[test]
    fn cmma_plans() {
        let h100 = 227 * 1024;
        for d in [16, 40, 64, 80, 96, 128, 256, 512] {
            for (rows, group) in [(1, 1), (64, 4), (65, 1), (256, 8), (1000, 1), (8192, 1)] {
                for elem in [2, 4] {
                    let p = problem(rows, group, 5000, d, elem);
                    let plan = plan_cmma(&p, h100, 132, &LaunchTuning::default());
                    let eligible = elem == 2 && rows > DECODE_MAX_ROWS && d % 16 == 0 && d <= 256;
                    assert_eq!(plan.is_some(), eligible, "d {d} rows {rows} elem {elem}");
                    let Some(plan) = plan else { continue };
                    let c = plan.config;
                    assert!(plan.shared_bytes <= h100);
                    assert_eq!(c.shared_bytes(2), plan.shared_bytes);
                    assert_eq!(c.block_q(), 16 * c.warps);
                    assert!(c.block_k.is_multiple_of(16) && c.head_dim.is_multiple_of(16));
                    assert!(c.qkv_stride().is_multiple_of(8) && c.o_stride().is_multiple_of(8));
                    assert!(c.s_stride().is_multiple_of(4) && c.p_stride().is_multiple_of(8));
                    assert!(plan.chunk_len.is_multiple_of(c.block_k));
                    assert!(plan.splits * plan.chunk_len >= p.kv_len);
                    assert!((plan.splits - 1) * plan.chunk_len < p.kv_len);
                    assert_eq!(c.partial, plan.splits > 1);
                    assert_eq!(plan.row_blocks, rows.div_ceil(c.block_q()));
                }
            }
        }
        // The shape: 64×64 tiles of ~112 KiB at d = 128, no split.
        let prefill = Problem {
            batch_kv_heads: 32,
            group: 1,
            q_len: 8192,
            kv_len: 8192,
            head_dim: 128,
            elem_size: 2,
            vector_size: 4,
            causal: true,
            tree: false,
        };
        let plan = plan_cmma(&prefill, h100, 132, &LaunchTuning::default()).unwrap();
        assert_eq!(
            (plan.config.warps, plan.config.block_k, plan.splits),
            (4, 64, 1)
        );
        assert!(plan.shared_bytes < 114 * 1024, "{plan:?}");
        // A device with 48 KiB gets smaller tiles or none.
        assert!(plan_cmma(&prefill, 48 * 1024, 132, &LaunchTuning::default()).is_none());
        let small = Problem {
            head_dim: 64,
            ..prefill
        };
        let plan = plan_cmma(&small, 48 * 1024, 132, &LaunchTuning::default()).unwrap();
        assert!(plan.shared_bytes <= 48 * 1024, "{plan:?}");
    }

    /// Decode against a long cache on a 132-SM GPU is split to fill it; prefill is not.
    #[test]
    fn mma_plans() {
        let h100 = 227 * 1024;
        let tuning = LaunchTuning::default();
        // Large enough that the tensor-core plan needs no KV split.
        let mut p = problem(8192, 1, 8192, 128, 2);
        p.batch_kv_heads = 32;
        let cmma = plan_cmma(&p, h100, 132, &tuning).unwrap();
        assert_eq!(cmma.splits, 1);
        for vs in [1, 2, 4, 8] {
            let wide = Problem {
                vector_size: vs,
                ..p
            };
            let plan = plan_mma(&wide, &cmma, h100, &tuning);
            assert_eq!(plan.is_some(), vs >= 2, "vector size {vs}");
        }
        let wide = Problem {
            vector_size: 8,
            ..p
        };
        let plan = plan_mma(&wide, &cmma, h100, &tuning).unwrap();
        assert_eq!(plan.config.block_q(), 64);
        assert_eq!(plan.row_blocks, 128);
        assert!(plan.shared_bytes <= 53 * 1024, "{plan:?}");
        // head_dim: multiples of 32 up to 128.
        for d in [16, 32, 48, 64, 80, 96, 128, 160, 256] {
            let pd = Problem {
                head_dim: d,
                ..wide
            };
            let eligible = d % 32 == 0 && d <= 128;
            assert_eq!(
                plan_mma(&pd, &cmma, h100, &tuning).is_some(),
                eligible,
                "d {d}"
            );
        }
        assert_eq!((plan.splits, plan.chunk_len), (1, cmma.chunk_len));
        assert!(!plan.config.partial);
        // A KV split is the wmma plan's, written as partial rows.
        let mut small = wide;
        small.batch_kv_heads = 3;
        small.q_len = 512;
        small.kv_len = 512;
        let split = plan_cmma(&small, h100, 132, &tuning).unwrap();
        assert!(split.splits > 1, "{split:?}");
        let plan = plan_mma(&small, &split, h100, &tuning).unwrap();
        assert_eq!(
            (plan.splits, plan.chunk_len),
            (split.splits, split.chunk_len)
        );
        assert!(plan.config.partial);
        assert_eq!(plan.shared_bytes, plan.config.shared_bytes(2));
        let forced = LaunchTuning {
            splits: Some(3),
            ..Default::default()
        };
        let split = plan_cmma(&wide, h100, 132, &forced).unwrap();
        let plan = plan_mma(&wide, &split, h100, &forced).unwrap();
        assert_eq!((plan.splits, plan.chunk_len), (3, 2752));
        assert!(plan.config.partial);
        // Knobs the kernel is not written for are refused, not run.
        for (warps, m_tiles, block_k) in
            [(4, 1, 8), (4, 1, 24), (4, 0, 64), (0, 1, 64), (33, 1, 64)]
        {
            let knobs = LaunchTuning {
                mma_warps: Some(warps),
                mma_m_tiles: Some(m_tiles),
                mma_block_k: Some(block_k),
                ..Default::default()
            };
            assert!(
                plan_mma(&wide, &cmma, h100, &knobs).is_none(),
                "{warps} {m_tiles} {block_k}"
            );
        }
        // Too little shared memory.
        assert!(plan_mma(&wide, &cmma, 32 * 1024, &tuning).is_none());
    }

    #[test]
    fn split_heuristic() {
        // Llama-style GQA decode: 32 query heads on 8 KV heads, 32k cache, bf16, d = 128.
        let decode = Problem {
            batch_kv_heads: 8,
            group: 4,
            q_len: 1,
            kv_len: 32768,
            head_dim: 128,
            elem_size: 2,
            vector_size: 4,
            causal: true,
            tree: false,
        };
        let plan_d = plan(&decode, 228 * 1024, 1024, 132, &LaunchTuning::default());
        assert_eq!(plan_d.config.block_q, 4);
        assert!(plan_d.splits >= 16, "{plan_d:?}");
        // Short caches are not split below MIN_KEYS_PER_SPLIT keys per chunk.
        let short = Problem {
            kv_len: 300,
            ..decode
        };
        assert!(plan(&short, 228 * 1024, 1024, 132, &LaunchTuning::default()).splits <= 2);
        // Prefill of 8k tokens: 32 heads * 128 row blocks already fill the device.
        let prefill = Problem {
            group: 1,
            q_len: 8192,
            kv_len: 8192,
            batch_kv_heads: 32,
            ..decode
        };
        let plan_p = plan(&prefill, 228 * 1024, 1024, 132, &LaunchTuning::default());
        assert_eq!(plan_p.splits, 1);
        assert_eq!(plan_p.config.block_q, 64);
    }
}
