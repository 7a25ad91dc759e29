//! Attention kernels in CubeCL: one source for CUDA, wgpu (Vulkan/Metal/DX12), ROCm and the
//! CubeCL CPU runtime.
//!
//! # Design
//!
//! **One tiled online-softmax kernel** ([`fn@kernel::attention_kernel`], FlashAttention-2 style).
//! A cube owns a block of `BQ` *rows* of one KV head and walks the keys in tiles of `BK`:
//! K and V tiles are staged in shared memory, scores go through a `BQ × BK` shared buffer, and
//! every row keeps a running max `m`, running sum `l` and an output accumulator in registers,
//! rescaled by `exp(m_old - m_new)` whenever the max grows. Nothing of size `q_len × kv_len` ever
//! reaches global memory, and K/V are read once per row block.
//!
//! **Rows, not queries.** The rows of a KV head are the `(query, query head)` pairs of all the
//! query heads that share it (`rho = i * group + g`), so grouped-query attention reads each K/V
//! tile once for the whole group instead of once per query head, without materialising repeated
//! K/V. With `group = 1` rows are simply queries.
//!
//! **Masking** is computed, never loaded as a `q_len × kv_len` tensor: a key `j` is visible to
//! query `i` iff `j < kv_len` and either `j < kv_len - q_len` (the cached prefix) or, with
//! `t = j - (kv_len - q_len)`, `tree[i][t]` (tree mask) / `t <= i` (causal) / always. Causal
//! row blocks stop at their last query's position, so fully masked tiles are skipped; rows past
//! `kv_len` of a preallocated cache are never read (the last tile is zero-filled instead), which
//! is why garbage or NaN in the unused capacity is harmless.
//!
//! **Split-KV decode (flash-decoding).** With few rows (a decode step: `q_len * group` up to
//! [`launch::DECODE_MAX_ROWS`], e.g. 1 token × 4 heads, or a 16-node Medusa tree × 4 heads) one
//! row block covers every row of a KV head, so the grid would be only `batch * n_kv_heads` cubes,
//! far too few for a GPU with 100+ multiprocessors when the cache is 8k–32k long. The KV axis is
//! then cut into `splits` chunks (grid z), chosen so that about four cubes run per multiprocessor
//! but no chunk is shorter than 256 keys; each cube writes its unnormalised accumulator and
//! `(m, l)` in f32, and [`fn@kernel::combine_kernel`] merges them with the usual log-sum-exp
//! rescaling. The same split is used by the prefill configuration when its grid is too small.
//! Rows too many for one small block whose keys are too few to split at all (the seed's 64
//! queries of one head) take the prefill configuration's small row blocks instead
//! ([`launch::Problem::decodes`]).
//! In the decode configuration, threads beyond `rows × head_dim/4` are put to work as *key
//! groups* that each accumulate a subset of the tile's keys, merged once at the end.
//!
//! **Tile sizes.** Staged tiles are kept in the input dtype and everything computed in f32:
//! `elem × (BQ·D + BK·(D+4) + BK·D) + 4·BQ·(BK+1)` bytes of shared memory. The planner
//! ([`launch::plan`]) takes the first of (64,32), (32,32), (64,16), (32,16), (16,32), ... that fits
//! the device (at most 48 KiB: the CUDA static limit; lavapipe and many Vulkan/Metal devices
//! have 32 KiB), e.g. f32 d=64 → 32×32, f16 d=128 → 32×32, f32 d=128 → 32×16. Bigger query
//! blocks amortise each K/V tile over more rows; 32-key tiles keep the three barriers per tile
//! cheap. A grid of such blocks smaller than the device's multiprocessor count (the seed's one
//! head of 256 queries: 4 cubes of 64 rows) takes the largest block, down to 16 rows, whose
//! grid covers the device, so that each cube walks the keys for fewer rows while more of them
//! run at once. The K tile rows are padded by one vector so that threads reading different keys hit
//! different banks; loads are vectorised by 4 when `head_dim` and the strides allow.
//!
//! **Accumulation** is always f32 (scores, softmax statistics, output), whatever the input dtype;
//! the output is cast back to the dtype of `q` once at the end.
//!
//! **Portability.** No plane (warp) operations and no hard-coded warp size: every reduction goes
//! through shared memory, so the kernel behaves the same with 8-wide planes (lavapipe), 32
//! (CUDA) or 64 (AMD). Threads per cube ≤ 256.
//!
//! **Tensor cores.** For f16/bf16 prefill on CUDA, [`launch::attention`] runs
//! [`fn@cmma::attention_cmma_kernel`] instead: the same row blocks, masking rule, f32 online
//! softmax and split-KV output, with `Q Kᵀ` and `P V` on the matrix units (16×16×16 `cmma`
//! fragments, f32 accumulators; see [`cmma`]). It is taken only when the runtime reports that
//! `cmma` configuration, 32-wide planes and plane shuffles/barriers ([`launch::cmma_supported`]),
//! the rows exceed the decode configuration, `head_dim` is a multiple of 16 (≤ 256), and the
//! environment variable `BURN_DECODE_CMMA` is not `0` ([`launch::tensor_cores_enabled`];
//! [`LaunchTuning::tensor_cores`] overrides it). Its tiles may use more than the 48 KiB of the
//! SIMT planner: CubeCL's CUDA runtime opts every launch in to the device's dynamic
//! shared-memory maximum.
//!
//! **Register-level tensor cores.** Where `head_dim` is a multiple of 32 up to 128 (64, 96,
//! 128 in practice), [`fn@mma::attention_mma_kernel`] runs instead of the `wmma` one, with the
//! same KV split as the `wmma` plan (partial rows merged by the same combine kernel):
//! PTX `mma.sync` through CubeCL's manual MMA, whose register layout is documented, so scores,
//! softmax and the output accumulator stay in registers (FlashAttention-2), operands come from
//! shared memory by `ldmatrix`, and K/V tiles by `cp.async` while the previous products run.
//! About 4× the `wmma` kernel at n = 8192 on an H200
//! (docs/benchmarks/2026-11-29-h200-mma-attention). It needs `mma.sync`
//! m16n8k16 for the dtype ([`launch::mma_supported`]: CUDA sm_80 and later);
//! `BURN_DECODE_MMA=0`, [`crate::set_register_mma`] or [`LaunchTuning::register_mma`] keep the
//! `wmma` kernel.

pub mod cmma;
pub mod kernel;
pub mod launch;
pub mod mma;

#[cfg(feature = "fusion")]
mod fusion;

pub use cmma::CmmaConfig;
pub use kernel::AttentionConfig;
pub use launch::{
    CmmaPlan, DECODE_MAX_ROWS, LaunchPlan, LaunchTuning, MmaPlan, Problem, attention,
    cmma_supported, mma_supported, plan, plan_cmma, plan_mma, select_cmma, select_mma,
    set_tensor_cores_enabled, tensor_cores_enabled,
};
pub use mma::MmaAttentionConfig;

use burn::tensor::{
    DType, IntDType,
    ops::{BoolTensor, BoolTensorOps, FloatTensor},
};
use burn_cubecl::{
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement, tensor::CubeTensor,
};

use crate::{FlashAttentionBackend, FlashAttentionOptions};

/// Converts a Burn bool tensor of a CubeCL backend to the `u32` mask the kernel reads.
pub fn tree_mask_to_u32<R, F, I, BT>(mask: BoolTensor<CubeBackend<R, F, I, BT>>) -> CubeTensor<R>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    match mask.dtype {
        DType::U32 | DType::Bool(burn::tensor::BoolStore::U32) => mask,
        _ => CubeBackend::<R, F, I, BT>::bool_into_int(mask, IntDType::U32),
    }
}

/// The kernel path. Inputs may be in any of f32/f16/bf16 whatever `F` is (Burn tensors carry
/// their dtype at runtime); the output has the dtype of `q`.
impl<R, F, I, BT> FlashAttentionBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tree_mask: Option<BoolTensor<Self>>,
        options: FlashAttentionOptions,
    ) -> FloatTensor<Self> {
        if !crate::kernels_enabled() {
            return crate::backends::reference_on_primitives::<Self>(q, k, v, tree_mask, options);
        }
        let mask = tree_mask.map(tree_mask_to_u32::<R, F, I, BT>);
        attention(q, k, v, mask, options, &LaunchTuning::default())
    }
}
