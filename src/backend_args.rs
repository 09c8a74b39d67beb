//! Choosing and opening a backend for a compiled artifact (`fisherc run`, `fisherc check`).

use std::path::Path;

use anyhow::Result;
use fisherc_codegen::artifact::{Artifact, Verified};
use fisherc_runtime::cpu::{ExecutorBackend, ReferenceBackend};
use fisherc_runtime::{Backend, RuntimeError};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// The CPU reference ops over the plan's memory (fast; the oracle).
    Reference,
    /// The generated kernels on the CPU executor, thread by thread (slow; small models).
    Executor,
    /// The GPU (needs a build with `--features cuda`: scripts/build-cuda.sh).
    Cuda,
}

impl BackendKind {
    /// Whether the backend runs the generated kernels (the reference backend runs the CPU
    /// reference ops: how the kernels are tiled or pipelined does not apply to it).
    pub fn runs_kernels(self) -> bool {
        self != BackendKind::Reference
    }
}

/// A backend of `kind` for `verified` (compiled here, or read and verified by [`load`]).
pub fn open(kind: BackendKind, verified: &Verified) -> Result<Box<dyn Backend>, RuntimeError> {
    Ok(match kind {
        BackendKind::Reference => Box::new(ReferenceBackend::new(verified)?),
        BackendKind::Executor => Box::new(ExecutorBackend::new(verified)?),
        BackendKind::Cuda => cuda(verified)?,
    })
}

#[cfg(feature = "cuda")]
fn cuda(verified: &Verified) -> Result<Box<dyn Backend>, RuntimeError> {
    Ok(Box::new(fisherc_runtime::cuda::CudaBackend::new(verified)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &Verified) -> Result<Box<dyn Backend>, RuntimeError> {
    Err(RuntimeError::Setup(
        "this fisherc was built without the CUDA backend: build it with scripts/build-cuda.sh (cargo feature `cuda`)".to_string(),
    ))
}

/// The artifact in `dir`, read (every index and range checked) and verified: compiled again
/// from its kept source into this very plan and PTX, so that buffers, shapes, dtypes, launches
/// and kernels are what the compiler makes. Every backend takes only a verified artifact.
pub fn load(dir: &Path) -> Result<Verified> {
    Ok(Artifact::read(dir)?.verify()?)
}
