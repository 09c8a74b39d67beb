//! Command-line hyper-parameters of the noisy update, shared by every command that trains.

use fisherc_ir::state::{Hyperparams, default_noise_scale};

#[derive(clap::Args, Debug)]
pub struct HyperArgs {
    /// Learning rate α of θ ← θ − α·v.
    #[arg(long, default_value_t = 0.1)]
    pub lr: f32,

    /// Momentum μ of v ← μ·v + (g + ε + wd·θ).
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,

    /// Weight decay wd (L2, on weights; not on batch-norm parameters).
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f32,

    /// Noise scale s [default: sqrt(1/small_batch − 1/batch), which is 0, no noise, at a batch
    /// of small_batch or less; 0 for a step without noise].
    #[arg(long)]
    pub noise_scale: Option<f32>,

    /// The small batch M_S of the default noise scale.
    #[arg(long, default_value_t = 128)]
    pub small_batch: usize,
}

impl HyperArgs {
    /// The noise scale for a step at this batch that draws noise (`drawn`) or not.
    pub fn noise_scale(&self, drawn: bool, batch: usize) -> f32 {
        match drawn {
            false => 0.0,
            true => self
                .noise_scale
                .unwrap_or_else(|| default_noise_scale(self.small_batch, batch)),
        }
    }

    /// The noise as a report gives it: its scale, or why there is none (the default scale is
    /// 0 at a batch of `small_batch` or less).
    pub fn describe_noise(&self, drawn: bool, batch: usize) -> String {
        match (drawn, self.noise_scale) {
            (false, _) => "no noise".to_string(),
            (true, None) if self.noise_scale(drawn, batch) == 0.0 => format!(
                "noise off: the default scale sqrt(1/{} − 1/batch) is 0 at this batch (set \
                 --noise-scale or a smaller --small-batch)",
                self.small_batch
            ),
            (true, _) => format!("noise scale {:.5}", self.noise_scale(drawn, batch)),
        }
    }

    /// The hyper-parameters of step `step` (counted from 0), noise keyed by `seed`.
    pub fn at(&self, noise_scale: f32, seed: u64, step: u64) -> Hyperparams {
        Hyperparams {
            learning_rate: self.lr,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            noise_scale,
            seed,
            step,
        }
    }
}
