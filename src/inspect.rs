//! `fisherc inspect MODEL_FILE`: what a model compiles to, without running anything.

use std::collections::BTreeMap;
use std::io::{self, Write};

use anyhow::Result;
use fisherc_ir::model::LayerInfo;
use fisherc_ir::{Phase, TrainingStep};
use serde::Serialize;

use crate::format::{grouped, si};
use crate::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
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
    params: usize,
    flops_per_step: u64,
    flops: BTreeMap<&'static str, u64>,
    nodes: usize,
    ops: BTreeMap<&'static str, usize>,
    layers: Vec<LayerInfo>,
}

impl Report {
    fn of(step: &TrainingStep) -> Report {
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
            params: net.param_count(),
            flops_per_step: flops.values().sum(),
            flops,
            nodes: step.graph.node_count(),
            ops: step.graph.op_counts(),
            layers: net.layers.clone(),
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
            "batch {}, input {c}×{h}×{w}, {} classes, shortcut {}, fisher {}\n",
            self.batch,
            self.classes,
            self.shortcut.as_deref().unwrap_or("-"),
            self.fisher
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
        let ops: Vec<String> = self.ops.iter().map(|(op, n)| format!("{op} {n}")).collect();
        writeln!(out, "ops               {}", ops.join(", "))
    }
}

pub fn run(args: &Args) -> Result<()> {
    let step = args.model.training_step()?;
    let report = Report::of(&step);
    let mut out = io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        report.write_table(&mut out)?;
    }
    Ok(())
}
