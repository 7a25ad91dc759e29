//! The CubeCL kernels of [`super`]: RMSNorm (optionally after a residual add), SwiGLU, and RoPE
//! with the head-major transpose.
//!
//! Each mirrors the rounding of the tensor-op reference in [`super::reference`] step by step
//! (every op of the reference rounds to the activation dtype; statistics are f32), so that the
//! kernel and the reference agree to the last bit wherever the f32 arithmetic does. Inputs are
//! flat arrays read through a `Strided` layout passed as scalars (see `crate::args`), so
//! views (a column range of a fused projection, a slice of a table) need no copy; outputs are
//! contiguous.

// `#[cube]` generates a launch module, struct and functions for each kernel, without docs and
// deaf to attributes on the kernel function; the kernel's own doc comment is on its function.
#![allow(missing_docs)]

use cubecl::prelude::*;

use crate::args::Strided;

/// The position of this thread in a one-thread-per-element launch whose cubes may be folded
/// into two grid dimensions (see `launch::elementwise_count`).
#[cube]
fn element_pos() -> usize {
    ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X) as usize
}

/// RMSNorm of each row of `x` (`cols` wide), one cube per row:
/// `y = round(round(h · 1/sqrt(mean(h²) + eps)) · γ)` with `h = x`, or, with `cfg_residual`,
/// `h = round(x + residual)`, which is also written to `sum`.
///
/// The cube's threads stride over the row twice: once for `Σ h²` (f32, summed through shared
/// memory as a tree, no plane operations), once to write the result.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn rms_norm_kernel<F: Float>(
    x: &Array<F>,
    x_at: Strided,
    residual: &Array<F>,
    residual_at: Strided,
    gamma: &Array<F>,
    gamma_at: Strided,
    sum: &mut Array<F>,
    out: &mut Array<F>,
    rows: u32,
    cols: u32,
    eps: f32,
    #[comptime] threads: usize,
    #[comptime] with_residual: bool,
    #[define(F)] _dtype: StorageType,
) {
    // The grid may be folded into two dimensions (more rows than one dimension takes).
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= rows as usize {
        terminate!();
    }
    let t = UNIT_POS as usize;
    let cols = cols as usize;
    let mut partial = 0.0f32;
    let mut c = t;
    while c < cols {
        let mut h = x[x_at.offset(row, c)];
        if comptime!(with_residual) {
            h = F::cast_from(
                f32::cast_from(h) + f32::cast_from(residual[residual_at.offset(row, c)]),
            );
            sum[row * cols + c] = h;
        }
        let hf = f32::cast_from(h);
        partial += hf * hf;
        c += threads;
    }
    let inv = inv_rms(partial, cols, eps, threads);
    let mut c = t;
    while c < cols {
        let h = if comptime!(with_residual) {
            sum[row * cols + c]
        } else {
            x[x_at.offset(row, c)]
        };
        out[row * cols + c] = scale_norm::<F>(h, inv, gamma[gamma_at.offset(0, c)]);
        c += threads;
    }
}

/// `round(round(h · inv) · γ)`: one normed element, rounded as the reference rounds it.
#[cube]
fn scale_norm<F: Float>(h: F, inv: f32, gamma: F) -> F {
    let normed = F::cast_from(f32::cast_from(h) * inv);
    F::cast_from(f32::cast_from(normed) * f32::cast_from(gamma))
}

/// `1 / sqrt(mean(h²) + eps)` of a row of `cols` from each thread's share of `Σ h²`, summed
/// through shared memory as a tree (no plane operations).
#[cube]
fn inv_rms(partial: f32, cols: usize, eps: f32, #[comptime] threads: usize) -> f32 {
    let t = UNIT_POS as usize;
    let mut red = SharedMemory::<f32>::new(threads);
    red[t] = partial;
    sync_cube();
    let mut stride = comptime!(threads / 2).runtime();
    while stride > 0 {
        if t < stride {
            red[t] = red[t] + red[t + stride];
        }
        sync_cube();
        stride /= 2;
    }
    // As the reference: `(mean + eps).sqrt().recip()` in f32.
    1.0f32 / f32::sqrt(red[0] / f32::cast_from(cols) + eps)
}

/// Compile-time shape of the K-split partial sums a kernel finishes (`split_sum`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SplitSumConfig {
    /// K splits of the product. `0` when the product comes finished ([`fn@rope_cache_kernel`],
    /// and the SwiGLU input of `crate::linear::kernel::linear_kernel`); the other kernels
    /// always take partial sums.
    pub splits: usize,
    /// Split lanes of the product's own reduction pass (fixes the order of the sum).
    pub split_lanes: usize,
    /// Add a bias to the product.
    pub bias: bool,
}

/// [`fn@rms_norm_kernel`] with a residual add whose addend is a skinny product `y = x·W (+ b)`
/// still held as the f32 partial sums of its K split (`partial[split][row][col]`, `[splits,
/// rows, cols]`): `y = round(Σ_split partial + bias)`, `h = round(x + y)` (written to `sum`),
/// then the RMSNorm of `h` -- one pass where the split's reduction and the norm were two.
///
/// The splits are added in the order of the product's own reduction pass
/// (`crate::linear::kernel::split_reduce_kernel` with `split_lanes` lanes per output: lane `g`
/// sums splits `g, g + split_lanes, ...`, then the lanes' sums are added in order), so `y` has
/// the bits the unfused product would have. One cube per row reads all of the row's partial
/// sums, so every load of a column is issued before any is used (the split count is a
/// compile-time constant and the loops unroll): a loop of dependent loads made this kernel
/// latency-bound (measured on an H200: a Llama-3-8B decode step 1.2 ms slower).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn split_add_rms_norm_kernel<F: Float>(
    partial: &Array<f32>,
    bias: &Array<F>,
    x: &Array<F>,
    x_at: Strided,
    gamma: &Array<F>,
    gamma_at: Strided,
    sum: &mut Array<F>,
    out: &mut Array<F>,
    rows: u32,
    cols: u32,
    eps: f32,
    #[comptime] threads: usize,
    #[comptime] sums: SplitSumConfig,
    #[define(F)] _dtype: StorageType,
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= rows as usize {
        terminate!();
    }
    let t = UNIT_POS as usize;
    let cols = cols as usize;
    let stride = rows as usize * cols;
    let mut squares = 0.0f32;
    let mut c = t;
    while c < cols {
        let at = row * cols + c;
        let y = split_sum::<F>(partial, bias, at, c, stride, sums);
        let h = F::cast_from(f32::cast_from(x[x_at.offset(row, c)]) + f32::cast_from(y));
        sum[at] = h;
        let hf = f32::cast_from(h);
        squares += hf * hf;
        c += threads;
    }
    let inv = inv_rms(squares, cols, eps, threads);
    let mut c = t;
    while c < cols {
        let at = row * cols + c;
        out[at] = scale_norm::<F>(sum[at], inv, gamma[gamma_at.offset(0, c)]);
        c += threads;
    }
}

/// `round(Σ_split partial[split][at] (+ bias[col]))`: one output of a K-split skinny product,
/// its splits added in the order of the product's own reduction pass (see
/// [`split_add_rms_norm_kernel`]), every load issued before the first add.
#[cube]
pub(crate) fn split_sum<F: Float>(
    partial: &Array<f32>,
    bias: &Array<F>,
    at: usize,
    col: usize,
    stride: usize,
    #[comptime] cfg: SplitSumConfig,
) -> F {
    let splits = cfg.splits;
    let split_lanes = cfg.split_lanes;
    let loads = comptime!(cfg.splits.div_ceil(cfg.split_lanes));
    let mut p = Array::<f32>::new(splits);
    #[unroll]
    for s in 0..splits {
        p[s] = partial[s * stride + at];
    }
    let mut total = 0.0f32;
    #[unroll]
    for g in 0..split_lanes {
        let mut lane = 0.0f32;
        #[unroll]
        for u in 0..loads {
            let s = g + u * split_lanes;
            if s < splits {
                lane += p[s];
            }
        }
        total += lane;
    }
    if comptime!(cfg.bias) {
        total += f32::cast_from(bias[col]);
    }
    F::cast_from(total)
}

/// One value of a fused q/k/v product for [`fn@rope_cache_kernel`]: with `cfg.splits == 0` the
/// finished product's element (`product`, read through `product_at` at `(row, col)`), else
/// `split_sum` of its K split's partial sums at `at`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn product_value<F: Float>(
    partial: &Array<f32>,
    product: &Array<F>,
    product_at: &Strided,
    bias: &Array<F>,
    row: usize,
    col: usize,
    at: usize,
    stride: usize,
    #[comptime] cfg: SplitSumConfig,
) -> F {
    if comptime!(cfg.splits == 0) {
        product[product_at.offset(row, col)]
    } else {
        split_sum::<F>(partial, bias, at, col, stride, cfg)
    }
}

/// A fused q/k/v projection (rows `[batch, seq]`, columns `[heads, head_dim]` with the
/// `n_heads` query heads, then `n_kv` key heads, then `n_kv` value heads) rotated and put where
/// attention reads it, one thread per element: queries rotated into
/// `q: [batch, n_heads, seq, head_dim]` (contiguous), keys rotated and values as they are into
/// rows `start..start + seq` of `k_cache`, `v_cache` (`[batch, n_kv, capacity, head_dim]`).
///
/// The product comes finished (`sums.splits == 0`: `product`, any row layout) or as the f32
/// partial sums of its K split (`partial[split][row][col]`), which each value adds up as
/// `split_sum` does (the bits of the finished product). The rotation is that of
/// [`fn@rope_kernel`], so the result is exactly the product, [`fn@rope_kernel`] and
/// [`fn@cache_write_kernel`] in a row -- one launch where those were three (split) or two.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn rope_cache_kernel<F: Float>(
    partial: &Array<f32>,
    product: &Array<F>,
    product_at: Strided,
    bias: &Array<F>,
    cos: &Array<F>,
    cos_at: Strided,
    sin: &Array<F>,
    sin_at: Strided,
    q: &mut Array<F>,
    k_cache: &mut Array<F>,
    k_cache_at: Strided,
    v_cache: &mut Array<F>,
    v_cache_at: Strided,
    batch: u32,
    seq: u32,
    n_heads: u32,
    n_kv: u32,
    head_dim: u32,
    capacity: u32,
    start: u32,
    #[comptime] sums: SplitSumConfig,
    #[define(F)] _dtype: StorageType,
) {
    let pos = element_pos();
    let (seq, nh, nkv, d) = (
        seq as usize,
        n_heads as usize,
        n_kv as usize,
        head_dim as usize,
    );
    let heads = nh + 2 * nkv;
    if pos >= batch as usize * seq * heads * d {
        terminate!();
    }
    // `pos` walks [batch, heads, seq, head_dim], as `rope_kernel`'s output.
    let i = pos % d;
    let s = (pos / d) % seq;
    let h = (pos / (d * seq)) % heads;
    let b = pos / (d * seq * heads);
    let n = heads * d;
    let row = b * seq + s;
    let stride = batch as usize * seq * n;
    let col = h * d + i;
    let xi = product_value::<F>(
        partial,
        product,
        &product_at,
        bias,
        row,
        col,
        row * n + col,
        stride,
        sums,
    );
    let mut y = xi;
    if h < nh + nkv {
        let pcol = h * d + rotation_partner(i, d);
        let xp = product_value::<F>(
            partial,
            product,
            &product_at,
            bias,
            row,
            pcol,
            row * n + pcol,
            stride,
            sums,
        );
        y = rotate::<F>(xi, xp, cos[cos_at.offset(s, i)], sin[sin_at.offset(s, i)]);
    }
    if h < nh {
        q[((b * nh + h) * seq + s) * d + i] = y;
    } else {
        let kv = if h < nh + nkv { h - nh } else { h - nh - nkv };
        let dst = (b * nkv + kv) * capacity as usize + start as usize + s;
        if h < nh + nkv {
            k_cache[k_cache_at.offset(dst, i)] = y;
        } else {
            v_cache[v_cache_at.offset(dst, i)] = y;
        }
    }
}

/// `out = round(round(silu(g)) · u)` element-wise over `rows × cols`, with
/// `silu(g) = round(g · round(sigmoid(g)))` as Burn composes it.
#[cube(launch_unchecked)]
pub fn swiglu_kernel<F: Float>(
    gate: &Array<F>,
    gate_at: Strided,
    up: &Array<F>,
    up_at: Strided,
    out: &mut Array<F>,
    rows: u32,
    cols: u32,
    #[define(F)] _dtype: StorageType,
) {
    let pos = element_pos();
    let cols = cols as usize;
    if pos >= rows as usize * cols {
        terminate!();
    }
    let row = pos / cols;
    let col = pos % cols;
    let g = f32::cast_from(gate[gate_at.offset(row, col)]);
    out[pos] = silu_mul::<F>(g, f32::cast_from(up[up_at.offset(row, col)]));
}

/// `silu(g) · u` for `g`, `u` already in `F` (given as f32), rounded to `F` after each op as
/// Burn's tensor ops round: `sigmoid(g)`, `g · sigmoid(g)`, then the product with `u`. Shared
/// by [`swiglu_kernel`] and the down projection that computes its input while staging it
/// ([`crate::linear::kernel::linear_kernel`]), so both give the same bits.
#[cube]
pub(crate) fn silu_mul<F: Float>(g: f32, u: f32) -> F {
    let sig = F::cast_from(1.0f32 / (1.0f32 + f32::exp(-g)));
    let act = F::cast_from(g * f32::cast_from(sig));
    F::cast_from(f32::cast_from(act) * u)
}

/// RoPE in the "rotate half" convention on `x: [batch, seq, heads, head_dim]` (any strides),
/// written head-major to `out: [batch, heads, seq, head_dim]` (contiguous). Heads from
/// `rotated` on are copied unrotated (the values of a fused q/k/v projection).
///
/// `y[i] = round(round(x[i] · cos[i]) + round(x[i ± d/2] · sin[i]))`, with `cos`/`sin`
/// (`[seq, head_dim]`, any strides) the rows of each position and the sign of `rotate_half`
/// folded into `sin`.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn rope_kernel<F: Float>(
    x: &Array<F>,
    x_at: Strided,
    cos: &Array<F>,
    cos_at: Strided,
    sin: &Array<F>,
    sin_at: Strided,
    out: &mut Array<F>,
    batch: u32,
    seq: u32,
    heads: u32,
    head_dim: u32,
    rotated: u32,
    #[define(F)] _dtype: StorageType,
) {
    let pos = element_pos();
    let (seq, heads, d) = (seq as usize, heads as usize, head_dim as usize);
    if pos >= batch as usize * seq * heads * d {
        terminate!();
    }
    // `pos` walks the output: [batch, heads, seq, head_dim].
    let i = pos % d;
    let s = (pos / d) % seq;
    let h = (pos / (d * seq)) % heads;
    let b = pos / (d * seq * heads);
    let row = (b * seq + s) * heads + h;
    let xi = x[x_at.offset(row, i)];
    if h < rotated as usize {
        let xp = x[x_at.offset(row, rotation_partner(i, d))];
        out[pos] = rotate::<F>(xi, xp, cos[cos_at.offset(s, i)], sin[sin_at.offset(s, i)]);
    } else {
        out[pos] = xi;
    }
}

/// The dimension `i` rotates with in "rotate half" RoPE: `i ± head_dim / 2`.
#[cube]
fn rotation_partner(i: usize, d: usize) -> usize {
    let half = d / 2;
    if i < half { i + half } else { i - half }
}

/// `round(round(x · cos) + round(partner · sin))`: one rotated element (the sign of
/// `rotate_half` is folded into `sin`), rounded as the reference rounds it.
#[cube]
fn rotate<F: Float>(x: F, partner: F, cos: F, sin: F) -> F {
    let a = F::cast_from(f32::cast_from(x) * f32::cast_from(cos));
    let p = F::cast_from(f32::cast_from(partner) * f32::cast_from(sin));
    F::cast_from(f32::cast_from(a) + f32::cast_from(p))
}

/// Writes the new keys and values `k`, `v` (`[batch, heads, n, head_dim]`, any strides) into
/// rows `start..start + n` of the caches `k_cache`, `v_cache` (`[batch, heads, capacity,
/// head_dim]`), one thread per element of `k` (it copies the same element of `v`).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn cache_write_kernel<F: Float>(
    k: &Array<F>,
    k_at: Strided,
    v: &Array<F>,
    v_at: Strided,
    k_cache: &mut Array<F>,
    k_cache_at: Strided,
    v_cache: &mut Array<F>,
    v_cache_at: Strided,
    rows: u32,
    n: u32,
    head_dim: u32,
    capacity: u32,
    start: u32,
    #[define(F)] _dtype: StorageType,
) {
    let pos = element_pos();
    let (n, d) = (n as usize, head_dim as usize);
    if pos >= rows as usize * d {
        terminate!();
    }
    // `row` walks `[batch, heads, n]`; `dst` is the same (batch, head) at cache row `t`.
    let row = pos / d;
    let col = pos % d;
    let t = start as usize + row % n;
    let dst = (row / n) * capacity as usize + t;
    k_cache[k_cache_at.offset(dst, col)] = k[k_at.offset(row, col)];
    v_cache[v_cache_at.offset(dst, col)] = v[v_at.offset(row, col)];
}

/// Moves rows `src[i]` of both caches (`[batch, heads, capacity, head_dim]`) to rows
/// `dst_start + i`, in place, one thread per column `(batch, head, i_dim)` walking the rows in
/// increasing order: a row is read before any later destination overwrites it, which is what
/// [`super::cache_gather_supports`] checks.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn cache_gather_kernel<F: Float>(
    src: &Array<u32>,
    k_cache: &mut Array<F>,
    k_cache_at: Strided,
    v_cache: &mut Array<F>,
    v_cache_at: Strided,
    columns: u32,
    rows: u32,
    head_dim: u32,
    capacity: u32,
    dst_start: u32,
    #[define(F)] _dtype: StorageType,
) {
    let pos = element_pos();
    if pos >= columns as usize {
        terminate!();
    }
    let d = head_dim as usize;
    let base = (pos / d) * capacity as usize;
    let col = pos % d;
    for i in 0..rows as usize {
        let from = base + src[i] as usize;
        let to = base + dst_start as usize + i;
        k_cache[k_cache_at.offset(to, col)] = k_cache[k_cache_at.offset(from, col)];
        v_cache[v_cache_at.offset(to, col)] = v_cache[v_cache_at.offset(from, col)];
    }
}

/// The index of an empty slot in [`top_k_kernel`]'s lists.
const EMPTY: u32 = u32::MAX;

/// Whether entry `(av, ai)` ranks before `(bv, bi)` in a top-k list: the larger value, on equal
/// values the lower index; an empty slot ranks last.
#[cube]
fn ranks_before(av: f32, ai: u32, bv: f32, bi: u32) -> bool {
    let a_empty = ai == EMPTY;
    let b_empty = bi == EMPTY;
    b_empty || (!a_empty && (av > bv || (av == bv && ai < bi)))
}

/// Puts entry `(v, ci)` into the sorted list `vals`/`idxs` of length `k` if it ranks before the
/// list's last entry: the worse entries shift down one slot.
#[cube]
fn insert(vals: &mut Array<f32>, idxs: &mut Array<u32>, v: f32, ci: u32, #[comptime] k: usize) {
    if ranks_before(v, ci, vals[k - 1], idxs[k - 1]) {
        let mut j = comptime!(k - 1).runtime();
        loop {
            if j == 0 {
                break;
            }
            if !ranks_before(v, ci, vals[j - 1], idxs[j - 1]) {
                break;
            }
            vals[j] = vals[j - 1];
            idxs[j] = idxs[j - 1];
            j -= 1;
        }
        vals[j] = v;
        idxs[j] = ci;
    }
}

/// An empty list of `k` entries in registers.
#[cube]
fn empty_list(#[comptime] k: usize) -> (Array<f32>, Array<u32>) {
    let mut vals = Array::<f32>::new(k);
    let mut idxs = Array::<u32>::new(k);
    #[unroll]
    for j in 0..k {
        vals[j] = 0.0f32;
        idxs[j] = EMPTY;
    }
    (vals, idxs)
}

/// Merges the `threads` sorted lists of a cube (thread `t` holds `vals`/`idxs`) pairwise
/// through shared memory in `log2(threads)` rounds. Thread 0 takes part in every round, so
/// after the call its `vals`/`idxs` hold the best `k` of all.
#[cube]
fn merge_lists(
    vals: &mut Array<f32>,
    idxs: &mut Array<u32>,
    #[comptime] k: usize,
    #[comptime] threads: usize,
) {
    let mut s_vals = SharedMemory::<f32>::new(threads * k);
    let mut s_idxs = SharedMemory::<u32>::new(threads * k);
    let t = UNIT_POS as usize;
    #[unroll]
    for j in 0..k {
        s_vals[t * k + j] = vals[j];
        s_idxs[t * k + j] = idxs[j];
    }
    sync_cube();
    let mut stride = comptime!(threads / 2).runtime();
    while stride > 0 {
        if t < stride {
            // Merge this thread's list with that of thread `t + stride` (both sorted); only
            // this thread reads slot `t` in this round, so the result may replace it.
            let mut a = t * k;
            let mut b = (t + stride) * k;
            #[unroll]
            for j in 0..k {
                let av = s_vals[a];
                let ai = s_idxs[a];
                let bv = s_vals[b];
                let bi = s_idxs[b];
                if ranks_before(av, ai, bv, bi) {
                    vals[j] = av;
                    idxs[j] = ai;
                    a += 1;
                } else {
                    vals[j] = bv;
                    idxs[j] = bi;
                    b += 1;
                }
            }
            #[unroll]
            for j in 0..k {
                s_vals[t * k + j] = vals[j];
                s_idxs[t * k + j] = idxs[j];
            }
        }
        sync_cube();
        stride /= 2;
    }
}

/// Thread 0 writes the cube's merged list (`merge_lists`) as row `row` of `out: [rows, k]`.
#[cube]
fn write_indices<I: Int>(out: &mut Array<I>, idxs: &Array<u32>, row: usize, #[comptime] k: usize) {
    if UNIT_POS == 0 {
        #[unroll]
        for j in 0..k {
            out[row * k + j] = I::cast_from(idxs[j]);
        }
    }
}

/// Column indices of the `k` largest entries of each row of `x` (`[rows, cols]`, any row
/// layout), best first (equal values: the lower index first), into `out: [rows, k]`, for rows
/// short enough for one cube. One cube of `threads` per row: each thread keeps the best `k` of
/// its strided share of the row sorted in registers (insertion), then the threads' lists merge
/// through shared memory (`merge_lists`). Longer rows take [`fn@top_k_segments_kernel`] and
/// [`fn@top_k_merge_kernel`].
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn top_k_kernel<F: Float, I: Int>(
    x: &Array<F>,
    x_at: Strided,
    out: &mut Array<I>,
    rows: u32,
    cols: u32,
    #[comptime] k: usize,
    #[comptime] threads: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= rows as usize {
        terminate!();
    }
    let t = UNIT_POS as usize;
    let cols = cols as usize;
    let (mut vals, mut idxs) = empty_list(k);
    let mut c = t;
    while c < cols {
        let v = f32::cast_from(x[x_at.offset(row, c)]);
        insert(&mut vals, &mut idxs, v, c as u32, k);
        c += threads;
    }
    merge_lists(&mut vals, &mut idxs, k, threads);
    write_indices(out, &idxs, row, k);
}

/// First pass of top-k over long rows: cube `(segment, row)` finds the best `k` of the
/// `threads * per_thread` columns of its segment and writes them (value, column; empty slots
/// as `EMPTY`) to `seg_vals`/`seg_idxs` at `[row, segment, 0..k]`. A cube per row alone
/// would leave a GPU nearly idle on Medusa's few rows (measured on an H200: 180 µs for 4 rows
/// of 49152, bound by each thread's chain of loads); each thread here issues its `per_thread`
/// loads before it compares any of them.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn top_k_segments_kernel<F: Float>(
    x: &Array<F>,
    x_at: Strided,
    seg_vals: &mut Array<f32>,
    seg_idxs: &mut Array<u32>,
    cols: u32,
    #[comptime] k: usize,
    #[comptime] threads: usize,
    #[comptime] per_thread: usize,
    #[define(F)] _dtype: StorageType,
) {
    let segment = CUBE_POS_X as usize;
    let segments = CUBE_COUNT_X as usize;
    let row = CUBE_POS_Y as usize;
    let t = UNIT_POS as usize;
    let cols = cols as usize;
    let first = segment * comptime!(threads * per_thread) + t;
    let mut loaded = Array::<f32>::new(per_thread);
    #[unroll]
    for i in 0..per_thread {
        // Clamped, so that every load is issued unconditionally; out-of-row ones are skipped
        // below.
        let c = min(first + i * threads, cols - 1);
        loaded[i] = f32::cast_from(x[x_at.offset(row, c)]);
    }
    let (mut vals, mut idxs) = empty_list(k);
    #[unroll]
    for i in 0..per_thread {
        let c = first + i * threads;
        if c < cols {
            insert(&mut vals, &mut idxs, loaded[i], c as u32, k);
        }
    }
    merge_lists(&mut vals, &mut idxs, k, threads);
    if t == 0 {
        let at = (row * segments + segment) * k;
        #[unroll]
        for j in 0..k {
            seg_vals[at + j] = vals[j];
            seg_idxs[at + j] = idxs[j];
        }
    }
}

/// Second pass of top-k over long rows: one cube per row merges the `candidates` entries
/// [`fn@top_k_segments_kernel`] left for it (`segments * k`) into the row's best `k` column
/// indices, `out: [rows, k]`.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn top_k_merge_kernel<I: Int>(
    seg_vals: &Array<f32>,
    seg_idxs: &Array<u32>,
    out: &mut Array<I>,
    rows: u32,
    candidates: u32,
    #[comptime] k: usize,
    #[comptime] threads: usize,
    #[define(I)] _dtype: StorageType,
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= rows as usize {
        terminate!();
    }
    let t = UNIT_POS as usize;
    let n = candidates as usize;
    let (mut vals, mut idxs) = empty_list(k);
    let mut c = t;
    while c < n {
        insert(
            &mut vals,
            &mut idxs,
            seg_vals[row * n + c],
            seg_idxs[row * n + c],
            k,
        );
        c += threads;
    }
    merge_lists(&mut vals, &mut idxs, k, threads);
    write_indices(out, &idxs, row, k);
}
