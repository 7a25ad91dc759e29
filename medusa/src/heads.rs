//! Medusa heads (Cai et al. 2024, §2.1.1): `K` small heads on the base model's last hidden
//! state; head `k` (1-based) predicts the token at `t + 1 + k` while the base LM head predicts
//! `t + 1`.

use burn::{
    module::{Module, Param},
    tensor::{Tensor, activation::silu, backend::Backend},
};
use kernels::LinearBackend;
use model::llama::Proj;

/// `x + SiLU(W x + b)`. `W` starts at zero, so an untrained block is `x + SiLU(b)`, and with the
/// zero bias used here exactly the identity.
#[derive(Module, Debug)]
pub struct ResBlock<B: Backend> {
    /// The block's `hidden → hidden` projection `W x + b` (weight `[hidden, hidden]`, with bias).
    pub linear: Proj<B>,
}

impl<B: LinearBackend> ResBlock<B> {
    /// Applies the block to `x` (`[..., hidden]`), keeping its shape.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        x.clone() + silu(self.linear.forward(x))
    }
}

/// One head: `L` residual blocks, then its own vocabulary projection (Medusa v1) or none, in
/// which case the base model's LM head is applied (the "shared LM head" format).
#[derive(Module, Debug)]
pub struct MedusaHead<B: Backend> {
    /// The head's `L` residual blocks, applied in order to the base model's last hidden state.
    pub blocks: Vec<ResBlock<B>>,
    /// The head's own vocabulary projection (`[hidden, vocab]`, no bias), or `None` to use the
    /// base model's LM head.
    pub lm_head: Option<Proj<B>>,
}

/// Shape of a set of Medusa heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MedusaConfig {
    /// `K`, the number of heads (Medusa-1 default 4 here; the paper uses 5 for Vicuna).
    pub num_heads: usize,
    /// `L`, residual blocks per head (default 1).
    pub num_layers: usize,
    /// Hidden size of the base model, the width of each residual block.
    pub hidden_size: usize,
    /// Vocabulary size of the base model. [`MedusaHeads::init`] takes the projection from the
    /// base LM head; [`MedusaHeads::config`] reports 0 for heads that share it.
    pub vocab_size: usize,
    /// Heads output hidden states and share the base model's LM head.
    pub share_lm_head: bool,
}

/// The `K` Medusa heads.
#[derive(Module, Debug)]
pub struct MedusaHeads<B: Backend> {
    /// The heads in order: `heads[k - 1]` predicts the token at `t + 1 + k`.
    pub heads: Vec<MedusaHead<B>>,
}

impl<B: Backend> MedusaHeads<B> {
    /// Fresh heads as in the Medusa recipe: residual blocks at zero (identity), each vocabulary
    /// projection a copy of the base LM head (`base_lm_head`: `[hidden, vocab]`). Untrained,
    /// every head therefore predicts what the base model predicts for `t + 1`.
    pub fn init(config: &MedusaConfig, base_lm_head: &Proj<B>) -> Self {
        let device = base_lm_head.weight.val().device();
        let dtype = base_lm_head.weight.val().dtype();
        let h = config.hidden_size;
        let heads = (0..config.num_heads)
            .map(|_| MedusaHead {
                blocks: (0..config.num_layers)
                    .map(|_| ResBlock {
                        linear: Proj {
                            weight: Param::from_tensor(Tensor::zeros([h, h], (&device, dtype))),
                            bias: Some(Param::from_tensor(Tensor::zeros([h], (&device, dtype)))),
                        },
                    })
                    .collect(),
                lm_head: (!config.share_lm_head).then(|| Proj {
                    // A copy, not a shared handle: training must not move the base head.
                    weight: Param::from_tensor(base_lm_head.weight.val().clone() * 1.0),
                    bias: None,
                }),
            })
            .collect();
        Self { heads }
    }

    /// The shape read back from the parameters (`hidden_size` 0 without blocks, `vocab_size` 0
    /// with a shared LM head). Panics if there are no heads.
    pub fn config(&self) -> MedusaConfig {
        let first = &self.heads[0];
        let [h, _] = first
            .blocks
            .first()
            .map_or([0, 0], |b| b.linear.weight.dims());
        let vocab = first.lm_head.as_ref().map_or(0, |p| p.weight.dims()[1]);
        MedusaConfig {
            num_heads: self.heads.len(),
            num_layers: first.blocks.len(),
            hidden_size: h,
            vocab_size: vocab,
            share_lm_head: first.lm_head.is_none(),
        }
    }

    /// `K`, the number of heads, which bounds the depth of a usable tree.
    pub fn num_heads(&self) -> usize {
        self.heads.len()
    }
}

/// The heads' residual blocks with a leading head axis: per block depth, the weights
/// `[K, hidden, hidden]` and biases `[K, 1, hidden]` of all `K` heads, so that one batched
/// product, one SiLU and one add serve every head where each head's block took its own three
/// launches (a tree step is launch-bound on a GPU). A copy made once for decoding
/// ([`MedusaHeads::stack_blocks`]); the heads keep their own parameters for training and
/// checkpoints.
#[derive(Debug, Clone)]
pub struct StackedBlocks<B: Backend> {
    layers: Vec<(Tensor<B, 3>, Tensor<B, 3>)>,
}

impl<B: Backend> MedusaHeads<B> {
    /// The blocks stacked for [`MedusaHeads::forward_stacked`], or `None` when the heads'
    /// blocks differ in depth or lack a bias (then [`MedusaHeads::forward`] serves). A copy of
    /// the blocks' `K · L · hidden²` weights (SmolLM2, 4 × 2 blocks: 2.7 M; Vicuna-7B's 5 × 1:
    /// 84 M), small beside the heads' vocabulary projections.
    pub fn stack_blocks(&self) -> Option<StackedBlocks<B>> {
        let depth = self.heads.first()?.blocks.len();
        if self.heads.iter().any(|head| head.blocks.len() != depth) {
            return None;
        }
        let layers = (0..depth)
            .map(|l| {
                let blocks = self.heads.iter().map(|head| &head.blocks[l].linear);
                let weights = blocks.clone().map(|p| p.weight.val()).collect();
                let biases = blocks
                    .map(|p| p.bias.as_ref().map(|b| b.val().unsqueeze_dim::<2>(0)))
                    .collect::<Option<Vec<_>>>()?;
                Some((Tensor::stack(weights, 0), Tensor::stack(biases, 0)))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(StackedBlocks { layers })
    }
}

impl<B: LinearBackend> MedusaHeads<B> {
    /// [`MedusaHeads::forward`] for one position, `hidden: [1, 1, hidden]` → `[K, vocab]`,
    /// with the residual blocks of all heads computed together (`stacked` from
    /// [`MedusaHeads::stack_blocks`] of these heads); each head's vocabulary projection stays
    /// its own skinny product.
    pub fn forward_stacked(
        &self,
        stacked: &StackedBlocks<B>,
        hidden: Tensor<B, 3>,
        base_lm_head: &Proj<B>,
    ) -> Tensor<B, 2> {
        let [_, _, h] = hidden.dims();
        let k = self.heads.len();
        // `[1, 1, h]` against `[K, h, h]`: the batch axis broadcasts.
        let mut x = hidden.reshape([1, 1, h]);
        for (weight, bias) in &stacked.layers {
            x = x.clone() + silu(x.matmul(weight.clone()) + bias.clone());
        }
        let x = x.expand([k, 1, h]);
        let logits: Vec<Tensor<B, 2>> = self
            .heads
            .iter()
            .enumerate()
            .map(|(i, head)| {
                let row = x.clone().slice([i..i + 1, 0..1, 0..h]).reshape([1, h]);
                head.lm_head.as_ref().unwrap_or(base_lm_head).forward(row)
            })
            .collect();
        Tensor::cat(logits, 0)
    }

    /// Logits of every head: `hidden` `[batch, seq, hidden]` → `[K, batch, seq, vocab]`.
    /// `base_lm_head` is used by heads without their own projection.
    pub fn forward(&self, hidden: Tensor<B, 3>, base_lm_head: &Proj<B>) -> Tensor<B, 4> {
        let logits: Vec<Tensor<B, 3>> = self
            .heads
            .iter()
            .map(|head| {
                let x = head
                    .blocks
                    .iter()
                    .fold(hidden.clone(), |x, block| block.forward(x));
                head.lm_head.as_ref().unwrap_or(base_lm_head).forward(x)
            })
            .collect();
        Tensor::stack(logits, 0)
    }
}
