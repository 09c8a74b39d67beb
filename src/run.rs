//! `fisherc run DIR`: training steps of a compiled artifact on a backend (CPU or GPU), on a
//! random batch fisherc makes itself, with the loss and the step time of every step.

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use fisherc_ir::ops::Role;
use fisherc_ir::state::TrainState;
use fisherc_ir::synthetic::random_batch;
use fisherc_ir::tensor::Tensor;
use fisherc_ir::tensor::Value;
use fisherc_runtime::{Backend, Session};

use crate::backend_args::{self, BackendKind};
use crate::hyper_args::HyperArgs;
use crate::timing::{step_line, summary};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A directory written by `fisherc compile`.
    pub artifact: PathBuf,

    #[arg(long, value_enum, default_value = "reference")]
    pub backend: BackendKind,

    /// Number of steps, all on the same random batch, as `fisherc step` takes them.
    #[arg(long, default_value_t = 3, value_parser = crate::model_args::at_least_one)]
    pub steps: usize,

    /// Seed of the initial parameters, the batch and the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Steps left out of the median step time (the first launches load and warm up; at least
    /// one step is timed).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,

    /// Capture the step into a CUDA graph and replay it (GPU only).
    #[arg(long)]
    pub graph: bool,

    /// After the steps, time one more node by node (CUDA events on the GPU) and print the
    /// time, FLOP/s and bytes/s by op and of the slowest nodes.
    #[arg(long)]
    pub profile: bool,

    #[command(flatten)]
    pub hyper: HyperArgs,
}

pub fn run(args: &Args) -> Result<()> {
    let verified = backend_args::load(&args.artifact)?;
    let (artifact, compiled) = (verified.artifact(), verified.compiled());
    let source = artifact.plan.source.clone();
    let mut out = io::stdout().lock();
    let backend = backend_args::open(args.backend, &verified)?;
    let mut session = Session::new(artifact, backend)?;
    if args.graph {
        anyhow::ensure!(session.backend.capture()?, "--graph needs the cuda backend");
    }
    let drawn = source.noise.is_drawn(source.fisher);
    let noise_scale = args.hyper.noise_scale(drawn, source.batch);
    writeln!(
        out,
        "{} · batch {} · {} · {} · {} · on {}{}",
        source.model,
        source.batch,
        source.noise.describe(source.fisher),
        if source.compile.fused {
            "fused"
        } else {
            "unfused"
        },
        args.hyper.describe_noise(drawn, source.batch),
        session.backend.describe(),
        if args.graph { " (CUDA graph)" } else { "" }
    )?;
    let steps = RandomBatchSteps::start(&mut session, args.seed, noise_scale)?;
    let mut times = Vec::with_capacity(args.steps);
    for k in 0..args.steps {
        steps.feed(&mut session, &args.hyper, k)?;
        let seconds = session.step().with_context(|| format!("step {}", k + 1))?;
        let loss = session.loss()?;
        anyhow::ensure!(loss.is_finite(), "step {}: the loss is {loss}", k + 1);
        times.push(seconds);
        writeln!(out, "{}", step_line(k + 1, loss, seconds))?;
        out.flush()?;
    }
    if let Some(summary) = summary(&times, args.warmup, source.batch) {
        writeln!(out, "{summary}")?;
    }
    if args.profile {
        let times = session.profile().context("the profiled step")?;
        crate::profile::print(&mut out, &session.plan, &compiled.graph, &times)?;
    }
    Ok(())
}

/// Steps on one random batch, as `fisherc run` and `fisherc bench` take them: the initial state
/// and the batch from `seed`; then step k's hyper-parameters (noise keyed by seed and k). The
/// batch goes in with the first step and stays (the model learns it by heart).
pub struct RandomBatchSteps {
    images: Tensor<f32>,
    labels: Tensor<i32>,
    seed: u64,
    noise_scale: f32,
}

impl RandomBatchSteps {
    /// Feeds the initial state.
    pub fn start<B: Backend>(
        session: &mut Session<B>,
        seed: u64,
        noise_scale: f32,
    ) -> Result<RandomBatchSteps> {
        let net = &session.network;
        let (images, labels) = random_batch::<f32>(net.batch, net.input, net.classes, seed);
        session.feed(&TrainState::<f32>::init(net, seed).state_feeds())?;
        Ok(RandomBatchSteps {
            images,
            labels,
            seed,
            noise_scale,
        })
    }

    /// Feeds step `k` (from 0).
    pub fn feed<B: Backend>(
        &self,
        session: &mut Session<B>,
        hyper: &HyperArgs,
        k: usize,
    ) -> Result<()> {
        let mut feeds = hyper.at(self.noise_scale, self.seed, k as u64).feeds();
        if k == 0 {
            feeds.insert(Role::Images, Value::Float(self.images.clone()));
            feeds.insert(Role::Labels, Value::Int(self.labels.clone()));
        }
        session.feed(&feeds)?;
        Ok(())
    }
}
