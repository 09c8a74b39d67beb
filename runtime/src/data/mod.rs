//! Labelled image sets: CIFAR-10/100 binary files (memory-mapped), MNIST-style IDX files
//! (gzip or raw) and a synthetic set, validated on loading so that nothing is trained on
//! garbage; and the pipeline that turns them into batches ([`pipeline`]).
//!
//! Images are stored as bytes, channels first (`C × H × W`), as both formats keep them.

pub mod cifar;
pub mod idx;
pub mod pipeline;
pub mod synthetic;

use std::fmt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

/// A data file that cannot be used: which file, where in it, and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct DataError {
    pub path: PathBuf,
    /// Byte offset of the problem, where there is one.
    pub offset: Option<u64>,
    pub message: String,
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(offset) => write!(
                f,
                "{}: byte {offset}: {}",
                self.path.display(),
                self.message
            ),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for DataError {}

impl DataError {
    pub fn new(path: &Path, offset: Option<u64>, message: impl Into<String>) -> DataError {
        DataError {
            path: path.to_path_buf(),
            offset,
            message: message.into(),
        }
    }
}

/// Where a set's bytes live.
#[derive(Debug)]
enum Storage {
    /// Images back to back, labels apart (IDX, synthetic).
    Owned { pixels: Vec<u8>, labels: Vec<u8> },
    /// Fixed-size records `[label bytes][pixels]` in memory-mapped files (CIFAR), with the
    /// label at `label_at` within each record.
    Records {
        files: Vec<Mmap>,
        record: usize,
        label_at: usize,
        per_file: Vec<usize>,
    },
}

/// A labelled image set.
#[derive(Debug)]
pub struct Dataset {
    /// e.g. `fashion-mnist train`.
    pub name: String,
    /// Channels, height, width.
    pub shape: [usize; 3],
    pub classes: usize,
    len: usize,
    storage: Storage,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn image_bytes(&self) -> usize {
        self.shape.iter().product()
    }

    /// Image `i`'s pixels, channels first.
    pub fn image(&self, i: usize) -> &[u8] {
        let bytes = self.image_bytes();
        match &self.storage {
            Storage::Owned { pixels, .. } => &pixels[i * bytes..][..bytes],
            Storage::Records { .. } => &self.record_from_label(i)[1..1 + bytes],
        }
    }

    pub fn label(&self, i: usize) -> usize {
        match &self.storage {
            Storage::Owned { labels, .. } => labels[i] as usize,
            Storage::Records { .. } => self.record_from_label(i)[0] as usize,
        }
    }

    /// Image `i`'s record of a memory-mapped set, from its label byte (the pixels follow);
    /// empty for sets held in memory.
    fn record_from_label(&self, i: usize) -> &[u8] {
        match &self.storage {
            Storage::Owned { .. } => &[],
            Storage::Records {
                files,
                record,
                label_at,
                per_file,
            } => {
                let (file, j) = locate(per_file, i);
                &files[file][j * record + label_at..(j + 1) * record]
            }
        }
    }

    /// The first `n` images (all if fewer): a subset for quick runs.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    fn owned(
        name: String,
        shape: [usize; 3],
        classes: usize,
        pixels: Vec<u8>,
        labels: Vec<u8>,
    ) -> Dataset {
        Dataset {
            name,
            shape,
            classes,
            len: labels.len(),
            storage: Storage::Owned { pixels, labels },
        }
    }
}

/// (file, index within it) of record `i`.
fn locate(per_file: &[usize], mut i: usize) -> (usize, usize) {
    for (file, &n) in per_file.iter().enumerate() {
        if i < n {
            return (file, i);
        }
        i -= n;
    }
    panic!("record index out of range")
}

/// Reads a whole regular file that fits the host's memory, with the error naming it.
fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    let limit = crate::host::available_memory().unwrap_or(u64::MAX);
    fisherc_ir::files::read_bytes(path, limit)
        .map_err(|e| DataError::new(path, None, e.to_string()))
}
