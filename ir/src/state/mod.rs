//! Training state on the CPU: parameters, momenta and running statistics, their initial values,
//! the hyper-parameters of a step, and the glue between them and a [`TrainingStep`]'s inputs
//! and outputs.

pub mod kfac;

use crate::graph::Output;
use crate::interp::{Evaluation, Feeds};
use crate::model::{Network, ParamKind};
use crate::ops::{Hyper, Role};
use crate::philox;
use crate::tensor::{Real, Tensor, Value};

/// The Philox "step" word of the initialisation stream; update steps count up from 0, so this
/// one is never an update's.
const INIT_STREAM: u64 = u64::MAX;

/// Hyper-parameters fed to one step.
#[derive(Clone, Debug, PartialEq)]
pub struct Hyperparams {
    pub learning_rate: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    /// Noise scale s; 0 switches the Fisher noise off.
    pub noise_scale: f32,
    pub seed: u64,
    pub step: u64,
}

impl Default for Hyperparams {
    fn default() -> Self {
        Hyperparams {
            learning_rate: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            noise_scale: 0.0,
            seed: 0,
            step: 0,
        }
    }
}

impl Hyperparams {
    /// The hyper-parameter inputs of a step, by role.
    pub fn feeds<T: Real>(&self) -> Feeds<T> {
        let scalar = |x: f32| Value::Float(Tensor::scalar(T::from_f32(x)));
        Feeds::from([
            (Role::Hyper(Hyper::LearningRate), scalar(self.learning_rate)),
            (Role::Hyper(Hyper::Momentum), scalar(self.momentum)),
            (Role::Hyper(Hyper::WeightDecay), scalar(self.weight_decay)),
            (Role::Hyper(Hyper::NoiseScale), scalar(self.noise_scale)),
            (Role::Hyper(Hyper::Seed), Value::Word(self.seed)),
            (Role::Hyper(Hyper::Step), Value::Word(self.step)),
        ])
    }
}

/// The paper's default noise scale `sqrt(1/M_S − 1/M_L)`: the gap in gradient-noise variance
/// between the small batch `M_S` and the large batch `M_L` (0 when `M_L ≤ M_S`).
pub fn default_noise_scale(small_batch: usize, large_batch: usize) -> f32 {
    let gap = 1.0 / small_batch as f64 - 1.0 / large_batch as f64;
    gap.max(0.0).sqrt() as f32
}

/// Every state tensor of `net`'s training by name (`param/conv1.weight`, `momentum/…`,
/// `running_mean/bn1`, `running_var/…`) and role: the names of checkpoints and of errors, in
/// the order of [`TrainState::tensors`].
pub fn state_names(net: &Network) -> Vec<(String, Role)> {
    let params: Vec<&String> = net.params.iter().map(|p| &p.name).collect();
    let bns: Vec<&String> = net.bn_layers.iter().map(|b| &b.name).collect();
    let named = |kind: &str, names: &[&String], role: fn(usize) -> Role| {
        let each = names.iter().enumerate();
        each.map(|(i, name)| (format!("{kind}/{name}"), role(i)))
            .collect::<Vec<_>>()
    };
    [
        named("param", &params, Role::Param),
        named("momentum", &params, Role::Momentum),
        named("running_mean", &bns, Role::RunningMean),
        named("running_var", &bns, Role::RunningVar),
    ]
    .concat()
}

/// Everything a training step reads and writes besides the data and hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState<T> {
    pub params: Vec<Tensor<T>>,
    pub momenta: Vec<Tensor<T>>,
    pub running_means: Vec<Tensor<T>>,
    pub running_vars: Vec<Tensor<T>>,
}

impl<T: Real> TrainState<T> {
    /// Every tensor: parameters, momenta, running means, running variances.
    pub fn tensors(&self) -> impl Iterator<Item = &Tensor<T>> {
        self.params
            .iter()
            .chain(&self.momenta)
            .chain(&self.running_means)
            .chain(&self.running_vars)
    }

    /// The same state in another float type (every tensor cast).
    pub fn cast<U: Real>(&self) -> TrainState<U> {
        let all = |list: &[Tensor<T>]| list.iter().map(Tensor::cast).collect();
        TrainState {
            params: all(&self.params),
            momenta: all(&self.momenta),
            running_means: all(&self.running_means),
            running_vars: all(&self.running_vars),
        }
    }

    /// Fresh state: He-normal weights (std √(2/fan_in), fan_in = all but the first axis),
    /// zero biases and β, unit γ, zero momenta, running mean 0 and variance 1.
    pub fn init(network: &Network, seed: u64) -> Self {
        let params: Vec<Tensor<T>> = network
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| match p.kind {
                ParamKind::ConvWeight | ParamKind::LinearWeight => {
                    let fan_in: usize = p.shape[1..].iter().product();
                    let std = (2.0 / fan_in as f64).sqrt();
                    let mut xi = vec![0.0f32; p.numel()];
                    philox::fill_normal(seed, INIT_STREAM, i as u32, &mut xi);
                    let data = xi.iter().map(|&v| T::from_f64(v as f64 * std)).collect();
                    Tensor::from_vec(&p.shape, data)
                }
                ParamKind::BnGamma => Tensor::filled(&p.shape, T::one()),
                ParamKind::ConvBias | ParamKind::LinearBias | ParamKind::BnBeta => {
                    Tensor::zeros(&p.shape)
                }
            })
            .collect();
        let momenta = params.iter().map(|p| Tensor::zeros(&p.shape)).collect();
        let stats = |value: T| {
            network
                .bn_layers
                .iter()
                .map(|bn| Tensor::filled(&[bn.channels], value))
                .collect()
        };
        TrainState {
            params,
            momenta,
            running_means: stats(T::zero()),
            running_vars: stats(T::one()),
        }
    }

    /// The inputs of one training step.
    pub fn feeds(&self, images: Tensor<T>, labels: Tensor<i32>, hyper: &Hyperparams) -> Feeds<T> {
        let mut feeds = self.state_feeds();
        feeds.insert(Role::Images, Value::Float(images));
        feeds.insert(Role::Labels, Value::Int(labels));
        feeds.extend(hyper.feeds());
        feeds
    }

    /// Parameters, momenta and running statistics by role.
    pub fn state_feeds(&self) -> Feeds<T> {
        let mut feeds = Feeds::new();
        let lists = [
            (&self.params, Role::Param as fn(usize) -> Role),
            (&self.momenta, Role::Momentum),
            (&self.running_means, Role::RunningMean),
            (&self.running_vars, Role::RunningVar),
        ];
        for (tensors, role) in lists {
            for (i, t) in tensors.iter().enumerate() {
                feeds.insert(role(i), Value::Float(t.clone()));
            }
        }
        feeds
    }

    /// Takes the updated parameters, momenta and running statistics from a step's outputs.
    pub fn advance(&mut self, step: &Evaluation<T>) {
        let take = |list: &mut Vec<Tensor<T>>, name: fn(usize) -> Output| {
            for (i, t) in list.iter_mut().enumerate() {
                *t = step
                    .output(&name(i))
                    .expect("a training step outputs every updated tensor")
                    .float()
                    .clone();
            }
        };
        take(&mut self.params, Output::NewParam);
        take(&mut self.momenta, Output::NewMomentum);
        take(&mut self.running_means, Output::NewRunningMean);
        take(&mut self.running_vars, Output::NewRunningVar);
    }
}
