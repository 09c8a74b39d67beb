//! What stops a training run, each case saying where: the file, the epoch and step, the layer.

use fisherc_ir::kfac::KfacError;
use std::path::PathBuf;

use fisherc_codegen::compile::CompileError;
use fisherc_ir::{EvalError, ModelError, ShapeError};
use thiserror::Error;

use super::checkpoint::CheckpointError;
use super::metrics::MetricsError;
use crate::backend::RuntimeError;
use crate::data::DataError;
use crate::data::pipeline::InputMismatch;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Input(#[from] InputMismatch),
    #[error("the experiment's data set is synthetic, but it has no [data.synthetic] table")]
    NoSyntheticSet,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A file of the run (model, metrics, experiment) could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("batch {batch} is larger than the {images} training images")]
    BatchTooLarge { batch: usize, images: usize },
    /// A step failed on the backend (epochs and steps counted from 1).
    #[error("epoch {epoch}, step {step}: {error}")]
    Step {
        epoch: usize,
        step: usize,
        error: RuntimeError,
    },
    #[error(
        "epoch {epoch}, step {step} (step {run_step} of the run): the loss is {loss}; stopped. The last good checkpoint (after epoch {last_epoch}) is kept in {}",
        checkpoint.display()
    )]
    NonFiniteLoss {
        epoch: usize,
        step: usize,
        run_step: u64,
        loss: f32,
        last_epoch: usize,
        checkpoint: PathBuf,
    },
    /// Found by the periodic check on the device (`step` names the step after which) or at
    /// the epoch's end (`step` is `None`).
    #[error(
        "epoch {epoch}{}: the training state is not finite ({tensor} holds {count} NaN or infinite values); stopped. The last good checkpoint (after epoch {last_epoch}) is kept in {}",
        step.map(|(s, run)| format!(", step {s} (step {run} of the run)")).unwrap_or_default(),
        checkpoint.display()
    )]
    NonFiniteState {
        epoch: usize,
        /// (step of the epoch, step of the run), counted from 1.
        step: Option<(usize, u64)>,
        tensor: String,
        count: u64,
        last_epoch: usize,
        checkpoint: PathBuf,
    },
    #[error(
        "{}: written by another experiment; resuming needs the same one (see {})",
        checkpoint.display(),
        experiment.display()
    )]
    OtherExperiment {
        checkpoint: PathBuf,
        experiment: PathBuf,
    },
    #[error(
        "{} already exists: resume that run with --resume, or choose another run directory",
        path.display()
    )]
    RunExists { path: PathBuf },
    #[error("{}: no run to resume (no checkpoint, no experiment); start one without --resume", dir.display())]
    NothingToResume { dir: PathBuf },
    #[error(
        "{}: the model file changed since {} was written; resuming needs the same model",
        model.display(),
        checkpoint.display()
    )]
    ModelChanged { model: PathBuf, checkpoint: PathBuf },
    #[error(
        "{}: {epoch} epochs and {step} steps done, which this experiment's regime does not reach; the checkpoint is not this run's",
        checkpoint.display()
    )]
    CheckpointPosition {
        checkpoint: PathBuf,
        epoch: usize,
        step: u64,
    },
    #[error("{}: another trainer runs here ({holder})", dir.display())]
    RunLocked { dir: PathBuf, holder: String },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// K-FAC's factors could not be taken in after a refreshing step (counted from 1).
    #[error("run step {run_step}: {error}")]
    Kfac { run_step: u64, error: KfacError },
    /// An evaluation program that lacks what it was built to give (a bug, not an input).
    #[error("the evaluation {0}")]
    Evaluation(&'static str),
}

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
        let path = path.into();
        move |error| TrainError::Io { path, error }
    }
}
