//! ReLU and its backward. The backward reads the forward *output* (y > 0 ⇔ x > 0), so the
//! pre-activation need not be kept.

use super::{OpClass, OpDef, Rounding, VjpCtx, expect_arity, expect_type, float_out};
use crate::error::{OpError, ShapeError};
use crate::port::PortRef;
use crate::tensor::{DType, Real, Tensor, TensorType, Value};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Relu;

impl OpDef for Relu {
    const NAME: &'static str = "relu";
    const CLASS: OpClass = OpClass::Elementwise;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 1)?;
        if inputs[0].dtype != DType::F32 {
            return Err(format!("input: expected an f32 tensor, found {}", inputs[0]).into());
        }
        Ok(vec![inputs[0].clone()])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let x = inputs[0].float();
        let y = x.data.iter().map(|&v| v.max(T::zero())).collect();
        Ok(float_out(Tensor::from_vec(&x.shape, y)))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        inputs[0].numel() as u64
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        let dy = cx.dout(Self::NAME, 0)?;
        let y = cx.outputs[0];
        Ok(vec![Some(cx.add(ReluBackward, &[dy, y])?)])
    }
}

/// `dx = dy · [y > 0]` from dy and the ReLU's output y.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReluBackward;

impl OpDef for ReluBackward {
    const NAME: &'static str = "relu_backward";
    const CLASS: OpClass = OpClass::Elementwise;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 2)?;
        expect_type(
            inputs[1],
            inputs[0],
            "forward output (must match the gradient)",
        )?;
        Ok(vec![inputs[0].clone()])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        Ok(float_out(relu_mask(inputs[0].float(), inputs[1].float())))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        inputs[0].numel() as u64
    }
}

/// `grad` where `active` is positive, 0 elsewhere: ReLU backward, with `active` the ReLU's
/// output or its pre-activation.
pub(super) fn relu_mask<T: Real>(grad: &Tensor<T>, active: &Tensor<T>) -> Tensor<T> {
    let masked = grad
        .data
        .iter()
        .zip(&active.data)
        .map(|(&g, &a)| if a > T::zero() { g } else { T::zero() })
        .collect();
    Tensor::from_vec(&grad.shape, masked)
}
