//! Register-level tensor-core prefill kernel (`mma.sync` m16n8k16) for f16/bf16 on CUDA.
//!
//! Same contract, grid, masking rule, f32 online softmax and split-KV output as
//! [`fn@super::kernel::attention_kernel`]; what differs from the `wmma` kernel ([`super::cmma`])
//! is where the intermediate tiles live. `wmma` fragments have no documented
//! register layout, so that kernel stores every score tile to shared memory for the softmax and
//! keeps the output accumulator there too, reloading and storing it for every key tile. With
//! CubeCL's manual MMA ([`MmaDefinition`]) the layout is PTX's, documented: a lane holds the
//! accumulator elements `(g, 2c..2c+1)` and `(g + 8, 2c..2c+1)` of each 16×8 tile
//! (`g = lane / 4`, `c = lane % 4`). So, as in FlashAttention-2:
//!
//! * scores `S = Q Kᵀ` stay in registers; a row's max and sum need only the four lanes of a
//!   quad (`plane_shuffle_xor` by 1 and 2), and the running sum is kept per lane, reduced once
//!   at the end;
//! * the probabilities are re-packed in registers as the A operand of `P V`: the accumulator
//!   layout of two adjacent 16×8 score tiles *is* the A layout of one 16×16 tile;
//! * the output accumulator stays in registers for the whole key loop (rescaled in place);
//! * operands come from shared memory with `ldmatrix` (`.trans` for V, which is stored
//!   `[key][d]` and read as a `[key × d]` B operand).
//!
//! Shared memory holds only the staged Q, K and V tiles; per key tile the cube synchronises
//! twice (after staging, before overwriting).
//!
//! Under a KV split (grid z, [`MmaAttentionConfig::partial`]) a cube walks only its chunk of
//! the keys and writes, straight from the registers, the unnormalised output rows and their
//! `(m, l)` (the max of the scaled scores and the sum of `exp(s - m)`) in f32 for
//! [`fn@super::kernel::combine_kernel`], as the other two kernels do.
//!
//! # Layout
//! A cube is `warps` planes of 32 units (`CubeDim = (32, warps)`); plane `w` owns `m_tiles`
//! 16-row tiles, rows `16 m w .. 16 m (w + 1)` of the row block (`block_q = 16 · m_tiles ·
//! warps`; 1 tile per plane and 64-key tiles measured best on an H200). `head_dim` is a
//! multiple of 32 (operands are loaded four 8×8 matrices at a time) and at most 128 (the
//! output accumulator takes `m_tiles · head_dim / 2` registers per lane).
//!
//! Unlike the other kernels this one is compiled with fast math (`__expf`), well inside the
//! half-precision tolerance.
//!
//! # Alignment
//! `ldmatrix` reads 16-byte rows at 16-byte aligned shared addresses: rows are padded by 8
//! elements (16 bytes, which also staggers them across banks) and every column offset is a
//! multiple of 8 elements.

// `#[cube]` generates a launch module, struct and functions for each kernel, without docs and
// deaf to attributes on the kernel function; the kernel's own doc comment is on its function.
#![allow(missing_docs)]

use cubecl::{
    cmma::MmaDefinition,
    ir::{FastMath, MatrixIdent},
    prelude::barrier::{Barrier, copy_async_checked},
    prelude::*,
};

use super::cmma::visible;
use super::kernel::{NEG, NEG_THRESHOLD, PLANE, QkvStrides, block_kv_end, q_row_vector};

/// Rows per plane: the `m` of m16n8k16.
pub(crate) const ROWS: usize = 16;
/// Keys (of `S`) or head-dim columns (of `O`) per accumulator tile: the `n` of m16n8k16.
const COLS: usize = 8;
/// Byte alignment of the shared arrays.
const SHARED_ALIGN: usize = 128;

/// A lane's registers of one `mma` operand or accumulator: 32-bit registers holding two
/// elements each (PTX's fragment layout).
type Regs<E> = Array<Vector<E, Const<2>>>;

/// Compile-time shape of a launch; chosen by [`super::launch::plan_mma`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmaAttentionConfig {
    /// Head dimension (a multiple of 32, at most 128).
    pub head_dim: usize,
    /// Vector width `N` of the `cp.async` copies: 2, 4 or 8 (4, 8 or 16 bytes).
    pub vector_size: usize,
    /// Planes per cube.
    pub warps: usize,
    /// 16-row tiles per plane: every K/V operand loaded from shared memory serves this many
    /// products. `block_q = 16 · m_tiles · warps`.
    pub m_tiles: usize,
    /// Keys per shared-memory tile (a multiple of 16).
    pub block_k: usize,
    /// Causal masking among the new tokens.
    pub causal: bool,
    /// An explicit `[q_len, q_len]` mask among the new tokens (overrides `causal`).
    pub tree: bool,
    /// Write unnormalised partial results (KV split: grid z chunks of `chunk_len` keys) for
    /// [`fn@super::kernel::combine_kernel`] instead of the final output.
    pub partial: bool,
}

impl MmaAttentionConfig {
    /// Rows per cube.
    pub fn block_q(&self) -> usize {
        ROWS * self.m_tiles * self.warps
    }
    /// Units per cube.
    pub fn threads(&self) -> usize {
        PLANE * self.warps
    }
    pub(crate) fn nv(&self) -> usize {
        self.head_dim / self.vector_size
    }
    /// Row stride of the staged tiles, in elements (16 bytes of padding).
    pub(crate) fn stride(&self) -> usize {
        self.head_dim + 8
    }
    pub(crate) fn stride_v(&self) -> usize {
        self.stride() / self.vector_size
    }
    pub(crate) fn q_load_iters(&self) -> usize {
        (self.block_q() * self.nv()).div_ceil(self.threads())
    }
    pub(crate) fn kv_load_iters(&self) -> usize {
        (self.block_k * self.nv()).div_ceil(self.threads())
    }
    /// Shared memory of one cube, in bytes (alignment padding and the two barriers included).
    pub fn shared_bytes(&self, elem_size: usize) -> usize {
        elem_size * (self.block_q() + 2 * self.block_k) * self.stride() + 4 * SHARED_ALIGN
    }
}

/// The product every `mma` here runs: m16n8k16, `F` operands, f32 accumulators.
#[cube]
fn m16n8k16<F: Float>() -> MmaDefinition<F, F, f32> {
    MmaDefinition::<F, F, f32>::new(ROWS, COLS, 16usize)
}

/// A zeroed 16×8 f32 accumulator (two registers of two elements per lane).
#[cube]
fn zero_acc() -> Regs<f32> {
    let mut acc = Array::<Vector<f32, Const<2>>>::new(2usize);
    acc[0usize] = Vector::new(0.0f32);
    acc[1usize] = Vector::new(0.0f32);
    acc
}

/// The B operands of two products from one `ldmatrix.x4` of a K or V tile: the four 8×8
/// matrices whose rows this lane addresses at `start` (in vectors; `transpose` for V, stored
/// `[key][d]` and read as `[key × d]`), registers 0-1 for the first product, 2-3 for the
/// second.
#[cube]
fn load_b<F: Float, N: Size>(
    tile: &SharedMemory<Vector<F, N>>,
    start: usize,
    #[comptime] transpose: bool,
    #[comptime] cfg: MmaAttentionConfig,
) -> (Regs<F>, Regs<F>) {
    let def = m16n8k16::<F>();
    let row_v = comptime!(8 / cfg.vector_size);
    let regs = def.load_matrix::<Vector<F, N>, Const<2>>(
        &tile.slice(start, start + row_v),
        MatrixIdent::B,
        4usize,
        transpose,
    );
    let mut b0 = Array::<Vector<F, Const<2>>>::new(2usize);
    let mut b1 = Array::<Vector<F, Const<2>>>::new(2usize);
    b0[0usize] = regs[0usize];
    b0[1usize] = regs[1usize];
    b1[0usize] = regs[2usize];
    b1[1usize] = regs[3usize];
    (b0, b1)
}

/// The A operand of the 16 rows from `row` and the d columns `16 kt ..` of the Q tile:
/// `ldmatrix.x4` of the matrices (rows 0-7 | 8-15) × (cols 0-7 | 8-15), in the A register
/// order.
#[cube]
fn load_a<F: Float>(
    q_s: &SharedMemory<F>,
    row: usize,
    #[comptime] kt: usize,
    #[comptime] cfg: MmaAttentionConfig,
) -> Regs<F> {
    let def = m16n8k16::<F>();
    let lane = UNIT_POS_X as usize;
    let r = row + lane % 8 + ((lane / 8) % 2) * 8;
    let start = r * comptime!(cfg.stride()) + comptime!(kt * 16) + (lane / 16) * 8;
    def.load_matrix::<F, Const<2>>(&q_s.slice(start, start + 8), MatrixIdent::A, 4usize, false)
}

/// Issues the asynchronous copies (`cp.async`, `N` elements each) of the K or V tile of keys
/// `tile_start ..` into `tile`; keys at or past `chunk_end` (the end of the keys the cube reads:
/// the block's `kv_end`, or its chunk's end under a KV split) are zero-filled (a zero-length
/// source) rather than read, so the unused capacity of a cache and the next chunk's keys are
/// never touched.
#[allow(clippy::too_many_arguments)]
#[cube]
fn stage_async<F: Float, N: Size>(
    src: &Array<Vector<F, N>>,
    tile: &mut SharedMemory<Vector<F, N>>,
    base: usize,
    row_stride: usize,
    tile_start: usize,
    chunk_end: usize,
    #[comptime] cfg: MmaAttentionConfig,
) {
    let nv = comptime!(cfg.nv());
    let vs = cfg.vector_size;
    let sv = comptime!(cfg.stride_v());
    let t = UNIT_POS as usize;
    #[unroll]
    for it in 0..comptime!(cfg.kv_load_iters()) {
        let e = t + it * comptime!(cfg.threads());
        if e < comptime!(cfg.block_k * cfg.nv()) {
            let c = e / nv;
            let dv = e % nv;
            let j = tile_start + c;
            let valid = j < chunk_end;
            let mut row = 0usize;
            let mut len = 0usize;
            if valid {
                row = j;
                len = 1usize;
            }
            let idx = (base + row * row_stride) / vs + dv;
            let dst = c * sv + dv;
            copy_async_checked(
                &src.slice(idx, idx + len),
                &mut tile.slice_mut(dst, dst + 1),
                comptime!(cfg.vector_size as u32),
            );
        }
    }
}

/// Tensor-core attention of a block of `16 · m_tiles · warps` rows of one KV head against the
/// keys `[chunk_start, chunk_end)` of that head (every key it may see unless the launch splits
/// the KV axis). Arguments and grid as [`fn@super::kernel::attention_kernel`], except that
/// `part_o` is written as scalars (same `[row][head_dim]` f32 layout); `CubeDim = (32, warps)`.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked, fast_math = FastMath::all())]
pub fn attention_mma_kernel<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    mask: &Array<u32>,
    out: &mut Array<Vector<F, N>>,
    part_o: &mut Array<f32>,
    part_ml: &mut Array<f32>,
    strides: QkvStrides,
    scale: f32,
    kv_len: u32,
    q_len: u32,
    group: u32,
    n_kv_heads: u32,
    chunk_len: u32,
    #[comptime] cfg: MmaAttentionConfig,
    #[define(F)] _dtype: StorageType,
) {
    let def = m16n8k16::<F>();
    let nv = comptime!(cfg.nv());
    let vs = cfg.vector_size;
    let bq = comptime!(cfg.block_q());
    let bk = cfg.block_k;
    let threads = comptime!(cfg.threads());
    let stride = comptime!(cfg.stride());
    let sv = comptime!(cfg.stride_v());
    // Vectors per 8-element (16-byte) `ldmatrix` row.
    let row_v = comptime!(8 / cfg.vector_size);
    let d_tiles = comptime!(cfg.head_dim / COLS);
    let k_tiles = comptime!(cfg.block_k / COLS);

    let lane = UNIT_POS_X as usize;
    let warp = UNIT_POS_Y as usize;
    let t = warp * PLANE + lane;
    // Causal row blocks differ in work (the last one sees every key, the first only the
    // prefix and its own tile): within each head the heavier blocks are launched first, so
    // that the last cubes of the launch are light ones (measured: +2%).
    let mut row_block = CUBE_POS_X as usize;
    if comptime!(cfg.causal && !cfg.tree) {
        let count = CUBE_COUNT_X as usize;
        row_block = count - row_block - 1;
    }
    let bh = CUBE_POS_Y as usize;
    let split = CUBE_POS_Z as usize;
    // Accumulator coordinates of this lane: rows `quad` and `quad + 8`, columns `2 pair ..`.
    let quad = lane / 4;
    let pair = lane % 4;
    // `ldmatrix` row this lane addresses: matrix `lane / 8`, row `lane % 8` of it.
    let ld_row = lane % 8;
    let ld_mat = lane / 8;

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

    // Q is staged as scalars: it is read once (by `ldmatrix`) and later holds the output rows,
    // which the lanes write two columns at a time.
    let mut q_s = SharedMemory::<F>::new_aligned(comptime!(bq * cfg.stride()), SHARED_ALIGN);
    let mut k_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(bk * sv), SHARED_ALIGN);
    let mut v_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(bk * sv), SHARED_ALIGN);

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
            #[unroll]
            for e in 0..vs {
                q_s[r * stride + dv * vs + e] = val[e];
            }
        }
    }
    sync_cube();

    // With one m tile per plane its Q operands stay in registers for the whole key loop
    // (`head_dim / 16` A operands: matrices (rows 0-7 | 8-15) × (cols 0-7 | 8-15) of each 16×16
    // tile, in the A register order); with more, they are reloaded from `q_s` per key tile,
    // which leaves the registers to the accumulators.
    let plane_row = warp * comptime!(ROWS * cfg.m_tiles);
    let mut q_frags = Sequence::<Regs<F>>::new();
    if comptime!(cfg.m_tiles == 1) {
        #[unroll]
        for kt in 0..comptime!(cfg.head_dim / 16) {
            q_frags.push(load_a::<F>(&q_s, plane_row, kt, cfg));
        }
    }

    // The output accumulator: one 16×8 tile per m tile and 8 head-dim columns, at
    // `mt * d_tiles + dt`.
    let mut o_acc = Sequence::<Regs<f32>>::new();
    #[unroll]
    for _ in 0..comptime!(cfg.m_tiles * d_tiles) {
        o_acc.push(zero_acc());
    }
    // Per row this lane holds (`2 mt + h`: rows `16 mt + quad + 8 h` of the plane): running
    // max, per-lane partial sum (the quad's sum at the end) and query index.
    let slots = comptime!(2 * cfg.m_tiles);
    let mut m_run = Array::<f32>::new(slots);
    let mut l_run = Array::<f32>::new(slots);
    let mut query = Array::<usize>::new(slots);
    #[unroll]
    for x in 0..slots {
        m_run[x] = f32::new(NEG);
        l_run[x] = 0.0f32;
        query[x] = (row0 + plane_row + comptime!((x / 2) * ROWS + (x % 2) * 8) + quad) / group;
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
    // Tiles ending at or before this key need no mask: it is the first position a new token
    // of the block may not see (the block's first query's own position + 1 under the causal
    // rule; the start of the new tokens for a tree).
    let mut unmasked_end = kv_end;
    if comptime!(cfg.tree) {
        unmasked_end = prefix;
    } else if comptime!(cfg.causal) {
        unmasked_end = prefix + row0 / group + 1;
    }
    // This cube's keys: chunk `split` of `chunk_len` keys under a KV split, else all of them.
    // A causal row block's `kv_end` may fall before its later chunks start: such a chunk has no
    // keys (`chunk_end <= chunk_start`, the loop does not run) and still writes its rows
    // (`m = NEG, l = 0, o = 0`: the scratch buffer is not zeroed), which the combine weighs by
    // `exp(NEG - M) = 0` (a row no chunk shows a key gets zeros, as without a split).
    // `chunk_len` is a multiple of the `wmma` plan's key tile, not necessarily of `block_k`, so
    // a tile may cross the chunk's end: it is zero-filled and masked from there, like the tile
    // that crosses `kv_end`.
    let mut chunk_start = 0usize;
    let mut chunk_end = kv_end;
    if comptime!(cfg.partial) {
        chunk_start = split * chunk_len;
        if chunk_start + chunk_len < kv_end {
            chunk_end = chunk_start + chunk_len;
        }
        if chunk_end < unmasked_end {
            unmasked_end = chunk_end;
        }
    }

    let k_base = batch * strides.k_batch as usize + kv_head * strides.k_head as usize;
    let v_base = batch * strides.v_batch as usize + kv_head * strides.v_head as usize;
    let k_row_stride = strides.k_row as usize;
    let v_row_stride = strides.v_row as usize;

    // Software pipeline (as FlashAttention-2): V of this tile is copied while the scores are
    // computed, K of the next tile while `P V` runs. `arrive_and_wait` on a barrier waits for
    // this unit's committed copies and for every unit, so it also orders the reads of the
    // previous contents before the next copy into the same tile.
    let bar_k = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar_v = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    stage_async::<F, N>(
        k,
        &mut k_s,
        k_base,
        k_row_stride,
        chunk_start,
        chunk_end,
        cfg,
    );
    bar_k.commit_copy_async();
    bar_k.arrive_and_wait();

    let mut tile_start = chunk_start;
    while tile_start < chunk_end {
        stage_async::<F, N>(
            v,
            &mut v_s,
            v_base,
            v_row_stride,
            tile_start,
            chunk_end,
            cfg,
        );
        bar_v.commit_copy_async();

        // (2) S = Q Kᵀ in registers, at `mt * k_tiles + nt`. K is stored [key][d], which is
        // Kᵀ as a column-major B: `ldmatrix` (no transpose) of keys `8 nt ..` × d columns
        // `32 kt2 + 8 ld_mat ..` gives the two B registers of d tiles `2 kt2` and `2 kt2 + 1`,
        // each used by every m tile.
        let mut s_acc = Sequence::<Regs<f32>>::new();
        #[unroll]
        for _ in 0..comptime!(cfg.m_tiles * k_tiles) {
            s_acc.push(zero_acc());
        }
        #[unroll]
        for kt2 in 0..comptime!(cfg.head_dim / 32) {
            // A operands of d tiles `2 kt2 + half` for each m tile, at `2 mt + half`.
            let mut a = Sequence::<Regs<F>>::new();
            if comptime!(cfg.m_tiles > 1) {
                #[unroll]
                for mt in 0..comptime!(cfg.m_tiles) {
                    #[unroll]
                    for half in 0..2usize {
                        let kt = comptime!(2 * kt2 + half);
                        a.push(load_a::<F>(&q_s, plane_row + comptime!(mt * ROWS), kt, cfg));
                    }
                }
            }
            #[unroll]
            for nt in 0..k_tiles {
                let start = (comptime!(nt * COLS) + ld_row) * sv
                    + comptime!(kt2 * 32 / cfg.vector_size)
                    + ld_mat * row_v;
                let (b0, b1) = load_b::<F, N>(&k_s, start, false, cfg);
                #[unroll]
                for mt in 0..comptime!(cfg.m_tiles) {
                    let acc = s_acc.index_mut(comptime!(mt * k_tiles + nt));
                    if comptime!(cfg.m_tiles == 1) {
                        def.execute_inplace(q_frags.index(comptime!(2 * kt2)), &b0, acc);
                        def.execute_inplace(q_frags.index(comptime!(2 * kt2 + 1)), &b1, acc);
                    } else {
                        def.execute_inplace(a.index(comptime!(2 * mt)), &b0, acc);
                        def.execute_inplace(a.index(comptime!(2 * mt + 1)), &b1, acc);
                    }
                }
            }
        }

        // (3) Online softmax on the registers: scale, mask, the quad's row max, rescale.
        let masked = tile_start + bk > unmasked_end;
        let mut m_tile = Array::<f32>::new(slots);
        #[unroll]
        for x in 0..slots {
            m_tile[x] = f32::new(NEG);
        }
        #[unroll]
        for mt in 0..comptime!(cfg.m_tiles) {
            #[unroll]
            for nt in 0..k_tiles {
                let acc = s_acc.index_mut(comptime!(mt * k_tiles + nt));
                #[unroll]
                for h in 0..2usize {
                    let x = comptime!(2 * mt + h);
                    let mut s = acc[h] * Vector::new(scale);
                    if masked {
                        #[unroll]
                        for e in 0..2usize {
                            let j = tile_start + comptime!(nt * COLS) + 2 * pair + e;
                            if !visible(
                                mask, j, query[x], chunk_end, prefix, q_len, cfg.causal, cfg.tree,
                            ) {
                                s[e] = f32::new(NEG);
                            }
                        }
                    }
                    acc[h] = s;
                    m_tile[x] = f32::max(m_tile[x], f32::max(s[0usize], s[1usize]));
                }
            }
        }
        let mut alpha = Array::<f32>::new(slots);
        #[unroll]
        for x in 0..slots {
            let mut m = m_tile[x];
            m = f32::max(m, plane_shuffle_xor(m, 1u32));
            m = f32::max(m, plane_shuffle_xor(m, 2u32));
            let m_new = f32::max(m_run[x], m);
            alpha[x] = f32::exp(m_run[x] - m_new);
            m_run[x] = m_new;
        }
        #[unroll]
        for mt in 0..comptime!(cfg.m_tiles) {
            #[unroll]
            for dt in 0..d_tiles {
                let acc = o_acc.index_mut(comptime!(mt * d_tiles + dt));
                acc[0usize] *= Vector::new(alpha[comptime!(2 * mt)]);
                acc[1usize] *= Vector::new(alpha[comptime!(2 * mt + 1)]);
            }
        }

        // (4) P = exp(S - m), rounded to the input dtype, as the A operands of `P V` (at
        // `mt * k_steps + kk`): the accumulators of score tiles `2 kk` and `2 kk + 1` (rows
        // quad / quad + 8 of each) are the A registers of keys `16 kk ..`. The sum adds the
        // rounded values the matrix units use.
        let k_steps = comptime!(cfg.block_k / 16);
        let mut l_tile = Array::<f32>::new(slots);
        #[unroll]
        for x in 0..slots {
            l_tile[x] = 0.0f32;
        }
        let mut p_frags = Sequence::<Regs<F>>::new();
        #[unroll]
        for mt in 0..comptime!(cfg.m_tiles) {
            #[unroll]
            for kk in 0..k_steps {
                let mut a = Array::<Vector<F, Const<2>>>::new(4usize);
                #[unroll]
                for half in 0..2usize {
                    let acc = s_acc.index(comptime!(mt * k_tiles + 2 * kk + half));
                    #[unroll]
                    for h in 0..2usize {
                        let x = comptime!(2 * mt + h);
                        let s = acc[h];
                        let mut p = Vector::<f32, Const<2>>::new(0.0f32);
                        #[unroll]
                        for e in 0..2usize {
                            if s[e] > NEG_THRESHOLD {
                                p[e] = f32::exp(s[e] - m_run[x]);
                            }
                        }
                        let packed = Vector::<F, Const<2>>::cast_from(p);
                        let rounded = Vector::<f32, Const<2>>::cast_from(packed);
                        l_tile[x] += rounded[0usize] + rounded[1usize];
                        a[comptime!(2 * half + h)] = packed;
                    }
                }
                p_frags.push(a);
            }
        }
        #[unroll]
        for x in 0..slots {
            l_run[x] = l_run[x] * alpha[x] + l_tile[x];
        }

        bar_v.arrive_and_wait();
        let next = tile_start + bk;
        if next < chunk_end {
            stage_async::<F, N>(k, &mut k_s, k_base, k_row_stride, next, chunk_end, cfg);
            bar_k.commit_copy_async();
        }

        // (5) O += P V. V is read with `ldmatrix.trans`: keys `16 kk + 8 (ld_mat % 2) ..` ×
        // d columns `16 dt2 + 8 (ld_mat / 2) ..` give the B registers of d tiles `2 dt2` and
        // `2 dt2 + 1`, each used by every m tile.
        #[unroll]
        for kk in 0..k_steps {
            #[unroll]
            for dt2 in 0..comptime!(cfg.head_dim / 16) {
                let start = (comptime!(kk * 16) + ld_row + (ld_mat % 2) * 8) * sv
                    + comptime!(dt2 * 16 / cfg.vector_size)
                    + (ld_mat / 2) * row_v;
                let (b0, b1) = load_b::<F, N>(&v_s, start, true, cfg);
                #[unroll]
                for mt in 0..comptime!(cfg.m_tiles) {
                    let a = p_frags.index(comptime!(mt * k_steps + kk));
                    def.execute_inplace(a, &b0, o_acc.index_mut(comptime!(mt * d_tiles + 2 * dt2)));
                    def.execute_inplace(
                        a,
                        &b1,
                        o_acc.index_mut(comptime!(mt * d_tiles + 2 * dt2 + 1)),
                    );
                }
            }
        }
        if next < chunk_end {
            bar_k.arrive_and_wait();
        }
        tile_start = next;
    }

    if comptime!(cfg.partial) {
        // The chunk's unnormalised rows for the combine, straight from the registers: each lane
        // writes its two columns per 8 of its rows (`part_o` is `[prow][head_dim]` f32, read as
        // vectors by the combine), and the quad's first lane the row's `(m, l)`: `m_run` is
        // already the quad's max of the scaled scores and `P = exp(s - m_run)`, the units the
        // combine weighs by `exp(m - M)`; `l_run` is this lane's share of the sum. The
        // shuffles run on every lane, before any branch on the row.
        let hd = cfg.head_dim;
        #[unroll]
        for x in 0..slots {
            let mut l = l_run[x];
            l += plane_shuffle_xor(l, 1u32);
            l += plane_shuffle_xor(l, 2u32);
            let rho = row0 + plane_row + comptime!((x / 2) * ROWS + (x % 2) * 8) + quad;
            if rho < rows {
                let prow = (split * CUBE_COUNT_Y as usize + bh) * rows + rho;
                #[unroll]
                for dt in 0..d_tiles {
                    let o = o_acc.index(comptime!((x / 2) * d_tiles + dt))[comptime!(x % 2)];
                    let at = prow * hd + comptime!(dt * COLS) + 2 * pair;
                    part_o[at] = o[0usize];
                    part_o[at + 1] = o[1usize];
                }
                if pair == 0 {
                    part_ml[prow * 2] = m_run[x];
                    part_ml[prow * 2 + 1] = l;
                }
            }
        }
    } else {
        // Row sums over the quad; a row that sees no key at all gets zeros rather than NaN.
        // Then the rows go through this plane's rows of the Q tile: each lane holds two columns of
        // a row per 8, so rows are assembled in shared memory and written as whole vectors.
        #[unroll]
        for x in 0..slots {
            let mut l = l_run[x];
            l += plane_shuffle_xor(l, 1u32);
            l += plane_shuffle_xor(l, 2u32);
            let inv = if l > 0.0f32 {
                1.0f32 / l
            } else {
                f32::new(0.0)
            };
            let r = plane_row + comptime!((x / 2) * ROWS + (x % 2) * 8) + quad;
            #[unroll]
            for dt in 0..d_tiles {
                let o = o_acc.index(comptime!((x / 2) * d_tiles + dt))[comptime!(x % 2)]
                    * Vector::new(inv);
                let col = comptime!(dt * COLS) + 2 * pair;
                q_s[r * stride + col] = F::cast_from(o[0usize]);
                q_s[r * stride + col + 1] = F::cast_from(o[1usize]);
            }
        }
        sync_cube();
        #[unroll]
        for it in 0..comptime!(cfg.q_load_iters()) {
            let e = t + it * threads;
            if e < bq * nv {
                let r = e / nv;
                let dv = e % nv;
                let rho = row0 + r;
                if rho < rows {
                    let head = kv_head * group + rho % group;
                    let n_heads = n_kv_heads * group;
                    let orow = (batch * q_len + rho / group) * n_heads + head;
                    let mut val = Vector::<F, N>::empty();
                    #[unroll]
                    for x in 0..vs {
                        val[x] = q_s[r * stride + dv * vs + x];
                    }
                    out[orow * nv + dv] = val;
                }
            }
        }
    }
}
