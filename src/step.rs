//! `fisherc step MODEL_FILE`: training steps on the CPU reference interpreter, on a random
//! batch, with loss and wall time per step.

use std::io::{self, Write};
use std::time::Instant;

use anyhow::{Context, Result};
use fisherc_ir::interp::evaluate;
use fisherc_ir::state::TrainState;
use fisherc_ir::synthetic::random_batch;

use crate::hyper_args::HyperArgs;
use crate::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Seed of the initial parameters, the random batch and the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Number of steps (on the same batch; the loss should fall).
    #[arg(long, default_value_t = 1)]
    pub steps: usize,

    #[command(flatten)]
    pub hyper: HyperArgs,

    /// Worker threads [default: one per core].
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(args: &Args) -> Result<()> {
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("configuring the thread pool")?;
    }
    let started = Instant::now();
    let step = args.model.training_step()?;
    let net = &step.network;
    let build_time = started.elapsed();

    let noise_scale = args
        .hyper
        .noise_scale(step.noise.is_drawn(step.fisher), net.batch);
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "{}: batch {}, {} parameters, {}, noise scale {noise_scale:.5}, {} threads; built in {:.3} s",
        net.name,
        net.batch,
        net.param_count(),
        step.noise.describe(step.fisher),
        rayon::current_num_threads(),
        build_time.as_secs_f64()
    )?;

    let mut state = TrainState::<f32>::init(net, args.seed);
    let (images, labels) = random_batch::<f32>(net.batch, net.input, net.classes, args.seed);
    let mut times = Vec::with_capacity(args.steps);
    for k in 0..args.steps {
        let hyper = args.hyper.at(noise_scale, args.seed, k as u64);
        let feeds = state.feeds(images.clone(), labels.clone(), &hyper);
        let started = Instant::now();
        let result = evaluate(&step.graph, &feeds, &[])?;
        let elapsed = started.elapsed().as_secs_f64();
        let loss = result.loss().expect("a training step has a loss");
        anyhow::ensure!(loss.is_finite(), "step {}: the loss is {loss}", k + 1);
        state.advance(&result);
        times.push(elapsed);
        writeln!(out, "step {:>3}  loss {loss:.6}  {elapsed:.3} s", k + 1)?;
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    writeln!(
        out,
        "median step {median:.3} s, {:.1} images/s",
        net.batch as f64 / median
    )?;
    Ok(())
}
