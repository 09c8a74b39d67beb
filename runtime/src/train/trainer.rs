//! The training loop. For each phase of the regime it compiles the phase's step (batch size,
//! Fisher estimate), opens a backend for it and carries the training state over; every step
//! feeds a batch and the hyper-parameters of the schedules; every epoch ends with an
//! evaluation on the test set, a metrics record and a checkpoint.
//!
//! The run directory holds `experiment.toml` (the experiment as resolved), `metrics.jsonl` and
//! `checkpoint.safetensors`. A run resumes from its checkpoint at an epoch boundary and goes
//! on exactly as if it had not stopped: data order, augmentation and noise are all keyed by
//! (seed, epoch or step), and the checkpoint holds the step counter.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fisherc_codegen::artifact::{Artifact, compile_evaluation, compile_step};
use fisherc_codegen::compile::{CompileOptions, Compiled};
use fisherc_ir::model::{BuildOptions, ModelSpec, build};
use fisherc_ir::ops::Role;
use fisherc_ir::state::{Hyperparams, TrainState};
use fisherc_ir::tensor::Value;
use fisherc_ir::{StepOptions, TrainingStep, build_training_step};

use super::checkpoint::{self, Checkpoint};
use super::evaluate::{Evaluator, Score};
use super::experiment::{DataSet, Experiment};
use super::metrics::{Metrics, Record};
use super::regime::{Phase, lr_factor, phases};
use crate::backend::{Backend, RuntimeError};
use crate::data::pipeline::{self, Pipeline};
use crate::data::{Dataset, cifar, idx, synthetic};
use crate::session::Session;

pub const EXPERIMENT_FILE: &str = "experiment.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Opens a backend for one phase's compiled step.
pub type OpenBackend<'a> =
    dyn Fn(&Artifact, &Compiled) -> Result<Box<dyn Backend>, RuntimeError> + 'a;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub run_dir: PathBuf,
    /// Continue from the run directory's checkpoint.
    pub resume: bool,
    /// Stop after this many epochs in all (an interruption: `resume` continues).
    pub until_epoch: Option<usize>,
}

/// What the loop reports as it goes (for progress bars and logs).
#[derive(Clone, Debug)]
pub enum Event {
    Note(String),
    PhaseStart {
        phase: Phase,
        /// The epoch the phase starts with here (later than its first after a resume).
        first_epoch: usize,
        backend: String,
        steps_per_epoch: usize,
    },
    Step {
        epoch: usize,
        index: usize,
        loss: f32,
        seconds: f64,
    },
    EpochEnd {
        epoch: usize,
        train_loss: f64,
        score: Score,
        seconds: f64,
        images_per_second: f64,
    },
}

/// The result of a run: its final state and each epoch's test score.
pub struct Outcome {
    pub state: TrainState<f32>,
    pub scores: Vec<(usize, Score)>,
    pub steps: u64,
}

/// Loads the experiment's training and test sets.
pub fn load_data(data: &super::experiment::DataConfig) -> Result<(Dataset, Dataset), String> {
    let dir = |default: &str| data.dir.clone().unwrap_or_else(|| PathBuf::from(default));
    let (mut train, mut test) = match data.set {
        DataSet::FashionMnist | DataSet::Mnist => {
            let (default, name) = match data.set {
                DataSet::FashionMnist => ("/usr/share/datasets/fashion-mnist", "fashion-mnist"),
                _ => ("data/mnist", "mnist"),
            };
            let dir = dir(default);
            let train = idx::load_pair(&dir, "train", 10, &format!("{name} train"))
                .map_err(|e| e.to_string())?;
            let test = idx::load_pair(&dir, "t10k", 10, &format!("{name} test"))
                .map_err(|e| e.to_string())?;
            (train, test)
        }
        DataSet::Cifar10 | DataSet::Cifar100 => {
            let (which, default) = match data.set {
                DataSet::Cifar10 => (cifar::Cifar::Ten, "data/cifar-10-batches-bin"),
                _ => (cifar::Cifar::Hundred, "data/cifar-100-binary"),
            };
            let dir = dir(default);
            let train = cifar::load(&dir, which, true).map_err(|e| e.to_string())?;
            (
                train,
                cifar::load(&dir, which, false).map_err(|e| e.to_string())?,
            )
        }
        DataSet::Synthetic => {
            let s = data.synthetic.as_ref().ok_or("data.synthetic missing")?;
            let train = synthetic::make(s.train, s.shape, s.classes, s.noise, 1);
            // the same class templates (seed), other draws (an offset past the training images)
            let test = synthetic::make_from(s.train, s.test, s.shape, s.classes, s.noise, 1);
            (train, test)
        }
    };
    if let Some(n) = data.train_subset {
        train.truncate(n);
    }
    if let Some(n) = data.test_subset {
        test.truncate(n);
    }
    Ok((train, test))
}

/// The training step of one phase.
fn phase_step(
    spec: &ModelSpec,
    input: Option<[usize; 3]>,
    phase: &Phase,
    decay_bn: bool,
) -> Result<TrainingStep, String> {
    let options = BuildOptions {
        input,
        ..BuildOptions::train(phase.batch)
    };
    let network = build(spec, &options).map_err(|e| e.to_string())?;
    let step_options = StepOptions {
        noise: phase.noise,
        fisher: phase.fisher,
        decay_bn,
    };
    build_training_step(network, &step_options).map_err(|e| e.to_string())
}

/// The evaluation program of `evaluator`'s network, compiled as the training step is and
/// opened by `open` (on the training step's device).
fn evaluation_on_device(
    evaluator: &Evaluator,
    (path, text): (&Path, &str),
    options: CompileOptions,
    open: &OpenBackend,
) -> Result<Session<Box<dyn Backend>>, String> {
    let (compiled, artifact) =
        compile_evaluation(evaluator.network(), (path, text.to_string()), options)
            .map_err(|e| e.to_string())?;
    let backend = open(&artifact, &compiled).map_err(|e| e.to_string())?;
    Session::new(&artifact, backend).map_err(|e| e.to_string())
}

/// The test score of `state`: on the device where the evaluator has one (a failure there is
/// reported, and the CPU reference scores from then on), else on the CPU reference.
fn test_score(
    evaluator: &mut Evaluator,
    state: &TrainState<f32>,
    (set, pipeline): (&Dataset, &Pipeline),
    report: &mut dyn FnMut(Event),
) -> Result<Score, String> {
    if evaluator.on_device() {
        match evaluator.score(state, set, pipeline) {
            Ok(score) => return Ok(score),
            Err(e) => {
                report(Event::Note(format!(
                    "scoring the test set on the device failed ({e}): the CPU reference scores from now on"
                )));
                evaluator.forget_device();
            }
        }
    }
    evaluator.score(state, set, pipeline)
}

/// Runs (or resumes) `experiment` in `options.run_dir`.
pub fn train(
    experiment: &Experiment,
    options: &TrainOptions,
    open: &OpenBackend,
    report: &mut dyn FnMut(Event),
) -> Result<Outcome, String> {
    let t = &experiment.train;
    let dir = &options.run_dir;
    let (train_set, test_set) = load_data(&experiment.data)?;
    let model_text = std::fs::read_to_string(&experiment.model)
        .map_err(|e| format!("{}: {e}", experiment.model.display()))?;
    let mut spec = ModelSpec::parse(&model_text, &experiment.model).map_err(|e| e.to_string())?;
    if spec.classes != train_set.classes {
        // the classifier's width follows the data: VGG16 is written for CIFAR-10 and trains
        // on CIFAR-100 as well
        report(Event::Note(format!(
            "{} has {} classes: {} is built with a {}-way classifier (its file says {})",
            train_set.name, train_set.classes, spec.name, train_set.classes, spec.classes
        )));
        spec.classes = train_set.classes;
    }
    let phases = phases(t);
    let first = phase_step(&spec, experiment.input, &phases[0], t.decay_bn)?;
    let input = first.network.input;
    let pipeline = Pipeline::new(&train_set, input)?;
    let mut evaluator = Evaluator::new(&spec, input, test_set.len())?;
    let (mut state, mut epoch, mut step) = start(experiment, options, &first)?;
    let mut metrics = Metrics::open(&dir.join(METRICS_FILE))
        .map_err(|e| format!("{}: {e}", dir.join(METRICS_FILE).display()))?;
    let stop = options.until_epoch.unwrap_or(t.epochs).min(t.epochs);
    let mut scores = Vec::new();
    for phase in &phases {
        if phase.epochs.end <= epoch || phase.epochs.start >= stop {
            continue; // done before a resume, or after the stop
        }
        let training = phase_step(&spec, experiment.input, phase, t.decay_bn)?;
        let options = experiment.compile.options();
        let (compiled, artifact) =
            compile_step(&training, (&experiment.model, model_text.clone()), options)
                .map_err(|e| e.to_string())?;
        let mut session = Session::new(
            &artifact,
            open(&artifact, &compiled).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        session
            .feed(&state.state_feeds())
            .map_err(|e| e.to_string())?;
        if session.backend.frees_the_host() && !evaluator.on_device() {
            let model = (experiment.model.as_path(), model_text.as_str());
            match evaluation_on_device(&evaluator, model, options, open) {
                Ok(device) => evaluator.use_device(device),
                Err(e) => report(Event::Note(format!(
                    "the test set is scored on the CPU: the evaluation program failed on the device: {e}"
                ))),
            }
        }
        let layout = pipeline::epoch(train_set.len(), phase.batch, t.seed, 0, false);
        report(Event::PhaseStart {
            phase: phase.clone(),
            first_epoch: epoch.max(phase.epochs.start),
            backend: session.backend.describe(),
            steps_per_epoch: layout.batches.len(),
        });
        if layout.dropped > 0 {
            report(Event::Note(format!(
                "batch {}: the last {} of {} training images do not fill a batch and are left out each epoch",
                phase.batch,
                layout.dropped,
                train_set.len()
            )));
        }
        if layout.batches.is_empty() {
            return Err(format!(
                "batch {} is larger than the {} training images",
                phase.batch,
                train_set.len()
            ));
        }
        while epoch < phase.epochs.end.min(stop) {
            let started = Instant::now();
            let order = pipeline::epoch(
                train_set.len(),
                phase.batch,
                t.seed,
                epoch as u64,
                experiment.data.shuffle,
            );
            let steps_per_epoch = order.batches.len();
            let mut loss_sum = 0.0f64;
            let augment = Some((experiment.data.augment, t.seed, epoch as u64));
            let batches = (&train_set, order.batches.as_slice());
            let ahead = session.backend.frees_the_host();
            pipeline.for_each_batch(batches, augment, ahead, |index, (x, y)| {
                let progress = epoch as f64 + (index + 1) as f64 / steps_per_epoch as f64;
                let hyper = Hyperparams {
                    learning_rate: phase.lr * lr_factor(t, progress),
                    momentum: t.momentum,
                    weight_decay: t.weight_decay,
                    noise_scale: phase.noise_scale,
                    seed: t.seed,
                    step,
                };
                let mut feeds = hyper.feeds();
                feeds.insert(Role::Images, Value::Float(x));
                feeds.insert(Role::Labels, Value::Int(y));
                session.feed(&feeds).map_err(|e| e.to_string())?;
                let seconds = session
                    .step()
                    .map_err(|e| format!("epoch {}, step {}: {e}", epoch + 1, index + 1))?;
                let loss = session.loss().map_err(|e| e.to_string())?;
                if !loss.is_finite() {
                    return Err(format!(
                        "epoch {}, step {} (step {step} of the run): the loss is {loss}; stopped. The last good checkpoint (after epoch {epoch}) is kept in {}",
                        epoch + 1,
                        index + 1,
                        dir.join(CHECKPOINT_FILE).display()
                    ));
                }
                loss_sum += loss as f64;
                let record = Record::Step {
                    epoch: epoch + 1,
                    step: step + 1,
                    batch: phase.batch,
                    loss,
                    lr: hyper.learning_rate,
                    noise_scale: hyper.noise_scale,
                    seconds,
                };
                metrics
                    .write(&record)
                    .map_err(|e| format!("{}: {e}", dir.join(METRICS_FILE).display()))?;
                report(Event::Step {
                    epoch,
                    index,
                    loss,
                    seconds,
                });
                step += 1;
                Ok::<(), String>(())
            })?;
            let seconds = started.elapsed().as_secs_f64();
            state = session.state().map_err(|e| e.to_string())?;
            let scored = match experiment.eval.bn_batches {
                0 => Cow::Borrowed(&state),
                n => Cow::Owned(evaluator.recalibrated(&state, &train_set, &pipeline, n)?),
            };
            let score = test_score(&mut evaluator, &scored, (&test_set, &pipeline), report)?;
            let train_loss = loss_sum / steps_per_epoch as f64;
            let images_per_second = (steps_per_epoch * phase.batch) as f64 / seconds;
            let record = Record::Epoch {
                epoch: epoch + 1,
                step,
                train_loss,
                test_loss: score.loss,
                test_accuracy: score.accuracy,
                seconds,
                images_per_second,
            };
            metrics
                .write(&record)
                .map_err(|e| format!("{}: {e}", dir.join(METRICS_FILE).display()))?;
            epoch += 1;
            let checkpoint = Checkpoint {
                state: state.clone(),
                epoch,
                step,
                experiment: experiment.to_toml(),
            };
            checkpoint::write(&dir.join(CHECKPOINT_FILE), &training.network, &checkpoint)
                .map_err(|e| e.to_string())?;
            scores.push((epoch - 1, score));
            report(Event::EpochEnd {
                epoch: epoch - 1,
                train_loss,
                score,
                seconds,
                images_per_second,
            });
        }
        if epoch >= stop {
            break;
        }
    }
    Ok(Outcome {
        state,
        scores,
        steps: step,
    })
}

/// The state, epoch and step a run starts from: fresh (the run directory must not hold
/// another run), or the checkpoint's (the experiment must be the one it was written by).
fn start(
    experiment: &Experiment,
    options: &TrainOptions,
    first: &TrainingStep,
) -> Result<(TrainState<f32>, usize, u64), String> {
    let dir = &options.run_dir;
    let checkpoint_path = dir.join(CHECKPOINT_FILE);
    let toml = experiment.to_toml();
    if options.resume {
        let checkpoint =
            checkpoint::read(&checkpoint_path, &first.network).map_err(|e| e.to_string())?;
        if checkpoint.experiment != toml {
            return Err(format!(
                "{}: written by another experiment; resuming needs the same one (see {})",
                checkpoint_path.display(),
                dir.join(EXPERIMENT_FILE).display()
            ));
        }
        return Ok((checkpoint.state, checkpoint.epoch, checkpoint.step));
    }
    let existing = [EXPERIMENT_FILE, METRICS_FILE, CHECKPOINT_FILE]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists());
    if let Some(existing) = existing {
        return Err(format!(
            "{} already exists: resume that run with --resume, or choose another run directory",
            existing.display()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    write_new(&dir.join(EXPERIMENT_FILE), &toml)?;
    Ok((
        TrainState::init(&first.network, experiment.train.seed),
        0,
        0,
    ))
}

fn write_new(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Whether a regime phase adds noise (for reports).
pub fn noisy(phase: &Phase) -> bool {
    phase.noise.is_drawn(phase.fisher) && phase.noise_scale > 0.0
}
