//! Benchmarks of the whole generation path, for `imago bench`: a named workload (a model folder, the embedded
//! model, or a family's architecture with random weights) run a number of times after warm-up, reporting
//! denoising steps/s, images/s, per-stage times, job latency through the engine, peak memory and achieved TFLOP/s.
//!
//! Each iteration runs the job twice on the same loaded model: once as the worker would (job message bytes →
//! parse → validate → [`crate::engine::Engine::run`] → encoded images) for the latency, and once straight through
//! the pipeline for the per-stage times, which the engine only reports in whole milliseconds.
//!
//! Rooms: [`workload`] (what runs), [`measure`] (running it), [`memory`] (peaks), [`flops`] (work per UNet call)
//! and [`report`] (statistics, JSON and the table).

pub mod flops;
pub mod measure;
pub mod memory;
pub mod report;
pub mod workload;

use std::path::PathBuf;

pub use measure::{run, BenchOptions};
pub use report::BenchReport;
pub use workload::{prepare_model, ModelSource, Preset, Workload};

use crate::job::JobError;

/// Why a benchmark could not run. A job the engine refuses is not an error: it is reported in
/// [`BenchReport::failure`].
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("unknown preset {name:?} (known: {known})")]
    UnknownPreset { name: String, known: String },
    #[error("no default model is installed (models/default next to the binary, or $IMAGO_DEFAULT_MODEL)")]
    NoDefaultModel,
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the benchmark needs at least one measured iteration")]
    NoIterations,
    #[error("the model could not be loaded: {0}")]
    Load(JobError),
    #[error(transparent)]
    Diffusion(#[from] crate::diffusion::Error),
}
