#![warn(missing_docs)]
//! Medusa (Cai et al. 2024, arXiv 2401.10774) for Burn language models: extra decoding heads
//! propose several future tokens, a candidate tree is verified in one forward pass with tree
//! attention, and the longest acceptable path is kept.
//!
//! One step, file by file: [`heads`] turn the last hidden state into `K` next-token guesses →
//! [`tree`] lays the top-k guesses out as nodes with an ancestor mask → [`decode`] runs the base
//! model once over all nodes against the KV cache → [`accept`] picks the longest path the base
//! model agrees with (greedy, lossless) or finds typical (sampling) → the accepted path's KV
//! entries are committed and decoding continues from the accepted node.
//!
//! Heads are stored in the published Medusa v1 layout ([`checkpoint`]); [`lossless`] checks that
//! greedy outputs are the base model's greedy choices, within the dtype's rounding.
//!
//! ```no_run
//! use burn::{backend::Flex, tensor::DType};
//! use medusa::{AcceptMode, DecodeConfig, MedusaDecoder, MedusaTree, checkpoint};
//! use model::{Llama, LoadOptions, Message, ModelSource, Tokenizer};
//!
//! let device = Default::default();
//! let dir = ModelSource::parse("default").resolve()?;
//! let model = Llama::<Flex>::load(&dir, &LoadOptions::default(), &device)?;
//! let tokenizer = Tokenizer::from_dir(&dir)?;
//! // Heads written by `cargo run -p train`, with the tree built from their accuracies.
//! let (heads, saved) = checkpoint::load::<Flex>(
//!     "medusa-heads".as_ref(),
//!     model.config.hidden_size,
//!     model.config.vocab_size,
//!     DType::F32,
//!     &device,
//! )?;
//! let (tree, _) = MedusaTree::for_heads(None, heads.num_heads(), &saved)?;
//! let decoder = MedusaDecoder::new(&model, &heads, tree)?;
//! let prompt = tokenizer.encode_chat(&[Message::user("Name three prime numbers.")])?;
//! let config = DecodeConfig {
//!     max_new_tokens: 128,
//!     stop_tokens: tokenizer.stop_tokens(),
//!     mode: AcceptMode::Greedy,
//! };
//! let out = decoder.generate(&prompt, &config, |_| {})?;
//! println!("{} ({:.2} tokens per step)", tokenizer.decode(&out.tokens), out.mean_accepted_length());
//! # Ok::<(), medusa::MedusaError>(())
//! ```

pub mod accept;
pub mod checkpoint;
pub mod decode;
pub mod error;
pub mod heads;
pub mod lossless;
pub mod tree;

pub use decode::{AcceptMode, DecodeConfig, MedusaDecoder, MedusaOutput};
pub use error::{MedusaError, Result};
pub use heads::{MedusaConfig, MedusaHead, MedusaHeads, ResBlock, StackedBlocks};
pub use tree::MedusaTree;
