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
