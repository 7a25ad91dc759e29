//! The fused ops as Burn tensor ops: the path of backends without kernels (differentiable under
//! `Autodiff`), the "stock Burn" baseline of the benchmarks, and the definition every kernel
//! rounds like.

use burn::tensor::{
    DType, Int, Tensor, TensorData, TensorMetadata, TensorPrimitive,
    activation::silu,
    backend::Backend,
    ops::{FloatTensor, IntTensor},
};

/// `(h, rms_norm(h) · gamma)` with `h = x` or `h = x + residual`; see
/// [`super::FusedOpsBackend::rms_norm`]. Statistics in f32 whatever the dtype, as
/// `LlamaRMSNorm` computes them.
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    residual: Option<Tensor<B, D>>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> (Option<Tensor<B, D>>, Tensor<B, D>) {
    let h = residual.map(|r| x.clone() + r);
    let source = h.clone().unwrap_or(x);
    let dtype = source.dtype();
    let xf = source.cast(DType::F32);
    let variance = xf.clone().square().mean_dim(D - 1);
    let normed = (xf * (variance + eps).sqrt().recip()).cast(dtype);
    (h, normed * gamma.unsqueeze())
}

/// `silu(gate) · up`.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    silu(gate) * up
}

/// SwiGLU of the two column halves of `y: [m, 2f]` (a fused gate/up product), through the
/// backend's [`super::FusedOpsBackend::swiglu`] on views: `[m, f]`.
pub fn swiglu_halves<B: super::FusedOpsBackend>(y: FloatTensor<B>) -> FloatTensor<B> {
    let y: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(y));
    let f = y.dims()[1] / 2;
    B::swiglu::<2>(
        y.clone().narrow(1, 0, f).into_primitive().tensor(),
        y.narrow(1, f, f).into_primitive().tensor(),
    )
}

/// [`super::FusedOpsBackend::linear_swiglu`] as two ops: the backend's skinny product, then
/// [`swiglu_halves`].
pub fn linear_swiglu_prim<B: super::FusedOpsBackend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
) -> FloatTensor<B> {
    swiglu_halves::<B>(B::linear_skinny(x, weight, bias))
}

/// [`super::FusedOpsBackend::linear_add_rms_norm`] as two ops: the backend's skinny product
/// `y`, then its RMSNorm with the residual add `residual + y`. Returns `(h, norm(h))`.
pub fn linear_add_rms_norm_prim<B: super::FusedOpsBackend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    residual: FloatTensor<B>,
    gamma: FloatTensor<B>,
    eps: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let y = B::linear_skinny(x, weight, bias);
    let (h, normed) = B::rms_norm::<2>(residual, Some(y), gamma, eps);
    (h.expect("the sum of a residual add"), normed)
}

/// [`super::FusedOpsBackend::linear_rope_cache`] as the backend's ops: the skinny product, then
/// [`rope_cache_prim`].
#[allow(clippy::too_many_arguments)]
pub fn linear_rope_cache_prim<B: super::FusedOpsBackend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    swap: IntTensor<B>,
    k_cache: FloatTensor<B>,
    v_cache: FloatTensor<B>,
    start: usize,
    n_heads: usize,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let y = B::linear_skinny(x, weight, bias);
    rope_cache_prim::<B>(y, cos, sin, swap, k_cache, v_cache, start, n_heads)
}

/// A finished fused q/k/v product `y: [batch · seq, (n_heads + 2 · n_kv) · head_dim]` through
/// the backend's [`super::FusedOpsBackend::rope`] (query and key heads rotated, head-major)
/// and [`super::FusedOpsBackend::cache_write`] (keys and values into rows `start..` of the
/// caches): returns `(q, k_cache, v_cache)`, `q` a head range of the rotated tensor.
#[allow(clippy::too_many_arguments)]
pub fn rope_cache_prim<B: super::FusedOpsBackend>(
    y: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    swap: IntTensor<B>,
    k_cache: FloatTensor<B>,
    v_cache: FloatTensor<B>,
    start: usize,
    n_heads: usize,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let [batch, n_kv, _, d] = k_cache.shape().dims::<4>();
    let y: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(y));
    let [m, n] = y.dims();
    let y = y.reshape([batch, m / batch, n / d, d]);
    let rotated: Tensor<B, 4> = Tensor::from_primitive(TensorPrimitive::Float(B::rope(
        y.into_primitive().tensor(),
        cos,
        sin,
        swap,
        n_heads + n_kv,
    )));
    let head = |at: usize, count: usize| {
        rotated
            .clone()
            .narrow(1, at, count)
            .into_primitive()
            .tensor()
    };
    let (k, v) = (head(n_heads, n_kv), head(n_heads + n_kv, n_kv));
    let (kc, vc) = B::cache_write(k_cache, v_cache, k, v, start);
    (head(0, n_heads), kc, vc)
}

/// RoPE on `x: [batch, seq, heads, head_dim]` into `[batch, heads, seq, head_dim]`, rotating
/// the first `rotated` heads: `x · cos + x[.., swap] · sin` per row, with `cos`/`sin`
/// `[seq, head_dim]` (the sign of `rotate_half` folded into `sin`) and `swap` `[head_dim]` the
/// index each dimension rotates with. Element-wise ops and a `select`, which Burn's fusion
/// compiles into one kernel (the textbook `cat(-x2, x1)` breaks fusion).
pub fn rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    swap: Tensor<B, 1, Int>,
    rotated: usize,
) -> Tensor<B, 4> {
    let x = x.swap_dims(1, 2);
    let heads = x.dims()[1];
    let rotate = |t: Tensor<B, 4>| {
        t.clone() * cos.clone().unsqueeze::<4>()
            + t.select(3, swap.clone()) * sin.clone().unsqueeze()
    };
    if rotated >= heads {
        return rotate(x);
    }
    let kept = x.clone().narrow(1, rotated, heads - rotated);
    if rotated == 0 {
        return kept;
    }
    Tensor::cat(vec![rotate(x.narrow(1, 0, rotated)), kept], 1)
}

/// `k`, `v` (`[batch, heads, n, head_dim]`) written into rows `start..start + n` of the caches
/// (`[batch, heads, capacity, head_dim]`) with `slice_assign` (in place when the caches are
/// uniquely owned).
pub fn cache_write<B: Backend>(
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    start: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, n, d] = k.dims();
    let range = [0..b, 0..h, start..start + n, 0..d];
    (
        k_cache.slice_assign(range.clone(), k),
        v_cache.slice_assign(range, v),
    )
}

/// [`cache_write`] on backend primitives.
pub(crate) fn cache_write_prim<B: Backend>(
    k_cache: FloatTensor<B>,
    v_cache: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    start: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (kc, vc) = cache_write::<B>(wrap(k_cache), wrap(v_cache), wrap(k), wrap(v), start);
    (unwrap(kc), unwrap(vc))
}

/// Rows `src` of the caches (`[batch, heads, capacity, head_dim]`) copied to rows
/// `dst_start..dst_start + src.len()`: all rows are read (`select`) before any is written
/// (`slice_assign`, in place when the caches are uniquely owned).
pub fn cache_gather<B: Backend>(
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    src: &[usize],
    dst_start: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let n = src.len();
    if n == 0 {
        return (k_cache, v_cache);
    }
    let device = k_cache.device();
    let rows: Vec<i64> = src.iter().map(|&r| r as i64).collect();
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), &device);
    let gather = |cache: Tensor<B, 4>| {
        let [b, h, _, d] = cache.dims();
        let moved = cache.clone().select(2, rows.clone());
        cache.slice_assign([0..b, 0..h, dst_start..dst_start + n, 0..d], moved)
    };
    (gather(k_cache), gather(v_cache))
}

/// [`cache_gather`] on backend primitives.
pub(crate) fn cache_gather_prim<B: Backend>(
    k_cache: FloatTensor<B>,
    v_cache: FloatTensor<B>,
    src: &[usize],
    dst_start: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (kc, vc) = cache_gather::<B>(wrap(k_cache), wrap(v_cache), src, dst_start);
    (unwrap(kc), unwrap(vc))
}

/// Column indices of the `k` largest entries of each row of `x` (`[rows, cols]` to
/// `[rows, k]`), largest first: `k` rounds of `argmax` and masking the winner with `-inf`, all
/// on the device.
pub fn top_k<B: Backend>(x: Tensor<B, 2>, k: usize) -> Tensor<B, 2, Int> {
    let [rows, n] = x.dims();
    let columns = Tensor::<B, 1, Int>::arange(0..n as i64, &x.device()).reshape([1, n]);
    let mut x = x;
    let mut picked = Vec::with_capacity(k);
    for _ in 0..k {
        let best = x.clone().argmax(1); // [rows, 1]
        let hit = columns
            .clone()
            .expand([rows, n])
            .equal(best.clone().expand([rows, n]));
        x = x.mask_fill(hit, f32::NEG_INFINITY);
        picked.push(best);
    }
    Tensor::cat(picked, 1)
}

/// [`top_k`] on backend primitives.
pub(crate) fn top_k_prim<B: Backend>(x: FloatTensor<B>, k: usize) -> IntTensor<B> {
    top_k::<B>(wrap(x), k).into_primitive()
}

/// [`rms_norm`] on backend primitives of rank `D`.
pub(crate) fn rms_norm_prim<B: Backend, const D: usize>(
    x: FloatTensor<B>,
    residual: Option<FloatTensor<B>>,
    gamma: FloatTensor<B>,
    eps: f64,
) -> (Option<FloatTensor<B>>, FloatTensor<B>) {
    let (h, y) = rms_norm::<B, D>(wrap(x), residual.map(wrap), wrap(gamma), eps);
    (h.map(unwrap), unwrap(y))
}

/// [`swiglu`] on backend primitives of rank `D`.
pub(crate) fn swiglu_prim<B: Backend, const D: usize>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
) -> FloatTensor<B> {
    unwrap(swiglu::<B, D>(wrap(gate), wrap(up)))
}

/// [`rope`] on backend primitives.
pub(crate) fn rope_prim<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    swap: IntTensor<B>,
    rotated: usize,
) -> FloatTensor<B> {
    unwrap(rope::<B>(
        wrap(x),
        wrap(cos),
        wrap(sin),
        Tensor::from_primitive(swap),
        rotated,
    ))
}

fn wrap<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn unwrap<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}
