//! Data-movement ops: reshape (flatten) and the option-A residual shortcut (strided identity
//! with zero channel padding, as in He et al.'s CIFAR ResNets), with their backward ops.

use super::{OpClass, OpDef, Rounding, VjpCtx, expect_arity, expect_rank, float_out, shape_str};
use crate::error::{OpError, ShapeError};
use crate::port::PortRef;
use crate::tensor::{DType, Real, Tensor, TensorType, Value};
use serde::{Deserialize, Serialize};

/// Same data, new shape (same element count). Flatten is `[N, C, H, W] → [N, C·H·W]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Reshape {
    pub shape: Vec<usize>,
}

impl OpDef for Reshape {
    const NAME: &'static str = "reshape";
    const CLASS: OpClass = OpClass::View;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 1)?;
        let x = inputs[0];
        if x.dtype != DType::F32 || x.numel() != self.shape.iter().product::<usize>() {
            return Err(format!(
                "cannot reshape {x} to {} elements {}",
                self.shape.iter().product::<usize>(),
                shape_str(&self.shape)
            )
            .into());
        }
        Ok(vec![TensorType::f32(&self.shape)])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        Ok(float_out(Tensor::from_vec(
            &self.shape,
            inputs[0].float().data.clone(),
        )))
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        let dy = cx.dout(Self::NAME, 0)?;
        let shape = cx.ty(cx.inputs[0]).shape.clone();
        Ok(vec![Some(cx.add(Reshape { shape }, &[dy])?)])
    }
}

/// `y[:, pad_before + c, i, j] = x[:, c, stride·i, stride·j]`, zero in the padded channels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShortcutA {
    pub stride: usize,
    pub pad_before: usize,
    pub pad_after: usize,
}

impl ShortcutA {
    fn out_shape(&self, x: &[usize]) -> Vec<usize> {
        vec![
            x[0],
            self.pad_before + x[1] + self.pad_after,
            x[2].div_ceil(self.stride),
            x[3].div_ceil(self.stride),
        ]
    }

    /// Calls `f(input index, output index)` for every element the shortcut copies.
    fn for_each_copy(&self, x: &[usize], mut f: impl FnMut(usize, usize)) {
        let y = self.out_shape(x);
        for n in 0..x[0] {
            for c in 0..x[1] {
                for i in 0..y[2] {
                    for j in 0..y[3] {
                        let src =
                            ((n * x[1] + c) * x[2] + i * self.stride) * x[3] + j * self.stride;
                        let dst = ((n * y[1] + c + self.pad_before) * y[2] + i) * y[3] + j;
                        f(src, dst);
                    }
                }
            }
        }
    }
}

impl OpDef for ShortcutA {
    const NAME: &'static str = "shortcut_a";
    const CLASS: OpClass = OpClass::Elementwise;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 1)?;
        expect_rank(inputs[0], 4, "input")?;
        if self.stride == 0 {
            return Err("stride must be at least 1".to_string().into());
        }
        Ok(vec![TensorType::f32(&self.out_shape(&inputs[0].shape))])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let x = inputs[0].float();
        let mut y = Tensor::zeros(&out[0].shape);
        self.for_each_copy(&x.shape, |src, dst| y.data[dst] = x.data[src]);
        Ok(float_out(y))
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        let dy = cx.dout(Self::NAME, 0)?;
        let backward = ShortcutABackward {
            forward: self.clone(),
            input_shape: cx.ty(cx.inputs[0]).shape.clone(),
        };
        Ok(vec![Some(cx.add(backward, &[dy])?)])
    }
}

/// Adjoint of [`ShortcutA`]: gathers the copied elements' gradients, zero elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShortcutABackward {
    pub forward: ShortcutA,
    pub input_shape: Vec<usize>,
}

impl OpDef for ShortcutABackward {
    const NAME: &'static str = "shortcut_a_backward";
    const CLASS: OpClass = OpClass::Elementwise;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 1)?;
        let expected = TensorType::f32(&self.forward.out_shape(&self.input_shape));
        super::expect_type(inputs[0], &expected, "output gradient")?;
        Ok(vec![TensorType::f32(&self.input_shape)])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let dy = inputs[0].float();
        let mut dx = Tensor::zeros(&self.input_shape);
        self.forward
            .for_each_copy(&self.input_shape, |src, dst| dx.data[src] = dy.data[dst]);
        Ok(float_out(dx))
    }
}
