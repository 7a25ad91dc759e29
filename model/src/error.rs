//! One error type for everything that can go wrong with user input: files, tensors, configs.

use std::path::{Path, PathBuf};

/// Errors from loading configs, weights and tokenizers, and from converting models.
///
/// Messages name the file and, for tensors, the tensor and the expected vs found shape or dtype,
/// so that a bad checkpoint can be diagnosed without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config{}: {message}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Config {
        path: Option<PathBuf>,
        message: String,
    },
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("tensor {name:?} is missing from the checkpoint ({searched})")]
    MissingTensor { name: String, searched: String },
    #[error("tensor {name:?} in {path}: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name:?} in {path}: unsupported dtype {dtype}")]
    Dtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    #[error("checkpoint has tensors the model does not use: {names:?}")]
    UnexpectedTensors { names: Vec<String> },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("GGUF {path}: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("model source {source_name:?}: {message}")]
    Source {
        source_name: String,
        message: String,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
