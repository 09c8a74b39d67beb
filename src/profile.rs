//! `fisherc run --profile`: one step timed node by node, as a table by op and the slowest
//! nodes, each with its achieved FLOP/s and bytes/s (the op's FLOPs and the bytes of its
//! inputs and outputs, each counted once: what a perfectly fused kernel would move).

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Result;
use fisherc_codegen::artifact::Plan;
use fisherc_codegen::plan::PlannedNode;
use fisherc_ir::graph::Graph;
use petgraph::graph::NodeIndex;
use serde::Serialize;

/// Rows in the list of slowest nodes.
const SLOWEST: usize = 12;

#[derive(Default)]
struct Tally {
    nodes: usize,
    launches: usize,
    seconds: f64,
    flops: u64,
    bytes: u64,
}

impl Tally {
    fn add(&mut self, launches: usize, seconds: f64, flops: u64, bytes: u64) {
        self.nodes += 1;
        self.launches += launches;
        self.seconds += seconds;
        self.flops += flops;
        self.bytes += bytes;
    }

    /// `ms  %  GFLOP/s  GB/s` of this tally within a step of `total` seconds.
    fn columns(&self, total: f64) -> String {
        let rate = |x: u64| x as f64 / self.seconds.max(1e-12) / 1e9;
        format!(
            "{:>10.3} {:>6.1} {:>9.1} {:>8.1}",
            self.seconds * 1e3,
            100.0 * self.seconds / total.max(1e-12),
            rate(self.flops),
            rate(self.bytes)
        )
    }
}

/// One op's share of a profiled step (for `fisherc bench`'s JSON).
#[derive(Clone, Debug, Serialize)]
pub struct OpRow {
    pub op: String,
    pub nodes: usize,
    pub launches: usize,
    pub ms: f64,
    pub percent: f64,
    pub gflop_per_s: f64,
    pub gb_per_s: f64,
}

/// One node's share of a profiled step (for `fisherc bench`'s JSON): its kernels by name, so
/// that a time can be set beside that kernel's loop estimate (`scripts/sass-loops.py`); for
/// a GEMM node, how its kernels multiply (`tf32 mma m16n8k8`, `3xtf32 mma …`, `fp32 fma`)
/// and the share of that unit's peak its FLOPs reach, where the card's is known (`bench`
/// fills it in).
#[derive(Clone, Debug, Serialize)]
pub struct NodeRow {
    pub layer: String,
    pub op: String,
    pub kernels: Vec<String>,
    pub ms: f64,
    pub gflop_per_s: f64,
    pub gb_per_s: f64,
    pub multiply: Option<String>,
    pub percent_peak: Option<f64>,
}

/// The bytes node `node` of `plan` reads and writes, each buffer counted once.
pub fn node_bytes(plan: &Plan, node: &PlannedNode) -> u64 {
    node.inputs
        .iter()
        .chain(&node.outputs)
        .map(|&b| plan.buffers[b].bytes)
        .sum()
}

/// The tallies of `times` (seconds per planned node) by op, and per node, of nodes with
/// launches.
fn tallies<'a>(
    plan: &'a Plan,
    graph: &Graph,
    times: &[f64],
) -> (BTreeMap<&'a str, Tally>, Vec<(&'a PlannedNode, Tally)>) {
    let mut by_op: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut nodes = Vec::new();
    for (node, &seconds) in plan.nodes.iter().zip(times) {
        if node.launch_count == 0 {
            continue;
        }
        let flops = graph.node_flops(NodeIndex::new(node.graph_node));
        let bytes = node_bytes(plan, node);
        by_op
            .entry(&node.op)
            .or_default()
            .add(node.launch_count, seconds, flops, bytes);
        let mut one = Tally::default();
        one.add(node.launch_count, seconds, flops, bytes);
        nodes.push((node, one));
    }
    (by_op, nodes)
}

/// The ops of a profiled step, slowest first.
pub fn op_rows(plan: &Plan, graph: &Graph, times: &[f64]) -> Vec<OpRow> {
    let (by_op, _) = tallies(plan, graph, times);
    let total: f64 = by_op.values().map(|t| t.seconds).sum();
    let mut rows: Vec<OpRow> = by_op
        .into_iter()
        .map(|(op, t)| {
            let rate = |x: u64| x as f64 / t.seconds.max(1e-12) / 1e9;
            OpRow {
                op: op.to_string(),
                nodes: t.nodes,
                launches: t.launches,
                ms: t.seconds * 1e3,
                percent: 100.0 * t.seconds / total.max(1e-12),
                gflop_per_s: rate(t.flops),
                gb_per_s: rate(t.bytes),
            }
        })
        .collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    rows
}

/// The nodes of a profiled step that launch kernels, in schedule order.
pub fn node_rows(plan: &Plan, graph: &Graph, times: &[f64]) -> Vec<NodeRow> {
    let (_, nodes) = tallies(plan, graph, times);
    nodes
        .into_iter()
        .map(|(node, t)| {
            let launches = &plan.launches[node.first_launch..][..node.launch_count];
            let rate = |x: u64| x as f64 / t.seconds.max(1e-12) / 1e9;
            NodeRow {
                layer: node.layer.clone(),
                op: node.op.clone(),
                kernels: launches
                    .iter()
                    .map(|l| plan.kernels[l.kernel].name.clone())
                    .collect(),
                ms: t.seconds * 1e3,
                gflop_per_s: rate(t.flops),
                gb_per_s: rate(t.bytes),
                multiply: launches
                    .iter()
                    .find_map(|l| plan.kernels[l.kernel].schedule.as_ref())
                    .map(|s| s.multiply.clone()),
                percent_peak: None,
            }
        })
        .collect()
}

/// Prints the profile of `times` (seconds per planned node) of `plan`, whose nodes are
/// `graph`'s.
pub fn print(out: &mut impl Write, plan: &Plan, graph: &Graph, times: &[f64]) -> Result<()> {
    let (by_op, mut nodes) = tallies(plan, graph, times);
    let total: f64 = by_op.values().map(|t| t.seconds).sum();
    writeln!(
        out,
        "\nprofile of one step: {:.3} ms in kernels",
        total * 1e3
    )?;
    let header = format!("{:>10} {:>6} {:>9} {:>8}", "ms", "%", "GFLOP/s", "GB/s");
    writeln!(
        out,
        "{:<32} {:>6} {:>8} {header}",
        "op", "nodes", "launches"
    )?;
    let mut ops: Vec<_> = by_op.into_iter().collect();
    ops.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
    for (op, t) in &ops {
        writeln!(
            out,
            "{op:<32} {:>6} {:>8} {}",
            t.nodes,
            t.launches,
            t.columns(total)
        )?;
    }
    nodes.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
    writeln!(out, "\nslowest nodes:")?;
    writeln!(out, "{:<44} {:<24} {header}", "layer", "op")?;
    for (node, t) in nodes.iter().take(SLOWEST) {
        writeln!(
            out,
            "{:<44} {:<24} {}",
            node.layer,
            node.op,
            t.columns(total)
        )?;
    }
    Ok(())
}
