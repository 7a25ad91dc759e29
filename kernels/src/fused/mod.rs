//! Fused element-wise and row-wise ops of a decoder layer: RMSNorm (optionally after the
//! residual add), SwiGLU, RoPE with the head-major transpose, the KV-cache append, and the
//! KV-cache gather that commits Medusa's accepted path.
//!
//! At batch 1 a decode step is dispatch-bound, not bandwidth-bound: on an H200, a Llama-3-8B
//! step kept the host busy enqueueing for 96–97% of its duration (fused or unfused Burn
//! backend), and one kernel launch cost ~20 µs (measured by the bench's launch probe; ~8 µs
//! since the kernels take arrays rather than tensor metadata, see `crate::args`).
//! Written as Burn tensor ops on the plain backend, one RMSNorm is ~9 launches (cast, square,
//! mean, add, sqrt, recip, mul, cast, mul), RoPE on q and k ~8, SwiGLU ~4, the cache write 2;
//! here each is one launch, reading its inputs through their strides (a column range of a
//! fused projection costs no copy). With them the 8B step went from 19–21 to 11 ms.
//!
//! Every op rounds exactly where its tensor-op reference ([`mod@reference`]) rounds, so kernels and
//! reference agree up to f32 summation order (RMSNorm's mean); rows are computed independently,
//! so a row's result does not depend on how many rows a call has (a Medusa tree step and a
//! decode step see the same values).
//!
//! Backends opt in through [`FusedOpsBackend`], whose default methods are the reference:
//! - `CubeBackend<R, F, I, BT>` (any CubeCL runtime) runs the kernels of [`kernel`] for f32,
//!   f16 and bf16 (other dtypes, and [`crate::kernels_enabled`] off, take the reference);
//! - `Fusion<B>` registers each op as a custom operation running the inner backend's kernel
//!   (`linear_swiglu` is the two registered ops there, `mlp_add_rms_norm` the registered
//!   `linear_swiglu` and `linear_add_rms_norm`: their saved launches are the plain backend's);
//! - the CPU backends (`flex`, `ndarray`) and `Autodiff<B>` use the reference (differentiable).

pub mod kernel;
pub mod launch;
pub mod reference;

#[cfg(feature = "fusion")]
mod fusion;

use burn::tensor::{
    DType, Int, Tensor, TensorPrimitive,
    ops::{FloatTensor, IntTensor},
};
use burn_cubecl::{
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement, tensor::CubeTensor,
};

use crate::LinearBackend;

/// A Burn backend that can run the fused decoder ops. The provided methods are the tensor-op
/// [`mod@reference`]; CubeCL backends override them with kernels. `D` is the rank of the inputs.
pub trait FusedOpsBackend: LinearBackend {
    /// See [`rms_norm`] and [`add_rms_norm`].
    fn rms_norm<const D: usize>(
        x: FloatTensor<Self>,
        residual: Option<FloatTensor<Self>>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> (Option<FloatTensor<Self>>, FloatTensor<Self>) {
        reference::rms_norm_prim::<Self, D>(x, residual, gamma, eps)
    }

    /// See [`swiglu`].
    fn swiglu<const D: usize>(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::swiglu_prim::<Self, D>(gate, up)
    }

    /// See [`linear_swiglu`]; `x: [m, k]`, `weight: [k, 2f]`, returns `[m, f]`.
    fn linear_swiglu(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        reference::linear_swiglu_prim::<Self>(x, weight, bias)
    }

    /// See [`linear_add_rms_norm`]; `x: [m, k]`, `weight: [k, n]`, `residual: [m, n]`; returns
    /// `(h, norm(h))`, both `[m, n]`.
    fn linear_add_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        residual: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::linear_add_rms_norm_prim::<Self>(x, weight, bias, residual, gamma, eps)
    }

    /// See [`mlp_add_rms_norm`]; `x: [m, k]`, `w_gate_up: [k, 2f]`, `w_down: [f, n]`,
    /// `residual: [m, n]`; returns `(h, norm(h))`, both `[m, n]`. The default is
    /// [`Self::linear_swiglu`] then [`Self::linear_add_rms_norm`].
    #[allow(clippy::too_many_arguments)]
    fn mlp_add_rms_norm(
        x: FloatTensor<Self>,
        w_gate_up: FloatTensor<Self>,
        bias_gate_up: Option<FloatTensor<Self>>,
        w_down: FloatTensor<Self>,
        bias_down: Option<FloatTensor<Self>>,
        residual: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let activation = Self::linear_swiglu(x, w_gate_up, bias_gate_up);
        Self::linear_add_rms_norm(activation, w_down, bias_down, residual, gamma, eps)
    }

    /// See [`linear_rope_cache`]; `x: [batch · seq, k]` (batch-major), `weight: [k, (n_heads +
    /// 2 · n_kv) · head_dim]`, the caches `[batch, n_kv, capacity, head_dim]`; returns `(q,
    /// k_cache, v_cache)`.
    #[allow(clippy::too_many_arguments)]
    fn linear_rope_cache(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        swap: IntTensor<Self>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        start: usize,
        n_heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        reference::linear_rope_cache_prim::<Self>(
            x, weight, bias, cos, sin, swap, k_cache, v_cache, start, n_heads,
        )
    }

    /// See [`rope`].
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        swap: IntTensor<Self>,
        rotated: usize,
    ) -> FloatTensor<Self> {
        reference::rope_prim::<Self>(x, cos, sin, swap, rotated)
    }

    /// See [`cache_write`].
    fn cache_write(
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        start: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::cache_write_prim::<Self>(k_cache, v_cache, k, v, start)
    }

    /// See [`cache_gather`].
    fn cache_gather(
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        src: &[usize],
        dst_start: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::cache_gather_prim::<Self>(k_cache, v_cache, src, dst_start)
    }

    /// See [`top_k`]; `x: [rows, cols]`, returns `[rows, k]` in `out_dtype` (an int dtype, the
    /// device's default as `argmax` uses it).
    fn top_k(x: FloatTensor<Self>, k: usize, out_dtype: DType) -> IntTensor<Self> {
        let _ = out_dtype; // `argmax` in the reference already gives the device's int dtype.
        reference::top_k_prim::<Self>(x, k)
    }
}

/// RMSNorm over the last dimension as `LlamaRMSNorm` computes it: statistics in f32,
/// `round(round(x / sqrt(mean(x²) + eps)) · gamma)`. `gamma`: `[x.last_dim]`.
///
/// # Panics
/// When `gamma` does not match the last dimension of `x`.
pub fn rms_norm<B: FusedOpsBackend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    check_gamma(&x.dims(), &gamma.dims());
    let (_, y) = B::rms_norm::<D>(
        x.into_primitive().tensor(),
        None,
        gamma.into_primitive().tensor(),
        eps,
    );
    wrap(y)
}

/// The residual add and the RMSNorm after it, in one pass: returns `h = x + residual`
/// (rounded to the dtype) and [`rms_norm`]`(h)`.
///
/// # Panics
/// When the shapes of `x` and `residual` differ, or `gamma` does not match their last
/// dimension.
pub fn add_rms_norm<B: FusedOpsBackend, const D: usize>(
    x: Tensor<B, D>,
    residual: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> (Tensor<B, D>, Tensor<B, D>) {
    assert_eq!(
        x.dims(),
        residual.dims(),
        "add_rms_norm: x and residual shapes differ"
    );
    check_gamma(&x.dims(), &gamma.dims());
    let (h, y) = B::rms_norm::<D>(
        x.into_primitive().tensor(),
        Some(residual.into_primitive().tensor()),
        gamma.into_primitive().tensor(),
        eps,
    );
    (wrap(h.expect("the sum of a residual add")), wrap(y))
}

/// SwiGLU's gate: `silu(gate) · up` (`silu(g) = g · sigmoid(g)`), rounding after each op as
/// Burn's tensor ops do. `gate` and `up` may be views (column ranges of one fused projection).
///
/// # Panics
/// When the shapes differ.
pub fn swiglu<B: FusedOpsBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    assert_eq!(gate.dims(), up.dims(), "swiglu: gate and up shapes differ");
    wrap(B::swiglu::<D>(
        gate.into_primitive().tensor(),
        up.into_primitive().tensor(),
    ))
}

/// A fused gate/up projection and SwiGLU: with `weight = [W_gate | W_up]` (`[in, 2f]`, as
/// `model` loads gate and up fused) and `bias = [b_gate | b_up]`, returns
/// `silu(x·W_gate + b_gate) · (x·W_up + b_up)`, `[..., f]`: exactly [`swiglu`] of the two
/// halves of [`fn@crate::linear`]`(x, weight, bias)`, with the same roundings.
///
/// On the plain CubeCL backend (`CubeBackend`), when the skinny product is split along K (as
/// one-row products of the large projections are), the split's reduction pass applies SwiGLU
/// itself: one launch and one round trip of the `[m, 2f]` product fewer per MLP. Otherwise
/// (one split, `Fusion`, CPU backends, `Autodiff`) it is the two ops.
///
/// # Panics
/// On inconsistent shapes or an odd output width.
pub fn linear_swiglu<B: FusedOpsBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let (m, k, n) =
        crate::linear::product_dims("linear_swiglu", &dims, weight.dims(), bias.as_ref());
    assert!(
        n.is_multiple_of(2),
        "linear_swiglu: the weight's {n} columns are not two halves"
    );
    if !crate::linear::takes_skinny(x.dtype(), m, k, n) {
        let y = crate::linear(x, weight, bias);
        return swiglu(
            y.clone().narrow(D - 1, 0, n / 2),
            y.narrow(D - 1, n / 2, n / 2),
        );
    }
    let x2: Tensor<B, 2> = x.reshape([m, k]);
    let y = B::linear_swiglu(
        x2.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        bias.map(|b| b.into_primitive().tensor()),
    );
    let mut out = dims;
    out[D - 1] = n / 2;
    wrap::<B, 2>(y).reshape(out)
}

/// A projection added to the residual stream, and the RMSNorm after it: with
/// `y = x · weight (+ bias)` ([`fn@crate::linear`]), returns `h = residual + y` and
/// [`rms_norm`]`(h, gamma)` -- exactly [`add_rms_norm`]`(residual, y, gamma, eps)`, with the
/// same roundings.
///
/// This is how a decoder layer ends its attention (`o_proj`) and its MLP (`down_proj`). On the
/// plain CubeCL backend, when the skinny product is split along K (as one-row products of the
/// large projections are), the norm's kernel adds the split's partial sums itself: the
/// product's reduction pass and one round trip of `y` disappear; `Fusion` registers one
/// operation that runs its inner backend's path. Otherwise (one split, mixed dtypes, CPU
/// backends, `Autodiff`) it is the two ops.
///
/// # Shapes
/// `x: [..., k]`, `weight: [k, n]`, `bias: [n]`, `residual: [..., n]` (the leading dimensions
/// of `x`), `gamma: [n]`; both outputs have the shape of `residual`.
///
/// # Panics
/// On inconsistent shapes.
pub fn linear_add_rms_norm<B: FusedOpsBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    residual: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> (Tensor<B, D>, Tensor<B, D>) {
    let dims = x.dims();
    let (m, k, n) =
        crate::linear::product_dims("linear_add_rms_norm", &dims, weight.dims(), bias.as_ref());
    let mut out_dims = dims;
    out_dims[D - 1] = n;
    assert_eq!(
        residual.dims(),
        out_dims,
        "linear_add_rms_norm: the residual's shape differs from the product's"
    );
    check_gamma(&out_dims, &gamma.dims());
    if !crate::linear::takes_skinny(x.dtype(), m, k, n) {
        return add_rms_norm(residual, crate::linear(x, weight, bias), gamma, eps);
    }
    let (h, y) = B::linear_add_rms_norm(
        x.reshape([m, k]).into_primitive().tensor(),
        weight.into_primitive().tensor(),
        bias.map(|b| b.into_primitive().tensor()),
        residual.reshape([m, n]).into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        eps,
    );
    (
        wrap::<B, 2>(h).reshape(out_dims),
        wrap::<B, 2>(y).reshape(out_dims),
    )
}

/// A decoder layer's MLP added to the residual stream, and the RMSNorm after it: with
/// `a = `[`linear_swiglu`]`(x, w_gate_up, bias_gate_up)` (gate and up fused, `[k, 2f]`), returns
/// [`linear_add_rms_norm`]`(a, w_down, bias_down, residual, gamma, eps)`, with the same
/// roundings.
///
/// On the plain CubeCL backend, where both products take one skinny kernel (the SIMT one for
/// a decode step's few rows, the tensor-core one for a Medusa tree step's), the down
/// projection computes SwiGLU of the gate/up product (or of its K split's partial sums) while
/// it stages its input: SwiGLU's launch, or the gate/up split's reduction pass, and one round
/// trip of the activation disappear (three launches per MLP where there were four). On tensor
/// cores only small down projections (SmolLM2's) do so: every column tile computes the
/// activation again, which costs a large one (Llama-3-8B's) more than the launch. Otherwise
/// (Burn products, `Fusion`, CPU backends, `Autodiff`) it is the two ops.
///
/// # Shapes
/// `x: [..., k]`, `w_gate_up: [k, 2f]`, `bias_gate_up: [2f]`, `w_down: [f, n]`,
/// `bias_down: [n]`, `residual: [..., n]` (the leading dimensions of `x`), `gamma: [n]`; both
/// outputs have the shape of `residual`.
///
/// # Panics
/// On inconsistent shapes.
#[allow(clippy::too_many_arguments)]
pub fn mlp_add_rms_norm<B: FusedOpsBackend, const D: usize>(
    x: Tensor<B, D>,
    w_gate_up: Tensor<B, 2>,
    bias_gate_up: Option<Tensor<B, 1>>,
    w_down: Tensor<B, 2>,
    bias_down: Option<Tensor<B, 1>>,
    residual: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> (Tensor<B, D>, Tensor<B, D>) {
    let dims = x.dims();
    let (m, k, n2) = crate::linear::product_dims(
        "mlp_add_rms_norm",
        &dims,
        w_gate_up.dims(),
        bias_gate_up.as_ref(),
    );
    let [f, n] = w_down.dims();
    assert_eq!(
        n2,
        2 * f,
        "mlp_add_rms_norm: the gate/up weight has {n2} columns for a down projection of {f} rows"
    );
    if !(crate::linear::takes_skinny(x.dtype(), m, k, n2)
        && crate::linear::takes_skinny(x.dtype(), m, f, n))
    {
        let activation = linear_swiglu(x, w_gate_up, bias_gate_up);
        return linear_add_rms_norm(activation, w_down, bias_down, residual, gamma, eps);
    }
    let mut act_dims = dims;
    act_dims[D - 1] = f;
    crate::linear::product_dims("mlp_add_rms_norm", &act_dims, [f, n], bias_down.as_ref());
    let mut out_dims = dims;
    out_dims[D - 1] = n;
    assert_eq!(
        residual.dims(),
        out_dims,
        "mlp_add_rms_norm: the residual's shape differs from the product's"
    );
    check_gamma(&out_dims, &gamma.dims());
    let (h, y) = B::mlp_add_rms_norm(
        x.reshape([m, k]).into_primitive().tensor(),
        w_gate_up.into_primitive().tensor(),
        bias_gate_up.map(|b| b.into_primitive().tensor()),
        w_down.into_primitive().tensor(),
        bias_down.map(|b| b.into_primitive().tensor()),
        residual.reshape([m, n]).into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        eps,
    );
    (
        wrap::<B, 2>(h).reshape(out_dims),
        wrap::<B, 2>(y).reshape(out_dims),
    )
}

/// A fused q/k/v projection, RoPE and the KV-cache append: with `y = x · weight (+ bias)`
/// ([`fn@crate::linear`]) split into `n_heads` query heads, then key and value heads of the
/// caches' `head_dim` (`weight: [k, (n_heads + 2 · n_kv) · head_dim]`), returns the rotated
/// queries `q: [batch, n_heads, seq, head_dim]` and the caches with the rotated keys and the
/// values written to rows `start..start + seq` -- exactly [`rope`] of the product's heads
/// (`rotated = n_heads + n_kv`) followed by [`cache_write`], with the same roundings.
///
/// This is how a decoder layer's attention begins. On the plain CubeCL backend, where a skinny
/// kernel takes the product, one kernel follows it: it rotates and writes the heads, and when
/// the product is split along K (as one-row products of large projections are) it also adds
/// the split's partial sums, so the product's reduction pass, the RoPE pass and the cache write
/// become one launch (a Medusa tree's rows: RoPE and the cache write, two launches, become
/// one). `Fusion` registers one operation that runs its inner backend's path. Otherwise (mixed
/// dtypes, CPU backends, `Autodiff`, more rows than a skinny kernel takes, folding off: see
/// [`crate::fold_reductions`]) it is the ops in a row.
///
/// `x: [batch, seq, k]`; `cos`, `sin`, `swap` as for [`rope`] (`[seq, head_dim]` rows for
/// these tokens' positions); `k_cache`, `v_cache`: `[batch, n_kv, capacity, head_dim]`,
/// written in place when uniquely owned (pass them by value and drop other clones).
///
/// # Panics
/// On inconsistent shapes or `start + seq > capacity`.
#[allow(clippy::too_many_arguments)]
pub fn linear_rope_cache<B: FusedOpsBackend>(
    x: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    swap: Tensor<B, 1, Int>,
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    start: usize,
    n_heads: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, seq, _] = x.dims();
    let (m, k, n) =
        crate::linear::product_dims("linear_rope_cache", &x.dims(), weight.dims(), bias.as_ref());
    let [cb, n_kv, cap, d] = cache_dims("linear_rope_cache", &k_cache, &v_cache);
    assert!(
        cb == b && d % 2 == 0 && n == (n_heads + 2 * n_kv) * d,
        "linear_rope_cache: a [{b}, {seq}, {n}] projection does not hold {n_heads} query and \
         2 x {n_kv} key/value heads of the [{cb}, {n_kv}, {cap}, {d}] cache"
    );
    assert!(
        start + seq <= cap,
        "linear_rope_cache: rows {start}..{} do not fit a cache of {cap}",
        start + seq
    );
    assert_eq!(
        cos.dims(),
        [seq, d],
        "linear_rope_cache: cos must be [{seq}, {d}]"
    );
    assert_eq!(
        sin.dims(),
        [seq, d],
        "linear_rope_cache: sin must be [{seq}, {d}]"
    );
    assert_eq!(swap.dims(), [d], "linear_rope_cache: swap must be [{d}]");
    let prim = |t: Tensor<B, 2>| t.into_primitive().tensor();
    let (q, kc, vc) = if crate::linear::takes_skinny(x.dtype(), m, k, n) {
        B::linear_rope_cache(
            prim(x.reshape([m, k])),
            prim(weight),
            bias.map(|b| b.into_primitive().tensor()),
            prim(cos),
            prim(sin),
            swap.into_primitive(),
            k_cache.into_primitive().tensor(),
            v_cache.into_primitive().tensor(),
            start,
            n_heads,
        )
    } else {
        // Burn's linear for many rows, then the backend's RoPE and cache write.
        reference::rope_cache_prim::<B>(
            prim(crate::linear(x, weight, bias).reshape([m, n])),
            prim(cos),
            prim(sin),
            swap.into_primitive(),
            k_cache.into_primitive().tensor(),
            v_cache.into_primitive().tensor(),
            start,
            n_heads,
        )
    };
    (wrap(q), wrap(kc), wrap(vc))
}

/// Rotary embeddings ("rotate half" convention) on `x: [batch, seq, heads, head_dim]` (a
/// projection's output with its last dimension split into heads; any strides), returned
/// head-major as `[batch, heads, seq, head_dim]` as attention wants it. Only the first
/// `rotated` heads are rotated; the others are copied, so that the q, k and v of one fused
/// projection go through one call (`rotated = n_heads + n_kv_heads`).
///
/// `cos`, `sin`: `[seq, head_dim]`, the rows of each position, with the sign of `rotate_half`
/// folded into `sin` (`-sin` in the first half of each row); `swap`: `[head_dim]`,
/// `(i + head_dim / 2) % head_dim`, the dimension each one rotates with (the reference path's
/// `select` index; kernels compute it).
///
/// # Panics
/// On inconsistent shapes or an odd `head_dim`.
pub fn rope<B: FusedOpsBackend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    swap: Tensor<B, 1, Int>,
    rotated: usize,
) -> Tensor<B, 4> {
    let [_, seq, _, d] = x.dims();
    assert!(d % 2 == 0, "rope: head_dim {d} is odd");
    assert_eq!(cos.dims(), [seq, d], "rope: cos must be [{seq}, {d}]");
    assert_eq!(sin.dims(), [seq, d], "rope: sin must be [{seq}, {d}]");
    assert_eq!(swap.dims(), [d], "rope: swap must be [{d}]");
    wrap(B::rope(
        x.into_primitive().tensor(),
        cos.into_primitive().tensor(),
        sin.into_primitive().tensor(),
        swap.into_primitive(),
        rotated,
    ))
}

/// Appends new keys and values to a preallocated KV cache: `k`, `v` (`[batch, heads, n,
/// head_dim]`, any strides, e.g. head ranges of [`rope`]'s output) go to rows
/// `start..start + n` of `k_cache`, `v_cache` (`[batch, heads, capacity, head_dim]`), which are
/// returned. One launch for both caches on CubeCL backends, writing in place when the caches
/// are uniquely owned (pass them by value and drop other clones), as `slice_assign` does.
///
/// # Panics
/// On inconsistent shapes or `start + n > capacity`.
pub fn cache_write<B: FusedOpsBackend>(
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    start: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, cap, d] = cache_dims("cache_write", &k_cache, &v_cache);
    let [kb, kh, n, kd] = k.dims();
    assert_eq!(v.dims(), k.dims(), "cache_write: k and v differ");
    assert!(
        (kb, kh, kd) == (b, h, d) && start + n <= cap,
        "cache_write: [{kb}, {kh}, {n}, {kd}] at row {start} does not fit a [{b}, {h}, {cap}, {d}] cache"
    );
    let (kc, vc) = B::cache_write(
        k_cache.into_primitive().tensor(),
        v_cache.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        start,
    );
    (wrap(kc), wrap(vc))
}

/// Most rows one [`cache_gather`] moves (a Medusa path is the tree's depth + 1 rows).
pub const CACHE_GATHER_MAX_ROWS: usize = 16;

/// Whether [`cache_gather`] can move rows `src` to `dst_start..`: at most
/// [`CACHE_GATHER_MAX_ROWS`] rows, and no source row inside the destination range before its
/// own destination (`dst_start <= src[i] < dst_start + i`), since rows move in increasing order
/// and such a row would be overwritten before it is read. Medusa's accepted paths always
/// qualify: a node's index in the tree is at least its depth.
pub fn cache_gather_supports(src: &[usize], dst_start: usize) -> bool {
    src.len() <= CACHE_GATHER_MAX_ROWS
        && src
            .iter()
            .enumerate()
            .all(|(i, &r)| !(dst_start..dst_start + i).contains(&r))
}

/// Moves rows `src[i]` of both KV caches (`[batch, heads, capacity, head_dim]`) to rows
/// `dst_start + i` (all rows read before any is written) and returns the caches: Medusa's
/// commit of the accepted path after the prefix. One launch for both caches on CubeCL backends
/// where [`cache_gather_supports`] the rows (instead of a `select` and a `slice_assign` for
/// each; other rows take those), in place when the caches are uniquely owned.
///
/// # Panics
/// When a row is outside the cache or the caches differ in shape.
pub fn cache_gather<B: FusedOpsBackend>(
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    src: &[usize],
    dst_start: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [_, _, cap, _] = cache_dims("cache_gather", &k_cache, &v_cache);
    assert!(
        dst_start + src.len() <= cap && src.iter().all(|&r| r < cap),
        "cache_gather: rows {src:?} to {dst_start}.. do not fit a cache of {cap} rows"
    );
    let (kc, vc) = B::cache_gather(
        k_cache.into_primitive().tensor(),
        v_cache.into_primitive().tensor(),
        src,
        dst_start,
    );
    (wrap(kc), wrap(vc))
}

/// Most entries [`top_k`] takes per row on the kernel path (its lists live in registers and
/// shared memory); larger `k` takes the reference.
pub const TOP_K_MAX: usize = 32;

/// Column indices of the `k` largest entries of each row of `x` (`[rows, cols]` to
/// `[rows, k]`), largest first, in the device's default int dtype: Medusa's candidates, the
/// top-k tokens of each head's logits. On CubeCL backends one launch for all rows (two for a
/// few long rows: the best `k` of each segment of a row, then their merge); elsewhere,
/// and for `k` past [`TOP_K_MAX`], the reference: `k` rounds of argmax and masking the winner
/// (three launches a round on a GPU). Burn's own `argtopk` is no portable alternative: Flex
/// (the default CPU backend) does not implement it. Equal values: the kernel ranks the lower
/// index first, the reference as `argmax` picks. Rows must be free of NaN.
///
/// # Panics
/// When `k` is 0 or larger than the row length.
pub fn top_k<B: FusedOpsBackend>(x: Tensor<B, 2>, k: usize) -> Tensor<B, 2, Int> {
    let [_, cols] = x.dims();
    assert!(
        k >= 1 && k <= cols,
        "top_k: k = {k} for rows of {cols} entries"
    );
    let out_dtype = burn::tensor::get_device_settings::<B>(&x.device())
        .int_dtype
        .into();
    Tensor::from_primitive(B::top_k(x.into_primitive().tensor(), k, out_dtype))
}

/// The key cache's `[batch, heads, capacity, head_dim]`, checked against the value cache's.
fn cache_dims<B: burn::tensor::backend::Backend>(
    op: &str,
    k_cache: &Tensor<B, 4>,
    v_cache: &Tensor<B, 4>,
) -> [usize; 4] {
    let dims = k_cache.dims();
    assert_eq!(v_cache.dims(), dims, "{op}: key and value caches differ");
    dims
}

fn check_gamma(x: &[usize], gamma: &[usize; 1]) {
    let last = x[x.len() - 1];
    assert_eq!(
        gamma[0], last,
        "rms_norm: gamma has {} entries for rows of {last}",
        gamma[0]
    );
}

fn wrap<B: burn::tensor::backend::Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The kernel path for f32, f16 and bf16; other dtypes, and [`crate::kernels_enabled`] off,
/// take the reference.
impl<R, F, I, BT> FusedOpsBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn rms_norm<const D: usize>(
        x: FloatTensor<Self>,
        residual: Option<FloatTensor<Self>>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> (Option<FloatTensor<Self>>, FloatTensor<Self>) {
        if !crate::kernels_enabled() || !launch::supported(x.dtype) {
            return reference::rms_norm_prim::<Self, D>(x, residual, gamma, eps);
        }
        launch::rms_norm(x, residual, gamma, eps)
    }

    fn swiglu<const D: usize>(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        if !crate::kernels_enabled() || !launch::supported(gate.dtype) {
            return reference::swiglu_prim::<Self, D>(gate, up);
        }
        launch::swiglu(gate, up)
    }

    /// The skinny kernel `linear_skinny` would run, with SwiGLU in its K-split reduction where
    /// it splits; the two ops otherwise (the reference where no kernel takes the product).
    fn linear_swiglu(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        let Some(tensor_cores) = fold_on(&x, &weight, bias.as_ref(), &[]) else {
            return reference::linear_swiglu_prim::<Self>(x, weight, bias);
        };
        let tuning = crate::linear::LinearTuning::default();
        let product = crate::linear::launch::product_on(tensor_cores, x, weight, bias, &tuning);
        let (y, done) = crate::linear::launch::finish(product, true);
        if done {
            y
        } else {
            reference::swiglu_halves::<Self>(y)
        }
    }

    /// The skinny kernel `linear_skinny` would run; where it splits K, the norm's kernel adds
    /// the partial sums (one launch for the split's reduction and the norm). Otherwise the
    /// product's own output goes through the `add_rms_norm` kernel.
    fn linear_add_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        residual: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let Some(tensor_cores) = fold_on(&x, &weight, bias.as_ref(), &[&residual]) else {
            return reference::linear_add_rms_norm_prim::<Self>(
                x, weight, bias, residual, gamma, eps,
            );
        };
        let tuning = crate::linear::LinearTuning::default();
        let (h, normed, _) = launch::linear_add_rms_norm(
            x,
            weight,
            bias,
            residual,
            gamma,
            eps,
            tensor_cores,
            &tuning,
        );
        (h, normed)
    }

    /// Both products on one skinny kernel (SIMT, or tensor cores for a tree step's rows where
    /// the down projection is small), SwiGLU computed by the down projection as it stages its
    /// input, and the norm adding the down projection's partial sums where it splits
    /// ([`launch::mlp_add_rms_norm`]); the two ops where the products would take different
    /// kernels or none, or large products on tensor cores.
    fn mlp_add_rms_norm(
        x: FloatTensor<Self>,
        w_gate_up: FloatTensor<Self>,
        bias_gate_up: Option<FloatTensor<Self>>,
        w_down: FloatTensor<Self>,
        bias_down: Option<FloatTensor<Self>>,
        residual: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        use crate::linear::launch::{cmma_folds_swiglu, supported_input};
        // The down projection's kernel is the one its input, `[m, f]` in x's dtype, would take;
        // on tensor cores only small products fold (see `cmma_folds_swiglu`).
        let (dtype, m) = (x.dtype, x.meta.shape()[0]);
        let fold = match fold_on(&x, &w_gate_up, bias_gate_up.as_ref(), &[&residual]) {
            Some(false) => supported_input(dtype, m, &w_down, bias_down.as_ref()).then_some(false),
            Some(true) => cmma_folds_swiglu(dtype, m, &w_down, bias_down.as_ref()).then_some(true),
            None => None,
        };
        let Some(tensor_cores) = fold.filter(|_| crate::mlp_fold()) else {
            let activation = Self::linear_swiglu(x, w_gate_up, bias_gate_up);
            return Self::linear_add_rms_norm(activation, w_down, bias_down, residual, gamma, eps);
        };
        let tuning = crate::linear::LinearTuning::default();
        launch::mlp_add_rms_norm(
            x,
            w_gate_up,
            bias_gate_up,
            w_down,
            bias_down,
            residual,
            gamma,
            eps,
            tensor_cores,
            &tuning,
        )
    }

    /// The skinny kernel `linear_skinny` would run, then one kernel (finishing the product's K
    /// split where it has one) rotates and writes the heads. `swap` is for the reference path;
    /// the kernel computes each dimension's partner.
    fn linear_rope_cache(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        swap: IntTensor<Self>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        start: usize,
        n_heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let Some(tensor_cores) = fold_on(&x, &weight, bias.as_ref(), &[&k_cache, &v_cache]) else {
            return reference::linear_rope_cache_prim::<Self>(
                x, weight, bias, cos, sin, swap, k_cache, v_cache, start, n_heads,
            );
        };
        let tuning = crate::linear::LinearTuning::default();
        launch::linear_rope_cache(
            x,
            weight,
            bias,
            cos,
            sin,
            k_cache,
            v_cache,
            start,
            n_heads,
            tensor_cores,
            &tuning,
        )
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        swap: IntTensor<Self>,
        rotated: usize,
    ) -> FloatTensor<Self> {
        if !crate::kernels_enabled() || !launch::supported(x.dtype) {
            return reference::rope_prim::<Self>(x, cos, sin, swap, rotated);
        }
        launch::rope(x, cos, sin, rotated)
    }

    fn cache_write(
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        start: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !crate::kernels_enabled() || !launch::supported(k_cache.dtype) {
            return reference::cache_write_prim::<Self>(k_cache, v_cache, k, v, start);
        }
        launch::cache_write(k_cache, v_cache, k, v, start)
    }

    fn cache_gather(
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        src: &[usize],
        dst_start: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !crate::kernels_enabled()
            || !launch::supported(k_cache.dtype)
            || !cache_gather_supports(src, dst_start)
        {
            return reference::cache_gather_prim::<Self>(k_cache, v_cache, src, dst_start);
        }
        launch::cache_gather(k_cache, v_cache, src, dst_start)
    }

    fn top_k(x: FloatTensor<Self>, k: usize, out_dtype: DType) -> IntTensor<Self> {
        if !crate::kernels_enabled() || !launch::supported(x.dtype) || k > TOP_K_MAX {
            return reference::top_k_prim::<Self>(x, k);
        }
        launch::top_k(x, k, out_dtype)
    }
}

/// How a CubeCL backend folds the K split of `x · w (+ bias)` into the op that reads it:
/// `Some(tensor_cores)`, the skinny kernel the product runs on ([`crate::linear::LinearBackend`]'s
/// choice); `None` for the ops in a row -- folding off ([`crate::fold_reductions`]), a dtype
/// the kernels do not take, a `consumer` operand in another dtype than `x` (the fused kernels
/// compute in one), or no skinny kernel for the product.
fn fold_on<R: CubeRuntime>(
    x: &CubeTensor<R>,
    w: &CubeTensor<R>,
    bias: Option<&CubeTensor<R>>,
    consumer: &[&CubeTensor<R>],
) -> Option<bool> {
    use crate::linear::{SkinnyKernel, skinny_kernel};
    let same_dtype = consumer.iter().all(|t| t.dtype == x.dtype);
    if !(crate::fold_reductions() && launch::supported(x.dtype) && same_dtype) {
        return None;
    }
    skinny_kernel(x, w, bias).map(|k| matches!(k, SkinnyKernel::TensorCores))
}

#[cfg(feature = "flex")]
impl FusedOpsBackend for burn::backend::Flex {}

#[cfg(feature = "ndarray")]
impl<E, I, Q> FusedOpsBackend for burn::backend::NdArray<E, I, Q>
where
    burn::backend::NdArray<E, I, Q>: burn::tensor::backend::Backend,
    burn::backend::ndarray::NdArrayTensor:
        From<burn::backend::ndarray::SharedArray<E>> + From<burn::backend::ndarray::SharedArray<I>>,
{
}

/// Autodiff takes the differentiable reference (the kernels have no backward pass).
#[cfg(feature = "autodiff")]
impl<B, C> FusedOpsBackend for burn::backend::Autodiff<B, C>
where
    B: FusedOpsBackend,
    C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy,
{
}
