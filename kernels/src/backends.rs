//! [`FlashAttentionBackend`] for backends without a kernel: the reference path.

use burn::tensor::{
    Tensor, TensorPrimitive,
    ops::{BoolTensor, FloatTensor},
};

use crate::{FlashAttentionBackend, FlashAttentionOptions, attention_reference};

/// Runs [`attention_reference`] on backend primitives.
pub(crate) fn reference_on_primitives<B: burn::tensor::backend::Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    tree_mask: Option<BoolTensor<B>>,
    options: FlashAttentionOptions,
) -> FloatTensor<B> {
    let wrap = |t| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t));
    attention_reference(
        wrap(q),
        wrap(k),
        wrap(v),
        tree_mask.map(Tensor::from_primitive),
        options,
    )
    .into_primitive()
    .tensor()
}

#[cfg(feature = "flex")]
impl FlashAttentionBackend for burn::backend::Flex {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tree_mask: Option<BoolTensor<Self>>,
        options: FlashAttentionOptions,
    ) -> FloatTensor<Self> {
        reference_on_primitives::<Self>(q, k, v, tree_mask, options)
    }
}

#[cfg(feature = "ndarray")]
impl<E, I, Q> FlashAttentionBackend for burn::backend::NdArray<E, I, Q>
where
    burn::backend::NdArray<E, I, Q>: burn::tensor::backend::Backend,
    burn::backend::ndarray::NdArrayTensor:
        From<burn::backend::ndarray::SharedArray<E>> + From<burn::backend::ndarray::SharedArray<I>>,
{
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tree_mask: Option<BoolTensor<Self>>,
        options: FlashAttentionOptions,
    ) -> FloatTensor<Self> {
        reference_on_primitives::<Self>(q, k, v, tree_mask, options)
    }
}

/// Autodiff always takes the reference path: the kernels have no backward pass, and the
/// reference built from differentiable ops gives exact gradients.
#[cfg(feature = "autodiff")]
impl<B, C> FlashAttentionBackend for burn::backend::Autodiff<B, C>
where
    B: FlashAttentionBackend,
    C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy,
{
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tree_mask: Option<BoolTensor<Self>>,
        options: FlashAttentionOptions,
    ) -> FloatTensor<Self> {
        reference_on_primitives::<Self>(q, k, v, tree_mask, options)
    }
}
