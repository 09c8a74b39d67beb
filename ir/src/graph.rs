//! The graph IR: a petgraph DAG of typed op nodes.
//!
//! Every node holds an [`Op`] (with its attributes), the layer name it came from (used in every
//! error message) and the static types of its outputs, inferred when the node is added: a graph
//! that exists is well-typed. Edges carry (output port → input port), so multi-output ops such as
//! batch norm are native. Graph outputs are named by [`Output`] so that later passes (optimizer,
//! codegen) can rewrite the inside of the graph and still be compared output for output.
//!
//! This file owns structure and typing only; what each op computes lives in `ops/`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use serde::{Deserialize, Serialize};

use crate::error::ShapeError;
use crate::ops::{Op, RuleGraph};
pub use crate::port::PortRef;
use crate::tensor::TensorType;

/// Largest tensor a graph may hold (4 TiB of f32): far beyond any device, small enough that
/// sizes and FLOP counts cannot overflow.
pub const MAX_ELEMENTS: usize = 1 << 40;

/// An edge: which output of the source feeds which input of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    pub from_port: usize,
    pub to_port: usize,
}

/// Which part of the training step a node belongs to (for reports; no semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Forward,
    Backward,
    Fisher,
    Update,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Forward,
        Phase::Backward,
        Phase::Fisher,
        Phase::Update,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Fisher => "fisher",
            Phase::Update => "update",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    /// The layer this node computes or differentiates, e.g. `basic3.conv1`.
    pub layer: String,
    pub outputs: Vec<TensorType>,
    pub phase: Phase,
}

/// A named output of a graph, stable across optimisation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    Loss,
    Logits,
    /// Gradient of the loss for parameter `i`.
    Grad(usize),
    /// Diagonal Fisher estimate F̂ for parameter `i`.
    Fisher(usize),
    /// Parameter `i` after the update.
    NewParam(usize),
    /// Momentum buffer of parameter `i` after the update.
    NewMomentum(usize),
    /// Running mean of batch-norm layer `i` after the step.
    NewRunningMean(usize),
    NewRunningVar(usize),
    /// K-FAC: the batch's input factor `Ā` of the layer whose weight is parameter `i` (zeros
    /// on a step that does not refresh the factors).
    KfacInputFactor(usize),
    /// K-FAC: that layer's gradient factor `Ḡ`.
    KfacGradFactor(usize),
    /// Any other value a caller wants to observe (tests, tools).
    Named(String),
}

impl Output {
    /// Whether this is one of a K-FAC layer's factors.
    pub fn is_kfac_factor(&self) -> bool {
        matches!(self, Output::KfacInputFactor(_) | Output::KfacGradFactor(_))
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Output::Loss => write!(f, "loss"),
            Output::Logits => write!(f, "logits"),
            Output::Grad(i) => write!(f, "grad[{i}]"),
            Output::Fisher(i) => write!(f, "fisher[{i}]"),
            Output::NewParam(i) => write!(f, "param[{i}]"),
            Output::NewMomentum(i) => write!(f, "momentum[{i}]"),
            Output::NewRunningMean(i) => write!(f, "running_mean[{i}]"),
            Output::NewRunningVar(i) => write!(f, "running_var[{i}]"),
            Output::KfacInputFactor(i) => write!(f, "kfac_input_factor[{i}]"),
            Output::KfacGradFactor(i) => write!(f, "kfac_grad_factor[{i}]"),
            Output::Named(s) => write!(f, "{s}"),
        }
    }
}

/// A typed dataflow graph.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    graph: DiGraph<Node, Edge>,
    outputs: Vec<(Output, PortRef)>,
    /// Where each name is in `outputs`: a step has a few outputs per parameter, and a deep
    /// model's tens of thousands must not be searched one by one.
    output_index: HashMap<Output, usize>,
    phase: Option<Phase>,
}

impl Graph {
    pub fn new() -> Self {
        Graph::default()
    }

    /// Phase recorded on the nodes added from now on.
    pub fn set_phase(&mut self, phase: Phase) {
        self.phase = Some(phase);
    }

    /// Adds a node, inferring its output types; fails with the layer, op and the mismatch.
    pub fn add(
        &mut self,
        op: impl Into<Op>,
        layer: &str,
        inputs: &[PortRef],
    ) -> Result<NodeIndex, ShapeError> {
        let op = op.into();
        let input_types: Vec<&TensorType> = inputs.iter().map(|&p| self.ty(p)).collect();
        let error = |message| ShapeError {
            layer: layer.to_string(),
            op: op.name(),
            message,
        };
        let outputs = op.infer(&input_types).map_err(|e| error(e.0))?;
        if let Some(t) = outputs
            .iter()
            .find(|t| t.checked_numel().is_none_or(|n| n > MAX_ELEMENTS))
        {
            return Err(error(format!("output {t} has more than 2^40 elements")));
        }
        let node = self.graph.add_node(Node {
            op,
            layer: layer.to_string(),
            outputs,
            phase: self.phase.unwrap_or(Phase::Forward),
        });
        for (to_port, src) in inputs.iter().enumerate() {
            self.graph.add_edge(
                src.node,
                node,
                Edge {
                    from_port: src.port,
                    to_port,
                },
            );
        }
        Ok(node)
    }

    /// Adds a single-output node and returns its output.
    pub fn add1(
        &mut self,
        op: impl Into<Op>,
        layer: &str,
        inputs: &[PortRef],
    ) -> Result<PortRef, ShapeError> {
        Ok(PortRef::new(self.add(op, layer, inputs)?, 0))
    }

    pub fn node(&self, n: NodeIndex) -> &Node {
        &self.graph[n]
    }

    pub fn node_count(&self) -> usize {
        self.graph.node_count()
    }

    pub fn node_indices(&self) -> impl Iterator<Item = NodeIndex> + '_ {
        self.graph.node_indices()
    }

    /// The static type of a value.
    pub fn ty(&self, p: PortRef) -> &TensorType {
        &self.graph[p.node].outputs[p.port]
    }

    /// Every output of node `n`.
    pub fn outputs_of(&self, n: NodeIndex) -> Vec<PortRef> {
        (0..self.graph[n].outputs.len())
            .map(|port| PortRef::new(n, port))
            .collect()
    }

    /// The node's inputs, in input-port order.
    pub fn inputs(&self, n: NodeIndex) -> Vec<PortRef> {
        let mut edges: Vec<(usize, PortRef)> = self
            .graph
            .edges_directed(n, Direction::Incoming)
            .map(|e| {
                (
                    e.weight().to_port,
                    PortRef::new(e.source(), e.weight().from_port),
                )
            })
            .collect();
        edges.sort_by_key(|(to_port, _)| *to_port);
        edges.into_iter().map(|(_, p)| p).collect()
    }

    /// Every (consumer node, input port) that reads the value.
    pub fn consumers(&self, p: PortRef) -> Vec<(NodeIndex, usize)> {
        self.graph
            .edges_directed(p.node, Direction::Outgoing)
            .filter(|e| e.weight().from_port == p.port)
            .map(|e| (e.target(), e.weight().to_port))
            .collect()
    }

    /// Number of readers of each value, graph outputs included.
    pub fn use_counts(&self) -> HashMap<PortRef, usize> {
        let mut counts = HashMap::new();
        for e in self.graph.edge_references() {
            *counts
                .entry(PortRef::new(e.source(), e.weight().from_port))
                .or_insert(0) += 1;
        }
        for (_, p) in &self.outputs {
            *counts.entry(*p).or_insert(0) += 1;
        }
        counts
    }

    /// Nodes in an order where every node comes after its inputs.
    pub fn topo_order(&self) -> Vec<NodeIndex> {
        petgraph::algo::toposort(&self.graph, None)
            .expect("graphs are built from existing values only, so they cannot have cycles")
    }

    pub fn set_output(&mut self, name: Output, value: PortRef) {
        match self.output_index.get(&name) {
            Some(&i) => self.outputs[i].1 = value,
            None => {
                self.output_index.insert(name.clone(), self.outputs.len());
                self.outputs.push((name, value));
            }
        }
    }

    pub fn outputs(&self) -> &[(Output, PortRef)] {
        &self.outputs
    }

    pub fn output(&self, name: &Output) -> Option<PortRef> {
        self.output_index.get(name).map(|&i| self.outputs[i].1)
    }

    /// Node count per op name.
    pub fn op_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for n in self.graph.node_weights() {
            *counts.entry(n.op.name()).or_insert(0) += 1;
        }
        counts
    }

    /// The floating-point operations node `n`'s op does.
    pub fn node_flops(&self, n: NodeIndex) -> u64 {
        let inputs = self.inputs(n);
        let input_types: Vec<&TensorType> = inputs.iter().map(|&p| self.ty(p)).collect();
        self.graph[n].op.flops(&input_types, &self.graph[n].outputs)
    }

    /// Floating-point operations of one evaluation, per phase.
    pub fn flops_by_phase(&self) -> BTreeMap<Phase, u64> {
        let mut by_phase = BTreeMap::new();
        for n in self.graph.node_indices() {
            let total = by_phase.entry(self.graph[n].phase).or_insert(0u64);
            *total = total.saturating_add(self.node_flops(n));
        }
        by_phase
    }

    pub fn flops(&self) -> u64 {
        self.flops_by_phase()
            .values()
            .fold(0, |a, &b| a.saturating_add(b))
    }

    /// Edge index, for passes that need to see raw petgraph structure.
    pub fn petgraph(&self) -> &DiGraph<Node, Edge> {
        &self.graph
    }
}

/// The graph as the ops' gradient and Fisher rules see it.
impl RuleGraph for Graph {
    fn add_node(
        &mut self,
        op: Op,
        layer: &str,
        inputs: &[PortRef],
    ) -> Result<Vec<PortRef>, ShapeError> {
        let node = self.add(op, layer, inputs)?;
        Ok(self.outputs_of(node))
    }

    fn ty(&self, p: PortRef) -> &TensorType {
        Graph::ty(self, p)
    }
}
