//! The Llama architecture as Burn modules, named after the Hugging Face checkpoint tensors
//! (`model.layers.{i}.self_attn.o_proj.weight`, ...) so any weight can be checked by name; the
//! projections that share an input are grouped ([`Projections`]: `qkv_proj`, `gate_up_proj`),
//! one fused matrix by default.

use burn::{
    module::{Module, Param},
    tensor::{Int, Tensor, backend::Backend, module::embedding},
};
use kernels::{
    AttentionMask, FlashAttentionBackend, FlashAttentionOptions, FusedOpsBackend, LinearBackend,
    flash_attention,
};

use crate::{
    cache::LayerCache,
    config::LlamaConfig,
    error::Result,
    rope::{RopeRows, apply_rope},
    weights::{ParamKind, WeightSource},
};

/// A projection `y = x W (+ b)` with `W` stored contiguous as `[in, out]` (Burn's `Linear`
/// layout; checkpoints store `[out, in]` and are transposed once at load time).
///
/// Measured on the CPU backend: a `[1, 576] x [576, 1536]` product takes 0.2 ms with this layout
/// and 2 ms through a transposed view of `[out, in]` (for the 49152-wide LM head, 263 ms), so
/// the copy at load time pays for itself on the first token.
#[derive(Module, Debug)]
pub struct Proj<B: Backend> {
    /// `[in, out]` weight matrix (the checkpoint's `[out, in]`, transposed).
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]` bias, when the config enables biases for this projection.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Proj<B> {
    /// Loads `{prefix}.weight` (`[d_out, d_in]` in the checkpoint) and, with `bias`,
    /// `{prefix}.bias`.
    pub fn load<W: WeightSource<B>>(
        src: &mut W,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = src.load_linear(&format!("{prefix}.weight"), d_out, d_in)?;
        let bias = if bias {
            Some(Param::from_tensor(src.load(
                &format!("{prefix}.bias"),
                [d_out],
                ParamKind::Bias,
            )?))
        } else {
            None
        };
        Ok(Self {
            weight: Param::from_tensor(weight),
            bias,
        })
    }
}

impl<B: LinearBackend> Proj<B> {
    /// `x · W (+ b)`; few rows (a decode step, a Medusa tree) take the skinny kernel of
    /// [`fn@kernels::linear`], which streams `W` at the bandwidth limit where Burn's matmul does not.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        kernels::linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()))
    }
}

/// Projections that read the same input (`q`, `k`, `v`; the MLP's `gate` and `up`), kept as one
/// fused matrix or apart.
///
/// Fused (the default, see [`crate::LoadOptions::fuse_projections`]), the checkpoint's matrices
/// are concatenated column-wise at load time into one `[in, Σ out]` weight, so a decode step
/// streams them with one kernel launch instead of three (or two): at batch 1 every launch costs
/// microseconds of dispatch, and a narrow matrix alone (Llama-3-8B's `k`/`v`: 1024 columns)
/// cannot keep the whole GPU busy. The outputs are column ranges of one result (views, no copy).
#[derive(Module, Debug)]
pub struct Projections<B: Backend> {
    /// One fused projection, or one per output in order.
    pub parts: Vec<Proj<B>>,
    /// Output width of each projection, in order.
    pub widths: Vec<usize>,
}

impl<B: Backend> Projections<B> {
    /// Loads the projections named by `prefixes` (each `[d_in, width]`), concatenated when
    /// `fuse` is set.
    pub fn load<W: WeightSource<B>>(
        src: &mut W,
        prefixes: &[String],
        d_in: usize,
        widths: &[usize],
        bias: bool,
        fuse: bool,
    ) -> Result<Self> {
        let mut parts = prefixes
            .iter()
            .zip(widths)
            .map(|(prefix, &w)| Proj::load(src, prefix, d_in, w, bias))
            .collect::<Result<Vec<_>>>()?;
        if fuse && parts.len() > 1 {
            let (weights, biases): (Vec<_>, Vec<_>) = parts
                .drain(..)
                .map(|p| (p.weight.val(), p.bias.map(|b| b.val())))
                .unzip();
            let bias = biases
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .map(|b| Param::from_tensor(Tensor::cat(b, 0)));
            parts.push(Proj {
                weight: Param::from_tensor(Tensor::cat(weights, 1)),
                bias,
            });
        }
        Ok(Self {
            parts,
            widths: widths.to_vec(),
        })
    }

    /// Whether several projections are stored as one concatenated matrix.
    pub fn is_fused(&self) -> bool {
        self.parts.len() == 1 && self.widths.len() > 1
    }
}

impl<B: LinearBackend> Projections<B> {
    /// The projections of `x`, in order.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Vec<Tensor<B, D>> {
        if !self.is_fused() {
            return self.parts.iter().map(|p| p.forward(x.clone())).collect();
        }
        let y = self.parts[0].forward(x);
        let mut start = 0;
        self.widths
            .iter()
            .map(|&w| {
                start += w;
                y.clone().narrow(D - 1, start - w, w)
            })
            .collect()
    }
}

/// RMSNorm as in `LlamaRMSNorm`: statistics in f32 whatever the activation dtype, then the gain.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[dim]` gain multiplied in after normalisation.
    pub weight: Param<Tensor<B, 1>>,
    /// Epsilon added to the mean square (`rms_norm_eps`).
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// Loads the gain `{prefix}.weight` of width `dim`.
    pub fn load<W: WeightSource<B>>(
        src: &mut W,
        prefix: &str,
        dim: usize,
        eps: f64,
    ) -> Result<Self> {
        let weight = src.load(&format!("{prefix}.weight"), [dim], ParamKind::NormWeight)?;
        Ok(Self {
            weight: Param::from_tensor(weight),
            eps,
        })
    }
}

impl<B: FusedOpsBackend> RmsNorm<B> {
    /// One launch on CubeCL backends ([`kernels::rms_norm`]).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        kernels::rms_norm(x, self.weight.val(), self.eps)
    }

    /// `(x + residual, norm(x + residual))`: the residual add fused into the norm after it
    /// ([`kernels::add_rms_norm`]).
    pub fn forward_add<const D: usize>(
        &self,
        x: Tensor<B, D>,
        residual: Tensor<B, D>,
    ) -> (Tensor<B, D>, Tensor<B, D>) {
        kernels::add_rms_norm(x, residual, self.weight.val(), self.eps)
    }

    /// [`Self::forward_add`] with the residual `proj(input)`, a projection not yet applied: the
    /// product, the residual add and the norm in [`kernels::linear_add_rms_norm`], which on the
    /// plain CubeCL backend adds a K-split product's partial sums inside the norm (one launch
    /// fewer per projection at decode time).
    pub fn forward_proj_add<const D: usize>(
        &self,
        x: Tensor<B, D>,
        proj: &Proj<B>,
        input: Tensor<B, D>,
    ) -> (Tensor<B, D>, Tensor<B, D>) {
        kernels::linear_add_rms_norm(
            input,
            proj.weight.val(),
            proj.bias.as_ref().map(|b| b.val()),
            x,
            self.weight.val(),
            self.eps,
        )
    }
}

/// Grouped-query self-attention with RoPE, reading and writing the layer's KV cache.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `q_proj`, `k_proj`, `v_proj` (fused or apart).
    pub qkv_proj: Projections<B>,
    /// Output projection, `[n_heads * head_dim, hidden]`.
    pub o_proj: Proj<B>,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads, shared by groups of `n_heads / n_kv_heads` query heads.
    pub n_kv_heads: usize,
    /// Dimension of each head.
    pub head_dim: usize,
}

impl<B: FlashAttentionBackend> Attention<B> {
    /// `x`: `[batch, q_len, hidden]`, the new tokens, whose keys/values are written to the cache
    /// at rows `start..start + q_len`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeRows<B>,
        cache: &mut LayerCache<B>,
        start: usize,
        mask: AttentionMask<B>,
    ) -> Tensor<B, 3> {
        self.o_proj.forward(self.heads(x, rope, cache, start, mask))
    }

    /// [`Self::forward`] without the output projection: the attention heads' outputs side by
    /// side, `[batch, q_len, n_heads * head_dim]` (`o_proj`'s input).
    pub fn heads(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeRows<B>,
        cache: &mut LayerCache<B>,
        start: usize,
        mask: AttentionMask<B>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (nh, nkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (q, k_all, v_all) = if self.qkv_proj.is_fused() {
            // One op projects q/k/v, rotates q and k, and appends k and v to the cache (on the
            // plain CubeCL backend one launch after the product, which finishes its K split).
            let proj = &self.qkv_proj.parts[0];
            cache.update(|k_cache, v_cache| {
                kernels::linear_rope_cache(
                    x,
                    proj.weight.val(),
                    proj.bias.as_ref().map(|b| b.val()),
                    rope.cos.clone(),
                    rope.sin_signed.clone(),
                    rope.swap.clone(),
                    k_cache,
                    v_cache,
                    start,
                    nh,
                )
            })
        } else {
            let mut out = self.qkv_proj.forward(x).into_iter();
            let [q, k, v] = [nh, nkv, nkv]
                .map(|n| out.next().expect("three projections").reshape([b, s, n, d]));
            let (k_all, v_all) = cache.write(start, apply_rope(k, rope, nkv), v.swap_dims(1, 2));
            (apply_rope(q, rope, nh), k_all, v_all)
        };
        let options = FlashAttentionOptions::new(self.head_dim, start + s);
        let out = flash_attention(q, k_all, v_all, mask, options);
        // `[b, heads, s, d]` to `[b, s, heads * d]`. With one new token the two layouts hold the
        // same bytes in the same order: a plain reshape, where the swap's strided view would
        // cost a copy kernel per layer (seen in a CubeCL profile of the decode step). With more,
        // the CubeCL kernels already wrote the tokens' heads side by side (the output is a
        // swapped view), so the swap and the reshape are free there too.
        if s == 1 {
            out.reshape([b, 1, self.n_heads * self.head_dim])
        } else {
            out.swap_dims(1, 2)
                .reshape([b, s, self.n_heads * self.head_dim])
        }
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `gate_proj` and `up_proj` (fused or apart).
    pub gate_up_proj: Projections<B>,
    /// `down_proj`, `[intermediate, hidden]`.
    pub down_proj: Proj<B>,
}

impl<B: FusedOpsBackend> Mlp<B> {
    /// `down(silu(gate(x)) * up(x))` for `x: [batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down_proj.forward(self.activation(x))
    }

    /// `(x + forward(input), norm(x + forward(input)))`: the MLP, the residual add and the
    /// RMSNorm after it. With gate and up fused, one [`kernels::mlp_add_rms_norm`] (on the
    /// plain CubeCL backend at decode steps, and tree steps of small models, the down projection
    /// computes SwiGLU as it stages its input, and the norm adds its K-split partial sums); else
    /// [`Self::activation`] and
    /// [`RmsNorm::forward_proj_add`]. The same values either way.
    pub fn forward_add_norm(
        &self,
        input: Tensor<B, 3>,
        x: Tensor<B, 3>,
        norm: &RmsNorm<B>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        if self.gate_up_proj.is_fused() {
            let gate_up = &self.gate_up_proj.parts[0];
            return kernels::mlp_add_rms_norm(
                input,
                gate_up.weight.val(),
                gate_up.bias.as_ref().map(|b| b.val()),
                self.down_proj.weight.val(),
                self.down_proj.bias.as_ref().map(|b| b.val()),
                x,
                norm.weight.val(),
                norm.eps,
            );
        }
        norm.forward_proj_add(x, &self.down_proj, self.activation(input))
    }

    /// [`Self::forward`] without the down projection: `silu(gate(x)) · up(x)`, `down_proj`'s
    /// input.
    pub fn activation(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        if self.gate_up_proj.is_fused() {
            // One product over [gate | up] whose K-split reduction applies SwiGLU where the
            // kernel splits (one launch fewer per layer on the plain CubeCL backend); same
            // values as the two ops.
            let proj = &self.gate_up_proj.parts[0];
            return kernels::linear_swiglu(
                x,
                proj.weight.val(),
                proj.bias.as_ref().map(|b| b.val()),
            );
        }
        let [gate, up]: [Tensor<B, 3>; 2] = self
            .gate_up_proj
            .forward(x)
            .try_into()
            .expect("two projections");
        kernels::swiglu(gate, up)
    }
}

/// One transformer block (pre-norm attention and MLP with residuals).
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// RMSNorm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// The block's self-attention.
    pub self_attn: Attention<B>,
    /// RMSNorm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
    /// The block's feed-forward network.
    pub mlp: Mlp<B>,
}

/// A block's MLP not yet applied: its input, which the RMSNorm that follows runs through the
/// MLP and adds to the residual stream ([`Mlp::forward_add_norm`]).
#[derive(Debug, Clone)]
pub struct PendingMlp<'a, B: Backend> {
    /// The MLP's input (the post-attention norm's output), `[batch, seq, hidden]`.
    pub input: Tensor<B, 3>,
    /// The block's MLP.
    pub mlp: &'a Mlp<B>,
}

impl<B: FusedOpsBackend> PendingMlp<'_, B> {
    /// `(x + mlp(input), norm(x + mlp(input)))`.
    pub fn add_norm(self, x: Tensor<B, 3>, norm: &RmsNorm<B>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        self.mlp.forward_add_norm(self.input, x, norm)
    }
}

impl<B: FlashAttentionBackend> DecoderLayer<B> {
    /// The block on the residual stream `x + mlp(pending)`, where `pending` is the previous
    /// block's MLP not yet applied (`None` before the first block). Returns the stream after
    /// attention and this block's MLP, again not applied: every residual add runs, with the
    /// projection before it (`o_proj`; the MLP, see [`Mlp::forward_add_norm`]), inside the
    /// RMSNorm that follows it (on the plain CubeCL backend one launch for the norm, the add
    /// and the projection's K-split reduction; see [`RmsNorm::forward_proj_add`]), the last
    /// one inside the final norm.
    pub fn forward<'a>(
        &'a self,
        x: Tensor<B, 3>,
        pending: Option<PendingMlp<'_, B>>,
        rope: &RopeRows<B>,
        cache: &mut LayerCache<B>,
        start: usize,
        mask: AttentionMask<B>,
    ) -> (Tensor<B, 3>, PendingMlp<'a, B>) {
        let (x, normed) = match pending {
            Some(p) => p.add_norm(x, &self.input_layernorm),
            None => (x.clone(), self.input_layernorm.forward(x)),
        };
        let heads = self.self_attn.heads(normed, rope, cache, start, mask);
        let (h, normed) =
            self.post_attention_layernorm
                .forward_proj_add(x, &self.self_attn.o_proj, heads);
        let pending = PendingMlp {
            input: normed,
            mlp: &self.mlp,
        };
        (h, pending)
    }
}

/// The decoder stack (`model.*` in Hugging Face checkpoints).
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    /// `[vocab, hidden]` token embedding matrix.
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// Decoder blocks, in order.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final RMSNorm, after the last block.
    pub norm: RmsNorm<B>,
}

/// Decoder stack plus LM head (`LlamaForCausalLM`).
///
/// With tied embeddings (`tie_word_embeddings`), `lm_head` holds a transposed copy of the
/// embedding matrix: the lookup wants `[vocab, hidden]` rows and the projection `[hidden, vocab]`
/// columns, and a strided view is ten times slower on the CPU (see [`Proj`]).
#[derive(Module, Debug)]
pub struct LlamaForCausalLm<B: Backend> {
    /// The decoder stack.
    pub model: LlamaModel<B>,
    /// Projection from final hidden states to vocabulary logits, `[hidden, vocab]`.
    pub lm_head: Proj<B>,
}

impl<B: Backend> LlamaForCausalLm<B> {
    /// Builds the module from a weight source, checking every tensor's shape against `config`.
    ///
    /// With `fuse`, the projections that share an input are concatenated (see [`Projections`]).
    pub fn load<W: WeightSource<B>>(config: &LlamaConfig, src: &mut W, fuse: bool) -> Result<Self> {
        let (h, d) = (config.hidden_size, config.head_dim());
        let (nh, nkv) = (config.num_attention_heads, config.num_kv_heads());
        let eps = config.rms_norm_eps;
        let embed_tokens = src.load(
            "model.embed_tokens.weight",
            [config.vocab_size, h],
            ParamKind::Matrix,
        )?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let ab = config.attention_bias;
            let mb = config.mlp_bias;
            let ffn = config.intermediate_size;
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(src, &format!("{p}.input_layernorm"), h, eps)?,
                self_attn: Attention {
                    qkv_proj: Projections::load(
                        src,
                        &["q_proj", "k_proj", "v_proj"].map(|n| format!("{p}.self_attn.{n}")),
                        h,
                        &[nh * d, nkv * d, nkv * d],
                        ab,
                        fuse,
                    )?,
                    o_proj: Proj::load(src, &format!("{p}.self_attn.o_proj"), nh * d, h, ab)?,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: d,
                },
                post_attention_layernorm: RmsNorm::load(
                    src,
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    eps,
                )?,
                mlp: Mlp {
                    gate_up_proj: Projections::load(
                        src,
                        &["gate_proj", "up_proj"].map(|n| format!("{p}.mlp.{n}")),
                        h,
                        &[ffn, ffn],
                        mb,
                        fuse,
                    )?,
                    down_proj: Proj::load(src, &format!("{p}.mlp.down_proj"), ffn, h, mb)?,
                },
            });
        }
        let norm = RmsNorm::load(src, "model.norm", h, eps)?;
        let head_name = if config.tie_word_embeddings {
            "model.embed_tokens"
        } else {
            "lm_head"
        };
        let lm_head = Proj::load(src, head_name, h, config.vocab_size, false)?;
        Ok(Self {
            model: LlamaModel {
                embed_tokens: Param::from_tensor(embed_tokens),
                layers,
                norm,
            },
            lm_head,
        })
    }

    /// Token embeddings, `[batch, seq, hidden]`.
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        embedding(self.model.embed_tokens.val(), tokens)
    }
}

impl<B: LinearBackend> LlamaForCausalLm<B> {
    /// Logits from final (normed) hidden states: `[batch, seq, hidden]` -> `[batch, seq, vocab]`.
    pub fn lm_head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.lm_head.forward(hidden)
    }
}
