//! The CubeCL kernels: one tiled online-softmax attention kernel (used for prefill and, with a
//! KV split, for decode) and the small kernel that merges the partial results of a KV split.
//!
//! See [`super`] for the design; [`AttentionConfig`] for what is decided at compile time.

// `#[cube]` generates a launch module, struct and functions for each kernel, without docs and
// deaf to attributes on the kernel function; the kernel's own doc comment is on its function.
#![allow(missing_docs)]

use cubecl::prelude::*;

/// Score given to masked-out keys. A finite number rather than `-inf`: WGSL has no infinity
/// literal, and `exp(NEG - m)` underflows to exactly `0` as soon as one real score was seen.
pub(crate) const NEG: f32 = -1.0e30;
/// Scores below this are masked ones (`NEG` plus rounding).
pub(crate) const NEG_THRESHOLD: f32 = -1.0e29;
/// Units per plane the tensor-core kernels are written for (CUDA warps).
pub(crate) const PLANE: usize = 32;

/// Compile-time shape of one attention launch. Every field is chosen on the host by
/// [`super::launch::plan`]; derived quantities are precomputed there so that
/// the kernel only does comptime arithmetic through loop bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionConfig {
    /// Head dimension in vectors (`head_dim / vector_size`).
    pub nv: usize,
    /// Vector width `N` (elements per global/shared load).
    pub vector_size: usize,
    /// Query rows per cube (`BQ`). A row is one (query, query head) pair of the KV head.
    pub block_q: usize,
    /// Keys per shared-memory tile (`BK`).
    pub block_k: usize,
    /// Key groups: the `BK` keys of a tile are split among `KG` groups of threads that each keep
    /// their own output accumulator, merged once at the end (gives decode work to all threads
    /// when there are fewer rows than threads).
    pub key_groups: usize,
    /// Threads per (row, key group), each owning `ceil(nv / lanes)` output vectors.
    pub lanes: usize,
    /// Threads per cube: `block_q * key_groups * lanes`.
    pub threads: usize,
    /// Causal masking among the new tokens.
    pub causal: bool,
    /// An explicit `[q_len, q_len]` mask among the new tokens (overrides `causal`).
    pub tree: bool,
    /// Write unnormalised partial results (KV split) instead of the final output.
    pub partial: bool,
}

impl AttentionConfig {
    pub(crate) fn q_load_iters(&self) -> usize {
        (self.block_q * self.nv).div_ceil(self.threads)
    }
    pub(crate) fn kv_load_iters(&self) -> usize {
        (self.block_k * self.nv).div_ceil(self.threads)
    }
    /// Rows handled at once in the score phase (one key per thread, `threads / block_k` rows).
    pub(crate) fn rows_step(&self) -> usize {
        self.threads / self.block_k
    }
    pub(crate) fn score_iters(&self) -> usize {
        self.block_q.div_ceil(self.rows_step())
    }
    /// Output vectors per thread.
    pub(crate) fn cols_per_thread(&self) -> usize {
        self.nv.div_ceil(self.lanes)
    }
}

/// Strides, in elements, of the batch, head and row axes of q, k and v (the head dimension is
/// unit-stride). Scalars rather than tensor metadata: see `crate::args`.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct QkvStrides {
    /// Elements between two batch entries of q.
    pub q_batch: u32,
    /// Elements between two heads of q.
    pub q_head: u32,
    /// Elements between two rows (positions) of q.
    pub q_row: u32,
    /// Elements between two batch entries of k.
    pub k_batch: u32,
    /// Elements between two KV heads of k.
    pub k_head: u32,
    /// Elements between two rows (positions) of k.
    pub k_row: u32,
    /// Elements between two batch entries of v.
    pub v_batch: u32,
    /// Elements between two KV heads of v.
    pub v_head: u32,
    /// Elements between two rows (positions) of v.
    pub v_row: u32,
}

/// Vector `dv` of row `rho` among the rows of KV head `kv_head` (`rho = i * group + g`: query
/// `i` of query head `kv_head * group + g`) of batch `batch`'s queries; zeros past `rows`, so
/// a block's padding rows score zero. Shared by the three attention kernels' Q staging.
#[allow(clippy::too_many_arguments)]
#[cube]
pub(crate) fn q_row_vector<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    strides: &QkvStrides,
    batch: usize,
    kv_head: usize,
    group: usize,
    rows: usize,
    rho: usize,
    dv: usize,
    #[comptime] vs: usize,
) -> Vector<F, N> {
    let mut val = Vector::<F, N>::new(F::new(0.0));
    if rho < rows {
        let i = rho / group;
        let head = kv_head * group + rho % group;
        let idx = (batch * strides.q_batch as usize
            + head * strides.q_head as usize
            + i * strides.q_row as usize)
            / vs
            + dv;
        val = q[idx];
    }
    val
}

/// End of the keys the row block `row0 .. row0 + block_q` may see: `kv_len`, or under the
/// causal rule (`causal`: causal and no tree) just past its last query's own position, so that
/// fully masked tiles are never loaded.
#[allow(clippy::too_many_arguments)]
#[cube]
pub(crate) fn block_kv_end(
    kv_len: usize,
    prefix: usize,
    row0: usize,
    block_q: usize,
    rows: usize,
    group: usize,
    #[comptime] causal: bool,
) -> usize {
    let block_end = if row0 + block_q < rows {
        row0 + block_q
    } else {
        rows
    };
    let mut kv_end = kv_len;
    if comptime!(causal) {
        let causal_end = prefix + (block_end - 1) / group + 1;
        if causal_end < kv_end {
            kv_end = causal_end;
        }
    }
    kv_end
}

/// Sum of the lanes of a vector.
#[cube]
fn vector_sum<N: Size>(v: Vector<f32, N>) -> f32 {
    let mut s = 0.0f32;
    #[unroll]
    for i in 0..N::value() {
        s += v[i];
    }
    s
}

/// Attention of a block of `BQ` query rows of one KV head against the keys `[chunk_start,
/// chunk_end)` of that head (the whole valid range unless the launch splits the KV axis).
///
/// Grid: `x` = row block, `y` = `batch * n_kv_heads + kv_head`, `z` = KV split.
/// Rows of a KV head are `rho = i * group + g` (query `i`, query head `kv_head * group + g`), so
/// the query heads that share K/V also share every K/V tile load (GQA without repeating K/V).
///
/// Per KV tile of `BK` keys: (1) the cube stages K and V in shared memory (rows past the end
/// are zero-filled, so garbage or NaN beyond `kv_len` is never read); (2) every thread computes
/// `S = scale * Q Kᵀ` for one key and `BQ / (threads / BK)` rows, applying the mask, into shared
/// memory; (3) each thread reads its row of `S`, updates the running max `m` and rescales its
/// f32 accumulators by `exp(m_old - m_new)`, then adds `exp(s - m_new) * V` for the keys of its
/// key group. After the last tile the key groups are merged through shared memory and the row
/// is normalised by its running sum `l` (or `acc, m, l` are written for the split combine).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn attention_kernel<F: Float, N: Size>(
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
    #[comptime] cfg: AttentionConfig,
    #[define(F)] _dtype: StorageType,
) {
    let nv = cfg.nv;
    let vs = cfg.vector_size;
    let bq = cfg.block_q;
    let bk = cfg.block_k;
    let threads = cfg.threads;
    let k_stride = comptime!(cfg.nv + 1);
    let s_stride = comptime!(cfg.block_k + 1);

    let t = UNIT_POS as usize;
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

    let mut q_s = SharedMemory::<Vector<F, N>>::new(comptime!(cfg.block_q * cfg.nv));
    let mut k_s = SharedMemory::<Vector<F, N>>::new(comptime!(cfg.block_k * (cfg.nv + 1)));
    let mut v_s = SharedMemory::<Vector<F, N>>::new(comptime!(cfg.block_k * cfg.nv));
    let mut s_s = SharedMemory::<f32>::new(comptime!(cfg.block_q * (cfg.block_k + 1)));

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
            q_s[e] = val;
        }
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

    // Score phase: this thread's key column and first row.
    let sc_col = t % bk;
    let sc_row0 = t / bk;
    // Output phase: row, key group and lane.
    let o_row = t / comptime!(cfg.key_groups * cfg.lanes);
    let o_kg = (t / cfg.lanes) % cfg.key_groups;
    let o_lane = t % cfg.lanes;
    let o_query = (row0 + o_row) / group;

    let k_batch = batch * strides.k_batch as usize + kv_head * strides.k_head as usize;
    let v_batch = batch * strides.v_batch as usize + kv_head * strides.v_head as usize;
    let k_row_stride = strides.k_row as usize;
    let v_row_stride = strides.v_row as usize;

    let mut m_run = f32::new(NEG);
    let mut l_run = 0.0f32;
    let mut acc = Array::<Vector<f32, N>>::new(comptime!(cfg.cols_per_thread()));
    #[unroll]
    for ci in 0..comptime!(cfg.cols_per_thread()) {
        acc[ci] = Vector::new(0.0f32);
    }
    let mut dots = Array::<Vector<f32, N>>::new(comptime!(cfg.score_iters()));

    sync_cube();

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
                k_s[c * k_stride + dv] = kval;
                v_s[c * nv + dv] = vval;
            }
        }
        sync_cube();

        // (2) Scores: one key per thread, several rows (K vector reused across rows).
        if sc_row0 < bq {
            #[unroll]
            for it in 0..comptime!(cfg.score_iters()) {
                dots[it] = Vector::new(0.0f32);
            }
            #[unroll]
            for dv in 0..nv {
                let kv = Vector::<f32, N>::cast_from(k_s[sc_col * k_stride + dv]);
                #[unroll]
                for it in 0..comptime!(cfg.score_iters()) {
                    let r = sc_row0 + it * comptime!(cfg.rows_step());
                    if r < bq {
                        dots[it] += Vector::<f32, N>::cast_from(q_s[r * nv + dv]) * kv;
                    }
                }
            }
            let j = tile_start + sc_col;
            #[unroll]
            for it in 0..comptime!(cfg.score_iters()) {
                let r = sc_row0 + it * comptime!(cfg.rows_step());
                if r < bq {
                    let mut visible = false;
                    if j < chunk_end {
                        visible = true;
                        if j >= prefix {
                            // A new token: the mask applies (`tj < q_len` since `j < kv_len`).
                            let tj = j - prefix;
                            let i = (row0 + r) / group;
                            if comptime!(cfg.tree) {
                                let i_c = if i < q_len { i } else { q_len - 1 };
                                visible = mask[i_c * q_len + tj] != 0u32;
                            } else if comptime!(cfg.causal) {
                                visible = tj <= i;
                            }
                        }
                    }
                    let s = if visible {
                        vector_sum::<N>(dots[it]) * scale
                    } else {
                        f32::new(NEG)
                    };
                    s_s[r * s_stride + sc_col] = s;
                }
            }
        }
        sync_cube();

        // (3) Online softmax update and P·V for this thread's key group.
        let mut m_tile = f32::new(NEG);
        for j in 0..bk {
            m_tile = f32::max(m_tile, s_s[o_row * s_stride + j]);
        }
        let m_new = f32::max(m_run, m_tile);
        let alpha = f32::exp(m_run - m_new);
        l_run *= alpha;
        #[unroll]
        for ci in 0..comptime!(cfg.cols_per_thread()) {
            acc[ci] *= Vector::new(alpha);
        }
        for jj in 0..comptime!(cfg.block_k / cfg.key_groups) {
            let j = o_kg + jj * cfg.key_groups;
            let s = s_s[o_row * s_stride + j];
            let p = if s > NEG_THRESHOLD {
                f32::exp(s - m_new)
            } else {
                f32::new(0.0)
            };
            l_run += p;
            let pv = Vector::<f32, N>::new(p);
            #[unroll]
            for ci in 0..comptime!(cfg.cols_per_thread()) {
                let col = o_lane + ci * cfg.lanes;
                if col < nv {
                    acc[ci] += pv * Vector::<f32, N>::cast_from(v_s[j * nv + col]);
                }
            }
        }
        m_run = m_new;
        sync_cube();

        tile_start += bk;
    }

    // Merge the key groups (comptime: only when there are several).
    if comptime!(cfg.key_groups > 1) {
        let mut red_o =
            SharedMemory::<Vector<f32, N>>::new(comptime!(cfg.threads * cfg.cols_per_thread()));
        let mut red_l = SharedMemory::<f32>::new(cfg.threads);
        #[unroll]
        for ci in 0..comptime!(cfg.cols_per_thread()) {
            red_o[t * comptime!(cfg.cols_per_thread()) + ci] = acc[ci];
        }
        red_l[t] = l_run;
        sync_cube();
        if o_kg == 0 {
            for g in 1..cfg.key_groups {
                let other = t + g * cfg.lanes;
                #[unroll]
                for ci in 0..comptime!(cfg.cols_per_thread()) {
                    acc[ci] += red_o[other * comptime!(cfg.cols_per_thread()) + ci];
                }
                l_run += red_l[other];
            }
        }
    }

    let rho = row0 + o_row;
    if o_kg == 0 && rho < rows {
        let head = kv_head * group + rho % group;
        if comptime!(cfg.partial) {
            let prow = (split * CUBE_COUNT_Y as usize + bh) * rows + rho;
            #[unroll]
            for ci in 0..comptime!(cfg.cols_per_thread()) {
                let col = o_lane + ci * cfg.lanes;
                if col < nv {
                    part_o[prow * nv + col] = acc[ci];
                }
            }
            if o_lane == 0 {
                part_ml[prow * 2] = m_run;
                part_ml[prow * 2 + 1] = l_run;
            }
        } else {
            // A row that sees no key at all (only possible with a tree mask hiding a query from
            // itself and an empty prefix) gets zeros rather than NaN.
            let inv = if l_run > 0.0f32 {
                1.0f32 / l_run
            } else {
                f32::new(0.0)
            };
            let n_heads = n_kv_heads * group;
            let orow = (batch * q_len + o_query) * n_heads + head;
            #[unroll]
            for ci in 0..comptime!(cfg.cols_per_thread()) {
                let col = o_lane + ci * cfg.lanes;
                if col < nv {
                    out[orow * nv + col] = Vector::<F, N>::cast_from(acc[ci] * Vector::new(inv));
                }
            }
        }
    }
}

/// Merges the `splits` partial results of a KV-split launch:
/// `out = Σ_s e^{m_s - M} acc_s / Σ_s e^{m_s - M} l_s` with `M = max_s m_s`.
///
/// One thread per output vector; `part_ml` holds `(m, l)` pairs laid out like the rows of
/// `part_o`: `[split][batch * n_kv_heads][rows]`.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn combine_kernel<F: Float, N: Size>(
    part_o: &Array<Vector<f32, N>>,
    part_ml: &Array<f32>,
    out: &mut Array<Vector<F, N>>,
    splits: u32,
    bh_count: u32,
    q_len: u32,
    group: u32,
    n_kv_heads: u32,
    #[comptime] nv: usize,
    #[define(F)] _dtype: StorageType,
) {
    let splits = splits as usize;
    let bh_count = bh_count as usize;
    let q_len = q_len as usize;
    let group = group as usize;
    let n_kv_heads = n_kv_heads as usize;
    let rows = group * q_len;

    let pos = ABSOLUTE_POS;
    if pos >= bh_count * rows * nv {
        terminate!();
    }
    let col = pos % nv;
    let rr = pos / nv;
    let rho = rr % rows;
    let bh = rr / rows;

    let mut m_max = f32::new(NEG);
    for s in 0..splits {
        m_max = f32::max(m_max, part_ml[((s * bh_count + bh) * rows + rho) * 2]);
    }
    let mut num = Vector::<f32, N>::new(0.0f32);
    let mut den = 0.0f32;
    for s in 0..splits {
        let prow = (s * bh_count + bh) * rows + rho;
        let w = f32::exp(part_ml[prow * 2] - m_max);
        num += part_o[prow * nv + col] * Vector::new(w);
        den += part_ml[prow * 2 + 1] * w;
    }
    let inv = if den > 0.0f32 {
        1.0f32 / den
    } else {
        f32::new(0.0)
    };

    let batch = bh / n_kv_heads;
    let kv_head = bh % n_kv_heads;
    let head = kv_head * group + rho % group;
    let i = rho / group;
    let orow = (batch * q_len + i) * (n_kv_heads * group) + head;
    out[orow * nv + col] = Vector::<F, N>::cast_from(num * Vector::new(inv));
}
