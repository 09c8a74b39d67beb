//! fisherc's runtime: runs a compiled training step (an [`Artifact`]) on a [`Backend`].
//!
//! * [`backend`]: what a backend does: hold the step's arena, move words in and out of its
//!   buffers, run one node's launches or the whole step.
//! * [`cpu`]: two CPU backends: the reference ops over the plan's arena (fast, the oracle)
//!   and the generated kernels on the CPU executor (slow, exactly what the GPU runs).
//! * `cuda` (feature `cuda`): the GPU backend, through cust.
//! * [`session`]: training state, batches and hyper-parameters in, loss and results out.
//! * [`check`]: a backend against the reference, node by node and step by step.
//!
//! [`Artifact`]: fisherc_codegen::artifact::Artifact

pub mod backend;
pub mod check;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod session;

pub use backend::{Backend, RuntimeError};
pub use session::Session;
