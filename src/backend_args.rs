//! Choosing and opening a backend for a compiled artifact (`fisherc run`, `fisherc check`).

use anyhow::Result;
use fisherc_codegen::artifact::Artifact;
use fisherc_codegen::compile::Compiled;
use fisherc_runtime::Backend;
use fisherc_runtime::cpu::{ExecutorBackend, ReferenceBackend};

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
    /// Whether the backend runs the artifact's graph or kernel IR, which only compiling its
    /// source again gives (`recompile`).
    pub fn needs_compiled(self) -> bool {
        self != BackendKind::Cuda
    }

    /// Whether the backend runs the generated kernels (the reference backend runs the CPU
    /// reference ops: how the kernels are tiled or pipelined does not apply to it).
    pub fn runs_kernels(self) -> bool {
        self != BackendKind::Reference
    }
}

/// A backend of `kind` for `artifact`; `compiled` is the artifact compiled again, which the
/// CPU backends need.
pub fn open(
    kind: BackendKind,
    artifact: &Artifact,
    compiled: Option<&Compiled>,
) -> Result<Box<dyn Backend>> {
    let compiled =
        || compiled.ok_or_else(|| anyhow::anyhow!("the {kind:?} backend needs the compiled graph"));
    Ok(match kind {
        BackendKind::Reference => Box::new(ReferenceBackend::new(compiled()?)?),
        BackendKind::Executor => Box::new(ExecutorBackend::new(compiled()?)?),
        BackendKind::Cuda => cuda(artifact)?,
    })
}

#[cfg(feature = "cuda")]
fn cuda(artifact: &Artifact) -> Result<Box<dyn Backend>> {
    Ok(Box::new(fisherc_runtime::cuda::CudaBackend::new(artifact)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &Artifact) -> Result<Box<dyn Backend>> {
    anyhow::bail!(
        "this fisherc was built without the CUDA backend: build it with scripts/build-cuda.sh (cargo feature `cuda`)"
    )
}

/// The artifact compiled again, for the CPU backends and the checks.
pub fn recompile(artifact: &Artifact) -> Result<Compiled> {
    artifact.recompile().map_err(anyhow::Error::msg)
}
