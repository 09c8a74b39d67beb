//! Softmax cross-entropy, averaged over the batch, its backward, and the logit gradient that
//! draws full-Fisher noise.

use super::{OpClass, OpDef, Rounding, VjpCtx, expect_arity, expect_rank, float_out};
use crate::error::{OpError, ShapeError};
use crate::philox;
use crate::port::PortRef;
use crate::tensor::{DType, Real, Tensor, TensorType, Value};
use serde::{Deserialize, Serialize};

/// Checks logits `[N, K]` and labels `[N]` (i32).
fn check_logits_labels(logits: &TensorType, labels: &TensorType) -> Result<(), OpError> {
    expect_rank(logits, 2, "logits")?;
    let expected = TensorType::i32(&logits.shape[..1]);
    if labels != &expected {
        return Err(format!("labels: expected {expected}, found {labels}").into());
    }
    Ok(())
}

/// Per-example softmax probabilities, after checking every label is a valid class.
fn softmax_checked<T: Real>(logits: &Tensor<T>, labels: &Tensor<i32>) -> Result<Vec<T>, OpError> {
    let classes = logits.shape[1];
    for (n, &y) in labels.data.iter().enumerate() {
        if y < 0 || y as usize >= classes {
            return Err(format!("label {y} of example {n} is outside [0, {classes})").into());
        }
    }
    let mut probs = Vec::with_capacity(logits.data.len());
    for row in logits.data.chunks(classes) {
        let max = row.iter().copied().fold(T::neg_infinity(), T::max);
        let exps: Vec<T> = row.iter().map(|&z| (z - max).portable_exp()).collect();
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
    const CLASS: OpClass = OpClass::Loss;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 2)?;
        check_logits_labels(inputs[0], inputs[1])?;
        Ok(vec![TensorType::scalar(DType::F32)])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (logits, labels) = (inputs[0].float(), inputs[1].int());
        let classes = logits.shape[1];
        softmax_checked(logits, labels)?;
        let mut total = T::zero();
        for (row, &y) in logits.data.chunks(classes).zip(&labels.data) {
            let max = row.iter().copied().fold(T::neg_infinity(), T::max);
            let log_sum: T = row
                .iter()
                .map(|&z| (z - max).portable_exp())
                .sum::<T>()
                .portable_ln()
                + max;
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
    const CLASS: OpClass = OpClass::Loss;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 3)?;
        check_logits_labels(inputs[0], inputs[1])?;
        if inputs[2] != &TensorType::scalar(DType::F32) {
            return Err(
                format!("loss gradient: expected an f32 scalar, found {}", inputs[2]).into(),
            );
        }
        Ok(vec![inputs[0].clone()])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
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

/// Which Fisher a [`FullFisherSample`] draw has as its covariance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FisherKind {
    /// `(1/N) Σₙ ∇ℓₙ ∇ℓₙᵀ` at the data's labels.
    Empirical,
    /// `E_{ỹ ~ model} ∇ℓ(ỹ) ∇ℓ(ỹ)ᵀ`, averaged over the batch (Martens 2014).
    True,
}

/// The logit gradient of one draw of full-Fisher noise (supplement A.9):
///
/// ```text
/// dzₙ = (wₙ/√N) · (softmax(zₙ) − onehot(ỹₙ))
/// ```
///
/// Back-propagated to the parameters it gives `e = (1/√N) Σₙ wₙ ∇ℓₙ(ỹₙ)`, a random vector with
/// mean 0 whose covariance is the Fisher of `kind`:
/// * empirical: ỹ = y, wₙ = ±1 (Rademacher), so `Cov e = (1/N) Σₙ ∇ℓₙ ∇ℓₙᵀ`;
/// * true: ỹₙ ~ softmax(zₙ) (Gumbel-max: argmaxₖ zₙₖ + Gₙₖ), wₙ = 1; each term has mean 0 and
///   covariance the example's true Fisher.
///
/// The randomness is the [`philox::stream::FULL_FISHER`] at (seed, step): word n gives example n's
/// sign, word n·K + k class k's Gumbel draw for example n. Inputs: logits `[N, K]`, labels
/// `[N]`, seed, step; output `[N, K]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FullFisherSample {
    pub kind: FisherKind,
}

impl FullFisherSample {
    /// `1/√N`, the weights' common factor, as the kernel's immediate holds it.
    pub fn weight(batch: usize) -> f32 {
        (1.0 / (batch as f64).sqrt()) as f32
    }
}

impl OpDef for FullFisherSample {
    const NAME: &'static str = "full_fisher_sample";
    const CLASS: OpClass = OpClass::Loss;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 4)?;
        check_logits_labels(inputs[0], inputs[1])?;
        for (t, what) in [(inputs[2], "seed"), (inputs[3], "step")] {
            if t != &TensorType::scalar(DType::U64) {
                return Err(format!("{what}: expected a u64 scalar, found {t}").into());
            }
        }
        Ok(vec![inputs[0].clone()])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (logits, labels) = (inputs[0].float(), inputs[1].int());
        let (seed, step) = (inputs[2].word(), inputs[3].word());
        let draw = |i: usize| philox::word(seed, step, philox::stream::FULL_FISHER, i as u64);
        let (rows, classes) = (logits.shape[0], logits.shape[1]);
        let weight = T::from_f32(Self::weight(rows));
        let mut grad = softmax_checked(logits, labels)?;
        for n in 0..rows {
            let z = &logits.data[n * classes..(n + 1) * classes];
            let (label, scale) = match self.kind {
                FisherKind::Empirical => {
                    let sign = T::from_f32(philox::rademacher(draw(n)));
                    (labels.data[n] as usize, sign * weight)
                }
                FisherKind::True => {
                    let gumbel = |k: usize| T::from_f32(philox::gumbel(draw(n * classes + k)));
                    (gumbel_argmax(z, gumbel), weight)
                }
            };
            let row = &mut grad[n * classes..(n + 1) * classes];
            row[label] = row[label] - T::one();
            row.iter_mut().for_each(|g| *g = *g * scale);
        }
        Ok(float_out(Tensor::from_vec(&logits.shape, grad)))
    }

    /// The backward's 5 per logit; a true-Fisher draw adds Philox and two logarithms (~40).
    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        let per_logit = 5 + 40 * (self.kind == FisherKind::True) as u64;
        per_logit * inputs[0].numel() as u64
    }
}

/// The first k maximising `z[k] + gumbel(k)`: a draw from softmax(z).
fn gumbel_argmax<T: Real>(z: &[T], gumbel: impl Fn(usize) -> T) -> usize {
    let mut best = (0, T::neg_infinity());
    for (k, &zk) in z.iter().enumerate() {
        let v = zk + gumbel(k);
        if v > best.1 {
            best = (k, v);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rows` copies of one row of logits, all labelled `label`, through one draw.
    fn sample(kind: FisherKind, row: &[f64], rows: usize, label: i32) -> Vec<Vec<f64>> {
        let classes = row.len();
        let logits = Tensor::from_vec(&[rows, classes], row.repeat(rows));
        let labels = Tensor::from_vec(&[rows], vec![label; rows]);
        let inputs = [
            Value::Float(logits),
            Value::Int(labels),
            Value::Word(7),
            Value::Word(2),
        ];
        let refs: Vec<&Value<f64>> = inputs.iter().collect();
        let out = FullFisherSample { kind }.eval(&refs, &[]).unwrap();
        let data = out[0].float().data.clone();
        data.chunks(classes).map(<[f64]>::to_vec).collect()
    }

    fn softmax(z: &[f64]) -> Vec<f64> {
        let total: f64 = z.iter().map(|v| v.exp()).sum();
        z.iter().map(|v| v.exp() / total).collect()
    }

    #[test]
    fn true_fisher_labels_follow_the_predictive_distribution() {
        let (z, rows) = ([0.5, 1.5, -1.0, 0.0], 40_000);
        let p = softmax(&z);
        let mut counts = [0usize; 4];
        let weight = FullFisherSample::weight(rows) as f64;
        for g in sample(FisherKind::True, &z, rows, 0) {
            // the drawn label is the one entry below zero: weight·(p − 1)
            let label = (0..4).find(|&k| g[k] < 0.0).unwrap();
            counts[label] += 1;
            assert!((g[label] - weight * (p[label] - 1.0)).abs() < 1e-12);
        }
        for k in 0..4 {
            let expected = p[k] * rows as f64;
            let sd = (expected * (1.0 - p[k])).sqrt();
            let got = counts[k] as f64;
            assert!(
                (got - expected).abs() < 4.0 * sd,
                "class {k}: drawn {got} times, expected {expected:.0} ± {sd:.0}"
            );
        }
    }

    #[test]
    fn empirical_fisher_signs_are_rademacher_at_the_data_label() {
        let (z, rows) = ([0.5, 1.5, -1.0], 20_000);
        let p = softmax(&z);
        let weight = FullFisherSample::weight(rows) as f64;
        let mut positive = 0usize;
        for g in sample(FisherKind::Empirical, &z, rows, 2) {
            let sign = if g[2] < 0.0 { 1.0 } else { -1.0 };
            positive += (sign > 0.0) as usize;
            for k in 0..3 {
                let onehot = (k == 2) as usize as f64;
                assert!((g[k] - sign * weight * (p[k] - onehot)).abs() < 1e-12);
            }
        }
        let sd = (rows as f64 / 4.0).sqrt();
        assert!(
            (positive as f64 - rows as f64 / 2.0).abs() < 4.0 * sd,
            "{positive} positive"
        );
    }
}
