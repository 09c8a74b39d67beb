//! Choosing and opening a backend for a compiled artifact (`fisherc run`, `fisherc check`).

use std::path::Path;

use anyhow::Result;
use fisherc_codegen::artifact::Artifact;
use fisherc_codegen::compile::Compiled;
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

/// A backend of `kind` for `artifact`; `compiled` is the artifact compiled again ([`load`]),
/// whose graph and kernel IR the CPU backends run.
pub fn open(
    kind: BackendKind,
    artifact: &Artifact,
    compiled: &Compiled,
) -> Result<Box<dyn Backend>, RuntimeError> {
    Ok(match kind {
        BackendKind::Reference => Box::new(ReferenceBackend::new(compiled)?),
        BackendKind::Executor => Box::new(ExecutorBackend::new(compiled)?),
        BackendKind::Cuda => cuda(artifact)?,
    })
}

#[cfg(feature = "cuda")]
fn cuda(artifact: &Artifact) -> Result<Box<dyn Backend>, RuntimeError> {
    Ok(Box::new(fisherc_runtime::cuda::CudaBackend::new(artifact)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &Artifact) -> Result<Box<dyn Backend>, RuntimeError> {
    Err(RuntimeError::Setup(
        "this fisherc was built without the CUDA backend: build it with scripts/build-cuda.sh (cargo feature `cuda`)".to_string(),
    ))
}

/// The artifact in `dir`, read (every index and range checked) and compiled again from its
/// kept source into this very plan and PTX, so that buffers, shapes, dtypes, launches and
/// kernels are what the compiler makes: the one validation every command makes before
/// anything runs, on any backend. The compiled step is what the CPU backends run.
pub fn load(dir: &Path) -> Result<(Artifact, Compiled)> {
    let artifact = Artifact::read(dir)?;
    let compiled = artifact.recompile()?;
    Ok((artifact, compiled))
}
