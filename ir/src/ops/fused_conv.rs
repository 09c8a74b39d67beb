//! Fused convolution and weight-gradient ops, the forms cuDNN-style training fusion uses:
//!
//! * [`FusedConv`]: convolution with an optional BN-apply + ReLU *prologue* on its input (the
//!   normalised activation is never stored) and optional BN statistics in its *epilogue*;
//! * [`FusedWgrad`]: weight gradient with the same prologue (the activation is recomputed)
//!   and, in the same pass, the squares the Fisher needs;
//! * [`FusedDgrad`]: data gradient with the ReLU-backward mask and the BN-backward reductions
//!   of the layer below in its epilogue;
//! * [`LinearWgradSq`]: a linear layer's weight gradient and its per-example squares.
//!
//! Each CPU reference is the composition of the basic ops it replaces.

use serde::{Deserialize, Serialize};

use super::activation::relu_mask;
use super::batchnorm::{batch_stats, check_channel_inputs};
use super::fused_bn::{Squares, bn_relu, param_grads_with_squares, stats_args};
use super::{
    Conv2d, ConvDgrad, ConvWgrad, ConvWgradPerExample, FloatAttr, LinearWgrad, OpClass, OpDef,
    Rounding, expect_arity, expect_type, flop_product,
};
use crate::error::OpError;
use crate::tensor::{Real, Tensor, TensorType, Value};

/// Names of the per-channel inputs of a BN-apply + ReLU prologue.
const PROLOGUE_INPUTS: [&str; 4] = ["mean", "variance", "gamma", "beta"];

/// Number of inputs the (optional) prologue puts in front of an op's own: the pre-BN tensor
/// and its four per-channel vectors, or just the tensor.
pub fn prologue_len(prologue: Option<FloatAttr>) -> usize {
    if prologue.is_some() { 5 } else { 1 }
}

/// Checks the prologue's per-channel inputs, if any.
fn check_prologue(inputs: &[&TensorType], prologue: Option<FloatAttr>) -> Result<(), OpError> {
    if prologue.is_some() {
        check_channel_inputs(&inputs[..5], &PROLOGUE_INPUTS)?;
    }
    Ok(())
}

/// The activation the op convolves: `relu(bn(y))` with a prologue, else the input itself.
fn activation<T: Real>(inputs: &[&Value<T>], prologue: Option<FloatAttr>) -> Value<T> {
    match prologue {
        Some(eps) => Value::Float(bn_relu(inputs[0].float(), stats_args(inputs, 1), eps, None)),
        None => inputs[0].clone(),
    }
}

/// FLOPs of a prologue over an input of type `x`.
fn prologue_flops(x: &TensorType, prologue: Option<FloatAttr>) -> u64 {
    4 * prologue.is_some() as u64 * x.numel() as u64
}

/// Convolution with optional BN-apply + ReLU prologue and BN-statistics epilogue.
/// Inputs: x (or y, mean, var, γ, β with a prologue), w, [b]. Outputs: the convolution, and
/// with `stats` its per-channel mean and biased variance.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FusedConv {
    pub conv: Conv2d,
    /// The ε of the input's batch norm, when its BN-apply + ReLU runs in this prologue.
    pub prologue: Option<FloatAttr>,
    pub stats: bool,
}

impl FusedConv {
    /// The plain convolution's inputs: the activation it convolves, then weight (and bias).
    fn conv_inputs<'a, X: ?Sized>(&self, inputs: &[&'a X], activation: &'a X) -> Vec<&'a X> {
        let mut conv_inputs = vec![activation];
        conv_inputs.extend(&inputs[prologue_len(self.prologue)..]);
        conv_inputs
    }
}

impl OpDef for FusedConv {
    const NAME: &'static str = "fused_conv";
    const CLASS: OpClass = OpClass::Conv;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(
            inputs,
            prologue_len(self.prologue) + 1 + self.conv.bias as usize,
        )?;
        check_prologue(inputs, self.prologue)?;
        let mut types = self.conv.infer(&self.conv_inputs(inputs, inputs[0]))?;
        if self.stats {
            let channels = TensorType::f32(&types[0].shape[1..2]);
            types.extend([channels.clone(), channels]);
        }
        Ok(types)
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        outputs: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let a = activation(inputs, self.prologue);
        let mut results = self
            .conv
            .eval(&self.conv_inputs(inputs, &a), &outputs[..1])?;
        if self.stats {
            let (mean, var) = batch_stats(results[0].float());
            let c = mean.len();
            results.push(Value::Float(Tensor::from_vec(&[c], mean)));
            results.push(Value::Float(Tensor::from_vec(&[c], var)));
        }
        Ok(results)
    }

    fn flops(&self, inputs: &[&TensorType], outputs: &[TensorType]) -> u64 {
        self.conv
            .flops(&self.conv_inputs(inputs, inputs[0]), &outputs[..1])
            + prologue_flops(inputs[0], self.prologue)
            + 3 * self.stats as u64 * outputs[0].numel() as u64
    }
}

/// Weight gradient with optional BN-apply + ReLU prologue (the activation is recomputed, never
/// read) and the Fisher's squares. Inputs: x (or y, mean, var, γ, β), dy. Outputs: dw, and with
/// squares `Σₙ cₙ²` (per example) or `Σₙₜ wgrad(a², dy²)` (per position).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FusedWgrad {
    pub wgrad: ConvWgrad,
    pub prologue: Option<FloatAttr>,
    pub squares: Squares,
}

impl OpDef for FusedWgrad {
    const NAME: &'static str = "fused_wgrad";
    const CLASS: OpClass = OpClass::Conv;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let first = prologue_len(self.prologue);
        expect_arity(inputs, first + 1)?;
        check_prologue(inputs, self.prologue)?;
        let dw = self.wgrad.infer(&[inputs[0], inputs[first]])?.remove(0);
        Ok(vec![dw; 1 + self.squares.extra_outputs()])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        outputs: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let a = activation(inputs, self.prologue);
        let dy = inputs[prologue_len(self.prologue)];
        let mut results = self.wgrad.eval(&[&a, dy], &outputs[..1])?;
        match self.squares {
            Squares::None => {}
            Squares::PerExample => {
                let per_example = ConvWgradPerExample(self.wgrad.clone());
                let pe_type = per_example.infer(&[&type_of(&a), &type_of(dy)])?;
                let contributions = per_example.eval(&[&a, dy], &pe_type)?.remove(0);
                results.push(Value::Float(sum_of_squares(contributions.float())));
            }
            Squares::PerPosition => {
                let (a2, dy2) = (squared(&a), squared(dy));
                results.extend(self.wgrad.eval(&[&a2, &dy2], &outputs[..1])?);
            }
        }
        Ok(results)
    }

    fn flops(&self, inputs: &[&TensorType], outputs: &[TensorType]) -> u64 {
        let first = prologue_len(self.prologue);
        let wgrad = self.wgrad.flops(&[inputs[0], inputs[first]], &outputs[..1]);
        let squares = match self.squares {
            Squares::None => 0,
            // the per-example partial sums are the same GEMM work; squaring them adds N·|w|
            Squares::PerExample => flop_product(&[2, inputs[0].shape[0], outputs[0].numel()]),
            Squares::PerPosition => wgrad + (inputs[0].numel() + inputs[first].numel()) as u64,
        };
        wgrad + squares + prologue_flops(inputs[0], self.prologue)
    }
}

/// Data gradient with the layer below's ReLU backward and BN backward reductions in its
/// epilogue. Outputs: the masked gradient `dz`, `Σ dz·ŷ`, `Σ dz`, and their squares per
/// `squares`, ŷ normalising y by mean and var. Inputs: dy, w, then y, mean, var of the batch
/// norm below, then what the mask needs:
/// * γ, β (not `residual`): the convolution read `relu(γ·ŷ + β)`, recomputed for the mask:
///   `dz = dgrad(dy, w)·[γ·ŷ + β > 0]`;
/// * r, out (`residual`): the convolution read `out = relu(bn(y) + shortcut)`, whose
///   gradient also flows back through the shortcut as r: `dz = (dgrad(dy, w) + r)·[out > 0]`.
///   The residual add and the ReLU backward of a residual block's input then cost no pass of
///   their own.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FusedDgrad {
    pub dgrad: ConvDgrad,
    pub eps: FloatAttr,
    pub squares: Squares,
    #[serde(default)]
    pub residual: bool,
}

/// Input positions after dy and w (the lowering declares its parameters in this order).
impl FusedDgrad {
    /// The batch norm's input y, then its mean and variance.
    pub const Y: usize = 2;
    pub const MEAN: usize = 3;
    pub const VAR: usize = 4;
    /// The mask's two inputs: γ and β, or the shortcut's gradient and the ReLU's output.
    pub const MASK: usize = 5;
}

impl OpDef for FusedDgrad {
    const NAME: &'static str = "fused_dgrad";
    const CLASS: OpClass = OpClass::Conv;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 7)?;
        let dx = self.dgrad.infer(&inputs[..2])?.remove(0);
        expect_type(
            inputs[Self::Y],
            &dx,
            "batch-norm input (must match the data gradient)",
        )?;
        let c = if self.residual {
            let (shortcut, out) = (inputs[Self::MASK], inputs[Self::MASK + 1]);
            expect_type(
                shortcut,
                &dx,
                "residual gradient (must match the data gradient)",
            )?;
            expect_type(out, &dx, "ReLU output (must match the data gradient)")?;
            check_channel_inputs(&inputs[Self::Y..Self::MASK], &PROLOGUE_INPUTS[..2])?
        } else {
            check_channel_inputs(&inputs[Self::Y..], &PROLOGUE_INPUTS)?
        };
        let vector = TensorType::f32(&[c]);
        let mut types = vec![dx];
        types.extend(std::iter::repeat_n(
            vector,
            2 + 2 * self.squares.extra_outputs(),
        ));
        Ok(types)
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        outputs: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let dx = self
            .dgrad
            .eval(&inputs[..2], &outputs[..1])?
            .remove(0)
            .into_float();
        let y = inputs[Self::Y].float();
        let dz = if self.residual {
            let r = inputs[Self::MASK].float();
            let sum = dx.data.iter().zip(&r.data).map(|(&a, &b)| a + b).collect();
            relu_mask(
                &Tensor::from_vec(&dx.shape, sum),
                inputs[Self::MASK + 1].float(),
            )
        } else {
            let stats = stats_args(inputs, Self::MEAN);
            relu_mask(&dx, &bn_relu(y, stats, self.eps, None))
        };
        let (mean, var) = (
            &inputs[Self::MEAN].float().data,
            &inputs[Self::VAR].float().data,
        );
        let mut results = param_grads_with_squares(&dz, y, mean, var, self.eps, self.squares);
        results.insert(0, Value::Float(dz));
        Ok(results)
    }

    fn flops(&self, inputs: &[&TensorType], outputs: &[TensorType]) -> u64 {
        let epilogue = (10 + self.residual as u64 + 3 * self.squares.extra_outputs() as u64)
            * outputs[0].numel() as u64;
        self.dgrad.flops(&inputs[..2], &outputs[..1]) + epilogue
    }
}

/// A linear layer's weight gradient and the squares of its per-example contributions:
/// (x `[N, I]`, dy `[N, O]`) → (dyᵀ·x, Σₙ dyₙ²⊗xₙ²). With one position per example, the exact
/// and a2g2 squares coincide.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LinearWgradSq;

impl OpDef for LinearWgradSq {
    const NAME: &'static str = "linear_wgrad_sq";
    const CLASS: OpClass = OpClass::Linear;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let dw = LinearWgrad.infer(inputs)?.remove(0);
        Ok(vec![dw.clone(), dw])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        outputs: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let mut results = LinearWgrad.eval(inputs, &outputs[..1])?;
        let (x2, dy2) = (squared(inputs[0]), squared(inputs[1]));
        results.extend(LinearWgrad.eval(&[&x2, &dy2], &outputs[..1])?);
        Ok(results)
    }

    fn flops(&self, inputs: &[&TensorType], outputs: &[TensorType]) -> u64 {
        2 * LinearWgrad.flops(inputs, outputs)
    }
}

fn type_of<T: Real>(v: &Value<T>) -> TensorType {
    TensorType::new(v.shape().to_vec(), v.dtype())
}

fn squared<T: Real>(v: &Value<T>) -> Value<T> {
    let t = v.float();
    Value::Float(Tensor::from_vec(
        &t.shape,
        t.data.iter().map(|&x| x * x).collect(),
    ))
}

/// `Σₙ cₙ²` over axis 0.
fn sum_of_squares<T: Real>(t: &Tensor<T>) -> Tensor<T> {
    let len = t.numel() / t.shape[0].max(1);
    let mut total = vec![T::zero(); len];
    for row in t.data.chunks(len.max(1)) {
        total
            .iter_mut()
            .zip(row)
            .for_each(|(s, &c)| *s = *s + c * c);
    }
    Tensor::from_vec(&t.shape[1..], total)
}
