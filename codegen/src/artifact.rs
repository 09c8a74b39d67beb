//! A compiled step on disk, the hand-off from the compiler to the runtime:
//!
//! * `module.ptx`: every kernel, one PTX module;
//! * `plan.json`: the [`Plan`]: buffers and their offsets in the arena, kernels with their
//!   parameters, the step sequence (nodes, each with its launches: grid, block, arguments in
//!   order), which buffers the host writes (inputs, hyper-parameter slots) and reads (outputs);
//! * `summary.txt`: the same for people.
//!
//! Files are written to a temporary name and renamed, so an interrupted compile never leaves a
//! half-written artifact behind, and reading checks everything a runtime would trip over.

use std::fs;
use std::path::{Path, PathBuf};

use fisherc_ir::graph::Output;
use fisherc_ir::ops::{Hyper, Role};
use fisherc_ir::tensor::DType;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use fisherc_ir::model::{BuildOptions, Mode, ModelSpec, Network, Shortcut, build};
use fisherc_ir::{
    FisherMode, Graph, ModelError, Noise, ShapeError, StepOptions, TrainingStep,
    build_training_step,
};

use crate::compile::{CompileError, CompileOptions, Compiled, compile, compile_graph};
use crate::kir::{GemmSchedule, Kernel, MainLoop, ParamTy};
use crate::plan::{Arg, Buffer, PlannedLaunch, PlannedNode, Program};
use crate::ptx;

/// Version of the `plan.json` layout; bumped on any incompatible change.
pub const FORMAT: u32 = 1;

pub const PTX_FILE: &str = "module.ptx";
pub const PLAN_FILE: &str = "plan.json";
pub const SUMMARY_FILE: &str = "summary.txt";

/// What was compiled, and how: enough to compile it again (the model file's text is kept, so
/// an artifact stands alone).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// The model file's path when it was compiled.
    pub model: String,
    pub model_text: String,
    pub batch: usize,
    pub input: [usize; 3],
    pub shortcut: Option<Shortcut>,
    pub fisher: FisherMode,
    /// Weight decay on batch-norm γ and β too.
    #[serde(default)]
    pub decay_bn: bool,
    /// The noise's covariance (artifacts from before it was recorded have diagonal Fisher).
    #[serde(default)]
    pub noise: Noise,
    /// How it was compiled: recorded as `fused`, `tensor_cores`, `single_tf32`, `stages`,
    /// `arch` (`options::Recorded`).
    #[serde(flatten)]
    pub compile: CompileOptions,
    /// What the program runs: a training step (artifacts from before it was recorded) or
    /// the network's forward pass in evaluation mode.
    #[serde(default, skip_serializing_if = "ProgramKind::is_step")]
    pub program: ProgramKind,
    /// The classifier's width it was built with, which may differ from the model file's (the
    /// trainer widens it to the data set's classes); artifacts from before it was recorded
    /// have the file's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<usize>,
}

/// What an artifact's program runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgramKind {
    /// The training step: forward, loss, backward, Fisher, noisy update.
    #[default]
    Step,
    /// The forward pass in evaluation mode (batch norm with its running statistics): logits
    /// from images, parameters and running statistics. The Fisher and noise settings do not
    /// apply.
    Evaluation,
}

impl ProgramKind {
    fn is_step(&self) -> bool {
        *self == ProgramKind::Step
    }
}

impl Source {
    /// The source of `step`, built from the model file at `path` whose text is `model_text`
    /// and compiled with `options`.
    pub fn of(
        step: &TrainingStep,
        path: &Path,
        model_text: String,
        options: CompileOptions,
    ) -> Source {
        Source {
            fisher: step.fisher,
            decay_bn: step.decay_bn,
            noise: step.noise,
            ..Source::of_network(&step.network, (path, model_text), options)
        }
    }

    /// The source of `network`'s evaluation program (`network` built in evaluation mode),
    /// from the model file at `path` whose text is `model_text`, compiled with `options`.
    pub fn of_evaluation(
        network: &Network,
        (path, model_text): (&Path, String),
        options: CompileOptions,
    ) -> Source {
        Source {
            program: ProgramKind::Evaluation,
            ..Source::of_network(network, (path, model_text), options)
        }
    }

    /// What a program of `network` records of it and of its compile: a training step's
    /// source without Fisher, decay of BN parameters or noise.
    fn of_network(
        network: &Network,
        (path, model_text): (&Path, String),
        options: CompileOptions,
    ) -> Source {
        Source {
            model: path.display().to_string(),
            model_text,
            batch: network.batch,
            input: network.input,
            shortcut: network.shortcut,
            fisher: FisherMode::None,
            decay_bn: false,
            noise: Noise::default(),
            compile: options,
            program: ProgramKind::Step,
            classes: Some(network.classes),
        }
    }

    /// The network again, from the kept model text (with the classifier's width it was built
    /// with): in training mode for a step, in evaluation mode for an evaluation program.
    pub fn network(&self) -> Result<Network, SourceError> {
        let path = Path::new(&self.model);
        let mut spec = ModelSpec::parse(&self.model_text, path)?;
        if let Some(classes) = self.classes {
            spec.classes = classes;
        }
        let options = BuildOptions {
            batch: self.batch,
            input: Some(self.input),
            shortcut: self.shortcut,
            mode: match self.program {
                ProgramKind::Step => Mode::Train,
                ProgramKind::Evaluation => Mode::Eval,
            },
        };
        Ok(build(&spec, &options)?)
    }

    /// The graph the program computes before optimisation: the training step's, or the
    /// evaluation-mode network's.
    pub fn graph(&self) -> Result<Graph, SourceError> {
        match self.program {
            ProgramKind::Step => Ok(self.training_step()?.graph),
            ProgramKind::Evaluation => Ok(self.network()?.graph),
        }
    }

    /// The training step again, from the kept model text.
    pub fn training_step(&self) -> Result<TrainingStep, SourceError> {
        if self.program != ProgramKind::Step {
            return Err(SourceError::NotAStep {
                model: self.model.clone(),
            });
        }
        let network = self.network()?;
        let options = StepOptions {
            fisher: self.fisher,
            decay_bn: self.decay_bn,
            noise: self.noise,
        };
        Ok(build_training_step(network, &options)?)
    }
}

/// A kernel's signature; its body is in the PTX module.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub name: String,
    pub params: Vec<(String, ParamTy)>,
    pub block: u32,
    pub shared_bytes: u32,
    /// `Kernel::main_loop` (absent in artifacts from before it, and for kernels without a
    /// main loop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_loop: Option<MainLoop>,
    /// `Kernel::schedule`, for GEMM kernels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<GemmSchedule>,
}

/// A buffer the host writes or reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slot<R> {
    pub role: R,
    pub buffer: usize,
}

/// A hyper-parameter the host writes before each step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HyperSlot {
    pub hyper: Hyper,
    pub buffer: usize,
    pub offset: u64,
    pub dtype: DType,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format: u32,
    /// Version of fisherc that wrote it.
    pub fisherc: String,
    pub source: Source,
    /// Compile time in seconds, optimizer included.
    pub compile_seconds: f64,
    pub arena_bytes: u64,
    /// Bytes at the start of the arena that persist: inputs, constants, outputs.
    pub persistent_bytes: u64,
    pub buffers: Vec<Buffer>,
    pub kernels: Vec<KernelInfo>,
    /// The step: nodes in order, each with its launches.
    pub nodes: Vec<PlannedNode>,
    pub launches: Vec<PlannedLaunch>,
    pub inputs: Vec<Slot<Role>>,
    pub hyper: Vec<HyperSlot>,
    pub outputs: Vec<Slot<Output>>,
}

#[derive(Debug, Error)]
pub enum ArtifactError {
    /// The OS error is part of the message (not a `source`), so it is printed once.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Input {
        path: PathBuf,
        error: fisherc_ir::files::InputError,
    },
    #[error(
        "{dir} is not a compiled artifact: it has no {PLAN_FILE} (`fisherc compile MODEL -o {dir}` writes one)"
    )]
    NotAnArtifact { dir: PathBuf },
    #[error("{path}:{line}:{column}: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Why an artifact's source cannot be compiled again into the artifact.
#[derive(Debug, Error)]
pub enum SourceError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("{model} is compiled as an evaluation program, not a training step")]
    NotAStep { model: String },
    #[error(
        "compiling {model} again gives another program: the artifact was edited or damaged, or comes from another fisherc (it says {fisherc}); recompile it"
    )]
    Changed { model: String, fisherc: String },
}

/// What is wrong in a plan that a runtime would trip over: which index, buffer or launch.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct InvalidPlan(pub String);

impl From<String> for InvalidPlan {
    fn from(message: String) -> InvalidPlan {
        InvalidPlan(message)
    }
}

/// A plan and its PTX module.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub plan: Plan,
    pub ptx: String,
}

/// An artifact and the compilation that gives it: what every backend takes, so that none runs
/// a plan the compiler did not make. Made by compiling ([`compile_step`],
/// [`compile_evaluation`], [`Verified::package`]) or, for an artifact read from disk, by
/// [`Artifact::verify`].
pub struct Verified {
    artifact: Artifact,
    compiled: Compiled,
}

impl Verified {
    /// A compilation packaged with its source: verified by construction.
    pub fn package(compiled: Compiled, source: Source) -> Verified {
        let artifact = Artifact::new(&compiled.program, source, compiled.seconds);
        Verified { artifact, compiled }
    }

    /// The plan and PTX (what the GPU runs).
    pub fn artifact(&self) -> &Artifact {
        &self.artifact
    }

    /// The graph and kernel IR behind them (what the CPU backends run).
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    pub fn plan(&self) -> &Plan {
        &self.artifact.plan
    }
}

/// A training step compiled with `options` into its artifact: the one way from a model to an
/// artifact (`model` is the model file's path and text, kept in the artifact).
pub fn compile_step(
    step: &TrainingStep,
    (path, model_text): (&Path, String),
    options: CompileOptions,
) -> Result<Verified, CompileError> {
    let compiled = compile(step, options)?;
    Ok(Verified::package(
        compiled,
        Source::of(step, path, model_text, options),
    ))
}

/// [`compile_step`] for `network`'s evaluation program (`network` built in evaluation mode).
pub fn compile_evaluation(
    network: &Network,
    (path, model_text): (&Path, String),
    options: CompileOptions,
) -> Result<Verified, CompileError> {
    let compiled = compile_graph(&network.graph, options)?;
    Ok(Verified::package(
        compiled,
        Source::of_evaluation(network, (path, model_text), options),
    ))
}

impl Artifact {
    /// Packages a compiled program.
    pub fn new(program: &Program, source: Source, compile_seconds: f64) -> Artifact {
        let kernels: Vec<&Kernel> = program.kernels.iter().collect();
        let ptx = ptx::module(&kernels, source.compile.arch.name());
        let slot = |(role, &buffer): (&Role, &usize)| Slot {
            role: role.clone(),
            buffer,
        };
        let hyper = program
            .inputs
            .iter()
            .filter_map(|(role, &buffer)| match role {
                Role::Hyper(h) => Some(HyperSlot {
                    hyper: *h,
                    buffer,
                    offset: program.buffers[buffer].offset,
                    dtype: program.buffers[buffer].dtype,
                }),
                _ => None,
            })
            .collect();
        let plan = Plan {
            format: FORMAT,
            fisherc: env!("CARGO_PKG_VERSION").to_string(),
            source,
            compile_seconds,
            arena_bytes: program.arena_bytes,
            persistent_bytes: program.persistent_bytes,
            buffers: program.buffers.clone(),
            kernels: program.kernels.iter().map(KernelInfo::of).collect(),
            nodes: program.nodes.clone(),
            launches: program.launches.clone(),
            inputs: program.inputs.iter().map(slot).collect(),
            hyper,
            outputs: program
                .outputs
                .iter()
                .map(|(role, &buffer)| Slot {
                    role: role.clone(),
                    buffer,
                })
                .collect(),
        };
        Artifact { plan, ptx }
    }

    /// Writes `module.ptx`, `plan.json` and `summary.txt` into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> Result<(), ArtifactError> {
        fs::create_dir_all(dir).map_err(|error| ArtifactError::Io {
            path: dir.to_path_buf(),
            error,
        })?;
        let json = serde_json::to_string_pretty(&self.plan).expect("plans serialise");
        write_atomically(&dir.join(PTX_FILE), &self.ptx)?;
        write_atomically(&dir.join(PLAN_FILE), &json)?;
        write_atomically(&dir.join(SUMMARY_FILE), &summary(&self.plan))
    }

    /// Reads an artifact back and checks that it hangs together.
    pub fn read(dir: &Path) -> Result<Artifact, ArtifactError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fisherc_ir::files::read_text(&path)
                .map_err(|error| ArtifactError::Input { path, error })
        };
        let plan_path = dir.join(PLAN_FILE);
        if dir.exists() && !plan_path.exists() {
            return Err(ArtifactError::NotAnArtifact {
                dir: dir.to_path_buf(),
            });
        }
        let text = read(PLAN_FILE)?;
        let plan: Plan = serde_json::from_str(&text).map_err(|e| ArtifactError::Json {
            path: plan_path.clone(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ArtifactError::Invalid {
            path: plan_path.clone(),
            message,
        };
        if plan.format != FORMAT {
            return Err(invalid(format!(
                "plan format {} (this fisherc reads format {FORMAT}); recompile the model",
                plan.format
            )));
        }
        plan.check().map_err(|e| invalid(e.0))?;
        let ptx = read(PTX_FILE)?;
        if let Some(missing) = plan
            .kernels
            .iter()
            .find(|k| !ptx.contains(&format!(".entry {}(", k.name)))
        {
            return Err(ArtifactError::Invalid {
                path: dir.join(PTX_FILE),
                message: format!("no kernel {} (named in {PLAN_FILE})", missing.name),
            });
        }
        Ok(Artifact { plan, ptx })
    }
}

impl Artifact {
    /// Compiles the source again and checks that it gives this very artifact (same PTX, same
    /// plan): the one validation of an artifact from disk before any backend runs it, and the
    /// way to the graph and kernel IR behind its plan.
    pub fn verify(self) -> Result<Verified, SourceError> {
        let graph = self.plan.source.graph()?;
        let compiled = compile_graph(&graph, self.plan.source.compile)?;
        let again = Artifact::new(
            &compiled.program,
            self.plan.source.clone(),
            self.plan.compile_seconds,
        );
        if again.ptx != self.ptx || again.plan != self.plan {
            return Err(SourceError::Changed {
                model: self.plan.source.model.clone(),
                fisherc: self.plan.fisherc.clone(),
            });
        }
        Ok(Verified {
            artifact: self,
            compiled,
        })
    }
}

impl KernelInfo {
    fn of(k: &Kernel) -> KernelInfo {
        KernelInfo {
            name: k.name.clone(),
            params: k.params.clone(),
            block: k.block,
            shared_bytes: k.shared_bytes,
            main_loop: k.main_loop,
            schedule: k.schedule.clone(),
        }
    }
}

impl Plan {
    /// Every index in range, every buffer inside the arena, every launch's arguments of its
    /// kernel's parameter types, every node's launches where it says.
    pub fn check(&self) -> Result<(), InvalidPlan> {
        for b in &self.buffers {
            if b.offset
                .checked_add(b.bytes)
                .is_none_or(|end| end > self.arena_bytes)
            {
                return Err(format!(
                    "buffer {} ({} bytes at {}) outside the arena of {} bytes",
                    b.name, b.bytes, b.offset, self.arena_bytes
                )
                .into());
            }
        }
        let buffer = |i: usize, what: &str| {
            if i < self.buffers.len() {
                Ok(())
            } else {
                Err(format!("{what}: buffer {i} of {}", self.buffers.len()).into())
            }
        };
        for (i, launch) in self.launches.iter().enumerate() {
            let kernel = self.kernels.get(launch.kernel).ok_or_else(|| {
                format!(
                    "launch {i}: kernel {} of {}",
                    launch.kernel,
                    self.kernels.len()
                )
            })?;
            if launch.args.len() != kernel.params.len() {
                return Err(format!(
                    "launch {i} of {}: {} arguments for {} parameters",
                    kernel.name,
                    launch.args.len(),
                    kernel.params.len()
                )
                .into());
            }
            for (arg, (name, ty)) in launch.args.iter().zip(&kernel.params) {
                match (arg, ty) {
                    (Arg::Buffer(b), ParamTy::Ptr) => buffer(*b, &format!("launch {i}, {name}"))?,
                    (Arg::U32(_), ParamTy::U32) | (Arg::F32(_), ParamTy::F32) => {}
                    _ => {
                        return Err(format!(
                            "launch {i} of {}: {name} ({ty:?}) given {arg:?}",
                            kernel.name
                        )
                        .into());
                    }
                }
            }
            if launch.node >= self.nodes.len() {
                return Err(
                    format!("launch {i}: node {} of {}", launch.node, self.nodes.len()).into(),
                );
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let what = format!("node {i} ({} {})", node.layer, node.op);
            node.inputs
                .iter()
                .chain(&node.outputs)
                .try_for_each(|&b| buffer(b, &what))?;
            let own = node
                .first_launch
                .checked_add(node.launch_count)
                .and_then(|end| self.launches.get(node.first_launch..end))
                .is_some_and(|launches| launches.iter().all(|l| l.node == i));
            if !own {
                return Err(format!(
                    "{what}: its launches {} from {} are not its own",
                    node.launch_count, node.first_launch
                )
                .into());
            }
        }
        let slots = self
            .inputs
            .iter()
            .map(|s| s.buffer)
            .chain(self.outputs.iter().map(|s| s.buffer));
        slots
            .chain(self.hyper.iter().map(|s| s.buffer))
            .try_for_each(|b| buffer(b, "slot"))
    }
}

fn write_atomically(path: &Path, text: &str) -> Result<(), ArtifactError> {
    fisherc_ir::files::write_atomically(path, text.as_bytes()).map_err(|error| ArtifactError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// Bytes in binary units: `5.43 GiB`.
pub fn bytes(n: u64) -> String {
    let units = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (scale, unit) in units {
        if n >= scale {
            return format!("{:.2} {unit}", n as f64 / scale as f64);
        }
    }
    format!("{n} B")
}

/// The human-readable summary (`summary.txt`, `fisherc compile`, `fisherc inspect DIR`).
pub fn summary(plan: &Plan) -> String {
    let s = &plan.source;
    let mut launches_by_op: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for node in plan.nodes.iter().filter(|n| n.launch_count > 0) {
        let entry = launches_by_op.entry(&node.op).or_default();
        entry.0 += 1;
        entry.1 += node.launch_count;
    }
    let state = |f: fn(&Role) -> bool| -> u64 {
        plan.inputs
            .iter()
            .filter(|slot| f(&slot.role))
            .map(|slot| plan.buffers[slot.buffer].bytes)
            .sum()
    };
    let params = state(|r| matches!(r, Role::Param(_)));
    let momenta = state(|r| matches!(r, Role::Momentum(_)));
    let outputs = |f: fn(&Output) -> bool| -> u64 {
        plan.outputs
            .iter()
            .filter(|slot| f(&slot.role))
            .map(|slot| plan.buffers[slot.buffer].bytes)
            .sum()
    };
    let fisher = outputs(|o| matches!(o, Output::Fisher(_)));
    let mut out = format!(
        "{} · batch {} · {} · {} · {}\n",
        s.model,
        s.batch,
        s.noise.describe(s.fisher),
        s.compile.describe(),
        s.compile.arch
    );
    out += &format!(
        "compiled by fisherc {} in {:.2} s\n",
        plan.fisherc, plan.compile_seconds
    );
    out += &format!(
        "arena       {} = {} persistent + {} transient peak\n",
        bytes(plan.arena_bytes),
        bytes(plan.persistent_bytes),
        bytes(plan.arena_bytes - plan.persistent_bytes)
    );
    out += &format!(
        "            parameters {}, momenta {}, Fisher {}\n",
        bytes(params),
        bytes(momenta),
        bytes(fisher)
    );
    let kfac_inputs =
        state(|r| matches!(r, Role::KfacInputCholesky(_) | Role::KfacGradCholesky(_)));
    if kfac_inputs > 0 {
        let factors = outputs(Output::is_kfac_factor);
        out += &format!(
            "            K-FAC factors {}, their Cholesky factors {}\n",
            bytes(factors),
            bytes(kfac_inputs)
        );
    }
    out += &format!(
        "step        {} nodes, {} launches of {} kernels, {} buffers\n",
        plan.nodes.len(),
        plan.launches.len(),
        plan.kernels.len(),
        plan.buffers.len()
    );
    out += "hyper slots ";
    let hyper_name = |h: &HyperSlot| {
        serde_json::to_value(h.hyper)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
    };
    let slots: Vec<String> = plan
        .hyper
        .iter()
        .map(|h| format!("{} @{}", hyper_name(h).unwrap_or_default(), h.offset))
        .collect();
    out += &slots.join(", ");
    out += "\nlaunches by op (nodes, launches):\n";
    for (op, (nodes, launches)) in launches_by_op {
        out += &format!("  {op:<32} {nodes:>5} {launches:>6}\n");
    }
    out
}
