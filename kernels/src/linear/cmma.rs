//! Tensor-core (`cmma`) variant of the skinny linear layer, for f16/bf16 products of 9 to 64
//! rows (a Medusa tree step).
//!
//! Same contract as [`fn@super::kernel::linear_kernel`] (`y = x · W (+ b)`, `W: [k, n]` row-major,
//! f32 accumulation, the same f32 partial-sum layout for a K split and the same
//! [`fn@super::kernel::split_reduce_kernel`] to finish it). With `m` rows a product does `2·m`
//! flops per weight element: at 64 rows that is more than the units' f32 FMAs can issue while
//! the weights stream at the memory's rate, so the products go to the matrix units through
//! CubeCL's cooperative-matrix API (`nvcuda::wmma` on CUDA, 16×16×16 fragments).
//!
//! # Layout
//! A cube is `warps` planes of 32 units (`CubeDim = (32, warps)`) covering a tile of
//! `NT = 16 · col_frags · warps` output columns; plane `p` owns `col_frags` column fragments
//! for all `row_frags` fragments of 16 rows of `x` (`row_frags · col_frags` f32 accumulators).
//! Grid: `x` = column tile, `y` = K split. The cube walks its K range in stages of `block_k`
//! rows, software-pipelined through registers:
//!
//! 1. every unit holds its share of the next `depth` stages, `W[stage, tile]` and
//!    `x[0..m, stage]`, as 16-byte vectors in `depth` register slots (coalesced: consecutive
//!    units read consecutive vectors of a row);
//! 2. `sync_cube`, the oldest slot goes to shared memory (zeros past `m`, `n` and the range),
//!    `sync_cube`;
//! 3. the units issue the loads of the stage `depth` ahead into that slot (they stay in flight
//!    during step 4 and the stages before it);
//! 4. each plane multiplies its fragments: per 16 K-rows, `row_frags` `x` fragments and
//!    `col_frags` weight fragments from shared memory into the accumulators.
//!
//! With `swiglu_input` the product's input is SwiGLU of a fused gate/up product, computed as
//! each unit loads its share of a stage (step 1) with the same rounding as the SwiGLU pass it
//! replaces ([`fn@crate::linear::kernel::linear_kernel`] does the same for the SIMT kernel).
//!
//! At the end each accumulator goes through a per-plane 16×16 f32 buffer in shared memory to
//! global memory (rows past `m` are dropped; with a K split as f32 partial sums, otherwise with
//! the bias added, cast to the input dtype).
//!
//! # Alignment
//! `wmma::load_matrix_sync` needs 256-bit aligned pointers and a leading dimension that is a
//! multiple of 16 bytes. Shared rows are padded by 16 bytes (`+8` elements, which also
//! staggers them across banks) and every shared array is 128-byte aligned; fragments start at
//! rows that are multiples of 16 and columns that are multiples of 16 elements, so at multiples
//! of 32 bytes. The host takes `n`, `k`, the row strides and the element offsets of `x` and `W`
//! in multiples of 16 elements (`x` is copied otherwise), so the 16-byte vectors never straddle
//! a row, a stage or a K split.

// `#[cube]` generates a launch module, struct and functions for each kernel, without docs and
// deaf to attributes on the kernel function; the kernel's own doc comment is on its function.
#![allow(missing_docs)]

use cubecl::{cmma, prelude::*};

use crate::fused::kernel::{SplitSumConfig, silu_mul, split_sum};

// Fragment size (16×16×16) and plane width: those of the attention kernel's `cmma` path.
pub(crate) use crate::cube::cmma::{FRAG, PLANE};
/// Byte alignment of every shared array (wmma needs 32).
const SHARED_ALIGN: usize = 128;

/// Compile-time shape of one launch of [`fn@linear_cmma_kernel`]. Chosen on the host by
/// [`super::launch::plan_cmma`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinearCmmaConfig {
    /// Elements per 16-byte vector (8 for f16/bf16).
    pub vector_size: usize,
    /// Planes per cube.
    pub warps: usize,
    /// Column fragments (16 columns) per plane.
    pub col_frags: usize,
    /// Row fragments (16 rows of `x`): `ceil(m / 16)`.
    pub row_frags: usize,
    /// K rows per stage (a multiple of 16).
    pub block_k: usize,
    /// Stages whose loads are in flight at once (register slots per unit).
    pub depth: usize,
    /// Add a bias (only when the kernel writes the final output).
    pub bias: bool,
    /// Write f32 partial sums for the reduction kernel instead of the output (K split).
    pub partial: bool,
    /// The input is SwiGLU of a fused gate/up product `g | u` (`2k` columns): finished
    /// (`splits == 0`, read from `x`) or as its K split's f32 partial sums (`x_partial`), see
    /// [`fn@linear_cmma_kernel`].
    pub swiglu_input: Option<SplitSumConfig>,
}

impl LinearCmmaConfig {
    /// Units per cube.
    pub fn threads(&self) -> usize {
        PLANE * self.warps
    }
    /// Columns of the output a cube covers (`NT`).
    pub fn cols_per_cube(&self) -> usize {
        FRAG * self.col_frags * self.warps
    }
    /// Rows of `x` covered (a multiple of 16).
    pub fn rows_padded(&self) -> usize {
        FRAG * self.row_frags
    }
    /// Row stride of the staged weights, in elements (`NT` + 16 bytes).
    pub fn w_stride(&self) -> usize {
        self.cols_per_cube() + 8
    }
    /// Row stride of the staged `x`, in elements (`block_k` + 16 bytes).
    pub fn x_stride(&self) -> usize {
        self.block_k + 8
    }
    /// Weight vectors of a stage per unit.
    pub fn w_loads(&self) -> usize {
        (self.block_k * self.cols_per_cube() / self.vector_size).div_ceil(self.threads())
    }
    /// `x` vectors of a stage per unit.
    pub fn x_loads(&self) -> usize {
        (self.rows_padded() * self.block_k / self.vector_size).div_ceil(self.threads())
    }
    /// Shared memory of one cube, in bytes (before the allocator's alignment padding).
    pub fn shared_bytes(&self, elem_size: usize) -> usize {
        elem_size * (self.block_k * self.w_stride() + self.rows_padded() * self.x_stride())
            + 4 * self.warps * FRAG * FRAG
    }
}

/// `y[r, c] = Σ_k x[r, k] · w[k, c] (+ bias[c])` for `r < m`, over the K rows
/// `[split * k_chunk, min((split + 1) * k_chunk, k))`, on the matrix units. See [`self`] for
/// the layout. `n`, `k`, `k_chunk`, `x_row` and `w_row` are multiples of 16 (the last two in
/// elements; both arrays start 32-byte aligned).
///
/// With `cfg.swiglu_input` the input is `x[r, c] = silu(g[r, c]) · u[r, c + k]` of a gate/up
/// product with `2k` columns: read from `x` (row stride `x_row`) when it is finished, else
/// added up from its partial sums `x_partial[split][r][·]` (split stride `x_split_stride`,
/// plus `x_bias`) in the order of its reduction pass, each rounded to `F` first -- the bits
/// of the SwiGLU launch this replaces.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn linear_cmma_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    x_partial: &Array<f32>,
    x_bias: &Array<F>,
    w: &Array<Vector<F, N>>,
    bias: &Array<F>,
    out: &mut Array<F>,
    partial: &mut Array<f32>,
    x_row: u32,
    w_row: u32,
    m: u32,
    k: u32,
    n_cols: u32,
    k_chunk: u32,
    x_split_stride: u32,
    #[comptime] cfg: LinearCmmaConfig,
    #[define(F)] _dtype: StorageType,
) {
    let lane = UNIT_POS_X as usize;
    let warp = UNIT_POS_Y as usize;
    let t = warp * PLANE + lane;
    let threads = comptime!(cfg.threads());
    let v = cfg.vector_size;
    let bk = cfg.block_k;
    let nt = comptime!(cfg.cols_per_cube());
    let ws = comptime!(cfg.w_stride());
    let xs = comptime!(cfg.x_stride());
    let mp = comptime!(cfg.rows_padded());
    let nt_v = comptime!(cfg.cols_per_cube() / cfg.vector_size);
    let bk_v = comptime!(cfg.block_k / cfg.vector_size);
    let ws_v = comptime!(cfg.w_stride() / cfg.vector_size);
    let xs_v = comptime!(cfg.x_stride() / cfg.vector_size);
    let nf = cfg.col_frags;
    let mf = cfg.row_frags;

    let m = m as usize;
    let k = k as usize;
    let n = n_cols as usize;
    let k_chunk = k_chunk as usize;
    let w_row_v = w_row as usize / v;
    let x_row_v = x_row as usize / v;
    let n_v = n / v;

    let split = CUBE_POS_Y as usize;
    let tile_col = CUBE_POS_X as usize * nt;
    let tile_col_v = CUBE_POS_X as usize * nt_v;
    let col0 = tile_col + warp * comptime!(FRAG * cfg.col_frags);
    let k_start = split * k_chunk;
    let k_end = if k_start + k_chunk < k {
        k_start + k_chunk
    } else {
        k
    };

    let mut w_s = SharedMemory::<Vector<F, N>>::new_aligned(
        comptime!(cfg.block_k * cfg.w_stride() / cfg.vector_size),
        SHARED_ALIGN,
    );
    let mut x_s = SharedMemory::<Vector<F, N>>::new_aligned(
        comptime!(cfg.rows_padded() * cfg.x_stride() / cfg.vector_size),
        SHARED_ALIGN,
    );
    let mut o_s =
        SharedMemory::<f32>::new_aligned(comptime!(cfg.warps * FRAG * FRAG), SHARED_ALIGN);

    let mut accs = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..comptime!(cfg.row_frags * cfg.col_frags) {
        let acc = unsafe {
            cmma::Matrix::<f32>::uninitialized(
                cmma::MatrixIdent::Accumulator,
                FRAG,
                FRAG,
                FRAG,
                cmma::MatrixLayout::Undefined,
            )
        };
        cmma::fill(&acc, 0.0f32);
        accs.push(acc);
    }
    let mut w_frags = Sequence::<cmma::Matrix<F>>::new();
    #[unroll]
    for _ in 0..cfg.col_frags {
        w_frags.push(unsafe {
            cmma::Matrix::<F>::uninitialized(
                cmma::MatrixIdent::B,
                FRAG,
                FRAG,
                FRAG,
                cmma::MatrixLayout::RowMajor,
            )
        });
    }
    let x_frag = unsafe {
        cmma::Matrix::<F>::uninitialized(
            cmma::MatrixIdent::A,
            FRAG,
            FRAG,
            FRAG,
            cmma::MatrixLayout::RowMajor,
        )
    };

    // `depth` stages of registers, slot `d` holding vectors `d * loads ..+ loads`.
    let mut w_reg = Array::<Vector<F, N>>::new(comptime!(cfg.depth * cfg.w_loads()));
    let mut x_reg = Array::<Vector<F, N>>::new(comptime!(cfg.depth * cfg.x_loads()));

    // (1) The first `depth` stages into registers.
    #[unroll]
    for d in 0..cfg.depth {
        let ahead = k_start + d * bk;
        if ahead < k_end {
            load_stage::<F, N>(
                x,
                x_partial,
                x_bias,
                w,
                &mut x_reg,
                &mut w_reg,
                ahead,
                k_end,
                t,
                m,
                k,
                n_v,
                x_row_v,
                x_split_stride as usize,
                w_row_v,
                tile_col_v,
                cfg,
                d,
            );
        }
    }

    let mut stage = k_start;
    while stage < k_end {
        // One pass over the register slots (comptime indices keep them in registers).
        #[unroll]
        for d in 0..cfg.depth {
            if stage < k_end {
                let stage_end = if stage + bk < k_end {
                    stage + bk
                } else {
                    k_end
                };
                let stage_len = stage_end - stage;

                // (2) Slot `d` to shared memory (element `e` of a unit's share is vector
                // `t + e * threads` of the stage).
                sync_cube();
                #[unroll]
                for e in 0..comptime!(cfg.w_loads()) {
                    let i = t + e * threads;
                    if i < comptime!(cfg.block_k * nt_v) {
                        w_s[(i / nt_v) * ws_v + i % nt_v] = w_reg[comptime!(d * cfg.w_loads() + e)];
                    }
                }
                #[unroll]
                for e in 0..comptime!(cfg.x_loads()) {
                    let i = t + e * threads;
                    if i < comptime!(mp * bk_v) {
                        x_s[(i / bk_v) * xs_v + i % bk_v] = x_reg[comptime!(d * cfg.x_loads() + e)];
                    }
                }
                sync_cube();

                // (3) The loads `depth` stages ahead into the freed slot, in flight while
                // this stage is multiplied.
                let ahead = stage + comptime!(cfg.depth * cfg.block_k);
                if ahead < k_end {
                    load_stage::<F, N>(
                        x,
                        x_partial,
                        x_bias,
                        w,
                        &mut x_reg,
                        &mut w_reg,
                        ahead,
                        k_end,
                        t,
                        m,
                        k,
                        n_v,
                        x_row_v,
                        x_split_stride as usize,
                        w_row_v,
                        tile_col_v,
                        cfg,
                        d,
                    );
                }

                // (4) This stage on the matrix units (`stage_len` is a multiple of 16).
                let steps = stage_len / FRAG;
                for step in 0..steps {
                    let kk = step * FRAG;
                    #[unroll]
                    for f in 0..nf {
                        let start = comptime!(FRAG / cfg.vector_size) * (warp * nf + f) + kk * ws_v;
                        cmma::load(
                            w_frags.index(f),
                            &w_s.slice(start, comptime!(cfg.block_k * ws_v)),
                            ws as u32,
                        );
                    }
                    #[unroll]
                    for i in 0..mf {
                        let start = comptime!(i * FRAG * xs_v) + kk / v;
                        cmma::load(&x_frag, &x_s.slice(start, comptime!(mp * xs_v)), xs as u32);
                        #[unroll]
                        for f in 0..nf {
                            let acc = accs.index(comptime!(i * cfg.col_frags + f));
                            cmma::execute::<F, F, f32, f32>(&x_frag, w_frags.index(f), acc, acc);
                        }
                    }
                }
                stage = stage_end;
            }
        }
    }

    // Write each accumulator through this plane's 16×16 buffer: unit `lane` takes row
    // `lane / 2`, columns `(lane % 2) · 8 ..+ 8`.
    let buf = warp * comptime!(FRAG * FRAG);
    let rr = lane / 2;
    let cc = (lane % 2) * 8;
    #[unroll]
    for i in 0..mf {
        #[unroll]
        for f in 0..nf {
            let c0 = col0 + f * FRAG;
            if c0 < n {
                cmma::store(
                    &mut o_s.slice_mut(buf, buf + comptime!(FRAG * FRAG)),
                    accs.index(comptime!(i * cfg.col_frags + f)),
                    FRAG as u32,
                    cmma::MatrixLayout::RowMajor,
                );
                sync_plane();
                let r = comptime!(i * FRAG) + rr;
                if r < m {
                    #[unroll]
                    for j in 0..8 {
                        let col = c0 + cc + j;
                        let val = o_s[buf + rr * FRAG + cc + j];
                        if comptime!(cfg.partial) {
                            partial[(split * m + r) * n + col] = val;
                        } else {
                            let mut val = val;
                            if comptime!(cfg.bias) {
                                val += f32::cast_from(bias[col]);
                            }
                            out[r * n + col] = F::cast_from(val);
                        }
                    }
                }
                sync_plane();
            }
        }
    }
}

/// Loads this unit's share of the stage starting at K row `stage` into register slot `slot`: weight
/// vectors `t + e * threads` of the `block_k × NT` tile and `x` vectors of the
/// `rows_padded × block_k` tile, zeros past `k_end`, `m` and `n`.
#[allow(clippy::too_many_arguments)]
#[cube]
fn load_stage<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    x_partial: &Array<f32>,
    x_bias: &Array<F>,
    w: &Array<Vector<F, N>>,
    x_reg: &mut Array<Vector<F, N>>,
    w_reg: &mut Array<Vector<F, N>>,
    stage: usize,
    k_end: usize,
    t: usize,
    m: usize,
    k: usize,
    n_v: usize,
    x_row_v: usize,
    x_split_stride: usize,
    w_row_v: usize,
    tile_col_v: usize,
    #[comptime] cfg: LinearCmmaConfig,
    #[comptime] slot: usize,
) {
    let threads = comptime!(cfg.threads());
    let nt_v = comptime!(cfg.cols_per_cube() / cfg.vector_size);
    let bk_v = comptime!(cfg.block_k / cfg.vector_size);
    let v = cfg.vector_size;
    #[unroll]
    for e in 0..comptime!(cfg.w_loads()) {
        let i = t + e * threads;
        let row = stage + i / nt_v;
        let col_v = tile_col_v + i % nt_v;
        let mut val = Vector::<F, N>::new(F::new(0.0));
        if i < comptime!(cfg.block_k * nt_v) && row < k_end && col_v < n_v {
            val = w[row * w_row_v + col_v];
        }
        w_reg[comptime!(slot * cfg.w_loads() + e)] = val;
    }
    #[unroll]
    for e in 0..comptime!(cfg.x_loads()) {
        let i = t + e * threads;
        let r = i / bk_v;
        let kv = i % bk_v;
        let mut val = Vector::<F, N>::new(F::new(0.0));
        if r < m && stage + kv * v < k_end {
            match comptime!(cfg.swiglu_input) {
                None => {
                    val = x[r * x_row_v + stage / v + kv];
                }
                Some(sums) => {
                    // `x` as SwiGLU of the gate/up product's columns `c..c + v` and
                    // `c + k..c + k + v` (`k` is a multiple of 16: whole vectors).
                    let c = stage + kv * v;
                    if comptime!(sums.splits == 0) {
                        let g = x[r * x_row_v + c / v];
                        let u = x[r * x_row_v + (c + k) / v];
                        #[unroll]
                        for j in 0..v {
                            val[j] = silu_mul::<F>(f32::cast_from(g[j]), f32::cast_from(u[j]));
                        }
                    } else {
                        let at = r * 2 * k + c;
                        #[unroll]
                        for j in 0..v {
                            let g = split_sum::<F>(
                                x_partial,
                                x_bias,
                                at + j,
                                c + j,
                                x_split_stride,
                                sums,
                            );
                            let u = split_sum::<F>(
                                x_partial,
                                x_bias,
                                at + k + j,
                                c + k + j,
                                x_split_stride,
                                sums,
                            );
                            val[j] = silu_mul::<F>(f32::cast_from(g), f32::cast_from(u));
                        }
                    }
                }
            }
        }
        x_reg[comptime!(slot * cfg.x_loads() + e)] = val;
    }
}
