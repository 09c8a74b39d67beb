//! `fisherc`: the command-line front end. Each subcommand lives in its own module; this file
//! only parses arguments and dispatches.

// The reference interpreter allocates large tensors op after op. glibc hands each one back to
// the OS when it is freed, and the page faults and TLB shootdowns that follow cost a third of
// a step on two threads; mimalloc keeps the memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod backend_args;
mod bench;
mod check;
mod compile;
mod format;
mod hyper_args;
mod inspect;
mod inspect_artifact;
mod model_args;
mod plot;
mod profile;
mod run;
mod step;
mod timing;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fisherc",
    version,
    about = "Ahead-of-time compiler for noisy large-batch training with diagonal-Fisher noise"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's layers, parameters, FLOPs per training step and graph op counts; or,
    /// given a directory `fisherc compile` wrote, what it holds (with ptxas's register counts).
    Inspect(inspect::Args),
    /// Compile a training step to a PTX module and a launch and memory plan.
    Compile(compile::Args),
    /// Run training steps of a compiled step on a backend (CPU reference, CPU kernel executor
    /// or CUDA); print loss and step time.
    Run(run::Args),
    /// Check a backend against the CPU reference: every kernel, node by node, then whole steps.
    Check(check::Args),
    /// Train as an experiment file says (data, regime, schedule), evaluating every epoch, with
    /// metrics and checkpoints in a run directory.
    Train(train::Args),
    /// Draw training loss, test loss and test accuracy of runs (overlaid) as SVG and PNG.
    Plot(plot::Args),
    /// Run training steps on the CPU reference on random data; print loss and time.
    Step(step::Args),
    /// Time whole steps of models × batches × Fisher modes × fused/unfused on a backend:
    /// median, FLOP/s and bytes/s against the card's ceilings, the Fisher's overhead, per-op
    /// breakdown; a Markdown table and JSON.
    Bench(bench::Args),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = fisherc_ir::matmul::Isa::from_env() {
        eprintln!("error: {}", fisherc_ir::files::shorten(&e.to_string()));
        std::process::exit(1);
    }
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(&args),
        Command::Compile(args) => compile::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Check(args) => check::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Plot(args) => plot::run(&args),
        Command::Step(args) => step::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    if let Err(e) = result {
        if is_broken_pipe(&e) {
            return; // the reader (e.g. `head`) has seen enough
        }
        eprintln!("error: {}", fisherc_ir::files::shorten(&format!("{e:#}")));
        std::process::exit(1);
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let kind = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => Some(io.kind()),
            None => cause
                .downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind),
        };
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}
