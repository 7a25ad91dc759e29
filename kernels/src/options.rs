use burn::tensor::{Bool, Tensor, backend::Backend};

/// How the new queries see the new keys. The prefix (the cached keys before the new tokens) is
/// always fully visible.
#[derive(Debug, Clone)]
pub enum AttentionMask<B: Backend> {
    /// Every new query sees every new key (encoder-style, or a single decode token).
    None,
    /// New query `i` sees new keys `0..=i` (prefill and chunked prefill).
    Causal,
    /// `[q_len, q_len]`, `true` where new query `i` may attend to new key `j` (Medusa's tree:
    /// a node sees its ancestors and itself).
    Tree(Tensor<B, 2, Bool>),
}

/// Scalar parameters of [`crate::flash_attention`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlashAttentionOptions {
    /// Multiplier of `Q Kᵀ`, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// Number of valid key/value rows (prefix + new tokens).
    pub kv_len: usize,
    /// Causal masking among the new tokens (set by [`crate::flash_attention`] from the mask).
    pub causal: bool,
}

impl FlashAttentionOptions {
    /// Options with the standard `1 / sqrt(head_dim)` scale.
    pub fn new(head_dim: usize, kv_len: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim as f32).sqrt(),
            kv_len,
            causal: false,
        }
    }

    /// Same options with another scale.
    pub fn with_scale(self, scale: f32) -> Self {
        Self { scale, ..self }
    }

    /// Same options with causal masking on or off.
    pub fn with_causal(self, causal: bool) -> Self {
        Self { causal, ..self }
    }
}
