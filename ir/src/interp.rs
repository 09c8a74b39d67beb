//! The CPU reference interpreter: runs a graph node by node with each op's `eval`.
//!
//! This is the correctness oracle for every optimisation and kernel, and the CPU backend.
//! Generic over the float type: `f32` to train, `f64` for gradient checks. Values are dropped as
//! soon as their last reader has run, unless they are graph outputs or asked to be kept.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::error::EvalError;
use crate::graph::{Graph, Output, PortRef};
use crate::ops::{Op, Role};
use crate::tensor::{Real, Value};

/// Input values by role.
pub type Feeds<T> = BTreeMap<Role, Value<T>>;

/// The values an evaluation produced: the graph's outputs and any values asked to be kept.
#[derive(Clone, Debug)]
pub struct Evaluation<T> {
    outputs: BTreeMap<Output, Value<T>>,
    kept: HashMap<PortRef, Value<T>>,
}

impl<T: Real> Evaluation<T> {
    pub fn output(&self, name: &Output) -> Option<&Value<T>> {
        self.outputs.get(name)
    }

    pub fn outputs(&self) -> &BTreeMap<Output, Value<T>> {
        &self.outputs
    }

    pub fn into_outputs(self) -> BTreeMap<Output, Value<T>> {
        self.outputs
    }

    /// A value passed in `keep`.
    pub fn kept(&self, value: PortRef) -> Option<&Value<T>> {
        self.kept.get(&value)
    }

    /// The loss, when the graph has one.
    pub fn loss(&self) -> Option<T> {
        self.output(&Output::Loss).map(|v| v.float_scalar())
    }
}

/// Evaluates `graph` with the given inputs, keeping the values in `keep` as well as the
/// graph's outputs.
pub fn evaluate<T: Real>(
    graph: &Graph,
    feeds: &Feeds<T>,
    keep: &[PortRef],
) -> Result<Evaluation<T>, EvalError> {
    let error = |node: &crate::graph::Node, message: String| EvalError {
        layer: node.layer.clone(),
        op: node.op.name(),
        message,
    };
    let mut remaining_uses = graph.use_counts();
    let pinned: HashSet<PortRef> = keep
        .iter()
        .copied()
        .chain(graph.outputs().iter().map(|(_, p)| *p))
        .collect();
    let mut values: HashMap<PortRef, Value<T>> = HashMap::new();

    for n in graph.topo_order() {
        let node = graph.node(n);
        let outputs = match &node.op {
            Op::Input(input) => {
                let value = feeds.get(&input.role).ok_or_else(|| {
                    error(node, format!("no value fed for input '{}'", input.role))
                })?;
                if !value.has_type(&input.ty) {
                    return Err(error(
                        node,
                        format!(
                            "input '{}' expects {}, but was fed {}{:?}",
                            input.role,
                            input.ty,
                            value.dtype(),
                            value.shape()
                        ),
                    ));
                }
                vec![value.clone()]
            }
            op => {
                let inputs = graph.inputs(n);
                let args: Vec<&Value<T>> = inputs.iter().map(|p| &values[p]).collect();
                let outputs = op
                    .eval(&args, &node.outputs)
                    .map_err(|e| error(node, e.0))?;
                release(&inputs, &mut remaining_uses, &pinned, &mut values);
                outputs
            }
        };
        debug_assert!(
            outputs
                .iter()
                .zip(&node.outputs)
                .all(|(v, t)| v.has_type(t)),
            "{} produced values that do not match its inferred types",
            node.op.name()
        );
        for (port, value) in outputs.into_iter().enumerate() {
            let p = PortRef::new(n, port);
            if remaining_uses.get(&p).copied().unwrap_or(0) > 0 || pinned.contains(&p) {
                values.insert(p, value);
            }
        }
    }

    let outputs = graph
        .outputs()
        .iter()
        .map(|(name, p)| (name.clone(), values[p].clone()))
        .collect();
    let kept = keep.iter().map(|p| (*p, values[p].clone())).collect();
    Ok(Evaluation { outputs, kept })
}

/// Drops the values whose last reader has just run.
fn release<T>(
    inputs: &[PortRef],
    remaining_uses: &mut HashMap<PortRef, usize>,
    pinned: &HashSet<PortRef>,
    values: &mut HashMap<PortRef, Value<T>>,
) {
    for p in inputs {
        let uses = remaining_uses.get_mut(p).expect("every input is counted");
        *uses -= 1;
        if *uses == 0 && !pinned.contains(p) {
            values.remove(p);
        }
    }
}
