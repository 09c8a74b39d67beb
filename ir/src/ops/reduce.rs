//! Reductions: per-channel sums (bias gradients, with and without the batch axis) and the mean
//! over the batch axis (the Fisher's average of squares).

use super::{OpClass, OpDef, Rounding, expect_arity, float_out, shape_str};
use crate::error::OpError;
use crate::tensor::{DType, Real, Tensor, TensorType, Value};
use serde::{Deserialize, Serialize};

/// Checks a `[N, C, ...]` float tensor and returns (N, C, elements per channel per example).
fn batch_channel_layout(t: &TensorType) -> Result<(usize, usize, usize), OpError> {
    if t.dtype != DType::F32 || t.rank() < 2 {
        return Err(format!("input: expected an f32 tensor [N, C, ...], found {t}").into());
    }
    Ok((t.shape[0], t.shape[1], t.shape[2..].iter().product()))
}

/// Per-channel sum over the batch and all positions: `[N, C, ...] → [C]` (bias gradients).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChannelSum;

impl OpDef for ChannelSum {
    const NAME: &'static str = "channel_sum";
    const CLASS: OpClass = OpClass::Reduce;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 1)?;
        let (_, c, _) = batch_channel_layout(inputs[0])?;
        Ok(vec![TensorType::f32(&[c])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let x = inputs[0].float();
        let per_example = channel_sums_per_example(x);
        let c = x.shape[1];
        let mut sums = vec![T::zero(); c];
        for row in per_example.chunks(c.max(1)) {
            sums.iter_mut().zip(row).for_each(|(s, &v)| *s = *s + v);
        }
        Ok(float_out(Tensor::from_vec(&[c], sums)))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        inputs[0].numel() as u64
    }
}

/// `[N, C, ...] → [N, C]`, summing each example's positions.
fn channel_sums_per_example<T: Real>(x: &Tensor<T>) -> Vec<T> {
    let positions: usize = x.shape[2..].iter().product();
    x.data
        .chunks(positions.max(1))
        .map(|row| row.iter().copied().sum())
        .collect()
}

/// Per-example, per-channel sums over positions: `[N, C, ...] → [N, C]` (per-example bias
/// gradient contributions).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChannelSumPerExample;

impl OpDef for ChannelSumPerExample {
    const NAME: &'static str = "channel_sum_per_example";
    const CLASS: OpClass = OpClass::Reduce;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 1)?;
        let (n, c, _) = batch_channel_layout(inputs[0])?;
        Ok(vec![TensorType::f32(&[n, c])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let sums = channel_sums_per_example(inputs[0].float());
        Ok(float_out(Tensor::from_vec(&out[0].shape, sums)))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        inputs[0].numel() as u64
    }
}

/// Mean over the batch axis: `[N, ...] → [...]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BatchMean;

impl OpDef for BatchMean {
    const NAME: &'static str = "batch_mean";
    const CLASS: OpClass = OpClass::Elementwise;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 1)?;
        let t = inputs[0];
        if t.dtype != DType::F32 || t.rank() < 1 || t.shape[0] == 0 {
            return Err(format!(
                "input: expected an f32 tensor with a batch axis, found {t} ({})",
                shape_str(&t.shape)
            )
            .into());
        }
        Ok(vec![TensorType::f32(&t.shape[1..])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let x = inputs[0].float();
        let len = out[0].numel();
        let mut mean = vec![T::zero(); len];
        for row in x.data.chunks(len.max(1)) {
            mean.iter_mut().zip(row).for_each(|(m, &v)| *m = *m + v);
        }
        let inv = T::one() / T::from_usize(x.shape[0]);
        mean.iter_mut().for_each(|m| *m = *m * inv);
        Ok(float_out(Tensor::from_vec(&out[0].shape, mean)))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        inputs[0].numel() as u64
    }
}
