//! `fisherc inspect DIR`: what a compiled artifact holds: its summary, and per kernel its
//! launches, block, shared memory and (when ptxas is installed) registers and spills.

use std::io::{self, Write};
use std::path::Path;

use anyhow::Result;
use fisherc_codegen::artifact::{Plan, summary};
use fisherc_codegen::ptxas::{self, Resources};
use serde::Serialize;

#[derive(Serialize)]
struct KernelRow {
    name: String,
    launches: usize,
    /// Grid of its first launch.
    grid: [u32; 2],
    block: u32,
    shared_bytes: u32,
    /// From `ptxas -v`, when ptxas was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    ptxas: Option<Resources>,
}

#[derive(Serialize)]
struct Report<'a> {
    plan: &'a Plan,
    kernel_resources: &'a [KernelRow],
    /// Why there are no ptxas figures, if there are none.
    #[serde(skip_serializing_if = "Option::is_none")]
    ptxas_note: Option<String>,
}

pub fn run(dir: &Path, json: bool) -> Result<()> {
    let verified = crate::backend_args::load(dir)?;
    let plan = verified.plan();
    let (resources, note) = match ptxas::find() {
        None => (
            Vec::new(),
            Some("ptxas not found: run scripts/install-ptxas.sh or set FISHERC_PTXAS".to_string()),
        ),
        Some(path) => {
            match ptxas::assemble(
                &path,
                &verified.artifact().ptx,
                plan.source.compile.arch.name(),
            ) {
                Ok(r) => (r, None),
                Err(messages) => anyhow::bail!(
                    "ptxas rejected {}:\n{messages}",
                    dir.join("module.ptx").display()
                ),
            }
        }
    };
    let rows: Vec<KernelRow> = plan
        .kernels
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let mut launches = plan.launches.iter().filter(|l| l.kernel == i);
            let grid = launches.clone().next().map_or([0, 0], |l| l.grid);
            KernelRow {
                name: k.name.clone(),
                launches: launches.by_ref().count(),
                grid,
                block: k.block,
                shared_bytes: k.shared_bytes,
                ptxas: resources.iter().find(|r| r.kernel == k.name).cloned(),
            }
        })
        .collect();
    let mut out = io::stdout().lock();
    if json {
        let report = Report {
            plan,
            kernel_resources: &rows,
            ptxas_note: note,
        };
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        return Ok(());
    }
    write!(out, "{}", summary(plan))?;
    writeln!(out)?;
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(6).max(6);
    writeln!(
        out,
        "{:width$}  {:>8}  {:>13}  {:>5}  {:>6}  {:>4}  {:>6}",
        "kernel", "launches", "grid", "block", "smem", "regs", "spills"
    )?;
    for r in &rows {
        let grid = format!("{}×{}", r.grid[0], r.grid[1]);
        let (regs, spills) = match &r.ptxas {
            Some(p) => (
                p.registers.to_string(),
                (p.spill_stores + p.spill_loads).to_string(),
            ),
            None => ("-".into(), "-".into()),
        };
        writeln!(
            out,
            "{:width$}  {:>8}  {:>13}  {:>5}  {:>6}  {:>4}  {:>6}",
            r.name, r.launches, grid, r.block, r.shared_bytes, regs, spills
        )?;
    }
    write_schedules(&mut out, plan, width)?;
    if let Some(note) = note {
        writeln!(out, "\n{note}")?;
    } else {
        writeln!(
            out,
            "\nregisters and spill bytes from ptxas -v for {}",
            plan.source.compile.arch
        )?;
    }
    Ok(())
}

/// Each GEMM kernel's schedule: block tile and K slice, slices in flight, the multiply and
/// its tile per warp (per thread on fp32 FMA), how each side reaches shared memory, and the
/// words each shared load of a side's fragments reads (2: a vector load).
fn write_schedules(out: &mut impl Write, plan: &Plan, width: usize) -> Result<()> {
    let gemms: Vec<_> = plan
        .kernels
        .iter()
        .filter_map(|k| Some((&k.name, k.schedule.as_ref()?)))
        .collect();
    if gemms.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "\n{:width$}  {:>12}  {:>6}  {:<20}  {:>9}  {:<17}  {:>12}",
        "GEMM kernel", "block tile", "stages", "multiply", "tile", "A / B staged", "words / load"
    )?;
    for (name, s) in gemms {
        let per = if s.multiply.starts_with("fp32") {
            "thread"
        } else {
            "warp"
        };
        writeln!(
            out,
            "{name:width$}  {:>12}  {:>6}  {:<20}  {:>9}  {:<17}  {:>12}",
            format!("{}×{}×{}", s.block[0], s.block[1], s.block[2]),
            s.stages,
            s.multiply,
            format!("{}×{} {per}", s.tile[0], s.tile[1]),
            format!("{} / {}", s.staging[0], s.staging[1]),
            format!("{} / {}", s.fragment_loads[0], s.fragment_loads[1]),
        )?;
    }
    Ok(())
}
