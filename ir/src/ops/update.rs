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

use super::{FloatAttr, Groupable, OpClass, OpDef, Rounding, expect_arity, expect_type};
use crate::error::OpError;
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
    const CLASS: OpClass = OpClass::Update;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, Groupable::input_count(self))?;
        let theta = inputs[Self::THETA];
        if theta.dtype != DType::F32 {
            return Err(format!("parameter: expected an f32 tensor, found {theta}").into());
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
            )
            .into()),
        }
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
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
