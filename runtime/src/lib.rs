//! fisherc's runtime: runs a compiled training step (an [`Artifact`]) on a [`Backend`].
//!
//! * [`backend`]: what a backend does: hold the step's arena, move words in and out of its
//!   buffers, run one node's launches or the whole step.
//! * [`cpu`]: two CPU backends: the reference ops over the plan's arena (fast, the oracle)
//!   and the generated kernels on the CPU executor (slow, exactly what the GPU runs).
//! * `cuda` (feature `cuda`): the GPU backend, through cust.
//! * [`data`]: image sets (CIFAR, IDX, synthetic) and the pipeline into batches.
//! * [`session`]: training state, batches and hyper-parameters in, loss and results out.
//! * [`train`]: training runs: experiments, regimes, evaluation, checkpoints, metrics.
//! * [`check`]: a backend against the reference, node by node and step by step.
//!
//! [`Artifact`]: fisherc_codegen::artifact::Artifact

pub mod backend;
pub mod check;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod host;
pub mod session;
pub mod train;

pub use backend::{Backend, RuntimeError};
pub use session::Session;
