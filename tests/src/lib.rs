//! Shared helpers for the workspace-level integration tests (in `tests/`).
//!
//! The tests run the real default model (SmolLM2-135M-Instruct) on the CPU and compare it with
//! reference outputs produced by Hugging Face transformers (`scripts/make_fixtures.py`).

use std::path::PathBuf;

use burn::backend::Flex;
use model::{Llama, LoadOptions, ModelSource, Tokenizer};

/// The CPU backend the fidelity tests use.
pub type Cpu = Flex;

/// Folder of committed fixtures.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Reads a JSON fixture.
pub fn fixture(name: &str) -> serde_json::Value {
    let path = fixtures_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The default model's folder (downloaded and converted on first use).
pub fn default_model_dir() -> PathBuf {
    ModelSource::Default
        .resolve()
        .unwrap_or_else(|e| panic!("obtaining the default model: {e}"))
}

/// The default model in f32 on the CPU, with its tokenizer.
pub fn default_model() -> (Llama<Cpu>, Tokenizer) {
    let dir = default_model_dir();
    let model = Llama::<Cpu>::load(&dir, &LoadOptions::default(), &Default::default())
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    (model, tokenizer)
}

/// The shared evaluation prompts (Spec-Bench), first turn of each question.
pub fn specbench_prompts() -> Vec<(String, String)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("bench")
        .join("data")
        .join("specbench_questions.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["category"].as_str().unwrap().to_string(),
                v["turns"][0].as_str().unwrap().to_string(),
            )
        })
        .collect()
}
