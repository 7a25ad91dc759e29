//! Tensor-core (`cmma`) variant of the prefill kernel for f16/bf16.
//!
//! Same contract, grid, masking rule, f32 online softmax and split-KV output as
//! [`fn@super::kernel::attention_kernel`]; only the two products of a tile run on the matrix units
//! through CubeCL's cooperative-matrix API (`nvcuda::wmma` on CUDA, 16×16×16 fragments, f32
//! accumulators).
//!
//! # Layout
//! A cube is `warps` planes of 32 units (`CubeDim = (32, warps)`); plane `w` owns the 16 rows
//! `16w .. 16w + 16` of the row block (`block_q = 16 · warps`). Per KV tile of `block_k` keys:
//!
//! 1. the cube stages K and V (zero past the chunk) in shared memory; `sync_cube`;
//! 2. each plane computes its `16 × block_k` raw scores `Q Kᵀ` with `cmma` (Q fragments are
//!    loaded once, before the tile loop) and stores them, f32, to its rows of `s_s`;
//!    `sync_plane`;
//! 3. softmax on the units: two units per row (`lane / 2`), each taking every other key. They
//!    apply scale and mask, combine the tile max and sum with one `plane_shuffle_xor(.., 1)`,
//!    update the running `(m, l)` (kept identically by both units), write `P = exp(s - m)`
//!    rounded to the input dtype to `p_s` and the row's rescale factor to `alpha_s`;
//!    `sync_plane`;
//! 4. the plane rescales its rows of the f32 output accumulator `o_s` (shared memory) by
//!    `alpha` (skipped for rows whose max did not move); `sync_plane`;
//! 5. `O += P V` with `cmma`: each 16×16 output fragment is loaded from `o_s`, accumulated over
//!    the tile's keys and stored back; `sync_cube` (K/V are overwritten next).
//!
//! The running sum `l` adds the *rounded* probabilities, so the normalisation matches the
//! weights the matrix units actually used.
//!
//! # Alignment
//! `wmma::load/store_matrix_sync` need 256-bit aligned pointers and a leading dimension that is
//! a multiple of 16 bytes. Every shared array is 128-byte aligned, `head_dim` and `block_k` are
//! multiples of 16, and rows are padded by 16 bytes (`+8` f16/bf16, `+4`/`+8` f32 elements), so
//! every fragment starts at a multiple of 32 bytes (16 rows × a multiple of 16 bytes, plus
//! 16-element column steps) and every stride is a multiple of 16 bytes. The padding also
//! staggers rows across banks.

// `#[cube]` generates a launch module, struct and functions for each kernel, without docs and
// deaf to attributes on the kernel function; the kernel's own doc comment is on its function.
#![allow(missing_docs)]

use cubecl::{cmma, prelude::*};

pub(crate) use super::kernel::PLANE;
use super::kernel::{NEG, NEG_THRESHOLD, QkvStrides, block_kv_end, q_row_vector};
/// Rows per plane: the `m` of the 16×16×16 fragments.
pub(crate) const FRAG: usize = 16;
/// Byte alignment of every shared array (wmma needs 32).
const SHARED_ALIGN: usize = 128;

/// Compile-time shape of a tensor-core launch; chosen by [`super::launch::plan_cmma`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CmmaConfig {
    /// Head dimension (a multiple of 16).
    pub head_dim: usize,
    /// Vector width `N` of global loads (divides 8 and `head_dim`).
    pub vector_size: usize,
    /// Planes per cube; `block_q = 16 · warps` rows.
    pub warps: usize,
    /// Keys per shared-memory tile (a multiple of 16).
    pub block_k: usize,
    /// Causal masking among the new tokens.
    pub causal: bool,
    /// An explicit `[q_len, q_len]` mask among the new tokens (overrides `causal`).
    pub tree: bool,
    /// Write unnormalised partial results (KV split) instead of the final output.
    pub partial: bool,
}

impl CmmaConfig {
    /// Rows per cube.
    pub fn block_q(&self) -> usize {
        FRAG * self.warps
    }
    /// Units per cube.
    pub fn threads(&self) -> usize {
        PLANE * self.warps
    }
    /// Head dimension in vectors.
    pub(crate) fn nv(&self) -> usize {
        self.head_dim / self.vector_size
    }
    /// Row stride of the Q/K/V tiles, in elements (16 bytes of padding).
    pub(crate) fn qkv_stride(&self) -> usize {
        self.head_dim + 8
    }
    /// Row stride of the Q/K/V tiles, in vectors.
    pub(crate) fn qkv_stride_v(&self) -> usize {
        self.qkv_stride() / self.vector_size
    }
    /// Row stride of the f32 score tile.
    pub(crate) fn s_stride(&self) -> usize {
        self.block_k + 4
    }
    /// Row stride of the probability tile (input dtype).
    pub(crate) fn p_stride(&self) -> usize {
        self.block_k + 8
    }
    /// Row stride of the f32 output accumulator, in elements (a multiple of 8, so of `N`).
    pub(crate) fn o_stride(&self) -> usize {
        self.head_dim + 8
    }
    pub(crate) fn o_stride_v(&self) -> usize {
        self.o_stride() / self.vector_size
    }
    pub(crate) fn q_load_iters(&self) -> usize {
        (self.block_q() * self.nv()).div_ceil(self.threads())
    }
    pub(crate) fn kv_load_iters(&self) -> usize {
        (self.block_k * self.nv()).div_ceil(self.threads())
    }
    /// Output vectors of a row per unit in the row sweeps (32 units along a row).
    pub(crate) fn sweep_iters(&self) -> usize {
        self.nv().div_ceil(PLANE)
    }

    /// Shared memory of one cube, in bytes (before the allocator's alignment padding, at most
    /// `SHARED_ALIGN` per array).
    pub fn shared_bytes(&self, elem_size: usize) -> usize {
        let bq = self.block_q();
        let bk = self.block_k;
        let staged = elem_size * (bq + 2 * bk) * self.qkv_stride();
        let scores = 4 * bq * self.s_stride();
        let probs = elem_size * bq * self.p_stride();
        let out = 4 * bq * self.o_stride();
        let stats = 3 * 4 * bq;
        staged + scores + probs + out + stats + 9 * SHARED_ALIGN
    }
}

/// Whether key `j` is visible to query `i` (see [`super`] for the rule); `kv_end` is the end
/// of the keys the cube reads (a chunk's end under a KV split).
#[allow(clippy::too_many_arguments)]
#[cube]
pub(crate) fn visible(
    mask: &Array<u32>,
    j: usize,
    i: usize,
    chunk_end: usize,
    prefix: usize,
    q_len: usize,
    #[comptime] causal: bool,
    #[comptime] tree: bool,
) -> bool {
    let mut visible = false;
    if j < chunk_end {
        visible = true;
        if j >= prefix {
            // A new token: the mask applies (`tj < q_len` since `j < kv_len`).
            let tj = j - prefix;
            if comptime!(tree) {
                let i_c = if i < q_len { i } else { q_len - 1 };
                visible = mask[i_c * q_len + tj] != 0u32;
            } else if comptime!(causal) {
                visible = tj <= i;
            }
        }
    }
    visible
}

/// Tensor-core attention of a block of `16 · warps` rows of one KV head against the keys
/// `[chunk_start, chunk_end)` of that head. Arguments and grid as
/// [`fn@super::kernel::attention_kernel`]; `CubeDim = (32, warps)`.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn attention_cmma_kernel<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    mask: &Array<u32>,
    out: &mut Array<Vector<F, N>>,
    part_o: &mut Array<Vector<f32, N>>,
    part_ml: &mut Array<f32>,
    strides: QkvStrides,
    scale: f32,
    kv_len: u32,
    q_len: u32,
    group: u32,
    n_kv_heads: u32,
    chunk_len: u32,
    #[comptime] cfg: CmmaConfig,
    #[define(F)] _dtype: StorageType,
) {
    let nv = comptime!(cfg.nv());
    let vs = cfg.vector_size;
    let bq = comptime!(cfg.block_q());
    let bk = cfg.block_k;
    let threads = comptime!(cfg.threads());
    let qs = comptime!(cfg.qkv_stride());
    let qsv = comptime!(cfg.qkv_stride_v());
    let ss = comptime!(cfg.s_stride());
    let ps = comptime!(cfg.p_stride());
    let os = comptime!(cfg.o_stride());
    let osv = comptime!(cfg.o_stride_v());

    let lane = UNIT_POS_X as usize;
    let warp = UNIT_POS_Y as usize;
    let t = warp * PLANE + lane;
    let row_block = CUBE_POS_X as usize;
    let bh = CUBE_POS_Y as usize;
    let split = CUBE_POS_Z as usize;

    let kv_len = kv_len as usize;
    let q_len = q_len as usize;
    let group = group as usize;
    let n_kv_heads = n_kv_heads as usize;
    let chunk_len = chunk_len as usize;

    let batch = bh / n_kv_heads;
    let kv_head = bh % n_kv_heads;
    let rows = group * q_len;
    let prefix = kv_len - q_len;
    let row0 = row_block * bq;

    let mut q_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(bq * qsv), SHARED_ALIGN);
    let mut k_s =
        SharedMemory::<Vector<F, N>>::new_aligned(comptime!(cfg.block_k * qsv), SHARED_ALIGN);
    let mut v_s =
        SharedMemory::<Vector<F, N>>::new_aligned(comptime!(cfg.block_k * qsv), SHARED_ALIGN);
    let mut s_s = SharedMemory::<f32>::new_aligned(comptime!(bq * ss), SHARED_ALIGN);
    let mut p_s = SharedMemory::<F>::new_aligned(comptime!(bq * ps), SHARED_ALIGN);
    let mut o_s = SharedMemory::<Vector<f32, N>>::new_aligned(comptime!(bq * osv), SHARED_ALIGN);
    let mut alpha_s = SharedMemory::<f32>::new_aligned(bq, SHARED_ALIGN);
    let mut m_s = SharedMemory::<f32>::new_aligned(bq, SHARED_ALIGN);
    let mut l_s = SharedMemory::<f32>::new_aligned(bq, SHARED_ALIGN);

    // Stage the Q rows of this block (zeros past the last row).
    #[unroll]
    for it in 0..comptime!(cfg.q_load_iters()) {
        let e = t + it * threads;
        if e < bq * nv {
            let r = e / nv;
            let dv = e % nv;
            let val = q_row_vector::<F, N>(
                q,
                &strides,
                batch,
                kv_head,
                group,
                rows,
                row0 + r,
                dv,
                cfg.vector_size,
            );
            q_s[r * qsv + dv] = val;
        }
    }
    // Zero this plane's rows of the output accumulator.
    #[unroll]
    for rr in 0..FRAG {
        let r = warp * FRAG + rr;
        #[unroll]
        for cc in 0..comptime!(cfg.sweep_iters()) {
            let col = lane + cc * PLANE;
            if col < nv {
                o_s[r * osv + col] = Vector::new(0.0f32);
            }
        }
    }
    sync_cube();

    // This plane's Q fragments, loaded once: `16 × head_dim` as `head_dim / 16` A tiles.
    let mut q_frags = Sequence::<cmma::Matrix<F>>::new();
    #[unroll]
    for kt in 0..comptime!(cfg.head_dim / FRAG) {
        let start = comptime!((kt * FRAG) / cfg.vector_size) + warp * comptime!(FRAG * qsv);
        let frag = unsafe {
            cmma::Matrix::<F>::uninitialized(
                cmma::MatrixIdent::A,
                FRAG,
                FRAG,
                FRAG,
                cmma::MatrixLayout::RowMajor,
            )
        };
        cmma::load(&frag, &q_s.slice(start, bq * qsv), qs as u32);
        q_frags.push(frag);
    }
    let k_frag = unsafe {
        cmma::Matrix::<F>::uninitialized(
            cmma::MatrixIdent::B,
            FRAG,
            FRAG,
            FRAG,
            cmma::MatrixLayout::ColMajor,
        )
    };
    let v_frag = unsafe {
        cmma::Matrix::<F>::uninitialized(
            cmma::MatrixIdent::B,
            FRAG,
            FRAG,
            FRAG,
            cmma::MatrixLayout::RowMajor,
        )
    };
    let acc = unsafe {
        cmma::Matrix::<f32>::uninitialized(
            cmma::MatrixIdent::Accumulator,
            FRAG,
            FRAG,
            FRAG,
            cmma::MatrixLayout::Undefined,
        )
    };
    let mut p_frags = Sequence::<cmma::Matrix<F>>::new();
    #[unroll]
    for _ in 0..comptime!(cfg.block_k / FRAG) {
        p_frags.push(unsafe {
            cmma::Matrix::<F>::uninitialized(
                cmma::MatrixIdent::A,
                FRAG,
                FRAG,
                FRAG,
                cmma::MatrixLayout::RowMajor,
            )
        });
    }

    // Keys this row block may see: causal blocks stop after their last query's position.
    let kv_end = block_kv_end(
        kv_len,
        prefix,
        row0,
        bq,
        rows,
        group,
        comptime!(cfg.causal && !cfg.tree),
    );
    let chunk_start = split * chunk_len;
    let chunk_end = if chunk_start + chunk_len < kv_end {
        chunk_start + chunk_len
    } else {
        kv_end
    };

    let k_batch = batch * strides.k_batch as usize + kv_head * strides.k_head as usize;
    let v_batch = batch * strides.v_batch as usize + kv_head * strides.v_head as usize;
    let k_row_stride = strides.k_row as usize;
    let v_row_stride = strides.v_row as usize;

    // Softmax phase: two units per row, each taking every other key of the tile.
    let sm_row = warp * FRAG + lane / 2;
    let sm_half = lane % 2;
    let sm_query = (row0 + sm_row) / group;
    let mut m_run = f32::new(NEG);
    let mut l_run = 0.0f32;
    let mut scores = Array::<f32>::new(comptime!(cfg.block_k / 2));

    // First element of this plane's rows in the score, probability and output tiles.
    let s_base = warp * comptime!(FRAG * ss);
    let p_base = warp * comptime!(FRAG * ps);
    let o_base = warp * comptime!(FRAG * osv);

    let mut tile_start = chunk_start;
    while tile_start < chunk_end {
        // (1) Stage K and V, coalesced along head_dim; zero past `chunk_end`.
        #[unroll]
        for it in 0..comptime!(cfg.kv_load_iters()) {
            let e = t + it * threads;
            if e < bk * nv {
                let c = e / nv;
                let dv = e % nv;
                let j = tile_start + c;
                let mut kval = Vector::<F, N>::new(F::new(0.0));
                let mut vval = Vector::<F, N>::new(F::new(0.0));
                if j < chunk_end {
                    kval = k[(k_batch + j * k_row_stride) / vs + dv];
                    vval = v[(v_batch + j * v_row_stride) / vs + dv];
                }
                k_s[c * qsv + dv] = kval;
                v_s[c * qsv + dv] = vval;
            }
        }
        sync_cube();

        // (2) Raw scores of this plane's 16 rows: S = Q Kᵀ, one 16-key fragment at a time.
        #[unroll]
        for nt in 0..comptime!(cfg.block_k / FRAG) {
            cmma::fill(&acc, 0.0f32);
            #[unroll]
            for kt in 0..comptime!(cfg.head_dim / FRAG) {
                // Kᵀ as a column-major B: element (d, key) at `key * qs + d`.
                let start = comptime!((nt * FRAG * qs + kt * FRAG) / cfg.vector_size);
                cmma::load(
                    &k_frag,
                    &k_s.slice(start, comptime!(cfg.block_k * qsv)),
                    qs as u32,
                );
                cmma::execute::<F, F, f32, f32>(q_frags.index(kt), &k_frag, &acc, &acc);
            }
            cmma::store(
                &mut s_s.slice_mut(s_base + nt * FRAG, bq * ss),
                &acc,
                ss as u32,
                cmma::MatrixLayout::RowMajor,
            );
        }
        sync_plane();

        // (3) Online softmax: scale, mask, running max/sum, probabilities.
        let mut m_tile = f32::new(NEG);
        #[unroll]
        for jj in 0..comptime!(cfg.block_k / 2) {
            let c = jj * 2 + sm_half;
            let j = tile_start + c;
            let mut s = f32::new(NEG);
            if visible(
                mask, j, sm_query, chunk_end, prefix, q_len, cfg.causal, cfg.tree,
            ) {
                s = s_s[sm_row * ss + c] * scale;
            }
            scores[jj] = s;
            m_tile = f32::max(m_tile, s);
        }
        m_tile = f32::max(m_tile, plane_shuffle_xor(m_tile, 1u32));
        let m_new = f32::max(m_run, m_tile);
        let alpha = f32::exp(m_run - m_new);
        let mut l_tile = 0.0f32;
        #[unroll]
        for jj in 0..comptime!(cfg.block_k / 2) {
            let c = jj * 2 + sm_half;
            let s = scores[jj];
            let p = if s > NEG_THRESHOLD {
                F::cast_from(f32::exp(s - m_new))
            } else {
                F::new(0.0)
            };
            p_s[sm_row * ps + c] = p;
            l_tile += f32::cast_from(p);
        }
        l_tile += plane_shuffle_xor(l_tile, 1u32);
        l_run = l_run * alpha + l_tile;
        m_run = m_new;
        if sm_half == 0 {
            alpha_s[sm_row] = alpha;
        }
        sync_plane();

        // (4) Rescale this plane's output rows whose max moved (one row at a time, 32 units
        // along it; the branch is uniform over the plane).
        #[unroll]
        for rr in 0..FRAG {
            let r = warp * FRAG + rr;
            let a = alpha_s[r];
            if a != 1.0f32 {
                #[unroll]
                for cc in 0..comptime!(cfg.sweep_iters()) {
                    let col = lane + cc * PLANE;
                    if col < nv {
                        o_s[r * osv + col] *= Vector::new(a);
                    }
                }
            }
        }
        sync_plane();

        // (5) O += P V, one 16-column output fragment at a time.
        #[unroll]
        for kk in 0..comptime!(cfg.block_k / FRAG) {
            cmma::load(
                p_frags.index(kk),
                &p_s.slice(p_base + kk * FRAG, bq * ps),
                ps as u32,
            );
        }
        #[unroll]
        for nt in 0..comptime!(cfg.head_dim / FRAG) {
            let o_start = o_base + comptime!((nt * FRAG) / cfg.vector_size);
            cmma::load_with_layout(
                &acc,
                &o_s.slice(o_start, bq * osv),
                os as u32,
                cmma::MatrixLayout::RowMajor,
            );
            #[unroll]
            for kk in 0..comptime!(cfg.block_k / FRAG) {
                // V as a row-major B: element (key, d) at `key * qs + d`.
                let start = comptime!((kk * FRAG * qs + nt * FRAG) / cfg.vector_size);
                cmma::load(
                    &v_frag,
                    &v_s.slice(start, comptime!(cfg.block_k * qsv)),
                    qs as u32,
                );
                cmma::execute::<F, F, f32, f32>(p_frags.index(kk), &v_frag, &acc, &acc);
            }
            cmma::store(
                &mut o_s.slice_mut(o_start, bq * osv),
                &acc,
                os as u32,
                cmma::MatrixLayout::RowMajor,
            );
        }
        sync_cube();

        tile_start += bk;
    }

    if sm_half == 0 {
        m_s[sm_row] = m_run;
        l_s[sm_row] = l_run;
    }
    sync_cube();

    // Write this plane's rows, 32 units along each row.
    #[unroll]
    for rr in 0..FRAG {
        let r = warp * FRAG + rr;
        let rho = row0 + r;
        if rho < rows {
            if comptime!(cfg.partial) {
                let prow = (split * CUBE_COUNT_Y as usize + bh) * rows + rho;
                #[unroll]
                for cc in 0..comptime!(cfg.sweep_iters()) {
                    let col = lane + cc * PLANE;
                    if col < nv {
                        part_o[prow * nv + col] = o_s[r * osv + col];
                    }
                }
                if lane == 0 {
                    part_ml[prow * 2] = m_s[r];
                    part_ml[prow * 2 + 1] = l_s[r];
                }
            } else {
                // A row that sees no key at all gets zeros rather than NaN.
                let l = l_s[r];
                let inv = if l > 0.0f32 {
                    1.0f32 / l
                } else {
                    f32::new(0.0)
                };
                let head = kv_head * group + rho % group;
                let n_heads = n_kv_heads * group;
                let orow = (batch * q_len + rho / group) * n_heads + head;
                #[unroll]
                for cc in 0..comptime!(cfg.sweep_iters()) {
                    let col = lane + cc * PLANE;
                    if col < nv {
                        out[orow * nv + col] =
                            Vector::<F, N>::cast_from(o_s[r * osv + col] * Vector::new(inv));
                    }
                }
            }
        }
    }
}
