//! `cargo run --release -p bench`: the attention kernel microbenchmark and end-to-end decoding
//! (plain autoregressive vs Medusa), written up as Markdown, JSON and an SVG chart.

mod e2e;
mod fidelity;
mod kernel;
#[cfg(feature = "cuda")]
mod launch;
mod progress;
mod prompts;
mod report;
mod scale;
mod system;
mod timing;
#[cfg(feature = "cuda")]
mod topk;
#[cfg(feature = "cuda")]
mod tune;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::DType;
use clap::{Parser, Subcommand, ValueEnum};
use kernels::FlashAttentionBackend;
use medusa::{MedusaConfig, MedusaHeads, MedusaTree, checkpoint, checkpoint::HeadsMetadata};
use model::{Llama, LoadOptions, ModelSource, Tokenizer, device::DeviceKind};
use progress::Progress;

use crate::{
    e2e::{E2eSettings, Summary},
    report::{E2eReport, Report},
};

#[derive(Parser, Debug, serde::Serialize)]
#[command(about = "Attention kernel and end-to-end decoding benchmarks (autoregressive vs Medusa)")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Model: "default" (SmolLM2-135M-Instruct), a folder, a hub id, a .gguf file, or
    /// `random:<preset>` (llama3-8b, llama3.2-1b, smollm2-135m) for timing only.
    #[arg(long, global = true, default_value = "default")]
    model: String,
    /// auto: CUDA when a GPU is present (the plain CubeCL backend, cuda-unfused), else the CPU.
    /// cuda is Burn's `Cuda` alias (fusion on): slower for decoding, where every op is a
    /// launch of its own (see docs/benchmarks/2026-11-28-h200x2-fused-ops).
    #[arg(long, global = true, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// Model dtype; auto = bf16 on CUDA, f32 on the CPU.
    #[arg(long, global = true, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
    /// New tokens per prompt (default 128 on CUDA, 32 on the CPU; the 8B-scale timing: 128).
    #[arg(long, global = true)]
    max_new_tokens: Option<usize>,
    /// Prompts longer than this (in tokens, chat template included) keep their last tokens.
    #[arg(long, global = true, default_value_t = 512)]
    prompt_max_tokens: usize,
    /// Timed repetitions per prompt (the fastest counts) in e2e. Default 2 on CUDA, where the
    /// first decode of each new prompt length compiles and autotunes kernels (measured on an
    /// H200: one trial put SmolLM2's autoregressive baseline at 14 tokens/s, two at 48), and 1
    /// on the CPU.
    #[arg(long, global = true)]
    trials: Option<usize>,
    /// Untimed warm-up calls per kernel case.
    #[arg(long, global = true, default_value_t = 3)]
    warmup: usize,
    /// Timed samples per kernel case (median reported).
    #[arg(long, global = true, default_value_t = 10)]
    samples: usize,
    #[arg(long, global = true, default_value_t = 0)]
    seed: u64,
    /// Trained Medusa heads (folder from `cargo run -p train`). Default: ./medusa-heads if it
    /// exists, else untrained heads (said in the report).
    #[arg(long, global = true)]
    medusa_heads: Option<PathBuf>,
    /// Number of untrained heads when no trained heads are given.
    #[arg(long, global = true, default_value_t = 4)]
    heads: usize,
    /// Tree: mc_sim_7b_63, vicuna_7b_stage2, chain4, paths as JSON or a file holding them, or
    /// optimal:N (the best N-node tree for the accuracies saved with trained heads). Default:
    /// the tree saved with the heads, else mc_sim_7b_63.
    #[arg(long, global = true)]
    tree: Option<String>,
    /// JSONL prompts (`turns` or `prompt` fields). Default: the embedded Spec-Bench set.
    #[arg(long, global = true)]
    prompts: Option<PathBuf>,
    /// Prompts per category (default 10 on CUDA, 1 on the CPU).
    #[arg(long, global = true)]
    per_category: Option<usize>,
    /// 8B-scale random-weight timing preset for `all` on CUDA ("none" to skip).
    #[arg(long, global = true, default_value = "llama3-8b")]
    scale: String,
    /// Leave stock Burn's decode and projections out of the scale timing (on a fresh GPU its
    /// first-use autotuning takes minutes).
    #[arg(long, global = true)]
    skip_stock: bool,
    /// Lossless check: a Medusa token that differs from the autoregressive output must be within
    /// this many units in the last place (of the run's dtype, at its position's largest logit
    /// magnitude) of the position's top logit, teacher-forced, and the output must end where greedy decoding would; identical outputs
    /// pass outright (see medusa::lossless).
    #[arg(long, global = true, default_value_t = 4.0)]
    tie_ulps: f32,
    /// Where report.md, report.json and chart.svg go.
    #[arg(long, global = true, default_value = "bench-results")]
    out: PathBuf,
}

impl Args {
    /// Rejects counts that would make an empty or meaningless run, naming the flag.
    fn validate(&self) -> Result<()> {
        let at_least_one = [
            ("--max-new-tokens", self.max_new_tokens),
            ("--prompt-max-tokens", Some(self.prompt_max_tokens)),
            ("--trials", self.trials),
            ("--samples", Some(self.samples)),
            ("--per-category", self.per_category),
            ("--heads", Some(self.heads)),
        ];
        for (flag, value) in at_least_one {
            if value == Some(0) {
                bail!("{flag} must be at least 1");
            }
        }
        if !(self.tie_ulps.is_finite() && self.tie_ulps >= 0.0) {
            bail!("--tie-ulps must be a finite number >= 0");
        }
        // The 8B-scale timing runs after the end-to-end section: a misspelt preset would
        // otherwise fail only after minutes of decoding.
        if self.scale != "none" {
            model::LlamaConfig::preset(&self.scale).context("--scale")?;
        }
        Ok(())
    }
}

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
enum Command {
    /// Kernel, end-to-end and (on CUDA) 8B-scale timing.
    All,
    /// Attention microbenchmark only.
    Kernel,
    /// End-to-end decoding only (with --model `random:<preset>`: only the random-weight timing of
    /// that preset's config).
    E2e,
    /// The model on this backend (f32 and bf16) against transformers' outputs.
    Fidelity,
    /// Where the host time of one kernel launch goes (CUDA only; its second half holds ~15 GB
    /// of buffers, the size of Llama-3-8B's bf16 weights).
    Launch,
    /// Sweep the skinny linear kernels' plan knobs on a model's projection shapes (Llama-3-8B,
    /// or `--model random:<preset>`), for a 64-row tree step and a one-row decode step (CUDA
    /// only; `TUNE_TREE_ONLY=1` skips the latter).
    Tune,
    /// Medusa's candidate top-k on a tree step's shapes: this crate's kernel vs Burn's
    /// `argtopk` vs argmax-and-mask rounds (CUDA only).
    TopK,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
enum BackendArg {
    Auto,
    Cpu,
    Cuda,
    CudaUnfused,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
enum DtypeArg {
    Auto,
    F32,
    Bf16,
    F16,
}

fn main() -> Result<()> {
    let args = Args::parse();
    args.validate()?;
    let backend = match args.backend {
        BackendArg::Auto => match model::device::detect() {
            // Measured on an H200: one kernel launch cost 18 µs through the plain backend (8 µs
            // since the kernels take arrays) and 81 µs as a custom op in Burn's fusion stream,
            // and a batch-1 decode step is mostly launches (Llama-3-8B: 11.1-11.5 vs 13.0-15.1
            // ms/token; SmolLM2 bf16: 84 vs 62 tok/s).
            DeviceKind::Cuda => BackendArg::CudaUnfused,
            DeviceKind::Cpu => BackendArg::Cpu,
        },
        b => b,
    };
    if matches!(backend, BackendArg::Cuda | BackendArg::CudaUnfused) {
        model::device::cuda_ready()
            .map_err(|e| anyhow::anyhow!("CUDA: {e} (--backend cpu runs on the CPU)"))?;
    }
    #[cfg(not(feature = "cuda"))]
    if matches!(
        args.command,
        Some(Command::Launch | Command::Tune | Command::TopK)
    ) {
        bail!("the launch, tune and top-k probes need CUDA (build with the `cuda` feature)");
    }
    #[cfg(feature = "cuda")]
    if let Some(probe @ (Command::Launch | Command::Tune | Command::TopK)) = args.command {
        if backend == BackendArg::Cpu {
            bail!("the launch, tune and top-k probes need a CubeCL runtime (CUDA)");
        }
        type Cuda = cubecl::cuda::CudaRuntime;
        let device = Default::default();
        let gpu = system::System::collect("cuda").gpu.unwrap_or_default();
        let (name, md, json) = if probe == Command::Launch {
            let costs = launch::anatomy::<Cuda>(&device, 2000, 7);
            let md = launch::markdown(&costs, &gpu);
            ("launch", md, serde_json::to_string_pretty(&costs)?)
        } else if probe == Command::TopK {
            let rows = topk::compare::<burn_cubecl::CubeBackend<Cuda, f32, i32, u8>>(&device);
            let md = topk::markdown(&rows, &gpu);
            ("top-k", md, serde_json::to_string_pretty(&rows)?)
        } else {
            // A 64-node tree step's products, then a decode step's (one row), on the shapes of
            // the named random preset (Llama-3-8B by default).
            let config = match ModelSource::parse(&args.model) {
                ModelSource::Random { preset } => model::LlamaConfig::preset(&preset)?,
                ModelSource::Default => model::LlamaConfig::preset("llama3-8b")?,
                _ => bail!(
                    "tune sweeps the shapes of a preset: --model random:<preset> (without \
                     --model, Llama-3-8B's)"
                ),
            };
            let mut rows = tune::sweep_tree::<Cuda>(&device, 64, &config);
            if std::env::var("TUNE_TREE_ONLY").is_err() {
                rows.extend(tune::sweep::<Cuda>(&device, &config));
            }
            let md = tune::markdown(&rows, &gpu);
            ("tune", md, serde_json::to_string_pretty(&rows)?)
        };
        std::fs::create_dir_all(&args.out)?;
        std::fs::write(args.out.join(format!("{name}.md")), &md)?;
        std::fs::write(args.out.join(format!("{name}.json")), json)?;
        println!("{md}");
        return Ok(());
    }
    match backend {
        BackendArg::Cpu => {
            run::<burn::backend::Flex>(&args, &Default::default(), "cpu (burn-flex)", false)
        }
        #[cfg(feature = "cuda")]
        BackendArg::Cuda => run::<burn::backend::Cuda>(
            &args,
            &Default::default(),
            "cuda (burn fusion + autotune)",
            true,
        ),
        #[cfg(feature = "cuda")]
        BackendArg::CudaUnfused => {
            run::<burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>>(
                &args,
                &Default::default(),
                "cuda (cubecl, unfused, autotune)",
                true,
            )
        }
        BackendArg::Auto => unreachable!("resolved above"),
        #[cfg(not(feature = "cuda"))]
        _ => bail!("this build has no CUDA support (enable the `cuda` feature)"),
    }
}

fn run<B: FlashAttentionBackend>(
    args: &Args,
    device: &B::Device,
    device_name: &str,
    gpu: bool,
) -> Result<()> {
    let command = args.command.unwrap_or(Command::All);
    if command == Command::Fidelity {
        let dir = ModelSource::parse(&args.model).resolve()?;
        let cases = fidelity::run::<B>(&dir, device)?;
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/smollm2_reference.json"))?;
        let md = fidelity::markdown(
            &cases,
            &system::System::collect(device_name)
                .gpu
                .unwrap_or_else(|| device_name.into()),
            fixture["source"].as_str().unwrap_or(""),
        );
        std::fs::create_dir_all(&args.out)?;
        std::fs::write(args.out.join("fidelity.md"), &md)?;
        std::fs::write(
            args.out.join("fidelity.json"),
            serde_json::to_string_pretty(&cases)?,
        )?;
        println!("{md}");
        let f32_ok = cases
            .iter()
            .filter(|c| c.dtype == "f32")
            .all(|c| c.input_ids_match && c.top5_match && c.top1_rel_err <= 1e-3 && c.greedy_match);
        if !f32_ok {
            bail!("f32 outputs differ from transformers (see fidelity.md)");
        }
        return Ok(());
    }
    let dtype = match args.dtype {
        DtypeArg::Auto if gpu => DType::BF16,
        DtypeArg::Auto | DtypeArg::F32 => DType::F32,
        DtypeArg::Bf16 => DType::BF16,
        DtypeArg::F16 => DType::F16,
    };
    let max_new_tokens = args.max_new_tokens.unwrap_or(if gpu { 128 } else { 32 });
    let per_category = args.per_category.unwrap_or(if gpu { 10 } else { 1 });
    let trials = args.trials.unwrap_or(if gpu { 2 } else { 1 });
    let source = ModelSource::parse(&args.model);
    let mut notes = Vec::new();
    let mut report = Report {
        system: system::System::collect(device_name),
        config: serde_json::json!({
            "command": command, "model": source.display_name(), "dtype": kernel::dtype_name(dtype),
            "max_new_tokens": max_new_tokens, "prompt_max_tokens": args.prompt_max_tokens,
            "trials": trials, "warmup": args.warmup, "samples": args.samples, "seed": args.seed,
            "per_category": per_category, "backend": device_name,
        }),
        notes: vec![],
        kernel: None,
        e2e: None,
        scale: None,
    };

    let random_preset = match &source {
        ModelSource::Random { preset } => Some(preset.clone()),
        _ => None,
    };
    if matches!(command, Command::All | Command::E2e) && random_preset.is_none() {
        let e2e = run_e2e::<B>(
            args,
            device,
            dtype,
            &source,
            max_new_tokens,
            per_category,
            trials,
            &mut notes,
            &mut |partial| {
                report.e2e = Some(partial.clone());
                report.write(&args.out)
            },
        )?;
        report.e2e = Some(e2e);
        report.notes = notes.clone();
        // Each finished section is written at once, so a run cut short keeps what it measured.
        report.write(&args.out)?;
    }
    let scale_preset = random_preset.or_else(|| {
        (gpu && command == Command::All && args.scale != "none").then(|| args.scale.clone())
    });
    if let Some(preset) = scale_preset
        && matches!(command, Command::All | Command::E2e)
    {
        // Random-weight heads have no measured accuracies to build an `optimal:N` tree from:
        // the timing then uses a published tree of the same kind.
        let spec = match args.tree.as_deref() {
            Some(spec) if spec.starts_with("optimal:") => {
                notes.push(format!(
                    "8B-scale timing: {spec} needs trained heads' accuracies; timed with mc_sim_7b_63."
                ));
                report.notes = notes.clone();
                "mc_sim_7b_63"
            }
            spec => spec.unwrap_or("mc_sim_7b_63"),
        };
        let tree = MedusaTree::named_or_json(spec, args.heads)?;
        let bar = Progress::new(None);
        let settings = scale::ScaleSettings {
            preset: &preset,
            dtype,
            tree: &tree,
            num_heads: args.heads,
            new_tokens: args.max_new_tokens.unwrap_or(128),
            stock: !args.skip_stock,
        };
        report.scale = Some(scale::run::<B>(&settings, device, &bar)?);
        bar.finish_with_message("scale: done");
        report.write(&args.out)?;
    }
    // The kernel section runs last: on a fresh GPU its first-use compilation and autotuning
    // take minutes (measured: 350 s on an H200 for < 10 s of timed work), and a run cut short
    // should keep the end-to-end numbers, the project's main result.
    if matches!(command, Command::All | Command::Kernel) {
        let cases = kernel::cases(gpu);
        let bar = Progress::new(Some(cases.len() as u64));
        report.kernel = Some(kernel::run::<B>(
            device,
            &cases,
            args.warmup,
            args.samples,
            &bar,
        ));
        bar.finish_with_message("kernel: done");
        report.write(&args.out)?;
        if !gpu {
            notes.push("On the CPU backend, \"ours\" is the tensor-op reference (the CubeCL kernels run on CUDA and wgpu), so the kernel table only checks plumbing; large sizes are GPU-only.".into());
        }
    }

    report.notes = notes;
    report.write(&args.out)?;
    println!("{}", report.markdown());
    println!("report written to {}", args.out.join("report.md").display());
    if let Some(e) = &report.e2e
        && !e.overall.lossless
    {
        bail!(
            "greedy Medusa emitted tokens that are not the model's greedy choice (see the report)"
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_e2e<B: FlashAttentionBackend>(
    args: &Args,
    device: &B::Device,
    dtype: DType,
    source: &ModelSource,
    max_new_tokens: usize,
    per_category: usize,
    trials: usize,
    notes: &mut Vec<String>,
    write_partial: &mut dyn FnMut(&E2eReport) -> Result<()>,
) -> Result<E2eReport> {
    let dir = source.resolve()?;
    let options = LoadOptions::default().with_dtype(dtype);
    let model = Llama::<B>::load(&dir, &options, device)
        .with_context(|| format!("loading {}", dir.display()))?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let heads_dir = args.medusa_heads.clone().or_else(|| {
        let d = PathBuf::from("medusa-heads");
        d.join(checkpoint::WEIGHTS_FILE).is_file().then_some(d)
    });
    let (heads, heads_name, saved) = match &heads_dir {
        Some(d) => {
            let (heads, meta) = checkpoint::load::<B>(
                d,
                model.config.hidden_size,
                model.config.vocab_size,
                dtype,
                device,
            )?;
            (heads, format!("trained ({})", d.display()), meta)
        }
        None => {
            notes.push(format!(
                "No trained Medusa heads found (pass --medusa-heads or train with `cargo run --release -p train`): using {} untrained heads (zero residual blocks, LM-head copies), which accept little; the lossless check is still meaningful.",
                args.heads
            ));
            let config = MedusaConfig {
                num_heads: args.heads,
                num_layers: 1,
                hidden_size: model.config.hidden_size,
                vocab_size: model.config.vocab_size,
                share_lm_head: false,
            };
            (
                MedusaHeads::init(&config, &model.module.lm_head),
                "untrained".to_string(),
                HeadsMetadata::default(),
            )
        }
    };
    let (tree, tree_name) = MedusaTree::for_heads(args.tree.as_deref(), heads.num_heads(), &saved)?;
    let all = prompts::load(args.prompts.as_deref())?;
    let chosen = prompts::per_category(&all, per_category);
    let bar = Progress::new(Some(chosen.len() as u64));
    let settings = E2eSettings {
        max_new_tokens,
        prompt_max_tokens: args.prompt_max_tokens,
        trials,
        tie_ulps: args.tie_ulps,
    };
    let model_name = source.display_name();
    let dtype_name = kernel::dtype_name(dtype);
    let summarize = |results: &[e2e::PromptResult]| E2eReport {
        model: model_name.clone(),
        dtype: dtype_name.into(),
        heads: heads_name.clone(),
        tree: tree_name.clone(),
        tree_nodes: tree.len(),
        planned_prompts: chosen.len(),
        tie_ulps: args.tie_ulps,
        overall: Summary::of("all", &results.iter().collect::<Vec<_>>()),
        per_category: e2e::categories(results)
            .iter()
            .map(|c| {
                Summary::of(
                    c,
                    &results
                        .iter()
                        .filter(|r| &r.category == c)
                        .collect::<Vec<_>>(),
                )
            })
            .collect(),
        prompts: results.to_vec(),
    };
    let results = e2e::run::<B>(
        &model,
        &tokenizer,
        &heads,
        &tree,
        &chosen,
        &settings,
        &bar,
        |partial| write_partial(&summarize(partial)),
    )?;
    bar.finish_with_message("e2e: done");
    Ok(summarize(&results))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_counts_name_their_flag() {
        let check = |flags: &[&str]| {
            let mut argv = vec!["bench"];
            argv.extend_from_slice(flags);
            Args::try_parse_from(argv).unwrap().validate()
        };
        assert!(check(&["e2e"]).is_ok());
        for (flags, flag) in [
            (&["e2e", "--max-new-tokens", "0"][..], "--max-new-tokens"),
            (&["e2e", "--prompt-max-tokens", "0"], "--prompt-max-tokens"),
            (&["e2e", "--per-category", "0"], "--per-category"),
            (&["e2e", "--trials", "0"], "--trials"),
            (&["kernel", "--samples", "0"], "--samples"),
            (&["e2e", "--heads", "0"], "--heads"),
            (&["e2e", "--tie-ulps=-1"], "--tie-ulps"),
            (&["--scale", "llama3-9b"], "--scale"),
        ] {
            let message = check(flags).expect_err(&format!("{flags:?}")).to_string();
            assert!(message.contains(flag), "{flags:?}: {message}");
        }
    }
}
