//! `fisherc inspect MODEL_FILE`: what a model compiles to, without running anything. (Given
//! a directory, `inspect_artifact` reports on what `fisherc compile` wrote there.)

use std::collections::BTreeMap;
use std::io::{self, Write};

use anyhow::Result;
use fisherc_ir::model::LayerInfo;
use fisherc_ir::optimize::cost::{H100, graph_cost};
use fisherc_ir::optimize::optimize;
use fisherc_ir::{Phase, TrainingStep};
use serde::Serialize;

use crate::format::{grouped, si};
use crate::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
#[command(mut_arg("model", |a| a.value_name("MODEL|DIR").help(
    "Model file (TOML), e.g. models/resnet44.toml; or a directory `fisherc compile` wrote"
)))]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Also run the optimizer and report what it did.
    #[arg(long)]
    pub optimize: bool,
}

/// What the optimizer did (`--optimize`).
#[derive(Serialize)]
struct OptimizedReport {
    /// Op counts after optimisation.
    ops: BTreeMap<&'static str, usize>,
    /// How often each rule fired.
    rules: BTreeMap<String, usize>,
    /// Estimated device-memory traffic, FLOPs and kernels of the optimised step.
    est_bytes: u64,
    est_flops: u64,
    kernels: usize,
    /// Estimated step time on an H100 by the roofline model (a ranking, not a prediction).
    est_seconds: f64,
    /// The optimised figures over the unoptimised ones.
    bytes_ratio: f64,
    egraph_nodes: usize,
    iterations: usize,
    stop_reason: String,
    /// Time the optimizer took.
    seconds: f64,
}

impl OptimizedReport {
    fn of(report: &fisherc_ir::optimize::Report) -> Self {
        OptimizedReport {
            ops: report.ops.clone(),
            rules: report.rules.clone(),
            est_bytes: report.after.bytes,
            est_flops: report.after.flops,
            kernels: report.after.kernels,
            est_seconds: report.after.seconds,
            bytes_ratio: report.after.bytes as f64 / report.before.bytes.max(1) as f64,
            egraph_nodes: report.egraph_nodes,
            iterations: report.iterations,
            stop_reason: report.stop_reason.clone(),
            seconds: report.seconds,
        }
    }
}

/// Everything `inspect` reports; `--json` prints it as is.
#[derive(Serialize)]
struct Report {
    model: String,
    file: String,
    description: Option<String>,
    batch: usize,
    input: [usize; 3],
    classes: usize,
    shortcut: Option<String>,
    fisher: String,
    noise: String,
    params: usize,
    flops_per_step: u64,
    flops: BTreeMap<&'static str, u64>,
    nodes: usize,
    ops: BTreeMap<&'static str, usize>,
    /// Estimated device-memory traffic, FLOPs, kernels and H100 roofline time of the step as
    /// built (one kernel per node).
    est_bytes: u64,
    est_flops: u64,
    kernels: usize,
    est_seconds: f64,
    layers: Vec<LayerInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    optimized: Option<OptimizedReport>,
}

impl Report {
    fn of(step: &TrainingStep, optimized: Option<OptimizedReport>) -> Report {
        let cost = graph_cost(&step.graph, &H100);
        let net = &step.network;
        let flops: BTreeMap<&'static str, u64> = step
            .graph
            .flops_by_phase()
            .into_iter()
            .map(|(phase, f)| (phase.name(), f))
            .collect();
        Report {
            model: net.name.clone(),
            file: net.path.display().to_string(),
            description: net.description.clone(),
            batch: net.batch,
            input: net.input,
            classes: net.classes,
            shortcut: net.shortcut.map(|s| format!("{s:?}")),
            fisher: step.fisher.to_string(),
            noise: step.noise.to_string(),
            params: net.param_count(),
            flops_per_step: flops.values().sum(),
            flops,
            nodes: step.graph.node_count(),
            ops: step.graph.op_counts(),
            est_bytes: cost.bytes,
            est_flops: cost.flops,
            kernels: cost.kernels,
            est_seconds: cost.seconds,
            layers: net.layers.clone(),
            optimized,
        }
    }

    fn write_table(&self, out: &mut impl Write) -> io::Result<()> {
        writeln!(out, "{} ({})", self.model, self.file)?;
        if let Some(d) = &self.description {
            writeln!(out, "{d}")?;
        }
        let [c, h, w] = self.input;
        writeln!(
            out,
            "batch {}, input {c}×{h}×{w}, {} classes, shortcut {}, fisher {}, {} noise\n",
            self.batch,
            self.classes,
            self.shortcut.as_deref().unwrap_or("-"),
            self.fisher,
            self.noise
        )?;
        let width = self
            .layers
            .iter()
            .map(|l| l.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(
            out,
            "{:width$}  {:<10} {:<22} {:>12}  line",
            "layer", "op", "output", "params"
        )?;
        for l in &self.layers {
            let shape = format!("{:?}", l.output);
            let params = if l.params > 0 {
                grouped(l.params as u64)
            } else {
                String::new()
            };
            writeln!(
                out,
                "{:width$}  {:<10} {:<22} {:>12}  {}",
                l.name, l.op, shape, params, l.line
            )?;
        }
        writeln!(out)?;
        writeln!(out, "parameters        {}", grouped(self.params as u64))?;
        let phases: Vec<String> = Phase::ALL
            .iter()
            .filter_map(|p| {
                self.flops
                    .get(p.name())
                    .map(|f| format!("{} {}FLOP", p.name(), si(*f as f64)))
            })
            .collect();
        writeln!(
            out,
            "FLOPs per step    {}FLOP ({})",
            si(self.flops_per_step as f64),
            phases.join(", ")
        )?;
        writeln!(
            out,
            "step graph        {} nodes",
            grouped(self.nodes as u64)
        )?;
        writeln!(out, "ops               {}", counts(&self.ops))?;
        writeln!(
            out,
            "estimate (H100)   {}B moved, {}FLOP, {} kernels, {:.2} ms",
            si(self.est_bytes as f64),
            si(self.est_flops as f64),
            self.kernels,
            self.est_seconds * 1e3
        )?;
        if let Some(o) = &self.optimized {
            writeln!(
                out,
                "\noptimized in {:.3} s ({} e-nodes, {} iterations, {})",
                o.seconds, o.egraph_nodes, o.iterations, o.stop_reason
            )?;
            writeln!(out, "rules fired       {}", counts(&o.rules))?;
            writeln!(out, "ops               {}", counts(&o.ops))?;
            writeln!(
                out,
                "estimate (H100)   {}B moved ({:.1}% of unoptimised), {}FLOP, {} kernels, {:.2} ms",
                si(o.est_bytes as f64),
                100.0 * o.bytes_ratio,
                si(o.est_flops as f64),
                o.kernels,
                o.est_seconds * 1e3
            )?;
        }
        Ok(())
    }
}

/// `name count, name count, ...`
fn counts<K: std::fmt::Display>(map: &BTreeMap<K, usize>) -> String {
    let items: Vec<String> = map.iter().map(|(k, n)| format!("{k} {n}")).collect();
    items.join(", ")
}

pub fn run(args: &Args) -> Result<()> {
    if args.model.model.is_dir() {
        return crate::inspect_artifact::run(&args.model.model, args.json);
    }
    let step = args.model.training_step()?;
    let optimized = if args.optimize {
        Some(OptimizedReport::of(&optimize(&step.graph)?.report))
    } else {
        None
    };
    let report = Report::of(&step, optimized);
    let mut out = io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        report.write_table(&mut out)?;
    }
    Ok(())
}
