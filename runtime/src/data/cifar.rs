//! CIFAR-10 and CIFAR-100 in their binary format: fixed-size records of the label byte(s) and
//! 3·32·32 pixel bytes (red, green, blue planes), memory-mapped.
//!
//! CIFAR-10: `data_batch_1.bin` … `data_batch_5.bin` and `test_batch.bin`, records of 1 label
//! byte + 3072. CIFAR-100: `train.bin` and `test.bin`, records of a coarse and a fine label
//! byte + 3072 (the fine label, 100 classes, is used).

use std::path::Path;

use memmap2::Mmap;

use super::{DataError, Dataset, Storage};

const PIXELS: usize = 3 * 32 * 32;

/// Which CIFAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar {
    Ten,
    Hundred,
}

impl Cifar {
    pub fn classes(self) -> usize {
        match self {
            Cifar::Ten => 10,
            Cifar::Hundred => 100,
        }
    }

    fn label_bytes(self) -> usize {
        match self {
            Cifar::Ten => 1,
            Cifar::Hundred => 2,
        }
    }

    /// The files of the training or test split.
    pub fn files(self, train: bool) -> Vec<String> {
        match (self, train) {
            (Cifar::Ten, true) => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            (Cifar::Ten, false) => vec!["test_batch.bin".into()],
            (Cifar::Hundred, true) => vec!["train.bin".into()],
            (Cifar::Hundred, false) => vec!["test.bin".into()],
        }
    }
}

/// Memory-maps a split from `dir`, checking every file's size and every label.
pub fn load(dir: &Path, which: Cifar, train: bool) -> Result<Dataset, DataError> {
    let record = which.label_bytes() + PIXELS;
    let label_at = which.label_bytes() - 1;
    let mut files = Vec::new();
    let mut per_file = Vec::new();
    for name in which.files(train) {
        let path = dir.join(&name);
        let file = fisherc_ir::files::open_regular(&path)
            .map_err(|e| DataError::new(&path, None, e.to_string()))?;
        // SAFETY: the file is only read; a dataset file changed while training is the user's
        // to avoid, as for any reader of it
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| DataError::new(&path, None, format!("cannot map: {e}")))?;
        if map.is_empty() || map.len() % record != 0 {
            let whole = (map.len() / record * record) as u64;
            return Err(DataError::new(
                &path,
                Some(whole),
                format!(
                    "{} bytes is not a whole number of {record}-byte records",
                    map.len()
                ),
            ));
        }
        let count = map.len() / record;
        for i in 0..count {
            let label = map[i * record + label_at] as usize;
            if label >= which.classes() {
                return Err(DataError::new(
                    &path,
                    Some((i * record + label_at) as u64),
                    format!(
                        "record {i}: label {label} is not below {} classes",
                        which.classes()
                    ),
                ));
            }
        }
        files.push(map);
        per_file.push(count);
    }
    let name = format!(
        "cifar-{} {}",
        which.classes(),
        if train { "train" } else { "test" }
    );
    Ok(Dataset {
        name,
        shape: [3, 32, 32],
        classes: which.classes(),
        len: per_file.iter().sum(),
        storage: Storage::Records {
            files,
            record,
            label_at,
            per_file,
        },
    })
}
