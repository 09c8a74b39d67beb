//! The noisy SGD update of one parameter tensor:
//!
//! ```text
//! ε = s·√F̂ ⊙ ξ        (ξ from philox.rs, keyed by seed, step and the parameter index;
//!                      F̂ one value for every element with `UpdateNoise::Scalar`)
//!   or ε = s·e         (`UpdateNoise::Vector`: a noise vector e drawn by the step graph)
//! v ← μ·v + (g + ε + wd·θ)
//! θ ← θ − lr·v
//! ```
//!
//! Evaluated in exactly this order, one rounding per operation: `(s·√F̂)·ξ` (or `s·e`), then
//! `g + ε`, then `+ wd·θ` (when the parameter decays), then `μ·v + d`, then `θ − lr·v`. In f32
//! that is what the GPU kernel computes bit for bit.
//!
//! With a `fisher_factor` f (diagonal noise), the noise input is the sum of squares S and
//! the update first makes `F̂ = f·S` (as `scale` would, one rounding), uses it, and returns it
//! as a third output: the Fisher estimate the step reports, without a kernel of its own.

use super::{FloatAttr, OpDef, expect_arity, expect_type};
use crate::philox;
use crate::tensor::{DType, Real, Tensor, TensorType, Value};
use serde::{Deserialize, Serialize};

/// Which noise the update adds, and so what its last input is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateNoise {
    /// None: plain momentum SGD, no last input.
    None,
    /// `s·√F̂ ⊙ ξ` with one variance per element (F̂ shaped as θ).
    Diagonal,
    /// `s·√v·ξ` with one variance `v` (`[1]`) for every element (fisher-trace noise).
    Scalar,
    /// `s·e` with a noise vector `e` shaped as θ, drawn by the step graph (full-Fisher noise).
    Vector,
}

/// Inputs: θ, v, g, lr, μ, wd, s, seed, step, then the noise input unless the noise is
/// `None`. Outputs: θ', v'.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NoisySgdUpdate {
    /// The parameter's index: the noise stream's counter word.
    pub param: u32,
    /// Whether weight decay applies to this parameter.
    pub decay: bool,
    pub noise: UpdateNoise,
    /// The factor of a Fisher estimate made here from its sum of squares (see the module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fisher_factor: Option<FloatAttr>,
}

/// Input positions (the kernel lowering reads the same ones).
impl NoisySgdUpdate {
    pub const THETA: usize = 0;
    pub const VELOCITY: usize = 1;
    pub const GRAD: usize = 2;
    pub const LR: usize = 3;
    pub const MOMENTUM: usize = 4;
    pub const WEIGHT_DECAY: usize = 5;
    pub const NOISE_SCALE: usize = 6;
    pub const SEED: usize = 7;
    pub const STEP: usize = 8;
    /// The noise input: F̂, the scalar variance or the noise vector (absent without noise).
    pub const NOISE: usize = 9;
}

impl OpDef for NoisySgdUpdate {
    const NAME: &'static str = "noisy_sgd_update";

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let arity = Self::NOISE + (self.noise != UpdateNoise::None) as usize;
        expect_arity(inputs, arity)?;
        let theta = inputs[Self::THETA];
        if theta.dtype != DType::F32 {
            return Err(format!("parameter: expected an f32 tensor, found {theta}"));
        }
        expect_type(inputs[Self::VELOCITY], theta, "momentum buffer")?;
        expect_type(inputs[Self::GRAD], theta, "gradient")?;
        let names = ["learning rate", "momentum", "weight decay", "noise scale"];
        for (i, name) in (Self::LR..Self::SEED).zip(names) {
            expect_type(inputs[i], &TensorType::scalar(DType::F32), name)?;
        }
        expect_type(inputs[Self::SEED], &TensorType::scalar(DType::U64), "seed")?;
        expect_type(inputs[Self::STEP], &TensorType::scalar(DType::U64), "step")?;
        match self.noise {
            UpdateNoise::None => {}
            UpdateNoise::Diagonal => expect_type(inputs[Self::NOISE], theta, "Fisher estimate")?,
            UpdateNoise::Scalar => expect_type(
                inputs[Self::NOISE],
                &TensorType::f32(&[1]),
                "noise variance",
            )?,
            UpdateNoise::Vector => expect_type(inputs[Self::NOISE], theta, "noise vector")?,
        }
        match (self.fisher_factor, self.noise) {
            (None, _) => Ok(vec![theta.clone(), theta.clone()]),
            (Some(_), UpdateNoise::Diagonal) => Ok(vec![theta.clone(); 3]),
            (Some(_), other) => Err(format!(
                "a Fisher factor scales a diagonal Fisher estimate, not {other:?} noise"
            )),
        }
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, String> {
        let (theta, v, g) = (
            inputs[Self::THETA].float(),
            inputs[Self::VELOCITY].float(),
            inputs[Self::GRAD].float(),
        );
        let scalar = |i: usize| inputs[i].float_scalar();
        let (lr, mu, wd, s) = (
            scalar(Self::LR),
            scalar(Self::MOMENTUM),
            scalar(Self::WEIGHT_DECAY),
            scalar(Self::NOISE_SCALE),
        );
        let drawn = matches!(self.noise, UpdateNoise::Diagonal | UpdateNoise::Scalar);
        let mut xi = vec![0.0f32; if drawn { theta.numel() } else { 0 }];
        philox::fill_normal(
            inputs[Self::SEED].word(),
            inputs[Self::STEP].word(),
            self.param,
            &mut xi,
        );
        let fisher: Option<Vec<T>> = self.fisher_factor.map(|f| {
            let factor = T::from_f64(f.0);
            let sums = &inputs[Self::NOISE].float().data;
            sums.iter().map(|&x| x * factor).collect()
        });
        let noise_input = match &fisher {
            Some(scaled) => Some(scaled),
            None => inputs.get(Self::NOISE).map(|v| &v.float().data),
        };
        let epsilon = |i: usize| match (self.noise, noise_input) {
            (UpdateNoise::Diagonal, Some(f)) => Some((s * f[i].sqrt()) * T::from_f32(xi[i])),
            (UpdateNoise::Scalar, Some(f)) => Some((s * f[0].sqrt()) * T::from_f32(xi[i])),
            (UpdateNoise::Vector, Some(e)) => Some(s * e[i]),
            _ => None,
        };
        let mut new_theta = Vec::with_capacity(theta.numel());
        let mut new_v = Vec::with_capacity(theta.numel());
        for i in 0..theta.numel() {
            let mut d = g.data[i];
            if let Some(eps) = epsilon(i) {
                d = d + eps;
            }
            if self.decay {
                d = d + wd * theta.data[i];
            }
            let velocity = mu * v.data[i] + d;
            new_v.push(velocity);
            new_theta.push(theta.data[i] - lr * velocity);
        }
        let mut outputs = vec![
            Value::Float(Tensor::from_vec(&theta.shape, new_theta)),
            Value::Float(Tensor::from_vec(&theta.shape, new_v)),
        ];
        if let Some(scaled) = fisher {
            outputs.push(Value::Float(Tensor::from_vec(&theta.shape, scaled)));
        }
        Ok(outputs)
    }

    /// 4 per element for momentum SGD, 2 for decay; drawn noise costs about 20 more (Philox's
    /// multiplies and Box–Muller's polynomials, shared by 4 and 2 elements), a noise vector 2.
    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        let noise = match self.noise {
            UpdateNoise::None => 0,
            UpdateNoise::Diagonal | UpdateNoise::Scalar => 24,
            UpdateNoise::Vector => 2,
        };
        let scaled = self.fisher_factor.is_some() as u64;
        let per_element = 4 + 2 * self.decay as u64 + noise + scaled;
        per_element * inputs[0].numel() as u64
    }

    /// θ' and v' replace θ and v; F̂ is new.
    fn in_place(&self, output: usize) -> Option<usize> {
        (output < 2).then_some(output)
    }
}

/// Many parameters' noisy updates as one node, so that the device runs them in one kernel (or
/// a few) instead of one launch per parameter tensor. Made by the optimizer's grouping pass
/// (`optimize::group`); each member computes exactly what it computes alone.
///
/// Inputs: the members' shared scalars lr, μ, wd, s, seed, step ([`Self::SHARED`] of them, in
/// `NoisySgdUpdate`'s order), then each member's own: θ, v, g and its noise input (if any).
/// Outputs: each member's outputs (θ', v' and, with a Fisher factor, F̂), member after member.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NoisySgdUpdateGroup {
    pub members: Vec<NoisySgdUpdate>,
}

/// Where one member's inputs and outputs sit in its group's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberPorts {
    /// The group's input positions of the member's inputs, in the member's own order.
    pub inputs: Vec<usize>,
    /// The group's output positions of the member's outputs.
    pub outputs: std::ops::Range<usize>,
}

impl NoisySgdUpdate {
    /// Inputs of this parameter's own (θ, v, g and the noise input, if any).
    fn own_inputs(&self) -> usize {
        3 + (self.noise != UpdateNoise::None) as usize
    }

    /// θ', v' and, with a Fisher factor, F̂.
    pub fn output_count(&self) -> usize {
        2 + self.fisher_factor.is_some() as usize
    }
}

impl NoisySgdUpdateGroup {
    /// The shared inputs: lr, μ, wd, s, seed and step.
    pub const SHARED: usize = NoisySgdUpdate::NOISE - NoisySgdUpdate::LR;

    /// Every member's ports, in member order.
    pub fn ports(&self) -> Vec<MemberPorts> {
        let shared = NoisySgdUpdate::LR..NoisySgdUpdate::NOISE;
        let (mut next_input, mut next_output) = (Self::SHARED, 0);
        self.members
            .iter()
            .map(|m| {
                let own: Vec<usize> = (next_input..next_input + m.own_inputs()).collect();
                // the member's order: θ, v, g, the shared scalars, then its noise input
                let mut inputs = own[..3].to_vec();
                inputs.extend(shared.clone().map(|i| i - NoisySgdUpdate::LR));
                inputs.extend(&own[3..]);
                let outputs = next_output..next_output + m.output_count();
                next_input += m.own_inputs();
                next_output += m.output_count();
                MemberPorts { inputs, outputs }
            })
            .collect()
    }

    /// The group's inputs: the shared scalars and every member's own.
    pub fn input_count(&self) -> usize {
        Self::SHARED + self.members.iter().map(|m| m.own_inputs()).sum::<usize>()
    }
}

impl OpDef for NoisySgdUpdateGroup {
    const NAME: &'static str = "noisy_sgd_update_group";

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        if self.members.is_empty() {
            return Err("a group of no updates".to_string());
        }
        expect_arity(inputs, self.input_count())?;
        let mut outputs = Vec::new();
        for (m, ports) in self.members.iter().zip(self.ports()) {
            let own: Vec<&TensorType> = ports.inputs.iter().map(|&i| inputs[i]).collect();
            let types = m
                .infer(&own)
                .map_err(|e| format!("update of parameter {}: {e}", m.param))?;
            outputs.extend(types);
        }
        Ok(outputs)
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        outputs: &[TensorType],
    ) -> Result<Vec<Value<T>>, String> {
        let mut values = Vec::with_capacity(outputs.len());
        for (m, ports) in self.members.iter().zip(self.ports()) {
            let own: Vec<&Value<T>> = ports.inputs.iter().map(|&i| inputs[i]).collect();
            values.extend(m.eval(&own, &outputs[ports.outputs])?);
        }
        Ok(values)
    }

    fn flops(&self, inputs: &[&TensorType], outputs: &[TensorType]) -> u64 {
        self.members
            .iter()
            .zip(self.ports())
            .map(|(m, ports)| {
                let own: Vec<&TensorType> = ports.inputs.iter().map(|&i| inputs[i]).collect();
                m.flops(&own, &outputs[ports.outputs])
            })
            .sum()
    }

    fn in_place(&self, output: usize) -> Option<usize> {
        let ports = self.ports();
        let member = ports.iter().find(|p| p.outputs.contains(&output))?;
        let own = output - member.outputs.start;
        (own < 2).then(|| member.inputs[own])
    }
}
