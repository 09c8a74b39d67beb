//! Graph inputs. An input node has no inputs; the caller feeds its value, and its [`Role`] says
//! what the value is (so runtimes know which buffer to bind).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{OpClass, OpDef, Rounding, VjpCtx};
use crate::error::{OpError, ShapeError};
use crate::port::PortRef;
use crate::tensor::{Real, TensorType, Value};

/// Hyper-parameters of the noisy update, fed as scalars every step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hyper {
    LearningRate,
    Momentum,
    WeightDecay,
    /// The noise scale `s` (default `sqrt(1/M_S - 1/M_L)`; 0 switches the noise off).
    NoiseScale,
    /// Philox key of the noise (u64).
    Seed,
    /// Step counter, part of the Philox counter (u64).
    Step,
}

impl Hyper {
    pub const ALL: [Hyper; 6] = [
        Hyper::LearningRate,
        Hyper::Momentum,
        Hyper::WeightDecay,
        Hyper::NoiseScale,
        Hyper::Seed,
        Hyper::Step,
    ];
}

/// What value an input node stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Images,
    Labels,
    /// Trainable parameter `i` (index into the model's parameter list).
    Param(usize),
    /// Momentum buffer of parameter `i`.
    Momentum(usize),
    /// Running mean of batch-norm layer `i`.
    RunningMean(usize),
    RunningVar(usize),
    Hyper(Hyper),
    /// K-FAC: whether this step computes the batch's Kronecker factors (f32 scalar, 1 or 0).
    KfacRefresh,
    /// K-FAC: the Cholesky factor `L_A` of the damped input factor of the layer whose weight
    /// is parameter `i`.
    KfacInputCholesky(usize),
    /// K-FAC: the Cholesky factor `L_G` of that layer's damped gradient factor.
    KfacGradCholesky(usize),
    /// Free-standing inputs of hand-built graphs (tests, tools).
    Named(String),
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Images => write!(f, "images"),
            Role::Labels => write!(f, "labels"),
            Role::Param(i) => write!(f, "param[{i}]"),
            Role::Momentum(i) => write!(f, "momentum[{i}]"),
            Role::RunningMean(i) => write!(f, "running_mean[{i}]"),
            Role::RunningVar(i) => write!(f, "running_var[{i}]"),
            Role::Hyper(h) => write!(f, "{h:?}"),
            Role::KfacRefresh => write!(f, "kfac_refresh"),
            Role::KfacInputCholesky(i) => write!(f, "kfac_input_cholesky[{i}]"),
            Role::KfacGradCholesky(i) => write!(f, "kfac_grad_cholesky[{i}]"),
            Role::Named(s) => write!(f, "{s}"),
        }
    }
}

/// A value fed from outside the graph.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Input {
    pub role: Role,
    pub ty: TensorType,
}

impl OpDef for Input {
    const NAME: &'static str = "input";
    const CLASS: OpClass = OpClass::Source;
    const ROUNDING: Rounding = Rounding::FewTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        super::expect_arity(inputs, 0)?;
        Ok(vec![self.ty.clone()])
    }

    fn eval<T: Real>(&self, _: &[&Value<T>], _: &[TensorType]) -> Result<Vec<Value<T>>, OpError> {
        Err(format!("input '{}' was not fed", self.role).into())
    }

    /// Gradients stop at inputs: autodiff reads them off the input's value directly.
    fn vjp(&self, _: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        Ok(Vec::new())
    }
}
