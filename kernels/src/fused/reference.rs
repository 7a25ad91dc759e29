//! The fused ops as Burn tensor ops: the path of backends without kernels (differentiable under
//! `Autodiff`), the "stock Burn" baseline of the benchmarks, and the definition every kernel
//! rounds like.

use burn::tensor::{
    DType, Int, Tensor, TensorPrimitive,
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
