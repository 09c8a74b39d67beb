//! The whole compiler: training step → optimised graph → lowered kernels and memory plan.

use std::time::Instant;

use fisherc_ir::optimize::{Limits, OptimizeError, Optimized, Report, optimize_with, rules};
use fisherc_ir::{Graph, TrainingStep};
use thiserror::Error;

pub use crate::options::CompileOptions;
use crate::plan::{PlanError, Program, plan};

#[derive(Debug, Error)]
pub enum CompileError {
    #[error(transparent)]
    Optimize(#[from] OptimizeError),
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// A compiled step.
pub struct Compiled {
    /// The graph the kernels implement (optimised, or the step's own when unfused).
    pub graph: Graph,
    pub program: Program,
    /// What the optimizer did, when it ran.
    pub report: Option<Report>,
    /// Time taken, optimizer included.
    pub seconds: f64,
}

pub fn compile(step: &TrainingStep, options: CompileOptions) -> Result<Compiled, CompileError> {
    compile_graph(&step.graph, options)
}

/// [`compile`] for any graph: a training step's, or a network's forward pass alone (the
/// evaluation program, `artifact::ProgramKind::Evaluation`).
pub fn compile_graph(graph: &Graph, options: CompileOptions) -> Result<Compiled, CompileError> {
    let started = Instant::now();
    let (graph, report) = if options.fused {
        let Optimized { graph, report } = optimize_with(
            graph,
            &rules::all(),
            &Limits::default(),
            options.arch.device(),
        )?;
        (graph, Some(report))
    } else {
        (graph.clone(), None)
    };
    let program = plan(&graph, options.lowering)?;
    Ok(Compiled {
        graph,
        program,
        report,
        seconds: started.elapsed().as_secs_f64(),
    })
}
