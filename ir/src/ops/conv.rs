//! 2-D convolution (NCHW input, OIHW weight) and its backward and Fisher ops: data gradient
//! (dgrad), weight gradient (wgrad), and the per-example weight gradients the exact Fisher
//! squares.

use super::fisher::{a2g2_bias, a2g2_weight, exact_from_contributions};
use super::{
    ChannelSum, ChannelSumPerExample, FisherCtx, OpClass, OpDef, Rounding, VjpCtx, expect_arity,
    expect_rank, expect_type, float_out, flop_product, shape_str,
};
use crate::cpu::{ConvGeom, for_each_example, sum_over_batch};
use crate::error::{OpError, ShapeError};
use crate::matmul::{Mat, matmul};
use crate::noise::FisherMode;
use crate::port::PortRef;
use crate::tensor::{Real, Tensor, TensorType, Value};
use serde::{Deserialize, Serialize};

/// Output size of a convolution or pooling window along one axis, if the window fits.
pub fn conv_out_size(size: usize, kernel: usize, stride: usize, padding: usize) -> Option<usize> {
    let padded = size + 2 * padding;
    (stride > 0 && padded >= kernel).then(|| (padded - kernel) / stride + 1)
}

/// Geometry of the convolution reading input shape `[N, C, H, W]` with a `kh × kw` kernel.
pub(super) fn geometry(
    x: &[usize],
    kernel: (usize, usize),
    stride: usize,
    padding: usize,
) -> Result<ConvGeom, OpError> {
    let (h, w) = (x[2], x[3]);
    let out_h = conv_out_size(h, kernel.0, stride, padding);
    let out_w = conv_out_size(w, kernel.1, stride, padding);
    match (out_h, out_w) {
        (Some(out_h), Some(out_w)) => Ok(ConvGeom {
            channels: x[1],
            height: h,
            width: w,
            kernel_h: kernel.0,
            kernel_w: kernel.1,
            stride,
            padding,
            out_h,
            out_w,
        }),
        _ => Err(format!(
            "the {}×{} input (padding {padding}) is smaller than the {}×{} kernel",
            h, w, kernel.0, kernel.1
        )
        .into()),
    }
}

fn conv_flops(n: usize, out_channels: usize, g: &ConvGeom) -> u64 {
    flop_product(&[2, n, out_channels, g.patch_len(), g.positions()])
}

/// `y = conv(x, w) (+ b)`. Inputs: x `[N, C, H, W]`, w `[O, C, kh, kw]`, optional b `[O]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Conv2d {
    pub stride: usize,
    pub padding: usize,
    pub bias: bool,
}

impl Conv2d {
    fn geometry(&self, x: &[usize], w: &[usize]) -> Result<ConvGeom, OpError> {
        geometry(x, (w[2], w[3]), self.stride, self.padding)
    }
}

impl OpDef for Conv2d {
    const NAME: &'static str = "conv2d";
    const CLASS: OpClass = OpClass::Conv;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, if self.bias { 3 } else { 2 })?;
        let (x, w) = (inputs[0], inputs[1]);
        expect_rank(x, 4, "input")?;
        expect_rank(w, 4, "weight")?;
        if w.shape[1] != x.shape[1] {
            return Err(format!(
                "weight: expected [O, {}, kh, kw] for an input with {} channels, found {}",
                x.shape[1],
                x.shape[1],
                shape_str(&w.shape)
            )
            .into());
        }
        let out_channels = w.shape[0];
        if self.bias {
            expect_type(inputs[2], &TensorType::f32(&[out_channels]), "bias")?;
        }
        let g = self.geometry(&x.shape, &w.shape)?;
        Ok(vec![TensorType::f32(&[
            x.shape[0],
            out_channels,
            g.out_h,
            g.out_w,
        ])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (x, w) = (inputs[0].float(), inputs[1].float());
        let g = self.geometry(&x.shape, &w.shape)?;
        let out_channels = w.shape[0];
        let mut y = Tensor::zeros(&out[0].shape);
        let scratch = if g.is_pointwise() {
            0
        } else {
            g.patch_len() * g.positions()
        };
        let weight = Mat::new(&w.data, out_channels, g.patch_len());
        for_each_example(
            &mut y.data,
            out_channels * g.positions(),
            scratch,
            |n, y_n, col| {
                let x_n = &x.data[n * g.input_len()..][..g.input_len()];
                let patches = if g.is_pointwise() {
                    x_n
                } else {
                    g.im2col(x_n, col);
                    col
                };
                matmul(
                    weight,
                    Mat::new(patches, g.patch_len(), g.positions()),
                    y_n,
                    false,
                    false,
                );
                if self.bias {
                    let b = &inputs[2].float().data;
                    for (o, row) in y_n.chunks_mut(g.positions()).enumerate() {
                        row.iter_mut().for_each(|v| *v = *v + b[o]);
                    }
                }
            },
        );
        Ok(float_out(y))
    }

    fn flops(&self, inputs: &[&TensorType], out: &[TensorType]) -> u64 {
        let g = self
            .geometry(&inputs[0].shape, &inputs[1].shape)
            .expect("typed graph");
        conv_flops(inputs[0].shape[0], inputs[1].shape[0], &g)
            + out[0].numel() as u64 * self.bias as u64
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        let dy = cx.dout(Self::NAME, 0)?;
        let (x, w) = (cx.inputs[0], cx.inputs[1]);
        let x_shape = cx.ty(x).shape.clone();
        let w_shape = cx.ty(w).shape.clone();
        let mut grads = vec![None; cx.inputs.len()];
        if cx.wants[0] {
            let dgrad = ConvDgrad {
                stride: self.stride,
                padding: self.padding,
                input_hw: (x_shape[2], x_shape[3]),
            };
            grads[0] = Some(cx.add(dgrad, &[dy, w])?);
        }
        if cx.wants[1] {
            let wgrad = ConvWgrad {
                stride: self.stride,
                padding: self.padding,
                kernel: (w_shape[2], w_shape[3]),
            };
            grads[1] = Some(cx.add(wgrad, &[x, dy])?);
        }
        if self.bias && cx.wants[2] {
            grads[2] = Some(cx.add(ChannelSum, &[dy])?);
        }
        Ok(grads)
    }

    /// Weight: exact = per-example wgrads, squared and averaged; a2g2 = wgrad of (x², G²)
    /// with G = M·dy the per-example loss gradient, averaged. Bias: the same with x ≡ 1.
    fn fisher(&self, cx: &mut FisherCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        let dy = cx.vjp.dout(Self::NAME, 0)?;
        let x = cx.vjp.inputs[0];
        let w_shape = cx.vjp.ty(cx.vjp.inputs[1]).shape.clone();
        let wgrad = ConvWgrad {
            stride: self.stride,
            padding: self.padding,
            kernel: (w_shape[2], w_shape[3]),
        };
        let mut fisher = vec![None; cx.vjp.inputs.len()];
        fisher[1] = Some(match cx.mode {
            FisherMode::Exact => {
                let contributions = cx.vjp.add(ConvWgradPerExample(wgrad), &[x, dy])?;
                exact_from_contributions(cx, contributions)?
            }
            _ => a2g2_weight(cx, wgrad, x, dy)?,
        });
        if self.bias {
            fisher[2] = Some(match cx.mode {
                FisherMode::Exact => {
                    let contributions = cx.vjp.add(ChannelSumPerExample, &[dy])?;
                    exact_from_contributions(cx, contributions)?
                }
                _ => a2g2_bias(cx, dy)?,
            });
        }
        Ok(fisher)
    }
}

/// Data gradient: `dx` `[N, C, H, W]` from dy `[N, O, Ho, Wo]` and w `[O, C, kh, kw]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConvDgrad {
    pub stride: usize,
    pub padding: usize,
    /// Input height and width (a strided convolution's output does not determine them).
    pub input_hw: (usize, usize),
}

impl ConvDgrad {
    fn geometry(&self, dy: &[usize], w: &[usize]) -> Result<ConvGeom, OpError> {
        let x = [dy[0], w[1], self.input_hw.0, self.input_hw.1];
        let g = geometry(&x, (w[2], w[3]), self.stride, self.padding)?;
        if [g.out_h, g.out_w] != dy[2..] {
            return Err(format!(
                "output gradient: expected [{}, {}, {}, {}], found {}",
                dy[0],
                w[0],
                g.out_h,
                g.out_w,
                shape_str(dy)
            )
            .into());
        }
        Ok(g)
    }
}

impl OpDef for ConvDgrad {
    const NAME: &'static str = "conv_dgrad";
    const CLASS: OpClass = OpClass::Conv;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 2)?;
        let (dy, w) = (inputs[0], inputs[1]);
        expect_rank(dy, 4, "output gradient")?;
        expect_rank(w, 4, "weight")?;
        if dy.shape[1] != w.shape[0] {
            return Err(format!(
                "output gradient has {} channels but the weight has {} filters",
                dy.shape[1], w.shape[0]
            )
            .into());
        }
        self.geometry(&dy.shape, &w.shape)?;
        Ok(vec![TensorType::f32(&[
            dy.shape[0],
            w.shape[1],
            self.input_hw.0,
            self.input_hw.1,
        ])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (dy, w) = (inputs[0].float(), inputs[1].float());
        let g = self.geometry(&dy.shape, &w.shape)?;
        let out_channels = w.shape[0];
        let mut dx = Tensor::zeros(&out[0].shape);
        let weight_t = Mat::new(&w.data, out_channels, g.patch_len()).t();
        let scratch = if g.is_pointwise() {
            0
        } else {
            g.patch_len() * g.positions()
        };
        for_each_example(&mut dx.data, g.input_len(), scratch, |n, dx_n, col| {
            let dy_n = &dy.data[n * out_channels * g.positions()..][..out_channels * g.positions()];
            let dy_n = Mat::new(dy_n, out_channels, g.positions());
            if g.is_pointwise() {
                matmul(weight_t, dy_n, dx_n, false, false);
            } else {
                matmul(weight_t, dy_n, col, false, false);
                g.col2im(col, dx_n);
            }
        });
        Ok(float_out(dx))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        let g = self
            .geometry(&inputs[0].shape, &inputs[1].shape)
            .expect("typed graph");
        conv_flops(inputs[0].shape[0], inputs[1].shape[0], &g)
    }
}

/// Weight gradient `dw = Σ_n Σ_t dy[n,:,t] · patch[n,:,t]ᵀ` from x `[N, C, H, W]` and dy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConvWgrad {
    pub stride: usize,
    pub padding: usize,
    pub kernel: (usize, usize),
}

impl ConvWgrad {
    fn check(&self, inputs: &[&TensorType]) -> Result<ConvGeom, OpError> {
        expect_arity(inputs, 2)?;
        let (x, dy) = (inputs[0], inputs[1]);
        expect_rank(x, 4, "input")?;
        expect_rank(dy, 4, "output gradient")?;
        let g = geometry(&x.shape, self.kernel, self.stride, self.padding)?;
        if dy.shape[0] != x.shape[0] || dy.shape[2..] != [g.out_h, g.out_w] {
            return Err(format!(
                "output gradient: expected [{}, O, {}, {}], found {}",
                x.shape[0],
                g.out_h,
                g.out_w,
                shape_str(&dy.shape)
            )
            .into());
        }
        Ok(g)
    }

    /// Adds example `n`'s weight gradient into `dw` (`[O, C·kh·kw]`), using `col` as scratch.
    fn accumulate_example<T: Real>(
        g: &ConvGeom,
        x: &[T],
        dy: &[T],
        out_channels: usize,
        n: usize,
        dw: &mut [T],
        col: &mut [T],
    ) {
        let x_n = &x[n * g.input_len()..][..g.input_len()];
        let dy_n = &dy[n * out_channels * g.positions()..][..out_channels * g.positions()];
        let patches = if g.is_pointwise() {
            x_n
        } else {
            g.im2col(x_n, col);
            col
        };
        let dy_n = Mat::new(dy_n, out_channels, g.positions());
        let patches_t = Mat::new(patches, g.patch_len(), g.positions()).t();
        matmul(dy_n, patches_t, dw, true, false);
    }
}

impl OpDef for ConvWgrad {
    const NAME: &'static str = "conv_wgrad";
    const CLASS: OpClass = OpClass::Conv;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        self.check(inputs)?;
        let (c, o) = (inputs[0].shape[1], inputs[1].shape[1]);
        Ok(vec![TensorType::f32(&[o, c, self.kernel.0, self.kernel.1])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (x, dy) = (inputs[0].float(), inputs[1].float());
        let g = geometry(&x.shape, self.kernel, self.stride, self.padding)?;
        let out_channels = dy.shape[1];
        let scratch = if g.is_pointwise() {
            0
        } else {
            g.patch_len() * g.positions()
        };
        let dw = sum_over_batch(x.shape[0], out[0].numel(), scratch, |n, acc, col| {
            Self::accumulate_example(&g, &x.data, &dy.data, out_channels, n, acc, col);
        });
        Ok(float_out(Tensor::from_vec(&out[0].shape, dw)))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        let g = self.check(inputs).expect("typed graph");
        conv_flops(inputs[0].shape[0], inputs[1].shape[1], &g)
    }
}

/// Per-example weight gradients `[N, O, C, kh, kw]`: example n's contribution to `ConvWgrad`.
/// Materialised, as the unfused exact Fisher needs; the optimizer fuses the square into wgrad.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConvWgradPerExample(pub ConvWgrad);

impl OpDef for ConvWgradPerExample {
    const NAME: &'static str = "conv_wgrad_per_example";
    const CLASS: OpClass = OpClass::Conv;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let mut shape = self.0.infer(inputs)?.remove(0).shape;
        shape.insert(0, inputs[0].shape[0]);
        Ok(vec![TensorType::f32(&shape)])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (x, dy) = (inputs[0].float(), inputs[1].float());
        let wg = &self.0;
        let g = geometry(&x.shape, wg.kernel, wg.stride, wg.padding)?;
        let out_channels = dy.shape[1];
        let mut per_example = Tensor::zeros(&out[0].shape);
        let per_len = out[0].numel() / x.shape[0].max(1);
        let scratch = if g.is_pointwise() {
            0
        } else {
            g.patch_len() * g.positions()
        };
        for_each_example(&mut per_example.data, per_len, scratch, |n, dw_n, col| {
            ConvWgrad::accumulate_example(&g, &x.data, &dy.data, out_channels, n, dw_n, col);
        });
        Ok(float_out(per_example))
    }

    fn flops(&self, inputs: &[&TensorType], outputs: &[TensorType]) -> u64 {
        self.0.flops(inputs, outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_size_follows_the_usual_formula() {
        assert_eq!(conv_out_size(32, 3, 1, 1), Some(32));
        assert_eq!(conv_out_size(32, 3, 2, 1), Some(16));
        assert_eq!(conv_out_size(7, 2, 2, 0), Some(3));
        assert_eq!(conv_out_size(2, 3, 1, 0), None);
    }

    #[test]
    fn kernel_larger_than_input_is_a_shape_error() {
        let conv = Conv2d {
            stride: 1,
            padding: 0,
            bias: false,
        };
        let x = TensorType::f32(&[1, 3, 2, 2]);
        let w = TensorType::f32(&[4, 3, 3, 3]);
        let err = conv.infer(&[&x, &w]).unwrap_err().to_string();
        assert!(err.contains("smaller than the 3×3 kernel"), "{err}");
    }

    #[test]
    fn channel_mismatch_names_expected_and_found() {
        let conv = Conv2d {
            stride: 1,
            padding: 1,
            bias: false,
        };
        let x = TensorType::f32(&[1, 3, 8, 8]);
        let w = TensorType::f32(&[4, 5, 3, 3]);
        let err = conv.infer(&[&x, &w]).unwrap_err().to_string();
        assert!(
            err.contains("expected [O, 3, kh, kw]") && err.contains("[4, 5, 3, 3]"),
            "{err}"
        );
    }
}
