//! The experiment file: model, data, regime, schedule and optimizer of one training run, in
//! TOML, with command-line overrides (`--set train.lr=0.05`). Every field is documented in
//! `experiments/README.md`; unknown keys are errors.

use std::path::{Path, PathBuf};

use fisherc_codegen::lower::LowerOptions;
use fisherc_codegen::options::{Arch, CompileOptions, DEFAULT_STAGES, Precision, STAGE_RANGE};
use fisherc_ir::FisherMode;
use fisherc_ir::state::kfac::KfacSettings;
use serde::{Deserialize, Serialize};

use crate::data::pipeline::Augment;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    /// The model file, relative to the working directory.
    pub model: PathBuf,
    /// Overrides the model's input shape (e.g. `[3, 32, 32]` to train a CIFAR model on
    /// Fashion-MNIST, whose images are then replicated to three channels and padded).
    #[serde(default)]
    pub input: Option<[usize; 3]>,
    pub data: DataConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub compile: CompileConfig,
}

/// How the training steps are compiled.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompileConfig {
    /// Convolutions on fp32 FMA (`fp32` or `off`, the default), on TF32 tensor cores with fp32
    /// accuracy (`3xtf32`), or with one TF32 product (`tf32`: faster, relative errors near
    /// 1e-3). What the kernels run on: the CPU reference backend computes in f32 whatever this
    /// says.
    #[serde(default)]
    pub tensor_cores: Precision,
    /// K slices the convolutions' GEMMs keep in flight, 2 or more [default: 2], where shared
    /// memory allows: a tuning choice, the same results either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<u32>,
    /// The PTX target: `sm_90` [default] or `sm_80`.
    #[serde(default)]
    pub arch: Arch,
}

impl CompileConfig {
    /// The options every program of the experiment is compiled with: fused, as configured.
    pub fn options(&self) -> CompileOptions {
        CompileOptions {
            fused: true,
            lowering: LowerOptions {
                precision: self.tensor_cores,
                stages: self.stages.unwrap_or(DEFAULT_STAGES),
            },
            arch: self.arch,
        }
    }
}

/// How each epoch's test score is taken.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Batch-norm statistics for the evaluation: 0 [default] uses the running statistics the
    /// training kept (the paper's convention); N > 0 recomputes them at the current weights
    /// from N batches of 500 training images ("precise BN"; the training state is untouched).
    /// Running statistics average past weights; after a short, noisy or high-rate run they
    /// can lag the weights enough to make the test accuracy meaningless.
    #[serde(default)]
    pub bn_batches: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataSet {
    FashionMnist,
    Mnist,
    Cifar10,
    Cifar100,
    /// Class templates plus noise (see `data::synthetic`): learnable, needs no files.
    Synthetic,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub set: DataSet,
    /// Where the files are [default: /usr/share/datasets/fashion-mnist for Fashion-MNIST,
    /// data/<set> otherwise].
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Train on the first N training images only.
    #[serde(default)]
    pub train_subset: Option<usize>,
    /// Evaluate on the first N test images only.
    #[serde(default)]
    pub test_subset: Option<usize>,
    #[serde(default)]
    pub augment: Augment,
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Synthetic set: images per split, and pixel noise relative to the class templates.
    #[serde(default)]
    pub synthetic: Option<SyntheticConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    pub train: usize,
    pub test: usize,
    pub shape: [usize; 3],
    pub classes: usize,
    pub noise: f32,
}

/// The paper's training regimes (supplement A.7–A.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Regime {
    /// Small batch (`small_batch`), no noise.
    Sb,
    /// Large batch (`batch`), no noise.
    Lb,
    /// Large batch with diagonal-Fisher noise (`fisher`: exact or a2g2) until `noise_until`.
    LbDiagf,
    /// Small batch for the first `change_epoch` epochs, then large: two compiled programs
    /// sharing the parameters.
    BatchChange,
    /// Gradient times Gaussian noise with constant diagonal covariance.
    Multiplicative,
    /// Scalar noise √(Tr F̂) per element count.
    FisherTrace,
    /// Rademacher-signed sum of per-example gradients (empirical Fisher covariance).
    FullFisherEmpirical,
    /// Gradients at labels sampled from the model (true Fisher covariance).
    FullFisherTrue,
    /// Noise of each convolution's and linear layer's Kronecker-factored Fisher block
    /// (`kfac_damping`, `kfac_every`, `kfac_decay`); batch norm's γ and β take `lb-diagf`'s.
    Kfac,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub regime: Regime,
    /// The large batch M_L (the batch of `lb`, `lb-diagf` and `batch-change`'s second phase).
    pub batch: usize,
    /// The small batch M_S: `sb`'s batch, `batch-change`'s first phase, and the default noise
    /// scale's √(1/M_S − 1/M_L).
    #[serde(default = "default_small_batch")]
    pub small_batch: usize,
    /// `lb-diagf`'s Fisher estimate [default: exact].
    #[serde(default)]
    pub fisher: Option<FisherMode>,
    /// The noise scale s [default: √(1/M_S − 1/M_L)].
    #[serde(default)]
    pub noise_scale: Option<f32>,
    /// The fraction of training with noise (the paper's noise termination).
    #[serde(default = "default_noise_until")]
    pub noise_until: f64,
    /// `batch-change`: epochs of small batch.
    #[serde(default)]
    pub change_epoch: Option<usize>,
    pub epochs: usize,
    /// Learning rate of the large-batch phases (of `sb`: its only one).
    pub lr: f32,
    /// `batch-change`: learning rate of the small-batch phase [default: `lr`].
    #[serde(default)]
    pub small_lr: Option<f32>,
    /// Linear warm-up from 0 over this many epochs.
    #[serde(default)]
    pub warmup_epochs: f64,
    /// Epochs after which the learning rate is multiplied by `decay`.
    #[serde(default)]
    pub milestones: Vec<usize>,
    #[serde(default = "default_decay")]
    pub decay: f32,
    #[serde(default = "default_momentum")]
    pub momentum: f32,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f32,
    /// Weight decay on batch-norm γ and β too.
    #[serde(default)]
    pub decay_bn: bool,
    /// Seed of the initial parameters, data order, augmentation and noise.
    #[serde(default)]
    pub seed: u64,
    /// `kfac`: λ, added to both Kronecker factors before their Cholesky factorisation
    /// [default: 10⁻³].
    #[serde(default)]
    pub kfac_damping: Option<f64>,
    /// `kfac`: steps between refreshes of the factors [default: 10].
    #[serde(default)]
    pub kfac_every: Option<u64>,
    /// `kfac`: the running average's weight of the old factors per step, `kfac_decay^kfac_every`
    /// at each refresh [default: 0.95].
    #[serde(default)]
    pub kfac_decay: Option<f64>,
}

impl TrainConfig {
    /// K-FAC's settings: the experiment's, else `KfacSettings::default()`'s.
    pub fn kfac_settings(&self) -> KfacSettings {
        let default = KfacSettings::default();
        KfacSettings {
            damping: self.kfac_damping.unwrap_or(default.damping),
            every: self.kfac_every.unwrap_or(default.every),
            decay: self.kfac_decay.unwrap_or(default.decay),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_small_batch() -> usize {
    128
}
fn default_noise_until() -> f64 {
    0.25
}
fn default_decay() -> f32 {
    0.1
}
fn default_momentum() -> f32 {
    0.9
}
fn default_weight_decay() -> f32 {
    5e-4
}

/// An experiment that cannot be read, blaming the file or the `--set` override at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExperimentError {
    /// The experiment text itself: syntax, fields or values (`file` where it was read from one).
    #[error("{}{message}", located(.file))]
    Text {
        file: Option<PathBuf>,
        message: String,
    },
    /// A command-line override: malformed, naming no field there is, or giving a bad value.
    #[error("--set {assignment}: {message}")]
    Override { assignment: String, message: String },
}

fn located(file: &Option<PathBuf>) -> String {
    file.as_ref()
        .map(|f| format!("{}: ", f.display()))
        .unwrap_or_default()
}

impl Experiment {
    /// Reads an experiment file and applies `overrides` (`section.key=value`, the value in
    /// TOML syntax, or a bare string).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Experiment, ExperimentError> {
        let text = fisherc_ir::files::read_text(path).map_err(|e| ExperimentError::Text {
            file: Some(path.to_path_buf()),
            message: e.to_string(),
        })?;
        Experiment::parse(&text, overrides).map_err(|e| match e {
            ExperimentError::Text { message, .. } => ExperimentError::Text {
                file: Some(path.to_path_buf()),
                message,
            },
            blamed => blamed,
        })
    }

    /// An experiment from its TOML text and `overrides`. An error that an override brings in
    /// (a field that does not exist, a value of the wrong type or out of range) names it.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Experiment, ExperimentError> {
        let in_text = |message: String| ExperimentError::Text {
            file: None,
            message,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| in_text(e.to_string()))?;
        let mut read = deserialize(&table);
        for assignment in overrides {
            let key = set(&mut table, assignment)?;
            let after = deserialize(&table);
            if let Err(message) = &after
                && read.as_ref().err() != Some(message)
                && names_key(message, &key)
            {
                return Err(ExperimentError::Override {
                    assignment: assignment.clone(),
                    message: message.clone(),
                });
            }
            read = after;
        }
        let experiment = read.map_err(in_text)?;
        experiment.check().map_err(|message| {
            match overrides.iter().rev().find(|o| leads_with_key(&message, o)) {
                Some(assignment) => ExperimentError::Override {
                    assignment: assignment.clone(),
                    message,
                },
                None => in_text(message),
            }
        })?;
        Ok(experiment)
    }

    /// The experiment as TOML (as resolved, overrides applied): what a run directory keeps.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("experiments serialise")
    }

    fn check(&self) -> Result<(), String> {
        let t = &self.train;
        let positive = [
            ("train.batch", t.batch),
            ("train.small_batch", t.small_batch),
            ("train.epochs", t.epochs),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{key} must be at least 1"));
        }
        if !(0.0..=1.0).contains(&t.noise_until) {
            return Err(format!(
                "train.noise_until is {}: a fraction of training, 0 to 1",
                t.noise_until
            ));
        }
        if t.regime == Regime::BatchChange && t.change_epoch.is_none_or(|e| e > t.epochs) {
            return Err("train.change_epoch: batch-change needs the epoch to change at, within train.epochs".into());
        }
        let takes_fisher = match t.regime {
            Regime::LbDiagf => Some("lb-diagf"),
            Regime::FisherTrace => Some("fisher-trace"),
            Regime::Kfac => Some("kfac"),
            _ => None,
        };
        if let Some(regime) = takes_fisher.filter(|_| t.fisher == Some(FisherMode::None)) {
            return Err(format!("train.fisher: {regime} needs exact or a2g2"));
        }
        if let Some(stages) = self.compile.stages.filter(|s| !STAGE_RANGE.contains(s)) {
            return Err(format!(
                "compile.stages is {stages}: K slices in flight, {} to {}",
                STAGE_RANGE.start(),
                STAGE_RANGE.end()
            ));
        }
        if self.data.set == DataSet::Synthetic && self.data.synthetic.is_none() {
            return Err(
                "data.synthetic: the synthetic set needs train, test, shape, classes, noise".into(),
            );
        }
        self.check_numbers()
    }

    /// Every number within what it means: rates, decays and scales finite and not negative,
    /// momentum in [0, 1), counts of images and classes at least 1.
    fn check_numbers(&self) -> Result<(), String> {
        let t = &self.train;
        let not_negative = [
            ("train.lr", Some(t.lr)),
            ("train.small_lr", t.small_lr),
            ("train.noise_scale", t.noise_scale),
            ("train.decay", Some(t.decay)),
            ("train.weight_decay", Some(t.weight_decay)),
            ("train.warmup_epochs", Some(t.warmup_epochs as f32)),
        ];
        for (key, value) in not_negative {
            if let Some(v) = value.filter(|v| !v.is_finite() || *v < 0.0) {
                return Err(format!(
                    "{key} is {v}: it must be a finite number, at least 0"
                ));
            }
        }
        let kfac = t.kfac_settings();
        if !(kfac.damping.is_finite() && kfac.damping > 0.0) {
            return Err(format!(
                "train.kfac_damping is {}: it must be a finite number above 0",
                kfac.damping
            ));
        }
        if kfac.every == 0 {
            return Err("train.kfac_every must be at least 1".into());
        }
        if !(0.0..1.0).contains(&kfac.decay) {
            return Err(format!(
                "train.kfac_decay is {}: it must be at least 0 and below 1",
                kfac.decay
            ));
        }
        if !(0.0..1.0).contains(&t.momentum) {
            return Err(format!(
                "train.momentum is {}: it must be at least 0 and below 1",
                t.momentum
            ));
        }
        let d = &self.data;
        let subsets = [
            ("data.train_subset", d.train_subset),
            ("data.test_subset", d.test_subset),
        ];
        if let Some((key, _)) = subsets.iter().find(|(_, n)| *n == Some(0)) {
            return Err(format!("{key} must be at least 1 image"));
        }
        if let Some(s) = &d.synthetic {
            let counts = [
                ("data.synthetic.train", s.train),
                ("data.synthetic.test", s.test),
                ("data.synthetic.classes", s.classes),
            ];
            if let Some((key, _)) = counts.iter().find(|(_, n)| *n == 0) {
                return Err(format!("{key} must be at least 1"));
            }
            if s.classes > 256 {
                return Err(format!(
                    "data.synthetic.classes is {}: labels are bytes, 256 classes at most",
                    s.classes
                ));
            }
            if s.shape.contains(&0) {
                return Err(format!(
                    "data.synthetic.shape is {:?}: every side at least 1",
                    s.shape
                ));
            }
            if !s.noise.is_finite() || s.noise < 0.0 {
                return Err(format!(
                    "data.synthetic.noise is {}: it must be a finite number, at least 0",
                    s.noise
                ));
            }
        }
        Ok(())
    }
}

fn deserialize(table: &toml::Table) -> Result<Experiment, String> {
    table
        .clone()
        .try_into()
        .map_err(|e: toml::de::Error| e.to_string().trim_end().to_string())
}

/// Whether a deserialisation error is about `key` (`train.lr`): toml names the path of a
/// field with a bad value (``in `train.lr` ``), and an unknown field with the table it is in.
fn names_key(message: &str, key: &str) -> bool {
    if message.contains(&format!("in `{key}`")) {
        return true;
    }
    let parts: Vec<&str> = key.split('.').collect();
    (0..parts.len()).any(|i| {
        let in_table = match i {
            0 => !message.contains("\nin `"),
            _ => message.contains(&format!("in `{}`", parts[..i].join("."))),
        };
        in_table && message.contains(&format!("unknown field `{}`", parts[i]))
    })
}

/// Whether a check's message (`train.batch must be at least 1`) is about the key `assignment`
/// sets.
fn leads_with_key(message: &str, assignment: &str) -> bool {
    let key = assignment
        .split_once('=')
        .map_or(assignment, |(k, _)| k)
        .trim();
    message
        .strip_prefix(key)
        .is_some_and(|rest| rest.starts_with([' ', ':']))
}

/// Applies one `a.b.c=value` override; returns its key.
fn set(table: &mut toml::Table, assignment: &str) -> Result<String, ExperimentError> {
    let blame = |message: String| ExperimentError::Override {
        assignment: assignment.to_string(),
        message,
    };
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| blame("expected key=value".into()))?;
    // the value in TOML syntax if it parses as such, else a string
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let key = key.trim();
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts
        .pop()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| blame("empty key".into()))?;
    let mut node = table;
    for part in parts {
        node = node
            .entry(part)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| blame(format!("{part} is not a table")))?;
    }
    node.insert(last.to_string(), value);
    Ok(key.to_string())
}
