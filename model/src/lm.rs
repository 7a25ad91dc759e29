//! [`Llama`]: a loaded causal language model with its RoPE tables, and the forward passes the
//! decoding loops use (prefill, decode step, tree verification).

use std::path::Path;

use burn::tensor::{Bool, DType, Int, Tensor, TensorData, backend::Backend};
use kernels::{AttentionMask, FlashAttentionBackend};

use crate::{
    cache::KvCache,
    config::LlamaConfig,
    error::{Error, Result},
    llama::LlamaForCausalLm,
    rope::RopeTables,
    weights::{RandomWeights, SafetensorsWeights, WeightSource},
};

/// How to materialise a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Parameter and activation dtype (f32, bf16 or f16). Norm statistics and attention
    /// softmax always run in f32.
    pub dtype: DType,
    /// Longest sequence (prompt + generated) the model will see; sizes the RoPE tables.
    /// Clamped to the config's `max_position_embeddings`.
    pub max_seq_len: usize,
    /// Fail on checkpoint tensors the model does not use.
    pub strict: bool,
    /// Concatenate the projections that read the same input (q/k/v, gate/up) into one matrix
    /// each at load time: fewer, wider kernels per decode step (see [`crate::llama::Projections`]).
    pub fuse_projections: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            max_seq_len: 4096,
            strict: true,
            fuse_projections: true,
        }
    }
}

impl LoadOptions {
    /// These options with parameters and activations in `dtype`.
    pub fn with_dtype(self, dtype: DType) -> Self {
        Self { dtype, ..self }
    }
    /// These options with RoPE tables for `max_seq_len` positions (capped at the config's
    /// `max_position_embeddings`).
    pub fn with_max_seq_len(self, max_seq_len: usize) -> Self {
        Self {
            max_seq_len,
            ..self
        }
    }
    /// These options with projection fusion on or off.
    pub fn with_fuse_projections(self, fuse_projections: bool) -> Self {
        Self {
            fuse_projections,
            ..self
        }
    }
}

/// New tokens laid out as a tree (Medusa's candidates): each token sees the whole cache prefix
/// and, among the new tokens, those `mask` marks (its ancestors and itself).
#[derive(Debug, Clone)]
pub struct TreeInput<B: Backend> {
    /// `[n, n]`, `true` where node `i` may attend to node `j`.
    pub mask: Tensor<B, 2, Bool>,
    /// `[n]` absolute positions (prefix length + depth), for RoPE.
    pub positions: Tensor<B, 1, Int>,
}

/// A causal language model ready to run: parameters, config, RoPE tables.
#[derive(Debug)]
pub struct Llama<B: Backend> {
    /// The model's configuration (its `config.json`).
    pub config: LlamaConfig,
    /// Parameters, laid out like the checkpoint's (projections transposed to `[in, out]`; q/k/v
    /// and gate/up fused unless [`LoadOptions::fuse_projections`] is off).
    pub module: LlamaForCausalLm<B>,
    rope: RopeTables<B>,
    dtype: DType,
    device: B::Device,
}

impl<B: FlashAttentionBackend> Llama<B> {
    /// Loads `config.json` and safetensors weights from a Hugging Face folder.
    pub fn load(dir: &Path, options: &LoadOptions, device: &B::Device) -> Result<Self> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let mut weights =
            SafetensorsWeights::<B>::open_dir(dir, options.dtype, device)?.strict(options.strict);
        if config.tie_word_embeddings {
            // Some exports save the tied head anyway; it is the embedding matrix.
            weights = weights.ignore("lm_head.weight");
        }
        Self::from_weights(config, weights, options, device)
    }

    /// Builds the model from any weight source.
    pub fn from_weights<W: WeightSource<B>>(
        config: LlamaConfig,
        mut weights: W,
        options: &LoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        let module = LlamaForCausalLm::load(&config, &mut weights, options.fuse_projections)?;
        weights.finish()?;
        let max_len = options.max_seq_len.min(config.max_position_embeddings);
        let rope = RopeTables::new(&config, max_len, options.dtype, device);
        Ok(Self {
            config,
            module,
            rope,
            dtype: options.dtype,
            device: device.clone(),
        })
    }

    /// Seeded random weights with `config`'s shapes, generated on the device.
    pub fn random(
        config: LlamaConfig,
        seed: u64,
        options: &LoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        let weights = RandomWeights::<B>::new(seed, options.dtype, device);
        Self::from_weights(config, weights, options, device)
    }

    /// Dtype of the parameters and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device the parameters live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Longest sequence the RoPE tables cover.
    pub fn max_seq_len(&self) -> usize {
        self.rope.max_len()
    }

    /// An empty KV cache for `batch` sequences of up to `max_len` positions.
    pub fn new_cache(&self, batch: usize, max_len: usize) -> KvCache<B> {
        KvCache::new(
            self.config.num_hidden_layers,
            batch,
            self.config.num_kv_heads(),
            max_len.min(self.max_seq_len()),
            self.config.head_dim(),
            self.dtype,
            &self.device,
        )
    }

    /// Tokens `[batch, n]` as a tensor on the model's device.
    pub fn tokens(&self, ids: &[u32], batch: usize) -> Tensor<B, 2, Int> {
        let n = ids.len() / batch;
        let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        Tensor::from_data(TensorData::new(data, [batch, n]), &self.device)
    }

    /// Runs the decoder on `tokens` (`[batch, n]`) placed right after the cache's contents,
    /// appends their keys/values to the cache, and returns the final-norm hidden states
    /// `[batch, n, hidden]` (what the LM head and Medusa heads read).
    ///
    /// Without `tree`, the new tokens are causal among themselves and take positions
    /// `cache.len()..`; with it, they follow the tree's mask and positions.
    pub fn forward_hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        tree: Option<&TreeInput<B>>,
    ) -> Result<Tensor<B, 3>> {
        let [_, n] = tokens.dims();
        let start = cache.len();
        if start + n > cache.max_len() {
            return Err(Error::Other(format!(
                "sequence of {} positions exceeds the KV cache ({})",
                start + n,
                cache.max_len()
            )));
        }
        let (rope, mask) = match tree {
            Some(tree) => (
                self.rope.gather(tree.positions.clone()),
                AttentionMask::Tree(tree.mask.clone()),
            ),
            None if n == 1 => (self.rope.contiguous(start, n), AttentionMask::None),
            None => (self.rope.contiguous(start, n), AttentionMask::Causal),
        };
        if tree.is_none() && start + n > self.rope.max_len() {
            return Err(Error::Other(format!(
                "position {} exceeds the RoPE table ({}); load with a larger max_seq_len",
                start + n,
                self.rope.max_len()
            )));
        }
        let mut x = self.module.embed(tokens);
        let mut pending = None;
        for (i, layer) in self.module.model.layers.iter().enumerate() {
            let (h, mlp) =
                layer.forward(x, pending, &rope, cache.layer_mut(i), start, mask.clone());
            (x, pending) = (h, Some(mlp));
        }
        cache.advance(n);
        let norm = &self.module.model.norm;
        Ok(match pending {
            Some(p) => p.add_norm(x, norm).1,
            None => norm.forward(x),
        })
    }

    /// Logits `[batch, n, vocab]` from hidden states.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.module.lm_head(hidden)
    }

    /// Causal forward of new tokens against the cache, returning logits `[batch, n, vocab]`.
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>> {
        let hidden = self.forward_hidden(tokens, cache, None)?;
        Ok(self.logits(hidden))
    }

    /// Logits of a whole sequence computed from scratch (no cache reuse): the reference that
    /// cached decoding must reproduce.
    pub fn forward_full(&self, ids: &[u32]) -> Result<Tensor<B, 3>> {
        let mut cache = self.new_cache(1, ids.len());
        self.forward(self.tokens(ids, 1), &mut cache)
    }
}
