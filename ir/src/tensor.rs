//! Tensor types and tensor values.
//!
//! [`TensorType`] is the static type every graph edge carries (shape and dtype, known at compile
//! time). [`Tensor`] and [`Value`] are the CPU reference interpreter's runtime values; the
//! interpreter is generic over the float type ([`Real`]: `f32` for training, `f64` for gradient
//! checks).

use std::fmt;
use std::iter::Sum;

use serde::{Deserialize, Serialize};

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DType {
    /// Activations, parameters, gradients: `f32` on the GPU, `T: Real` in the interpreter.
    F32,
    /// Class labels.
    I32,
    /// 64-bit words: the noise seed and the step counter.
    U64,
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::I32 => "i32",
            DType::U64 => "u64",
        })
    }
}

/// Static type of a tensor: shape (row-major, NCHW for images) and element type.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TensorType {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl TensorType {
    pub fn new(shape: Vec<usize>, dtype: DType) -> Self {
        TensorType { shape, dtype }
    }

    pub fn f32(shape: &[usize]) -> Self {
        TensorType::new(shape.to_vec(), DType::F32)
    }

    pub fn i32(shape: &[usize]) -> Self {
        TensorType::new(shape.to_vec(), DType::I32)
    }

    pub fn scalar(dtype: DType) -> Self {
        TensorType::new(Vec::new(), dtype)
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The element count, if it does not overflow.
    pub fn checked_numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    /// Size in bytes of the tensor on the device.
    pub fn bytes(&self) -> usize {
        let width = match self.dtype {
            DType::F32 | DType::I32 => 4,
            DType::U64 => 8,
        };
        self.numel() * width
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, ShapeDisplay(&self.shape))
    }
}

/// Formats a shape as `[a, b, c]`.
pub struct ShapeDisplay<'a>(pub &'a [usize]);

impl fmt::Display for ShapeDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Float type the reference interpreter computes in.
pub trait Real:
    num_traits::Float
    + Sum
    + Send
    + Sync
    + fmt::Debug
    + fmt::Display
    + Default
    + 'static
    + crate::matmul::Element
{
    fn from_f64(x: f64) -> Self;
    fn from_f32(x: f32) -> Self;
    fn as_f64(self) -> f64;
    fn from_usize(x: usize) -> Self {
        Self::from_f64(x as f64)
    }
    /// `eˣ` from the `libm` crate: the same bits on every CPU (std's calls the C library, which
    /// may choose its code by instruction set).
    fn portable_exp(self) -> Self;
    /// `ln x` from the `libm` crate, like [`Real::portable_exp`].
    fn portable_ln(self) -> Self;
}

impl Real for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
    fn portable_exp(self) -> Self {
        libm::expf(self)
    }
    fn portable_ln(self) -> Self {
        libm::logf(self)
    }
}

impl Real for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    fn as_f64(self) -> f64 {
        self
    }
    fn portable_exp(self) -> Self {
        libm::exp(self)
    }
    fn portable_ln(self) -> Self {
        libm::log(self)
    }
}

/// A dense row-major tensor on the CPU.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

impl<T: Copy + Default> Tensor<T> {
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![T::default(); shape.iter().product()],
        }
    }

    pub fn from_vec(shape: &[usize], data: Vec<T>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor data does not match its shape {}",
            ShapeDisplay(shape)
        );
        Tensor {
            shape: shape.to_vec(),
            data,
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

impl<T: Real> Tensor<T> {
    pub fn scalar(x: T) -> Self {
        Tensor {
            shape: Vec::new(),
            data: vec![x],
        }
    }

    pub fn filled(shape: &[usize], x: T) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![x; shape.iter().product()],
        }
    }

    /// Converts every element to another float type.
    pub fn cast<U: Real>(&self) -> Tensor<U> {
        Tensor {
            shape: self.shape.clone(),
            data: self.data.iter().map(|&x| U::from_f64(x.as_f64())).collect(),
        }
    }
}

/// A runtime value flowing along one graph edge.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<T> {
    Float(Tensor<T>),
    Int(Tensor<i32>),
    Word(u64),
}

impl<T: Real> Value<T> {
    pub fn dtype(&self) -> DType {
        match self {
            Value::Float(_) => DType::F32,
            Value::Int(_) => DType::I32,
            Value::Word(_) => DType::U64,
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            Value::Float(t) => &t.shape,
            Value::Int(t) => &t.shape,
            Value::Word(_) => &[],
        }
    }

    /// The float tensor inside; the graph's type check guarantees the variant.
    pub fn float(&self) -> &Tensor<T> {
        match self {
            Value::Float(t) => t,
            other => panic!("expected a float tensor, found {}", other.dtype()),
        }
    }

    pub fn int(&self) -> &Tensor<i32> {
        match self {
            Value::Int(t) => t,
            other => panic!("expected an i32 tensor, found {}", other.dtype()),
        }
    }

    pub fn word(&self) -> u64 {
        match self {
            Value::Word(w) => *w,
            other => panic!("expected a u64 word, found {}", other.dtype()),
        }
    }

    /// The single element of a float scalar.
    pub fn float_scalar(&self) -> T {
        self.float().data[0]
    }

    pub fn into_float(self) -> Tensor<T> {
        match self {
            Value::Float(t) => t,
            other => panic!("expected a float tensor, found {}", other.dtype()),
        }
    }

    /// Whether the value has the given static type.
    pub fn has_type(&self, ty: &TensorType) -> bool {
        self.dtype() == ty.dtype && self.shape() == ty.shape.as_slice()
    }
}
