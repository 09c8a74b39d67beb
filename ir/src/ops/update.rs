//! The noisy SGD update of one parameter tensor:
//!
//! ```text
//! ε = s·√F̂ ⊙ ξ        (ξ from philox.rs, keyed by seed, step and the parameter index;
//!                      F̂ one value for every element where `scalar_variance`)
//! v ← μ·v + (g + ε + wd·θ)
//! θ ← θ − lr·v
//! ```
//!
//! Evaluated in exactly this order, one rounding per operation: `(s·√F̂)·ξ`, then `g + ε`, then
//! `+ wd·θ` (when the parameter decays), then `μ·v + d`, then `θ − lr·v`. In f32 that is what
//! the GPU kernel computes bit for bit.

use super::{OpDef, expect_arity, expect_type};
use crate::philox;
use crate::tensor::{DType, Real, Tensor, TensorType, Value};
use serde::{Deserialize, Serialize};

/// Inputs: θ, v, g, lr, μ, wd, s, seed, step, and F̂ when `noisy`. Outputs: θ', v'.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NoisySgdUpdate {
    /// The parameter's index: the noise stream's counter word.
    pub param: u32,
    /// Whether weight decay applies to this parameter.
    pub decay: bool,
    /// Whether Fisher noise is added (then F̂ is the last input).
    pub noisy: bool,
    /// Whether F̂ is one variance `[1]` for every element (fisher-trace noise) rather than
    /// one per element.
    #[serde(default)]
    pub scalar_variance: bool,
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
    /// Only when `noisy`.
    pub const FISHER: usize = 9;
}

impl OpDef for NoisySgdUpdate {
    const NAME: &'static str = "noisy_sgd_update";

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let arity = if self.noisy {
            Self::FISHER + 1
        } else {
            Self::FISHER
        };
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
        if self.noisy && self.scalar_variance {
            expect_type(
                inputs[Self::FISHER],
                &TensorType::f32(&[1]),
                "noise variance",
            )?;
        } else if self.noisy {
            expect_type(inputs[Self::FISHER], theta, "Fisher estimate")?;
        }
        Ok(vec![theta.clone(), theta.clone()])
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
        let noise = self.noisy.then(|| {
            let mut xi = vec![0.0f32; theta.numel()];
            philox::fill_normal(
                inputs[Self::SEED].word(),
                inputs[Self::STEP].word(),
                self.param,
                &mut xi,
            );
            (inputs[Self::FISHER].float(), xi)
        });
        let mut new_theta = Vec::with_capacity(theta.numel());
        let mut new_v = Vec::with_capacity(theta.numel());
        for i in 0..theta.numel() {
            let mut d = g.data[i];
            if let Some((fisher, xi)) = &noise {
                let variance = fisher.data[if self.scalar_variance { 0 } else { i }];
                d = d + (s * variance.sqrt()) * T::from_f32(xi[i]);
            }
            if self.decay {
                d = d + wd * theta.data[i];
            }
            let velocity = mu * v.data[i] + d;
            new_v.push(velocity);
            new_theta.push(theta.data[i] - lr * velocity);
        }
        Ok(vec![
            Value::Float(Tensor::from_vec(&theta.shape, new_theta)),
            Value::Float(Tensor::from_vec(&theta.shape, new_v)),
        ])
    }

    /// 4 per element for momentum SGD, 2 for decay; the noise costs about 20 more (Philox's
    /// multiplies and Box–Muller's polynomials, shared by 4 and 2 elements).
    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        let per_element = 4 + 2 * self.decay as u64 + 24 * self.noisy as u64;
        per_element * inputs[0].numel() as u64
    }
}
