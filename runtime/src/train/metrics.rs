//! Metrics as JSON lines (`metrics.jsonl` in the run directory): one object per step and one
//! per epoch, each flushed as written, so a run that stops keeps everything up to then.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Step {
        epoch: usize,
        step: u64,
        batch: usize,
        loss: f32,
        lr: f32,
        noise_scale: f32,
        seconds: f64,
    },
    Epoch {
        epoch: usize,
        step: u64,
        train_loss: f64,
        test_loss: f64,
        test_accuracy: f64,
        /// Wall time of the epoch's training steps, data included, evaluation excluded.
        seconds: f64,
        images_per_second: f64,
    },
}

pub struct Metrics {
    out: BufWriter<File>,
}

impl Metrics {
    /// Opens `path` for appending (a resumed run continues its file).
    pub fn open(path: &Path) -> std::io::Result<Metrics> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Metrics {
            out: BufWriter::new(file),
        })
    }

    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

/// The records of a metrics file, in order; an unreadable line is an error naming the file
/// and line.
pub fn read(path: &Path) -> Result<Vec<Record>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}
