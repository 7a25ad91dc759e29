//! The Medusa-1 training loop: frozen backbone on the inner backend, heads on `Autodiff`,
//! AdamW with linear warmup and cosine decay, gradient accumulation, held-out evaluation and
//! resumable checkpoints.

use std::{path::Path, time::Instant};

use anyhow::{Result, bail};
use burn::{
    backend::Autodiff,
    module::{AutodiffModule, Module, ModuleMapper, Param, ParamId},
    optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer},
    tensor::{DType, Int, Tensor, backend::Backend},
};
use indicatif::{ProgressBar, ProgressStyle};
use kernels::FlashAttentionBackend;
use medusa::{MedusaConfig, MedusaHeads, tree::TOPK};
use model::{Llama, generate::read_ints, llama::Proj};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};

use crate::{
    checkpoint,
    data::Example,
    objective::{
        HeadBatch, backbone_hidden, backbone_rows, head_logits, masked_cross_entropy, medusa_loss,
        select_rows, target_ranks, teacher_probs,
    },
};

/// Hyper-parameters that determine the trained heads (a resumed run must match them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// `K`, Medusa heads.
    pub num_heads: usize,
    /// Residual blocks per head.
    pub num_layers: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps, then cosine decay to 0 at `steps`.
    pub warmup_steps: usize,
    /// AdamW (decoupled) weight decay of the heads' parameters (default 0).
    pub weight_decay: f64,
    /// `λ` of the loss `Σ_k λ^(k−1) CE_k`.
    pub loss_decay: f64,
    /// Seeds the order of the training examples.
    pub seed: u64,
    /// Sequences per evaluation batch.
    pub eval_batch_size: usize,
    /// Compute each training example's backbone hidden states once and keep them (in f32 on the
    /// device) for later epochs. They are computed one example at a time, so their values do
    /// not depend on which examples share a batch.
    pub cache_hidden: bool,
    /// Round each batch's sequence length up to a multiple of this and its row count up to a
    /// power of two (see [`HeadBatch::padded`]; 0 = exact shapes). The loss does not change; on CUDA it
    /// bounds how many distinct shapes get compiled and autotuned.
    #[serde(default)]
    pub pad_multiple: usize,
    /// Train each head against the base model's distribution for its token (soft labels,
    /// see [`crate::objective`]) instead of the response token. Needs `cache_hidden` off: the
    /// targets come from the backbone's hidden states of other positions.
    #[serde(default)]
    pub soft_labels: bool,
    /// Heads end in the base model's (frozen) LM head instead of their own vocabulary
    /// projection: only the residual blocks train (`L · hidden²` parameters per head instead of
    /// `hidden · vocab` more), and the heads on disk are a few MB.
    #[serde(default)]
    pub share_lm_head: bool,
    /// Learning rate of the heads' own vocabulary projections relative to `lr` (1 = the
    /// Medusa-1 recipe). Those projections hold nearly all trainable parameters (vocab ×
    /// hidden per head, copied from the base LM head); a smaller rate keeps them nearer that
    /// start while the residual blocks learn at the full rate.
    #[serde(default = "one")]
    pub lm_head_lr_scale: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            num_heads: 4,
            num_layers: 1,
            steps: 30,
            batch_size: 4,
            grad_accum: 1,
            lr: 1e-3,
            warmup_steps: 3,
            weight_decay: 0.0,
            loss_decay: 0.8,
            seed: 42,
            eval_batch_size: 8,
            cache_hidden: false,
            pad_multiple: 0,
            soft_labels: false,
            share_lm_head: false,
            lm_head_lr_scale: 1.0,
        }
    }
}

/// How a run proceeds (not part of what it computes).
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    /// Write a checkpoint every this many steps (0: never).
    pub checkpoint_every: usize,
    /// Evaluate on the held-out examples every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Stop once this many steps are done, after writing a checkpoint (to resume later).
    pub stop_after: Option<usize>,
    /// Continue from the checkpoint in the output folder.
    pub resume: bool,
    /// Show progress bars and log lines.
    pub progress: bool,
    /// Stop training once this many seconds were spent in training steps (over all sessions of
    /// the run), then evaluate and publish the heads as if the last step were the final one.
    /// The learning-rate schedule is not shortened: the heads are those of step `s` of the
    /// planned run. For bounded machines (a lent GPU with a call limit).
    pub time_limit: Option<f64>,
}

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// 1-based.
    pub step: usize,
    /// Scheduled learning rate of this step (warmup + cosine); the heads' vocabulary projections
    /// step with `lr × lm_head_lr_scale`.
    pub lr: f64,
    /// Weighted Medusa loss, mean over the micro-batches.
    pub loss: f64,
    /// Cross-entropy of each head.
    pub head_loss: Vec<f64>,
    /// Positions read by the heads in this step.
    pub positions: usize,
}

/// Held-out accuracy after some step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Optimizer steps done when the evaluation ran.
    pub step: usize,
    /// Per offset (index 0 is the base LM head predicting `t + 1`, index `k` Medusa head `k`):
    /// how many targets had rank 0, 1, ..., `TOPK − 1` among the head's logits.
    pub rank_counts: Vec<Vec<usize>>,
    /// Per offset: targets evaluated.
    pub targets: Vec<usize>,
    /// Per offset: mean cross-entropy.
    pub loss: Vec<f64>,
}

impl EvalResult {
    /// Top-`k` accuracy of offset index `j` (0 = base LM head).
    pub fn top_k(&self, j: usize, k: usize) -> f64 {
        let hits: usize = self.rank_counts[j][..k.min(TOPK)].iter().sum();
        hits as f64 / self.targets[j].max(1) as f64
    }

    /// For each Medusa head, the probability that its `i`-th ranked candidate is right, the
    /// input of [`medusa::tree::optimal_choices`].
    pub fn rank_accuracy(&self) -> Vec<Vec<f64>> {
        (1..self.rank_counts.len())
            .map(|j| {
                self.rank_counts[j]
                    .iter()
                    .map(|&c| c as f64 / self.targets[j].max(1) as f64)
                    .collect()
            })
            .collect()
    }
}

/// What the trainer keeps across a kill: saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done; with the seed it fixes the data position (the examples of step `s`
    /// are those at `s · grad_accum · batch_size ..` of the seeded epoch permutations).
    pub step: usize,
    /// Identity of the run (config, data, model); a resume must match it.
    pub fingerprint: String,
    /// Log of every optimizer step done so far, in order.
    pub history: Vec<StepLog>,
    /// Held-out evaluations so far (every `eval_every` steps, then the final one).
    pub evals: Vec<EvalResult>,
    /// Wall time spent in training steps (not evaluation), over all sessions of the run.
    pub train_seconds: f64,
    /// Wall time spent in held-out evaluation, over all sessions of the run.
    pub eval_seconds: f64,
    /// Training ended at `step` before the planned steps because of [`RunControl::time_limit`].
    #[serde(default)]
    pub time_limited: bool,
}

/// The end of [`train`].
pub enum Outcome<B: Backend> {
    /// `stop_after` was reached; the checkpoint holds the state.
    Stopped(TrainState),
    /// All steps done; the final evaluation is the last entry of `state.evals`.
    Finished {
        /// The trained heads (inner backend, no autodiff).
        heads: MedusaHeads<B>,
        /// The final state, with the run's history and evaluations.
        state: TrainState,
    },
}

/// Learning rate at `step` (0-based): linear warmup to `peak` over `warmup` steps, then cosine
/// decay towards 0 at `total`.
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Examples can be trained on when head 1 has at least one target.
pub fn trainable(e: &Example) -> bool {
    !e.response.is_empty() && e.len() >= 3
}

/// The order examples are visited in: epoch after epoch, each a seeded permutation, so the
/// examples of any micro-batch follow from its index alone.
struct DataOrder {
    seed: u64,
    epoch: usize,
    perm: Vec<usize>,
}

impl DataOrder {
    fn new(n: usize, seed: u64) -> Self {
        let mut order = Self {
            seed,
            epoch: 0,
            perm: (0..n).collect(),
        };
        order.shuffle();
        order
    }

    fn shuffle(&mut self) {
        self.perm.sort_unstable();
        let seed = self.seed ^ (self.epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.perm.shuffle(&mut StdRng::seed_from_u64(seed));
    }

    /// Example index at global position `g`.
    fn at(&mut self, g: usize) -> usize {
        let n = self.perm.len();
        if g / n != self.epoch {
            self.epoch = g / n;
            self.shuffle();
        }
        self.perm[g % n]
    }
}

/// Marks every float parameter as trainable (modules built on the inner backend carry no
/// gradient flag).
struct RequireGrad;

impl<B: Backend> ModuleMapper<B> for RequireGrad {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.set_require_grad(true)
    }
}

/// Parameters of the heads' own vocabulary projections.
fn projection_ids<B: Backend>(heads: &MedusaHeads<B>) -> Vec<ParamId> {
    heads
        .heads
        .iter()
        .filter_map(|h| h.lm_head.as_ref().map(|p| p.weight.id))
        .collect()
}

/// The base model's LM head in f32, the initial value of each head's vocabulary projection.
fn base_head_f32<B: FlashAttentionBackend>(model: &Llama<B>) -> Proj<B> {
    Proj {
        weight: Param::from_tensor(model.module.lm_head.weight.val().cast(DType::F32)),
        bias: None,
    }
}

/// Trains Medusa heads on `train`, evaluating on `eval`; checkpoints go to
/// `out_dir/checkpoint.bin`. `fingerprint` identifies the run for `--resume`.
pub fn train<B: FlashAttentionBackend>(
    model: &Llama<B>,
    train: &[Example],
    eval: &[Example],
    config: &TrainConfig,
    control: &RunControl,
    out_dir: &Path,
    fingerprint: &str,
) -> Result<Outcome<B>> {
    let train: Vec<&Example> = train.iter().filter(|e| trainable(e)).collect();
    if train.is_empty() {
        bail!("no training example has a response to learn from");
    }
    if config.soft_labels && config.cache_hidden {
        bail!(
            "soft labels need the backbone's hidden states of every position: turn cache_hidden off"
        );
    }
    let device = model.device();
    let base = base_head_f32(model);
    let medusa_config = MedusaConfig {
        num_heads: config.num_heads,
        num_layers: config.num_layers,
        hidden_size: model.config.hidden_size,
        vocab_size: model.config.vocab_size,
        share_lm_head: config.share_lm_head,
    };
    let mut heads = <MedusaHeads<Autodiff<B>> as AutodiffModule<Autodiff<B>>>::from_inner(
        MedusaHeads::init(&medusa_config, &base),
    )
    .map(&mut RequireGrad);
    // The base head as a constant of the autodiff graph, for heads that share it.
    let base_ad = <Proj<Autodiff<B>> as AutodiffModule<Autodiff<B>>>::from_inner(base.clone());
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(config.weight_decay as f32)
        .init::<Autodiff<B>, MedusaHeads<Autodiff<B>>>();
    let ckpt = out_dir.join(checkpoint::FILE);
    let mut state = TrainState {
        step: 0,
        fingerprint: fingerprint.to_string(),
        history: Vec::new(),
        evals: Vec::new(),
        train_seconds: 0.0,
        eval_seconds: 0.0,
        time_limited: false,
    };
    if control.resume {
        if !ckpt.is_file() {
            bail!(
                "--resume: no checkpoint at {} (the run finished, or stopped before its first \
                 checkpoint)",
                ckpt.display()
            );
        }
        let (saved, h, o) =
            checkpoint::load::<Autodiff<B>, _, _, TrainState>(&ckpt, heads, optim, device)?;
        if saved.fingerprint != fingerprint {
            bail!(
                "--resume: the checkpoint at {} belongs to a different run (model, data or \
                 hyper-parameters changed)\n  checkpoint: {}\n  this run:   {}",
                ckpt.display(),
                saved.fingerprint,
                fingerprint
            );
        }
        (state, heads, optim) = (saved, h, o);
    }

    // Stable across optimizer steps (they keep each parameter's id).
    let projection_params = projection_ids(&heads);
    let offsets: Vec<usize> = (2..=config.num_heads + 1).collect();
    let mut order = DataOrder::new(train.len(), config.seed);
    let mut cached: Vec<Option<Tensor<B, 2>>> = vec![None; train.len()];
    let bar = progress_bar(control.progress, config.steps as u64, "train");
    bar.set_position(state.step as u64);
    let log_every = (config.steps / 10).max(1);
    while state.step < config.steps {
        let started = Instant::now();
        let lr = learning_rate(state.step, config.steps, config.warmup_steps, config.lr);
        let mut accumulator = GradientsAccumulator::new();
        let mut log = StepLog {
            step: state.step + 1,
            lr,
            loss: 0.0,
            head_loss: vec![0.0; config.num_heads],
            positions: 0,
        };
        for micro in 0..config.grad_accum {
            let first = (state.step * config.grad_accum + micro) * config.batch_size;
            let indices: Vec<usize> = (first..first + config.batch_size)
                .map(|g| order.at(g))
                .collect();
            let examples: Vec<&Example> = indices.iter().map(|&i| train[i]).collect();
            let batch = HeadBatch::new(&examples, &offsets).padded(config.pad_multiple);
            let (hidden, teachers) = if config.cache_hidden {
                let mut parts = Vec::with_capacity(indices.len());
                for &i in &indices {
                    if cached[i].is_none() {
                        let one = HeadBatch::new(&[train[i]], &offsets);
                        cached[i] = Some(backbone_rows(model, &one)?);
                    }
                    parts.push(cached[i].clone().expect("computed above"));
                }
                (Tensor::cat(parts, 0), None)
            } else {
                let all = backbone_hidden(model, &batch)?;
                let teachers = config
                    .soft_labels
                    .then(|| teacher_probs(all.clone(), &batch, &base));
                (select_rows(all, &batch.rows), teachers)
            };
            let hidden = Tensor::<Autodiff<B>, 2>::from_inner(hidden);
            let teachers =
                teachers.map(|t| t.into_iter().map(Tensor::from_inner).collect::<Vec<_>>());
            let (loss, per_head) = medusa_loss(
                &heads,
                &base_ad,
                hidden,
                &batch,
                config.loss_decay,
                teachers,
            );
            let per_head: Vec<f32> = per_head
                .inner()
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32");
            let grads = (loss / config.grad_accum as f64).backward();
            accumulator.accumulate(&heads, GradientsParams::from_grads(grads, &heads));
            let weights = (0..config.num_heads).map(|k| config.loss_decay.powi(k as i32));
            let total: f64 = per_head
                .iter()
                .zip(weights)
                .map(|(&l, w)| l as f64 * w)
                .sum();
            log.loss += total / config.grad_accum as f64;
            for (acc, &l) in log.head_loss.iter_mut().zip(&per_head) {
                *acc += l as f64 / config.grad_accum as f64;
            }
            log.positions += batch.num_rows();
        }
        let mut grads = accumulator.grads();
        if config.lm_head_lr_scale != 1.0 {
            // AdamW keeps its moments and step count per parameter, so two steps over disjoint
            // parameters are one step with two learning rates.
            let mut projections = GradientsParams::new();
            for &id in &projection_params {
                if let Some(g) = grads.remove::<B, 2>(id) {
                    projections.register::<B, 2>(id, g);
                }
            }
            heads = optim.step(lr * config.lm_head_lr_scale, heads, projections);
        }
        heads = optim.step(lr, heads, grads);
        state.step += 1;
        state.train_seconds += started.elapsed().as_secs_f64();
        bar.set_message(format!("loss {:.3}", log.loss));
        bar.inc(1);
        // The first steps are logged too: they show compilation/autotune costs.
        if control.progress && (state.step.is_multiple_of(log_every) || state.step <= 3) {
            let heads_ce: Vec<String> = log.head_loss.iter().map(|l| format!("{l:.2}")).collect();
            let seconds = started.elapsed().as_secs_f64();
            bar.suspend(|| {
                println!(
                    "step {:>5}/{}  lr {:.2e}  loss {:.4}  head {} [{}]  {seconds:.2} s  \
                     ({:.0} s in training)",
                    log.step,
                    config.steps,
                    lr,
                    log.loss,
                    if config.soft_labels { "KL" } else { "CE" },
                    heads_ce.join(", "),
                    state.train_seconds
                )
            });
        }
        state.history.push(log);

        let out_of_time = control
            .time_limit
            .is_some_and(|limit| state.train_seconds >= limit)
            && state.step < config.steps;
        if out_of_time {
            state.time_limited = true;
            if control.progress {
                bar.suspend(|| {
                    println!(
                        "time limit reached after {:.0} s: training ends at step {} of {}",
                        state.train_seconds, state.step, config.steps
                    )
                });
            }
        }
        let finished = state.step == config.steps || out_of_time;
        if control.eval_every > 0 && state.step.is_multiple_of(control.eval_every) && !finished {
            let started = Instant::now();
            let result = evaluate(
                model,
                &heads.valid(),
                &base,
                eval,
                config,
                state.step,
                false,
            )?;
            state.eval_seconds += started.elapsed().as_secs_f64();
            if control.progress {
                bar.suspend(|| {
                    println!("eval after step {}: {}", state.step, accuracy_line(&result))
                });
            }
            state.evals.push(result);
        }
        let stop = control.stop_after.is_some_and(|s| state.step >= s) && !finished;
        let due =
            control.checkpoint_every > 0 && state.step.is_multiple_of(control.checkpoint_every);
        if (due && !finished) || stop {
            checkpoint::save(&ckpt, &state, &heads, &optim)?;
        }
        if stop {
            bar.abandon();
            return Ok(Outcome::Stopped(state));
        }
        if finished {
            break;
        }
    }
    bar.finish();

    let heads = heads.valid();
    let started = Instant::now();
    let result = evaluate(
        model,
        &heads,
        &base,
        eval,
        config,
        state.step,
        control.progress,
    )?;
    state.eval_seconds += started.elapsed().as_secs_f64();
    state.evals.push(result);
    // The finished run lives in the published heads; the optimizer state is no longer needed.
    if ckpt.is_file() {
        std::fs::remove_file(&ckpt)?;
    }
    Ok(Outcome::Finished { heads, state })
}

/// Top-1/top-5 of every head, for log lines.
pub fn accuracy_line(result: &EvalResult) -> String {
    (1..result.targets.len())
        .map(|j| format!("h{j} {:.3}/{:.3}", result.top_k(j, 1), result.top_k(j, 5)))
        .collect::<Vec<_>>()
        .join("  ")
}

/// Held-out accuracy of the base LM head and every Medusa head (no gradients): for each
/// position and offset, the rank of the right token among the head's logits.
pub fn evaluate<B: FlashAttentionBackend>(
    model: &Llama<B>,
    heads: &MedusaHeads<B>,
    base: &Proj<B>,
    eval: &[Example],
    config: &TrainConfig,
    step: usize,
    progress: bool,
) -> Result<EvalResult> {
    let k = heads.num_heads();
    let offsets: Vec<usize> = (1..=k + 1).collect();
    let mut result = EvalResult {
        step,
        rank_counts: vec![vec![0; TOPK]; k + 1],
        targets: vec![0; k + 1],
        loss: vec![0.0; k + 1],
    };
    // Sorted by length so that batches carry little padding.
    let mut eval: Vec<&Example> = eval.iter().filter(|e| trainable(e)).collect();
    eval.sort_by_key(|e| e.len());
    let bar = progress_bar(progress, eval.len() as u64, "eval");
    for chunk in eval.chunks(config.eval_batch_size.max(1)) {
        let batch = HeadBatch::new(chunk, &offsets);
        if batch.num_rows() == 0 {
            continue;
        }
        let batch = batch.padded(config.pad_multiple);
        let n = batch.num_rows();
        let hidden = backbone_rows(model, &batch)?;
        let device = hidden.device();
        let mut ranks: Vec<Tensor<B, 1, Int>> = Vec::with_capacity(k + 1);
        let mut losses: Vec<Tensor<B, 1>> = Vec::with_capacity(k + 1);
        for j in 0..=k {
            let logits = if j == 0 {
                base.forward(hidden.clone())
            } else {
                head_logits(&heads.heads[j - 1], hidden.clone(), base)
            };
            let targets = batch.targets_tensor(j, &device);
            ranks.push(target_ranks(logits.clone(), targets.clone()));
            losses.push(masked_cross_entropy(
                logits,
                targets,
                batch.mask_tensor(j, &device),
                batch.counts[j],
            ));
        }
        let ranks = read_ints(Tensor::cat(ranks, 0));
        let losses: Vec<f32> = Tensor::cat(losses, 0)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32");
        for j in 0..=k {
            for (i, &rank) in ranks[j * n..(j + 1) * n].iter().enumerate() {
                if batch.mask[j * n + i] > 0.0 && (rank as usize) < TOPK {
                    result.rank_counts[j][rank as usize] += 1;
                }
            }
            let before = result.targets[j];
            result.targets[j] += batch.counts[j];
            // Running mean weighted by targets.
            let total = result.targets[j].max(1) as f64;
            result.loss[j] = (result.loss[j] * before as f64
                + losses[j] as f64 * batch.counts[j] as f64)
                / total;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(result)
}

/// A progress bar, hidden when `show` is false.
pub fn progress_bar(show: bool, len: u64, prefix: &'static str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len).with_prefix(prefix);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>8} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta}) {msg}",
        )
        .expect("valid template"),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let lr = |s| learning_rate(s, 100, 10, 1.0);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!((lr(55) - 0.5).abs() < 1e-12);
        assert!(lr(99) < 0.001);
    }

    #[test]
    fn data_order_depends_only_on_position() {
        let mut a = DataOrder::new(7, 3);
        let seq: Vec<usize> = (0..30).map(|g| a.at(g)).collect();
        // Every epoch is a permutation.
        for epoch in seq.chunks(7).filter(|c| c.len() == 7) {
            let mut e = epoch.to_vec();
            e.sort();
            assert_eq!(e, (0..7).collect::<Vec<_>>());
        }
        // Jumping straight to a position gives the same example.
        let mut b = DataOrder::new(7, 3);
        assert_eq!(b.at(23), seq[23]);
        assert_eq!(b.at(2), seq[2]);
    }
}
