//! The optimizer's last pass: the step's per-tensor updates become [`Group`]s, so that the
//! device runs them in a kernel or a few instead of one launch each. ResNet44 has 137
//! parameter tensors and 45 BN layers, most of them 16 to 64 channels: each launch was mostly
//! fixed cost.
//!
//! Not an e-graph rule: a group has as many inputs as its members together, which no pattern of
//! fixed arity states. The pass rebuilds the graph with every other node as it was (layer,
//! phase and order kept) and the groups last, and points the graph's outputs at the groups'
//! ports. Nodes group when they are of one [`Groupable`] kind, read the same shared inputs
//! (an update's lr, μ, wd, s, seed and step: in a training step, all of them) and no other
//! node reads their outputs; a kind with fewer than two such nodes stays as it was.

use std::collections::{BTreeMap, HashMap, HashSet};

use petgraph::graph::NodeIndex;

use crate::error::ShapeError;
use crate::graph::{Graph, Phase, PortRef};
use crate::ops::{Group, Groupable, MemberPorts, Op};

/// The layer name of a group's node (its members' layers are their tensors').
pub const GROUP_LAYER: &str = "updates";

/// Nodes to group, in graph order, the group's op and where each member sits in it.
struct Grouping {
    members: Vec<NodeIndex>,
    op: Op,
    ports: Vec<MemberPorts>,
    input_count: usize,
}

/// `graph` with its updates grouped; the same graph where nothing groups.
pub fn group_updates(graph: &Graph) -> Result<Graph, ShapeError> {
    let mut groupings = kind_groupings(graph, |op| match op {
        Op::NoisySgdUpdate(u) => Some(u),
        _ => None,
    });
    groupings.extend(kind_groupings(graph, |op| match op {
        Op::BnRunningUpdate(u) => Some(u),
        _ => None,
    }));
    if groupings.is_empty() {
        return Ok(graph.clone());
    }
    let grouped: HashSet<NodeIndex> = groupings.iter().flat_map(|g| g.members.clone()).collect();

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
    for Grouping {
        members,
        op,
        ports,
        input_count,
    } in groupings
    {
        let mut inputs: Vec<Option<PortRef>> = vec![None; input_count];
        for (&n, member) in members.iter().zip(&ports) {
            for (&at, p) in member.inputs.iter().zip(graph.inputs(n)) {
                inputs[at] = Some(moved[&p]);
            }
        }
        let inputs: Vec<PortRef> = inputs
            .into_iter()
            .map(|p| p.expect("every input of a group is some member's"))
            .collect();
        let node = out.add(op, GROUP_LAYER, &inputs)?;
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

/// The groups of one kind (`member_of` picks its nodes): by the shared inputs they read.
fn kind_groupings<M>(graph: &Graph, member_of: impl Fn(&Op) -> Option<&M>) -> Vec<Grouping>
where
    M: Groupable,
    Op: From<Group<M>>,
{
    let mut by_shared: BTreeMap<Vec<PortRef>, Vec<NodeIndex>> = BTreeMap::new();
    for n in graph.node_indices() {
        let node = graph.node(n);
        if member_of(&node.op).is_none() {
            continue;
        }
        let read =
            (0..node.outputs.len()).any(|port| !graph.consumers(PortRef::new(n, port)).is_empty());
        if !read {
            let shared = graph.inputs(n)[M::SHARED].to_vec();
            by_shared.entry(shared).or_default().push(n);
        }
    }
    by_shared
        .into_values()
        .filter(|members| members.len() >= 2)
        .map(|members| {
            let group = Group {
                members: members
                    .iter()
                    .map(|&n| member_of(&graph.node(n).op).expect("chosen above").clone())
                    .collect(),
            };
            Grouping {
                members,
                ports: group.ports(),
                input_count: group.input_count(),
                op: Op::from(group),
            }
        })
        .collect()
}
