#![warn(missing_docs)]
//! Attention for LLM decoding, written in CubeCL and exposed to Burn as a backend extension.
//!
//! The one entry point is [`flash_attention`]: `softmax(Q Kᵀ · scale + mask) V` for `q_len` new
//! queries against a key/value buffer whose first `kv_len` rows are valid. The last `q_len` of
//! those rows are the new tokens themselves; everything before them (the *prefix*, i.e. the KV
//! cache) is always visible. How the new queries see the new keys is an [`AttentionMask`]:
//! all of them, causally (prefill, chunked prefill, single-token decode) or through an explicit
//! boolean matrix (Medusa's tree).
//!
//! Backends opt in through [`FlashAttentionBackend`]:
//! - `CubeBackend<R, F, I, BT>` for any CubeCL runtime `R` (CUDA, wgpu, ...) runs the kernels in
//!   [`cube`]: a tiled online-softmax kernel for prefill and a split-KV (flash-decoding) kernel for
//!   decode and small trees, with a tensor-core (`cmma`) variant of the prefill kernel for
//!   f16/bf16 on CUDA (set `BURN_DECODE_CMMA=0` to keep the SIMT kernel);
//! - `Fusion<B>` (what `burn::backend::Cuda` is with Burn's `fusion` feature) forwards to the
//!   kernel of its inner backend as a custom fusion operation;
//! - the CPU backends (`flex`, `ndarray`) and `Autodiff<B>` use [`attention_reference`], written
//!   with Burn tensor ops. The kernels have no backward pass, so autodiff always takes the
//!   reference path and gets exact gradients.
//!
//! Beside attention: [`mod@linear`] (a skinny matrix product for decode steps and Medusa trees, with
//! a tensor-core variant for f16/bf16 trees on CUDA) and
//! the fused decoder ops of [`fused`] (RMSNorm with the residual add, SwiGLU, RoPE, the KV-cache
//! append), each one kernel launch, because a batch-1 decode step is dominated by launches.
//!
//! The crate knows nothing about any model: shapes are `[batch, heads, seq, head_dim]`, with
//! grouped-query attention expressed by `k`/`v` having fewer heads than `q`.

mod args;
mod backends;
pub mod cube;
pub mod fused;
pub mod linear;
mod options;
mod reference;

pub use fused::{
    CACHE_GATHER_MAX_ROWS, FusedOpsBackend, TOP_K_MAX, add_rms_norm, cache_gather,
    cache_gather_supports, cache_write, linear_add_rms_norm, linear_rope_cache, linear_swiglu,
    mlp_add_rms_norm, rms_norm, rope, swiglu, top_k,
};
pub use linear::{LinearBackend, linear, linear_max_m, set_linear_max_m};
pub use options::{AttentionMask, FlashAttentionOptions};
pub use reference::{attention_reference, visibility_mask};

use burn::tensor::{
    Bool, Tensor, TensorPrimitive,
    backend::Backend,
    ops::{BoolTensor, FloatTensor},
};

/// A process-wide on/off switch initialised from an environment variable on first use.
struct Switch {
    state: std::sync::atomic::AtomicU8,
    /// The variable, and the value of it that means off.
    env: &'static str,
    off: &'static str,
}

impl Switch {
    const UNSET: u8 = 0;
    const ON: u8 = 1;
    const OFF: u8 = 2;

    const fn new(env: &'static str, off: &'static str) -> Self {
        Self {
            state: std::sync::atomic::AtomicU8::new(Self::UNSET),
            env,
            off,
        }
    }

    fn get(&self) -> bool {
        use std::sync::atomic::Ordering;
        match self.state.load(Ordering::Relaxed) {
            Self::ON => true,
            Self::OFF => false,
            _ => {
                // The environment decides only if no `set` came first.
                let on = std::env::var(self.env).as_deref() != Ok(self.off);
                let state = if on { Self::ON } else { Self::OFF };
                match self.state.compare_exchange(
                    Self::UNSET,
                    state,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => on,
                    Err(current) => current == Self::ON,
                }
            }
        }
    }

    fn set(&self, on: bool) {
        let state = if on { Self::ON } else { Self::OFF };
        self.state
            .store(state, std::sync::atomic::Ordering::Relaxed);
    }
}

static KERNELS: Switch = Switch::new("BURN_DECODE_ATTENTION", "reference");
static FOLD: Switch = Switch::new("BURN_DECODE_FOLD", "0");
static MLP_FOLD: Switch = Switch::new("BURN_DECODE_MLP_FOLD", "0");
static REGISTER_MMA: Switch = Switch::new("BURN_DECODE_MMA", "0");
static TENSOR_CORES: Switch = Switch::new("BURN_DECODE_CMMA", "0");

/// Whether CubeCL backends run the kernels (default) or the tensor-op reference: the "stock
/// Burn" baseline of the benchmarks, and an escape hatch when debugging. Initialised from
/// `BURN_DECODE_ATTENTION=reference`.
pub fn kernels_enabled() -> bool {
    KERNELS.get()
}

/// Switches the CubeCL kernels on or off for the whole process (see [`kernels_enabled`]).
pub fn set_kernels_enabled(on: bool) {
    KERNELS.set(on)
}

/// Whether CubeCL backends fold a skinny product's K-split reduction into the op that consumes
/// it ([`linear_swiglu`]'s SwiGLU, [`linear_add_rms_norm`]'s residual add and norm,
/// [`linear_rope_cache`]'s RoPE and cache write; default) or
/// finish the product first and run the op after it (one launch more each, same values): the
/// benchmark's measure of what folding saves. Off, [`linear_rope_cache`] also runs RoPE and
/// the cache write as two launches after a product that did not split (a Medusa tree's rows),
/// which on is one. Initialised from `BURN_DECODE_FOLD=0` (off).
pub fn fold_reductions() -> bool {
    FOLD.get()
}

/// Switches [`fold_reductions`] on or off for the whole process.
pub fn set_fold_reductions(on: bool) {
    FOLD.set(on)
}

/// Whether CubeCL backends run [`mlp_add_rms_norm`] with SwiGLU computed by the down projection
/// as it stages its input (default, where both products take one skinny kernel -- on tensor
/// cores only for small down projections -- and
/// [`fold_reductions`] is on) or as [`linear_swiglu`] then [`linear_add_rms_norm`] (one launch
/// more per MLP, same values): the benchmark's measure of that launch. Initialised from
/// `BURN_DECODE_MLP_FOLD=0` (off).
pub fn mlp_fold() -> bool {
    MLP_FOLD.get()
}

/// Switches [`mlp_fold`] on or off for the whole process.
pub fn set_mlp_fold(on: bool) {
    MLP_FOLD.set(on)
}

/// Whether f16/bf16 prefill attention on CUDA runs the register-level `mma.sync` kernel
/// ([`cube::mma`]; default) where it applies, or the `wmma` kernel ([`cube::cmma`]) that keeps
/// scores and output in shared memory: the benchmark's measure of the difference. Initialised
/// from `BURN_DECODE_MMA=0` (off).
pub fn register_mma() -> bool {
    REGISTER_MMA.get()
}

/// Switches [`register_mma`] on or off for the whole process.
pub fn set_register_mma(on: bool) {
    REGISTER_MMA.set(on)
}

/// A Burn backend that can run [`flash_attention`].
///
/// Implemented for every CubeCL backend (kernel path), `Fusion` over those, the CPU backends
/// enabled by this crate's features, and `Autodiff` over any of them (reference path).
pub trait FlashAttentionBackend: FusedOpsBackend {
    /// Backend-level attention; see [`flash_attention`] for the contract.
    ///
    /// `tree_mask`, when present, is a `[q_len, q_len]` boolean matrix where `true` means the new
    /// query `i` may attend to the new key `j`; it overrides `options.causal`.
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tree_mask: Option<BoolTensor<Self>>,
        options: FlashAttentionOptions,
    ) -> FloatTensor<Self>;
}

/// Attention of `q_len` new queries against the first `kv_len` rows of `k`/`v`.
///
/// # Shapes
/// - `q`: `[batch, n_heads, q_len, head_dim]`
/// - `k`, `v`: `[batch, n_kv_heads, kv_capacity, head_dim]`, with `n_heads % n_kv_heads == 0` and
///   `q_len <= kv_len <= kv_capacity` (rows from `kv_len` on are ignored, so a preallocated cache
///   can be passed as is).
/// - output: `[batch, n_heads, q_len, head_dim]`, in the dtype of `q`. On the CubeCL backends,
///   for more than one query, a view of a `[batch, q_len, n_heads, head_dim]` buffer, so that
///   `swap_dims(1, 2)` and merging the heads into `[batch, q_len, n_heads · head_dim]` (the
///   output projection's input) cost no copy.
///
/// Query head `h` reads key/value head `h / (n_heads / n_kv_heads)`, as in Hugging Face's
/// `repeat_kv`. The new queries sit at absolute positions `kv_len - q_len .. kv_len`.
///
/// # Example
/// A three-node Medusa tree (a root and two children) verified against a 5-token prefix in a
/// cache preallocated for 16 rows, with 4 query heads sharing 2 KV heads. Any backend works:
/// `Flex` runs the reference path, `CubeBackend`/`Cuda`/`Wgpu` the kernels.
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{Bool, Distribution, Tensor, TensorData};
/// use kernels::{AttentionMask, FlashAttentionOptions, flash_attention};
///
/// let device = Default::default();
/// let (prefix, nodes, head_dim) = (5, 3, 64);
/// let q = Tensor::<Flex, 4>::random([1, 4, nodes, head_dim], Distribution::Default, &device);
/// // K/V rows: the prefix, then the tree's nodes, then unused capacity.
/// let k = Tensor::<Flex, 4>::random([1, 2, 16, head_dim], Distribution::Default, &device);
/// let v = Tensor::<Flex, 4>::random([1, 2, 16, head_dim], Distribution::Default, &device);
/// // Node i sees node j when j is i or one of its ancestors (both children hang off the root).
/// let tree = [[true, false, false], [true, true, false], [true, false, true]];
/// let mask = Tensor::<Flex, 2, Bool>::from_data(TensorData::from(tree), &device);
/// let options = FlashAttentionOptions::new(head_dim, prefix + nodes);
/// let out = flash_attention(q, k, v, AttentionMask::Tree(mask), options);
/// assert_eq!(out.dims(), [1, 4, nodes, head_dim]);
/// ```
///
/// # Panics
/// On inconsistent shapes (these are programming errors, not data errors).
pub fn flash_attention<B: FlashAttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: AttentionMask<B>,
    options: FlashAttentionOptions,
) -> Tensor<B, 4> {
    check_shapes(&q.dims(), &k.dims(), &v.dims(), &mask, &options);
    let (tree, options) = match mask {
        AttentionMask::Tree(tree) => (Some(tree.into_primitive()), options.with_causal(false)),
        AttentionMask::Causal => (None, options.with_causal(true)),
        AttentionMask::None => (None, options.with_causal(false)),
    };
    let out = B::flash_attention(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        tree,
        options,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn check_shapes<B: Backend>(
    q: &[usize; 4],
    k: &[usize; 4],
    v: &[usize; 4],
    mask: &AttentionMask<B>,
    options: &FlashAttentionOptions,
) {
    let [b, h, q_len, d] = *q;
    assert_eq!(
        k, v,
        "flash_attention: k and v shapes differ: {k:?} vs {v:?}"
    );
    let [kb, kh, cap, kd] = *k;
    assert_eq!(
        b, kb,
        "flash_attention: batch of q ({b}) and k ({kb}) differ"
    );
    assert_eq!(
        d, kd,
        "flash_attention: head_dim of q ({d}) and k ({kd}) differ"
    );
    assert!(
        kh > 0 && h % kh == 0,
        "flash_attention: {h} query heads are not a multiple of {kh} key/value heads"
    );
    let kv_len = options.kv_len;
    assert!(
        q_len <= kv_len && kv_len <= cap,
        "flash_attention: need q_len ({q_len}) <= kv_len ({kv_len}) <= kv capacity ({cap})"
    );
    if let AttentionMask::Tree(t) = mask {
        assert_eq!(
            t.dims(),
            [q_len, q_len],
            "flash_attention: tree mask must be [q_len, q_len]"
        );
    }
}

/// Convenience: the `[q_len, q_len]` tree mask as a tensor from row-major booleans.
pub fn tree_mask_from_rows<B: Backend>(
    rows: &[bool],
    q_len: usize,
    device: &B::Device,
) -> Tensor<B, 2, Bool> {
    assert_eq!(
        rows.len(),
        q_len * q_len,
        "tree mask must have q_len² entries"
    );
    Tensor::from_data(
        burn::tensor::TensorData::new(rows.to_vec(), [q_len, q_len]),
        device,
    )
}
