//! Test loss and top-1 accuracy of a training state: the model built in evaluation mode (batch
//! norm with its running statistics), forward only, over the whole test set in batches. On
//! the CPU reference, or, when training runs on a GPU, as a compiled evaluation program on the
//! same device (`Evaluator::use_device`), where the CPU would take longer than the epoch's
//! training. Recomputing the running statistics (`Evaluator::recalibrated`) stays on the CPU.

use fisherc_ir::ModelError;
use fisherc_ir::graph::{Output, PortRef};
use fisherc_ir::interp::{Feeds, evaluate};
use fisherc_ir::model::{BuildOptions, Mode, ModelSpec, Network, build};
use fisherc_ir::ops::Role;
use fisherc_ir::state::TrainState;
use fisherc_ir::tensor::{Real, Tensor, Value};

use super::error::TrainError;
use crate::backend::{Backend, RuntimeError};
use crate::data::Dataset;
use crate::data::pipeline::Pipeline;
use crate::session::Session;

/// Most images evaluated at once.
const EVAL_BATCH: usize = 500;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    /// Mean softmax cross-entropy.
    pub loss: f64,
    /// Fraction of images whose largest logit is their label's.
    pub accuracy: f64,
}

/// Evaluation-mode networks for a test set's batch and its remainder.
pub struct Evaluator {
    full: Network,
    /// For the last `len % batch` images.
    rest: Option<Network>,
    /// The model in training mode, for [`Evaluator::recalibrated`].
    spec: ModelSpec,
    input: [usize; 3],
    /// The evaluation program on a device, where [`Evaluator::use_device`] gave one.
    device: Option<Session<Box<dyn Backend>>>,
}

impl Evaluator {
    pub fn new(
        spec: &ModelSpec,
        input: [usize; 3],
        test_len: usize,
    ) -> Result<Evaluator, ModelError> {
        let batch = EVAL_BATCH.min(test_len).max(1);
        let network = |batch| {
            let options = BuildOptions {
                batch,
                input: Some(input),
                shortcut: None,
                mode: Mode::Eval,
            };
            build(spec, &options)
        };
        let rest = test_len % batch;
        Ok(Evaluator {
            full: network(batch)?,
            rest: if rest > 0 { Some(network(rest)?) } else { None },
            spec: spec.clone(),
            input,
            device: None,
        })
    }

    /// `state` with its batch-norm running statistics replaced by statistics at its own
    /// weights: each layer's batch mean and unbiased batch variance averaged over the first
    /// `batches` batches of `train` (no augmentation).
    pub fn recalibrated(
        &self,
        state: &TrainState<f32>,
        train: &Dataset,
        pipeline: &Pipeline,
        batches: usize,
    ) -> Result<TrainState<f32>, TrainError> {
        let batch = EVAL_BATCH.min(train.len());
        let batches = batches.min(train.len() / batch);
        let options = BuildOptions {
            batch,
            input: Some(self.input),
            shortcut: None,
            mode: Mode::Train,
        };
        let net = build(&self.spec, &options)?;
        let stats: Vec<PortRef> = net
            .bn_layers
            .iter()
            .flat_map(|bn| [PortRef::new(bn.node, 1), PortRef::new(bn.node, 2)])
            .collect();
        let mut sums: Vec<Vec<f64>> = stats
            .iter()
            .map(|&p| vec![0.0; net.graph.ty(p).numel()])
            .collect();
        let mut feeds = state.state_feeds();
        for k in 0..batches {
            let indices: Vec<usize> = (k * batch..(k + 1) * batch).collect();
            let (images, labels) = pipeline.batch(train, &indices, None);
            feeds.insert(Role::Images, Value::Float(images));
            feeds.insert(Role::Labels, Value::Int(labels));
            let out = evaluate(&net.graph, &feeds, &stats)?;
            for (sum, &port) in sums.iter_mut().zip(&stats) {
                let value = out
                    .kept(port)
                    .ok_or(TrainError::Evaluation("kept no batch statistic"))?
                    .float();
                sum.iter_mut()
                    .zip(&value.data)
                    .for_each(|(s, &v)| *s += v as f64);
            }
        }
        // the batch variance is biased (÷ batch); the running statistics track the unbiased
        let unbias = batch as f64 / (batch as f64 - 1.0).max(1.0);
        let average = |sum: &Vec<f64>, scale: f64| {
            let data = sum
                .iter()
                .map(|s| (s / batches.max(1) as f64 * scale) as f32)
                .collect();
            Tensor::from_vec(&[sum.len()], data)
        };
        let mut out = state.clone();
        if batches > 0 {
            for (i, pair) in sums.chunks(2).enumerate() {
                out.running_means[i] = average(&pair[0], 1.0);
                out.running_vars[i] = average(&pair[1], unbias);
            }
        }
        Ok(out)
    }

    /// The evaluation-mode network whose batch a device program runs (see
    /// [`Evaluator::use_device`]).
    pub fn network(&self) -> &Network {
        &self.full
    }

    /// Scores from now on with `session`, a compiled evaluation program of
    /// [`Evaluator::network`] on a device (its last batch padded), where the CPU reference
    /// would take most of a GPU run's epoch.
    pub fn use_device(&mut self, session: Session<Box<dyn Backend>>) {
        self.device = Some(session);
    }

    /// Whether scores come from a device.
    pub fn on_device(&self) -> bool {
        self.device.is_some()
    }

    /// Goes back to the CPU reference (after a device failure).
    pub fn forget_device(&mut self) {
        self.device = None;
    }

    /// Test loss and accuracy of `state` over `set`: on the device if [`Self::use_device`]
    /// gave one, else on the CPU reference.
    pub fn score(
        &mut self,
        state: &TrainState<f32>,
        set: &Dataset,
        pipeline: &Pipeline,
    ) -> Result<Score, TrainError> {
        let batch = self.full.batch;
        if let Some(session) = &mut self.device {
            return Ok(score_on(session, batch, (state, set, pipeline))?);
        }
        let mut feeds = state.state_feeds();
        let mut tally = Tally::default();
        let mut start = 0;
        while start < set.len() {
            let net = if set.len() - start >= self.full.batch {
                &self.full
            } else {
                self.rest.as_ref().expect("a remainder network")
            };
            let indices: Vec<usize> = (start..start + net.batch).collect();
            let (images, labels) = pipeline.batch(set, &indices, None);
            feeds.insert(Role::Images, Value::Float(images));
            let out = evaluate(&net.graph, &feeds, &[])?;
            let logits = out
                .output(&Output::Logits)
                .ok_or(TrainError::Evaluation("network has no logits"))?
                .float();
            tally.add(logits, &labels.data);
            start += net.batch;
        }
        Ok(tally.score(set.len()))
    }
}

/// [`Evaluator::score`] on a device session of batch `batch`: parameters and running
/// statistics written once, then the set in batches, the last padded with its last image
/// (evaluation mode treats every image apart) and only its real rows counted.
fn score_on(
    session: &mut Session<Box<dyn Backend>>,
    batch: usize,
    (state, set, pipeline): (&TrainState<f32>, &Dataset, &Pipeline),
) -> Result<Score, RuntimeError> {
    session.feed(&state.state_feeds())?;
    let mut tally = Tally::default();
    for start in (0..set.len()).step_by(batch) {
        let count = batch.min(set.len() - start);
        let indices: Vec<usize> = (start..start + batch)
            .map(|i| i.min(set.len() - 1))
            .collect();
        let (images, labels) = pipeline.batch(set, &indices, None);
        let mut feeds = Feeds::new();
        feeds.insert(Role::Images, Value::Float(images));
        session.feed(&feeds)?;
        session.step()?;
        let logits = session.output(&Output::Logits)?.into_float();
        tally.add(&logits, &labels.data[..count]);
    }
    Ok(tally.score(set.len()))
}

/// Sums of the softmax cross-entropy and of correct top-1 predictions.
#[derive(Default)]
struct Tally {
    loss: f64,
    correct: usize,
}

impl Tally {
    /// Adds rows of `logits` and their labels; rows past the labels (a padded batch's) are
    /// not counted.
    fn add(&mut self, logits: &Tensor<f32>, labels: &[i32]) {
        let classes = logits.shape[1];
        for (row, &label) in logits.data.chunks(classes).zip(labels) {
            let (best, max) = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                );
            let log_sum = row
                .iter()
                .map(|&v| ((v - max) as f64).portable_exp())
                .sum::<f64>()
                .portable_ln()
                + max as f64;
            self.loss += log_sum - row[label as usize] as f64;
            self.correct += (best == label as usize) as usize;
        }
    }

    /// Means over `images`.
    fn score(&self, images: usize) -> Score {
        let n = images.max(1) as f64;
        Score {
            loss: self.loss / n,
            accuracy: self.correct as f64 / n,
        }
    }
}
