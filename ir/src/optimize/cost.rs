//! The analytic cost model: every kernel reads its inputs and writes its outputs through device
//! memory once and does its op's FLOPs; its time is the roofline `max(bytes / bandwidth,
//! flops / peak)` plus a launch overhead. Figures are an H100's, so no GPU is needed to
//! optimise; the model ranks alternatives, it does not predict wall time.

use std::ops::{Add, AddAssign};

use serde::Serialize;

use crate::graph::Graph;
use crate::ops::Op;
use crate::tensor::TensorType;

/// The device figures the model uses.
#[derive(Clone, Copy, Debug)]
pub struct Device {
    /// Device memory bandwidth, bytes per second.
    pub bandwidth: f64,
    /// Peak of convolutions and matrix products (TF32 tensor cores), FLOP per second.
    pub tensor_flops: f64,
    /// Peak of everything else (FP32 units), FLOP per second.
    pub vector_flops: f64,
    /// Fixed cost of a kernel launch inside a CUDA graph, seconds.
    pub launch: f64,
}

/// NVIDIA H100 (SXM): about 3 TB/s, ~400 TFLOP/s TF32 tensor cores, ~60 TFLOP/s FP32.
pub const H100: Device = Device {
    bandwidth: 3.0e12,
    tensor_flops: 400e12,
    vector_flops: 60e12,
    launch: 2e-6,
};

/// Estimated cost of a set of kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Cost {
    pub bytes: u64,
    pub flops: u64,
    pub seconds: f64,
    pub kernels: usize,
}

impl Add for Cost {
    type Output = Cost;
    fn add(self, other: Cost) -> Cost {
        Cost {
            bytes: self.bytes + other.bytes,
            flops: self.flops + other.flops,
            seconds: self.seconds + other.seconds,
            kernels: self.kernels + other.kernels,
        }
    }
}

impl AddAssign for Cost {
    fn add_assign(&mut self, other: Cost) {
        *self = *self + other;
    }
}

/// The cost of one node as a kernel (zero if it is not one).
pub fn node_cost(op: &Op, inputs: &[&TensorType], outputs: &[TensorType], device: &Device) -> Cost {
    if !op.class().is_kernel() {
        return Cost::default();
    }
    let bytes: usize = inputs.iter().map(|t| t.bytes()).sum::<usize>()
        + outputs.iter().map(TensorType::bytes).sum::<usize>();
    let flops = op.flops(inputs, outputs);
    let peak = if op.class().is_matrix_product() {
        device.tensor_flops
    } else {
        device.vector_flops
    };
    let seconds = device.launch + (bytes as f64 / device.bandwidth).max(flops as f64 / peak);
    Cost {
        bytes: bytes as u64,
        flops,
        seconds,
        kernels: 1,
    }
}

/// The cost of running every node of a graph as one kernel.
pub fn graph_cost(graph: &Graph, device: &Device) -> Cost {
    let mut total = Cost::default();
    for n in graph.node_indices() {
        let node = graph.node(n);
        let inputs = graph.inputs(n);
        let types: Vec<&TensorType> = inputs.iter().map(|&p| graph.ty(p)).collect();
        total += node_cost(&node.op, &types, &node.outputs, device);
    }
    total
}
