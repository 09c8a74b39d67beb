//! fisherc's intermediate representation and everything that works on it without a GPU.
//!
//! The pipeline, each stage a function from one type to the next:
//!
//! ```text
//! model file ──spec::parse──▶ ModelSpec ──model::build──▶ Network (forward graph)
//!   ──step::build_training_step──▶ TrainingStep (forward, loss, backward, Fisher, update)
//!   ──interp::evaluate──▶ values (the CPU reference)
//! ```
//!
//! * [`graph`]: the typed petgraph DAG; [`ops`]: every op's shape rule, CPU reference, gradient
//!   rule and Fisher rule, one definition each; [`cpu`] and [`matmul`]: the numeric kernels
//!   those use ([`matmul`]'s products have the same bits on every CPU).
//! * [`autodiff`]: reverse mode over the graph; [`step`]: the training step; [`philox`]: the
//!   bit-reproducible noise stream.
//! * [`model`]: model files; [`interp`]: the reference interpreter; [`state`]: training state;
//!   [`files`]: bounded reads of users' files, atomic writes of ours, short echoes of words.

pub mod autodiff;
pub mod cpu;
pub mod error;
pub mod files;
pub mod graph;
pub mod interp;
pub mod kfac;
pub mod matmul;
pub mod model;
pub mod noise;
pub mod ops;
pub mod optimize;
pub mod philox;
pub mod port;
pub mod state;
pub mod step;
pub mod synthetic;
pub mod tensor;

pub use error::{EvalError, ModelError, ShapeError};
pub use graph::{Graph, Output, Phase, PortRef};
pub use noise::{FisherMode, Noise};
pub use step::{StepOptions, TrainingStep, build_training_step};
pub use tensor::{DType, Real, Tensor, TensorType, Value};
