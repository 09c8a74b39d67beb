//! `fisherc compile MODEL_FILE`: compiles a training step to an artifact directory (PTX module,
//! plan, summary) for the runtime.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use fisherc_codegen::artifact::{PLAN_FILE, PTX_FILE, bytes, compile_step, summary};
use fisherc_codegen::lower::LowerOptions;
use fisherc_codegen::options::{Arch, CompileOptions, DEFAULT_STAGES, Precision, STAGE_RANGE};
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
    #[arg(long, num_args = 0..=1, default_missing_value = "3xtf32",
          value_parser = tensor_core_precision())]
    pub tensor_cores: Option<Precision>,

    /// K slices the convolutions' GEMMs keep in flight, where shared memory allows: 2 (double
    /// buffering) to 4; 3 timed no faster on the H200 (benches/RESULTS.md).
    #[arg(long, default_value_t = DEFAULT_STAGES, value_parser = parse_stages)]
    pub stages: u32,

    /// PTX target: sm_80 or sm_90.
    #[arg(long, default_value = "sm_90", value_parser = arch())]
    pub arch: Arch,

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

/// The `--tensor-cores` values: the precisions on tensor cores.
fn tensor_core_precision() -> impl TypedValueParser<Value = Precision> {
    let values = Precision::ALL
        .into_iter()
        .filter(|p| p.on_tensor_cores())
        .map(|p| PossibleValue::new(p.value()).help(p.help()));
    PossibleValuesParser::new(values).try_map(|s| s.parse::<Precision>())
}

/// The `--arch` values: every PTX target.
pub fn arch() -> impl TypedValueParser<Value = Arch> {
    PossibleValuesParser::new(Arch::ALL.map(Arch::name)).try_map(|s| s.parse::<Arch>())
}

impl Args {
    /// The options this compile asks for.
    pub fn options(&self) -> CompileOptions {
        CompileOptions {
            fused: !self.unfused,
            lowering: LowerOptions {
                precision: self.tensor_cores.unwrap_or_default(),
                stages: self.stages,
            },
            arch: self.arch,
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    let step = args.model.training_step()?;
    let path = &args.model.model;
    let text = fisherc_ir::model::ModelSpec::read_text(path)?;
    let verified = compile_step(&step, (path, text), args.options())
        .with_context(|| format!("compiling {}", path.display()))?;
    let artifact = verified.artifact();
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
    PathBuf::from("compiled").join(format!(
        "{stem}_b{}_{}{noise}{}",
        args.model.batch,
        options.fisher,
        args.options().dir_suffix()
    ))
}
