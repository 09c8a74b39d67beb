//! `fisherc bench MODEL...`: whole training steps of every configuration asked for (model ×
//! batch × Fisher mode × fused/unfused) on one backend: the median step after warm-up (CUDA
//! events and CUDA-graph replay on the GPU), images/s, achieved FLOP/s and bytes/s against
//! the card's ceilings, the Fisher's cost over the plain step of the same model, batch and
//! variant, and one profiled step broken down by op. Prints each configuration's slowest ops
//! and a Markdown table last; `--json` keeps every number, rewritten after each configuration
//! so a run cut short keeps what it measured.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::builder::PossibleValue;
use fisherc_codegen::artifact::{Verified, compile_step};
use fisherc_codegen::compile::CompileOptions;
use fisherc_codegen::lower::LowerOptions;
use fisherc_codegen::options::{Arch, DEFAULT_STAGES, Precision, stages_note};
use fisherc_ir::model::{self, BuildOptions};
use fisherc_ir::state::kfac::{KfacSettings, KfacState};
use fisherc_ir::{FisherMode, Noise, StepOptions, build_training_step};
use fisherc_runtime::Session;
use fisherc_runtime::train::kfac::Refreshes;
use serde::Serialize;

use crate::backend_args::{self, BackendKind};
use crate::compile::parse_stages;
use crate::format::grouped_rounded;
use crate::hyper_args::HyperArgs;
use crate::model_args::parse_input;
use crate::profile::{self, NodeRow, OpRow};
use crate::run::RandomBatchSteps;

/// Ops printed per configuration.
const TOP_OPS: usize = 6;

/// A way to compile the step: fused on one precision, or unfused. Named in JSON as on the
/// command line (scripts/torch_bench.py joins on these names): `Precision::variant`'s names,
/// and `unfused`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub fused: bool,
    pub precision: Precision,
}

impl Variant {
    const UNFUSED: Variant = Variant {
        fused: false,
        precision: Precision::Fp32,
    };

    const ALL: [Variant; 4] = [
        Variant::fused(Precision::Fp32),
        Variant::fused(Precision::Tf32x3),
        Variant::fused(Precision::Tf32),
        Variant::UNFUSED,
    ];

    const fn fused(precision: Precision) -> Variant {
        Variant {
            fused: true,
            precision,
        }
    }

    fn name(self) -> &'static str {
        if self.fused {
            self.precision.variant()
        } else {
            "unfused"
        }
    }

    fn help(self) -> String {
        match (self.fused, self.precision.words()) {
            (false, _) => {
                "The step as autodiff built it (per-example gradients materialised)".into()
            }
            (true, "") => "The optimizer's fused graph".into(),
            (true, words) => format!("The optimizer's fused graph, convolutions on {words}"),
        }
    }

    /// The compile options of this variant.
    fn options(self, stages: u32, arch: Arch) -> CompileOptions {
        CompileOptions {
            fused: self.fused,
            lowering: LowerOptions {
                precision: self.precision,
                stages,
            },
            arch,
        }
    }
}

impl clap::ValueEnum for Variant {
    fn value_variants<'a>() -> &'a [Variant] {
        &Variant::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.name()).help(self.help()))
    }
}

impl Serialize for Variant {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model files, e.g. models/resnet44.toml models/vgg16.toml.
    #[arg(required = true)]
    pub models: Vec<PathBuf>,

    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128",
          value_parser = crate::model_args::at_least_one)]
    pub batch: Vec<usize>,

    /// Fisher modes, comma-separated: none, exact, a2g2.
    #[arg(long, value_delimiter = ',', default_value = "none,exact,a2g2",
          value_parser = |s: &str| s.parse::<FisherMode>())]
    pub fisher: Vec<FisherMode>,

    /// Noises, comma-separated: diagonal-fisher (with each Fisher mode of `--fisher`),
    /// multiplicative, fisher-trace, full-fisher-empirical, full-fisher-true, kfac (each with
    /// the estimate it needs: exact or none).
    #[arg(long, value_delimiter = ',', default_value = "diagonal-fisher",
          value_parser = |s: &str| s.parse::<Noise>())]
    pub noise: Vec<Noise>,

    /// K-FAC: steps between refreshes of the factors, for the step time amortised over them.
    #[arg(long, default_value_t = KfacSettings::default().every,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub kfac_every: u64,

    /// Variants, comma-separated: fused, fused-tc (convolutions on tensor cores, 3xTF32),
    /// fused-tf32 (one TF32 product), unfused.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "fused,unfused"
    )]
    pub variant: Vec<Variant>,

    #[arg(long, value_enum, default_value = "reference")]
    pub backend: BackendKind,

    /// Override every model's input shape, as CxHxW.
    #[arg(long, value_parser = parse_input)]
    pub input: Option<[usize; 3]>,

    /// Timed steps per configuration (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = crate::model_args::at_least_one)]
    pub steps: usize,

    /// Untimed steps before them.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,

    /// Leave out the profiled step (and the per-op breakdown).
    #[arg(long)]
    pub no_profile: bool,

    /// Write every measurement, per-op breakdowns included, as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Also write the Markdown table to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,

    /// PTX target: sm_80 or sm_90.
    #[arg(long, default_value = "sm_90", value_parser = crate::compile::arch())]
    pub arch: Arch,

    /// K slices the convolutions' GEMMs keep in flight, where shared memory allows: 2 (double
    /// buffering) to 4.
    #[arg(long, default_value_t = DEFAULT_STAGES, value_parser = parse_stages)]
    pub stages: u32,

    /// Seed of the initial parameters, the batch and the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    #[command(flatten)]
    pub hyper: HyperArgs,
}

/// One configuration's numbers (or the error that stopped it).
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub model: String,
    pub batch: usize,
    pub fisher: FisherMode,
    pub noise: Noise,
    pub variant: Variant,
    /// K slices in flight in the convolutions' GEMMs (`--stages`).
    pub stages: u32,
    pub device: String,
    pub compile_s: f64,
    pub launches_per_step: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub images_per_s: f64,
    /// The unoptimised step's FLOPs (the algorithm's work, not the kernels' recomputation).
    pub gflop_per_step: f64,
    pub tflop_per_s: f64,
    /// Bytes the step's kernels read and write, each buffer once per node.
    pub gb_per_step: f64,
    pub gb_per_s: f64,
    pub percent_fp32_peak: Option<f64>,
    pub percent_tf32_peak: Option<f64>,
    pub percent_bandwidth: Option<f64>,
    /// This step's median over the plain (`fisher none`) step of the same model, batch and
    /// variant, when both were measured.
    pub vs_plain: Option<f64>,
    /// K-FAC's refreshes, where the step has K-FAC noise (`median_ms` is then a step that
    /// does not refresh).
    pub kfac: Option<KfacTiming>,
    pub ops: Vec<OpRow>,
    /// The profiled step node by node (kernels named), in schedule order.
    pub nodes: Vec<NodeRow>,
    pub error: Option<String>,
}

/// What K-FAC's refreshes cost: a refreshing step (its factor products) and the host's
/// running average and Cholesky factorisation after it, medians; and the step's time with
/// one refresh every `every` steps, the host's work counted in full (the trainer runs it on
/// a thread beside the steps, which on a GPU hides it where it is shorter than they are).
#[derive(Clone, Debug, Serialize)]
pub struct KfacTiming {
    pub every: u64,
    pub refresh_step_ms: f64,
    pub host_ms: f64,
    pub amortised_ms: f64,
    /// `amortised_ms` over the plain step's median, when both were measured.
    pub amortised_vs_plain: Option<f64>,
}

/// A card's published ceilings.
#[derive(Clone, Copy, Debug)]
struct Ceilings {
    fp32: f64,
    tf32: f64,
    bandwidth: f64,
}

/// The ceilings of the device a backend describes, where fisherc knows them (data sheets:
/// H100 SXM 67 TFLOP/s FP32, 495 TFLOP/s dense TF32, 3.35 TB/s; H200 the same compute with
/// 4.8 TB/s). CPUs: none.
impl Ceilings {
    /// The share of its unit's peak a GEMM node's FLOPs reach: the dense TF32 tensor-core
    /// peak where its kernels multiply with mma (3xTF32 issues three products for each
    /// FLOP counted, so a third of it is its ceiling), fp32 FMA's otherwise; none for other
    /// nodes.
    fn percent_of_peak(&self, node: &NodeRow) -> Option<f64> {
        let peak = if node.multiply.as_deref()?.contains("mma") {
            self.tf32
        } else {
            self.fp32
        };
        Some(100.0 * node.gflop_per_s * 1e9 / peak)
    }
}

fn ceilings(device: &str) -> Option<Ceilings> {
    let (fp32, tf32) = (67e12, 495e12);
    if device.contains("H200") {
        Some(Ceilings {
            fp32,
            tf32,
            bandwidth: 4.8e12,
        })
    } else if device.contains("H100") {
        Some(Ceilings {
            fp32,
            tf32,
            bandwidth: 3.35e12,
        })
    } else {
        None
    }
}

pub fn run(args: &Args) -> Result<()> {
    let mut out = io::stdout().lock();
    let mut results: Vec<Measurement> = Vec::new();
    for path in &args.models {
        for &batch in &args.batch {
            for &variant in &args.variant {
                for (noise, fisher) in step_kinds(&args.noise, &args.fisher) {
                    let config = Config {
                        path,
                        batch,
                        fisher,
                        noise,
                        variant,
                        stages: args.stages,
                    };
                    let measured = measure(args, &config, &mut out).unwrap_or_else(|e| {
                        writeln!(out, "  failed: {e:#}").ok();
                        config.failed(format!("{e:#}"))
                    });
                    results.push(measured);
                    relate_to_plain(&mut results);
                    if let Some(json) = &args.json {
                        write_json(json, &results)?;
                    }
                }
            }
        }
    }
    // the GEMM nodes' table (long: every convolution of every configuration) goes to the
    // file only, after the configurations'
    let table = markdown(&results);
    writeln!(out, "\n{table}")?;
    if let Some(path) = &args.markdown {
        let both = format!("{table}\n{}", gemm_markdown(&results));
        std::fs::write(path, both).with_context(|| format!("writing {}", path.display()))?;
    }
    let failed = results.iter().filter(|m| m.error.is_some()).count();
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} configurations failed (see the table)",
        results.len()
    );
    Ok(())
}

/// The steps to time: diagonal-Fisher noise with each Fisher mode asked for, every other
/// noise once with the estimate it needs.
fn step_kinds(noises: &[Noise], fishers: &[FisherMode]) -> Vec<(Noise, FisherMode)> {
    let mut kinds = Vec::new();
    for &noise in noises {
        match noise {
            Noise::DiagonalFisher => kinds.extend(fishers.iter().map(|&f| (noise, f))),
            _ if noise.needs_fisher() => kinds.push((noise, FisherMode::Exact)),
            _ => kinds.push((noise, FisherMode::None)),
        }
    }
    kinds
}

struct Config<'a> {
    path: &'a Path,
    batch: usize,
    fisher: FisherMode,
    noise: Noise,
    variant: Variant,
    stages: u32,
}

impl Config<'_> {
    fn model(&self) -> String {
        self.path
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned())
    }

    fn failed(&self, error: String) -> Measurement {
        Measurement {
            model: self.model(),
            batch: self.batch,
            fisher: self.fisher,
            noise: self.noise,
            variant: self.variant,
            stages: self.stages,
            device: String::new(),
            compile_s: 0.0,
            launches_per_step: 0,
            median_ms: f64::NAN,
            min_ms: f64::NAN,
            images_per_s: f64::NAN,
            gflop_per_step: f64::NAN,
            tflop_per_s: f64::NAN,
            gb_per_step: f64::NAN,
            gb_per_s: f64::NAN,
            percent_fp32_peak: None,
            percent_tf32_peak: None,
            percent_bandwidth: None,
            vs_plain: None,
            kfac: None,
            ops: Vec::new(),
            nodes: Vec::new(),
            error: Some(error),
        }
    }
}

/// Compiles, runs and times one configuration.
fn measure(args: &Args, config: &Config<'_>, out: &mut impl Write) -> Result<Measurement> {
    writeln!(
        out,
        "{} · batch {} · {} · {}{}",
        config.path.display(),
        config.batch,
        config.noise.describe(config.fisher),
        config.variant.name(),
        match args.backend.runs_kernels() {
            true => format!(" · {} stages", config.stages),
            false => String::new(),
        }
    )?;
    let options = BuildOptions {
        input: args.input,
        ..BuildOptions::train(config.batch)
    };
    let network = model::load(config.path, &options)?;
    let step_options = StepOptions {
        noise: config.noise,
        ..StepOptions::new(config.fisher)
    };
    let step = build_training_step(network, &step_options)?;
    let text = fisherc_ir::model::ModelSpec::read_text(config.path)?;
    let options = config.variant.options(config.stages, args.arch);
    let verified = compile_step(&step, (config.path, text), options)
        .with_context(|| format!("compiling {}", config.path.display()))?;
    let settings = KfacSettings {
        every: args.kfac_every,
        ..KfacSettings::default()
    };
    let kfac = KfacState::for_step(&step, settings);
    let times = timed_steps(args, &verified, kfac, out)?;
    let (artifact, compiled) = (verified.artifact(), verified.compiled());

    let median = crate::timing::median(&times.steps).context("no timed steps")?;
    // a K-FAC step's factor products run on refreshing steps only, timed apart
    let refresh_flops: u64 = step
        .graph
        .node_indices()
        .filter(|&n| is_factor(&step.graph.node(n).op))
        .map(|n| step.graph.node_flops(n))
        .sum();
    let flops = (step.graph.flops() - refresh_flops) as f64;
    let plan = &artifact.plan;
    let bytes: u64 = plan
        .nodes
        .iter()
        .map(|n| profile::node_bytes(plan, n))
        .sum();
    let profiled = times.profile.as_deref().unwrap_or_default();
    let ops = profile::op_rows(plan, &compiled.graph, profiled);
    let nodes = profile::node_rows(plan, &compiled.graph, profiled);
    let peaks = ceilings(&times.device);
    let nodes = nodes
        .into_iter()
        .map(|n| NodeRow {
            percent_peak: peaks.and_then(|c| c.percent_of_peak(&n)),
            ..n
        })
        .collect();
    let (flop_rate, byte_rate) = (flops / median, bytes as f64 / median);
    let measured = Measurement {
        model: config.model(),
        batch: config.batch,
        fisher: config.fisher,
        noise: config.noise,
        variant: config.variant,
        stages: config.stages,
        device: times.device,
        compile_s: compiled.seconds,
        launches_per_step: plan.launches.len(),
        median_ms: median * 1e3,
        min_ms: times.steps.iter().copied().fold(f64::INFINITY, f64::min) * 1e3,
        images_per_s: config.batch as f64 / median,
        gflop_per_step: flops / 1e9,
        tflop_per_s: flop_rate / 1e12,
        gb_per_step: bytes as f64 / 1e9,
        gb_per_s: byte_rate / 1e9,
        percent_fp32_peak: peaks.map(|c| 100.0 * flop_rate / c.fp32),
        percent_tf32_peak: peaks.map(|c| 100.0 * flop_rate / c.tf32),
        percent_bandwidth: peaks.map(|c| 100.0 * byte_rate / c.bandwidth),
        vs_plain: None,
        kfac: times.kfac.map(|k| k.timing(median, args.kfac_every)),
        ops,
        nodes,
        error: None,
    };
    print_summary(out, &measured)?;
    Ok(measured)
}

/// What a configuration's steps gave: the device, each timed step's seconds, and one
/// profiled step's seconds per planned node.
struct Times {
    device: String,
    steps: Vec<f64>,
    profile: Option<Vec<f64>>,
    kfac: Option<KfacSamples>,
}

/// K-FAC's refreshing steps and the host's work after each, in seconds.
struct KfacSamples {
    refresh_steps: Vec<f64>,
    host: Vec<f64>,
}

impl KfacSamples {
    /// Their medians, and a step's time with one refresh every `every` steps beside plain
    /// steps of `median` seconds.
    fn timing(&self, median: f64, every: u64) -> KfacTiming {
        let refresh = crate::timing::median(&self.refresh_steps).unwrap_or(f64::NAN);
        let host = crate::timing::median(&self.host).unwrap_or(f64::NAN);
        let amortised = median + (refresh - median + host) / every as f64;
        KfacTiming {
            every,
            refresh_step_ms: refresh * 1e3,
            host_ms: host * 1e3,
            amortised_ms: amortised * 1e3,
            amortised_vs_plain: None,
        }
    }
}

/// One K-FAC refresh as the trainer makes it: a refreshing step, then the factors read back,
/// averaged and factored on the host's worker, waited for and fed. Its two times.
fn kfac_refresh<B: fisherc_runtime::Backend>(
    session: &mut Session<B>,
    kfac: &mut Refreshes,
) -> Result<(f64, f64)> {
    session.feed(&kfac.in_use().refresh_feed(true))?;
    let step = session.step().context("a refreshing step")?;
    let started = Instant::now();
    kfac.after_refresh(session, 0)?;
    kfac.apply(session)?;
    let host = started.elapsed().as_secs_f64();
    session.feed(&kfac.in_use().refresh_feed(false))?;
    Ok((step, host))
}

/// Refreshing steps timed per configuration (each costs about a step and the factors'
/// products).
const KFAC_REFRESHES: usize = 3;

fn timed_steps(
    args: &Args,
    verified: &Verified,
    kfac: KfacState,
    out: &mut impl Write,
) -> Result<Times> {
    let backend = backend_args::open(args.backend, verified)?;
    let artifact = verified.artifact();
    let mut session = Session::new(artifact, backend)?;
    if args.backend == BackendKind::Cuda {
        session.backend.capture()?;
    }
    let source = &artifact.plan.source;
    let drawn = source.noise.is_drawn(source.fisher);
    let noise_scale = args.hyper.noise_scale(drawn, source.batch);
    let feeder = RandomBatchSteps::start(&mut session, args.seed, noise_scale)?;
    let mut kfac = Refreshes::start(kfac, &mut session)?;
    if !kfac.in_use().is_empty() {
        // the Cholesky factors of this batch's factors, for every timed step's noise
        feeder.feed(&mut session, &args.hyper, 0)?;
        kfac_refresh(&mut session, &mut kfac)?;
    }
    let mut steps = Vec::with_capacity(args.steps);
    for k in 0..args.warmup + args.steps {
        feeder.feed(&mut session, &args.hyper, k)?;
        let started = Instant::now();
        let seconds = session.step().with_context(|| format!("step {}", k + 1))?;
        if k < args.warmup {
            writeln!(
                out,
                "  warm-up step {} ({:.1} s)",
                k + 1,
                started.elapsed().as_secs_f64()
            )?;
        } else {
            steps.push(seconds);
        }
    }
    let loss = session.loss()?;
    anyhow::ensure!(loss.is_finite(), "the loss after the steps is {loss}");
    let profile = if args.no_profile {
        None
    } else {
        Some(session.profile().context("the profiled step")?)
    };
    let kfac = match kfac.in_use().is_empty() {
        true => None,
        false => {
            let mut samples = KfacSamples {
                refresh_steps: Vec::new(),
                host: Vec::new(),
            };
            for _ in 0..KFAC_REFRESHES {
                let (step, host) = kfac_refresh(&mut session, &mut kfac)?;
                samples.refresh_steps.push(step);
                samples.host.push(host);
            }
            Some(samples)
        }
    };
    Ok(Times {
        device: session.backend.describe(),
        steps,
        profile,
        kfac,
    })
}

fn print_summary(out: &mut impl Write, m: &Measurement) -> Result<()> {
    writeln!(
        out,
        "  median {:.3} ms (min {:.3}) · {} images/s · {:.3} TFLOP/s · {:.1} GB/s · {} launches · on {}",
        m.median_ms,
        m.min_ms,
        grouped_rounded(m.images_per_s),
        m.tflop_per_s,
        m.gb_per_s,
        m.launches_per_step,
        m.device
    )?;
    for op in m.ops.iter().take(TOP_OPS) {
        writeln!(
            out,
            "    {:<30} {:>5.1}% {:>10.3} ms {:>9.1} GFLOP/s {:>8.1} GB/s",
            op.op, op.percent, op.ms, op.gflop_per_s, op.gb_per_s
        )?;
    }
    let mut gemms: Vec<&NodeRow> = m.nodes.iter().filter(|n| n.multiply.is_some()).collect();
    gemms.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    if !gemms.is_empty() {
        writeln!(out, "    slowest GEMM nodes (% of their unit's peak):")?;
    }
    for n in gemms.iter().take(TOP_OPS) {
        writeln!(
            out,
            "    {:<30} {:>10.3} ms {:>9.1} GFLOP/s {:>6} {}",
            format!("{} {}", n.layer, n.op),
            n.ms,
            n.gflop_per_s,
            percent_text(n.percent_peak),
            n.multiply.as_deref().unwrap_or_default()
        )?;
    }
    Ok(())
}

/// A share in percent to one decimal, or `-` where unknown.
fn percent_text(p: Option<f64>) -> String {
    p.map_or("-".to_string(), |p| format!("{p:.1}%"))
}

/// Every configuration's GEMM nodes as a Markdown table: time, achieved rate and the share
/// of its unit's peak (`NodeRow::percent_peak`), beside the kernels that ran it.
pub fn gemm_markdown(results: &[Measurement]) -> String {
    let mut table = String::from(
        "| model | batch | fisher | variant | layer | op | ms | GFLOP/s | % of peak | multiply | kernels |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for m in results.iter().filter(|m| m.error.is_none()) {
        for n in m.nodes.iter().filter(|n| n.multiply.is_some()) {
            writeln!(
                table,
                "| {} | {} | {} | {}{} | {} | {} | {:.3} | {:.1} | {} | {} | {} |",
                m.model,
                m.batch,
                m.fisher,
                m.variant.name(),
                stages_note(m.stages),
                n.layer,
                n.op,
                n.ms,
                n.gflop_per_s,
                percent_text(n.percent_peak),
                n.multiply.as_deref().unwrap_or_default(),
                n.kernels.join(", ")
            )
            .ok();
        }
    }
    table
}

/// Fills `vs_plain` of every measurement whose plain counterpart was measured.
fn relate_to_plain(results: &mut [Measurement]) {
    let plain: Vec<(String, usize, Variant, f64)> = results
        .iter()
        .filter(|m| is_plain(m) && m.error.is_none())
        .map(|m| (m.model.clone(), m.batch, m.variant, m.median_ms))
        .collect();
    for m in results.iter_mut().filter(|m| m.error.is_none()) {
        let plain_ms = plain
            .iter()
            .find(|(model, batch, variant, _)| {
                *model == m.model && *batch == m.batch && *variant == m.variant
            })
            .map(|(.., ms)| *ms);
        m.vs_plain = plain_ms.map(|ms| m.median_ms / ms);
        if let (Some(kfac), Some(ms)) = (&mut m.kfac, plain_ms) {
            kfac.amortised_vs_plain = Some(kfac.amortised_ms / ms);
        }
    }
}

/// Whether `op` computes K-FAC factors (work of refreshing steps only).
fn is_factor(op: &fisherc_ir::ops::Op) -> bool {
    use fisherc_ir::ops::Op;
    matches!(op, Op::KfacInputFactor(_) | Op::KfacGradFactor(_))
}

/// A plain step: no Fisher estimate, no noise.
fn is_plain(m: &Measurement) -> bool {
    m.noise == Noise::DiagonalFisher && m.fisher == FisherMode::None
}

/// The step's kind in the table's `fisher` column: the Fisher mode of diagonal-Fisher noise,
/// else the noise and its estimate (`kfac (exact)`).
fn kind(m: &Measurement) -> String {
    match m.noise {
        Noise::DiagonalFisher => m.fisher.to_string(),
        noise => format!("{noise} ({})", m.fisher),
    }
}

fn write_json(path: &Path, results: &[Measurement]) -> Result<()> {
    let text = serde_json::to_string_pretty(results)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The results as a Markdown table.
pub fn markdown(results: &[Measurement]) -> String {
    let mut table = String::from(
        "| model | batch | fisher | variant | median ms | images/s | TFLOP/s | % FP32 | % TF32 | GB/s | % bandwidth | × plain |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let percent = |p: Option<f64>| p.map_or("-".to_string(), |p| format!("{p:.1}"));
    for m in results {
        let head = format!(
            "| {} | {} | {} | {}{} |",
            m.model,
            m.batch,
            kind(m),
            m.variant.name(),
            stages_note(m.stages)
        );
        if let Some(error) = &m.error {
            let first = error.lines().next().unwrap_or_default();
            writeln!(table, "{head} failed: {first} | | | | | | | |").ok();
            continue;
        }
        writeln!(
            table,
            "{head} {:.3} | {:.0} | {:.3} | {} | {} | {:.1} | {} | {} |",
            m.median_ms,
            m.images_per_s,
            m.tflop_per_s,
            percent(m.percent_fp32_peak),
            percent(m.percent_tf32_peak),
            m.gb_per_s,
            percent(m.percent_bandwidth),
            m.vs_plain.map_or("-".to_string(), |r| format!("{r:.2}")),
        )
        .ok();
    }
    for m in results.iter().filter(|m| m.error.is_none()) {
        let Some(k) = &m.kfac else { continue };
        writeln!(
            table,
            "\n{} batch {} {}: a refreshing step {:.3} ms, the host's average and Cholesky \
             factors {:.3} ms; with a refresh every {} steps and the host's work not \
             overlapped, {:.3} ms a step ({} × plain)",
            m.model,
            m.batch,
            m.variant.name(),
            k.refresh_step_ms,
            k.host_ms,
            k.every,
            k.amortised_ms,
            k.amortised_vs_plain
                .map_or("-".to_string(), |r| format!("{r:.2}")),
        )
        .ok();
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(multiply: Option<&str>, gflop_per_s: f64) -> NodeRow {
        NodeRow {
            layer: "conv1".to_string(),
            op: "fused_conv".to_string(),
            kernels: vec!["fused_conv_forward_0".to_string()],
            ms: 1.0,
            gflop_per_s,
            gb_per_s: 0.0,
            multiply: multiply.map(str::to_string),
            percent_peak: None,
        }
    }

    /// A GEMM node's share is of its unit's peak (tensor cores for mma, FMA else); other
    /// nodes and unknown cards have none.
    #[test]
    fn gemm_nodes_are_set_against_their_units_peak() {
        let h100 = ceilings("NVIDIA H100 80GB HBM3").expect("a known card");
        let tensor = h100.percent_of_peak(&node(Some("tf32 mma m16n8k8"), 49_500.0));
        assert!((tensor.unwrap() - 10.0).abs() < 1e-9, "{tensor:?}");
        let fma = h100.percent_of_peak(&node(Some("fp32 fma"), 6_700.0));
        assert!((fma.unwrap() - 10.0).abs() < 1e-9, "{fma:?}");
        assert_eq!(h100.percent_of_peak(&node(None, 1e6)), None);
        assert!(ceilings("cpu (reference)").is_none());
    }
}
