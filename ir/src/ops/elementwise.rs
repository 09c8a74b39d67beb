//! Elementwise ops: constants, addition (residuals, gradient sums), scaling and squaring (the
//! Fisher's building blocks).

use super::{FloatAttr, OpClass, OpDef, Rounding, VjpCtx, expect_arity, float_out};
use crate::error::{OpError, ShapeError};
use crate::port::PortRef;
use crate::tensor::{DType, Real, Tensor, TensorType, Value};
use serde::{Deserialize, Serialize};

/// A float scalar known at compile time (the seed gradient of the loss).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Constant {
    pub value: FloatAttr,
}

impl OpDef for Constant {
    const NAME: &'static str = "constant";
    const CLASS: OpClass = OpClass::Constant;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 0)?;
        Ok(vec![TensorType::scalar(DType::F32)])
    }

    fn eval<T: Real>(&self, _: &[&Value<T>], _: &[TensorType]) -> Result<Vec<Value<T>>, OpError> {
        Ok(float_out(Tensor::scalar(T::from_f64(self.value.0))))
    }

    fn vjp(&self, _: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        Ok(Vec::new())
    }
}

/// Checks that all inputs are float tensors of one shape, and returns that type.
fn same_float_type(inputs: &[&TensorType]) -> Result<TensorType, OpError> {
    let first = inputs[0];
    if first.dtype != DType::F32 {
        return Err(format!("input 0: expected an f32 tensor, found {first}").into());
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
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Add;

impl OpDef for Add {
    const NAME: &'static str = "add";
    const CLASS: OpClass = OpClass::Elementwise;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 2)?;
        Ok(vec![same_float_type(inputs)?])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
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
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scale {
    pub factor: FloatAttr,
}

impl OpDef for Scale {
    const NAME: &'static str = "scale";
    const CLASS: OpClass = OpClass::Elementwise;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 1)?;
        Ok(vec![same_float_type(inputs)?])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
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
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Square;

impl OpDef for Square {
    const NAME: &'static str = "square";
    const CLASS: OpClass = OpClass::Elementwise;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 1)?;
        Ok(vec![same_float_type(inputs)?])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        Ok(map(inputs[0], |v| v * v))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        inputs[0].numel() as u64
    }
}

/// One step of an [`Elementwise`] program. Operands name earlier steps by position.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Instr {
    /// The op's input `i`.
    Input(usize),
    Add(usize, usize),
    Scale(usize, FloatAttr),
    Square(usize),
    Relu(usize),
    /// ReLU backward: the first operand where the second is positive, else 0.
    ReluMask(usize, usize),
}

impl Instr {
    /// The earlier steps this step reads.
    pub fn operands(&self) -> Vec<usize> {
        match *self {
            Instr::Input(_) => vec![],
            Instr::Scale(a, _) | Instr::Square(a) | Instr::Relu(a) => vec![a],
            Instr::Add(a, b) | Instr::ReluMask(a, b) => vec![a, b],
        }
    }

    /// The same step reading renumbered operands.
    pub fn with_operands(&self, map: impl Fn(usize) -> usize) -> Instr {
        match *self {
            Instr::Input(i) => Instr::Input(i),
            Instr::Add(a, b) => Instr::Add(map(a), map(b)),
            Instr::Scale(a, f) => Instr::Scale(map(a), f),
            Instr::Square(a) => Instr::Square(map(a)),
            Instr::Relu(a) => Instr::Relu(map(a)),
            Instr::ReluMask(a, b) => Instr::ReluMask(map(a), map(b)),
        }
    }

    fn apply<T: Real>(&self, inputs: &[T], done: &[T]) -> T {
        match *self {
            Instr::Input(i) => inputs[i],
            Instr::Add(a, b) => done[a] + done[b],
            Instr::Scale(a, f) => done[a] * T::from_f64(f.0),
            Instr::Square(a) => done[a] * done[a],
            Instr::Relu(a) => done[a].max(T::zero()),
            Instr::ReluMask(g, y) => {
                if done[y] > T::zero() {
                    done[g]
                } else {
                    T::zero()
                }
            }
        }
    }
}

/// A chain of elementwise ops fused into one node: same-shape inputs, one output, the value of
/// the program's last step at every element.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Elementwise {
    pub program: Vec<Instr>,
}

impl OpDef for Elementwise {
    const NAME: &'static str = "elementwise";
    const CLASS: OpClass = OpClass::Elementwise;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        if inputs.is_empty() || self.program.is_empty() {
            return Err("an elementwise program needs inputs and steps"
                .to_string()
                .into());
        }
        let ty = same_float_type(inputs)?;
        for (k, instr) in self.program.iter().enumerate() {
            let bad_input = matches!(instr, Instr::Input(i) if *i >= inputs.len());
            if bad_input || instr.operands().iter().any(|&o| o >= k) {
                return Err(format!("step {k} ({instr:?}) reads a value it cannot see").into());
            }
        }
        Ok(vec![ty])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        _: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let tensors: Vec<&Tensor<T>> = inputs.iter().map(|v| v.float()).collect();
        let mut scratch = vec![T::zero(); self.program.len()];
        let mut args = vec![T::zero(); tensors.len()];
        let out = (0..tensors[0].numel())
            .map(|e| {
                for (a, t) in args.iter_mut().zip(&tensors) {
                    *a = t.data[e];
                }
                for (k, instr) in self.program.iter().enumerate() {
                    scratch[k] = instr.apply(&args, &scratch[..k]);
                }
                scratch[self.program.len() - 1]
            })
            .collect();
        Ok(float_out(Tensor::from_vec(&tensors[0].shape, out)))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        let steps = self
            .program
            .iter()
            .filter(|i| !matches!(i, Instr::Input(_)))
            .count();
        (steps * inputs[0].numel()) as u64
    }
}
