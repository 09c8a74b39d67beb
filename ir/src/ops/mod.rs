//! Every op of the IR, one definition each.
//!
//! An op is a struct implementing [`OpDef`]: its shape rule (`infer`), its CPU reference (`eval`,
//! the correctness oracle), its FLOP count, its autodiff rule (`vjp`), for ops that consume
//! parameters its Fisher rule (`fisher`), and the facts other layers ask of it: its [`OpClass`]
//! (which lowering file takes it, whether it is a kernel, whether its FLOPs are matrix
//! products) and its [`Rounding`] (the bound a backend is checked against). Backward ops are
//! ops too, defined in the same file as the forward op they differentiate.
//!
//! Adding an op: its struct and `OpDef` in the file of its family, its name once in
//! [`define_ops!`] below, and its kernels in the `codegen/src/lower` file of its class. No other
//! code lists ops; only the optimizer's rules name the ops they rewrite.

mod activation;
mod batchnorm;
mod class;
mod conv;
mod elementwise;
mod fisher;
mod fused_bn;
mod fused_conv;
mod group;
mod input;
mod kfac;
mod linear;
mod loss;
mod pool;
mod reduce;
mod shape;
mod update;

use std::fmt;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

pub use activation::{Relu, ReluBackward};
pub use batchnorm::{
    BatchNorm, BnApply, BnBackwardData, BnBackwardReduce, BnParamGradsPerExample, BnParamGradsSq,
    BnRunningUpdate,
};
pub use class::{OpClass, Rounding};
pub use conv::{Conv2d, ConvDgrad, ConvWgrad, ConvWgradPerExample, conv_out_size};
pub use elementwise::{Add, Constant, Elementwise, Instr, Scale, Square};
pub use fused_bn::{BnBackwardReduceSq, BnRelu, ChannelSumSq, ReluBackwardBnReduce, Squares};
pub use fused_conv::{FusedConv, FusedDgrad, FusedWgrad, LinearWgradSq, prologue_len};
pub use group::{BnRunningUpdateGroup, Group, Groupable, MemberPorts, NoisySgdUpdateGroup};
pub use input::{Hyper, Input, Role};
pub use kfac::{KfacGradFactor, KfacInputFactor, KfacNoise};
pub use linear::{Linear, LinearDgrad, LinearWgrad, LinearWgradPerExample};
pub use loss::{FisherKind, FullFisherSample, SoftmaxCrossEntropy, SoftmaxCrossEntropyBackward};
pub use pool::{GlobalAvgPool, GlobalAvgPoolBackward, MaxPool, MaxPoolBackward};
pub use reduce::{BatchMean, ChannelSum, ChannelSumPerExample};
pub use shape::{Reshape, ShortcutA, ShortcutABackward};
pub use update::{NoisySgdUpdate, UpdateNoise};

use crate::error::{OpError, ShapeError};
use crate::noise::FisherMode;
use crate::port::PortRef;

use crate::tensor::{DType, Real, ShapeDisplay, TensorType, Value};

/// The definition of one op. See the module docs for what belongs here.
pub trait OpDef {
    /// Name used in reports, errors and node counts.
    const NAME: &'static str;

    /// The op's family: which lowering file takes it, whether it is a kernel, whether its
    /// FLOPs are matrix products.
    const CLASS: OpClass;

    /// How its outputs round: the bound a backend's results are checked against.
    const ROUNDING: Rounding;

    /// Output types from input types, or a message saying which input is wrong and how.
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError>;

    /// CPU reference: computes the outputs (whose types `infer` gave) from the inputs.
    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        outputs: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError>;

    /// Floating-point operations of one evaluation (a multiply-add counts two).
    fn flops(&self, _inputs: &[&TensorType], _outputs: &[TensorType]) -> u64 {
        0
    }

    /// The input whose buffer output `output` overwrites in place (an update's new state
    /// replacing the old), so that the plan gives both one buffer and runs the op after every
    /// other reader of that input.
    fn in_place(&self, _output: usize) -> Option<usize> {
        None
    }

    /// Reverse-mode rule: gradients of the inputs from the gradients of the outputs.
    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        Err(cx.error(Self::NAME, "this op has no gradient rule".to_string()))
    }

    /// Fisher rule: the diagonal Fisher estimate F̂ of each parameter input (`None` elsewhere).
    /// Only ops that consume parameters define it.
    fn fisher(&self, cx: &mut FisherCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        Err(cx.vjp.error(
            Self::NAME,
            "this op takes no parameters, so it has no Fisher rule".to_string(),
        ))
    }
}

macro_rules! define_ops {
    ($($op:ident),* $(,)?) => {
        /// Any op of the IR, with its attributes. Serialised as `{"op_name": attributes}`.
        #[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum Op {
            $($op($op)),*
        }

        impl Op {
            /// Names of every op, in definition order.
            pub const NAMES: &'static [&'static str] = &[$(<$op as OpDef>::NAME),*];

            pub fn name(&self) -> &'static str {
                match self { $(Op::$op(_) => <$op as OpDef>::NAME),* }
            }

            pub fn class(&self) -> OpClass {
                match self { $(Op::$op(_) => <$op as OpDef>::CLASS),* }
            }

            pub fn rounding(&self) -> Rounding {
                match self { $(Op::$op(_) => <$op as OpDef>::ROUNDING),* }
            }

            pub fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
                match self { $(Op::$op(o) => o.infer(inputs)),* }
            }

            pub fn eval<T: Real>(
                &self,
                inputs: &[&Value<T>],
                outputs: &[TensorType],
            ) -> Result<Vec<Value<T>>, OpError> {
                match self { $(Op::$op(o) => o.eval(inputs, outputs)),* }
            }

            pub fn flops(&self, inputs: &[&TensorType], outputs: &[TensorType]) -> u64 {
                match self { $(Op::$op(o) => o.flops(inputs, outputs)),* }
            }

            pub fn in_place(&self, output: usize) -> Option<usize> {
                match self { $(Op::$op(o) => o.in_place(output)),* }
            }

            pub fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
                match self { $(Op::$op(o) => o.vjp(cx)),* }
            }

            pub fn fisher(
                &self,
                cx: &mut FisherCtx<'_>,
            ) -> Result<Vec<Option<PortRef>>, ShapeError> {
                match self { $(Op::$op(o) => o.fisher(cx)),* }
            }
        }

        $(impl From<$op> for Op {
            fn from(o: $op) -> Op { Op::$op(o) }
        })*
    };
}

define_ops!(
    // sources
    Input,
    Constant,
    // forward
    Conv2d,
    Linear,
    BatchNorm,
    BnApply,
    BnRunningUpdate,
    Relu,
    MaxPool,
    GlobalAvgPool,
    Add,
    Reshape,
    ShortcutA,
    SoftmaxCrossEntropy,
    // backward
    ConvDgrad,
    ConvWgrad,
    LinearDgrad,
    LinearWgrad,
    ChannelSum,
    BnBackwardReduce,
    BnBackwardData,
    ReluBackward,
    MaxPoolBackward,
    GlobalAvgPoolBackward,
    ShortcutABackward,
    SoftmaxCrossEntropyBackward,
    // Fisher
    ConvWgradPerExample,
    LinearWgradPerExample,
    ChannelSumPerExample,
    BnParamGradsPerExample,
    BnParamGradsSq,
    Square,
    Scale,
    BatchMean,
    FullFisherSample,
    KfacInputFactor,
    KfacGradFactor,
    KfacNoise,
    // update
    NoisySgdUpdate,
    // groups the optimizer's last pass makes
    NoisySgdUpdateGroup,
    BnRunningUpdateGroup,
    // fused forms the optimizer produces
    FusedConv,
    FusedWgrad,
    FusedDgrad,
    LinearWgradSq,
    ChannelSumSq,
    BnBackwardReduceSq,
    BnRelu,
    ReluBackwardBnReduce,
    Elementwise,
);

/// A float attribute (epsilon, momentum, scale factor) that can be compared and hashed by bits,
/// so ops stay `Eq + Hash` for the optimizer.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FloatAttr(pub f64);

impl Eq for FloatAttr {}

impl Hash for FloatAttr {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state)
    }
}

impl fmt::Display for FloatAttr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The graph as a gradient or Fisher rule sees it: the types of its values, and new nodes.
/// Implemented by `graph::Graph`; a trait here so that the ops do not depend on the graph.
pub trait RuleGraph {
    /// Adds a node (its output types inferred), returning its outputs.
    fn add_node(
        &mut self,
        op: Op,
        layer: &str,
        inputs: &[PortRef],
    ) -> Result<Vec<PortRef>, ShapeError>;

    /// The static type of a value.
    fn ty(&self, p: PortRef) -> &TensorType;
}

/// What an op's gradient rule sees: its inputs and outputs, the gradients arriving at its
/// outputs, and which input gradients are wanted. New nodes get the op's layer name.
pub struct VjpCtx<'a> {
    pub graph: &'a mut dyn RuleGraph,
    pub layer: String,
    pub inputs: Vec<PortRef>,
    pub outputs: Vec<PortRef>,
    pub douts: Vec<Option<PortRef>>,
    pub wants: Vec<bool>,
}

impl VjpCtx<'_> {
    /// Adds a single-output node for this layer.
    pub fn add(&mut self, op: impl Into<Op>, inputs: &[PortRef]) -> Result<PortRef, ShapeError> {
        let op = op.into();
        let name = op.name();
        let outputs = self.add_multi(op, inputs)?;
        outputs
            .first()
            .copied()
            .ok_or_else(|| self.error(name, "the op has no output".to_string()))
    }

    /// Adds a node for this layer and returns all its outputs.
    pub fn add_multi(
        &mut self,
        op: impl Into<Op>,
        inputs: &[PortRef],
    ) -> Result<Vec<PortRef>, ShapeError> {
        self.graph.add_node(op.into(), &self.layer, inputs)
    }

    pub fn ty(&self, p: PortRef) -> &TensorType {
        self.graph.ty(p)
    }

    /// The gradient of output `i`, which a rule with a single differentiable output requires.
    pub fn dout(&self, op: &'static str, i: usize) -> Result<PortRef, ShapeError> {
        self.douts[i].ok_or_else(|| self.error(op, format!("no gradient reached output {i}")))
    }

    pub fn error(&self, op: &'static str, message: String) -> ShapeError {
        ShapeError {
            layer: self.layer.clone(),
            op,
            message,
        }
    }
}

/// What an op's Fisher rule sees: everything its gradient rule saw (with the gradients that
/// reached its outputs), the Fisher mode and the batch size M.
pub struct FisherCtx<'a> {
    pub vjp: VjpCtx<'a>,
    pub mode: FisherMode,
    pub batch: usize,
}

// ---- shape-rule helpers shared by the op files ----

/// `what` must be a float tensor of rank `rank`.
pub(crate) fn expect_rank(t: &TensorType, rank: usize, what: &str) -> Result<(), OpError> {
    if t.dtype != DType::F32 {
        return Err(format!("{what}: expected an f32 tensor, found {t}").into());
    }
    if t.rank() != rank {
        return Err(format!(
            "{what}: expected a rank-{rank} tensor{}, found {t}",
            match rank {
                4 => " [N, C, H, W]",
                2 => " [N, features]",
                1 => " [C]",
                _ => "",
            }
        )
        .into());
    }
    Ok(())
}

/// `what` must have exactly the type `expected`.
pub(crate) fn expect_type(
    t: &TensorType,
    expected: &TensorType,
    what: &str,
) -> Result<(), OpError> {
    if t != expected {
        return Err(format!("{what}: expected {expected}, found {t}").into());
    }
    Ok(())
}

/// The op takes exactly `n` inputs.
pub(crate) fn expect_arity(inputs: &[&TensorType], n: usize) -> Result<(), OpError> {
    if inputs.len() != n {
        return Err(format!("expected {n} inputs, found {}", inputs.len()).into());
    }
    Ok(())
}

pub(crate) fn shape_str(shape: &[usize]) -> String {
    ShapeDisplay(shape).to_string()
}

/// A FLOP count `Π factors`, saturating instead of overflowing.
pub(crate) fn flop_product(factors: &[usize]) -> u64 {
    let product = factors
        .iter()
        .fold(1u128, |p, &f| p.saturating_mul(f as u128));
    product.min(u64::MAX as u128) as u64
}

/// Wraps float tensors as the single output of an eval.
pub(crate) fn float_out<T: Real>(t: crate::tensor::Tensor<T>) -> Vec<Value<T>> {
    vec![Value::Float(t)]
}
