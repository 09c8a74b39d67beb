//! `fisherc check DIR`: a backend against the CPU reference: every kernel node by node on the
//! step's own data (each node's outputs against its reference op on the very inputs the backend
//! read), then whole noisy steps from the same state (loss, parameters, momenta, Fisher).

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Result;
use fisherc_runtime::check::report::{Check, CheckReport, CheckSetup};
use fisherc_runtime::check::{StepBound, StepComparison};

use crate::backend_args::{self, BackendKind};
use crate::hyper_args::HyperArgs;

#[derive(clap::Args, Debug)]
#[command(mut_arg("noise_scale", |a| a.help(
    "Noise scale s [default: 0.5 for a step that draws noise, so that the noise is checked \
     (the training default sqrt(1/small_batch − 1/batch) is 0 at small batches); 0 otherwise]"
)))]
pub struct Args {
    /// A directory written by `fisherc compile`.
    pub artifact: PathBuf,

    #[arg(long, value_enum, default_value = "executor")]
    pub backend: BackendKind,

    /// Whole steps compared after the node-by-node check.
    #[arg(long, default_value_t = 3)]
    pub steps: u64,

    /// Seed of the state, batches and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    #[command(flatten)]
    pub hyper: HyperArgs,
}

pub fn run(args: &Args) -> Result<()> {
    let verified = backend_args::load(&args.artifact)?;
    let source = &verified.plan().source;
    let noise_scale = check_noise_scale(&args.hyper, source.noise.is_drawn(source.fisher));
    let setup = CheckSetup {
        on_gpu: args.backend == BackendKind::Cuda,
        steps: args.steps,
        seed: args.seed,
        hyper: args.hyper.at(noise_scale, args.seed, 0),
    };
    let open = || backend_args::open(args.backend, &verified);
    let check = Check::open(&verified, &open, setup)?;
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "{} · batch {} · {} · {} · on {}",
        source.model,
        source.batch,
        source.noise.describe(source.fisher),
        source.compile.describe(),
        check.backend()
    )?;
    let report = check.run()?;
    write_report(&mut out, &report, args.steps, noise_scale)?;
    let failed_nodes = report.failed_nodes().count();
    let failed_steps = report.failed_step_rows();
    let miscounted = !report.counting.passed() as usize;
    anyhow::ensure!(
        report.passed(),
        "{failed_nodes} node outputs and {failed_steps} step quantities out of bounds, \
         {miscounted} non-finite counts wrong"
    );
    match report.explained_steps().len() {
        0 => writeln!(out, "PASS")?,
        n => writeln!(
            out,
            "PASS ({n} step(s) out of bounds only through the forward pass, whose kernels each \
             match node by node: given the backend's forward pass, the reference's backward \
             pass and update agree)"
        )?,
    }
    Ok(())
}

/// The report: failing node outputs, the table by op, the steps, the failing steps aligned.
fn write_report(
    out: &mut impl Write,
    report: &CheckReport,
    steps: u64,
    noise_scale: f32,
) -> Result<()> {
    for c in report.failed_nodes() {
        writeln!(
            out,
            "FAIL {} ({}) output {}: relative error {:.2e} > {:.0e}{}",
            c.layer,
            c.op,
            c.port,
            c.error,
            c.bound,
            if c.finite { "" } else { ", not finite" }
        )?;
    }
    writeln!(
        out,
        "\nnode by node ({} outputs of {} nodes):",
        report.nodes.len(),
        report.kernel_nodes
    )?;
    writeln!(
        out,
        "{:<32} {:>7} {:>11} {:>7} {:>10} {:>6}",
        "op", "outputs", "worst error", "bound", "bit-equal", "failed"
    )?;
    for (op, s) in &report.by_op() {
        writeln!(
            out,
            "{op:<32} {:>7} {:>11.2e} {:>7.0e} {:>10} {:>6}",
            s.outputs, s.worst, s.bound, s.identical, s.failed
        )?;
    }
    let c = &report.counting;
    writeln!(
        out,
        "\nnon-finite values planted among the {} values of buffer {}: {} planted, {} counted by the backend{}",
        c.values,
        c.buffer,
        c.planted,
        c.counted,
        if c.passed() { "" } else { " FAIL" }
    )?;
    let bound = report.step_bound;
    writeln!(
        out,
        "\n{steps} steps against the CPU reference (noise scale {noise_scale}), each from the reference's state; \
         a step passes within {:.0e} of the f32 reference, or no more than {}× as far \
         from the f64 oracle (the unoptimised step) as the f32 reference is. Then free-running \
         from the same start:",
        bound.within, bound.oracle_factor
    )?;
    write_rows(out, &report.steps, bound)?;
    if !report.aligned.is_empty() {
        writeln!(
            out,
            "\nThe failing steps again, node by node, the reference given the backend's forward \
             pass (each forward node's outputs): a max-pooling window's maximum or a ReLU's mask \
             whose deciding values lie closer than the two agree may be chosen differently, and \
             the gradient then flows elsewhere, a discrete difference, not rounding. Given the \
             same forward pass, a step passes within {:.0e}:",
            bound.within
        )?;
    }
    for aligned in &report.aligned {
        for c in aligned.choices.iter().filter(|c| c.differing > 0) {
            writeln!(
                out,
                "step {} {}: another maximum in {} of {} windows (closest pair {:.1e} \
                 apart, relative)",
                aligned.step + 1,
                c.layer,
                c.differing,
                c.windows,
                c.closest
            )?;
        }
        write_rows(out, &aligned.rows, bound)?;
    }
    Ok(())
}

/// The step rows as a table: each error against the other session, against the f64 oracle
/// where there is one, and the verdict under `bound`.
fn write_rows(out: &mut impl Write, rows: &[StepComparison], bound: StepBound) -> Result<()> {
    writeln!(
        out,
        "{:<44} {:>10} {:>10} {:>10}",
        "quantity", "vs f32 ref", "f64: this", "f64: ref"
    )?;
    for row in rows {
        let verdict = match (row.bounded, row.passes(bound)) {
            (false, _) => "drift, not bounded",
            (true, true) => "ok",
            (true, false) => "FAIL",
        };
        let (this, reference) = match row.oracle {
            Some((a, b)) => (format!("{a:.2e}"), format!("{b:.2e}")),
            None => (String::new(), String::new()),
        };
        // where a row fails, the tensor it fails in
        let tensor = match (&row.worst_tensor, verdict) {
            (Some(tensor), "FAIL") => format!(" (worst: {tensor})"),
            _ => String::new(),
        };
        writeln!(
            out,
            "{:<44} {:>10.2e} {this:>10} {reference:>10} {verdict}{tensor}",
            row.what, row.error
        )?;
    }
    Ok(())
}

/// `--noise-scale` if given, else 0.5 for a step that draws noise: the paper's default is 0 at
/// batches under 128, and the noise must be exercised to be checked.
fn check_noise_scale(hyper: &HyperArgs, drawn: bool) -> f32 {
    match drawn {
        false => 0.0,
        true => hyper.noise_scale.unwrap_or(0.5),
    }
}
