//! Batch normalisation over axis 1 of `[N, C, ...]` tensors.
//!
//! Training mode ([`BatchNorm`]) normalises with the batch statistics and also outputs them
//! (mean and biased variance per channel) for the backward ops and the running-statistics
//! update; evaluation mode ([`BnApply`]) normalises with given statistics. The backward splits
//! into the per-channel reductions (which *are* dγ and dβ) and the data gradient, the shape
//! cuDNN-style fusions later work with. x̂ = (x − mean)·invstd throughout, invstd = 1/√(var + ε).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::fisher::{a2g2_mean, exact_from_contributions, per_example_upstream};
use super::{
    FisherCtx, FloatAttr, OpClass, OpDef, Rounding, VjpCtx, expect_arity, expect_type, float_out,
};
use crate::error::{OpError, ShapeError};
use crate::noise::FisherMode;
use crate::port::PortRef;
use crate::tensor::{DType, Real, Tensor, TensorType, Value};

/// `[N, C, positions...]` viewed as N·C planes of `positions` elements.
#[derive(Clone, Copy)]
pub(super) struct Planes {
    pub(super) batch: usize,
    pub(super) channels: usize,
    pub(super) positions: usize,
}

impl Planes {
    pub(super) fn of(shape: &[usize]) -> Self {
        Planes {
            batch: shape[0],
            channels: shape[1],
            positions: shape[2..].iter().product(),
        }
    }

    /// Elements per channel over the whole batch.
    fn count(&self) -> usize {
        self.batch * self.positions
    }

    /// The positions of example `n`, channel `c`.
    pub(super) fn plane<'a, T>(&self, data: &'a [T], n: usize, c: usize) -> &'a [T] {
        &data[(n * self.channels + c) * self.positions..][..self.positions]
    }

    /// `f(c)` for every channel, in parallel.
    fn per_channel<T: Send>(&self, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
        (0..self.channels).into_par_iter().map(f).collect()
    }

    /// Fills `out` (same layout as the input) plane by plane: `f(n, c, plane_out)`.
    pub(super) fn fill<T: Real>(
        &self,
        out: &mut [T],
        f: impl Fn(usize, usize, &mut [T]) + Sync + Send,
    ) {
        out.par_chunks_mut(self.positions.max(1))
            .enumerate()
            .for_each(|(i, plane)| f(i / self.channels, i % self.channels, plane));
    }
}

/// Checks x `[N, C, ...]` and that each following input is a `[C]` vector.
pub(super) fn check_channel_inputs(
    inputs: &[&TensorType],
    names: &[&str],
) -> Result<usize, OpError> {
    let x = inputs[0];
    if x.dtype != DType::F32 || x.rank() < 2 {
        return Err(format!("input: expected an f32 tensor [N, C, ...], found {x}").into());
    }
    let c = x.shape[1];
    let vector = TensorType::f32(&[c]);
    for (t, name) in inputs[1..].iter().zip(names) {
        expect_type(t, &vector, name)?;
    }
    Ok(c)
}

pub(super) fn inv_std<T: Real>(var: T, eps: FloatAttr) -> T {
    T::one() / (var + T::from_f64(eps.0)).sqrt()
}

/// Per-channel mean and biased variance (two passes, for accuracy).
pub(super) fn batch_stats<T: Real>(x: &Tensor<T>) -> (Vec<T>, Vec<T>) {
    let p = Planes::of(&x.shape);
    let count = T::from_usize(p.count());
    let stats = p.per_channel(|c| {
        let planes = || (0..p.batch).map(|n| p.plane(&x.data, n, c));
        let mean = planes().flat_map(|s| s.iter().copied()).sum::<T>() / count;
        let var = planes()
            .flat_map(|s| s.iter().map(|&v| (v - mean) * (v - mean)))
            .sum::<T>()
            / count;
        (mean, var)
    });
    stats.into_iter().unzip()
}

/// `y = γ·x̂ + β` with the given per-channel statistics.
pub(super) fn normalise<T: Real>(
    x: &Tensor<T>,
    mean: &[T],
    var: &[T],
    gamma: &[T],
    beta: &[T],
    eps: FloatAttr,
) -> Tensor<T> {
    let p = Planes::of(&x.shape);
    let mut y = Tensor::zeros(&x.shape);
    p.fill(&mut y.data, |n, c, out| {
        let (scale, mean) = (gamma[c] * inv_std(var[c], eps), mean[c]);
        for (o, &v) in out.iter_mut().zip(p.plane(&x.data, n, c)) {
            *o = (v - mean) * scale + beta[c];
        }
    });
    y
}

/// Training-mode batch norm: (x, γ, β) → (y, batch mean, batch variance).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BatchNorm {
    pub eps: FloatAttr,
}

impl OpDef for BatchNorm {
    const NAME: &'static str = "batch_norm";
    const CLASS: OpClass = OpClass::Norm;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 3)?;
        let c = check_channel_inputs(inputs, &["gamma", "beta"])?;
        let stats = TensorType::f32(&[c]);
        Ok(vec![inputs[0].clone(), stats.clone(), stats])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let x = inputs[0].float();
        let (gamma, beta) = (&inputs[1].float().data, &inputs[2].float().data);
        let (mean, var) = batch_stats(x);
        let y = normalise(x, &mean, &var, gamma, beta, self.eps);
        let c = mean.len();
        Ok(vec![
            Value::Float(y),
            Value::Float(Tensor::from_vec(&[c], mean)),
            Value::Float(Tensor::from_vec(&[c], var)),
        ])
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        // two statistics passes (add; subtract, multiply, add) and the affine map (subtract,
        // multiply, add)
        7 * inputs[0].numel() as u64
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        if cx.douts[1].is_some() || cx.douts[2].is_some() {
            return Err(cx.error(
                Self::NAME,
                "the batch statistics outputs are not differentiable".to_string(),
            ));
        }
        let dy = cx.dout(Self::NAME, 0)?;
        let [x, gamma, _] = cx.inputs[..] else {
            unreachable!("arity checked")
        };
        let (mean, var) = (cx.outputs[1], cx.outputs[2]);
        let reduced = cx.add_multi(BnBackwardReduce { eps: self.eps }, &[dy, x, mean, var])?;
        let (dgamma, dbeta) = (reduced[0], reduced[1]);
        let dx = if cx.wants[0] {
            let data = BnBackwardData { eps: self.eps };
            Some(cx.add(data, &[dy, x, mean, var, gamma, dgamma, dbeta])?)
        } else {
            None
        };
        Ok(vec![dx, Some(dgamma), Some(dbeta)])
    }

    /// γ's contribution from example n is Σₜ dy·x̂, β's is Σₜ dy (see `fisher.rs`).
    fn fisher(&self, cx: &mut FisherCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        let dy = cx.vjp.dout(Self::NAME, 0)?;
        let x = cx.vjp.inputs[0];
        let (mean, var) = (cx.vjp.outputs[1], cx.vjp.outputs[2]);
        let (gamma, beta) = match cx.mode {
            FisherMode::Exact => {
                let op = BnParamGradsPerExample { eps: self.eps };
                let contributions = cx.vjp.add_multi(op, &[dy, x, mean, var])?;
                (
                    exact_from_contributions(cx, contributions[0])?,
                    exact_from_contributions(cx, contributions[1])?,
                )
            }
            _ => {
                let upstream = per_example_upstream(cx, dy)?;
                let op = BnParamGradsSq { eps: self.eps };
                let sums = cx.vjp.add_multi(op, &[upstream, x, mean, var])?;
                (a2g2_mean(cx, sums[0])?, a2g2_mean(cx, sums[1])?)
            }
        };
        Ok(vec![None, Some(gamma), Some(beta)])
    }
}

/// Evaluation-mode batch norm: (x, mean, var, γ, β) → y, with given (running) statistics.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BnApply {
    pub eps: FloatAttr,
}

impl OpDef for BnApply {
    const NAME: &'static str = "bn_apply";
    const CLASS: OpClass = OpClass::Norm;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 5)?;
        check_channel_inputs(inputs, &["mean", "variance", "gamma", "beta"])?;
        Ok(vec![inputs[0].clone()])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let [x, mean, var, gamma, beta] = inputs else {
            unreachable!("arity checked")
        };
        let y = normalise(
            x.float(),
            &mean.float().data,
            &var.float().data,
            &gamma.float().data,
            &beta.float().data,
            self.eps,
        );
        Ok(float_out(y))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        3 * inputs[0].numel() as u64
    }
}

/// Running statistics after a training step (PyTorch's convention: the running variance
/// tracks the unbiased batch variance): (running mean, running var, mean, var) → new pair.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BnRunningUpdate {
    pub momentum: FloatAttr,
    /// Elements per channel in the batch (N·H·W), for the unbiased correction.
    pub count: usize,
}

impl OpDef for BnRunningUpdate {
    const NAME: &'static str = "bn_running_update";
    const CLASS: OpClass = OpClass::Norm;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 4)?;
        expect_type(
            inputs[0],
            &TensorType::f32(&inputs[0].shape),
            "running mean",
        )?;
        if inputs[0].rank() != 1 {
            return Err(format!("running mean: expected [C], found {}", inputs[0]).into());
        }
        for (t, name) in inputs[1..]
            .iter()
            .zip(["running variance", "mean", "variance"])
        {
            expect_type(t, inputs[0], name)?;
        }
        Ok(vec![inputs[0].clone(), inputs[0].clone()])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let [run_mean, run_var, mean, var] = inputs else {
            unreachable!("arity checked")
        };
        let m = T::from_f64(self.momentum.0);
        let keep = T::one() - m;
        let unbias = T::from_usize(self.count) / T::from_usize(self.count.max(2) - 1);
        let blend = |old: &Tensor<T>, new: &Tensor<T>, factor: T| {
            let data = old
                .data
                .iter()
                .zip(&new.data)
                .map(|(&o, &b)| keep * o + m * (b * factor));
            Tensor::from_vec(&old.shape, data.collect())
        };
        Ok(vec![
            Value::Float(blend(run_mean.float(), mean.float(), T::one())),
            Value::Float(blend(run_var.float(), var.float(), unbias)),
        ])
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        7 * inputs[0].numel() as u64
    }

    /// The new running statistics replace the old.
    fn in_place(&self, output: usize) -> Option<usize> {
        (output < 2).then_some(output)
    }
}

/// Checks (dy, x, mean, var) with dy and x of one shape.
pub(super) fn check_backward_inputs(inputs: &[&TensorType]) -> Result<usize, OpError> {
    expect_type(
        inputs[0],
        inputs[1],
        "output gradient (must match the input)",
    )?;
    check_channel_inputs(&inputs[1..4], &["mean", "variance"])
}

/// The normalised activation x̂ of one element, from the saved statistics.
fn xhat<T: Real>(v: T, mean: T, inv: T) -> T {
    (v - mean) * inv
}

/// For every (example, channel) plane, `Σₜ f(dy, x̂)` over its positions, where `f` gives a
/// pair: the reductions behind dγ and dβ, per example or (summed) per channel.
pub(super) fn plane_sums<T: Real>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    mean: &[T],
    var: &[T],
    eps: FloatAttr,
    f: impl Fn(T, T) -> (T, T) + Sync,
) -> (Planes, Vec<(T, T)>) {
    let p = Planes::of(&x.shape);
    let sums = (0..p.batch * p.channels)
        .into_par_iter()
        .map(|i| {
            let (n, c) = (i / p.channels, i % p.channels);
            let inv = inv_std(var[c], eps);
            let pairs = p.plane(&dy.data, n, c).iter().zip(p.plane(&x.data, n, c));
            pairs.fold((T::zero(), T::zero()), |(a, b), (&g, &v)| {
                let (da, db) = f(g, xhat(v, mean[c], inv));
                (a + da, b + db)
            })
        })
        .collect();
    (p, sums)
}

/// The four inputs (dy, x, mean, var) every backward reduction here takes.
pub(super) fn backward_args<'a, T: Real>(
    inputs: &[&'a Value<T>],
) -> (&'a Tensor<T>, &'a Tensor<T>, &'a [T], &'a [T]) {
    let [dy, x, mean, var] = inputs[..4] else {
        unreachable!("arity checked")
    };
    (dy.float(), x.float(), &mean.float().data, &var.float().data)
}

/// Plane sums added over the batch, in example order: two `[C]` vectors.
pub(super) fn channel_totals<T: Real>(p: Planes, sums: &[(T, T)]) -> Vec<Value<T>> {
    let (mut first, mut second) = (vec![T::zero(); p.channels], vec![T::zero(); p.channels]);
    for (i, &(a, b)) in sums.iter().enumerate() {
        let c = i % p.channels;
        first[c] = first[c] + a;
        second[c] = second[c] + b;
    }
    vec![
        Value::Float(Tensor::from_vec(&[p.channels], first)),
        Value::Float(Tensor::from_vec(&[p.channels], second)),
    ]
}

/// Backward reductions: (dy, x, mean, var) → (Σ dy·x̂, Σ dy) per channel, i.e. (dγ, dβ).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BnBackwardReduce {
    pub eps: FloatAttr,
}

impl OpDef for BnBackwardReduce {
    const NAME: &'static str = "bn_backward_reduce";
    const CLASS: OpClass = OpClass::Norm;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 4)?;
        let c = check_backward_inputs(inputs)?;
        Ok(vec![TensorType::f32(&[c]), TensorType::f32(&[c])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (dy, x, mean, var) = backward_args(inputs);
        let (planes, sums) = plane_sums(dy, x, mean, var, self.eps, |g, xhat| (g * xhat, g));
        Ok(channel_totals(planes, &sums))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        5 * inputs[0].numel() as u64
    }
}

/// Backward data gradient: (dy, x, mean, var, γ, Σdy·x̂, Σdy) →
/// `dx = γ·invstd·(dy − Σdy/m − x̂·Σdy·x̂/m)` with m = N·positions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BnBackwardData {
    pub eps: FloatAttr,
}

impl OpDef for BnBackwardData {
    const NAME: &'static str = "bn_backward_data";
    const CLASS: OpClass = OpClass::Norm;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 7)?;
        check_backward_inputs(&inputs[..4])?;
        check_channel_inputs(
            &[inputs[1], inputs[4], inputs[5], inputs[6]],
            &["gamma", "sum of dy·x̂", "sum of dy"],
        )?;
        Ok(vec![inputs[0].clone()])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let [dy, x, mean, var, gamma, dgamma, dbeta] = inputs else {
            unreachable!("arity checked")
        };
        let (dy, x) = (dy.float(), x.float());
        let (mean, var, gamma) = (&mean.float().data, &var.float().data, &gamma.float().data);
        let (dgamma, dbeta) = (&dgamma.float().data, &dbeta.float().data);
        let p = Planes::of(&x.shape);
        let inv_count = T::one() / T::from_usize(p.count());
        let mut dx = Tensor::zeros(&x.shape);
        p.fill(&mut dx.data, |n, c, out| {
            let inv = inv_std(var[c], self.eps);
            let (mean_dy, mean_dy_xhat) = (dbeta[c] * inv_count, dgamma[c] * inv_count);
            let planes = p.plane(&dy.data, n, c).iter().zip(p.plane(&x.data, n, c));
            for (o, (&g, &v)) in out.iter_mut().zip(planes) {
                *o = gamma[c] * inv * (g - mean_dy - xhat(v, mean[c], inv) * mean_dy_xhat);
            }
        });
        Ok(float_out(dx))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        7 * inputs[0].numel() as u64
    }
}

/// Per-example contributions to (dγ, dβ): (dy, x, mean, var) → ([N, C] Σₜ dy·x̂, [N, C] Σₜ dy).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BnParamGradsPerExample {
    pub eps: FloatAttr,
}

impl OpDef for BnParamGradsPerExample {
    const NAME: &'static str = "bn_param_grads_per_example";
    const CLASS: OpClass = OpClass::Norm;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 4)?;
        check_backward_inputs(inputs)?;
        let per_example = TensorType::f32(&inputs[0].shape[..2]);
        Ok(vec![per_example.clone(), per_example])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (dy, x, mean, var) = backward_args(inputs);
        let (_, sums) = plane_sums(dy, x, mean, var, self.eps, |g, xhat| (g * xhat, g));
        let (gamma, beta): (Vec<T>, Vec<T>) = sums.into_iter().unzip();
        Ok(vec![
            Value::Float(Tensor::from_vec(&out[0].shape, gamma)),
            Value::Float(Tensor::from_vec(&out[1].shape, beta)),
        ])
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        5 * inputs[0].numel() as u64
    }
}

/// The a2g2 sums for (γ, β): (G, x, mean, var) → ([C] Σₙₜ (G·x̂)², [C] Σₙₜ G²).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BnParamGradsSq {
    pub eps: FloatAttr,
}

impl OpDef for BnParamGradsSq {
    const NAME: &'static str = "bn_param_grads_sq";
    const CLASS: OpClass = OpClass::Norm;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 4)?;
        let c = check_backward_inputs(inputs)?;
        Ok(vec![TensorType::f32(&[c]), TensorType::f32(&[c])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (g, x, mean, var) = backward_args(inputs);
        let (planes, sums) = plane_sums(g, x, mean, var, self.eps, |g, xhat| {
            ((g * xhat) * (g * xhat), g * g)
        });
        Ok(channel_totals(planes, &sums))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        7 * inputs[0].numel() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_vectors_must_have_one_entry_per_channel() {
        let bn = BatchNorm {
            eps: FloatAttr(1e-5),
        };
        let x = TensorType::f32(&[2, 4, 3, 3]);
        let gamma = TensorType::f32(&[5]);
        let beta = TensorType::f32(&[4]);
        let err = bn.infer(&[&x, &gamma, &beta]).unwrap_err();
        assert_eq!(err.to_string(), "gamma: expected f32[4], found f32[5]");
    }
}
