//! Lowering: every op the optimizer can extract becomes one or a few kernel launches.
//!
//! `lower` looks at an op with its input and output types and returns kernels (specialised
//! to the shapes: sizes are immediates), their grids and arguments. Arguments name the node's
//! inputs, outputs and scratch buffers; the memory plan binds them to addresses. One file per
//! [`OpClass`]: the op says its class, the class picks the file.

mod common;
mod conv;
mod elementwise;
mod gemm;
mod kfac;
mod linear;
mod loss;
mod norm;
mod pool;
mod reduce;
mod rng;
mod schedule;
mod update;

use fisherc_ir::ops::{Op, OpClass};
use fisherc_ir::tensor::TensorType;

use crate::kir::Kernel;

/// Threads per block of every kernel lowered here.
pub const BLOCK: u32 = 256;

/// A buffer a kernel argument points at, relative to the node being lowered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Buf {
    Input(usize),
    Output(usize),
    /// Scratch buffer `i` of this node (see [`Lowered::scratch`]).
    Scratch(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LaunchArg {
    Buf(Buf),
    U32(u32),
    F32(f32),
}

/// One kernel launch.
#[derive(Clone, Debug)]
pub struct Launch {
    pub kernel: Kernel,
    pub grid: [u32; 2],
    pub args: Vec<LaunchArg>,
}

/// What a node becomes on the device.
#[derive(Clone, Debug)]
pub enum Lowered {
    /// Kernels, run in order, with the scratch buffers (bytes) they need.
    Kernels {
        launches: Vec<Launch>,
        scratch: Vec<u64>,
    },
    /// The output is input `0`'s buffer, reinterpreted (reshape).
    Alias,
    /// The output is a constant the plan fills in once.
    Constant(f32),
    /// A graph input: filled by the host.
    Input,
}

impl Lowered {
    fn kernels(launches: Vec<Launch>) -> Lowered {
        Lowered::Kernels {
            launches,
            scratch: Vec::new(),
        }
    }
}

pub use crate::options::LowerOptions;

/// How far (relative to an output's largest magnitude) a convolution with one TF32 product
/// per operand pair may be from fp32 (the kernel tests see up to 1.4·10⁻³).
pub const SINGLE_TF32_ERROR: f64 = 5e-3;

/// Whether the lowering runs the op's products on tensor cores when asked: the convolutions'
/// implicit GEMMs (`gemm/`). Linear layers' products stay fp32 FMA.
pub fn uses_tensor_cores(op: &Op) -> bool {
    op.class() == OpClass::Conv
}

/// An op whose class names a lowering that does not take it.
#[derive(Debug, thiserror::Error)]
#[error("{op} is of class {class:?}, whose lowering does not take it")]
pub struct LowerError {
    pub op: &'static str,
    pub class: OpClass,
}

/// Lowers one node.
pub fn lower(
    op: &Op,
    inputs: &[&TensorType],
    outputs: &[TensorType],
    options: LowerOptions,
) -> Result<Lowered, LowerError> {
    let cx = common::Cx::new(op, inputs, outputs, options);
    Ok(match op.class() {
        OpClass::Source => Lowered::Input,
        OpClass::Constant => match op {
            Op::Constant(c) => Lowered::Constant(c.value.0 as f32),
            _ => {
                return Err(LowerError {
                    op: op.name(),
                    class: op.class(),
                });
            }
        },
        OpClass::View => Lowered::Alias,
        OpClass::Elementwise => elementwise::lower(&cx),
        OpClass::Pool => pool::lower(&cx),
        OpClass::Reduce => reduce::lower(&cx),
        OpClass::Norm => norm::lower(&cx),
        OpClass::Conv => conv::lower(&cx),
        OpClass::Linear => linear::lower(&cx),
        OpClass::Loss => loss::lower(&cx),
        OpClass::Update => update::lower(&cx),
        OpClass::Kfac => kfac::lower(&cx),
    })
}
