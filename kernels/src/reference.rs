//! Attention with plain Burn tensor ops: the definition the kernels are tested against, and the
//! implementation on backends without a kernel (CPU backends, autodiff).

use burn::tensor::{Bool, DType, Tensor, TensorData, activation::softmax, backend::Backend};

use crate::FlashAttentionOptions;

/// `[q_len, kv_len]` mask of *hidden* positions (`true` = masked out), for new queries placed at
/// the end of a `kv_len`-long key sequence.
///
/// The prefix `0..kv_len - q_len` is visible to every query; among the new tokens, visibility is
/// `tree` (`true` = visible) if given, else causal or full according to `causal`.
pub fn visibility_mask<B: Backend>(
    tree: Option<Tensor<B, 2, Bool>>,
    q_len: usize,
    kv_len: usize,
    causal: bool,
    device: &B::Device,
) -> Option<Tensor<B, 2, Bool>> {
    let prefix = kv_len - q_len;
    let new_part = match tree {
        Some(tree) => tree.bool_not(),
        None if causal && q_len > 1 => {
            let hidden: Vec<bool> = (0..q_len)
                .flat_map(|i| (0..q_len).map(move |j| j > i))
                .collect();
            Tensor::from_data(TensorData::new(hidden, [q_len, q_len]), device)
        }
        None => return None,
    };
    if prefix == 0 {
        return Some(new_part);
    }
    let visible_prefix = Tensor::<B, 2, Bool>::from_data(
        TensorData::new(vec![false; q_len * prefix], [q_len, prefix]),
        device,
    );
    Some(Tensor::cat(vec![visible_prefix, new_part], 1))
}

/// Reference attention (see [`crate::flash_attention`] for the contract).
///
/// Grouped-query attention is computed by folding the query heads that share a key/value head
/// into the sequence axis (`[b, n_kv, group * q_len, d]`), so K and V are never repeated.
/// Scores and softmax run in f32 whatever the input dtype, as the kernels accumulate in f32.
pub fn attention_reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    tree: Option<Tensor<B, 2, Bool>>,
    options: FlashAttentionOptions,
) -> Tensor<B, 4> {
    let [b, h, q_len, d] = q.dims();
    let [_, h_kv, _, _] = k.dims();
    let group = h / h_kv;
    let kv_len = options.kv_len;
    let dtype = q.dtype();
    let device = q.device();

    let k = k.slice([0..b, 0..h_kv, 0..kv_len, 0..d]);
    let v = v.slice([0..b, 0..h_kv, 0..kv_len, 0..d]);
    let q = q.reshape([b, h_kv, group * q_len, d]);

    let mut scores = q.matmul(k.swap_dims(2, 3)).cast(DType::F32) * options.scale;
    if let Some(hidden) = visibility_mask(tree, q_len, kv_len, options.causal, &device) {
        let hidden = hidden
            .reshape([1, 1, 1, q_len, kv_len])
            .expand([b, h_kv, group, q_len, kv_len])
            .reshape([b, h_kv, group * q_len, kv_len]);
        scores = scores.mask_fill(hidden, f32::NEG_INFINITY);
    }
    let probs = softmax(scores, 3).cast(dtype);
    probs.matmul(v).reshape([b, h, q_len, d])
}
