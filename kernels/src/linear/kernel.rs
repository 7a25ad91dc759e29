//! The CubeCL kernels of the skinny linear layer: the main (split-K) kernel and the small kernel
//! that sums the partial results of a K split.
//!
//! See [`super`] for the design; [`LinearConfig`] for what is decided at compile time.

// `#[cube]` generates a launch module, struct and functions for each kernel, without docs and
// deaf to attributes on the kernel function; the kernel's own doc comment is on its function.
#![allow(missing_docs)]

use cubecl::prelude::*;

use crate::fused::kernel::{SplitSumConfig, silu_mul, split_sum};

/// Compile-time shape of one launch of [`fn@linear_kernel`]. Chosen on the host by
/// [`super::launch::plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinearConfig {
    /// Elements per vector (`V`): each thread owns `V` consecutive output columns and reads its
    /// part of a weight row with one `V`-wide load (16 bytes where possible).
    pub vector_size: usize,
    /// Threads along the output columns (`TX`): a cube covers `TX * V` columns.
    pub lanes: usize,
    /// Groups of threads that split the `m` rows of `x` (`RG`): the same weight vectors are
    /// loaded by every row group (L1 serves the repeats).
    pub row_groups: usize,
    /// Rows of `x` per thread (`RM`): every loaded weight vector is multiplied into `RM`
    /// accumulators held in registers.
    pub rows_per_thread: usize,
    /// Groups of threads that split the cube's K range (`KG`), interleaved row by row and summed
    /// through shared memory at the end.
    pub k_groups: usize,
    /// Independent weight loads a thread issues before using them (`U`).
    pub unroll: usize,
    /// Rows of `x` staged in shared memory at a time (`BK`, a multiple of `KG * U`).
    pub block_k: usize,
    /// Add a bias (only when the kernel writes the final output).
    pub bias: bool,
    /// Write f32 partial sums for [`fn@split_reduce_kernel`] instead of the output (K split).
    pub partial: bool,
    /// `x` is SwiGLU of a fused gate/up product, computed while staging (see
    /// [`fn@linear_kernel`]): `None` for a plain `x`; `splits == 0` when that product is finished
    /// (`x` holds it, `[m, 2k]`), else the shape of its K split's partial sums.
    pub swiglu_input: Option<SplitSumConfig>,
}

impl LinearConfig {
    /// Threads per cube: `TX * RG * KG`.
    pub fn threads(&self) -> usize {
        self.lanes * self.row_groups * self.k_groups
    }
    /// Rows of `x` covered by a cube (`RG * RM >= m`).
    pub fn rows_padded(&self) -> usize {
        self.row_groups * self.rows_per_thread
    }
    /// Stride between consecutive K rows of the staged `x` tile: `rows_padded`, made odd so that
    /// the staging stores (consecutive threads, consecutive K rows) hit distinct banks.
    pub fn x_stride(&self) -> usize {
        let mp = self.rows_padded();
        if mp.is_multiple_of(2) { mp + 1 } else { mp }
    }
    /// Weight rows one cube consumes per step of the inner loop: `KG * U`.
    pub fn k_step(&self) -> usize {
        self.k_groups * self.unroll
    }
    /// Staging iterations per thread for a `BK x rows_padded` tile of `x`.
    pub fn x_load_iters(&self) -> usize {
        (self.block_k * self.rows_padded()).div_ceil(self.threads())
    }
    /// Shared memory of one cube, in bytes: the staged `x` tile (f32) plus the buffer of the
    /// k-group reduction.
    pub fn shared_bytes(&self) -> usize {
        let x = 4 * self.block_k * self.x_stride();
        let red = if self.k_groups > 1 {
            4 * self.threads() * self.vector_size
        } else {
            0
        };
        x + red
    }
}

/// Compile-time shape of one launch of [`fn@split_reduce_kernel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReduceConfig {
    /// Output vectors per cube.
    pub lanes: usize,
    /// Threads per output vector, each summing every `split_lanes`-th split.
    pub split_lanes: usize,
    /// Partial vectors loaded per thread (`ceil(splits / split_lanes)`).
    pub loads: usize,
    /// Add a bias.
    pub bias: bool,
    /// Finish with SwiGLU over the two column halves (a fused gate/up projection): see
    /// [`fn@split_reduce_kernel`].
    pub swiglu: bool,
}

/// `y[r, c] = Σ_k x[r, k] · w[k, c] (+ bias[c])` for `r < m`, over the K rows
/// `[split * k_chunk, min((split + 1) * k_chunk, k))`.
///
/// Grid: `x` = column tile of `TX * V` columns, `y` = K split, `z` = block of `RG * RM` rows of
/// `x` (one unless the host splits the rows across cubes). Thread `t` of the cube is
/// `(lane, row group, k group) = (t % TX, t / TX % RG, t / (TX * RG))`; it owns the output
/// vector `col = tile * TX + lane` for the rows `rg * RM .. rg * RM + RM`, and the weight rows
/// `tile_start + kg + KG * j` of every tile; the `KG` partial sums of a column are added by a
/// shared-memory tree at the end. Weights go straight from global memory to registers
/// (`U` independent `V`-wide loads in flight per thread, consecutive lanes reading consecutive
/// vectors of a row); `x` is staged per tile of `BK` rows in shared memory as f32, laid out
/// `[k][row]` so a plane reads one broadcast address. Accumulation is f32.
///
/// With `cfg.partial` the f32 sums go to `partial[split][r][col]` and [`fn@split_reduce_kernel`]
/// finishes; otherwise the bias is added and the result cast to `F`.
///
/// With `cfg.swiglu_input` the product's input is SwiGLU of a fused gate/up product `g | u`
/// (`2k` columns), computed as the tile is staged: `x[r, c] = silu(g[r, c]) · u[r, c + k]`
/// rounded as [`fn@crate::fused::kernel::swiglu_kernel`] rounds, from the finished product (in
/// `x`, read through its strides) or from its K split's partial sums (`x_partial`,
/// `[splits][m][2k]`, plus `x_bias`, added in the order of that split's own reduction pass):
/// the same bits as SwiGLU's launch, which this saves (a down projection's cubes each stage
/// their K chunk, so every value is computed once per column tile).
#[allow(clippy::too_many_arguments, clippy::manual_div_ceil)]
#[cube(launch_unchecked)]
pub fn linear_kernel<F: Float, N: Size>(
    x: &Array<F>,
    x_partial: &Array<f32>,
    x_bias: &Array<F>,
    w: &Array<Vector<F, N>>,
    bias: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    partial: &mut Array<Vector<f32, N>>,
    x_row_stride: u32,
    x_col_stride: u32,
    w_row_vectors: u32,
    m: u32,
    k: u32,
    n_vec: u32,
    k_chunk: u32,
    x_split_stride: u32,
    #[comptime] cfg: LinearConfig,
    #[define(F)] _dtype: StorageType,
) {
    let lanes = cfg.lanes;
    let rm = cfg.rows_per_thread;
    let bk = cfg.block_k;
    let kg_count = cfg.k_groups;
    let threads = comptime!(cfg.threads());
    let k_step = comptime!(cfg.k_step());
    let x_stride = comptime!(cfg.x_stride());
    let x_tile = comptime!(cfg.block_k * cfg.rows_padded());
    let base_threads = comptime!(cfg.lanes * cfg.row_groups);

    let t = UNIT_POS as usize;
    let lane = t % lanes;
    let rg = (t / lanes) % cfg.row_groups;
    let kg = t / base_threads;
    let col = CUBE_POS_X as usize * lanes + lane;
    let split = CUBE_POS_Y as usize;
    // First row of `x` this cube's row block takes (grid z; one block unless the host split
    // the rows).
    let row_base = CUBE_POS_Z as usize * comptime!(cfg.rows_padded());

    let m = m as usize;
    let k = k as usize;
    let n_vec = n_vec as usize;
    let k_chunk = k_chunk as usize;

    let col_ok = col < n_vec;
    let k_start = split * k_chunk;
    let k_end = if k_start + k_chunk < k {
        k_start + k_chunk
    } else {
        k
    };
    let x_row_stride = x_row_stride as usize;
    let x_col_stride = x_col_stride as usize;
    // Row stride of the weights in vectors (the host checked it is a multiple of `V`).
    let w_row = w_row_vectors as usize;
    let row0 = rg * rm;

    let mut x_s = SharedMemory::<f32>::new(comptime!(cfg.block_k * cfg.x_stride()));
    let mut acc = Array::<Vector<f32, N>>::new(cfg.rows_per_thread);
    #[unroll]
    for i in 0..rm {
        acc[i] = Vector::new(0.0f32);
    }
    let mut w_reg = Array::<Vector<F, N>>::new(cfg.unroll);

    let mut tile = k_start;
    while tile < k_end {
        let tile_end = if tile + bk < k_end { tile + bk } else { k_end };
        let tile_len = tile_end - tile;

        // Stage x[0..m, tile..tile_end] as f32, zero-padded to `BK x rows_padded`. Consecutive
        // threads read consecutive K positions of one row (coalesced).
        sync_cube();
        #[unroll]
        for it in 0..comptime!(cfg.x_load_iters()) {
            let e = t + it * threads;
            if e < x_tile {
                let r = e / bk;
                let kk = e % bk;
                let mut val = 0.0f32;
                if row_base + r < m && kk < tile_len {
                    let row = row_base + r;
                    let c = tile + kk;
                    match comptime!(cfg.swiglu_input) {
                        None => {
                            val = f32::cast_from(x[row * x_row_stride + c * x_col_stride]);
                        }
                        Some(sums) => {
                            let split_stride = x_split_stride as usize;
                            let at = row * 2 * k + c;
                            let g = if comptime!(sums.splits == 0) {
                                f32::cast_from(x[row * x_row_stride + c * x_col_stride])
                            } else {
                                f32::cast_from(split_sum::<F>(
                                    x_partial,
                                    x_bias,
                                    at,
                                    c,
                                    split_stride,
                                    sums,
                                ))
                            };
                            let u = if comptime!(sums.splits == 0) {
                                f32::cast_from(x[row * x_row_stride + (c + k) * x_col_stride])
                            } else {
                                f32::cast_from(split_sum::<F>(
                                    x_partial,
                                    x_bias,
                                    at + k,
                                    c + k,
                                    split_stride,
                                    sums,
                                ))
                            };
                            val = f32::cast_from(silu_mul::<F>(g, u));
                        }
                    }
                }
                x_s[kk * x_stride + r] = val;
            }
        }
        sync_cube();

        // `U` independent weight loads, then their products with this thread's rows of x.
        // `kk < steps * k_step <= BK` always, so the staged tile is never overrun; rows past
        // `tile_len` load zeros (and meet zeros in `x_s`).
        let steps = (tile_len + k_step - 1) / k_step;
        for step in 0..steps {
            let base = step * k_step + kg;
            #[unroll]
            for u in 0..cfg.unroll {
                let kk = base + u * kg_count;
                let mut val = Vector::<F, N>::new(F::new(0.0));
                if col_ok && kk < tile_len {
                    val = w[(tile + kk) * w_row + col];
                }
                w_reg[u] = val;
            }
            #[unroll]
            for u in 0..cfg.unroll {
                let kk = base + u * kg_count;
                let wf = Vector::<f32, N>::cast_from(w_reg[u]);
                #[unroll]
                for i in 0..rm {
                    acc[i] += wf * Vector::new(x_s[kk * x_stride + row0 + i]);
                }
            }
        }
        tile = tile_end;
    }

    // Sum the k groups, one row at a time (a buffer of one vector per thread), as a tree:
    // `log2(KG)` halving steps, each followed by a barrier.
    if comptime!(cfg.k_groups > 1) {
        let mut red = SharedMemory::<Vector<f32, N>>::new(threads);
        let half = comptime!(cfg.k_groups / 2);
        #[unroll]
        for i in 0..rm {
            sync_cube();
            red[t] = acc[i];
            sync_cube();
            let mut stride = half.runtime();
            while stride > 0 {
                if kg < stride {
                    red[t] = red[t] + red[t + stride * base_threads];
                }
                sync_cube();
                stride /= 2;
            }
            if kg == 0 {
                acc[i] = red[t];
            }
        }
    }

    if kg == 0 && col_ok {
        #[unroll]
        for i in 0..rm {
            let r = row_base + row0 + i;
            if r < m {
                if comptime!(cfg.partial) {
                    partial[(split * m + r) * n_vec + col] = acc[i];
                } else {
                    if comptime!(cfg.bias) {
                        acc[i] += Vector::<f32, N>::cast_from(bias[col]);
                    }
                    out[r * n_vec + col] = Vector::<F, N>::cast_from(acc[i]);
                }
            }
        }
    }
}

/// `out[pos] = Σ_s partial[s][pos] (+ bias[pos % n_vec])` over `pos < total = m * n_vec`
/// output vectors, cast to `F`; the partials of split `s` start at `s * split_stride`.
///
/// With `cfg.swiglu` the `n_vec` columns of a row are a gate half and an up half of `half`
/// vectors each (a fused gate/up projection), `total = m * half`, and the output is SwiGLU of
/// the two sums, rounded as the separate passes round: each sum to `F` (what the product
/// would have written), then `silu(g) · u` as [`fn@crate::fused::kernel::swiglu_kernel`]
/// computes it, so the result is the same to the bit and the SwiGLU launch is saved. The
/// shared buffer of the split-lane sums doubles then: at most 32 KiB (512 threads of 8-wide f32
/// vectors, within CUDA's 48 KiB), 16 KiB with wgpu's 4-wide vectors.
///
/// A cube covers `lanes` consecutive output vectors with `split_lanes` threads each; thread
/// `sl` loads the splits `sl, sl + split_lanes, ...` (all its loads issued before the first
/// add), and the `split_lanes` sums are added through shared memory.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn split_reduce_kernel<F: Float, N: Size>(
    partial: &Array<Vector<f32, N>>,
    bias: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    splits: u32,
    split_stride: u32,
    total: u32,
    n_vec: u32,
    half: u32,
    #[comptime] cfg: ReduceConfig,
    #[define(F)] _dtype: StorageType,
) {
    let lanes = cfg.lanes;
    let split_lanes = cfg.split_lanes;
    let t = UNIT_POS as usize;
    let lane = t % lanes;
    let sl = t / lanes;
    let pos = CUBE_POS_X as usize * lanes + lane;
    let splits = splits as usize;
    let split_stride = split_stride as usize;
    let total = total as usize;
    let n_vec = n_vec as usize;
    let half = half as usize;
    let ok = pos < total;
    // The partial vector summed into `out[pos]` (the gate's with SwiGLU; the up's is `half`
    // further).
    let mut at = pos;
    if comptime!(cfg.swiglu) {
        at = (pos / half) * n_vec + pos % half;
    }

    let mut vals = Array::<Vector<f32, N>>::new(cfg.loads);
    let mut ups = Array::<Vector<f32, N>>::new(cfg.loads);
    #[unroll]
    for u in 0..cfg.loads {
        let s = sl + u * split_lanes;
        let mut v = Vector::<f32, N>::new(0.0f32);
        let mut w = Vector::<f32, N>::new(0.0f32);
        if ok && s < splits {
            v = partial[s * split_stride + at];
            if comptime!(cfg.swiglu) {
                w = partial[s * split_stride + at + half];
            }
        }
        vals[u] = v;
        ups[u] = w;
    }
    let mut acc = Vector::<f32, N>::new(0.0f32);
    let mut up = Vector::<f32, N>::new(0.0f32);
    #[unroll]
    for u in 0..cfg.loads {
        acc += vals[u];
        if comptime!(cfg.swiglu) {
            up += ups[u];
        }
    }

    if comptime!(cfg.split_lanes > 1) {
        let block = comptime!(cfg.lanes * cfg.split_lanes);
        let mut red = SharedMemory::<Vector<f32, N>>::new(comptime!(
            cfg.lanes * cfg.split_lanes * if cfg.swiglu { 2 } else { 1 }
        ));
        red[t] = acc;
        if comptime!(cfg.swiglu) {
            red[block + t] = up;
        }
        sync_cube();
        if sl == 0 {
            #[unroll]
            for g in 1..split_lanes {
                acc += red[lane + g * lanes];
                if comptime!(cfg.swiglu) {
                    up += red[block + lane + g * lanes];
                }
            }
        }
    }

    if sl == 0 && ok {
        if comptime!(cfg.bias) {
            acc += Vector::<f32, N>::cast_from(bias[at % n_vec]);
            if comptime!(cfg.swiglu) {
                up += Vector::<f32, N>::cast_from(bias[(at + half) % n_vec]);
            }
        }
        if comptime!(cfg.swiglu) {
            let g = Vector::<f32, N>::cast_from(Vector::<F, N>::cast_from(acc));
            let u = Vector::<f32, N>::cast_from(Vector::<F, N>::cast_from(up));
            let one = Vector::<f32, N>::new(1.0f32);
            let zero = Vector::<f32, N>::new(0.0f32);
            let sig = Vector::<F, N>::cast_from(one / (one + Vector::exp(zero - g)));
            let act = Vector::<F, N>::cast_from(g * Vector::<f32, N>::cast_from(sig));
            out[pos] = Vector::<F, N>::cast_from(Vector::<f32, N>::cast_from(act) * u);
        } else {
            out[pos] = Vector::<F, N>::cast_from(acc);
        }
    }
}
