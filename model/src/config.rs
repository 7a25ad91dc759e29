//! Model configuration, deserialised from a Hugging Face `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Shape and hyper-parameters of a Llama-family model, read from `config.json`.
///
/// Field names follow Hugging Face's `LlamaConfig`, so a checkpoint's own file deserialises as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Number of tokens: rows of the embedding matrix and width of the logits.
    pub vocab_size: usize,
    /// Width of the residual stream (the embedding dimension).
    pub hidden_size: usize,
    /// Width of the MLP's gate and up projections.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads per attention layer.
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (plain multi-head attention) when absent.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Epsilon added to the mean square in RMSNorm; 1e-6 when absent.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Base of the rotary frequencies, `θ_i = rope_theta^(-2i / head_dim)`; 10000 when absent.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Frequency scaling for long contexts (`llama3` or `linear`; `default` is none); none when
    /// absent.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Context length the model was trained for, in tokens; caps
    /// [`crate::LoadOptions::max_seq_len`]. 2048 when absent.
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the embedding matrix (any `lm_head.weight` is ignored); false
    /// when absent.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether the q/k/v/o projections have biases; false when absent.
    #[serde(default)]
    pub attention_bias: bool,
    /// Whether the gate/up/down projections have biases; false when absent.
    #[serde(default)]
    pub mlp_bias: bool,
    /// MLP activation; only `"silu"` (the default) is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Beginning-of-sequence token id, if the checkpoint names one.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id(s); read them with [`Self::eos_token_ids`].
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Architecture tag (`"llama"`); informational, not checked.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Dtype the checkpoint was saved in (e.g. `"bfloat16"`); informational, the load dtype is
    /// [`crate::LoadOptions::dtype`].
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

/// `eos_token_id` is a single id in most checkpoints and a list in Llama-3.1/3.2 instruct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// A list of ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The id(s) as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `rope_scaling` as written in `config.json`. Only the types this crate implements are accepted;
/// anything else is an error at load time rather than silently wrong positions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `"llama3"`, `"linear"` or `"default"`. Older configs spell the key `type`.
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Context stretch: `linear` divides every frequency by it, `llama3` the low ones fully and
    /// the medium ones partly.
    #[serde(default)]
    pub factor: Option<f64>,
    /// `llama3` only: wavelengths longer than `original_max_position_embeddings / low_freq_factor`
    /// are fully scaled.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// `llama3` only: wavelengths below `original_max_position_embeddings / high_freq_factor`
    /// are left unscaled.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// `llama3` only: the context length, in tokens, the model was pre-trained with.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_hidden_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Config { message, .. } => Error::Config {
                path: Some(path.to_path_buf()),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text).map_err(|e| Error::Config {
            path: None,
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the invariants the modules rely on.
    pub fn validate(&self) -> Result<()> {
        let fail = |message: String| {
            Err(Error::Config {
                path: None,
                message,
            })
        };
        if self.num_attention_heads == 0 || self.num_hidden_layers == 0 || self.hidden_size == 0 {
            return fail(
                "hidden_size, num_hidden_layers and num_attention_heads must be > 0".into(),
            );
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return fail(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return fail(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.hidden_act != "silu" {
            return fail(format!(
                "hidden_act {:?} is not supported (Llama uses \"silu\")",
                self.hidden_act
            ));
        }
        if let Some(scaling) = &self.rope_scaling {
            scaling.validate()?;
        }
        Ok(())
    }

    /// Number of key/value heads: `num_key_value_heads`, else `num_attention_heads`.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Dimension of each attention head: `head_dim`, else `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// End-of-sequence ids (several for Llama-3 instruct: `<|eot_id|>` and `<|end_of_text|>`).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Number of parameters (embedding and LM head counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, d) = (self.hidden_size, self.head_dim());
        let attn = h * d * (self.num_attention_heads * 2 + self.num_kv_heads() * 2);
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }

    /// Meta Llama-3-8B (also the shape of Llama-3.1-8B without its rope scaling).
    pub fn llama3_8b() -> Self {
        Self {
            vocab_size: 128_256,
            hidden_size: 4096,
            intermediate_size: 14_336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(8),
            head_dim: Some(128),
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: "silu".into(),
            bos_token_id: Some(128_000),
            eos_token_id: Some(TokenIds::One(128_001)),
            model_type: Some("llama".into()),
            torch_dtype: Some("bfloat16".into()),
        }
    }

    /// Meta Llama-3.2-1B (tied embeddings, Llama-3.1 rope scaling with factor 32).
    pub fn llama3_2_1b() -> Self {
        Self {
            vocab_size: 128_256,
            hidden_size: 2048,
            intermediate_size: 8192,
            num_hidden_layers: 16,
            num_attention_heads: 32,
            num_key_value_heads: Some(8),
            head_dim: Some(64),
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: Some(RopeScaling {
                rope_type: "llama3".into(),
                factor: Some(32.0),
                low_freq_factor: Some(1.0),
                high_freq_factor: Some(4.0),
                original_max_position_embeddings: Some(8192),
            }),
            max_position_embeddings: 131_072,
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: "silu".into(),
            bos_token_id: Some(128_000),
            eos_token_id: Some(TokenIds::Many(vec![128_001, 128_008, 128_009])),
            model_type: Some("llama".into()),
            torch_dtype: Some("bfloat16".into()),
        }
    }

    /// HuggingFaceTB SmolLM2-135M(-Instruct).
    pub fn smollm2_135m() -> Self {
        Self {
            vocab_size: 49_152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: Some(3),
            head_dim: Some(64),
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: "silu".into(),
            bos_token_id: Some(1),
            eos_token_id: Some(TokenIds::One(2)),
            model_type: Some("llama".into()),
            torch_dtype: Some("bfloat16".into()),
        }
    }

    /// A preset by name: `llama3-8b`, `llama3.2-1b` or `smollm2-135m`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "llama3-8b" => Ok(Self::llama3_8b()),
            "llama3.2-1b" => Ok(Self::llama3_2_1b()),
            "smollm2-135m" => Ok(Self::smollm2_135m()),
            other => Err(Error::Config {
                path: None,
                message: format!(
                    "unknown preset {other:?} (known: llama3-8b, llama3.2-1b, smollm2-135m)"
                ),
            }),
        }
    }
}

impl RopeScaling {
    fn validate(&self) -> Result<()> {
        let fail = |message: String| {
            Err(Error::Config {
                path: None,
                message,
            })
        };
        match self.rope_type.as_str() {
            "default" => Ok(()),
            "linear" => match self.factor {
                Some(f) if f > 0.0 => Ok(()),
                _ => fail("rope_scaling of type \"linear\" needs a positive factor".into()),
            },
            "llama3" => {
                let complete = self.factor.is_some()
                    && self.low_freq_factor.is_some()
                    && self.high_freq_factor.is_some()
                    && self.original_max_position_embeddings.is_some();
                if !complete {
                    return fail(
                        "rope_scaling of type \"llama3\" needs factor, low_freq_factor, \
                         high_freq_factor and original_max_position_embeddings"
                            .into(),
                    );
                }
                if self.low_freq_factor >= self.high_freq_factor {
                    return fail("rope_scaling: low_freq_factor must be < high_freq_factor".into());
                }
                Ok(())
            }
            other => fail(format!(
                "rope_scaling type {other:?} is not supported (supported: default, linear, llama3)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama31_config() {
        let text = r#"{
            "architectures": ["LlamaForCausalLM"], "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
            "intermediate_size": 14336, "max_position_embeddings": 131072, "model_type": "llama",
            "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            "rope_type": "llama3"}, "rope_theta": 500000.0, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16", "vocab_size": 128256}"#;
        let c = LlamaConfig::from_json(text).unwrap();
        assert_eq!(c.head_dim(), 128);
        assert_eq!(c.num_kv_heads(), 8);
        assert_eq!(c.eos_token_ids(), vec![128001, 128008, 128009]);
        assert_eq!(c.rope_scaling.unwrap().factor, Some(8.0));
    }

    #[test]
    fn unknown_rope_type_is_an_error() {
        let mut c = LlamaConfig::smollm2_135m();
        c.rope_scaling = Some(RopeScaling {
            rope_type: "yarn".into(),
            factor: Some(4.0),
            low_freq_factor: None,
            high_freq_factor: None,
            original_max_position_embeddings: None,
        });
        let text = serde_json::to_string(&c).unwrap();
        let err = LlamaConfig::from_json(&text).unwrap_err().to_string();
        assert!(err.contains("\"yarn\" is not supported"), "{err}");
    }

    #[test]
    fn preset_parameter_counts() {
        // Published sizes: Llama-3-8B 8.03B, Llama-3.2-1B 1.24B, SmolLM2-135M 134.5M.
        assert_eq!(LlamaConfig::llama3_8b().num_parameters(), 8_030_261_248);
        assert_eq!(LlamaConfig::llama3_2_1b().num_parameters(), 1_235_814_400);
        assert_eq!(LlamaConfig::smollm2_135m().num_parameters(), 134_515_008);
    }
}
