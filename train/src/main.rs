//! `cargo run --release -p train`: fit Medusa heads on a base model by self-distillation.
//!
//! Without arguments this is a small CPU-sized run (32 prompts, 32-token responses, 24 steps) that
//! finishes in a few minutes and shows the whole pipeline; a GPU run scales the budget up with
//! flags (see `--help`).

use std::{
    collections::HashSet,
    io::{IsTerminal, stderr},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use burn::tensor::DType;
use clap::{Parser, ValueEnum};
use kernels::FlashAttentionBackend;
use medusa::checkpoint as heads_checkpoint;
use model::{Llama, LoadOptions, ModelSource, Tokenizer, device::DeviceKind};
use train::{
    DistillConfig, Outcome, RunControl, TrainConfig,
    data::{self, ExampleCache},
    report::{DataStats, Report, TreeSummary},
    trainer::{self, accuracy_line},
};

const ABOUT: &str = "Fit Medusa heads on a base model by self-distillation (Medusa-1: the \
backbone stays frozen, only the heads train).

The base model first answers every sampled prompt (greedy by default; cached on disk, so this \
runs once per model and settings), then the heads learn to predict its tokens t+2..t+K+1 from \
the hidden state at t. The output folder receives the heads in the published Medusa v1 layout \
(medusa_lm_head.safetensors + config.json, with a decoding tree built from the measured \
accuracies) and report.md / report.json.

Without arguments: a small run sized for a 2-core CPU (32 prompts, 32-token responses, 24 \
steps of 4 sequences; a few minutes), which shows the pipeline but does not make useful heads. \
For real heads use a GPU and every prompt; measured on one H200 (docs/benchmarks/\
2026-11-29-h200-heads): responses in 348 s, 2.5 epochs in 372 s, head-1 top-1 0.513 (at \
--lr 1e-3; the default 2e-3 measured +0.016 at 1.5 epochs, docs/benchmarks/\
2026-11-29-h200-head-sweep):

  cargo run --release -p train -- --prompts 23786 --response-tokens 128 --gen-batch 256 \\
      --batch 16 --epochs 2.5 --dtype f32";

#[derive(Parser, Debug)]
#[command(about = ABOUT)]
struct Args {
    /// Base model: "default" (SmolLM2-135M-Instruct), a Hugging Face folder, a hub id or a .gguf
    /// file.
    #[arg(long, default_value = "default")]
    model: String,
    /// Prompts (JSONL with "prompt", "messages" or ShareGPT "conversations" per line). Default:
    /// ../shared/data/train_prompts.jsonl relative to the workspace root.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Prompts to use, a seeded random sample of the file (held-out ones included).
    #[arg(long, default_value_t = 32)]
    prompts: usize,
    /// Fraction of the sampled prompts held out for accuracy (at least min(8, prompts/2)).
    #[arg(long, default_value_t = 0.02)]
    eval_fraction: f64,
    /// Most tokens of each generated response.
    #[arg(long, default_value_t = 32)]
    response_tokens: usize,
    /// Sampling temperature for the responses; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// More responses per training prompt, sampled at --extra-temperature, each set with its own
    /// seed and cache file: more distinct training sequences from a fixed prompt set. Held-out
    /// prompts keep only their first response, so accuracies stay comparable across runs.
    #[arg(long, default_value_t = 0)]
    extra_responses: usize,
    /// Sampling temperature of the --extra-responses (> 0).
    #[arg(long, default_value_t = 0.7)]
    extra_temperature: f32,
    /// Sequences generated together (default 128 on CUDA, 8 on the CPU).
    #[arg(long)]
    gen_batch: Option<usize>,
    /// Largest prompt-length difference within a generation batch (longer prompts are fed
    /// token by token until they catch up); 0 = only identical lengths.
    #[arg(long, default_value_t = 16)]
    length_spread: usize,
    /// Longest prompt + response; longer prompts are skipped.
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// Medusa heads (K).
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Residual blocks per head (Medusa-1: 1). On SmolLM2-135M 2 measured better: head-1 top-1
    /// 0.551 vs 0.539 on the same data and schedule (docs/benchmarks/2026-11-29-h200-two-layer-heads).
    #[arg(long, default_value_t = 1)]
    layers: usize,
    /// Optimizer steps (ignored with --epochs).
    #[arg(long, default_value_t = 24)]
    steps: usize,
    /// Train for this many passes over the training examples instead of --steps (every
    /// response set counts: with --extra-responses N a pass is N + 1 times as long).
    #[arg(long)]
    epochs: Option<f64>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate (AdamW). Medusa-1 uses 1e-3; on SmolLM2-135M 2e-3 measured better
    /// (docs/benchmarks/2026-11-29-h200-head-sweep: head-1 top-1 0.506 vs 0.490 at 1.5 epochs).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Fraction of the steps spent in linear warmup before the cosine decay.
    #[arg(long, default_value_t = 0.1)]
    warmup_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Weight of head k's loss is decay^(k-1).
    #[arg(long, default_value_t = 0.8)]
    loss_decay: f64,
    /// Train each head against the base model's probabilities for its token (soft labels: the
    /// distillation loss the Medusa paper uses for the backbone in Medusa-2, applied to the
    /// heads) instead of the response token. Measured no better on SmolLM2 (see
    /// docs/benchmarks/2026-11-29-h200-heads).
    #[arg(long)]
    soft_labels: bool,
    /// Heads end in the base model's frozen LM head rather than their own vocabulary projection
    /// (only the residual blocks train; heads of a few MB instead of ~113 MB each for SmolLM2).
    #[arg(long)]
    share_lm_head: bool,
    /// Learning rate of the heads' own vocabulary projections relative to --lr.
    #[arg(long, default_value_t = 1.0)]
    lm_head_lr_scale: f64,
    /// auto: CUDA when a GPU is present, else the CPU.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// Dtype of the frozen backbone; auto = bf16 on CUDA, f32 on the CPU. Heads train in f32.
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
    /// Output folder (heads, report, checkpoint). The default is where `bench` looks for heads.
    #[arg(long, default_value = "medusa-heads")]
    out: PathBuf,
    /// Seeds the prompt sample, the held-out split, the example order and sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Continue the interrupted run whose checkpoint is in --out (same arguments otherwise).
    #[arg(long)]
    resume: bool,
    /// Write a checkpoint (heads, optimizer, position) every this many steps; 0 = never.
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    /// Stop after this many steps with a checkpoint, to --resume later.
    #[arg(long)]
    stop_after: Option<usize>,
    /// End training after this many seconds of training steps (then evaluate and write the
    /// heads of the last step; the learning-rate schedule stays that of --steps/--epochs).
    #[arg(long)]
    max_train_seconds: Option<f64>,
    /// Evaluate on the held-out prompts every this many steps (0 = only at the end).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Nodes of the decoding tree built from the measured accuracies (mc_sim_7b_63 has 63).
    #[arg(long, default_value_t = 63)]
    tree_nodes: usize,
    /// Only generate responses, for shard I of N (e.g. 0/2 and 1/2 in two processes or on two
    /// machines sharing the cache folder), then exit; a later run without this flag trains on
    /// the filled cache. Shards split the prompts sorted by length, so they take equal work.
    #[arg(long, value_parser = parse_shard)]
    distill_shard: Option<(usize, usize)>,
    /// Generate nothing: train on the sampled prompts whose responses are already in the cache
    /// (e.g. filled on another machine), skipping the rest.
    #[arg(long, conflicts_with = "distill_shard")]
    cached_only: bool,
    /// Folder of the generated-response cache (default: the project cache,
    /// ~/.cache/burn-decode/distill).
    #[arg(long)]
    distill_cache: Option<PathBuf>,
}

impl Args {
    /// Rejects settings that would fail late (after the model loads and responses are generated)
    /// or train something other than what was asked, naming the flag.
    fn validate(&self) -> Result<()> {
        let at_least_one = [
            ("--heads", self.heads),
            ("--batch", self.batch),
            ("--grad-accum", self.grad_accum),
            ("--response-tokens", self.response_tokens),
            ("--tree-nodes", self.tree_nodes),
            ("--prompts", self.prompts),
        ];
        for (flag, value) in at_least_one {
            if value == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        // A prompt needs at least one token beside its response.
        if self.max_seq_len <= self.response_tokens {
            bail!(
                "--max-seq-len ({}) must exceed --response-tokens ({})",
                self.max_seq_len,
                self.response_tokens
            );
        }
        if self.epochs.is_none() && self.steps == 0 {
            bail!("--steps must be at least 1 (or pass --epochs)");
        }
        let positive = [
            ("--epochs", self.epochs),
            ("--lr", Some(self.lr)),
            ("--max-train-seconds", self.max_train_seconds),
        ];
        for (flag, value) in positive {
            if value.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                bail!("{flag} must be a finite number above 0");
            }
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            bail!(
                "--warmup-ratio must be between 0 and 1, got {}",
                self.warmup_ratio
            );
        }
        // --loss-decay 0 is meaningful: only head 1 trains (0^0 = 1).
        let at_least_zero = [
            ("--weight-decay", self.weight_decay),
            ("--loss-decay", self.loss_decay),
            ("--lm-head-lr-scale", self.lm_head_lr_scale),
        ];
        for (flag, value) in at_least_zero {
            if !(value.is_finite() && value >= 0.0) {
                bail!("{flag} must be a finite number >= 0, got {value}");
            }
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            bail!(
                "--eval-fraction must be at least 0 and below 1, got {}",
                self.eval_fraction
            );
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("--temperature must be a finite number >= 0 (0 = greedy)");
        }
        if self.extra_responses > 0
            && !(self.extra_temperature.is_finite() && self.extra_temperature > 0.0)
        {
            bail!(
                "--extra-temperature must be above 0 (greedy extra responses would repeat the first)"
            );
        }
        if self.share_lm_head && self.lm_head_lr_scale != 1.0 {
            bail!(
                "--lm-head-lr-scale needs heads with their own projections (not --share-lm-head)"
            );
        }
        Ok(())
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum BackendArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum DtypeArg {
    Auto,
    F32,
    Bf16,
    F16,
}

fn main() -> Result<()> {
    let args = Args::parse();
    args.validate()?;
    let kind = match args.backend {
        BackendArg::Auto => model::device::detect(),
        BackendArg::Cpu => DeviceKind::Cpu,
        BackendArg::Cuda => DeviceKind::Cuda,
    };
    let dtype = match (args.dtype, kind) {
        (DtypeArg::Auto, DeviceKind::Cuda) | (DtypeArg::Bf16, _) => DType::BF16,
        (DtypeArg::Auto, DeviceKind::Cpu) | (DtypeArg::F32, _) => DType::F32,
        (DtypeArg::F16, _) => DType::F16,
    };
    match kind {
        DeviceKind::Cpu => {
            run::<burn::backend::Flex>(&args, dtype, "CPU (Flex)", &Default::default())
        }
        DeviceKind::Cuda => run_cuda(&args, dtype),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda(args: &Args, dtype: DType) -> Result<()> {
    model::device::cuda_ready()
        .map_err(|e| anyhow::anyhow!("CUDA: {e} (--backend cpu trains on the CPU)"))?;
    run::<burn::backend::Cuda>(args, dtype, "CUDA", &Default::default())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &Args, _: DType) -> Result<()> {
    bail!("built without the `cuda` feature; use --backend cpu")
}

fn run<B: FlashAttentionBackend>(
    args: &Args,
    dtype: DType,
    device_name: &str,
    device: &B::Device,
) -> Result<()> {
    let start = Instant::now();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let cuda = device_name == "CUDA";

    // Model and tokenizer.
    let source = ModelSource::parse(&args.model);
    let dir = source.resolve().with_context(|| {
        format!(
            "obtaining the model {:?} (the trainer needs weights and a tokenizer)",
            args.model
        )
    })?;
    let options = LoadOptions::default()
        .with_dtype(dtype)
        .with_max_seq_len(args.max_seq_len);
    let model = Llama::<B>::load(&dir, &options, device)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    println!(
        "model {} ({} layers, hidden {}, vocab {}) on {device_name}, backbone {dtype:?}",
        source.display_name(),
        model.config.num_hidden_layers,
        model.config.hidden_size,
        model.config.vocab_size
    );

    // Prompts: a seeded sample, split into held-out and training, chat-formatted.
    let data_file = args.data.clone().unwrap_or_else(data::default_prompts_path);
    let records = data::read_prompts(&data_file)?;
    let count = args.prompts.min(records.len());
    let eval_count = if args.eval_fraction > 0.0 {
        ((args.eval_fraction * count as f64).ceil() as usize).max(8.min(count / 2))
    } else {
        0
    };
    let (eval_records, train_records) = data::sample_split(&records, count, eval_count, args.seed);
    let mut too_long = 0;
    let mut tokenize = |recs: &[data::PromptRecord]| -> Result<Vec<(String, Vec<u32>)>> {
        let mut out = Vec::with_capacity(recs.len());
        for r in recs {
            let ids = tokenizer.encode_chat(&r.messages)?;
            if ids.is_empty() || ids.len() + args.response_tokens > args.max_seq_len {
                too_long += 1;
            } else {
                out.push((r.id.clone(), ids));
            }
        }
        Ok(out)
    };
    let mut eval_prompts = tokenize(&eval_records)?;
    let mut train_prompts = tokenize(&train_records)?;
    if train_prompts.is_empty() {
        bail!(
            "no training prompt fits --max-seq-len {} with --response-tokens {}",
            args.max_seq_len,
            args.response_tokens
        );
    }

    // Self-distillation.
    let distill_config = DistillConfig {
        max_new_tokens: args.response_tokens,
        temperature: args.temperature,
        seed: args.seed,
        batch_size: args.gen_batch.unwrap_or(if cuda { 128 } else { 8 }),
        max_length_spread: args.length_spread,
        stop_tokens: tokenizer.stop_tokens(),
    };
    let model_id = format!(
        "{}|{}|{dtype:?}",
        source.display_name(),
        serde_json::to_string(&model.config)?
    );
    let key = data::cache_key(&format!("{model_id}|{}", distill_config.cache_settings()));
    let cache_dir = args
        .distill_cache
        .clone()
        .unwrap_or_else(|| model::source::cache_dir().join("distill"));
    let mut cache = ExampleCache::open(&cache_dir, &key)?;
    if args.cached_only {
        let before = eval_prompts.len() + train_prompts.len();
        let had_eval = !eval_prompts.is_empty();
        eval_prompts.retain(|(id, p)| cache.get(id, p).is_some());
        train_prompts.retain(|(id, p)| cache.get(id, p).is_some());
        println!(
            "--cached-only: {} of {before} sampled prompts have cached responses ({} held out)",
            eval_prompts.len() + train_prompts.len(),
            eval_prompts.len()
        );
        // --eval-fraction 0 holds nothing out: only a held-out set emptied by the cache counts.
        if train_prompts.is_empty() || (had_eval && eval_prompts.is_empty()) {
            bail!(
                "--cached-only: the cache {} lacks responses for the training or the held-out \
                 prompts; generate them first (without --cached-only)",
                cache.path().display()
            );
        }
    }
    let mut all: Vec<(String, Vec<u32>)> =
        eval_prompts.iter().chain(&train_prompts).cloned().collect();
    if let Some((shard, shards)) = args.distill_shard {
        all.sort_by(train::distill::generation_order);
        all = all
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % shards == shard)
            .map(|(_, p)| p)
            .collect();
    }
    println!(
        "self-distillation: {} prompts ({} held out), responses of up to {} tokens, {} \
         (cache {})",
        all.len(),
        eval_prompts.len(),
        args.response_tokens,
        if args.temperature > 0.0 {
            format!("sampled at T={}", args.temperature)
        } else {
            "greedy".into()
        },
        cache.path().display()
    );
    // One response set: the prompts' cached responses plus the generated rest, with progress.
    let generate = |prompts: &[(String, Vec<u32>)],
                    config: &DistillConfig,
                    cache: &mut ExampleCache|
     -> Result<_> {
        let bar = trainer::progress_bar(true, prompts.len() as u64, "generate");
        let out = train::distill(
            &model,
            prompts,
            config,
            cache,
            &bar,
            !stderr().is_terminal(),
        )?;
        bar.finish();
        Ok(out)
    };
    let (examples, gen_stats) = generate(&all, &distill_config, &mut cache)?;
    // `all` is the held-out prompts, then the training ones (a shard holds a length-sorted
    // subset of both and only fills caches: nothing to split there).
    let (eval, mut train_examples) = if args.distill_shard.is_some() {
        (Vec::new(), Vec::new())
    } else {
        let mut eval = examples;
        let train = eval.split_off(eval_prompts.len());
        (eval, train)
    };
    let mut extra_examples = Vec::new();
    let mut gen_stats = gen_stats;
    let mut cache_files = vec![cache.path().display().to_string()];
    // Extra sampled responses of the training prompts (not of the held-out ones).
    let eval_ids: HashSet<&str> = eval_prompts.iter().map(|(id, _)| id.as_str()).collect();
    for set in 1..=args.extra_responses {
        let config = DistillConfig {
            temperature: args.extra_temperature,
            seed: args.seed + set as u64,
            ..distill_config.clone()
        };
        let key = data::cache_key(&format!("{model_id}|{}", config.cache_settings()));
        let mut extra_cache = ExampleCache::open(&cache_dir, &key)?;
        let mut prompts: Vec<(String, Vec<u32>)> = all
            .iter()
            .filter(|(id, _)| !eval_ids.contains(id.as_str()))
            .cloned()
            .collect();
        if args.cached_only {
            prompts.retain(|(id, p)| extra_cache.get(id, p).is_some());
            if prompts.is_empty() && args.distill_shard.is_none() {
                bail!(
                    "--cached-only: the cache {} holds no extra response set {set} for these \
                     prompts; generate it first (without --cached-only)",
                    extra_cache.path().display()
                );
            }
        }
        println!(
            "extra responses {set}/{}: {} prompts, sampled at T={} (cache {})",
            args.extra_responses,
            prompts.len(),
            args.extra_temperature,
            extra_cache.path().display()
        );
        let (extra, stats) = generate(&prompts, &config, &mut extra_cache)?;
        extra_examples.push(extra.len());
        train_examples.extend(extra);
        gen_stats.add(&stats);
        cache_files.push(extra_cache.path().display().to_string());
    }
    if let Some((shard, shards)) = args.distill_shard {
        println!(
            "shard {shard}/{shards}: {} responses ({} generated in {:.1} s, {} from the cache) in {}",
            gen_stats.prompts,
            gen_stats.generated,
            gen_stats.seconds,
            gen_stats.cached,
            cache_files.join(", ")
        );
        return Ok(());
    }
    let (eval, train_examples) = (&eval[..], &train_examples[..]);
    println!(
        "  {} responses ({} generated in {:.1} s, {} from the cache), {} tokens; {} ended with a stop token",
        gen_stats.prompts,
        gen_stats.generated,
        gen_stats.seconds,
        gen_stats.cached,
        gen_stats.response_tokens,
        gen_stats.stopped
    );

    // Training.
    let micro = args.batch * args.grad_accum;
    let steps = match args.epochs {
        Some(e) => ((e * train_examples.len() as f64) / micro as f64)
            .ceil()
            .max(1.0) as usize,
        None => args.steps.max(1),
    };
    // Frozen backbone: on the CPU, when examples are seen more than once and their hidden states
    // fit in 2 GiB (f32), compute them once. (On a GPU the batched backbone forward is cheap next
    // to the heads.)
    let epochs = (steps * micro) as f64 / train_examples.len() as f64;
    let hidden_bytes: usize = train_examples
        .iter()
        .map(|e| (e.response.len() + args.heads + 1) * model.config.hidden_size * 4)
        .sum();
    // Soft labels read the hidden states of other positions than the cached ones.
    let cache_hidden = !cuda && !args.soft_labels && epochs > 1.0 && hidden_bytes <= 2 << 30;
    let config = TrainConfig {
        num_heads: args.heads,
        num_layers: args.layers,
        steps,
        batch_size: args.batch,
        grad_accum: args.grad_accum,
        lr: args.lr,
        warmup_steps: (args.warmup_ratio * steps as f64).round() as usize,
        weight_decay: args.weight_decay,
        loss_decay: args.loss_decay,
        seed: args.seed,
        eval_batch_size: args.batch.max(8),
        cache_hidden,
        pad_multiple: if cuda { 64 } else { 0 },
        soft_labels: args.soft_labels,
        share_lm_head: args.share_lm_head,
        lm_head_lr_scale: args.lm_head_lr_scale,
    };
    let control = RunControl {
        checkpoint_every: args.checkpoint_every,
        eval_every: args.eval_every,
        stop_after: args.stop_after,
        resume: args.resume,
        progress: true,
        time_limit: args.max_train_seconds,
    };
    let mut fingerprint = format!(
        "{key}|{}|{}|{}|{}|{}",
        serde_json::to_string(&config)?,
        data_file.display(),
        count,
        eval_count,
        args.max_seq_len
    );
    if args.extra_responses > 0 {
        fingerprint += &format!(
            "|extra {:?} at T={}",
            extra_examples, args.extra_temperature
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    // The folder holds large generated files: keep it out of version control.
    let ignore = args.out.join(".gitignore");
    if !ignore.exists() {
        std::fs::write(&ignore, "*\n")?;
    }
    let train_tokens: usize = train_examples.iter().map(|e| e.response.len()).sum();
    println!(
        "training {} heads x {} layers: {} steps of {} x {} sequences ({epochs:.2} epochs of {} \
         examples, {} response tokens){}{}",
        config.num_heads,
        config.num_layers,
        steps,
        config.grad_accum,
        config.batch_size,
        train_examples.len(),
        train_tokens,
        if cache_hidden {
            "; backbone hidden states computed once"
        } else {
            ""
        },
        if args.resume { ", resuming" } else { "" }
    );
    let outcome = train::train(
        &model,
        train_examples,
        eval,
        &config,
        &control,
        &args.out,
        &fingerprint,
    )?;
    let (heads, state) = match outcome {
        Outcome::Stopped(state) => {
            println!(
                "stopped after step {} of {}; checkpoint in {}. Continue with:\n  {} --resume",
                state.step,
                config.steps,
                args.out.display(),
                command
                    .replace(
                        &format!("--stop-after {}", args.stop_after.unwrap_or(0)),
                        ""
                    )
                    .trim()
            );
            return Ok(());
        }
        Outcome::Finished { heads, state } => (heads, state),
    };

    // Tree from the measured accuracies, heads, report.
    let final_eval = state.evals.last().expect("final evaluation");
    let (tree, metadata) =
        TreeSummary::from_eval(final_eval, args.tree_nodes, args.heads, &args.model);
    heads_checkpoint::save(&heads, &args.out, &metadata)?;

    let report = Report {
        model: source.display_name(),
        device: device_name.into(),
        backbone_dtype: format!("{dtype:?}"),
        command: command.clone(),
        config,
        distill: distill_config,
        data: DataStats {
            data_file: data_file.display().to_string(),
            prompts_in_file: records.len(),
            sampled: count,
            too_long,
            train_examples: train_examples.len(),
            eval_examples: eval.len(),
            train_response_tokens: train_tokens,
            eval_response_tokens: eval.iter().map(|e| e.response.len()).sum(),
            max_seq_len: args.max_seq_len,
            cache_file: cache_files.join(", "),
            extra_examples,
            extra_temperature: args.extra_temperature,
        },
        generation: gen_stats.clone(),
        generation_seconds: gen_stats.seconds,
        train_seconds: state.train_seconds,
        steps_done: state.step,
        time_limited: state.time_limited,
        eval_seconds: state.eval_seconds,
        total_seconds: start.elapsed().as_secs_f64(),
        resumed: args.resume,
        history: state.history.clone(),
        evals: state.evals.clone(),
        tree,
        heads_dir: args.out.display().to_string(),
    };
    report.write(&args.out)?;

    println!("\n{}", report.accuracy_table());
    println!("held-out top-1/top-5: {}", accuracy_line(final_eval));
    if let Some(t) = &report.tree {
        println!(
            "tree: {} nodes, expected {:.2} tokens/step{}",
            t.nodes,
            t.expected_tokens_per_step,
            t.mc_sim_7b_63_expected_tokens_per_step
                .map(|e| format!(" (mc_sim_7b_63: {e:.2})"))
                .unwrap_or_default()
        );
    }
    println!(
        "time: generation {:.1} s, training {:.1} s{all}, evaluation {:.1} s{all}, {} {:.1} s",
        report.generation_seconds,
        report.train_seconds,
        report.eval_seconds,
        if args.resume {
            "this invocation"
        } else {
            "total"
        },
        report.total_seconds,
        all = if args.resume {
            " (all invocations)"
        } else {
            ""
        },
    );
    if args.prompts < 1000 {
        println!(
            "(a small budget: real heads need thousands of prompts, best on a GPU; see \
             `cargo run --release -p train -- --help`)"
        );
    }
    println!(
        "\nheads written to {} (report.md, report.json beside them)",
        args.out.display()
    );
    println!("use them: {}", usage(&args.model, &args.out));
    Ok(())
}

/// `I/N` with `I < N`.
fn parse_shard(s: &str) -> std::result::Result<(usize, usize), String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("expected I/N (e.g. 0/2), got {s:?}"))?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|e| format!("shard {i:?}: {e}"))?,
        n.trim()
            .parse()
            .map_err(|e| format!("shard count {n:?}: {e}"))?,
    );
    if i >= n {
        return Err(format!("shard {i} of {n}: I must be below N"));
    }
    Ok((i, n))
}

/// The command that decodes with the trained heads.
fn usage(model: &str, out: &Path) -> String {
    let model = if model == "default" {
        String::new()
    } else {
        format!(" --model {model}")
    };
    format!(
        "cargo run --release -p bench -- e2e{model} --medusa-heads {}",
        out.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(flags: &[&str]) -> Result<()> {
        let mut argv = vec!["train"];
        argv.extend_from_slice(flags);
        Args::try_parse_from(argv)?.validate()
    }

    #[test]
    fn bad_settings_name_their_flag() {
        assert!(check(&[]).is_ok());
        assert!(check(&["--epochs", "2.5", "--steps", "0"]).is_ok());
        assert!(
            check(&[
                "--loss-decay",
                "0",
                "--weight-decay",
                "2",
                "--eval-fraction",
                "0"
            ])
            .is_ok()
        );
        for (flags, flag) in [
            (&["--heads", "0"][..], "--heads"),
            (&["--tree-nodes", "0"], "--tree-nodes"),
            (&["--prompts", "0"], "--prompts"),
            (&["--max-seq-len", "0"], "--max-seq-len"),
            (
                &["--max-seq-len", "64", "--response-tokens", "64"],
                "--max-seq-len",
            ),
            (&["--response-tokens", "0"], "--response-tokens"),
            (&["--steps", "0"], "--steps"),
            (&["--epochs", "0"], "--epochs"),
            (&["--lr=-1e-3"], "--lr"),
            (&["--lr", "NaN"], "--lr"),
            (&["--max-train-seconds", "0"], "--max-train-seconds"),
            (&["--warmup-ratio", "2"], "--warmup-ratio"),
            (&["--weight-decay=-0.1"], "--weight-decay"),
            (&["--loss-decay", "inf"], "--loss-decay"),
            (&["--eval-fraction", "1"], "--eval-fraction"),
            (&["--temperature=-1"], "--temperature"),
            (
                &["--extra-responses", "1", "--extra-temperature", "0"],
                "--extra-temperature",
            ),
            (
                &["--share-lm-head", "--lm-head-lr-scale", "2"],
                "--lm-head-lr-scale",
            ),
        ] {
            let message = check(flags).expect_err(&format!("{flags:?}")).to_string();
            assert!(message.contains(flag), "{flags:?}: {message}");
        }
    }
}
