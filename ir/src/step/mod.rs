//! The training-step builder: from a forward [`Network`], the whole step as one graph.
//!
//! ```text
//! forward ─ logits ─ softmax cross-entropy ─ loss
//!    backward (autodiff, seeded with dL = 1) ─ gradient of every parameter
//!    Fisher (each parameter-consuming op's Fisher rule) ─ F̂ of every parameter, or the noise
//!      the update draws from: g², Tr F̂ / D, or a full-Fisher draw (a second backward pass)
//!    update: noisy SGD per parameter; running statistics of every batch norm
//! ```
//!
//! The step's inputs have [`Role`]s (images, labels, parameters, momenta, running statistics,
//! hyper-parameters); its outputs are named by [`Output`], so a runtime can bind buffers and a
//! later pass can rewrite the inside and still be checked output for output.

mod kfac;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};

use petgraph::graph::NodeIndex;

use crate::autodiff::{self, Gradients};

use crate::error::ShapeError;
use crate::graph::{Graph, Output, Phase, PortRef};
use crate::model::{Mode, Network};
use crate::noise::{FisherMode, Noise};
use crate::ops::{Add, ChannelSum, Reshape, Scale};
use crate::ops::{
    BnRunningUpdate, Constant, FisherCtx, FisherKind, FloatAttr, FullFisherSample, Hyper, Input,
    NoisySgdUpdate, Op, OpDef, Role, SoftmaxCrossEntropy, Square, UpdateNoise, VjpCtx,
};
use crate::tensor::{DType, TensorType};

#[derive(Clone, Debug)]
pub struct StepOptions {
    pub fisher: FisherMode,
    /// Apply weight decay to batch-norm γ and β too (off by default, as is usual).
    pub decay_bn: bool,
    pub noise: Noise,
}

impl StepOptions {
    pub fn new(fisher: FisherMode) -> Self {
        StepOptions {
            fisher,
            decay_bn: false,
            noise: Noise::DiagonalFisher,
        }
    }

    /// A step with `noise`, and the Fisher estimate it needs (exact) or none.
    pub fn with_noise(noise: Noise) -> Self {
        let fisher = if noise.needs_fisher() {
            FisherMode::Exact
        } else {
            FisherMode::None
        };
        StepOptions {
            noise,
            ..StepOptions::new(fisher)
        }
    }

    /// Every kind of step: each Fisher mode with diagonal-Fisher noise, then every other noise
    /// with the estimate it needs. For tests that must cover them all.
    pub fn all() -> Vec<StepOptions> {
        let mut all = FisherMode::ALL.map(StepOptions::new).to_vec();
        let others = Noise::ALL.into_iter().skip(1);
        all.extend(others.map(StepOptions::with_noise));
        all
    }
}

/// One training step as a graph, with the network it trains.
#[derive(Clone, Debug)]
pub struct TrainingStep {
    pub network: Network,
    pub graph: Graph,
    pub fisher: FisherMode,
    /// Whether batch-norm γ and β are decayed too (`StepOptions::decay_bn`).
    pub decay_bn: bool,
    pub noise: Noise,
    /// Every input node of the step, by role.
    pub inputs: BTreeMap<Role, NodeIndex>,
}

impl TrainingStep {
    pub fn batch(&self) -> usize {
        self.network.batch
    }
}

/// `Tr F̂ / D` as a `[1]` tensor: the Fisher estimates of every parameter summed (each as a
/// column through `channel_sum`), over the D parameter elements in all.
fn mean_fisher(
    graph: &mut Graph,
    network: &Network,
    fisher: &[Option<PortRef>],
) -> Result<PortRef, ShapeError> {
    let mut total: Option<PortRef> = None;
    let mut count = 0usize;
    for (f, param) in fisher.iter().zip(&network.params) {
        let f = f.expect("a Fisher estimate for every parameter (checked by the caller)");
        let n: usize = param.shape.iter().product();
        let column = graph.add1(Reshape { shape: vec![n, 1] }, &param.name, &[f])?;
        let sum = graph.add1(ChannelSum, &param.name, &[column])?;
        total = Some(match total {
            None => sum,
            Some(t) => graph.add1(Add, &param.name, &[t, sum])?,
        });
        count += n;
    }
    let total = total.ok_or_else(|| ShapeError {
        layer: network.name.clone(),
        op: "training_step",
        message: "the model has no parameters".to_string(),
    })?;
    let factor = FloatAttr(1.0 / count as f64);
    graph.add1(Scale { factor }, "fisher_trace", &[total])
}

/// One draw of full-Fisher noise per parameter: a second backward pass from the logits, seeded
/// with [`FullFisherSample`]'s weighted logit gradient (keyed by the step's seed and step).
fn full_fisher_vectors(
    graph: &mut Graph,
    (network, params): (&Network, &[PortRef]),
    labels: PortRef,
    [seed, step]: [PortRef; 2],
    kind: FisherKind,
) -> Result<Vec<PortRef>, ShapeError> {
    let logits = network.logits;
    let sample = FullFisherSample { kind };
    let dlogits = graph.add1(sample, "loss", &[logits, labels, seed, step])?;
    let grads = autodiff::backward_in(Phase::Fisher, graph, &[(logits, dlogits)], params)?;
    gradients_of(
        &grads,
        (network, params),
        FullFisherSample::NAME,
        "the logits",
    )
}

/// The gradient of every parameter (`params`, the network's, in order) among `grads`; an
/// error names a parameter that `seeded` (what the pass started from) does not depend on.
fn gradients_of(
    grads: &Gradients,
    (network, params): (&Network, &[PortRef]),
    op: &'static str,
    seeded: &str,
) -> Result<Vec<PortRef>, ShapeError> {
    let gradients = params.iter().zip(&network.params).map(|(&p, param)| {
        grads.of(p).ok_or_else(|| ShapeError {
            layer: param.layer.clone(),
            op,
            message: format!("parameter '{}' does not affect {seeded}", param.name),
        })
    });
    gradients.collect()
}

/// Builds forward, loss, backward, Fisher and update of a training-mode network.
pub fn build_training_step(
    network: Network,
    options: &StepOptions,
) -> Result<TrainingStep, ShapeError> {
    if network.mode != Mode::Train {
        return Err(ShapeError {
            layer: network.name.clone(),
            op: "training_step",
            message: "a training step needs the network built in training mode".to_string(),
        });
    }
    let mut graph = network.graph.clone();
    let batch = network.batch;

    graph.set_phase(Phase::Forward);
    let labels = input(&mut graph, Role::Labels, TensorType::i32(&[batch]), "loss");
    let loss = graph.add1(SoftmaxCrossEntropy, "loss", &[network.logits, labels])?;
    graph.set_output(Output::Loss, loss);

    graph.set_phase(Phase::Backward);
    let one = graph.add1(
        Constant {
            value: FloatAttr(1.0),
        },
        "loss",
        &[],
    )?;
    let params: Vec<PortRef> = network
        .params
        .iter()
        .map(|p| PortRef::new(p.node, 0))
        .collect();
    let grads = autodiff::backward(&mut graph, &[(loss, one)], &params)?;
    let param_grads = gradients_of(&grads, (&network, &params), "training_step", "the loss")?;
    for (i, &g) in param_grads.iter().enumerate() {
        graph.set_output(Output::Grad(i), g);
    }

    check_noise_and_fisher(options, &network.name)?;
    let kfac_layers = match options.noise {
        Noise::Kfac => kfac::layers(&graph, &network),
        _ => Vec::new(),
    };
    // K-FAC's layers take no diagonal estimate; every other parameter takes one
    let mut wanted = vec![true; params.len()];
    for layer in &kfac_layers {
        wanted[layer.weight] = false;
        if let Some(b) = layer.bias {
            wanted[b] = false;
        }
    }
    let fisher = match options.fisher {
        FisherMode::None => vec![None; params.len()],
        mode => {
            graph.set_phase(Phase::Fisher);
            fisher_estimates(&mut graph, &network, &grads, (mode, &wanted))?
        }
    };

    graph.set_phase(Phase::Update);
    let hyper = hyper_inputs(&mut graph);
    graph.set_phase(Phase::Fisher);
    let noise = update_noise(
        &mut graph,
        (options.noise, options.fisher),
        (&network, &params, labels),
        (&param_grads, &fisher, &grads),
        (&hyper, &kfac_layers),
    )?;
    graph.set_phase(Phase::Update);
    add_updates(
        &mut graph,
        &network,
        options.decay_bn,
        (&params, &param_grads, &fisher),
        (&hyper, &noise),
    )?;
    add_running_updates(&mut graph, &network)?;

    let inputs = input_nodes(&graph);
    Ok(TrainingStep {
        network,
        graph,
        fisher: options.fisher,
        decay_bn: options.decay_bn,
        noise: options.noise,
        inputs,
    })
}

/// A noise that needs a diagonal Fisher estimate has one, and one that takes none has none.
fn check_noise_and_fisher(options: &StepOptions, network: &str) -> Result<(), ShapeError> {
    let has_fisher = options.fisher != FisherMode::None;
    let mismatch = match options.noise {
        Noise::DiagonalFisher => None,
        Noise::FisherTrace => (!has_fisher).then_some("needs a Fisher estimate (exact or a2g2)"),
        Noise::Kfac => (!has_fisher).then_some(
            "needs a diagonal Fisher estimate (exact or a2g2) for the parameters outside convolutions and linear layers",
        ),
        _ => has_fisher.then_some("takes no diagonal Fisher estimate (fisher none)"),
    };
    match mismatch {
        Some(message) => Err(ShapeError {
            layer: network.to_string(),
            op: "training_step",
            message: format!("{} noise {message}", options.noise),
        }),
        None => Ok(()),
    }
}

/// What each parameter's update draws its noise from, and how it reads it.
struct NoiseSource {
    /// Per parameter: how its update reads its noise input.
    kinds: Vec<UpdateNoise>,
    /// Per parameter: its variance or noise vector, where it has one.
    inputs: Vec<Option<PortRef>>,
}

/// What the update's noise is drawn from, per parameter: a variance (the Fisher estimate,
/// g², or Tr F̂ / D) or a noise vector (a full-Fisher or K-FAC draw), and how the update
/// reads it.
fn update_noise(
    graph: &mut Graph,
    (noise, mode): (Noise, FisherMode),
    (network, params, labels): (&Network, &[PortRef], PortRef),
    (param_grads, fisher, grads): (&[PortRef], &[Option<PortRef>], &Gradients),
    (hyper, kfac_layers): (&HashMap<Hyper, PortRef>, &[kfac::KfacLayer]),
) -> Result<NoiseSource, ShapeError> {
    let has_fisher = mode != FisherMode::None;
    if noise == Noise::Kfac {
        let vectors = kfac::add_noise(graph, (network, kfac_layers), grads, hyper)?;
        // a K-FAC layer's parameters read its vectors, the rest their diagonal estimates
        let kinds = vectors
            .iter()
            .map(|v| match v {
                Some(_) => UpdateNoise::Vector,
                None => UpdateNoise::Diagonal,
            })
            .collect();
        let inputs = vectors.iter().zip(fisher).map(|(v, f)| v.or(*f)).collect();
        return Ok(NoiseSource { kinds, inputs });
    }
    let (kind, inputs) = match noise {
        Noise::DiagonalFisher if has_fisher => (UpdateNoise::Diagonal, fisher.to_vec()),
        Noise::DiagonalFisher => (UpdateNoise::None, fisher.to_vec()),
        Noise::Multiplicative => {
            let squares = param_grads
                .iter()
                .zip(&network.params)
                .map(|(&g, param)| graph.add1(Square, &param.name, &[g]).map(Some));
            (UpdateNoise::Diagonal, squares.collect::<Result<_, _>>()?)
        }
        Noise::FisherTrace => {
            let mean = mean_fisher(graph, network, fisher)?;
            (UpdateNoise::Scalar, vec![Some(mean); params.len()])
        }
        Noise::FullFisherEmpirical | Noise::FullFisherTrue => {
            let kind = if noise == Noise::FullFisherTrue {
                FisherKind::True
            } else {
                FisherKind::Empirical
            };
            let seeds = [hyper[&Hyper::Seed], hyper[&Hyper::Step]];
            let vectors = full_fisher_vectors(graph, (network, params), labels, seeds, kind)?;
            (UpdateNoise::Vector, vectors.into_iter().map(Some).collect())
        }
        Noise::Kfac => unreachable!("K-FAC's sources are chosen above"),
    };
    Ok(NoiseSource {
        kinds: vec![kind; params.len()],
        inputs,
    })
}

/// Every parameter's noisy SGD update, with its momentum input; the new parameters, momenta
/// and Fisher estimates as outputs.
fn add_updates(
    graph: &mut Graph,
    network: &Network,
    decay_bn: bool,
    (params, param_grads, fisher): (&[PortRef], &[PortRef], &[Option<PortRef>]),
    (hyper, noise): (&HashMap<Hyper, PortRef>, &NoiseSource),
) -> Result<(), ShapeError> {
    for (i, param) in network.params.iter().enumerate() {
        let momentum = input(
            graph,
            Role::Momentum(i),
            TensorType::f32(&param.shape),
            &param.name,
        );
        let update = NoisySgdUpdate {
            param: i as u32,
            decay: decay_bn || !param.kind.is_batch_norm(),
            noise: noise.kinds[i],
            fisher_factor: None,
        };
        let mut inputs = vec![params[i], momentum, param_grads[i]];
        inputs.extend(Hyper::ALL.iter().map(|h| hyper[h]));
        inputs.extend(noise.inputs[i]);
        let node = graph.add(update, &param.name, &inputs)?;
        graph.set_output(Output::NewParam(i), PortRef::new(node, 0));
        graph.set_output(Output::NewMomentum(i), PortRef::new(node, 1));
        if let Some(f) = fisher[i] {
            graph.set_output(Output::Fisher(i), f);
        }
    }
    Ok(())
}

/// Every batch norm's running-statistics update, with its running statistics as inputs and
/// the new ones as outputs.
fn add_running_updates(graph: &mut Graph, network: &Network) -> Result<(), ShapeError> {
    for (i, bn) in network.bn_layers.iter().enumerate() {
        let stats = TensorType::f32(&[bn.channels]);
        let mean = input(graph, Role::RunningMean(i), stats.clone(), &bn.name);
        let var = input(graph, Role::RunningVar(i), stats, &bn.name);
        let update = BnRunningUpdate {
            momentum: FloatAttr(bn.momentum),
            count: bn.count,
        };
        let batch_mean = PortRef::new(bn.node, 1);
        let batch_var = PortRef::new(bn.node, 2);
        let node = graph.add(update, &bn.name, &[mean, var, batch_mean, batch_var])?;
        graph.set_output(Output::NewRunningMean(i), PortRef::new(node, 0));
        graph.set_output(Output::NewRunningVar(i), PortRef::new(node, 1));
    }
    Ok(())
}

pub(crate) fn input(graph: &mut Graph, role: Role, ty: TensorType, layer: &str) -> PortRef {
    let node = graph
        .add(Input { role, ty }, layer, &[])
        .expect("inputs take no inputs, so they always type-check");
    PortRef::new(node, 0)
}

fn hyper_inputs(graph: &mut Graph) -> HashMap<Hyper, PortRef> {
    Hyper::ALL
        .iter()
        .map(|&h| {
            let dtype = match h {
                Hyper::Seed | Hyper::Step => DType::U64,
                _ => DType::F32,
            };
            (
                h,
                input(graph, Role::Hyper(h), TensorType::scalar(dtype), "hyper"),
            )
        })
        .collect()
}

/// The forward nodes that read `value` (a parameter), with the port they read it at.
fn forward_readers(graph: &Graph, value: PortRef) -> Vec<(NodeIndex, usize)> {
    graph
        .consumers(value)
        .into_iter()
        .filter(|(n, _)| graph.node(*n).phase == Phase::Forward)
        .collect()
}

/// F̂ of every parameter, from the Fisher rule of the forward op that consumes it.
fn fisher_estimates(
    graph: &mut Graph,
    network: &Network,
    grads: &Gradients,
    (mode, wanted): (FisherMode, &[bool]),
) -> Result<Vec<Option<PortRef>>, ShapeError> {
    let mut by_consumer: HashMap<NodeIndex, Vec<Option<PortRef>>> = HashMap::new();
    let mut estimates = Vec::with_capacity(network.params.len());
    for (param, &wanted) in network.params.iter().zip(wanted) {
        if !wanted {
            estimates.push(None);
            continue;
        }
        let value = PortRef::new(param.node, 0);
        let forward_uses = forward_readers(graph, value);
        let [(consumer, port)] = forward_uses[..] else {
            return Err(ShapeError {
                layer: param.layer.clone(),
                op: "fisher",
                message: format!(
                    "parameter '{}' is read by {} layers; per-example Fisher needs exactly one",
                    param.name,
                    forward_uses.len()
                ),
            });
        };
        if let Entry::Vacant(slot) = by_consumer.entry(consumer) {
            slot.insert(apply_fisher_rule(
                graph,
                consumer,
                network.batch,
                grads,
                mode,
            )?);
        }
        let estimate = by_consumer[&consumer][port].ok_or_else(|| ShapeError {
            layer: param.layer.clone(),
            op: graph.node(consumer).op.name(),
            message: format!("the Fisher rule gave no estimate for '{}'", param.name),
        })?;
        estimates.push(Some(estimate));
    }
    Ok(estimates)
}

fn apply_fisher_rule(
    graph: &mut Graph,
    consumer: NodeIndex,
    batch: usize,
    grads: &Gradients,
    mode: FisherMode,
) -> Result<Vec<Option<PortRef>>, ShapeError> {
    let node = graph.node(consumer);
    let op: Op = node.op.clone();
    let layer = node.layer.clone();
    let outputs: Vec<PortRef> = (0..node.outputs.len())
        .map(|p| PortRef::new(consumer, p))
        .collect();
    let inputs = graph.inputs(consumer);
    let douts = outputs.iter().map(|&o| grads.of(o)).collect();
    let mut cx = FisherCtx {
        vjp: VjpCtx {
            graph,
            layer,
            wants: vec![false; inputs.len()],
            inputs,
            outputs,
            douts,
        },
        mode,
        batch,
    };
    op.fisher(&mut cx)
}

/// Every input node of the graph, by role.
pub fn input_nodes(graph: &Graph) -> BTreeMap<Role, NodeIndex> {
    graph
        .node_indices()
        .filter_map(|n| match &graph.node(n).op {
            Op::Input(input) => Some((input.role.clone(), n)),
            _ => None,
        })
        .collect()
}
