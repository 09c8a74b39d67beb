//! `fisherc run --profile`: one step timed node by node, as a table by op and the slowest
//! nodes, each with its achieved FLOP/s and bytes/s (the op's FLOPs and the bytes of its
//! inputs and outputs, each counted once: what a perfectly fused kernel would move).

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Result;
use fisherc_codegen::artifact::Plan;
use fisherc_ir::graph::Graph;
use petgraph::graph::NodeIndex;

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

/// Prints the profile of `times` (seconds per planned node) of `plan`, whose nodes are
/// `graph`'s.
pub fn print(out: &mut impl Write, plan: &Plan, graph: &Graph, times: &[f64]) -> Result<()> {
    let mut by_op: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut nodes = Vec::new();
    for (node, &seconds) in plan.nodes.iter().zip(times) {
        if node.launch_count == 0 {
            continue;
        }
        let flops = graph.node_flops(NodeIndex::new(node.graph_node));
        let bytes: u64 = node
            .inputs
            .iter()
            .chain(&node.outputs)
            .map(|&b| plan.buffers[b].bytes)
            .sum();
        by_op
            .entry(&node.op)
            .or_default()
            .add(node.launch_count, seconds, flops, bytes);
        let mut one = Tally::default();
        one.add(node.launch_count, seconds, flops, bytes);
        nodes.push((node, one));
    }
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
