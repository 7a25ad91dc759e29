//! Medusa decoding (paper §2, Fig. 1): candidates from the heads laid out as a tree, one
//! forward pass verifying the whole tree against the KV cache, acceptance, and a cache commit of
//! the accepted path — no extra forward pass, since the accepted node's hidden state already
//! gives the next step's base and head logits.

use std::time::{Duration, Instant};

use burn::tensor::{Bool, DType, Int, Tensor, TensorData, activation::softmax};
use kernels::FlashAttentionBackend;
use model::{
    FinishReason, Llama, TreeInput,
    generate::{read_ints, top_p_sample},
};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{
    accept::{self, Accepted},
    error::Result,
    heads::{MedusaHeads, StackedBlocks},
    tree::{MedusaTree, TOPK},
};

/// How candidates are accepted.
#[derive(Debug, Clone, PartialEq)]
pub enum AcceptMode {
    /// Exactly the base model's greedy output (lossless).
    Greedy,
    /// Typical acceptance (paper §2.3.1): accept a candidate whose probability under the base
    /// model at `temperature` exceeds `min(posterior_threshold, posterior_alpha · exp(−H))`; the
    /// root token is sampled from the same truncated ("typical") distribution.
    Typical {
        /// Softmax temperature applied to the base model's logits (must be > 0).
        temperature: f32,
        /// ε: upper bound of the acceptance threshold (paper default 0.09).
        posterior_threshold: f32,
        /// α: scale of the entropy-dependent threshold `α · exp(−H)` (paper default 0.3).
        posterior_alpha: f32,
        /// Seed of the random generator that samples the root token.
        seed: u64,
    },
}

impl AcceptMode {
    /// Typical acceptance with the paper's defaults (ε = 0.09, α = 0.3).
    pub fn typical(temperature: f32, seed: u64) -> Self {
        AcceptMode::Typical {
            temperature,
            posterior_threshold: 0.09,
            posterior_alpha: 0.3,
            seed,
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct DecodeConfig {
    /// Maximum number of tokens to generate after the prompt.
    pub max_new_tokens: usize,
    /// Token ids that end generation; the stop token is included in the output.
    pub stop_tokens: Vec<u32>,
    /// How speculative candidates are accepted (greedy or typical).
    pub mode: AcceptMode,
}

/// Result and statistics of one Medusa generation.
#[derive(Debug, Clone)]
pub struct MedusaOutput {
    /// Generated token ids, without the prompt.
    pub tokens: Vec<u32>,
    /// Why generation ended: a stop token or `max_new_tokens`.
    pub finish: FinishReason,
    /// Decoding steps (tree verifications); the prefill is not a step.
    pub steps: usize,
    /// Speculative tokens accepted at each step (the root token is not counted).
    pub accept_lengths: Vec<usize>,
    /// `head_accepts[k]`: steps where head `k + 1`'s candidate was accepted.
    pub head_accepts: Vec<usize>,
    /// Time to the first emitted tokens: the prompt's prefill plus the first tree step.
    pub prefill: Duration,
    /// Time of the remaining decoding steps (total time minus `prefill`).
    pub decode: Duration,
}

impl MedusaOutput {
    /// Tokens produced per decoding step (the paper's "acceleration rate"; 1.0 is plain
    /// autoregressive decoding).
    pub fn mean_accepted_length(&self) -> f64 {
        if self.steps == 0 {
            return 0.0;
        }
        self.accept_lengths.iter().map(|&a| a + 1).sum::<usize>() as f64 / self.steps as f64
    }

    /// Fraction of steps in which head `k + 1`'s token was accepted.
    pub fn head_acceptance_rates(&self) -> Vec<f64> {
        self.head_accepts
            .iter()
            .map(|&a| a as f64 / self.steps.max(1) as f64)
            .collect()
    }
}

/// A base model, its Medusa heads and a tree, with the tree's device buffers built once.
pub struct MedusaDecoder<'a, B: FlashAttentionBackend> {
    model: &'a Llama<B>,
    heads: &'a MedusaHeads<B>,
    /// The heads' residual blocks stacked once, so a step computes all heads' blocks together.
    stacked: Option<StackedBlocks<B>>,
    tree: MedusaTree,
    tree_mask: Tensor<B, 2, Bool>,
    tree_indices: Tensor<B, 1, Int>,
    parents: Tensor<B, 1, Int>,
}

impl<'a, B: FlashAttentionBackend> MedusaDecoder<'a, B> {
    /// Checks that the tree fits the heads and uploads its buffers.
    pub fn new(model: &'a Llama<B>, heads: &'a MedusaHeads<B>, tree: MedusaTree) -> Result<Self> {
        if tree.depth() > heads.num_heads() {
            return Err(crate::error::MedusaError::Tree(format!(
                "tree depth {} exceeds the {} Medusa heads",
                tree.depth(),
                heads.num_heads()
            )));
        }
        let device = model.device();
        let n = tree.len();
        let ints = |v: &[usize]| {
            let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
            let len = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [len]), device)
        };
        Ok(Self {
            model,
            heads,
            stacked: heads.stack_blocks(),
            tree_mask: Tensor::from_data(TensorData::new(tree.attn_mask.clone(), [n, n]), device),
            tree_indices: ints(&tree.tree_indices),
            parents: ints(&tree.parents),
            tree,
        })
    }

    /// The tree of candidates verified at each step.
    pub fn tree(&self) -> &MedusaTree {
        &self.tree
    }

    /// Generates after `prompt` (batch 1), calling `on_token` for each emitted token.
    pub fn generate(
        &self,
        prompt: &[u32],
        config: &DecodeConfig,
        mut on_token: impl FnMut(u32),
    ) -> Result<MedusaOutput> {
        let model = self.model;
        let n = self.tree.len();
        let vocab = model.config.vocab_size;
        let mut rng = match config.mode {
            AcceptMode::Typical { seed, .. } => StdRng::seed_from_u64(seed),
            AcceptMode::Greedy => StdRng::seed_from_u64(0),
        };
        // Room for the prompt, the output, and one tree's worth of speculative entries.
        let mut cache = model.new_cache(1, prompt.len() + config.max_new_tokens + n + 1);
        let start = Instant::now();

        let hidden = model.forward_hidden(model.tokens(prompt, 1), &mut cache, None)?;
        let p = prompt.len();
        let [_, _, h] = hidden.dims();
        let last = hidden.slice([0..1, p - 1..p, 0..h]);
        let mut base_logits = model.logits(last.clone()).reshape([vocab]);
        let mut head_logits = self.head_logits(last);

        let mut out = MedusaOutput {
            tokens: Vec::with_capacity(config.max_new_tokens),
            finish: FinishReason::Length,
            steps: 0,
            accept_lengths: Vec::new(),
            head_accepts: vec![0; self.heads.num_heads()],
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
        };
        let mut prefix = p;
        while out.tokens.len() < config.max_new_tokens {
            // 1. Candidates: the root (base model's own next token) and each head's top-k,
            //    scattered onto the tree's nodes — all on the device.
            let root = self.root_token(base_logits.clone(), &config.mode, &mut rng);
            let topk = top_k_indices(head_logits.clone(), TOPK);
            let k = self.heads.num_heads();
            let candidates = Tensor::cat(vec![root, topk.reshape([k * TOPK])], 0);
            let tree_tokens = candidates.select(0, self.tree_indices.clone());

            // 2. Verify the whole tree in one forward pass against the cache.
            let positions: Vec<i64> = self
                .tree
                .position_ids
                .iter()
                .map(|&d| (prefix + d) as i64)
                .collect();
            let tree = TreeInput {
                mask: self.tree_mask.clone(),
                positions: Tensor::from_data(TensorData::new(positions, [n]), model.device()),
            };
            let hidden = model.forward_hidden(
                tree_tokens.clone().reshape([1, n]),
                &mut cache,
                Some(&tree),
            )?;
            let logits = model.logits(hidden.clone()).reshape([n, vocab]);

            // 3. Accept (one device-to-host read of per-node numbers).
            let (tokens, accepted) = self.accept(&tree_tokens, &logits, &config.mode);
            let nodes = accepted.nodes(&self.tree).to_vec();
            if out.steps == 0 {
                out.prefill = start.elapsed();
            }
            out.steps += 1;
            out.accept_lengths.push(accepted.length);
            for count in out.head_accepts.iter_mut().take(accepted.length) {
                *count += 1;
            }

            // 4. Commit the accepted path's KV entries right after the prefix; the rest of the
            //    tree is dropped by the cache's new length.
            let positions: Vec<usize> = nodes.iter().map(|&i| prefix + i).collect();
            cache.compact(&positions, prefix);
            prefix += nodes.len();

            // 5. Next step's logits come from the last accepted node: no extra forward pass.
            let last_node = *nodes.last().expect("root is always accepted");
            base_logits = logits
                .slice([last_node..last_node + 1, 0..vocab])
                .reshape([vocab]);
            head_logits = self.head_logits(hidden.slice([0..1, last_node..last_node + 1, 0..h]));

            for &node in &nodes {
                let token = tokens[node];
                out.tokens.push(token);
                on_token(token);
                if config.stop_tokens.contains(&token) {
                    out.finish = FinishReason::Stop;
                    break;
                }
                if out.tokens.len() == config.max_new_tokens {
                    break;
                }
            }
            if out.finish == FinishReason::Stop {
                break;
            }
        }
        out.decode = start.elapsed() - out.prefill;
        Ok(out)
    }

    /// `[K, vocab]` head logits for one position's hidden state (`[1, 1, hidden]`).
    fn head_logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 2> {
        let base = &self.model.module.lm_head;
        if let Some(stacked) = &self.stacked {
            return self.heads.forward_stacked(stacked, hidden, base);
        }
        let k = self.heads.num_heads();
        let vocab = self.model.config.vocab_size;
        self.heads.forward(hidden, base).reshape([k, vocab])
    }

    /// The root candidate as a `[1]` device tensor.
    fn root_token(
        &self,
        base_logits: Tensor<B, 1>,
        mode: &AcceptMode,
        rng: &mut StdRng,
    ) -> Tensor<B, 1, Int> {
        match *mode {
            AcceptMode::Greedy => base_logits.argmax(0),
            AcceptMode::Typical {
                temperature,
                posterior_threshold,
                posterior_alpha,
                ..
            } => {
                let probs = softmax(base_logits.cast(DType::F32) / temperature, 0);
                let mut probs: Vec<f32> = probs.into_data().to_vec().expect("f32");
                let threshold =
                    accept::typical_threshold(&probs, posterior_threshold, posterior_alpha);
                probs
                    .iter_mut()
                    .filter(|p| **p < threshold)
                    .for_each(|p| *p = 0.0);
                let token = top_p_sample(&probs, 1.0, rng.random::<f32>());
                Tensor::from_data(
                    TensorData::new(vec![token as i64], [1]),
                    self.model.device(),
                )
            }
        }
    }

    /// Host-side acceptance; returns every node's token and the accepted path.
    fn accept(
        &self,
        tree_tokens: &Tensor<B, 1, Int>,
        logits: &Tensor<B, 2>,
        mode: &AcceptMode,
    ) -> (Vec<u32>, Accepted) {
        let n = self.tree.len();
        match *mode {
            AcceptMode::Greedy => {
                let argmax = logits.clone().argmax(1).reshape([n]);
                let both = read_ints(Tensor::cat(vec![tree_tokens.clone(), argmax], 0));
                let (tokens, argmax) = both.split_at(n);
                (tokens.to_vec(), accept::greedy(&self.tree, tokens, argmax))
            }
            AcceptMode::Typical {
                temperature,
                posterior_threshold,
                posterior_alpha,
                ..
            } => {
                let probs = softmax(logits.clone().cast(DType::F32) / temperature, 1);
                let entropy = -(probs.clone() * (probs.clone() + 1e-5).log())
                    .sum_dim(1)
                    .reshape([n]);
                let threshold =
                    (entropy.neg().exp() * posterior_alpha).clamp_max(posterior_threshold);
                // Each node's probability and threshold under its parent's distribution.
                let at_parent = probs.select(0, self.parents.clone());
                let cand = at_parent
                    .gather(1, tree_tokens.clone().reshape([n, 1]))
                    .reshape([n]);
                let thr = threshold.select(0, self.parents.clone());
                let both: Vec<f32> = Tensor::cat(vec![cand, thr], 0)
                    .into_data()
                    .to_vec()
                    .expect("f32");
                let (cand, thr) = both.split_at(n);
                let tokens = read_ints(tree_tokens.clone());
                (tokens, accept::typical(&self.tree, cand, thr))
            }
        }
    }
}

/// Indices of the `k` largest entries of each row of `x` (`[rows, n]` -> `[rows, k]`), largest
/// first, on the device: [`kernels::top_k`] (one launch on CubeCL backends).
pub fn top_k_indices<B: kernels::FusedOpsBackend>(x: Tensor<B, 2>, k: usize) -> Tensor<B, 2, Int> {
    kernels::top_k(x, k)
}

#[cfg(test)]
mod tests {
    use burn::{backend::Flex, tensor::TensorData};

    use super::*;

    #[test]
    fn top_k_matches_a_host_sort() {
        let rows = [
            vec![0.5f32, -1.0, 3.0, 2.0, 0.1, 2.5],
            vec![1.0, 9.0, -3.0, 4.0, 8.0, 0.0],
        ];
        let flat: Vec<f32> = rows.concat();
        let x = Tensor::<Flex, 2>::from_data(TensorData::new(flat, [2, 6]), &Default::default());
        let got = read_ints(top_k_indices(x, 3));
        assert_eq!(got, vec![2, 5, 3, 1, 4, 3]);
    }
}
