#![warn(missing_docs)]
//! Fitting Medusa heads by self-distillation (Medusa-1: frozen backbone, only the heads learn).
//!
//! The pipeline, file by file: [`data`] reads prompts and holds the examples → [`mod@distill`] lets
//! the base model answer every prompt (batched greedy or sampled generation, cached on disk) →
//! [`objective`] lays sequences out as per-head targets and defines the Medusa loss and the
//! top-k accuracy → [`trainer`] runs AdamW (warmup + cosine) on the heads with resumable
//! [`checkpoint`]s → [`report`] describes the run; the heads are saved in the published Medusa
//! v1 layout with a tree built from the measured accuracies
//! ([`medusa::tree::optimal_choices`]).

pub mod checkpoint;
pub mod data;
pub mod distill;
pub mod objective;
pub mod report;
pub mod trainer;

pub use data::Example;
pub use distill::{DistillConfig, DistillStats, distill};
pub use trainer::{EvalResult, Outcome, RunControl, StepLog, TrainConfig, TrainState, train};
