//! The backend interface: a device that holds one compiled step's arena and runs it.

use fisherc_codegen::artifact::SourceError;
use fisherc_codegen::exec::ExecError;
use fisherc_codegen::finite::is_non_finite;
use fisherc_codegen::plan::Buffer;
use thiserror::Error;

/// Bytes in a GiB, for messages.
pub(crate) const GIB: f64 = (1u64 << 30) as f64;

#[derive(Debug, Error)]
pub enum RuntimeError {
    /// A device call failed: `what` names the kernel, transfer or call.
    #[error("{what}: {message}")]
    Device { what: String, message: String },
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The artifact's source does not compile again into it.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// An allocation larger than the host's available memory.
    #[error(
        "{what} needs {:.2} GiB of host memory; {:.2} GiB are available",
        *needs as f64 / GIB,
        *available as f64 / GIB
    )]
    HostMemory {
        what: String,
        needs: u64,
        available: u64,
    },
    /// The artifact cannot run here (stale, wrong backend, bad input).
    #[error("{0}")]
    Setup(String),
}

/// A device running one compiled step. Buffers are the plan's; words are 4-byte units in
/// device memory (see `fisherc_codegen::device::words_of`).
pub trait Backend {
    /// What runs the step, for reports: e.g. `cpu reference`, `NVIDIA H100 80GB HBM3 (sm_90)`.
    fn describe(&self) -> String;

    /// Writes `words` into `buffer`, from its start.
    fn write(&mut self, buffer: &Buffer, words: &[u32]) -> Result<(), RuntimeError>;

    /// All of `buffer`'s words.
    fn read(&mut self, buffer: &Buffer) -> Result<Vec<u32>, RuntimeError>;

    /// Runs the launches of node `node` of the plan's step and waits for them.
    fn run_node(&mut self, node: usize) -> Result<(), RuntimeError>;

    /// Runs the whole step and waits for it; returns its duration in seconds as the backend
    /// measures it (CUDA events on a GPU, the wall clock on the CPU).
    fn run_step(&mut self) -> Result<f64, RuntimeError>;

    /// Records the step once so that [`Backend::run_step`] replays it with one launch (a CUDA
    /// graph); `false` where the backend has no such thing.
    fn capture(&mut self) -> Result<bool, RuntimeError> {
        Ok(false)
    }

    /// Runs one whole step and times it node by node: seconds per planned node (0 for nodes
    /// without launches), or `None` where the backend has no timer of its own (then
    /// [`crate::Session::profile`] times [`Backend::run_node`] on the wall clock).
    fn profile(&mut self) -> Result<Option<Vec<f64>>, RuntimeError> {
        Ok(None)
    }

    /// How many of each buffer's f32 values are NaN or infinite, counted where the buffers
    /// live; the default reads them back (host memory, for the CPU backends).
    fn count_non_finite(&mut self, buffers: &[Buffer]) -> Result<Vec<u64>, RuntimeError> {
        buffers
            .iter()
            .map(|b| {
                let words = self.read(b)?;
                Ok(words.into_iter().filter(|&w| is_non_finite(w)).count() as u64)
            })
            .collect()
    }

    /// Whether the step leaves the host's cores free while it runs (a GPU), so that work
    /// such as the next batch's preparation can overlap it; a CPU backend takes them all.
    fn frees_the_host(&self) -> bool {
        false
    }
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn describe(&self) -> String {
        (**self).describe()
    }

    fn write(&mut self, buffer: &Buffer, words: &[u32]) -> Result<(), RuntimeError> {
        (**self).write(buffer, words)
    }

    fn read(&mut self, buffer: &Buffer) -> Result<Vec<u32>, RuntimeError> {
        (**self).read(buffer)
    }

    fn run_node(&mut self, node: usize) -> Result<(), RuntimeError> {
        (**self).run_node(node)
    }

    fn run_step(&mut self) -> Result<f64, RuntimeError> {
        (**self).run_step()
    }

    fn capture(&mut self) -> Result<bool, RuntimeError> {
        (**self).capture()
    }

    fn profile(&mut self) -> Result<Option<Vec<f64>>, RuntimeError> {
        (**self).profile()
    }

    fn count_non_finite(&mut self, buffers: &[Buffer]) -> Result<Vec<u64>, RuntimeError> {
        (**self).count_non_finite(buffers)
    }

    fn frees_the_host(&self) -> bool {
        (**self).frees_the_host()
    }
}
