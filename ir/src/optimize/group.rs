//! The optimizer's last pass: the step's per-parameter noisy updates become one
//! [`NoisySgdUpdateGroup`] node, so that the device updates every parameter tensor in a kernel
//! or a few instead of one launch each (ResNet44 has 137 parameter tensors, most of them a BN
//! layer's 16 to 64 channels: each launch is mostly fixed cost).
//!
//! Not an e-graph rule: a group has as many inputs as its members together, which no pattern of
//! fixed arity states. The pass rebuilds the graph with every other node as it was (layer and
//! phase kept) and the groups last, and points the graph's outputs at the groups' ports.
//! Updates that share their scalars (lr, μ, wd, s, seed, step: in a training step, all of
//! them) form one group; an update whose outputs another node reads stays alone.

use std::collections::{BTreeMap, HashMap, HashSet};

use petgraph::graph::NodeIndex;

use crate::error::ShapeError;
use crate::graph::{Graph, Phase, PortRef};
use crate::ops::{NoisySgdUpdate, NoisySgdUpdateGroup, Op};

/// The layer name of a group's node (its members' layers are their parameters').
pub const GROUP_LAYER: &str = "updates";

/// `graph` with its noisy updates grouped; the same graph where fewer than two can group.
pub fn group_updates(graph: &Graph) -> Result<Graph, ShapeError> {
    let groups: Vec<Vec<NodeIndex>> = groupable(graph)
        .into_values()
        .filter(|members| members.len() >= 2)
        .collect();
    if groups.is_empty() {
        return Ok(graph.clone());
    }
    let grouped: HashSet<NodeIndex> = groups.iter().flatten().copied().collect();

    let mut out = Graph::new();
    let mut moved: HashMap<PortRef, PortRef> = HashMap::new();
    // in index order, which is topological (a graph only adds nodes over existing values) and
    // keeps the schedule, and so the memory plan, as it was
    for n in graph.node_indices() {
        if grouped.contains(&n) {
            continue;
        }
        let node = graph.node(n);
        let inputs: Vec<PortRef> = graph.inputs(n).iter().map(|p| moved[p]).collect();
        out.set_phase(node.phase);
        let copy = out.add(node.op.clone(), &node.layer, &inputs)?;
        for port in 0..node.outputs.len() {
            moved.insert(PortRef::new(n, port), PortRef::new(copy, port));
        }
    }

    out.set_phase(Phase::Update);
    for members in groups {
        let group = NoisySgdUpdateGroup {
            members: members
                .iter()
                .map(|&n| update_of(graph, n).clone())
                .collect(),
        };
        let ports = group.ports();
        let mut inputs: Vec<Option<PortRef>> = vec![None; group.input_count()];
        for (&n, member) in members.iter().zip(&ports) {
            for (&at, p) in member.inputs.iter().zip(graph.inputs(n)) {
                inputs[at] = Some(moved[&p]);
            }
        }
        let inputs: Vec<PortRef> = inputs
            .into_iter()
            .map(|p| p.expect("every input of a group is some member's"))
            .collect();
        let node = out.add(group, GROUP_LAYER, &inputs)?;
        for (&n, member) in members.iter().zip(&ports) {
            for (port, at) in member.outputs.clone().enumerate() {
                moved.insert(PortRef::new(n, port), PortRef::new(node, at));
            }
        }
    }

    for (name, p) in graph.outputs() {
        out.set_output(name.clone(), moved[p]);
    }
    Ok(out)
}

fn update_of(graph: &Graph, n: NodeIndex) -> &NoisySgdUpdate {
    match &graph.node(n).op {
        Op::NoisySgdUpdate(u) => u,
        other => unreachable!("groupable() takes updates only, not {}", other.name()),
    }
}

/// The updates that may group, by the scalars they share, each group in parameter order.
fn groupable(graph: &Graph) -> BTreeMap<Vec<PortRef>, Vec<NodeIndex>> {
    let shared = NoisySgdUpdate::LR..NoisySgdUpdate::NOISE;
    let mut groups: BTreeMap<Vec<PortRef>, Vec<NodeIndex>> = BTreeMap::new();
    for n in graph.node_indices() {
        let node = graph.node(n);
        if !matches!(node.op, Op::NoisySgdUpdate(_)) {
            continue;
        }
        let read =
            (0..node.outputs.len()).any(|port| !graph.consumers(PortRef::new(n, port)).is_empty());
        if !read {
            let inputs = graph.inputs(n);
            groups
                .entry(inputs[shared.clone()].to_vec())
                .or_default()
                .push(n);
        }
    }
    for members in groups.values_mut() {
        members.sort_by_key(|&n| (update_of(graph, n).param, n.index()));
    }
    groups
}
