//! `fisherc compile MODEL_FILE`: compiles a training step to an artifact directory (PTX module,
//! plan, summary) for the runtime.

use std::path::PathBuf;

use anyhow::{Context, Result};
use fisherc_codegen::artifact::{Artifact, PLAN_FILE, PTX_FILE, Source, bytes, summary};
use fisherc_codegen::compile::{CompileOptions, compile};
use fisherc_ir::Noise;

use crate::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Compile without the fusion rules: every op its own kernels (the baseline for fused vs
    /// unfused).
    #[arg(long)]
    pub unfused: bool,

    /// Convolutions on TF32 tensor cores (3xTF32: fp32 accuracy) instead of fp32 FMA.
    #[arg(long)]
    pub tensor_cores: bool,

    /// PTX target: sm_80 or sm_90.
    #[arg(long, default_value = "sm_90", value_parser = ["sm_80", "sm_90"])]
    pub arch: String,

    /// Output directory [default: compiled/MODEL_b<BATCH>_<FISHER>[_<NOISE>][_unfused][_tc]].
    #[arg(short, long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    let step = args.model.training_step()?;
    let fused = !args.unfused;
    let options = CompileOptions {
        fused,
        tensor_cores: args.tensor_cores,
    };
    let compiled = compile(&step, options)
        .with_context(|| format!("compiling {}", args.model.model.display()))?;
    let path = &args.model.model;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let source = Source {
        tensor_cores: args.tensor_cores,
        ..Source::of(&step, path, text, fused, &args.arch)
    };
    let artifact = Artifact::new(&compiled.program, source, compiled.seconds);
    let dir = args.out.clone().unwrap_or_else(|| default_dir(args));
    artifact.write(&dir)?;
    print!("{}", summary(&artifact.plan));
    println!(
        "wrote {} ({} {}, {PLAN_FILE}, summary.txt)",
        dir.display(),
        PTX_FILE,
        bytes(artifact.ptx.len() as u64)
    );
    Ok(())
}

fn default_dir(args: &Args) -> PathBuf {
    let stem = args
        .model
        .model
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy());
    let options = args.model.step_options();
    let noise = match options.noise {
        Noise::DiagonalFisher => String::new(),
        other => format!("_{other}"),
    };
    let variant = if args.unfused { "_unfused" } else { "" };
    let cores = if args.tensor_cores { "_tc" } else { "" };
    PathBuf::from("compiled").join(format!(
        "{stem}_b{}_{}{noise}{variant}{cores}",
        args.model.batch, options.fisher
    ))
}
