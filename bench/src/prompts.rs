//! Evaluation prompts: Spec-Bench (480 questions, six categories), embedded so the benchmark
//! runs standalone; any JSONL with `turns` or `prompt` fields can replace it.

use std::path::Path;

use anyhow::{Context, Result};

/// One evaluation prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub id: String,
    pub category: String,
    pub text: String,
}

const SPEC_BENCH: &str = include_str!("../data/specbench_questions.jsonl");

/// Spec-Bench's categories, MT-bench's eight merged into one as Spec-Bench reports them.
pub fn category_of(raw: &str) -> String {
    match raw {
        "writing" | "roleplay" | "reasoning" | "math" | "coding" | "extraction" | "stem"
        | "humanities" => "mt_bench".into(),
        other => other.into(),
    }
}

/// Reads prompts from a JSONL file, or the embedded Spec-Bench when `path` is `None`.
pub fn load(path: Option<&Path>) -> Result<Vec<Prompt>> {
    let text = match path {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => SPEC_BENCH.to_string(),
    };
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("line {}: invalid JSON", i + 1))?;
        let text = v["turns"][0]
            .as_str()
            .or_else(|| v["prompt"].as_str())
            .with_context(|| format!("line {}: no `turns` or `prompt`", i + 1))?;
        out.push(Prompt {
            id: v["question_id"]
                .as_u64()
                .map(|n| n.to_string())
                .or_else(|| v["id"].as_str().map(String::from))
                .unwrap_or_else(|| (i + 1).to_string()),
            category: category_of(v["category"].as_str().unwrap_or("all")),
            text: text.to_string(),
        });
    }
    Ok(out)
}

/// The first `per_category` prompts of each category, categories in order of appearance.
pub fn per_category(prompts: &[Prompt], per_category: usize) -> Vec<Prompt> {
    let mut cats: Vec<String> = Vec::new();
    for p in prompts {
        if !cats.contains(&p.category) {
            cats.push(p.category.clone());
        }
    }
    cats.iter()
        .flat_map(|c| {
            prompts
                .iter()
                .filter(move |p| &p.category == c)
                .take(per_category)
        })
        .cloned()
        .collect()
}
