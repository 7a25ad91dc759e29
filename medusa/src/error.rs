//! Errors of the Medusa crate.

/// What can go wrong with trees, head checkpoints and decoding.
#[derive(Debug, thiserror::Error)]
pub enum MedusaError {
    #[error("invalid Medusa tree: {0}")]
    Tree(String),
    #[error("Medusa checkpoint {path}: {message}")]
    Checkpoint {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(transparent)]
    Model(#[from] model::Error),
    #[error("greedy check: {0}")]
    Check(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = MedusaError> = std::result::Result<T, E>;
