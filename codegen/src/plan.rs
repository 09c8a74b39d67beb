//! The compiled step: a schedule of kernel launches and a static memory plan.
//!
//! * **Schedule**: a topological order of the graph's nodes in which the in-place updates
//!   (parameters, momenta, running statistics) come last, after every other reader of what
//!   they overwrite.
//! * **Buffers**: graph inputs, constants and graph outputs (loss, gradients, Fisher, ...)
//!   persist for the whole step (and parameters, momenta, running statistics and the Fisher
//!   across steps); an update's outputs share its inputs' buffers; a reshape shares its input's.
//!   Everything else is transient: its liveness (first write to last read) is known statically,
//!   and transient buffers are packed into one region, reusing addresses whose lifetimes do
//!   not overlap. The arena is the persistent region plus that region's peak.

use std::collections::{BTreeMap, HashMap};

use fisherc_ir::graph::{Graph, Output, PortRef};
use fisherc_ir::ops::{Op, Role};
use fisherc_ir::tensor::{DType, TensorType};
use petgraph::graph::NodeIndex;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::kir::Kernel;
use crate::lower::{Buf, LaunchArg, LowerOptions, Lowered, lower};

#[derive(Debug, Error)]
#[error("layer '{layer}' ({op}): {message}")]
pub struct PlanError {
    pub layer: String,
    pub op: String,
    pub message: String,
}

/// What a buffer holds and how long.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A graph input the host writes (images, labels, parameters, hyper-parameters, ...).
    Input(Role),
    /// A compile-time constant, written once.
    Constant(f32),
    /// A graph output, readable after the step.
    Output(Output),
    /// A value or scratch buffer that only lives between its first write and last read.
    Transient,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    /// e.g. `basic3.conv1/fused_conv:0` or `basic3.conv1/fused_conv:scratch0`.
    pub name: String,
    pub offset: u64,
    pub bytes: u64,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub kind: Kind,
}

/// A launch argument bound to a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arg {
    Buffer(usize),
    U32(u32),
    F32(f32),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedLaunch {
    /// Index into [`Program::kernels`].
    pub kernel: usize,
    pub grid: [u32; 2],
    pub block: u32,
    pub args: Vec<Arg>,
    /// Index into [`Program::nodes`]: the graph node this launch implements.
    pub node: usize,
}

/// One node of the scheduled graph: what it reads and writes, and its launches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedNode {
    /// The node's index in the compiled graph.
    pub graph_node: usize,
    pub layer: String,
    pub op: String,
    /// Buffers of its inputs and outputs, in port order.
    pub inputs: Vec<usize>,
    pub outputs: Vec<usize>,
    /// Its launches: `launches[first..first + count]` (none for inputs, constants, reshapes).
    pub first_launch: usize,
    pub launch_count: usize,
}

/// A whole step, ready to run: kernels, launches in order, buffers.
#[derive(Clone, Debug)]
pub struct Program {
    pub kernels: Vec<Kernel>,
    /// The graph's nodes in schedule order.
    pub nodes: Vec<PlannedNode>,
    pub launches: Vec<PlannedLaunch>,
    pub buffers: Vec<Buffer>,
    /// Bytes of the persistent region (inputs, constants, outputs).
    pub persistent_bytes: u64,
    /// Bytes of the whole arena.
    pub arena_bytes: u64,
    pub inputs: BTreeMap<Role, usize>,
    pub outputs: BTreeMap<Output, usize>,
}

impl Program {
    pub fn input(&self, role: &Role) -> Option<&Buffer> {
        self.inputs.get(role).map(|&b| &self.buffers[b])
    }

    pub fn output(&self, name: &Output) -> Option<&Buffer> {
        self.outputs.get(name).map(|&b| &self.buffers[b])
    }
}

/// Alignment of every buffer in the arena: what cudaMalloc guarantees, and a multiple of any
/// vector access a kernel makes.
pub const ALIGN: u64 = 256;

fn align(bytes: u64) -> u64 {
    bytes.div_ceil(ALIGN) * ALIGN
}

/// Nodes in an order where each comes after its inputs, the in-place updates last.
pub fn schedule(graph: &Graph) -> Vec<NodeIndex> {
    let in_place = |n: NodeIndex| {
        let node = graph.node(n);
        (0..node.outputs.len()).any(|port| node.op.in_place(port).is_some())
    };
    let order = graph.topo_order();
    let (mut first, last): (Vec<_>, Vec<_>) = order.into_iter().partition(|&n| !in_place(n));
    first.extend(last);
    first
}

/// Lowers every node and plans memory, in named passes: [`lower_nodes`] (kernels per node),
/// [`Buffers::assign`] (a buffer per value, shared by views and in-place updates, then each
/// node's scratch), [`liveness`] (each transient buffer's span in the schedule),
/// `Planner::place` (the arena's offsets) and [`launches`] (arguments bound to buffers, kernels
/// deduplicated by name).
pub fn plan(graph: &Graph, lowering: LowerOptions) -> Result<Program, PlanError> {
    let order = schedule(graph);
    let lowered = lower_nodes(graph, &order, lowering)?;
    let mut buffers = Buffers::assign(graph, &lowered);
    let live = liveness(graph, &order, &buffers);
    let (persistent_bytes, arena_bytes) = buffers.planner.place(&live);
    let (kernels, nodes, launches) = launches(graph, lowered, &buffers);
    let inputs = buffers
        .planner
        .buffers
        .iter()
        .enumerate()
        .filter_map(|(i, b)| match &b.kind {
            Kind::Input(role) => Some((role.clone(), i)),
            _ => None,
        })
        .collect();
    let outputs = graph
        .outputs()
        .iter()
        .map(|(name, value)| (name.clone(), buffers.of_value[value]))
        .collect();
    Ok(Program {
        kernels,
        nodes,
        launches,
        buffers: buffers.planner.buffers,
        persistent_bytes,
        arena_bytes,
        inputs,
        outputs,
    })
}

/// Every node of `order` lowered, in that order.
fn lower_nodes(
    graph: &Graph,
    order: &[NodeIndex],
    lowering: LowerOptions,
) -> Result<Vec<(NodeIndex, Lowered)>, PlanError> {
    order
        .iter()
        .map(|&n| {
            let node = graph.node(n);
            let inputs = graph.inputs(n);
            let input_types: Vec<&TensorType> = inputs.iter().map(|&p| graph.ty(p)).collect();
            let low =
                lower(&node.op, &input_types, &node.outputs, lowering).map_err(|e| PlanError {
                    layer: node.layer.clone(),
                    op: node.op.name().to_string(),
                    message: e.to_string(),
                })?;
            Ok((n, low))
        })
        .collect()
}

/// Which buffer holds each value and each node's scratch.
struct Buffers {
    planner: Planner,
    of_value: HashMap<PortRef, usize>,
    /// Per node, in schedule order: its scratch buffers.
    scratch: Vec<Vec<usize>>,
}

impl Buffers {
    /// A buffer for every value, in schedule order (a view's and an in-place update's shared
    /// with the input they reuse), then every node's scratch buffers.
    fn assign(graph: &Graph, lowered: &[(NodeIndex, Lowered)]) -> Buffers {
        let outputs: HashMap<PortRef, Output> = graph
            .outputs()
            .iter()
            .map(|(o, p)| (*p, o.clone()))
            .collect();
        let mut planner = Planner::default();
        let mut of_value: HashMap<PortRef, usize> = HashMap::new();
        for (n, low) in lowered {
            let node = graph.node(*n);
            let inputs = graph.inputs(*n);
            for (port, ty) in node.outputs.iter().enumerate() {
                let value = PortRef::new(*n, port);
                let shared = match low {
                    Lowered::Alias => Some(of_value[&inputs[0]]),
                    // the new state in place of the old
                    _ => node.op.in_place(port).map(|i| of_value[&inputs[i]]),
                };
                let id = shared.unwrap_or_else(|| {
                    let kind = match (low, &node.op, outputs.get(&value)) {
                        (Lowered::Input, Op::Input(input), _) => Kind::Input(input.role.clone()),
                        (Lowered::Constant(v), _, _) => Kind::Constant(*v),
                        (_, _, Some(name)) => Kind::Output(name.clone()),
                        _ => Kind::Transient,
                    };
                    let name = format!("{}/{}:{port}", node.layer, node.op.name());
                    planner.buffer(name, ty, kind)
                });
                of_value.insert(value, id);
            }
        }
        let scratch = lowered
            .iter()
            .map(|(n, low)| {
                let Lowered::Kernels { scratch, .. } = low else {
                    return Vec::new();
                };
                let node = graph.node(*n);
                scratch
                    .iter()
                    .enumerate()
                    .map(|(j, &bytes)| {
                        let ty = TensorType::f32(&[(bytes / 4) as usize]);
                        let name = format!("{}/{}:scratch{j}", node.layer, node.op.name());
                        planner.buffer(name, &ty, Kind::Transient)
                    })
                    .collect()
            })
            .collect();
        Buffers {
            planner,
            of_value,
            scratch,
        }
    }
}

/// Each buffer's span in schedule positions, from its first write to its last read: a value's
/// from its node to its last consumer, a scratch buffer's its node alone.
fn liveness(
    graph: &Graph,
    order: &[NodeIndex],
    buffers: &Buffers,
) -> HashMap<usize, (usize, usize)> {
    let position: HashMap<NodeIndex, usize> =
        order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut live: HashMap<usize, (usize, usize)> = HashMap::new();
    for (&value, &id) in &buffers.of_value {
        let def = position[&value.node];
        let span = live.entry(id).or_insert((def, def));
        span.0 = span.0.min(def);
        for (consumer, _) in graph.consumers(value) {
            span.1 = span.1.max(position[&consumer]);
        }
    }
    for (step, scratch) in buffers.scratch.iter().enumerate() {
        for &id in scratch {
            live.insert(id, (step, step));
        }
    }
    live
}

/// Every node's launches with their arguments bound to buffers, and the distinct kernels (by
/// name, in order of first use).
fn launches(
    graph: &Graph,
    lowered: Vec<(NodeIndex, Lowered)>,
    buffers: &Buffers,
) -> (Vec<Kernel>, Vec<PlannedNode>, Vec<PlannedLaunch>) {
    let of_value = &buffers.of_value;
    let mut kernels: Vec<Kernel> = Vec::new();
    let mut kernel_index: HashMap<String, usize> = HashMap::new();
    let mut launches = Vec::new();
    let mut nodes = Vec::with_capacity(lowered.len());
    for (step, (n, low)) in lowered.into_iter().enumerate() {
        let node = graph.node(n);
        let inputs = graph.inputs(n);
        let node_launches = match low {
            Lowered::Kernels { launches, .. } => launches,
            _ => Vec::new(),
        };
        nodes.push(PlannedNode {
            graph_node: n.index(),
            layer: node.layer.clone(),
            op: node.op.name().to_string(),
            inputs: inputs.iter().map(|p| of_value[p]).collect(),
            outputs: (0..node.outputs.len())
                .map(|port| of_value[&PortRef::new(n, port)])
                .collect(),
            first_launch: launches.len(),
            launch_count: node_launches.len(),
        });
        for launch in node_launches {
            let args = launch
                .args
                .iter()
                .map(|a| match *a {
                    LaunchArg::Buf(Buf::Input(i)) => Arg::Buffer(of_value[&inputs[i]]),
                    LaunchArg::Buf(Buf::Output(i)) => Arg::Buffer(of_value[&PortRef::new(n, i)]),
                    LaunchArg::Buf(Buf::Scratch(i)) => Arg::Buffer(buffers.scratch[step][i]),
                    LaunchArg::U32(v) => Arg::U32(v),
                    LaunchArg::F32(v) => Arg::F32(v),
                })
                .collect();
            let block = launch.kernel.block;
            let index = *kernel_index
                .entry(launch.kernel.name.clone())
                .or_insert_with(|| {
                    kernels.push(launch.kernel);
                    kernels.len() - 1
                });
            launches.push(PlannedLaunch {
                kernel: index,
                grid: launch.grid,
                block,
                args,
                node: step,
            });
        }
    }
    (kernels, nodes, launches)
}

#[derive(Default)]
struct Planner {
    buffers: Vec<Buffer>,
}

impl Planner {
    fn buffer(&mut self, name: String, ty: &TensorType, kind: Kind) -> usize {
        self.buffers.push(Buffer {
            name,
            offset: 0,
            bytes: ty.bytes().max(1) as u64,
            dtype: ty.dtype,
            shape: ty.shape.clone(),
            kind,
        });
        self.buffers.len() - 1
    }

    /// Places persistent buffers one after another, then transient ones first-fit by
    /// decreasing size among those whose lifetimes overlap. Returns (persistent, arena) bytes.
    fn place(&mut self, live: &HashMap<usize, (usize, usize)>) -> (u64, u64) {
        let mut next = 0;
        for b in self
            .buffers
            .iter_mut()
            .filter(|b| b.kind != Kind::Transient)
        {
            b.offset = next;
            next += align(b.bytes);
        }
        let persistent = next;
        let mut transient: Vec<usize> = (0..self.buffers.len())
            .filter(|&i| self.buffers[i].kind == Kind::Transient)
            .collect();
        transient.sort_by_key(|&i| (std::cmp::Reverse(self.buffers[i].bytes), i));
        let mut placed: Vec<(u64, u64, usize, usize)> = Vec::new(); // (start, end, first, last)
        let mut peak = 0;
        for i in transient {
            let (first, last) = live.get(&i).copied().unwrap_or((0, usize::MAX));
            let size = align(self.buffers[i].bytes);
            let mut overlapping: Vec<(u64, u64)> = placed
                .iter()
                .filter(|p| p.2 <= last && first <= p.3)
                .map(|p| (p.0, p.1))
                .collect();
            overlapping.sort_unstable();
            let mut offset = 0;
            for (start, end) in overlapping {
                if offset + size <= start {
                    break;
                }
                offset = offset.max(end);
            }
            placed.push((offset, offset + size, first, last));
            peak = peak.max(offset + size);
            self.buffers[i].offset = persistent + offset;
        }
        (persistent, persistent + peak)
    }
}
