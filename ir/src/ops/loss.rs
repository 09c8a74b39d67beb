//! Softmax cross-entropy, averaged over the batch, and its backward.

use super::{OpDef, VjpCtx, expect_arity, expect_rank, float_out};
use crate::error::ShapeError;
use crate::graph::PortRef;
use crate::tensor::{DType, Real, Tensor, TensorType, Value};
use serde::{Deserialize, Serialize};

/// Checks logits `[N, K]` and labels `[N]` (i32).
fn check_logits_labels(logits: &TensorType, labels: &TensorType) -> Result<(), String> {
    expect_rank(logits, 2, "logits")?;
    let expected = TensorType::i32(&logits.shape[..1]);
    if labels != &expected {
        return Err(format!("labels: expected {expected}, found {labels}"));
    }
    Ok(())
}

/// Per-example softmax probabilities, after checking every label is a valid class.
fn softmax_checked<T: Real>(logits: &Tensor<T>, labels: &Tensor<i32>) -> Result<Vec<T>, String> {
    let classes = logits.shape[1];
    for (n, &y) in labels.data.iter().enumerate() {
        if y < 0 || y as usize >= classes {
            return Err(format!(
                "label {y} of example {n} is outside [0, {classes})"
            ));
        }
    }
    let mut probs = Vec::with_capacity(logits.data.len());
    for row in logits.data.chunks(classes) {
        let max = row.iter().copied().fold(T::neg_infinity(), T::max);
        let exps: Vec<T> = row.iter().map(|&z| (z - max).exp()).collect();
        let total: T = exps.iter().copied().sum();
        probs.extend(exps.into_iter().map(|e| e / total));
    }
    Ok(probs)
}

/// `L = (1/N) Σₙ −log softmax(zₙ)[yₙ]`, a scalar.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SoftmaxCrossEntropy;

impl OpDef for SoftmaxCrossEntropy {
    const NAME: &'static str = "softmax_cross_entropy";

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_arity(inputs, 2)?;
        check_logits_labels(inputs[0], inputs[1])?;
        Ok(vec![TensorType::scalar(DType::F32)])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, String> {
        let (logits, labels) = (inputs[0].float(), inputs[1].int());
        let classes = logits.shape[1];
        softmax_checked(logits, labels)?;
        let mut total = T::zero();
        for (row, &y) in logits.data.chunks(classes).zip(&labels.data) {
            let max = row.iter().copied().fold(T::neg_infinity(), T::max);
            let log_sum: T = row.iter().map(|&z| (z - max).exp()).sum::<T>().ln() + max;
            total = total + log_sum - row[y as usize];
        }
        let batch = T::from_usize(logits.shape[0]);
        Ok(float_out(Tensor::scalar(total / batch)))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        4 * inputs[0].numel() as u64
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        let dloss = cx.dout(Self::NAME, 0)?;
        let (logits, labels) = (cx.inputs[0], cx.inputs[1]);
        let dlogits = cx.add(SoftmaxCrossEntropyBackward, &[logits, labels, dloss])?;
        Ok(vec![Some(dlogits), None])
    }
}

/// `dz = dL · (softmax(z) − onehot(y)) / N` from (logits, labels, dL).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SoftmaxCrossEntropyBackward;

impl OpDef for SoftmaxCrossEntropyBackward {
    const NAME: &'static str = "softmax_cross_entropy_backward";

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_arity(inputs, 3)?;
        check_logits_labels(inputs[0], inputs[1])?;
        if inputs[2] != &TensorType::scalar(DType::F32) {
            return Err(format!(
                "loss gradient: expected an f32 scalar, found {}",
                inputs[2]
            ));
        }
        Ok(vec![inputs[0].clone()])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, String> {
        let (logits, labels) = (inputs[0].float(), inputs[1].int());
        let scale = inputs[2].float_scalar() / T::from_usize(logits.shape[0]);
        let classes = logits.shape[1];
        let mut grad = softmax_checked(logits, labels)?;
        for (row, &y) in grad.chunks_mut(classes).zip(&labels.data) {
            row[y as usize] = row[y as usize] - T::one();
            row.iter_mut().for_each(|g| *g = *g * scale);
        }
        Ok(float_out(Tensor::from_vec(&logits.shape, grad)))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        5 * inputs[0].numel() as u64
    }
}
