//! Between the graph IR and the e-graph: loading a graph (every node with its layer and phase,
//! and a root over its outputs), and rebuilding a graph from the nodes an extraction chose.

use std::collections::{HashMap, HashSet};

use egg::Id;
use petgraph::graph::NodeIndex;

use super::ExtractionError;
use super::lang::{EGraph, ENode, Origin, PROJ, ROOT, Types, attr_symbol, decode, encode};
use crate::graph::{Graph, Output, Phase, PortRef};
use crate::ops::Op;

/// A graph loaded into an e-graph.
pub struct Loaded {
    pub egraph: EGraph,
    /// The root node's class: its inputs are the graph outputs, in order.
    pub root: Id,
    pub outputs: Vec<Output>,
}

/// An attribute leaf.
pub fn attr(egraph: &mut EGraph, text: &str) -> Id {
    egraph.add(ENode::Attr(text.into()))
}

/// `(proj index tuple)`.
pub fn proj(egraph: &mut EGraph, tuple: Id, index: usize) -> Id {
    let index = attr(egraph, &index.to_string());
    egraph.add(ENode::Op(PROJ.into(), vec![index, tuple]))
}

/// The e-node of `op` over input classes (not yet added).
pub fn op_node(egraph: &mut EGraph, op: &Op, inputs: &[Id]) -> ENode {
    let (name, attrs) = encode(op);
    let mut children = vec![attr(egraph, attrs.as_str())];
    children.extend_from_slice(inputs);
    ENode::Op(name, children)
}

/// Gives a class an origin unless it has one.
pub fn set_origin(egraph: &mut EGraph, id: Id, origin: &Option<Origin>) {
    let data = &mut egraph[id].data;
    if data.origin.is_none() {
        data.origin = origin.clone();
    }
}

pub fn load(graph: &Graph) -> Loaded {
    let mut egraph = EGraph::new(Types::default());
    let mut classes: HashMap<NodeIndex, Id> = HashMap::new();
    let value = |egraph: &mut EGraph, classes: &HashMap<NodeIndex, Id>, p: PortRef| {
        let class = classes[&p.node];
        if graph.node(p.node).outputs.len() > 1 {
            proj(egraph, class, p.port)
        } else {
            class
        }
    };
    for n in graph.topo_order() {
        let node = graph.node(n);
        let inputs: Vec<Id> = graph
            .inputs(n)
            .into_iter()
            .map(|p| value(&mut egraph, &classes, p))
            .collect();
        let enode = op_node(&mut egraph, &node.op, &inputs);
        let id = egraph.add(enode);
        let origin = Some(Origin {
            layer: node.layer.clone(),
            phase: node.phase,
        });
        set_origin(&mut egraph, id, &origin);
        classes.insert(n, id);
    }
    let mut children = vec![attr(&mut egraph, "outputs")];
    let mut outputs = Vec::new();
    for (name, p) in graph.outputs() {
        children.push(value(&mut egraph, &classes, *p));
        outputs.push(name.clone());
    }
    let root = egraph.add(ENode::Op(ROOT.into(), children));
    egraph.rebuild();
    Loaded {
        egraph,
        root,
        outputs,
    }
}

/// What a class became in the rebuilt graph.
#[derive(Clone, Copy)]
enum Built {
    Value(PortRef),
    Tuple(NodeIndex),
}

/// Rebuilds a graph from the chosen node of every class reachable from the root. Fails on a
/// cycle or a node that does not type-check (both would be optimizer bugs).
pub fn rebuild(
    egraph: &EGraph,
    root: Id,
    choices: &HashMap<Id, ENode>,
    outputs: &[Output],
) -> Result<Graph, ExtractionError> {
    let root_node = &choices[&egraph.find(root)];
    let mut graph = Graph::new();
    let mut built: HashMap<Id, Built> = HashMap::new();
    let mut on_path: HashSet<Id> = HashSet::new();
    let mut stack: Vec<(Id, bool)> = root_node
        .inputs()
        .iter()
        .rev()
        .map(|&c| (c, false))
        .collect();
    while let Some((class, children_done)) = stack.pop() {
        let class = egraph.find(class);
        if built.contains_key(&class) {
            continue;
        }
        let node = &choices[&class];
        if !children_done {
            if !on_path.insert(class) {
                return Err(format!("the extraction has a cycle through {node}").into());
            }
            stack.push((class, true));
            stack.extend(node.inputs().iter().rev().map(|&c| (c, false)));
            continue;
        }
        on_path.remove(&class);
        let made = build_node(egraph, &mut graph, class, node, &built)?;
        built.insert(class, made);
    }
    for (name, &class) in outputs.iter().zip(root_node.inputs()) {
        match built[&egraph.find(class)] {
            Built::Value(p) => graph.set_output(name.clone(), p),
            Built::Tuple(_) => return Err(format!("output {name} is a tuple").into()),
        }
    }
    Ok(graph)
}

fn build_node(
    egraph: &EGraph,
    graph: &mut Graph,
    class: Id,
    node: &ENode,
    built: &HashMap<Id, Built>,
) -> Result<Built, ExtractionError> {
    let input = |c: &Id| built[&egraph.find(*c)];
    let attrs = node
        .attr_leaf()
        .and_then(|leaf| attr_symbol(egraph, leaf))
        .ok_or_else(|| format!("{node} has no attribute leaf"))?;
    if node.name() == PROJ {
        let index: usize = attrs.as_str().parse().map_err(|_| "bad projection index")?;
        return match input(&node.inputs()[0]) {
            Built::Tuple(n) => Ok(Built::Value(PortRef::new(n, index))),
            Built::Value(_) => Err("a projection of a single value".into()),
        };
    }
    let op = decode(node.name(), attrs.as_str())?;
    let inputs = node
        .inputs()
        .iter()
        .map(|c| match input(c) {
            Built::Value(p) => Ok(p),
            Built::Tuple(_) => Err(ExtractionError(format!(
                "{} reads a whole tuple",
                op.name()
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let origin = egraph[class].data.origin.clone().unwrap_or(Origin {
        layer: "optimizer".to_string(),
        phase: Phase::Backward,
    });
    graph.set_phase(origin.phase);
    let n = graph
        .add(op, &origin.layer, &inputs)
        .map_err(|e| ExtractionError(e.to_string()))?;
    Ok(if graph.node(n).outputs.len() > 1 {
        Built::Tuple(n)
    } else {
        Built::Value(PortRef::new(n, 0))
    })
}
