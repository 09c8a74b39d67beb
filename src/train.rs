//! `fisherc train --config EXPERIMENT`: a training run as the experiment file says, on a
//! backend, with a progress bar, a line per epoch, and metrics and checkpoints in the run
//! directory.

use std::path::PathBuf;

use anyhow::Result;
use fisherc_codegen::artifact::Verified;
use fisherc_runtime::train::experiment::Experiment;
use fisherc_runtime::train::trainer::{CHECK_EVERY, Event, TrainOptions, noisy, train};
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend_args::{self, BackendKind};
use crate::format::{grouped, grouped_rounded};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The experiment file (TOML), e.g. experiments/fashion_small_cnn_sb.toml.
    #[arg(long)]
    pub config: PathBuf,

    /// Override a setting of the experiment file: `--set train.lr=0.05` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,

    #[arg(long, value_enum, default_value = "reference")]
    pub backend: BackendKind,

    /// Where the run's experiment, metrics and checkpoint go [default: runs/<experiment name>].
    #[arg(long)]
    pub run_dir: Option<PathBuf>,

    /// Continue the run in the run directory from its checkpoint.
    #[arg(long)]
    pub resume: bool,

    /// Stop after this many epochs in all (continue later with --resume).
    #[arg(long)]
    pub until_epoch: Option<usize>,

    /// Steps between checks of the training state for NaN and infinite values, on the device
    /// (every epoch's end checks it too, before the checkpoint is written).
    #[arg(long, default_value_t = CHECK_EVERY, value_parser = clap::value_parser!(u64).range(1..))]
    pub check_every: u64,
}

pub fn run(args: &Args) -> Result<()> {
    let experiment = Experiment::load(&args.config, &args.overrides)?;
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&experiment.name));
    let options = TrainOptions {
        run_dir: run_dir.clone(),
        resume: args.resume,
        until_epoch: args.until_epoch,
        check_every: args.check_every,
    };
    let kind = args.backend;
    let open = |verified: &Verified| backend_args::open(kind, verified);
    println!(
        "{} ({}) → {}",
        experiment.name,
        args.config.display(),
        run_dir.display()
    );
    let bar = ProgressBar::hidden();
    let mut report = |event: Event| match event {
        Event::Note(text) => bar.suspend(|| println!("{text}")),
        Event::PhaseStart {
            phase,
            first_epoch,
            backend,
            steps_per_epoch,
        } => {
            bar.suspend(|| {
                println!(
                    "epochs {}–{}: batch {}, fisher {}{}, lr {}, on {backend}",
                    phase.epochs.start + 1,
                    phase.epochs.end,
                    phase.batch,
                    phase.fisher,
                    if noisy(&phase) {
                        format!(", {} noise, scale {:.4}", phase.noise, phase.noise_scale)
                    } else {
                        String::new()
                    },
                    phase.lr
                )
            });
            // the bar's first frame already names the epoch it counts
            bar.set_prefix((first_epoch + 1).to_string());
            bar.set_length(steps_per_epoch as u64);
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta} left)",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
        }
        Event::Step {
            epoch,
            index,
            loss,
            seconds,
        } => {
            bar.set_prefix((epoch + 1).to_string());
            bar.set_position(index as u64 + 1);
            bar.set_message(format!("loss {loss:.4}, {:.0} ms/step", seconds * 1e3));
        }
        Event::EpochEnd {
            epoch,
            train_loss,
            score,
            seconds,
            images_per_second,
        } => {
            bar.suspend(|| println!(
                "epoch {:>3}  train loss {train_loss:.4}  test loss {:.4}  test accuracy {:.2}%  {seconds:.1} s  {} images/s",
                epoch + 1,
                score.loss,
                100.0 * score.accuracy,
                grouped_rounded(images_per_second)
            ));
            bar.set_prefix((epoch + 2).to_string());
            bar.set_position(0);
        }
    };
    let outcome = train(&experiment, &options, &open, &mut report);
    bar.finish_and_clear();
    let outcome = outcome.map_err(anyhow::Error::msg)?;
    if let Some((epoch, score)) = outcome.scores.last() {
        println!(
            "after epoch {}: test accuracy {:.2}% ({} steps in all)",
            epoch + 1,
            100.0 * score.accuracy,
            grouped(outcome.steps)
        );
    }
    Ok(())
}
