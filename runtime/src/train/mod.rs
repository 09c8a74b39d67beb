//! Training runs: an experiment file says what to train on what data in which regime with
//! which schedule; the trainer runs it on a backend, evaluating every epoch, writing metrics
//! and checkpoints, and resumes bit for bit.
//!
//! * [`experiment`]: the experiment file (TOML) and `--set key=value` overrides;
//! * [`regime`]: the paper's training regimes as phases (batch, Fisher, epochs) and the
//!   learning-rate and noise schedules;
//! * [`evaluate`]: test loss and top-1 accuracy with the batch-norm running statistics;
//! * [`checkpoint`]: training state and position in safetensors, written atomically;
//! * [`metrics`]: JSON lines per step and per epoch;
//! * [`kfac`]: K-FAC's factor refreshes, their averaging and factorisation on a worker;
//! * [`trainer`]: the loop; [`error`]: what stops it.

pub mod checkpoint;
pub mod error;
pub mod evaluate;
pub mod experiment;
pub mod kfac;
pub mod metrics;
pub mod regime;
pub mod trainer;
