//! `fisherc compile MODEL_FILE`: compiles a training step to an artifact directory (PTX module,
//! plan, summary) for the runtime.

use std::path::PathBuf;

use anyhow::{Context, Result};
use fisherc_codegen::artifact::{Artifact, PLAN_FILE, PTX_FILE, Source, bytes, summary};
use fisherc_codegen::compile::{CompileOptions, compile};
use fisherc_codegen::lower::{DEFAULT_STAGES, STAGE_RANGE, TensorCores};
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

    /// Convolutions on TF32 tensor cores instead of fp32 FMA: `3xtf32` (the default; fp32
    /// accuracy) or `tf32` (one TF32 product, as PyTorch's allow_tf32: faster, relative errors
    /// near 1e-3).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "3xtf32")]
    pub tensor_cores: Option<Tf32>,

    /// K slices the convolutions' GEMMs keep in flight, where shared memory allows: 2 (double
    /// buffering) to 4; 3 timed no faster on the H200 (benches/RESULTS.md).
    #[arg(long, default_value_t = DEFAULT_STAGES, value_parser = parse_stages)]
    pub stages: u32,

    /// PTX target: sm_80 or sm_90.
    #[arg(long, default_value = "sm_90", value_parser = ["sm_80", "sm_90"])]
    pub arch: String,

    /// Output directory [default: compiled/MODEL_b<BATCH>_<FISHER>[_<NOISE>][_unfused][_tc][_s<STAGES>]].
    #[arg(short, long)]
    pub out: Option<PathBuf>,
}

/// A `--stages` value: a number within [`STAGE_RANGE`].
pub fn parse_stages(text: &str) -> Result<u32, String> {
    let stages: u32 = text.parse().map_err(|e| format!("{text}: {e}"))?;
    if STAGE_RANGE.contains(&stages) {
        Ok(stages)
    } else {
        Err(format!(
            "{stages}: K slices in flight, {} to {}",
            STAGE_RANGE.start(),
            STAGE_RANGE.end()
        ))
    }
}

/// How tensor cores multiply (`--tensor-cores[=...]`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tf32 {
    /// Three TF32 products per operand pair: fp32 accuracy.
    #[value(name = "3xtf32")]
    Split3,
    /// One TF32 product.
    #[value(name = "tf32")]
    Single,
}

impl Args {
    pub fn tensor_cores(&self) -> TensorCores {
        match self.tensor_cores {
            None => TensorCores::Off,
            Some(Tf32::Split3) => TensorCores::Tf32x3,
            Some(Tf32::Single) => TensorCores::Tf32,
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    let step = args.model.training_step()?;
    let fused = !args.unfused;
    let options = CompileOptions {
        fused,
        tensor_cores: args.tensor_cores(),
        stages: args.stages,
    };
    let compiled = compile(&step, options)
        .with_context(|| format!("compiling {}", args.model.model.display()))?;
    let path = &args.model.model;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let source = Source::of(&step, path, text, options, &args.arch);
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
    let cores = match args.tensor_cores {
        None => "",
        Some(Tf32::Split3) => "_tc",
        Some(Tf32::Single) => "_tf32",
    };
    let stages = if args.stages == DEFAULT_STAGES {
        String::new()
    } else {
        format!("_s{}", args.stages)
    };
    PathBuf::from("compiled").join(format!(
        "{stem}_b{}_{}{noise}{variant}{cores}{stages}",
        args.model.batch, options.fisher
    ))
}
