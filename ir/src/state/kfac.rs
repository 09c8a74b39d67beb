//! K-FAC's state between steps, held on the host: each layer's running factors and the
//! Cholesky factors of their damped forms that the step reads, the settings that say when the
//! factors refresh and how they average, and the glue to a step's inputs and outputs.
//!
//! A step refreshes when its counter is a multiple of `every` (step 0 included): it computes
//! the batch's factors, which join the running average (the first refresh takes them as they
//! are; later ones `d·old + (1 − d)·new` with `d = decay^every`: `decay` is per step, so the
//! average remembers as many steps whatever `every` is), and the Cholesky factors of the damped
//! factors `F + λ·m_F·I` are made again, `m_F = tr F / n` the factor's mean eigenvalue. When
//! the steps read them is the trainer's choice (`fisherc_runtime::train::kfac`: from the next
//! refresh on, so the host's work overlaps the steps between). Before the first refresh the
//! Cholesky factors are zero: no K-FAC noise.
//!
//! The damping is relative to each factor's scale because the scales differ by orders of
//! magnitude: a convolution's `Ḡ` has diagonal entries near 10⁻⁴ where `Ā`'s are near 1, and
//! an absolute λ = 10⁻³ on both tripled the first convolution's noise variance over the
//! undamped `T·tr Ā·tr Ḡ` (small CNN on Fashion-MNIST, benches/RESULTS.md). Relative, it adds
//! about `2λ` of it in every layer.
//!
//! The running factors are kept in f32, as the step writes them and a checkpoint stores
//! them, so a resumed run makes the same Cholesky factors bit for bit.

use serde::{Deserialize, Serialize};

use crate::graph::Output;
use crate::interp::{Feeds, evaluate};
use crate::kfac::{KfacError, Matrix};
use crate::ops::{Op, Role};
use crate::step::TrainingStep;
use crate::tensor::{Real, Tensor, Value};

/// What the names of the running factors in [`KfacState::tensors`] begin with.
pub const TENSOR_PREFIX: &str = "kfac/";

/// How K-FAC's factors are refreshed, averaged and damped.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KfacSettings {
    /// λ: each factor's diagonal gains λ times its mean (`tr F / n`) before the Cholesky
    /// factorisation.
    pub damping: f64,
    /// Steps between refreshes of the factors.
    pub every: u64,
    /// The running average's weight of the old factors per step (`decay^every` a refresh).
    pub decay: f64,
}

impl Default for KfacSettings {
    /// λ = 10⁻³ (kfac-pytorch's default damping, here relative: 0.2% more noise variance
    /// than the undamped factors give, yet a floor under the directions no example spans,
    /// where a factor is singular: any layer with more patch elements than the batch has
    /// positions), a refresh every 10 steps (a factor product over the batch costs about a
    /// weight gradient, so refreshing every step would double the backward), and a decay of
    /// 0.95 a step (kfac-pytorch's `factor_decay`, which it applies at every step: about 20
    /// steps remembered, 0.6 a refresh every 10). Noise is drawn from the factors, so they
    /// should be recent: at 0.95 a refresh, factors from the untrained network's first step
    /// still weighed 77% after a 58-step noisy epoch (small CNN, Fashion-MNIST).
    fn default() -> Self {
        KfacSettings {
            damping: 1e-3,
            every: 10,
            decay: 0.95,
        }
    }
}

/// One layer's factors: its weight's parameter index, the running `Ā` and `Ḡ` (none before
/// the first refresh), and the Cholesky factors the step reads.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerFactors {
    pub weight: usize,
    pub running: Option<[Tensor<f32>; 2]>,
    pub cholesky: [Tensor<f32>; 2],
}

/// Every K-FAC layer's factors, in parameter order.
#[derive(Clone, Debug, PartialEq)]
pub struct KfacState {
    pub settings: KfacSettings,
    pub layers: Vec<LayerFactors>,
}

impl KfacState {
    /// The state of `step`'s K-FAC layers (none for a step without K-FAC noise), before any
    /// refresh.
    pub fn for_step(step: &TrainingStep, settings: KfacSettings) -> KfacState {
        let side = |role: &Role| match step.inputs.get(role).map(|&n| &step.graph.node(n).op) {
            Some(Op::Input(input)) => input.ty.shape[0],
            _ => 0,
        };
        let layers = step
            .inputs
            .keys()
            .filter_map(|role| match role {
                Role::KfacInputCholesky(i) => Some(*i),
                _ => None,
            })
            .map(|weight| {
                let sides = [
                    side(&Role::KfacInputCholesky(weight)),
                    side(&Role::KfacGradCholesky(weight)),
                ];
                LayerFactors {
                    weight,
                    running: None,
                    cholesky: sides.map(|n| Tensor::zeros(&[n, n])),
                }
            })
            .collect();
        KfacState { settings, layers }
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Whether step `step` (counted from 0) refreshes the factors.
    pub fn refreshes(&self, step: u64) -> bool {
        step.is_multiple_of(self.settings.every.max(1))
    }

    /// The running average's weight of the old factors at a refresh: `decay^every`.
    pub fn refresh_decay(&self) -> f64 {
        let every = self.settings.every.max(1).min(i32::MAX as u64) as i32;
        self.settings.decay.powi(every)
    }

    /// The step's K-FAC inputs: whether it refreshes, and every Cholesky factor.
    pub fn feeds<T: Real>(&self, refresh: bool) -> Feeds<T> {
        let mut feeds = self.refresh_feed(refresh);
        feeds.extend(self.cholesky_feeds());
        feeds
    }

    /// Whether the step refreshes the factors, as its input (none without K-FAC layers).
    pub fn refresh_feed<T: Real>(&self, refresh: bool) -> Feeds<T> {
        let mut feeds = Feeds::new();
        if !self.is_empty() {
            let flag = T::from_f32(if refresh { 1.0 } else { 0.0 });
            feeds.insert(Role::KfacRefresh, Value::Float(Tensor::scalar(flag)));
        }
        feeds
    }

    /// Every Cholesky factor, as the step's inputs: fed when they change, not every step.
    pub fn cholesky_feeds<T: Real>(&self) -> Feeds<T> {
        let mut feeds = Feeds::new();
        for layer in &self.layers {
            let [a, g] = layer
                .cholesky
                .each_ref()
                .map(|t| Value::Float(t.cast::<T>()));
            feeds.insert(Role::KfacInputCholesky(layer.weight), a);
            feeds.insert(Role::KfacGradCholesky(layer.weight), g);
        }
        feeds
    }

    /// The outputs a refreshing step's factors are read from, layer by layer: `Ā`, then `Ḡ`.
    pub fn outputs(&self) -> Vec<Output> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    Output::KfacInputFactor(l.weight),
                    Output::KfacGradFactor(l.weight),
                ]
            })
            .collect()
    }

    /// Takes a refreshing step's factors (in [`KfacState::outputs`]' order) into the running
    /// averages and makes the Cholesky factors again.
    pub fn absorb(&mut self, factors: Vec<Tensor<f32>>) -> Result<(), KfacError> {
        let expected = 2 * self.layers.len();
        if factors.len() != expected {
            return Err(KfacError::Length {
                what: "the refreshed factors",
                expected,
                found: factors.len(),
            });
        }
        let decay = self.refresh_decay();
        let mut factors = factors.into_iter();
        for layer in &mut self.layers {
            let new = [0, 1].map(|_| factors.next().expect("two factors a layer"));
            layer.running = Some(match layer.running.take() {
                None => new,
                Some(old) => [0, 1].map(|i| blend(&old[i], &new[i], decay)),
            });
        }
        self.decompose()
    }

    /// The Cholesky factors of every layer's damped running factors.
    pub fn decompose(&mut self) -> Result<(), KfacError> {
        let damping = self.settings.damping;
        for layer in &mut self.layers {
            let Some(running) = &layer.running else {
                continue;
            };
            for (running, cholesky) in running.iter().zip(&mut layer.cholesky) {
                let matrix = Matrix {
                    n: running.shape[0],
                    data: running.data.iter().map(|&v| v as f64).collect(),
                };
                let l = matrix.cholesky_blocked(damping * matrix.mean_diagonal())?;
                *cholesky =
                    Tensor::from_vec(&running.shape, l.data.iter().map(|&v| v as f32).collect());
            }
        }
        Ok(())
    }

    /// The running factors by name (`kfac/<weight>/input`, `kfac/<weight>/grad`), for a
    /// checkpoint; none before the first refresh.
    pub fn tensors(&self) -> Vec<(String, &Tensor<f32>)> {
        self.layers
            .iter()
            .filter_map(|l| Some((l.weight, l.running.as_ref()?)))
            .flat_map(|(w, [a, g])| {
                [
                    (KfacState::tensor_name(w, false), a),
                    (KfacState::tensor_name(w, true), g),
                ]
            })
            .collect()
    }

    /// The state of `step` after one refresh on `feeds`' batch (which must feed everything
    /// else), as the CPU reference computes it: Cholesky factors of real factors, for checks
    /// that want the noise's products on realistic inputs.
    pub fn refreshed_on(
        step: &TrainingStep,
        feeds: &Feeds<f32>,
        settings: KfacSettings,
    ) -> Result<KfacState, KfacError> {
        let mut state = KfacState::for_step(step, settings);
        if state.is_empty() {
            return Ok(state);
        }
        let mut all = feeds.clone();
        all.extend(state.feeds::<f32>(true));
        let evaluation =
            evaluate(&step.graph, &all, &[]).map_err(|e| KfacError::Refresh(e.to_string()))?;
        let factors = state
            .outputs()
            .iter()
            .map(|o| match evaluation.output(o) {
                Some(Value::Float(t)) => Ok(t.clone()),
                _ => Err(KfacError::Refresh(format!("the step has no output {o}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        state.absorb(factors)?;
        Ok(state)
    }

    /// Takes running factors saved by [`KfacState::tensors`] (a checkpoint's) and makes
    /// their Cholesky factors; layers without saved factors stay before their first refresh.
    pub fn restore(
        &mut self,
        saved: &std::collections::BTreeMap<String, Tensor<f32>>,
    ) -> Result<(), KfacError> {
        for layer in &mut self.layers {
            let [a, g] =
                [false, true].map(|grad| saved.get(&KfacState::tensor_name(layer.weight, grad)));
            let (Some(a), Some(g)) = (a, g) else {
                continue;
            };
            for (t, side) in [(a, &layer.cholesky[0]), (g, &layer.cholesky[1])] {
                if t.shape != side.shape {
                    return Err(KfacError::Length {
                        what: "a saved factor",
                        expected: side.shape.iter().product(),
                        found: t.data.len(),
                    });
                }
            }
            layer.running = Some([a.clone(), g.clone()]);
        }
        self.decompose()
    }

    /// The name of a running factor in [`KfacState::tensors`].
    pub fn tensor_name(weight: usize, grad: bool) -> String {
        let side = if grad { "grad" } else { "input" };
        format!("{TENSOR_PREFIX}{weight}/{side}")
    }
}

/// `decay·old + (1 − decay)·new`, in f64, kept in f32.
fn blend(old: &Tensor<f32>, new: &Tensor<f32>, decay: f64) -> Tensor<f32> {
    let data = old
        .data
        .iter()
        .zip(&new.data)
        .map(|(&o, &n)| (decay * o as f64 + (1.0 - decay) * n as f64) as f32)
        .collect();
    Tensor::from_vec(&old.shape, data)
}
