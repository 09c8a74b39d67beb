//! Reverse-mode differentiation over the graph.
//!
//! Walks the nodes that lie between the requested inputs and the seeded outputs in reverse
//! topological order, calling each op's `vjp` rule (defined with the op in `ops/`) and summing
//! the gradients of values that have several readers. The backward nodes are added to the same
//! graph, tagged [`Phase::Backward`] (or the phase the caller names) and named after the layer they differentiate.

use std::collections::{HashMap, HashSet};

use petgraph::graph::NodeIndex;

use crate::error::ShapeError;
use crate::graph::{Graph, Phase, PortRef};
use crate::ops::{Add, VjpCtx};
use crate::tensor::DType;

/// The total gradient of every value the backward pass reached.
#[derive(Clone, Debug, Default)]
pub struct Gradients {
    totals: HashMap<PortRef, PortRef>,
}

impl Gradients {
    /// The gradient of `value`, if any gradient reached it.
    pub fn of(&self, value: PortRef) -> Option<PortRef> {
        self.totals.get(&value).copied()
    }
}

/// Adds backward nodes computing the gradients of `wrt` given `seeds`: pairs of (value, the
/// gradient arriving at it), e.g. (loss, 1). Returns the gradients of everything in between.
pub fn backward(
    graph: &mut Graph,
    seeds: &[(PortRef, PortRef)],
    wrt: &[PortRef],
) -> Result<Gradients, ShapeError> {
    backward_in(Phase::Backward, graph, seeds, wrt)
}

/// [`backward`] with its nodes tagged `phase`: a second backward pass (full-Fisher noise)
/// belongs to the Fisher phase.
pub fn backward_in(
    phase: Phase,
    graph: &mut Graph,
    seeds: &[(PortRef, PortRef)],
    wrt: &[PortRef],
) -> Result<Gradients, ShapeError> {
    let order = graph.topo_order();
    let active = active_nodes(graph, &order, seeds, wrt);
    graph.set_phase(phase);

    let mut pending: HashMap<PortRef, Vec<PortRef>> = HashMap::new();
    for &(value, grad) in seeds {
        pending.entry(value).or_default().push(grad);
    }
    let mut grads = Gradients::default();
    for &node in order.iter().rev() {
        if !active.contains(&node) {
            continue;
        }
        let outputs: Vec<PortRef> = (0..graph.node(node).outputs.len())
            .map(|port| PortRef::new(node, port))
            .collect();
        let mut douts = Vec::with_capacity(outputs.len());
        for &out in &outputs {
            let total = sum(graph, pending.remove(&out).unwrap_or_default())?;
            if let Some(t) = total {
                grads.totals.insert(out, t);
            }
            douts.push(total);
        }
        if douts.iter().all(Option::is_none) {
            continue;
        }
        let inputs = graph.inputs(node);
        let wants = inputs
            .iter()
            .map(|p| active.contains(&p.node) && graph.ty(*p).dtype == DType::F32)
            .collect();
        let op = graph.node(node).op.clone();
        let mut cx = VjpCtx {
            layer: graph.node(node).layer.clone(),
            graph: &mut *graph,
            inputs: inputs.clone(),
            outputs,
            douts,
            wants,
        };
        let input_grads = op.vjp(&mut cx)?;
        let wants = cx.wants;
        for ((input, grad), wanted) in inputs.into_iter().zip(input_grads).zip(wants) {
            if let (Some(grad), true) = (grad, wanted) {
                pending.entry(input).or_default().push(grad);
            }
        }
    }
    Ok(grads)
}

/// Nodes that depend on some `wrt` value and that some seeded value depends on.
fn active_nodes(
    graph: &Graph,
    order: &[NodeIndex],
    seeds: &[(PortRef, PortRef)],
    wrt: &[PortRef],
) -> HashSet<NodeIndex> {
    let mut from_wrt: HashSet<NodeIndex> = wrt.iter().map(|p| p.node).collect();
    for &node in order {
        if graph
            .inputs(node)
            .iter()
            .any(|p| from_wrt.contains(&p.node))
        {
            from_wrt.insert(node);
        }
    }
    let mut to_seed: HashSet<NodeIndex> = seeds.iter().map(|(v, _)| v.node).collect();
    for &node in order.iter().rev() {
        if to_seed.contains(&node) {
            for p in graph.inputs(node) {
                to_seed.insert(p.node);
            }
        }
    }
    from_wrt.intersection(&to_seed).copied().collect()
}

/// Sums gradient contributions in arrival order; named after the first contribution's layer.
fn sum(graph: &mut Graph, parts: Vec<PortRef>) -> Result<Option<PortRef>, ShapeError> {
    let mut parts = parts.into_iter();
    let Some(mut total) = parts.next() else {
        return Ok(None);
    };
    for part in parts {
        let layer = graph.node(total.node).layer.clone();
        total = graph.add1(Add, &layer, &[total, part])?;
    }
    Ok(Some(total))
}
