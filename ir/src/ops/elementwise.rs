//! Elementwise ops: constants, addition (residuals, gradient sums), scaling and squaring (the
//! Fisher's building blocks).

use super::{FloatAttr, OpDef, VjpCtx, expect_arity, float_out};
use crate::error::ShapeError;
use crate::graph::PortRef;
use crate::tensor::{DType, Real, Tensor, TensorType, Value};

/// A float scalar known at compile time (the seed gradient of the loss).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Constant {
    pub value: FloatAttr,
}

impl OpDef for Constant {
    const NAME: &'static str = "constant";

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_arity(inputs, 0)?;
        Ok(vec![TensorType::scalar(DType::F32)])
    }

    fn eval<T: Real>(&self, _: &[&Value<T>], _: &[TensorType]) -> Result<Vec<Value<T>>, String> {
        Ok(float_out(Tensor::scalar(T::from_f64(self.value.0))))
    }

    fn vjp(&self, _: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        Ok(Vec::new())
    }
}

/// Checks that all inputs are float tensors of one shape, and returns that type.
fn same_float_type(inputs: &[&TensorType]) -> Result<TensorType, String> {
    let first = inputs[0];
    if first.dtype != DType::F32 {
        return Err(format!("input 0: expected an f32 tensor, found {first}"));
    }
    for (i, t) in inputs.iter().enumerate().skip(1) {
        super::expect_type(t, first, &format!("input {i} (must match input 0)"))?;
    }
    Ok(first.clone())
}

fn map<T: Real>(x: &Value<T>, f: impl Fn(T) -> T) -> Vec<Value<T>> {
    let x = x.float();
    float_out(Tensor::from_vec(
        &x.shape,
        x.data.iter().map(|&v| f(v)).collect(),
    ))
}

/// `a + b`, same shapes (residual connections and gradient accumulation).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Add;

impl OpDef for Add {
    const NAME: &'static str = "add";

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_arity(inputs, 2)?;
        Ok(vec![same_float_type(inputs)?])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, String> {
        let (a, b) = (inputs[0].float(), inputs[1].float());
        let sum = a.data.iter().zip(&b.data).map(|(&x, &y)| x + y).collect();
        Ok(float_out(Tensor::from_vec(&a.shape, sum)))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        inputs[0].numel() as u64
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        let dy = cx.dout(Self::NAME, 0)?;
        Ok(vec![Some(dy), Some(dy)])
    }
}

/// `factor · x` for a compile-time factor (1/M, M, loss scale).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Scale {
    pub factor: FloatAttr,
}

impl OpDef for Scale {
    const NAME: &'static str = "scale";

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_arity(inputs, 1)?;
        Ok(vec![same_float_type(inputs)?])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, String> {
        let factor = T::from_f64(self.factor.0);
        Ok(map(inputs[0], |v| v * factor))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        inputs[0].numel() as u64
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        let dy = cx.dout(Self::NAME, 0)?;
        Ok(vec![Some(cx.add(self.clone(), &[dy])?)])
    }
}

/// `x²`, elementwise.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Square;

impl OpDef for Square {
    const NAME: &'static str = "square";

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_arity(inputs, 1)?;
        Ok(vec![same_float_type(inputs)?])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, String> {
        Ok(map(inputs[0], |v| v * v))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        inputs[0].numel() as u64
    }
}
