//! Training data: prompts read from JSONL, the held-out split, and the token sequences
//! (prompt + the base model's own response) that self-distillation produces.

use std::{
    collections::HashMap,
    io::{BufRead, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use model::Message;
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};

/// The shared prompt set, relative to the workspace root.
pub const DEFAULT_PROMPTS: &str = "../shared/data/train_prompts.jsonl";

/// One prompt: an id and the conversation to answer (ending with a user turn).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRecord {
    /// The record's `id`, or `line-N` (1-based line number) when it has none.
    pub id: String,
    /// The conversation up to and including its last user turn.
    pub messages: Vec<Message>,
}

/// Where `--data` points by default: `../shared/data/train_prompts.jsonl` next to the workspace.
pub fn default_prompts_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DEFAULT_PROMPTS)
}

/// Reads prompts from JSONL. Each line is one of
/// - `{"id": .., "prompt": "<user turn>"}` (the shared `train_prompts.jsonl`),
/// - `{"messages": [{"role": .., "content": ..}, ..]}` (OpenAI style),
/// - `{"conversations": [{"from": "human"|"gpt"|"system", "value": ..}, ..]}` (ShareGPT).
///
/// Conversations lose their trailing assistant turns: the base model writes the answer to the
/// last user turn. Lines without an `id` are numbered.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptRecord>> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    if name.contains("specbench") {
        bail!(
            "{} is the Spec-Bench evaluation set: training on it would contaminate every \
             benchmark; use the training prompts (default {DEFAULT_PROMPTS})",
            path.display()
        );
    }
    let file = std::fs::File::open(path).with_context(|| {
        format!(
            "reading prompts from {} (pass --data <file.jsonl>; the default is {DEFAULT_PROMPTS} \
             relative to the workspace root)",
            path.display()
        )
    })?;
    let mut prompts = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let record = parse_line(&line, i)
            .with_context(|| format!("{}:{}: bad prompt record", path.display(), i + 1))?;
        prompts.push(record);
    }
    if prompts.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(prompts)
}

fn parse_line(line: &str, index: usize) -> Result<PromptRecord> {
    let v: serde_json::Value = serde_json::from_str(line)?;
    let id = match v.get("id") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) if !other.is_null() => other.to_string(),
        _ => format!("line-{}", index + 1),
    };
    let text = |v: &serde_json::Value, key: &str| -> Result<String> {
        Ok(v.get(key)
            .and_then(|t| t.as_str())
            .with_context(|| format!("missing string field {key:?}"))?
            .to_string())
    };
    let mut messages = if v.get("prompt").is_some() {
        vec![Message::user(text(&v, "prompt")?)]
    } else if let Some(turns) = v.get("messages").and_then(|m| m.as_array()) {
        turns
            .iter()
            .map(|t| Ok(Message::new(text(t, "role")?, text(t, "content")?)))
            .collect::<Result<_>>()?
    } else if let Some(turns) = v.get("conversations").and_then(|m| m.as_array()) {
        turns
            .iter()
            .map(|t| {
                let role = match text(t, "from")?.as_str() {
                    "human" | "user" => "user",
                    "gpt" | "assistant" | "chatgpt" | "bard" => "assistant",
                    "system" => "system",
                    other => bail!("unknown speaker {other:?}"),
                };
                Ok(Message::new(role, text(t, "value")?))
            })
            .collect::<Result<_>>()?
    } else {
        bail!("expected a \"prompt\", \"messages\" or \"conversations\" field");
    };
    while messages.last().is_some_and(|m| m.role == "assistant") {
        messages.pop();
    }
    if messages.last().is_none_or(|m| m.role != "user") {
        bail!("the conversation has no user turn to answer");
    }
    Ok(PromptRecord { id, messages })
}

/// A seeded random sample of `count` items, split into `(eval, train)` with `eval_count` held
/// out. The sample of a smaller `count` is a prefix of a larger one (same seed), so a cache of
/// generated responses keeps serving when the budget grows.
pub fn sample_split<T: Clone>(
    items: &[T],
    count: usize,
    eval_count: usize,
    seed: u64,
) -> (Vec<T>, Vec<T>) {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let picked: Vec<T> = order[..count.min(items.len())]
        .iter()
        .map(|&i| items[i].clone())
        .collect();
    let eval_count = eval_count.min(picked.len());
    (picked[..eval_count].to_vec(), picked[eval_count..].to_vec())
}

/// A prompt with the base model's response: the unit of training and evaluation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// Id of the prompt it answers ([`PromptRecord::id`]).
    pub id: String,
    /// Chat-formatted prompt tokens (ending with the assistant header).
    pub prompt: Vec<u32>,
    /// Generated tokens (the stop token included when generation stopped).
    pub response: Vec<u32>,
}

impl Example {
    /// Prompt and response, the sequence the backbone reads.
    pub fn tokens(&self) -> impl Iterator<Item = u32> + '_ {
        self.prompt.iter().chain(&self.response).copied()
    }

    /// Number of tokens, prompt and response together.
    pub fn len(&self) -> usize {
        self.prompt.len() + self.response.len()
    }

    /// Whether both the prompt and the response are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Generated examples on disk, one JSON object per line, appended as batches finish (so an
/// interrupted generation keeps what it did). The file name carries a hash of everything that
/// determines a response (model, dtype, sampling, length), see [`cache_key`].
#[derive(Debug)]
pub struct ExampleCache {
    path: PathBuf,
    entries: HashMap<String, Example>,
}

impl ExampleCache {
    /// Opens (or starts) the cache file `dir/distill-<key>.jsonl`.
    pub fn open(dir: &Path, key: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("distill-{key}.jsonl"));
        let mut entries = HashMap::new();
        if path.is_file() {
            let file = std::fs::File::open(&path)?;
            for line in std::io::BufReader::new(file).lines() {
                let line = line?;
                // A line cut short by a kill is ignored; its prompt is generated again.
                if let Ok(example) = serde_json::from_str::<Example>(&line) {
                    entries.insert(example.id.clone(), example);
                }
            }
        }
        Ok(Self { path, entries })
    }

    /// The cache file (`distill-<key>.jsonl`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached example for `id`, if it was generated from exactly these prompt tokens.
    pub fn get(&self, id: &str, prompt: &[u32]) -> Option<&Example> {
        self.entries.get(id).filter(|e| e.prompt == prompt)
    }

    /// Appends examples to the file and the in-memory map.
    ///
    /// The batch goes out in one write to a file opened for appending, so processes sharing a
    /// cache (generation shards) do not interleave their lines.
    pub fn append(&mut self, examples: &[Example]) -> Result<()> {
        let mut text = String::new();
        for e in examples {
            // Start on a fresh line in case a previous run was killed mid-line.
            text.push('\n');
            text += &serde_json::to_string(e)?;
            text.push('\n');
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("writing {}", self.path.display()))?;
        file.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", self.path.display()))?;
        for e in examples {
            self.entries.insert(e.id.clone(), e.clone());
        }
        Ok(())
    }
}

/// A stable 64-bit FNV-1a hash, hex encoded: names cache files from their settings.
pub fn cache_key(settings: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in settings.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_formats() {
        let p = parse_line(
            r#"{"id": "gsm8k-0", "source": "gsm8k", "prompt": "2+2?"}"#,
            0,
        )
        .unwrap();
        assert_eq!(p.id, "gsm8k-0");
        assert_eq!(p.messages, vec![Message::user("2+2?")]);
        let p = parse_line(
            r#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#,
            4,
        )
        .unwrap();
        assert_eq!(p.id, "line-5");
        assert_eq!(p.messages, vec![Message::system("S"), Message::user("Hi")]);
        let p = parse_line(
            r#"{"id": 7, "conversations": [{"from": "human", "value": "A"}, {"from": "gpt", "value": "B"}, {"from": "human", "value": "C"}]}"#,
            0,
        )
        .unwrap();
        assert_eq!(p.id, "7");
        assert_eq!(p.messages.len(), 3);
        assert!(parse_line(r#"{"text": "x"}"#, 0).is_err());
        assert!(
            parse_line(
                r#"{"messages": [{"role": "assistant", "content": "x"}]}"#,
                0
            )
            .is_err()
        );
    }

    #[test]
    fn refuses_the_evaluation_set() {
        let e = read_prompts(Path::new("/nowhere/specbench_questions.jsonl")).unwrap_err();
        assert!(e.to_string().contains("evaluation set"), "{e}");
    }

    #[test]
    fn smaller_samples_are_prefixes() {
        let items: Vec<usize> = (0..100).collect();
        let (e1, t1) = sample_split(&items, 10, 2, 7);
        let (e2, t2) = sample_split(&items, 30, 2, 7);
        assert_eq!(e1, e2);
        assert_eq!(t1[..], t2[..8]);
        assert_eq!(e1.len() + t1.len(), 10);
    }

    #[test]
    fn cache_round_trip() {
        let dir = std::env::temp_dir().join(format!("train-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ex = Example {
            id: "a".into(),
            prompt: vec![1, 2],
            response: vec![3],
        };
        let mut cache = ExampleCache::open(&dir, "k").unwrap();
        cache.append(std::slice::from_ref(&ex)).unwrap();
        let cache = ExampleCache::open(&dir, "k").unwrap();
        assert_eq!(cache.get("a", &[1, 2]), Some(&ex));
        // Same id, different prompt tokens: not a hit.
        assert_eq!(cache.get("a", &[1]), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
