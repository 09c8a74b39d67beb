//! `fisherc step MODEL_FILE`: training steps on the CPU reference interpreter, on a random
//! batch, with loss and wall time per step.

use std::io::{self, Write};
use std::time::Instant;

use anyhow::{Context, Result};
use fisherc_ir::interp::evaluate;
use fisherc_ir::state::TrainState;
use fisherc_ir::synthetic::random_batch;

use crate::format::grouped;
use crate::hyper_args::HyperArgs;
use crate::model_args::ModelArgs;
use crate::timing::{step_line, summary};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Seed of the initial parameters, the random batch and the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Number of steps, all on the same random batch (which the model learns by heart: at a
    /// learning rate it suits, the loss falls).
    #[arg(long, default_value_t = 1, value_parser = crate::model_args::at_least_one)]
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

    let drawn = step.noise.is_drawn(step.fisher);
    let noise_scale = args.hyper.noise_scale(drawn, net.batch);
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "{}: batch {}, {} parameters, {}, {}, {} threads; built in {:.3} s",
        net.name,
        net.batch,
        grouped(net.param_count() as u64),
        step.noise.describe(step.fisher),
        args.hyper.describe_noise(drawn, net.batch),
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
        writeln!(out, "{}", step_line(k + 1, loss, elapsed))?;
        out.flush()?;
    }
    if let Some(summary) = summary(&times, 0, net.batch) {
        writeln!(out, "{summary}")?;
    }
    Ok(())
}
