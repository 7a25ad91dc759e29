//! The training report (`report.json`, `report.md`) and the summary printed at the end.

use std::{fmt::Write as _, path::Path};

use anyhow::Result;
use medusa::{
    checkpoint::HeadsMetadata,
    tree::{self, MC_SIM_7B_63},
};
use serde::Serialize;

use crate::{
    distill::{DistillConfig, DistillStats},
    trainer::{EvalResult, StepLog, TrainConfig},
};

/// Where the examples came from.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DataStats {
    /// Path of the prompt file (JSONL).
    pub data_file: String,
    /// Prompts read from the file.
    pub prompts_in_file: usize,
    /// Sampled prompts (before the length filter).
    pub sampled: usize,
    /// Sampled prompts dropped because prompt + response would exceed `max_seq_len`.
    pub too_long: usize,
    /// Training examples (prompt + response), extra response sets included.
    pub train_examples: usize,
    /// Held-out examples the accuracies are measured on.
    pub eval_examples: usize,
    /// Response tokens of the training examples.
    pub train_response_tokens: usize,
    /// Response tokens of the held-out examples.
    pub eval_response_tokens: usize,
    /// Longest prompt + response allowed, in tokens (`--max-seq-len`).
    pub max_seq_len: usize,
    /// Response caches, comma-separated: the first response set, then each extra one.
    pub cache_file: String,
    /// Training examples of each extra response set (`--extra-responses`; fewer than the
    /// training prompts where `--cached-only` found some missing), included in
    /// `train_examples`.
    pub extra_examples: Vec<usize>,
    /// Sampling temperature of the extra response sets (`--extra-temperature`).
    pub extra_temperature: f32,
}

/// The tree derived from the measured accuracies.
#[derive(Debug, Clone, Serialize)]
pub struct TreeSummary {
    /// Nodes of the tree, root excluded.
    pub nodes: usize,
    /// The tree's paths (`medusa_choices`), as saved in the heads' `config.json`.
    pub choices: Vec<Vec<usize>>,
    /// Expected tokens per decoding step under the measured accuracies (independence assumed).
    pub expected_tokens_per_step: f64,
    /// The same for `mc_sim_7b_63` restricted to the trained heads, for comparison.
    pub mc_sim_7b_63_expected_tokens_per_step: Option<f64>,
}

/// Everything about one training run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Base model's display name.
    pub model: String,
    /// Backend the run used (`CUDA` or `CPU (Flex)`).
    pub device: String,
    /// Dtype of the frozen backbone (the heads train in f32).
    pub backbone_dtype: String,
    /// The command line of this invocation.
    pub command: String,
    /// Training hyper-parameters.
    pub config: TrainConfig,
    /// How the first response set was generated.
    pub distill: DistillConfig,
    /// Prompt and example counts.
    pub data: DataStats,
    /// Self-distillation counts and time, over all response sets.
    pub generation: DistillStats,
    /// Seconds spent generating responses in this run (cached responses cost none).
    pub generation_seconds: f64,
    /// Seconds spent in training steps (evaluation excluded).
    pub train_seconds: f64,
    /// Optimizer steps done (fewer than `config.steps` when the time limit ended training).
    pub steps_done: usize,
    /// Whether `--max-train-seconds` ended training before the planned steps.
    pub time_limited: bool,
    /// Seconds spent evaluating on the held-out prompts.
    pub eval_seconds: f64,
    /// This invocation only; with `resumed`, `train_seconds` and `eval_seconds` also count
    /// earlier invocations (they are saved in the checkpoint).
    pub total_seconds: f64,
    /// Whether this invocation continued a checkpoint (`--resume`).
    pub resumed: bool,
    /// Learning rate and losses of every optimizer step.
    pub history: Vec<StepLog>,
    /// Held-out evaluations (per-head top-k accuracy and CE), the final one last.
    pub evals: Vec<EvalResult>,
    /// The tree built from the final accuracies; `None` when nothing was measured.
    pub tree: Option<TreeSummary>,
    /// Folder the heads and the report were written to (`--out`).
    pub heads_dir: String,
}

impl TreeSummary {
    /// The best tree of `nodes` nodes for `eval`'s measured per-rank accuracies, and what the
    /// heads' `config.json` records beside them: that tree (decoders use it by default) and the
    /// accuracies (so that a decoder can build a tree for another budget, `optimal:N`).
    /// `None` and metadata without a tree when no held-out target was measured.
    pub fn from_eval(
        eval: &EvalResult,
        nodes: usize,
        num_heads: usize,
        base_model: &str,
    ) -> (Option<Self>, HeadsMetadata) {
        let mut metadata = HeadsMetadata {
            base_model_name_or_path: Some(base_model.to_string()),
            ..HeadsMetadata::default()
        };
        if !eval.targets.iter().skip(1).any(|&t| t > 0) {
            return (None, metadata);
        }
        let accuracy = eval.rank_accuracy();
        let choices = tree::optimal_choices(&accuracy, nodes);
        let mc_sim = tree::parse_choices(MC_SIM_7B_63).ok().map(|paths| {
            let fitting: Vec<Vec<usize>> =
                paths.into_iter().filter(|p| p.len() <= num_heads).collect();
            tree::expected_tokens_per_step(&fitting, &accuracy)
        });
        let summary = Self {
            nodes: choices.len(),
            expected_tokens_per_step: tree::expected_tokens_per_step(&choices, &accuracy),
            mc_sim_7b_63_expected_tokens_per_step: mc_sim,
            choices,
        };
        metadata.medusa_choices = Some(summary.choices.clone()).filter(|c| !c.is_empty());
        metadata.medusa_accuracy = Some(accuracy);
        (Some(summary), metadata)
    }
}

impl Report {
    /// The final evaluation.
    pub fn final_eval(&self) -> Option<&EvalResult> {
        self.evals.last()
    }

    /// Writes `report.json` and `report.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        Ok(())
    }

    /// Per-head accuracy table (Markdown, also readable as plain text).
    pub fn accuracy_table(&self) -> String {
        let mut s = String::new();
        let Some(eval) = self.final_eval() else {
            return "(no held-out evaluation)\n".into();
        };
        s += "| head | predicts | targets | top-1 | top-5 | top-10 | CE |\n";
        s += "| --- | --- | ---: | ---: | ---: | ---: | ---: |\n";
        for j in 0..eval.targets.len() {
            let (name, predicts) = if j == 0 {
                ("base LM head".to_string(), "t+1".to_string())
            } else {
                (format!("medusa {j}"), format!("t+{}", j + 1))
            };
            let _ = writeln!(
                s,
                "| {name} | {predicts} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
                eval.targets[j],
                eval.top_k(j, 1),
                eval.top_k(j, 5),
                eval.top_k(j, 10),
                eval.loss[j]
            );
        }
        s
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let _ = writeln!(s, "# Medusa heads for {}\n", self.model);
        let _ = writeln!(
            s,
            "Medusa-1 (frozen backbone, self-distillation; {}). Device: {}, backbone dtype {}, \
             heads f32. Heads written to `{}`.\n",
            if c.soft_labels {
                "soft labels: each head fits the base model's distribution for its token"
            } else {
                "hard labels: each head fits the response token"
            },
            self.device,
            self.backbone_dtype,
            self.heads_dir
        );
        let _ = writeln!(s, "Command: `{}`\n", self.command);
        s += "## Time\n\n| phase | seconds |\n| --- | ---: |\n";
        let _ = writeln!(
            s,
            "| generation (self-distillation, {} of {} responses generated, {} cached) | {:.1} |",
            self.generation.generated,
            self.generation.prompts,
            self.generation.cached,
            self.generation_seconds
        );
        let steps = if self.time_limited {
            format!(
                "{} of {} planned steps: time limit reached",
                self.steps_done, c.steps
            )
        } else {
            format!("{} steps", self.steps_done)
        };
        let _ = writeln!(s, "| training ({steps}) | {:.1} |", self.train_seconds);
        let _ = writeln!(s, "| evaluation | {:.1} |", self.eval_seconds);
        let total = if self.resumed {
            "this invocation, resumed from a checkpoint (incl. loading and saving; training \
             and evaluation above count every invocation)"
        } else {
            "total (incl. loading and saving)"
        };
        let _ = writeln!(s, "| {total} | {:.1} |\n", self.total_seconds);

        s += "## Held-out accuracy\n\n";
        let _ = writeln!(
            s,
            "{} held-out prompts; targets are the base model's own response tokens. The base LM \
             head row checks the setup: with greedy data it should be close to 1.\n",
            self.data.eval_examples
        );
        s += &self.accuracy_table();
        s += "\n";

        if let Some(tree) = &self.tree {
            s += "## Tree\n\n";
            let _ = writeln!(
                s,
                "Built greedily from the measured per-rank accuracies ({} nodes): expected {:.3} \
                 tokens per step{}. Saved as `medusa_choices` in `config.json`, so decoders use \
                 it by default, with the per-rank accuracies (`medusa_accuracy`) from which \
                 `bench --tree optimal:N` builds a tree for another node budget.\n",
                tree.nodes,
                tree.expected_tokens_per_step,
                tree.mc_sim_7b_63_expected_tokens_per_step
                    .map(|e| format!(" (mc_sim_7b_63 under the same accuracies: {e:.3})"))
                    .unwrap_or_default()
            );
            let _ = writeln!(
                s,
                "```\n{}\n```\n",
                serde_json::to_string(&tree.choices).unwrap_or_default()
            );
        }

        let per_head = if c.soft_labels {
            "head KL from the base distribution"
        } else {
            "head CE"
        };
        let _ = writeln!(
            s,
            "## Loss\n\n| step | lr | loss | {per_head} |\n| ---: | ---: | ---: | --- |"
        );
        let every = (self.history.len() / 20).max(1);
        for (i, log) in self.history.iter().enumerate() {
            if i % every == 0 || i + 1 == self.history.len() {
                let ce: Vec<String> = log.head_loss.iter().map(|l| format!("{l:.3}")).collect();
                let _ = writeln!(
                    s,
                    "| {} | {:.2e} | {:.4} | {} |",
                    log.step,
                    log.lr,
                    log.loss,
                    ce.join(", ")
                );
            }
        }
        if self.evals.len() > 1 {
            s += "\n### Accuracy during training (top-1 per head)\n\n| step | top-1 |\n| ---: | --- |\n";
            for e in &self.evals {
                let acc: Vec<String> = (1..e.targets.len())
                    .map(|j| format!("{:.3}", e.top_k(j, 1)))
                    .collect();
                let _ = writeln!(s, "| {} | {} |", e.step, acc.join(", "));
            }
        }

        s += "\n## Data\n\n";
        let d = &self.data;
        let _ = writeln!(
            s,
            "- prompts: `{}` ({} in the file, {} sampled, {} dropped as longer than {} tokens with \
             their response)",
            d.data_file, d.prompts_in_file, d.sampled, d.too_long, d.max_seq_len
        );
        let _ = writeln!(
            s,
            "- train: {} examples, {} response tokens; held out: {} examples, {} response tokens",
            d.train_examples, d.train_response_tokens, d.eval_examples, d.eval_response_tokens
        );
        let g = &self.generation;
        let _ = writeln!(
            s,
            "- responses: {} tokens in all, {} of {} ended with a stop token, the rest at {} tokens; \
             {} batches, {} forward passes in this run",
            g.response_tokens,
            g.stopped,
            g.prompts,
            self.distill.max_new_tokens,
            g.batches,
            g.forward_passes
        );
        if !d.extra_examples.is_empty() {
            let _ = writeln!(
                s,
                "- extra responses sampled at T={}: {:?} examples per set (in the training examples)",
                d.extra_temperature, d.extra_examples
            );
        }
        let _ = writeln!(s, "- cache: `{}`\n", d.cache_file);

        s += "## Configuration\n\n```json\n";
        s += &serde_json::to_string_pretty(&(&self.config, &self.distill)).unwrap_or_default();
        s += "\n```\n";
        s
    }
}
