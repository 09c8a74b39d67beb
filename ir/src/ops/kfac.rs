//! K-FAC noise (supplement A.6; `crate::kfac` holds the math and its f64 reference): the
//! Kronecker factors of a convolution's or linear layer's Fisher block over one batch, and the
//! noise vector their Cholesky factors shape.
//!
//! * [`KfacInputFactor`]: `Ā = E_{n,t}[a aᵀ]` over the layer's input patches `a` (a constant 1
//!   appended where the layer has a bias);
//! * [`KfacGradFactor`]: `Ḡ = E_{n,t}[g gᵀ]` over its per-example output gradients `g = M·dy`;
//! * [`KfacNoise`]: `e = √T · L_G Ξ L_Aᵀ` from the damped factors' Cholesky factors, the weight's
//!   part and the bias's, `Ξ` from each parameter's own Philox stream; the update scales it by s.
//!
//! The factors are the costly part (a product over the whole batch, `D²` wide), and the step
//! needs them only every few steps: both take a `refresh` scalar and give zeros, without the
//! product, where it is 0.

use serde::{Deserialize, Serialize};

use super::{OpClass, OpDef, Rounding, expect_arity, expect_type, float_out, flop_product};
use crate::cpu::{ConvGeom, sum_over_batch};
use crate::error::OpError;
use crate::kfac;
use crate::matmul::{Mat, matmul};
use crate::tensor::{DType, Real, Tensor, TensorType, Value};

/// `Ā` of a convolution (`kernel`, `stride`, `padding`; input `[N, C, H, W]`) or of a linear
/// layer (input `[N, I]`: a 1×1 kernel over one position), `D × D` with `D = C·kh·kw (+ 1)`.
/// Inputs: x, refresh (f32 scalar).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KfacInputFactor {
    pub kernel: (usize, usize),
    pub stride: usize,
    pub padding: usize,
    pub bias: bool,
}

impl KfacInputFactor {
    /// The factor of a linear layer.
    pub fn linear(bias: bool) -> KfacInputFactor {
        KfacInputFactor {
            kernel: (1, 1),
            stride: 1,
            padding: 0,
            bias,
        }
    }

    /// The layer's geometry over input shape `x` (a linear layer's as a 1×1 convolution).
    pub fn geometry(&self, x: &[usize]) -> Result<ConvGeom, OpError> {
        let image = match *x {
            [n, c] => [n, c, 1, 1],
            [n, c, h, w] => [n, c, h, w],
            _ => {
                return Err(format!(
                    "x: expected a rank-2 or rank-4 tensor, found rank {}",
                    x.len()
                )
                .into());
            }
        };
        super::conv::geometry(&image, self.kernel, self.stride, self.padding)
    }

    /// The factor's side: the patch length, plus the bias's 1.
    pub fn side(&self, g: &ConvGeom) -> usize {
        g.patch_len() + self.bias as usize
    }

    /// `Σ a aᵀ` over examples and positions: each example's patches as the rows of a
    /// `side × positions` matrix (the bias's 1s last), times its transpose.
    fn patch_sums<T: Real>(&self, x: &[T], batch: usize, g: &ConvGeom) -> Vec<T> {
        let (side, positions) = (self.side(g), g.positions());
        sum_over_batch(batch, side * side, side * positions, |n, acc, patches| {
            let example = &x[n * g.input_len()..][..g.input_len()];
            g.im2col(example, &mut patches[..g.patch_len() * positions]);
            patches[g.patch_len() * positions..].fill(T::one());
            let p = Mat::new(&patches[..], side, positions);
            matmul(p, p.t(), acc, true, false);
        })
    }

    /// `Σ a aᵀ` of a layer with one position per example (a linear layer): the batch's inputs
    /// `[N, inputs]`, with a column of 1s for the bias, transposed times themselves.
    fn one_position_sums<T: Real>(&self, x: &[T], batch: usize, inputs: usize) -> Vec<T> {
        let side = inputs + self.bias as usize;
        let rows: Vec<T> = (0..batch)
            .flat_map(|n| {
                let row = x[n * inputs..][..inputs].iter().copied();
                row.chain(self.bias.then(T::one))
            })
            .collect();
        let a = Mat::new(&rows, batch, side);
        let mut sums = vec![T::zero(); side * side];
        matmul(a.t(), a, &mut sums, false, true);
        sums
    }
}

impl OpDef for KfacInputFactor {
    const NAME: &'static str = "kfac_input_factor";
    const CLASS: OpClass = OpClass::Kfac;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 2)?;
        if inputs[0].dtype != DType::F32 {
            return Err(format!("x: expected an f32 tensor, found {}", inputs[0]).into());
        }
        expect_type(inputs[1], &TensorType::f32(&[]), "refresh")?;
        let side = self.side(&self.geometry(&inputs[0].shape)?);
        Ok(vec![TensorType::f32(&[side, side])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let x = inputs[0].float();
        let g = self.geometry(&x.shape)?;
        let mut factor = Tensor::zeros(&out[0].shape);
        if refreshes(inputs[1]) {
            let (batch, positions) = (x.shape[0], g.positions());
            let sums = if positions == 1 && g.is_pointwise() {
                self.one_position_sums(&x.data, batch, g.patch_len())
            } else {
                self.patch_sums(&x.data, batch, &g)
            };
            factor.data = mean_of(sums, batch * positions);
        }
        Ok(float_out(factor))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        let g = self.geometry(&inputs[0].shape).expect("typed graph");
        let side = self.side(&g);
        flop_product(&[2, side, side, inputs[0].shape[0], g.positions()])
    }
}

/// `Ḡ` of a layer from the mean loss's gradient at its output, `dy` (`[N, O, Ho, Wo]` or
/// `[N, O]`): `(1/(N·T)) Σ_{n,t} (N·dy)(N·dy)ᵀ`, `O × O`. Inputs: dy, refresh (f32 scalar).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KfacGradFactor;

/// (batch, channels, positions) of an output gradient `[N, O, …]`.
fn output_dims(dy: &[usize]) -> (usize, usize, usize) {
    (dy[0], dy[1], dy[2..].iter().product())
}

impl KfacGradFactor {
    /// What each `Σ dy dyᵀ` is multiplied by: `N² / (N·T)`.
    pub fn scale(batch: usize, positions: usize) -> f64 {
        batch as f64 / positions as f64
    }
}

impl OpDef for KfacGradFactor {
    const NAME: &'static str = "kfac_grad_factor";
    const CLASS: OpClass = OpClass::Kfac;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 2)?;
        let dy = inputs[0];
        if dy.dtype != DType::F32 || !matches!(dy.rank(), 2 | 4) {
            return Err(format!("dy: expected an f32 tensor of rank 2 or 4, found {dy}").into());
        }
        expect_type(inputs[1], &TensorType::f32(&[]), "refresh")?;
        let o = dy.shape[1];
        Ok(vec![TensorType::f32(&[o, o])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let dy = inputs[0].float();
        let mut factor = Tensor::zeros(&out[0].shape);
        if refreshes(inputs[1]) {
            let (batch, o, positions) = output_dims(&dy.shape);
            let sums = if positions == 1 {
                let d = Mat::new(&dy.data, batch, o);
                let mut sums = vec![T::zero(); o * o];
                matmul(d.t(), d, &mut sums, false, true);
                sums
            } else {
                sum_over_batch(batch, o * o, 0, |n, acc, _| {
                    let d = Mat::new(&dy.data[n * o * positions..][..o * positions], o, positions);
                    matmul(d, d.t(), acc, true, false);
                })
            };
            let scale = T::from_f64(Self::scale(batch, positions));
            factor.data = sums.into_iter().map(|v| v * scale).collect();
        }
        Ok(float_out(factor))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        let (batch, o, positions) = output_dims(&inputs[0].shape);
        flop_product(&[2, o, o, batch, positions])
    }
}

/// Whether a factor's `refresh` input asks for the product (any value but 0).
fn refreshes<T: Real>(refresh: &Value<T>) -> bool {
    refresh.float().data[0] != T::zero()
}

/// `sums / count`.
fn mean_of<T: Real>(sums: Vec<T>, count: usize) -> Vec<T> {
    let count = T::from_usize(count);
    sums.into_iter().map(|v| v / count).collect()
}

/// The noise vector `e = √T · L_G Ξ L_Aᵀ` of a layer's `O × D` weight (its bias, if any, the
/// last of D's columns): `Ξ`'s weight columns are the weight parameter's Philox stream
/// (`weight`), its bias column the bias's (`bias`), both at (seed, step), so the draw is the
/// diagonal noise's ([`kfac::draw_xi`]). Inputs: L_A `[D, D]`, L_G `[O, O]` (lower
/// triangular), seed, step; outputs: the weight's part (`weight_shape`) and the bias's `[O]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KfacNoise {
    pub weight: u32,
    pub bias: Option<u32>,
    pub positions: usize,
    pub weight_shape: Vec<usize>,
}

impl KfacNoise {
    /// (O, D): the weight's rows, and its columns with the bias's.
    pub fn dims(&self) -> (usize, usize) {
        let rows = self.weight_shape[0];
        let cols = self.weight_shape[1..].iter().product::<usize>() + self.bias.is_some() as usize;
        (rows, cols)
    }

    /// `√T`, the factor of every element.
    pub fn factor(&self) -> f64 {
        (self.positions as f64).sqrt()
    }
}

impl OpDef for KfacNoise {
    const NAME: &'static str = "kfac_noise";
    const CLASS: OpClass = OpClass::Kfac;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 4)?;
        let (rows, cols) = self.dims();
        expect_type(inputs[0], &TensorType::f32(&[cols, cols]), "L_A")?;
        expect_type(inputs[1], &TensorType::f32(&[rows, rows]), "L_G")?;
        expect_type(inputs[2], &TensorType::scalar(DType::U64), "seed")?;
        expect_type(inputs[3], &TensorType::scalar(DType::U64), "step")?;
        let mut outputs = vec![TensorType::f32(&self.weight_shape)];
        if self.bias.is_some() {
            outputs.push(TensorType::f32(&[rows]));
        }
        Ok(outputs)
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (l_a, l_g) = (inputs[0].float(), inputs[1].float());
        let (seed, step) = (inputs[2].word(), inputs[3].word());
        let (rows, cols) = self.dims();
        let xi = kfac::draw_xi::<T>((seed, step), (self.weight, self.bias), (rows, cols));
        // L_G Ξ, then (L_G Ξ) L_Aᵀ
        let mut left = vec![T::zero(); rows * cols];
        let l_g = Mat::new(&l_g.data, rows, rows);
        matmul(l_g, Mat::new(&xi, rows, cols), &mut left, false, true);
        let mut e = vec![T::zero(); rows * cols];
        let l_a = Mat::new(&l_a.data, cols, cols);
        matmul(Mat::new(&left, rows, cols), l_a.t(), &mut e, false, true);
        let factor = T::from_f64(self.factor());
        let weight_cols = cols - self.bias.is_some() as usize;
        let part = |range: std::ops::Range<usize>| -> Vec<T> {
            let each = (0..rows).flat_map(|i| e[i * cols..][range.clone()].to_vec());
            each.map(|v| v * factor).collect()
        };
        let mut outputs = vec![Value::Float(Tensor::from_vec(
            &self.weight_shape,
            part(0..weight_cols),
        ))];
        if self.bias.is_some() {
            let bias = Tensor::from_vec(&[rows], part(weight_cols..cols));
            outputs.push(Value::Float(bias));
        }
        Ok(outputs)
    }

    fn flops(&self, _: &[&TensorType], _: &[TensorType]) -> u64 {
        let (rows, cols) = self.dims();
        flop_product(&[2, rows, cols, rows + cols])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kfac::{Factors, Matrix, shape_noise};
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(shape: &[usize], rng: &mut ChaCha8Rng) -> Tensor<f64> {
        let n = shape.iter().product();
        Tensor::from_vec(shape, (0..n).map(|_| rng.random_range(-1.0..1.0)).collect())
    }

    fn scalar(v: f64) -> Value<f64> {
        Value::Float(Tensor::scalar(v))
    }

    fn run<O: OpDef>(op: &O, inputs: &[Value<f64>]) -> Vec<Tensor<f64>> {
        let refs: Vec<&Value<f64>> = inputs.iter().collect();
        let types: Vec<TensorType> = inputs
            .iter()
            .map(|v| TensorType {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
            })
            .collect();
        let type_refs: Vec<&TensorType> = types.iter().collect();
        let out = op.infer(&type_refs).unwrap();
        let values = op.eval(&refs, &out).unwrap();
        values.into_iter().map(|v| v.float().clone()).collect()
    }

    fn assert_near(what: &str, got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}");
        let scale = want.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-12 * scale, "{what}[{i}]: {g} vs {w}");
        }
    }

    /// The ops' factors are the reference's (`crate::kfac::Factors`, one outer product per
    /// example and position) for strided, padded convolutions and linear layers, with and
    /// without a bias; a step that does not refresh gets zeros.
    #[test]
    fn factors_are_the_references() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let convs = [
            ((3, 3), 1, 1, false),
            ((3, 3), 2, 1, true),
            ((2, 1), 1, 0, true),
        ];
        for (kernel, stride, padding, bias) in convs {
            let op = KfacInputFactor {
                kernel,
                stride,
                padding,
                bias,
            };
            let x = random(&[3, 2, 5, 6], &mut rng);
            let g = op.geometry(&x.shape).unwrap();
            let dy = random(&[3, 4, g.out_h, g.out_w], &mut rng);
            let want = Factors::conv(g, &x.data, &dy.data, bias).unwrap();
            let a = run(&op, &[Value::Float(x.clone()), scalar(1.0)]);
            let gf = run(&KfacGradFactor, &[Value::Float(dy.clone()), scalar(1.0)]);
            assert_near("Ā", &a[0].data, &want.a.data);
            assert_near("Ḡ", &gf[0].data, &want.g.data);
            let idle = run(&op, &[Value::Float(x), scalar(0.0)]);
            assert!(idle[0].data.iter().all(|&v| v == 0.0));
            let idle = run(&KfacGradFactor, &[Value::Float(dy), scalar(0.0)]);
            assert!(idle[0].data.iter().all(|&v| v == 0.0));
        }
        for bias in [false, true] {
            let (x, dy) = (random(&[5, 7], &mut rng), random(&[5, 3], &mut rng));
            let want = Factors::linear(7, &x.data, &dy.data, bias).unwrap();
            let a = run(
                &KfacInputFactor::linear(bias),
                &[Value::Float(x), scalar(1.0)],
            );
            let gf = run(&KfacGradFactor, &[Value::Float(dy), scalar(1.0)]);
            assert_near("linear Ā", &a[0].data, &want.a.data);
            assert_near("linear Ḡ", &gf[0].data, &want.g.data);
        }
    }

    /// The op's noise is the reference's `shape_noise` of the same Philox draw (s = 1), split
    /// into the weight's and the bias's parts.
    #[test]
    fn noise_is_the_references() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for bias in [None, Some(6)] {
            let op = KfacNoise {
                weight: 5,
                bias,
                positions: 9,
                weight_shape: vec![3, 2, 2, 2],
            };
            let (rows, cols) = op.dims();
            let lower = |n: usize, rng: &mut ChaCha8Rng| {
                let mut m = random(&[n, n], rng);
                for i in 0..n {
                    m.data[i * n + i] = 1.0 + m.data[i * n + i].abs();
                    m.data[i * n + i + 1..(i + 1) * n].fill(0.0);
                }
                m
            };
            let (l_a, l_g) = (lower(cols, &mut rng), lower(rows, &mut rng));
            let inputs = [
                Value::Float(l_a.clone()),
                Value::Float(l_g.clone()),
                Value::Word(21),
                Value::Word(8),
            ];
            let got = run(&op, &inputs);
            let xi = kfac::draw_xi::<f64>((21, 8), (5, bias), (rows, cols));
            let as_matrix = |t: &Tensor<f64>| Matrix {
                n: t.shape[0],
                data: t.data.clone(),
            };
            let want = shape_noise((&as_matrix(&l_g), &as_matrix(&l_a)), &xi, 9, 1.0).unwrap();
            let weight_cols = cols - bias.is_some() as usize;
            let weight: Vec<f64> = (0..rows)
                .flat_map(|i| want[i * cols..][..weight_cols].to_vec())
                .collect();
            assert_near("weight noise", &got[0].data, &weight);
            if bias.is_some() {
                let b: Vec<f64> = (0..rows).map(|i| want[i * cols + cols - 1]).collect();
                assert_near("bias noise", &got[1].data, &b);
            }
        }
    }
}
