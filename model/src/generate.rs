//! Autoregressive generation: greedy or nucleus sampling, stop tokens, streaming callback.

use std::time::{Duration, Instant};

use burn::tensor::{DType, Int, Tensor, backend::Backend};
use kernels::FlashAttentionBackend;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{error::Result, lm::Llama};

/// Token selection rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Argmax, computed on the device (one 4-byte read per token).
    Greedy,
    /// Softmax with `temperature`, restricted to the smallest set of tokens whose probability
    /// mass reaches `top_p`, sampled with a seeded RNG.
    TopP {
        /// Divides the logits before the softmax: below 1 sharpens the distribution, above 1
        /// flattens it.
        temperature: f32,
        /// Probability mass of the nucleus, in `(0, 1]`; 1 samples from the whole vocabulary.
        top_p: f32,
        /// Seed of the sampler's RNG, for reproducible output.
        seed: u64,
    },
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Most tokens to generate, a stop token included; 128 by default.
    pub max_new_tokens: usize,
    /// How tokens are picked; [`Sampling::Greedy`] by default.
    pub sampling: Sampling,
    /// Generation ends after emitting any of these (the EOS/end-of-turn ids).
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: Sampling::Greedy,
            stop_tokens: vec![],
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_new_tokens` tokens were generated.
    Length,
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated tokens (the stop token included when one ended generation).
    pub tokens: Vec<u32>,
    /// Why generation ended.
    pub finish: FinishReason,
    /// Time of the prompt's forward pass (time to first token).
    pub prefill: Duration,
    /// Time of all later decode steps.
    pub decode: Duration,
}

/// Selects the next token from last-position logits `[vocab]`.
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

impl Sampler {
    /// A sampler following `sampling`, its RNG seeded with `TopP`'s `seed` (0 for greedy).
    pub fn new(sampling: Sampling) -> Self {
        let seed = match sampling {
            Sampling::TopP { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Self {
            sampling,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Picks a token from `logits` (`[vocab]`). Greedy reads back one integer; sampling reads
    /// the probability vector (the only host transfer it needs).
    pub fn sample<B: Backend>(&mut self, logits: Tensor<B, 1>) -> u32 {
        match self.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::TopP {
                temperature, top_p, ..
            } => {
                let probs = burn::tensor::activation::softmax(
                    logits.cast(DType::F32) / temperature.max(1e-6),
                    0,
                );
                let probs: Vec<f32> = probs.into_data().to_vec().expect("f32 probabilities");
                top_p_sample(&probs, top_p, self.rng.random::<f32>())
            }
        }
    }
}

/// Argmax of a `[vocab]` tensor, computed on the device.
pub fn argmax<B: Backend>(logits: Tensor<B, 1>) -> u32 {
    read_ints(logits.argmax(0))[0]
}

/// Reads an integer tensor back to the host.
pub fn read_ints<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<u32> {
    t.into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("integer data")
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

/// Nucleus sampling with a given uniform draw `u` in `[0, 1)`.
pub fn top_p_sample(probs: &[f32], top_p: f32, u: f32) -> u32 {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_unstable_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut kept = Vec::new();
    let mut mass = 0.0f32;
    for &i in &order {
        kept.push(i);
        mass += probs[i];
        if mass >= top_p {
            break;
        }
    }
    let mut target = u * mass;
    for &i in &kept {
        target -= probs[i];
        if target <= 0.0 {
            return i as u32;
        }
    }
    *kept.last().expect("non-empty vocabulary") as u32
}

/// The `[vocab]` logits of the last position of `logits` (`[1, n, vocab]`).
pub fn last_logits<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 1> {
    let [b, n, v] = logits.dims();
    logits.slice([0..b, n - 1..n, 0..v]).reshape([v])
}

/// Generates up to `config.max_new_tokens` after `prompt` (batch 1), calling `on_token` with
/// each new token as soon as it is known.
pub fn generate<B: FlashAttentionBackend>(
    model: &Llama<B>,
    prompt: &[u32],
    config: &GenerationConfig,
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    let mut cache = model.new_cache(1, prompt.len() + config.max_new_tokens);
    let mut sampler = Sampler::new(config.sampling.clone());
    let mut tokens = Vec::with_capacity(config.max_new_tokens);
    let start = Instant::now();
    let mut logits = model.forward(model.tokens(prompt, 1), &mut cache)?;
    let mut prefill = Duration::ZERO;
    let mut finish = FinishReason::Length;
    while tokens.len() < config.max_new_tokens {
        let next = sampler.sample(last_logits(logits));
        if tokens.is_empty() {
            prefill = start.elapsed();
        }
        tokens.push(next);
        on_token(next);
        if config.stop_tokens.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        if tokens.len() == config.max_new_tokens {
            break;
        }
        logits = model.forward(model.tokens(&[next], 1), &mut cache)?;
    }
    Ok(Generation {
        tokens,
        finish,
        prefill,
        decode: start.elapsed() - prefill,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_the_nucleus() {
        let probs = [0.5, 0.3, 0.15, 0.05];
        // top_p 0.8 keeps tokens 0 and 1 (mass 0.8); u scales within that mass.
        assert_eq!(top_p_sample(&probs, 0.8, 0.0), 0);
        assert_eq!(top_p_sample(&probs, 0.8, 0.6), 0);
        assert_eq!(top_p_sample(&probs, 0.8, 0.7), 1);
        assert_eq!(top_p_sample(&probs, 0.8, 0.999), 1);
        // top_p 1.0 can reach the tail.
        assert_eq!(top_p_sample(&probs, 1.0, 0.999), 3);
    }
}
