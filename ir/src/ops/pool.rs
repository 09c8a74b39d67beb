//! Pooling: max pooling (no padding) and global average pooling, with their backward ops.
//! Max-pool backward recomputes the arg-max from the input (the first maximum in row-major
//! window order wins ties), so no index tensor is stored.

use super::{
    OpClass, OpDef, Rounding, VjpCtx, conv_out_size, expect_arity, expect_rank, float_out,
    shape_str,
};
use crate::error::{OpError, ShapeError};
use crate::port::PortRef;
use crate::tensor::{Real, Tensor, TensorType, Value};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MaxPool {
    pub kernel: usize,
    pub stride: usize,
}

impl MaxPool {
    fn out_hw(&self, x: &[usize]) -> Result<(usize, usize), OpError> {
        let h = conv_out_size(x[2], self.kernel, self.stride, 0);
        let w = conv_out_size(x[3], self.kernel, self.stride, 0);
        match (h, w) {
            (Some(h), Some(w)) => Ok((h, w)),
            _ => Err(format!(
                "the {}×{} input is smaller than the {k}×{k} pooling window",
                x[2],
                x[3],
                k = self.kernel
            )
            .into()),
        }
    }

    /// For every output element, the flat index of the input element it takes (planes in
    /// parallel; within a window the first maximum in row-major order).
    fn argmax<T: Real>(&self, x: &Tensor<T>, out_h: usize, out_w: usize) -> Vec<usize> {
        let (h, w) = (x.shape[2], x.shape[3]);
        let (k, stride) = (self.kernel, self.stride);
        let planes = x.shape[0] * x.shape[1];
        let mut winners = vec![0; planes * out_h * out_w];
        if winners.is_empty() {
            return winners;
        }
        winners
            .par_chunks_mut(out_h * out_w)
            .zip(x.data.par_chunks(h * w))
            .enumerate()
            .for_each(|(plane, (out, xs))| {
                for (oy, row_out) in out.chunks_mut(out_w).enumerate() {
                    for (ox, winner) in row_out.iter_mut().enumerate() {
                        let first = oy * stride * w + ox * stride;
                        let mut best = first;
                        for ky in 0..k {
                            let row = first + ky * w;
                            for (kx, &v) in xs[row..row + k].iter().enumerate() {
                                if v > xs[best] {
                                    best = row + kx;
                                }
                            }
                        }
                        *winner = plane * h * w + best;
                    }
                }
            });
        winners
    }
}

impl OpDef for MaxPool {
    const NAME: &'static str = "max_pool";
    const CLASS: OpClass = OpClass::Pool;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 1)?;
        let x = inputs[0];
        expect_rank(x, 4, "input")?;
        let (h, w) = self.out_hw(&x.shape)?;
        Ok(vec![TensorType::f32(&[x.shape[0], x.shape[1], h, w])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let x = inputs[0].float();
        let (h, w) = (out[0].shape[2], out[0].shape[3]);
        let y = self
            .argmax(x, h, w)
            .into_iter()
            .map(|i| x.data[i])
            .collect();
        Ok(float_out(Tensor::from_vec(&out[0].shape, y)))
    }

    fn flops(&self, _: &[&TensorType], out: &[TensorType]) -> u64 {
        (out[0].numel() * self.kernel * self.kernel) as u64
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        let dy = cx.dout(Self::NAME, 0)?;
        let backward = MaxPoolBackward {
            kernel: self.kernel,
            stride: self.stride,
        };
        Ok(vec![Some(cx.add(backward, &[dy, cx.inputs[0]])?)])
    }
}

/// Routes each output gradient to its window's arg-max: (dy, x) → dx.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MaxPoolBackward {
    pub kernel: usize,
    pub stride: usize,
}

impl MaxPoolBackward {
    fn forward(&self) -> MaxPool {
        MaxPool {
            kernel: self.kernel,
            stride: self.stride,
        }
    }
}

impl OpDef for MaxPoolBackward {
    const NAME: &'static str = "max_pool_backward";
    const CLASS: OpClass = OpClass::Pool;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 2)?;
        let expected = self.forward().infer(&inputs[1..])?.remove(0);
        super::expect_type(inputs[0], &expected, "output gradient")?;
        Ok(vec![inputs[1].clone()])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (dy, x) = (inputs[0].float(), inputs[1].float());
        let winners = self.forward().argmax(x, dy.shape[2], dy.shape[3]);
        let mut dx = Tensor::zeros(&x.shape);
        for (&i, &g) in winners.iter().zip(&dy.data) {
            dx.data[i] = dx.data[i] + g;
        }
        Ok(float_out(dx))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        (inputs[0].numel() * self.kernel * self.kernel) as u64
    }
}

/// Mean over all positions: `[N, C, H, W] → [N, C]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GlobalAvgPool;

impl OpDef for GlobalAvgPool {
    const NAME: &'static str = "global_avg_pool";
    const CLASS: OpClass = OpClass::Pool;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 1)?;
        expect_rank(inputs[0], 4, "input")?;
        Ok(vec![TensorType::f32(&inputs[0].shape[..2])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let x = inputs[0].float();
        let positions = x.shape[2] * x.shape[3];
        let inv = T::one() / T::from_usize(positions);
        let y = x
            .data
            .chunks(positions)
            .map(|plane| plane.iter().copied().sum::<T>() * inv)
            .collect();
        Ok(float_out(Tensor::from_vec(&out[0].shape, y)))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        inputs[0].numel() as u64
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        let dy = cx.dout(Self::NAME, 0)?;
        let x = &cx.ty(cx.inputs[0]).shape;
        let backward = GlobalAvgPoolBackward {
            height: x[2],
            width: x[3],
        };
        Ok(vec![Some(cx.add(backward, &[dy])?)])
    }
}

/// Spreads `dy / (H·W)` over every position: `[N, C] → [N, C, H, W]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GlobalAvgPoolBackward {
    pub height: usize,
    pub width: usize,
}

impl OpDef for GlobalAvgPoolBackward {
    const NAME: &'static str = "global_avg_pool_backward";
    const CLASS: OpClass = OpClass::Elementwise;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 1)?;
        let dy = inputs[0];
        expect_rank(dy, 2, "output gradient")?;
        if self.height == 0 || self.width == 0 {
            return Err(format!(
                "empty spatial size {}",
                shape_str(&[self.height, self.width])
            )
            .into());
        }
        Ok(vec![TensorType::f32(&[
            dy.shape[0],
            dy.shape[1],
            self.height,
            self.width,
        ])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let dy = inputs[0].float();
        let positions = self.height * self.width;
        let inv = T::one() / T::from_usize(positions);
        let dx = dy
            .data
            .iter()
            .flat_map(|&g| std::iter::repeat_n(g * inv, positions))
            .collect();
        Ok(float_out(Tensor::from_vec(&out[0].shape, dx)))
    }

    fn flops(&self, _: &[&TensorType], out: &[TensorType]) -> u64 {
        out[0].numel() as u64
    }
}
