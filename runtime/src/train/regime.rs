//! A regime as phases, each one compiled program (batch size and Fisher estimate) over a span
//! of epochs, and the schedules that run across them: learning rate (linear warm-up, step
//! decay) and noise scale (on until the noise termination).
//!
//! The noise stops at an epoch boundary: the first `round(noise_until · epochs)` epochs run
//! the noisy program, the rest the plain one at the same batch, which needs no Fisher.

use std::ops::Range;

use fisherc_ir::state::default_noise_scale;
use fisherc_ir::{FisherMode, Noise};

use super::experiment::{Regime, TrainConfig};

/// One compiled program over a span of epochs.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    pub batch: usize,
    pub fisher: FisherMode,
    /// The noise's covariance (what `noise_scale` scales).
    pub noise: Noise,
    pub epochs: Range<usize>,
    /// The base learning rate (before warm-up and decay).
    pub lr: f32,
    /// The noise scale s (0 without noise).
    pub noise_scale: f32,
}

/// The phases of a run, in order, covering `0..epochs` (empty phases left out).
pub fn phases(t: &TrainConfig) -> Vec<Phase> {
    let plain = |batch, epochs, lr| Phase {
        batch,
        fisher: FisherMode::None,
        noise: Noise::DiagonalFisher,
        epochs,
        lr,
        noise_scale: 0.0,
    };
    let all = 0..t.epochs;
    let phases = match t.regime {
        Regime::Sb => vec![plain(t.small_batch, all, t.lr)],
        Regime::Lb => vec![plain(t.batch, all, t.lr)],
        Regime::LbDiagf
        | Regime::Multiplicative
        | Regime::FisherTrace
        | Regime::FullFisherEmpirical
        | Regime::FullFisherTrue
        | Regime::Kfac => {
            let noisy_epochs = (t.noise_until * t.epochs as f64).round() as usize;
            let scale = t
                .noise_scale
                .unwrap_or_else(|| default_noise_scale(t.small_batch, t.batch));
            let noise = match t.regime {
                Regime::LbDiagf => Noise::DiagonalFisher,
                Regime::FisherTrace => Noise::FisherTrace,
                Regime::Multiplicative => Noise::Multiplicative,
                Regime::FullFisherEmpirical => Noise::FullFisherEmpirical,
                Regime::Kfac => Noise::Kfac,
                _ => Noise::FullFisherTrue,
            };
            // `fisher` picks the estimate of the noises drawn from one; the others take none
            let fisher = if noise.needs_fisher() {
                t.fisher.unwrap_or(FisherMode::Exact)
            } else {
                FisherMode::None
            };
            vec![
                Phase {
                    batch: t.batch,
                    fisher,
                    noise,
                    epochs: 0..noisy_epochs,
                    lr: t.lr,
                    noise_scale: scale,
                },
                plain(t.batch, noisy_epochs..t.epochs, t.lr),
            ]
        }
        Regime::BatchChange => {
            let change = t.change_epoch.unwrap_or(0).min(t.epochs);
            vec![
                plain(t.small_batch, 0..change, t.small_lr.unwrap_or(t.lr)),
                plain(t.batch, change..t.epochs, t.lr),
            ]
        }
    };
    phases
        .into_iter()
        .filter(|p| !p.epochs.is_empty())
        .collect()
}

/// The learning-rate factor at `progress` epochs into training (fractional): linear warm-up
/// from 0 over `warmup_epochs`, then `decay` once per milestone passed.
pub fn lr_factor(t: &TrainConfig, progress: f64) -> f32 {
    let warm = if t.warmup_epochs > 0.0 {
        (progress / t.warmup_epochs).min(1.0)
    } else {
        1.0
    };
    let passed = t
        .milestones
        .iter()
        .filter(|&&m| progress >= m as f64)
        .count();
    warm as f32 * t.decay.powi(passed as i32)
}
