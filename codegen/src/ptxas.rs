//! Running NVIDIA's `ptxas` on generated PTX: the check that every kernel assembles for a
//! target, and its resource report (registers, shared memory, spills).
//!
//! `ptxas` comes from the PyPI wheel `nvidia-cuda-nvcc` (`scripts/install-ptxas.sh` puts it in
//! `.tools/`); `FISHERC_PTXAS` overrides where it is looked for.

use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// Where ptxas is: `$FISHERC_PTXAS`, the project's `.tools/` install, `/usr/local/cuda`, or
/// the `PATH`.
pub fn find() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FISHERC_PTXAS") {
        return Some(PathBuf::from(path));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = [
        root.join(".tools/ptxas/nvidia/cu13/bin/ptxas"),
        PathBuf::from("/usr/local/cuda/bin/ptxas"),
    ];
    if let Some(found) = candidates.into_iter().find(|p| p.is_file()) {
        return Some(found);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("ptxas"))
        .find(|p| p.is_file())
}

/// One kernel's resources as ptxas reports them.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    pub kernel: String,
    pub registers: u32,
    pub shared_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// Why a module did not assemble.
#[derive(Debug, Error)]
pub enum PtxasError {
    /// Writing the module or running ptxas failed: `what` says which, on which path.
    #[error("{what} {}: {error}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// ptxas refused the module: its messages, and the kernels they name.
    #[error("{}{messages}", in_kernels(kernels))]
    Refused {
        kernels: Vec<String>,
        messages: String,
    },
}

fn in_kernels(kernels: &[String]) -> String {
    if kernels.is_empty() {
        String::new()
    } else {
        format!("in kernel {}:\n", kernels.join(", "))
    }
}

/// Assembles `ptx` for `arch` (e.g. `sm_90`); returns the per-kernel resources, or ptxas's
/// messages on failure.
pub fn assemble(ptxas: &Path, ptx: &str, arch: &str) -> Result<Vec<Resources>, PtxasError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |error| PtxasError::Io { what, path, error }
    };
    let dir =
        std::env::temp_dir().join(format!("fisherc-ptxas-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    let source = dir.join("module.ptx");
    std::fs::write(&source, ptx).map_err(io("writing", &source))?;
    let output = Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg(&source)
        .arg("-o")
        .arg(dir.join("module.cubin"))
        .output()
        .map_err(io("running", ptxas));
    let _ = std::fs::remove_dir_all(&dir);
    let output = output?;
    let messages = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        let kernels = crate::ptx::kernels_in_log(ptx, &messages);
        let kernels = kernels.into_iter().map(str::to_string).collect();
        return Err(PtxasError::Refused { kernels, messages });
    }
    Ok(parse_resources(&messages))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Reads ptxas -v's "Compiling entry function 'k'", "N bytes spill stores, M bytes spill
/// loads" and "Used R registers, ... S bytes smem" lines.
pub fn parse_resources(messages: &str) -> Vec<Resources> {
    let mut all: Vec<Resources> = Vec::new();
    let number_before = |line: &str, word: &str| -> u32 {
        let end = line.find(word).unwrap_or(0);
        line[..end]
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    for line in messages.lines() {
        if let Some(start) = line.find("Compiling entry function '") {
            let rest = &line[start + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or_default();
            all.push(Resources {
                kernel: name.to_string(),
                ..Resources::default()
            });
        } else if let Some(current) = all.last_mut() {
            if line.contains("spill stores") {
                current.spill_stores = number_before(line, "bytes spill stores");
                current.spill_loads = number_before(line, "bytes spill loads");
            }
            if line.contains("Used") && line.contains("registers") {
                current.registers = number_before(line, "registers");
                if line.contains("bytes smem") {
                    current.shared_bytes = number_before(line, "bytes smem");
                }
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_resource_lines() {
        let messages = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'relu_0' for 'sm_90'\n\
            ptxas info    : Function properties for relu_0\n\
                8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 10 registers, 1024 bytes smem, 368 bytes cmem[0]\n";
        let r = parse_resources(messages);
        assert_eq!(
            r,
            vec![Resources {
                kernel: "relu_0".into(),
                registers: 10,
                shared_bytes: 1024,
                spill_stores: 4,
                spill_loads: 12
            }]
        );
    }
}
