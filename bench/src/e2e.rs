//! End-to-end decoding: plain autoregressive greedy vs greedy Medusa, same model, same prompts,
//! same dtype, in one run, with a lossless check.
//!
//! The check has two levels: token for token against the autoregressive output, and, where
//! they differ (bf16 rounds a 64-row tree step and a one-row decode step differently, so
//! near-ties fall either way), every Medusa token scored teacher-forced must be within
//! `tie_ulps` units in the last place of its position's largest logit magnitude below the top
//! logit ([`medusa::lossless`]).

use std::time::Instant;

use anyhow::Result;
use kernels::FlashAttentionBackend;
use medusa::{
    AcceptMode, DecodeConfig, MedusaDecoder, MedusaHeads, MedusaTree,
    lossless::{GreedyScore, greedy_score, well_terminated},
};
use model::{GenerationConfig, Llama, Message, Tokenizer, generate, generate::last_logits};
use serde::Serialize;

use crate::{kernel::host_f32, prompts::Prompt};

/// Per-prompt numbers.
#[derive(Debug, Clone, Serialize)]
pub struct PromptResult {
    pub id: String,
    pub category: String,
    pub prompt_tokens: usize,
    pub ar_tokens: usize,
    pub ar_seconds: f64,
    pub medusa_tokens: usize,
    pub medusa_seconds: f64,
    pub medusa_steps: usize,
    pub accept_lengths: Vec<usize>,
    pub head_accepts: Vec<usize>,
    /// Greedy Medusa produced exactly the autoregressive tokens.
    pub identical: bool,
    /// First differing position when not identical.
    pub first_mismatch: Option<usize>,
    /// At the first mismatch: the logit of the autoregressive token minus that of Medusa's,
    /// from a fresh forward over the common prefix (outside the timing). Near zero (within the
    /// dtype's rounding of the logits) means a near-tie that rounding tipped either way.
    pub mismatch_logit_gap: Option<f32>,
    /// Medusa's tokens scored teacher-forced (see the module docs).
    pub medusa_greedy: GreedyScore,
    /// The autoregressive tokens scored the same way: the distance between the decode path and
    /// the teacher-forced forward on their own.
    pub ar_greedy: GreedyScore,
    /// Medusa's output ends as greedy decoding ends ([`medusa::lossless::well_terminated`]).
    pub medusa_well_terminated: bool,
}

impl PromptResult {
    /// Identical to the autoregressive output, or every token greedy within the tolerance and
    /// the output ending where greedy decoding would end it.
    pub fn lossless(&self) -> bool {
        self.identical || (self.medusa_greedy.beyond_tolerance == 0 && self.medusa_well_terminated)
    }
}

/// Aggregate over a set of prompts.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    pub prompts: usize,
    pub ar_tokens: usize,
    pub ar_seconds: f64,
    pub ar_tokens_per_s: f64,
    pub medusa_tokens: usize,
    pub medusa_seconds: f64,
    pub medusa_tokens_per_s: f64,
    pub medusa_steps: usize,
    /// Tokens per Medusa step (1.0 = no speculation accepted).
    pub mean_accepted_length: f64,
    /// Fraction of steps where head k's token was accepted.
    pub head_acceptance: Vec<f64>,
    /// Milliseconds per Medusa step (its seconds over its steps, prefill included).
    pub medusa_step_ms: f64,
    /// Milliseconds per autoregressive token (its seconds over its tokens, prefill included).
    pub ar_token_ms: f64,
    /// A Medusa step in autoregressive decode steps: `speedup` is about
    /// `mean_accepted_length / step_cost`.
    pub step_cost: f64,
    pub speedup: f64,
    /// Prompts where greedy Medusa reproduced the autoregressive tokens exactly.
    pub identical_prompts: usize,
    /// Every prompt identical, or all of Medusa's tokens greedy within the tolerance
    /// ([`PromptResult::lossless`]).
    pub lossless: bool,
    /// Largest gap of a Medusa token below its position's top logit, in ulps of the position's
    /// largest logit magnitude.
    pub medusa_max_gap_ulps: f32,
    /// The same for the autoregressive tokens.
    pub ar_max_gap_ulps: f32,
}

impl Summary {
    pub fn of(name: &str, results: &[&PromptResult]) -> Self {
        let ar_tokens: usize = results.iter().map(|r| r.ar_tokens).sum();
        let ar_seconds: f64 = results.iter().map(|r| r.ar_seconds).sum();
        let md_tokens: usize = results.iter().map(|r| r.medusa_tokens).sum();
        let md_seconds: f64 = results.iter().map(|r| r.medusa_seconds).sum();
        let steps: usize = results.iter().map(|r| r.medusa_steps).sum();
        let heads = results.first().map_or(0, |r| r.head_accepts.len());
        let head_acceptance = (0..heads)
            .map(|k| {
                results.iter().map(|r| r.head_accepts[k]).sum::<usize>() as f64
                    / steps.max(1) as f64
            })
            .collect();
        let ar_tps = ar_tokens as f64 / ar_seconds.max(1e-9);
        let md_tps = md_tokens as f64 / md_seconds.max(1e-9);
        let medusa_step_ms = 1e3 * md_seconds / steps.max(1) as f64;
        let ar_token_ms = 1e3 * ar_seconds / ar_tokens.max(1) as f64;
        Self {
            name: name.into(),
            prompts: results.len(),
            ar_tokens,
            ar_seconds,
            ar_tokens_per_s: ar_tps,
            medusa_tokens: md_tokens,
            medusa_seconds: md_seconds,
            medusa_tokens_per_s: md_tps,
            medusa_steps: steps,
            mean_accepted_length: md_tokens as f64 / steps.max(1) as f64,
            head_acceptance,
            medusa_step_ms,
            ar_token_ms,
            step_cost: medusa_step_ms / ar_token_ms.max(1e-12),
            speedup: md_tps / ar_tps.max(1e-9),
            identical_prompts: results.iter().filter(|r| r.identical).count(),
            lossless: results.iter().all(|r| r.lossless()),
            medusa_max_gap_ulps: results
                .iter()
                .map(|r| r.medusa_greedy.max_gap_ulps)
                .fold(0.0, f32::max),
            ar_max_gap_ulps: results
                .iter()
                .map(|r| r.ar_greedy.max_gap_ulps)
                .fold(0.0, f32::max),
        }
    }
}

/// The categories of `results` in order of first appearance.
pub fn categories(results: &[PromptResult]) -> Vec<String> {
    let mut cats: Vec<String> = Vec::new();
    for r in results {
        if !cats.contains(&r.category) {
            cats.push(r.category.clone());
        }
    }
    cats
}

/// Settings of the end-to-end run.
pub struct E2eSettings {
    pub max_new_tokens: usize,
    pub prompt_max_tokens: usize,
    pub trials: usize,
    /// How many units in the last place (of the position's largest logit magnitude) a token's
    /// logit may sit below the top logit and still count as greedy (a near-tie that rounding
    /// decides).
    pub tie_ulps: f32,
}

/// Decodes every prompt with both methods (after one untimed warm-up prompt that triggers
/// kernel compilation and autotuning), `trials` times, keeping each prompt's fastest trial.
/// `on_result` sees the results so far after each prompt (the caller writes a partial report,
/// so a run cut short keeps what it measured).
#[allow(clippy::too_many_arguments)]
pub fn run<B: FlashAttentionBackend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    heads: &MedusaHeads<B>,
    tree: &MedusaTree,
    prompts: &[Prompt],
    settings: &E2eSettings,
    progress: &crate::progress::Progress,
    mut on_result: impl FnMut(&[PromptResult]) -> Result<()>,
) -> Result<Vec<PromptResult>> {
    let decoder = MedusaDecoder::new(model, heads, tree.clone())?;
    let stop = tokenizer.stop_tokens();
    let ar_config = GenerationConfig {
        max_new_tokens: settings.max_new_tokens,
        stop_tokens: stop.clone(),
        ..Default::default()
    };
    let md_config = DecodeConfig {
        max_new_tokens: settings.max_new_tokens,
        stop_tokens: stop,
        mode: AcceptMode::Greedy,
    };
    let encode = |p: &Prompt| -> Result<Vec<u32>> {
        let mut ids = tokenizer.encode_chat(&[Message::user(&p.text)])?;
        if ids.len() > settings.prompt_max_tokens {
            // Keep the end: it holds the question's last words and the assistant header.
            ids.drain(..ids.len() - settings.prompt_max_tokens);
        }
        Ok(ids)
    };
    if let Some(first) = prompts.first() {
        progress.set_message("e2e: warm-up");
        let ids = encode(first)?;
        generate(model, &ids, &ar_config, |_| {})?;
        decoder.generate(&ids, &md_config, |_| {})?;
    }
    let mut results = Vec::new();
    for p in prompts {
        progress.set_message(format!("e2e: {} #{}", p.category, p.id));
        let ids = encode(p)?;
        let mut best_ar = f64::INFINITY;
        let mut best_md = f64::INFINITY;
        let mut ar_tokens = Vec::new();
        let mut md = None;
        for _ in 0..settings.trials.max(1) {
            let t = Instant::now();
            let out = generate(model, &ids, &ar_config, |_| {})?;
            best_ar = best_ar.min(t.elapsed().as_secs_f64());
            ar_tokens = out.tokens;
            let t = Instant::now();
            let out = decoder.generate(&ids, &md_config, |_| {})?;
            best_md = best_md.min(t.elapsed().as_secs_f64());
            md = Some(out);
        }
        let md = md.expect("at least one trial");
        let first_mismatch = ar_tokens
            .iter()
            .zip(&md.tokens)
            .position(|(a, b)| a != b)
            .or_else(|| {
                (ar_tokens.len() != md.tokens.len()).then(|| ar_tokens.len().min(md.tokens.len()))
            });
        let mismatch_logit_gap = match first_mismatch {
            Some(at) if at < ar_tokens.len() && at < md.tokens.len() => {
                let prefix: Vec<u32> = ids.iter().chain(&ar_tokens[..at]).copied().collect();
                let logits = host_f32(last_logits(model.forward_full(&prefix)?));
                Some(logits[ar_tokens[at] as usize] - logits[md.tokens[at] as usize])
            }
            _ => None,
        };
        let medusa_greedy = greedy_score(model, &ids, &md.tokens, settings.tie_ulps)?;
        let ar_greedy = greedy_score(model, &ids, &ar_tokens, settings.tie_ulps)?;
        let medusa_well_terminated =
            well_terminated(&md.tokens, &md_config.stop_tokens, settings.max_new_tokens);
        results.push(PromptResult {
            id: p.id.clone(),
            category: p.category.clone(),
            prompt_tokens: ids.len(),
            ar_tokens: ar_tokens.len(),
            ar_seconds: best_ar,
            medusa_tokens: md.tokens.len(),
            medusa_seconds: best_md,
            medusa_steps: md.steps,
            accept_lengths: md.accept_lengths.clone(),
            head_accepts: md.head_accepts.clone(),
            identical: first_mismatch.is_none(),
            first_mismatch,
            mismatch_logit_gap,
            medusa_greedy,
            ar_greedy,
            medusa_well_terminated,
        });
        on_result(&results)?;
        progress.inc(1);
    }
    Ok(results)
}
