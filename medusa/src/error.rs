//! Errors of the Medusa crate.

/// What can go wrong with trees, head checkpoints and decoding.
#[derive(Debug, thiserror::Error)]
pub enum MedusaError {
    /// A tree spec that cannot be built or does not fit the heads (bad path, bad JSON, too deep).
    #[error("invalid Medusa tree: {0}")]
    Tree(String),
    /// A head checkpoint that cannot be written, has a malformed config or tensor names, or does
    /// not fit the base model (its safetensors errors come as [`MedusaError::Model`]).
    #[error("Medusa checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint file or directory concerned.
        path: std::path::PathBuf,
        /// What is wrong with it (unexpected tensor, size unlike the base model's, bad config).
        message: String,
    },
    /// An error from the `model` crate: loading, forward pass, cache, or reading the heads'
    /// safetensors.
    #[error(transparent)]
    Model(#[from] model::Error),
    /// The lossless (greedy) check could not run, e.g. on an empty prompt.
    #[error("greedy check: {0}")]
    Check(String),
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory being read, written or renamed.
        path: std::path::PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with [`MedusaError`] as the default error type.
pub type Result<T, E = MedusaError> = std::result::Result<T, E>;
