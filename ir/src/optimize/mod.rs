//! The equality-saturation optimizer: graph → e-graph → rules → cheapest equivalent graph.
//!
//! ```text
//! Graph ──convert::load──▶ e-graph ──egg Runner(rules::all)──▶ saturated e-graph
//!       ──extract (DAG, cost::H100 roofline)──▶ choices ──convert::rebuild──▶ Graph
//!       ──group::group_updates──▶ Graph (the noisy updates one node)
//! ```
//!
//! The optimised graph has the same inputs (by role) and outputs (by name) as the original; the
//! differential tests run both on the CPU reference and compare.

pub mod convert;
pub mod cost;
pub mod extract;
pub mod group;
pub mod lang;
pub mod rules;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use egg::{Id, Language, Runner};
use serde::Serialize;
use thiserror::Error;

use cost::{Cost, Device, H100, node_cost};
use lang::{EGraph, ENode, Types, value_type};
use rules::Rule;

use crate::graph::Graph;
use crate::ops::Op;
use crate::tensor::TensorType;

/// Limits on saturation.
#[derive(Clone, Debug)]
pub struct Limits {
    pub nodes: usize,
    pub iterations: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            nodes: 200_000,
            iterations: 40,
            time: Duration::from_secs(10),
        }
    }
}

/// What the optimizer did, for `fisherc inspect --optimize`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// How often each rule fired (added or merged something).
    pub rules: BTreeMap<String, usize>,
    pub ops_before: BTreeMap<&'static str, usize>,
    pub ops: BTreeMap<&'static str, usize>,
    pub before: Cost,
    pub after: Cost,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    pub iterations: usize,
    pub stop_reason: String,
    pub seconds: f64,
}

/// What went wrong choosing and rebuilding the optimised graph: a cycle, a node that does not
/// type-check, an undecodable op. Each would be an optimizer bug; the message says where.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct ExtractionError(pub String);

impl From<String> for ExtractionError {
    fn from(message: String) -> ExtractionError {
        ExtractionError(message)
    }
}

impl From<&str> for ExtractionError {
    fn from(message: &str) -> ExtractionError {
        ExtractionError(message.to_string())
    }
}

impl From<lang::DecodeError> for ExtractionError {
    fn from(e: lang::DecodeError) -> ExtractionError {
        ExtractionError(e.to_string())
    }
}

#[derive(Debug, Error)]
pub enum OptimizeError {
    #[error("a rewrite merged values of different types ({0} times): a rule is not an equality")]
    TypeConflict(usize),
    #[error("extraction failed: {0}")]
    Extraction(#[from] ExtractionError),
    #[error("grouping the updates: {0}")]
    Grouping(#[from] crate::error::ShapeError),
}

/// An optimised graph and the report of how it was found.
#[derive(Clone, Debug)]
pub struct Optimized {
    pub graph: Graph,
    pub report: Report,
}

/// Optimises with every rule.
pub fn optimize(graph: &Graph) -> Result<Optimized, OptimizeError> {
    optimize_with(graph, &rules::all(), &Limits::default(), &H100)
}

/// Optimises with the given rules and limits, choosing by the cost model of `device`.
pub fn optimize_with(
    graph: &Graph,
    rules: &[Rule],
    limits: &Limits,
    device: &Device,
) -> Result<Optimized, OptimizeError> {
    let started = Instant::now();
    let loaded = convert::load(graph);
    let runner = Runner::default()
        .with_egraph(loaded.egraph)
        .with_node_limit(limits.nodes)
        .with_iter_limit(limits.iterations)
        .with_time_limit(limits.time)
        .run(rules);
    let mut egraph = runner.egraph;
    if egraph.analysis.conflicts > 0 {
        return Err(OptimizeError::TypeConflict(egraph.analysis.conflicts));
    }
    inherit_origins(&mut egraph, loaded.root);

    let cost = |class, node: &ENode| own_cost(&egraph, class, node, device);
    let choices = extract::extract(&egraph, loaded.root, cost)?;
    let extracted = convert::rebuild(&egraph, loaded.root, &choices, &loaded.outputs)?;
    let optimized = group::group_updates(&extracted)?;

    let mut fired = BTreeMap::new();
    for iteration in &runner.iterations {
        for (rule, count) in &iteration.applied {
            *fired.entry(rule.to_string()).or_insert(0) += count;
        }
    }
    let report = Report {
        rules: fired,
        ops_before: graph.op_counts(),
        ops: optimized.op_counts(),
        before: cost::graph_cost(graph, device),
        after: cost::graph_cost(&optimized, device),
        egraph_nodes: egraph.total_number_of_nodes(),
        egraph_classes: egraph.number_of_classes(),
        iterations: runner.iterations.len(),
        stop_reason: runner
            .stop_reason
            .as_ref()
            .map_or_else(String::new, |r| format!("{r:?}")),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(Optimized {
        graph: optimized,
        report,
    })
}

/// A node's own cost for extraction: its kernel's roofline time, 0 for leaves, projections
/// and the root, infinite if it does not type-check.
fn own_cost(egraph: &EGraph, class: Id, node: &ENode, device: &Device) -> f64 {
    let Some(op) = Types::op_of(egraph, node) else {
        return 0.0;
    };
    let inputs: Option<Vec<&TensorType>> = node
        .inputs()
        .iter()
        .map(|&c| value_type(egraph, c))
        .collect();
    let (Some(inputs), Some(outputs)) = (inputs, egraph[class].data.types.as_ref()) else {
        return f64::INFINITY;
    };
    let seconds = node_cost(&op, &inputs, outputs, device).seconds;
    // a lone op lifted into an elementwise program costs the same: keep the plain op
    if matches!(op, Op::Elementwise(_)) {
        seconds * (1.0 + 1e-9)
    } else {
        seconds
    }
}

/// Classes created by declarative rules have no origin; they take their parent's.
fn inherit_origins(egraph: &mut EGraph, root: Id) {
    let mut queue = VecDeque::from([egraph.find(root)]);
    let mut seen = std::collections::HashSet::new();
    while let Some(class) = queue.pop_front() {
        if !seen.insert(class) {
            continue;
        }
        let origin = egraph[class].data.origin.clone();
        let children: Vec<Id> = egraph[class]
            .nodes
            .iter()
            .flat_map(|n| n.children().to_vec())
            .collect();
        for child in children {
            let child = egraph.find(child);
            convert::set_origin(egraph, child, &origin);
            queue.push_back(child);
        }
    }
}
