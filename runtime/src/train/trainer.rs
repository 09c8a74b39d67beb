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
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fisherc_codegen::artifact::{Verified, compile_evaluation, compile_step};
use fisherc_codegen::compile::CompileOptions;
use fisherc_ir::model::{BuildOptions, ModelSpec, build};
use fisherc_ir::ops::Role;
use fisherc_ir::state::kfac::KfacState;
use fisherc_ir::state::{Hyperparams, TrainState};
use fisherc_ir::tensor::{Tensor, Value};
use fisherc_ir::{StepOptions, TrainingStep, build_training_step};

use super::checkpoint::{self, Checkpoint};
use super::error::TrainError;
use super::evaluate::{Evaluator, Score};
use super::experiment::{DataSet, Experiment};
use super::kfac::Refreshes;
use super::metrics::{Metrics, Record};
use super::regime::{Phase, lr_factor, phases};
use crate::backend::{Backend, RuntimeError};
use crate::data::pipeline::{self, Pipeline};
use crate::data::{Dataset, cifar, idx, synthetic};
use crate::host::check_fits;
use crate::session::Session;

pub const EXPERIMENT_FILE: &str = "experiment.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// Held (an advisory lock) by the trainer running in the directory; names its process.
pub const LOCK_FILE: &str = "lock";

/// Opens a backend for one phase's compiled step.
pub type OpenBackend<'a> = dyn Fn(&Verified) -> Result<Box<dyn Backend>, RuntimeError> + 'a;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub run_dir: PathBuf,
    /// Continue from the run directory's checkpoint.
    pub resume: bool,
    /// Stop after this many epochs in all (an interruption: `resume` continues).
    pub until_epoch: Option<usize>,
    /// Steps between checks of the state for NaN and infinite values on the device (the
    /// epoch's end checks it on the host as well, before the checkpoint is written); 0 is
    /// taken as 1.
    pub check_every: u64,
}

/// Steps between the device's checks of the state by default: a read of the state at memory
/// speed, a fraction of one step, every hundred.
pub const CHECK_EVERY: u64 = 100;

impl TrainOptions {
    /// A fresh run in `run_dir`, to the end, checked every [`CHECK_EVERY`] steps.
    pub fn new(run_dir: impl Into<PathBuf>) -> TrainOptions {
        TrainOptions {
            run_dir: run_dir.into(),
            resume: false,
            until_epoch: None,
            check_every: CHECK_EVERY,
        }
    }
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
pub fn load_data(data: &super::experiment::DataConfig) -> Result<(Dataset, Dataset), TrainError> {
    let dir = |default: &str| data.dir.clone().unwrap_or_else(|| PathBuf::from(default));
    let (mut train, mut test) = match data.set {
        DataSet::FashionMnist | DataSet::Mnist => {
            let (default, name) = match data.set {
                DataSet::FashionMnist => ("/usr/share/datasets/fashion-mnist", "fashion-mnist"),
                _ => ("data/mnist", "mnist"),
            };
            let dir = dir(default);
            let train = idx::load_pair(&dir, "train", 10, &format!("{name} train"))?;
            let test = idx::load_pair(&dir, "t10k", 10, &format!("{name} test"))?;
            (train, test)
        }
        DataSet::Cifar10 | DataSet::Cifar100 => {
            let (which, default) = match data.set {
                DataSet::Cifar10 => (cifar::Cifar::Ten, "data/cifar-10-batches-bin"),
                _ => (cifar::Cifar::Hundred, "data/cifar-100-binary"),
            };
            let dir = dir(default);
            (
                cifar::load(&dir, which, true)?,
                cifar::load(&dir, which, false)?,
            )
        }
        DataSet::Synthetic => {
            let s = data.synthetic.as_ref().ok_or(TrainError::NoSyntheticSet)?;
            // the images as bytes, and the class templates as f32
            let images = s.train.saturating_add(s.test);
            let needs = (s
                .shape
                .iter()
                .fold(1u64, |a, &d| a.saturating_mul(d as u64)))
            .saturating_mul((images as u64).saturating_add(4 * s.classes as u64));
            check_fits(needs, "the synthetic data set")?;
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
) -> Result<TrainingStep, TrainError> {
    let options = BuildOptions {
        input,
        ..BuildOptions::train(phase.batch)
    };
    let network = build(spec, &options)?;
    let step_options = StepOptions {
        noise: phase.noise,
        fisher: phase.fisher,
        decay_bn,
    };
    Ok(build_training_step(network, &step_options)?)
}

/// The evaluation program of `evaluator`'s network, compiled as the training step is and
/// opened by `open` (on the training step's device).
fn evaluation_on_device(
    evaluator: &Evaluator,
    (path, text): (&Path, &str),
    options: CompileOptions,
    open: &OpenBackend,
) -> Result<Session<Box<dyn Backend>>, TrainError> {
    let verified = compile_evaluation(evaluator.network(), (path, text.to_string()), options)?;
    let backend = open(&verified)?;
    Ok(Session::new(verified.artifact(), backend)?)
}

/// The test score of `state`: on the device where the evaluator has one (a failure there is
/// reported, and the CPU reference scores from then on), else on the CPU reference.
fn test_score(
    evaluator: &mut Evaluator,
    state: &TrainState<f32>,
    (set, pipeline): (&Dataset, &Pipeline),
    report: &mut dyn FnMut(Event),
) -> Result<Score, TrainError> {
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

/// Runs (or resumes) `experiment` in `options.run_dir`: phase after phase of its regime, each
/// compiled and opened on a backend, until the last epoch or `options.until_epoch`.
pub fn train(
    experiment: &Experiment,
    options: &TrainOptions,
    open: &OpenBackend,
    report: &mut dyn FnMut(Event),
) -> Result<Outcome, TrainError> {
    let phases = phases(&experiment.train);
    let mut run = Run::start(experiment, options, &phases[0], report)?;
    for phase in &phases {
        if phase.epochs.end <= run.epoch || phase.epochs.start >= run.stop {
            continue; // done before a resume, or after the stop
        }
        run.run_phase(phase, open, report)?;
        if run.epoch >= run.stop {
            break;
        }
    }
    Ok(Outcome {
        state: run.state,
        scores: run.scores,
        steps: run.step,
    })
}

/// A run in progress: what it trains on and with, where it writes, and where it stands.
struct Run<'a> {
    /// Held until the run ends.
    _lock: RunLock,
    experiment: &'a Experiment,
    dir: &'a Path,
    model_text: String,
    /// The model, its classifier as wide as the data's classes.
    spec: ModelSpec,
    train_set: Dataset,
    test_set: Dataset,
    pipeline: Pipeline,
    evaluator: Evaluator,
    metrics: Metrics,
    state: TrainState<f32>,
    /// K-FAC's running factors by name, as the last checkpoint or K-FAC phase left them.
    kfac: BTreeMap<String, Tensor<f32>>,
    /// Epochs done.
    epoch: usize,
    /// Steps done.
    step: u64,
    scores: Vec<(usize, Score)>,
    /// The epoch count the run stops at.
    stop: usize,
    /// Steps between the device's checks of the state.
    check_every: u64,
}

/// One epoch's training: the mean loss over its steps, and how long it took.
struct EpochTrained {
    train_loss: f64,
    steps: usize,
    seconds: f64,
}

impl<'a> Run<'a> {
    /// Data, model and state (fresh, or resumed from the checkpoint), with `first` the
    /// regime's first phase.
    fn start(
        experiment: &'a Experiment,
        options: &'a TrainOptions,
        first: &Phase,
        report: &mut dyn FnMut(Event),
    ) -> Result<Run<'a>, TrainError> {
        let t = &experiment.train;
        let dir = options.run_dir.as_path();
        let lock = RunLock::take(&options.run_dir)?;
        let (train_set, test_set) = load_data(&experiment.data)?;
        let model_text = ModelSpec::read_text(&experiment.model)?;
        let mut spec = ModelSpec::parse(&model_text, &experiment.model)?;
        if spec.classes != train_set.classes {
            // the classifier's width follows the data: VGG16 is written for CIFAR-10 and
            // trains on CIFAR-100 as well
            report(Event::Note(format!(
                "{} has {} classes: {} is built with a {}-way classifier (its file says {})",
                train_set.name, train_set.classes, spec.name, train_set.classes, spec.classes
            )));
            spec.classes = train_set.classes;
        }
        let first = phase_step(&spec, experiment.input, first, t.decay_bn)?;
        let input = first.network.input;
        let pipeline = Pipeline::new(&train_set, input)?;
        let evaluator = Evaluator::new(&spec, input, test_set.len())?;
        let model = (experiment, model_text.as_str());
        let start = start(model, options, &first, train_set.len(), report)?;
        let Start {
            state,
            kfac,
            epoch,
            step,
            metrics,
        } = start;
        Ok(Run {
            _lock: lock,
            experiment,
            dir,
            model_text,
            spec,
            train_set,
            test_set,
            pipeline,
            evaluator,
            metrics,
            state,
            kfac,
            epoch,
            step,
            scores: Vec::new(),
            stop: options.until_epoch.unwrap_or(t.epochs).min(t.epochs),
            check_every: options.check_every,
        })
    }

    /// The epochs of `phase` this run has still to do.
    fn run_phase(
        &mut self,
        phase: &Phase,
        open: &OpenBackend,
        report: &mut dyn FnMut(Event),
    ) -> Result<(), TrainError> {
        let (mut session, training) = self.open_phase(phase, open, report)?;
        let mut kfac = Refreshes::start(self.kfac_state(&training)?, &mut session)?;
        while self.epoch < phase.epochs.end.min(self.stop) {
            let trained = self.run_epoch((&mut session, &mut kfac), phase, report)?;
            kfac.apply(&mut session)?;
            self.kfac = kfac.tensors().into_iter().collect();
            self.end_epoch(&mut session, &training, phase, trained, report)?;
        }
        Ok(())
    }

    /// K-FAC's state for `training` (empty without K-FAC noise), its running factors those
    /// the run holds.
    fn kfac_state(&self, training: &TrainingStep) -> Result<KfacState, TrainError> {
        let mut kfac = KfacState::for_step(training, self.experiment.train.kfac_settings());
        kfac.restore(&self.kfac).map_err(|error| TrainError::Kfac {
            run_step: self.step,
            error,
        })?;
        Ok(kfac)
    }

    /// `phase`'s step compiled and opened on a backend, holding the run's state; the test
    /// set's evaluation program on the same device where the step leaves the host free.
    fn open_phase(
        &mut self,
        phase: &Phase,
        open: &OpenBackend,
        report: &mut dyn FnMut(Event),
    ) -> Result<(Session<Box<dyn Backend>>, TrainingStep), TrainError> {
        let experiment = self.experiment;
        let training = phase_step(
            &self.spec,
            experiment.input,
            phase,
            experiment.train.decay_bn,
        )?;
        let options = experiment.compile.options();
        let model = (experiment.model.as_path(), self.model_text.clone());
        let verified = compile_step(&training, model, options)?;
        let mut session = Session::new(verified.artifact(), open(&verified)?)?;
        session.feed(&self.state.state_feeds())?;
        if session.backend.frees_the_host() && !self.evaluator.on_device() {
            let model = (experiment.model.as_path(), self.model_text.as_str());
            match evaluation_on_device(&self.evaluator, model, options, open) {
                Ok(device) => self.evaluator.use_device(device),
                Err(e) => report(Event::Note(format!(
                    "the test set is scored on the CPU: the evaluation program failed on the device: {e}"
                ))),
            }
        }
        let images = self.train_set.len();
        let (steps_per_epoch, dropped) = pipeline::full_batches(images, phase.batch);
        report(Event::PhaseStart {
            phase: phase.clone(),
            first_epoch: self.epoch.max(phase.epochs.start),
            backend: session.backend.describe(),
            steps_per_epoch,
        });
        if dropped > 0 {
            report(Event::Note(format!(
                "batch {}: the last {} of {images} training images do not fill a batch and are left out each epoch",
                phase.batch, dropped,
            )));
        }
        if steps_per_epoch == 0 {
            return Err(TrainError::BatchTooLarge {
                batch: phase.batch,
                images,
            });
        }
        Ok((session, training))
    }

    /// Every step of the next epoch: a batch and the schedules' hyper-parameters fed, the
    /// step run, its loss checked and recorded.
    fn run_epoch(
        &mut self,
        (session, kfac): (&mut Session<Box<dyn Backend>>, &mut Refreshes),
        phase: &Phase,
        report: &mut dyn FnMut(Event),
    ) -> Result<EpochTrained, TrainError> {
        let (t, epoch) = (&self.experiment.train, self.epoch);
        let data = &self.experiment.data;
        let started = Instant::now();
        let order = pipeline::epoch(
            self.train_set.len(),
            phase.batch,
            t.seed,
            epoch as u64,
            data.shuffle,
        );
        let steps = order.batches.len();
        let mut loss_sum = 0.0f64;
        let augment = Some((data.augment, t.seed, epoch as u64));
        let batches = (&self.train_set, order.batches.as_slice());
        let ahead = session.backend.frees_the_host();
        let (metrics, step, dir) = (&mut self.metrics, &mut self.step, self.dir);
        let check_every = self.check_every.max(1);
        self.pipeline
            .for_each_batch(batches, augment, ahead, |index, (x, y)| {
                let progress = epoch as f64 + (index + 1) as f64 / steps as f64;
                let hyper = Hyperparams {
                    learning_rate: phase.lr * lr_factor(t, progress),
                    momentum: t.momentum,
                    weight_decay: t.weight_decay,
                    noise_scale: phase.noise_scale,
                    seed: t.seed,
                    step: *step,
                };
                let refresh = kfac.before_step(session, *step)?;
                let mut feeds = hyper.feeds();
                feeds.insert(Role::Images, Value::Float(x));
                feeds.insert(Role::Labels, Value::Int(y));
                session.feed(&feeds)?;
                let seconds = session.step().map_err(|error| TrainError::Step {
                    epoch: epoch + 1,
                    step: index + 1,
                    error,
                })?;
                if refresh {
                    kfac.after_refresh(session, *step)?;
                }
                let loss = session.loss()?;
                if !loss.is_finite() {
                    return Err(TrainError::NonFiniteLoss {
                        epoch: epoch + 1,
                        step: index + 1,
                        run_step: *step,
                        loss,
                        last_epoch: epoch,
                        checkpoint: dir.join(CHECKPOINT_FILE),
                    });
                }
                loss_sum += loss as f64;
                let record = Record::Step {
                    epoch: epoch + 1,
                    step: *step + 1,
                    batch: phase.batch,
                    loss,
                    lr: hyper.learning_rate,
                    noise_scale: hyper.noise_scale,
                    seconds,
                };
                metrics
                    .write(&record)
                    .map_err(TrainError::io(dir.join(METRICS_FILE)))?;
                report(Event::Step {
                    epoch,
                    index,
                    loss,
                    seconds,
                });
                *step += 1;
                if *step % check_every == 0
                    && let Some((tensor, count)) = session.non_finite_state()?
                {
                    return Err(TrainError::NonFiniteState {
                        epoch: epoch + 1,
                        step: Some((index + 1, *step)),
                        tensor,
                        count,
                        last_epoch: epoch,
                        checkpoint: dir.join(CHECKPOINT_FILE),
                    });
                }
                Ok(())
            })?;
        Ok(EpochTrained {
            train_loss: loss_sum / steps as f64,
            steps,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The epoch's end: the state read back and scored on the test set, the epoch's record
    /// and the checkpoint written.
    fn end_epoch(
        &mut self,
        session: &mut Session<Box<dyn Backend>>,
        training: &TrainingStep,
        phase: &Phase,
        trained: EpochTrained,
        report: &mut dyn FnMut(Event),
    ) -> Result<(), TrainError> {
        self.state = session.state()?;
        if let Some((tensor, count)) = checkpoint::non_finite(&training.network, &self.state) {
            return Err(TrainError::NonFiniteState {
                epoch: self.epoch + 1,
                step: None,
                tensor,
                count: count as u64,
                last_epoch: self.epoch,
                checkpoint: self.dir.join(CHECKPOINT_FILE),
            });
        }
        let scored = match self.experiment.eval.bn_batches {
            0 => Cow::Borrowed(&self.state),
            n => Cow::Owned(self.evaluator.recalibrated(
                &self.state,
                &self.train_set,
                &self.pipeline,
                n,
            )?),
        };
        let test = (&self.test_set, &self.pipeline);
        let score = test_score(&mut self.evaluator, &scored, test, report)?;
        let images_per_second = (trained.steps * phase.batch) as f64 / trained.seconds;
        let record = Record::Epoch {
            epoch: self.epoch + 1,
            step: self.step,
            train_loss: trained.train_loss,
            test_loss: score.loss,
            test_accuracy: score.accuracy,
            seconds: trained.seconds,
            images_per_second,
        };
        self.metrics
            .write(&record)
            .map_err(TrainError::io(self.dir.join(METRICS_FILE)))?;
        self.epoch += 1;
        let checkpoint = Checkpoint {
            state: self.state.clone(),
            kfac: self.kfac.clone(),
            epoch: self.epoch,
            step: self.step,
            experiment: self.experiment.to_toml(),
            model: Some(self.model_text.clone()),
        };
        checkpoint::write(
            &self.dir.join(CHECKPOINT_FILE),
            &training.network,
            &checkpoint,
        )?;
        self.scores.push((self.epoch - 1, score));
        report(Event::EpochEnd {
            epoch: self.epoch - 1,
            train_loss: trained.train_loss,
            score,
            seconds: trained.seconds,
            images_per_second,
        });
        Ok(())
    }
}

/// Where a run starts: its state, epochs and steps done, and its metrics file ready for more.
struct Start {
    state: TrainState<f32>,
    kfac: BTreeMap<String, Tensor<f32>>,
    epoch: usize,
    step: u64,
    metrics: Metrics,
}

/// Where a run starts in its (locked) run directory: from the checkpoint (`--resume`: the
/// same experiment and model, at a position the regime reaches), or fresh. A directory whose run never ended an epoch (no checkpoint, the same experiment)
/// starts again either way.
fn start(
    (experiment, model_text): (&Experiment, &str),
    options: &TrainOptions,
    first: &TrainingStep,
    train_len: usize,
    report: &mut dyn FnMut(Event),
) -> Result<Start, TrainError> {
    let dir = &options.run_dir;
    let checkpoint_path = dir.join(CHECKPOINT_FILE);
    let experiment_path = dir.join(EXPERIMENT_FILE);
    let metrics_path = dir.join(METRICS_FILE);
    let toml = experiment.to_toml();
    let other_experiment = || TrainError::OtherExperiment {
        checkpoint: checkpoint_path.clone(),
        experiment: experiment_path.clone(),
    };
    if options.resume && checkpoint_path.exists() {
        let checkpoint = checkpoint::read(&checkpoint_path, &first.network)?;
        if checkpoint.experiment != toml {
            return Err(other_experiment());
        }
        if checkpoint.model.as_ref().is_some_and(|m| m != model_text) {
            return Err(TrainError::ModelChanged {
                model: experiment.model.clone(),
                checkpoint: checkpoint_path,
            });
        }
        let expected = steps_until(experiment, train_len, checkpoint.epoch);
        if checkpoint.epoch > experiment.train.epochs || Some(checkpoint.step) != expected {
            return Err(TrainError::CheckpointPosition {
                checkpoint: checkpoint_path,
                epoch: checkpoint.epoch,
                step: checkpoint.step,
            });
        }
        let metrics = Metrics::resume(&metrics_path, checkpoint.epoch, checkpoint.step)?;
        let start = Start {
            state: checkpoint.state,
            kfac: checkpoint.kfac,
            epoch: checkpoint.epoch,
            step: checkpoint.step,
            metrics,
        };
        return Ok(start);
    }
    let recorded = fisherc_ir::files::read_text(&experiment_path).ok();
    let unfinished = recorded.as_deref() == Some(toml.as_str()) && !checkpoint_path.exists();
    if unfinished {
        report(Event::Note(format!(
            "{} holds this experiment's run, which never ended an epoch: it starts again",
            dir.display()
        )));
    } else if options.resume {
        return Err(match recorded {
            Some(_) => other_experiment(),
            None => TrainError::NothingToResume { dir: dir.clone() },
        });
    } else if let Some(path) = [EXPERIMENT_FILE, METRICS_FILE, CHECKPOINT_FILE]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
    {
        return Err(TrainError::RunExists { path });
    }
    fisherc_ir::files::write_atomically(&experiment_path, toml.as_bytes())
        .map_err(TrainError::io(experiment_path))?;
    let start = Start {
        state: TrainState::init(&first.network, experiment.train.seed),
        kfac: BTreeMap::new(),
        epoch: 0,
        step: 0,
        metrics: Metrics::resume(&metrics_path, 0, 0)?,
    };
    Ok(start)
}

/// The steps the regime has taken after `epochs` epochs of `train_len` images, each epoch's
/// batches full; `None` past its last epoch.
fn steps_until(experiment: &Experiment, train_len: usize, epochs: usize) -> Option<u64> {
    let phases = phases(&experiment.train);
    (0..epochs)
        .map(|e| {
            let phase = phases.iter().find(|p| p.epochs.contains(&e))?;
            Some(pipeline::full_batches(train_len, phase.batch).0 as u64)
        })
        .sum()
}

/// An advisory lock on a run directory, held while a run trains there: a second trainer on
/// the same directory fails, naming the process that holds it.
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Creates `dir` if need be and locks it.
    fn take(dir: &Path) -> Result<RunLock, TrainError> {
        std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(TrainError::io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(TrainError::RunLocked {
                    dir: dir.to_path_buf(),
                    holder: holder.trim().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(TrainError::Io { path, error }),
        }
        use std::io::Write as _;
        let pid = format!("process {}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.write_all(pid.as_bytes()))
            .map_err(TrainError::io(&path))?;
        Ok(RunLock { _file: file })
    }
}

/// Whether a regime phase adds noise (for reports).
pub fn noisy(phase: &Phase) -> bool {
    phase.noise.is_drawn(phase.fisher) && phase.noise_scale > 0.0
}
