//! Metrics as JSON lines (`metrics.jsonl` in the run directory): one object per step and one
//! per epoch, each flushed as written, so a run that stops keeps everything up to then.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Epochs and steps are counted from 1, as the console counts them. (Files written before
/// that counted from 0; [`read`] tells them apart and renumbers them.) A number that was not
/// finite is written as `null` (JSON has no NaN) and read back as NaN.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Step {
        /// The epoch the step is in.
        epoch: usize,
        /// The step's number in the run.
        step: u64,
        batch: usize,
        #[serde(deserialize_with = "nan_if_null")]
        loss: f32,
        #[serde(deserialize_with = "nan_if_null")]
        lr: f32,
        #[serde(deserialize_with = "nan_if_null")]
        noise_scale: f32,
        #[serde(deserialize_with = "nan_if_null")]
        seconds: f64,
    },
    Epoch {
        /// The epoch that ended.
        epoch: usize,
        /// Steps done by its end.
        step: u64,
        #[serde(deserialize_with = "nan_if_null")]
        train_loss: f64,
        #[serde(deserialize_with = "nan_if_null")]
        test_loss: f64,
        #[serde(deserialize_with = "nan_if_null")]
        test_accuracy: f64,
        /// Wall time of the epoch's training steps, data included, evaluation excluded.
        #[serde(deserialize_with = "nan_if_null")]
        seconds: f64,
        #[serde(deserialize_with = "nan_if_null")]
        images_per_second: f64,
    },
}

/// A number, or NaN where the file says `null`.
fn nan_if_null<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + From<f32>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or(T::from(f32::NAN)))
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

    /// The metrics file at `path` cut back to what a run had recorded when it had done
    /// `epochs` epochs and `steps` steps (what its checkpoint holds), then opened for more:
    /// a resumed run records the epochs it lost again, once.
    pub fn resume(path: &Path, epochs: usize, steps: u64) -> Result<Metrics, MetricsError> {
        let io = |error| MetricsError::Io {
            path: path.to_path_buf(),
            error,
        };
        if path.exists() {
            let kept = read(path)?.into_iter().filter(|r| match r {
                Record::Step { step, .. } => *step <= steps,
                Record::Epoch { epoch, .. } => *epoch <= epochs,
            });
            let text: Vec<u8> = kept.flat_map(|r| line(&r)).collect();
            fisherc_ir::files::write_atomically(path, &text).map_err(io)?;
        }
        Metrics::open(path).map_err(io)
    }

    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        self.out.write_all(&line(record))?;
        self.out.flush()
    }
}

/// A record's line: its JSON and a newline.
fn line(record: &Record) -> Vec<u8> {
    let mut text = serde_json::to_vec(record).expect("records serialise");
    text.push(b'\n');
    text
}

/// A metrics file that cannot be read: the file, and the line where one is to blame.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {error}", path.display())]
    Input {
        path: PathBuf,
        error: fisherc_ir::files::InputError,
    },
    #[error("{}:{line}: {error}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        error: serde_json::Error,
    },
}

/// The records of a metrics file, in order, epochs and steps counted from 1; an unreadable
/// line is an error naming the file and line. A last line without its newline that does not
/// read is a record a killed run did not finish writing: it is left out.
pub fn read(path: &Path) -> Result<Vec<Record>, MetricsError> {
    let text = fisherc_ir::files::read_text(path).map_err(|error| MetricsError::Input {
        path: path.to_path_buf(),
        error,
    })?;
    let (whole, torn) = match text.rfind('\n') {
        Some(end) => text.split_at(end + 1),
        None => ("", text.as_str()),
    };
    let torn_reads = serde_json::from_str::<Record>(torn).is_ok();
    let text = if torn_reads || torn.trim().is_empty() {
        text.as_str()
    } else {
        whole
    };
    let mut records: Vec<Record> = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|error| MetricsError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                error,
            })
        })
        .collect::<Result<_, _>>()?;
    // an earlier file counted epochs, and steps within steps records, from 0
    let counted_from_zero = records.iter().any(|r| match r {
        Record::Step { epoch, .. } | Record::Epoch { epoch, .. } => *epoch == 0,
    });
    if counted_from_zero {
        for record in &mut records {
            match record {
                Record::Step { epoch, step, .. } => (*epoch, *step) = (*epoch + 1, *step + 1),
                Record::Epoch { epoch, .. } => *epoch += 1,
            }
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(epoch: usize, step: u64) -> String {
        let record = Record::Step {
            epoch,
            step,
            batch: 8,
            loss: 1.0,
            lr: 0.1,
            noise_scale: 0.0,
            seconds: 0.1,
        };
        serde_json::to_string(&record).unwrap()
    }

    fn epoch(epoch: usize, step: u64) -> String {
        let record = Record::Epoch {
            epoch,
            step,
            train_loss: 1.0,
            test_loss: 1.0,
            test_accuracy: 0.5,
            seconds: 1.0,
            images_per_second: 8.0,
        };
        serde_json::to_string(&record).unwrap()
    }

    fn numbers(lines: &[String]) -> Vec<(usize, u64)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        read(&path)
            .unwrap()
            .iter()
            .map(|r| match r {
                Record::Step { epoch, step, .. } | Record::Epoch { epoch, step, .. } => {
                    (*epoch, *step)
                }
            })
            .collect()
    }

    #[test]
    fn a_record_cut_short_by_a_kill_is_left_out_and_only_that() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let last = step(1, 3);
        let whole = format!("{}\n{}\n", step(1, 1), step(1, 2));
        std::fs::write(&path, format!("{whole}{}", &last[..last.len() / 2])).unwrap();
        assert_eq!(read(&path).unwrap().len(), 2);
        std::fs::write(&path, format!("{whole}{last}")).unwrap();
        assert_eq!(read(&path).unwrap().len(), 3, "a whole last record counts");
        let middle = format!("{}\n{}\n{last}\n", step(1, 1), &last[..last.len() / 2]);
        std::fs::write(&path, middle).unwrap();
        assert!(
            read(&path).is_err(),
            "a damaged line inside the file is an error"
        );
    }

    #[test]
    fn numbers_written_as_null_read_as_nan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut nan = step(1, 1).replace("\"loss\":1.0", "\"loss\":null");
        nan.push('\n');
        nan.push_str(&epoch(1, 1).replace("\"test_loss\":1.0", "\"test_loss\":null"));
        std::fs::write(&path, nan).unwrap();
        let records = read(&path).unwrap();
        assert!(matches!(records[0], Record::Step { loss, .. } if loss.is_nan()));
        assert!(matches!(records[1], Record::Epoch { test_loss, .. } if test_loss.is_nan()));
        assert!(read(&path).is_ok());
        let text = step(1, 1).replace("\"loss\":1.0", "\"loss\":\"x\"") + "\n";
        std::fs::write(&path, text).unwrap();
        assert!(read(&path).is_err(), "only null stands for a number");
    }

    #[test]
    fn files_counting_from_zero_read_as_counted_from_one() {
        let from_one = [step(1, 1), step(1, 2), epoch(1, 2), step(2, 3)];
        let from_zero = [step(0, 0), step(0, 1), epoch(0, 2), step(1, 2)];
        let want = vec![(1, 1), (1, 2), (1, 2), (2, 3)];
        assert_eq!(numbers(&from_one), want);
        assert_eq!(numbers(&from_zero), want);
    }
}
