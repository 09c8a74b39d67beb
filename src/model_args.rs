//! Command-line arguments shared by every command that instantiates a model file.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use fisherc_ir::model::{self, BuildOptions, Mode, Network, Shortcut};
use fisherc_ir::{FisherMode, Noise, StepOptions, TrainingStep, build_training_step};

#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Model file (TOML), e.g. models/resnet44.toml.
    pub model: PathBuf,

    /// Batch size the step is compiled for.
    #[arg(long, default_value_t = 128, value_parser = at_least_one)]
    pub batch: usize,

    /// Override the model's input shape, as CxHxW (e.g. 3x32x32).
    #[arg(long, value_parser = parse_input)]
    pub input: Option<[usize; 3]>,

    /// Override the model's residual shortcut option (A or B).
    #[arg(long, value_parser = |s: &str| s.parse::<Shortcut>())]
    pub shortcut: Option<Shortcut>,

    /// Diagonal Fisher estimate for the noise: none, exact or a2g2 [default: exact for the
    /// noises drawn from one, else none].
    #[arg(long, value_parser = |s: &str| s.parse::<FisherMode>())]
    pub fisher: Option<FisherMode>,

    /// The update's noise: diagonal-fisher, multiplicative, fisher-trace,
    /// full-fisher-empirical, full-fisher-true or kfac.
    #[arg(long, default_value = "diagonal-fisher", value_parser = |s: &str| s.parse::<Noise>())]
    pub noise: Noise,
}

/// A count that must be at least 1 (a batch, a number of steps).
pub fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

impl ModelArgs {
    pub fn network(&self, mode: Mode) -> Result<Network> {
        let options = BuildOptions {
            batch: self.batch,
            input: self.input,
            shortcut: self.shortcut,
            mode,
        };
        Ok(model::load(&self.model, &options)?)
    }

    /// The step kind: `--noise` with `--fisher` or the estimate it needs by default.
    pub fn step_options(&self) -> StepOptions {
        StepOptions {
            noise: self.noise,
            ..StepOptions::new(
                self.fisher
                    .unwrap_or(StepOptions::with_noise(self.noise).fisher),
            )
        }
    }

    pub fn training_step(&self) -> Result<TrainingStep> {
        let network = self.network(Mode::Train)?;
        Ok(build_training_step(network, &self.step_options())?)
    }
}

pub fn parse_input(s: &str) -> Result<[usize; 3], String> {
    let dims: Vec<usize> = s
        .split(['x', 'X', ','])
        .map(|d| d.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("'{s}': {e}"))?;
    match dims[..] {
        [c, h, w] if c > 0 && h > 0 && w > 0 => Ok([c, h, w]),
        _ => Err(format!(
            "'{s}': expected CxHxW with positive sizes, e.g. 3x32x32"
        )),
    }
}
