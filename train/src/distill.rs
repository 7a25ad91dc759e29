//! Self-distillation data (Medusa §2.3.2): the base model answers each prompt itself, so the
//! heads learn to predict the model's own continuation. Generation is batched and its results
//! are cached on disk, so it runs once per model and settings.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{DType, Distribution, Int, Tensor, backend::Backend};
use indicatif::ProgressBar;
use kernels::FlashAttentionBackend;
use model::{Llama, generate::read_ints};
use serde::Serialize;

use crate::data::{Example, ExampleCache};

/// How responses are generated.
#[derive(Debug, Clone, Serialize)]
pub struct DistillConfig {
    /// Most response tokens per prompt.
    pub max_new_tokens: usize,
    /// 0 for greedy decoding (argmax); otherwise sampling from the softmax at this temperature
    /// (Gumbel-max on the device, seeded).
    pub temperature: f32,
    /// Seed of the sampling noise; unused when greedy.
    pub seed: u64,
    /// Sequences generated together.
    pub batch_size: usize,
    /// Largest prompt-length difference within one batch (see [`generate_batch`]); 0 batches
    /// only prompts of identical length.
    pub max_length_spread: usize,
    /// Generation of a sequence ends after any of these (kept as the response's last token).
    pub stop_tokens: Vec<u32>,
}

impl DistillConfig {
    /// What makes a response what it is; names the cache file.
    pub fn cache_settings(&self) -> String {
        let sampling = if self.temperature > 0.0 {
            format!("temperature={},seed={}", self.temperature, self.seed)
        } else {
            "greedy".into()
        };
        format!(
            "max_new_tokens={},{sampling},stop={:?}",
            self.max_new_tokens, self.stop_tokens
        )
    }
}

/// Counts and timing of a distillation pass, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DistillStats {
    /// Prompts answered (cached or generated).
    pub prompts: usize,
    /// Responses found in the cache.
    pub cached: usize,
    /// Responses generated in this run.
    pub generated: usize,
    /// Generation batches run in this run.
    pub batches: usize,
    /// Forward passes (prefills and steps) of this run.
    pub forward_passes: usize,
    /// Response tokens over all prompts (cached or not).
    pub response_tokens: usize,
    /// Responses that ended with a stop token (the rest hit `max_new_tokens`).
    pub stopped: usize,
    /// Response tokens generated in this run.
    pub generated_tokens: usize,
    /// Wall time of the pass, in seconds (cache lookup and generation).
    pub seconds: f64,
}

impl DistillStats {
    /// Adds the counts and time of another pass (e.g. a second set of responses).
    pub fn add(&mut self, other: &DistillStats) {
        self.prompts += other.prompts;
        self.cached += other.cached;
        self.generated += other.generated;
        self.batches += other.batches;
        self.forward_passes += other.forward_passes;
        self.response_tokens += other.response_tokens;
        self.stopped += other.stopped;
        self.generated_tokens += other.generated_tokens;
        self.seconds += other.seconds;
    }
}

/// The order prompts are generated in: by token length (so batches need little padding), then
/// id. Shards (`train --distill-shard`) split this order so that they get equal work.
pub fn generation_order(a: &(String, Vec<u32>), b: &(String, Vec<u32>)) -> std::cmp::Ordering {
    a.1.len().cmp(&b.1.len()).then_with(|| a.0.cmp(&b.0))
}

/// Answers every prompt (`(id, chat-formatted tokens)`), taking what `cache` already holds and
/// generating the rest in batches of similar prompt length. Returns the examples in the order
/// of `prompts`. With `log`, prints a line at every tenth of the work (for logs without a
/// terminal, where the progress bar stays hidden).
pub fn distill<B: FlashAttentionBackend>(
    model: &Llama<B>,
    prompts: &[(String, Vec<u32>)],
    config: &DistillConfig,
    cache: &mut ExampleCache,
    progress: &ProgressBar,
    log: bool,
) -> Result<(Vec<Example>, DistillStats)> {
    let start = Instant::now();
    let mut stats = DistillStats {
        prompts: prompts.len(),
        ..Default::default()
    };
    let mut missing: Vec<&(String, Vec<u32>)> = prompts
        .iter()
        .filter(|(id, p)| cache.get(id, p).is_none())
        .collect();
    stats.cached = prompts.len() - missing.len();
    missing.sort_by(|a, b| generation_order(a, b));
    if config.temperature > 0.0 {
        B::seed(model.device(), config.seed);
    }

    progress.set_length(prompts.len() as u64);
    progress.set_position(stats.cached as u64);
    let mut rest = &missing[..];
    while !rest.is_empty() {
        let first = rest[0].1.len();
        let n = rest
            .iter()
            .take(config.batch_size.max(1))
            .take_while(|(_, p)| p.len() - first <= config.max_length_spread)
            .count();
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        let ids: Vec<&[u32]> = batch.iter().map(|(_, p)| p.as_slice()).collect();
        let (responses, passes) = generate_batch(model, &ids, config)?;
        let examples: Vec<Example> = batch
            .iter()
            .zip(responses)
            .map(|((id, prompt), response)| Example {
                id: id.clone(),
                prompt: prompt.clone(),
                response,
            })
            .collect();
        stats.batches += 1;
        stats.forward_passes += passes;
        stats.generated += examples.len();
        stats.generated_tokens += examples.iter().map(|e| e.response.len()).sum::<usize>();
        cache.append(&examples)?;
        let rate = format!(
            "{:.0} tok/s",
            stats.generated_tokens as f64 / start.elapsed().as_secs_f64()
        );
        let tenth = missing.len().div_ceil(10);
        if log && (stats.generated / tenth != (stats.generated - examples.len()) / tenth) {
            progress.suspend(|| {
                println!(
                    "  generated {}/{} responses ({rate}, {:.0} s)",
                    stats.generated,
                    missing.len(),
                    start.elapsed().as_secs_f64()
                )
            });
        }
        progress.inc(examples.len() as u64);
        progress.set_message(rate);
    }

    let examples: Vec<Example> = prompts
        .iter()
        .map(|(id, p)| cache.get(id, p).expect("generated above").clone())
        .collect();
    stats.response_tokens = examples.iter().map(|e| e.response.len()).sum();
    stats.stopped = examples
        .iter()
        .filter(|e| {
            e.response
                .last()
                .is_some_and(|t| config.stop_tokens.contains(t))
        })
        .count();
    stats.seconds = start.elapsed().as_secs_f64();
    Ok((examples, stats))
}

/// Generates a response for each prompt of one batch; returns them with the number of forward
/// passes.
///
/// Prompts may differ in length, and no padding is needed: all sequences advance in lockstep
/// through one KV cache. The batch is prefilled with the shortest prompt's length; after that, a
/// sequence whose prompt is not exhausted is fed its next prompt token (teacher forcing) and one
/// whose prompt is done is fed its own prediction. With equal lengths this is plain batched
/// generation; with a spread of `s` tokens it costs `s` extra steps. Each step reads the
/// `[batch]` next tokens from the device once (and not at all while every live sequence is still
/// reading its prompt). Tokens predicted after a sequence's stop token are dropped.
pub fn generate_batch<B: FlashAttentionBackend>(
    model: &Llama<B>,
    prompts: &[&[u32]],
    config: &DistillConfig,
) -> Result<(Vec<Vec<u32>>, usize)> {
    let b = prompts.len();
    let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(0);
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    assert!(shortest > 0, "empty prompt");
    let mut responses = vec![Vec::new(); b];
    let mut done = vec![config.max_new_tokens == 0; b];
    if done.iter().all(|&d| d) {
        return Ok((responses, 0));
    }
    let mut cache = model.new_cache(b, longest + config.max_new_tokens);

    let prefill: Vec<u32> = prompts
        .iter()
        .flat_map(|p| p[..shortest].iter().copied())
        .collect();
    let hidden = model.forward_hidden(model.tokens(&prefill, b), &mut cache, None)?;
    let [_, _, h] = hidden.dims();
    let mut last = hidden.slice([0..b, shortest - 1..shortest, 0..h]);
    let mut passes = 1;
    // `pos` is the position whose token is being decided.
    for pos in shortest.. {
        let generating = (0..b).any(|i| !done[i] && pos >= prompts[i].len());
        let predicted = if generating {
            next_tokens(model.logits(last).reshape([b as i32, -1]), config)
        } else {
            vec![0; b]
        };
        let mut next = predicted.clone();
        for i in 0..b {
            if pos < prompts[i].len() {
                next[i] = prompts[i][pos];
            } else if !done[i] {
                responses[i].push(predicted[i]);
                done[i] = responses[i].len() >= config.max_new_tokens
                    || config.stop_tokens.contains(&predicted[i]);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        last = model.forward_hidden(model.tokens(&next, b), &mut cache, None)?;
        passes += 1;
    }
    Ok((responses, passes))
}

/// Next token of each row of `logits` (`[batch, vocab]`): argmax, or a sample at the
/// configured temperature (Gumbel-max: `argmax(logits / T + G)`, `G = −log(−log U)`).
fn next_tokens<B: Backend>(logits: Tensor<B, 2>, config: &DistillConfig) -> Vec<u32> {
    let choice: Tensor<B, 2, Int> = if config.temperature > 0.0 {
        let logits = logits.cast(DType::F32) / config.temperature as f64;
        let u = Tensor::<B, 2>::random(
            logits.dims(),
            Distribution::Uniform(1e-30, 1.0),
            &logits.device(),
        );
        let gumbel = -((-u.log()).log());
        (logits + gumbel).argmax(1)
    } else {
        logits.argmax(1)
    };
    read_ints(choice)
}
