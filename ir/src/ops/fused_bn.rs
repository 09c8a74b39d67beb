//! Fused batch-norm, ReLU and reduction ops: what the optimizer rewrites chains of the basic
//! ops into. Each is defined (shape rule and CPU reference) as the composition it replaces,
//! so the optimised step can be checked against the unoptimised one on the CPU.
//!
//! Many of them also produce the *squares* the Fisher needs in the same pass ([`Squares`]).

use serde::{Deserialize, Serialize};

use super::activation::relu_mask;
use super::batchnorm::{
    Planes, backward_args, channel_totals, check_backward_inputs, check_channel_inputs, inv_std,
    plane_sums,
};
use super::{FloatAttr, OpClass, OpDef, Rounding, expect_arity, expect_type, float_out};
use crate::error::OpError;
use crate::tensor::{DType, Real, Tensor, TensorType, Value};

/// Which squares a fused gradient op also produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Squares {
    /// Only the gradient.
    None,
    /// `Σₙ cₙ²` of the per-example contributions `cₙ` (the exact Fisher).
    PerExample,
    /// `Σₙ Σₜ (a·dy)²` over examples and positions (the a2g2 Fisher).
    PerPosition,
}

impl Squares {
    /// Outputs the squares add to each gradient output.
    pub fn extra_outputs(self) -> usize {
        match self {
            Squares::None => 0,
            _ => 1,
        }
    }
}

/// `relu(γ·x̂ + β [+ s])` with the given statistics: the BN-apply + ReLU (+ residual) chain.
pub(super) fn bn_relu<T: Real>(
    x: &Tensor<T>,
    stats: [&[T]; 4],
    eps: FloatAttr,
    residual: Option<&Tensor<T>>,
) -> Tensor<T> {
    let [mean, var, gamma, beta] = stats;
    let p = Planes::of(&x.shape);
    let mut y = Tensor::zeros(&x.shape);
    p.fill(&mut y.data, |n, c, out| {
        let scale = gamma[c] * inv_std(var[c], eps);
        let x_plane = p.plane(&x.data, n, c);
        for (k, (o, &v)) in out.iter_mut().zip(x_plane).enumerate() {
            let mut z = (v - mean[c]) * scale + beta[c];
            if let Some(s) = residual {
                z = z + p.plane(&s.data, n, c)[k];
            }
            *o = z.max(T::zero());
        }
    });
    y
}

/// The four per-channel vectors (mean, var, γ, β) at `inputs[from..from + 4]`.
pub(super) fn stats_args<'a, T: Real>(inputs: &[&'a Value<T>], from: usize) -> [&'a [T]; 4] {
    std::array::from_fn(|i| inputs[from + i].float().data.as_slice())
}

/// `(Σ dy·x̂, Σ dy)` per channel, then the squares `squares` asks for.
pub(super) fn param_grads_with_squares<T: Real>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    mean: &[T],
    var: &[T],
    eps: FloatAttr,
    squares: Squares,
) -> Vec<Value<T>> {
    let (planes, sums) = plane_sums(dy, x, mean, var, eps, |g, xh| (g * xh, g));
    let mut out = channel_totals(planes, &sums);
    match squares {
        Squares::None => {}
        Squares::PerExample => {
            let squared: Vec<(T, T)> = sums.iter().map(|&(a, b)| (a * a, b * b)).collect();
            out.extend(channel_totals(planes, &squared));
        }
        Squares::PerPosition => {
            let (_, squared) =
                plane_sums(dy, x, mean, var, eps, |g, xh| ((g * xh) * (g * xh), g * g));
            out.extend(channel_totals(planes, &squared));
        }
    }
    out
}

/// Output types of the BN parameter reductions: two `[C]`, plus two more with squares.
fn param_grad_types(channels: usize, squares: Squares) -> Vec<TensorType> {
    let vector = TensorType::f32(&[channels]);
    vec![vector; 2 + 2 * squares.extra_outputs()]
}

/// BN backward reductions with squares: (dy, x, mean, var) → (Σ dy·x̂, Σ dy, then their
/// squares per `squares`). `BnBackwardReduce` and the BN Fisher ops in one pass.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BnBackwardReduceSq {
    pub eps: FloatAttr,
    pub squares: Squares,
}

impl OpDef for BnBackwardReduceSq {
    const NAME: &'static str = "bn_backward_reduce_sq";
    const CLASS: OpClass = OpClass::Norm;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 4)?;
        let c = check_backward_inputs(inputs)?;
        Ok(param_grad_types(c, self.squares))
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (dy, x, mean, var) = backward_args(inputs);
        Ok(param_grads_with_squares(
            dy,
            x,
            mean,
            var,
            self.eps,
            self.squares,
        ))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        (5 + 3 * self.squares.extra_outputs() as u64) * inputs[0].numel() as u64
    }
}

/// Bias gradient with squares: dy `[N, C, ...]` → (Σ dy per channel, its squares).
/// Per example, the squares are `Σₙ (Σₜ dy)²`; per position `Σₙₜ dy²`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChannelSumSq {
    pub squares: Squares,
}

impl OpDef for ChannelSumSq {
    const NAME: &'static str = "channel_sum_sq";
    const CLASS: OpClass = OpClass::Reduce;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 1)?;
        let t = inputs[0];
        if t.dtype != DType::F32 || t.rank() < 2 {
            return Err(format!("input: expected an f32 tensor [N, C, ...], found {t}").into());
        }
        let vector = TensorType::f32(&[t.shape[1]]);
        Ok(vec![vector; 1 + self.squares.extra_outputs()])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let dy = inputs[0].float();
        let p = Planes::of(&dy.shape);
        // per plane: (Σₜ dy, the plane's share of the squares)
        let sums: Vec<(T, T)> = dy
            .data
            .chunks(p.positions.max(1))
            .map(|plane| {
                let sum: T = plane.iter().copied().sum();
                let squares = match self.squares {
                    Squares::PerExample => sum * sum,
                    _ => plane.iter().map(|&g| g * g).sum(),
                };
                (sum, squares)
            })
            .collect();
        let mut totals = channel_totals(p, &sums);
        totals.truncate(1 + self.squares.extra_outputs());
        Ok(totals)
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        (1 + 2 * self.squares.extra_outputs() as u64) * inputs[0].numel() as u64
    }
}

/// BN-apply + (residual add +) ReLU: (y, mean, var, γ, β [, s]) → `relu(γ·ŷ + β [+ s])`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BnRelu {
    pub eps: FloatAttr,
    pub residual: bool,
}

impl OpDef for BnRelu {
    const NAME: &'static str = "bn_relu";
    const CLASS: OpClass = OpClass::Norm;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, if self.residual { 6 } else { 5 })?;
        check_channel_inputs(&inputs[..5], &["mean", "variance", "gamma", "beta"])?;
        if self.residual {
            expect_type(inputs[5], inputs[0], "residual (must match the input)")?;
        }
        Ok(vec![inputs[0].clone()])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let residual = self.residual.then(|| inputs[5].float());
        let y = bn_relu(inputs[0].float(), stats_args(inputs, 1), self.eps, residual);
        Ok(float_out(y))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        (4 + self.residual as u64) * inputs[0].numel() as u64
    }
}

/// ReLU backward + BN backward reductions: (dout, out, y, mean, var) →
/// (du = dout·[out > 0], Σ du·ŷ, Σ du, then their squares per `squares`), where `out` is the
/// ReLU's output and y, mean, var the batch norm's input and statistics.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReluBackwardBnReduce {
    pub eps: FloatAttr,
    pub squares: Squares,
}

impl OpDef for ReluBackwardBnReduce {
    const NAME: &'static str = "relu_backward_bn_reduce";
    const CLASS: OpClass = OpClass::Norm;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 5)?;
        expect_type(
            inputs[1],
            inputs[0],
            "ReLU output (must match the gradient)",
        )?;
        let c = check_backward_inputs(&[inputs[0], inputs[2], inputs[3], inputs[4]])?;
        let mut types = vec![inputs[0].clone()];
        types.extend(param_grad_types(c, self.squares));
        Ok(types)
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let du = relu_mask(inputs[0].float(), inputs[1].float());
        let (y, mean, var) = (
            inputs[2].float(),
            &inputs[3].float().data,
            &inputs[4].float().data,
        );
        let mut outputs = param_grads_with_squares(&du, y, mean, var, self.eps, self.squares);
        outputs.insert(0, Value::Float(du));
        Ok(outputs)
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        (6 + 3 * self.squares.extra_outputs() as u64) * inputs[0].numel() as u64
    }
}
