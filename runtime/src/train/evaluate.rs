//! Test loss and top-1 accuracy of a training state, on the CPU reference: the model built in
//! evaluation mode (batch norm with its running statistics), forward only, over the whole
//! test set in batches.

use fisherc_ir::graph::{Output, PortRef};
use fisherc_ir::interp::evaluate;
use fisherc_ir::model::{BuildOptions, Mode, ModelSpec, Network, build};
use fisherc_ir::ops::Role;
use fisherc_ir::state::TrainState;
use fisherc_ir::tensor::{Tensor, Value};

use crate::data::Dataset;
use crate::data::pipeline::Pipeline;

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
}

impl Evaluator {
    pub fn new(spec: &ModelSpec, input: [usize; 3], test_len: usize) -> Result<Evaluator, String> {
        let batch = EVAL_BATCH.min(test_len).max(1);
        let network = |batch| {
            let options = BuildOptions {
                batch,
                input: Some(input),
                shortcut: None,
                mode: Mode::Eval,
            };
            build(spec, &options).map_err(|e| e.to_string())
        };
        let rest = test_len % batch;
        Ok(Evaluator {
            full: network(batch)?,
            rest: if rest > 0 { Some(network(rest)?) } else { None },
            spec: spec.clone(),
            input,
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
    ) -> Result<TrainState<f32>, String> {
        let batch = EVAL_BATCH.min(train.len());
        let batches = batches.min(train.len() / batch);
        let options = BuildOptions {
            batch,
            input: Some(self.input),
            shortcut: None,
            mode: Mode::Train,
        };
        let net = build(&self.spec, &options).map_err(|e| e.to_string())?;
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
            let out = evaluate(&net.graph, &feeds, &stats).map_err(|e| e.to_string())?;
            for (sum, &port) in sums.iter_mut().zip(&stats) {
                let value = out
                    .kept(port)
                    .ok_or("a batch statistic was not kept")?
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

    pub fn score(
        &self,
        state: &TrainState<f32>,
        set: &Dataset,
        pipeline: &Pipeline,
    ) -> Result<Score, String> {
        let mut feeds = state.state_feeds();
        let (mut loss, mut correct) = (0.0f64, 0usize);
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
            let out = evaluate(&net.graph, &feeds, &[]).map_err(|e| e.to_string())?;
            let logits = out
                .output(&Output::Logits)
                .ok_or("the evaluation network has no logits")?
                .float();
            let classes = logits.shape[1];
            for (row, &label) in logits.data.chunks(classes).zip(&labels.data) {
                let (best, max) =
                    row.iter()
                        .enumerate()
                        .fold(
                            (0, f32::NEG_INFINITY),
                            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                        );
                let log_sum = row
                    .iter()
                    .map(|&v| ((v - max) as f64).exp())
                    .sum::<f64>()
                    .ln()
                    + max as f64;
                loss += log_sum - row[label as usize] as f64;
                correct += (best == label as usize) as usize;
            }
            start += net.batch;
        }
        let n = set.len().max(1) as f64;
        Ok(Score {
            loss: loss / n,
            accuracy: correct as f64 / n,
        })
    }
}
