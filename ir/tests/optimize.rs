//! The optimizer against the unoptimised graph on the CPU reference.

mod common;

use std::path::Path;

use common::assert_close;
use fisherc_ir::graph::Output;
use fisherc_ir::interp::evaluate;
use fisherc_ir::model::{BuildOptions, ModelSpec, ParamKind, build};
use fisherc_ir::ops::{NoisySgdUpdate, Op, Squares};
use fisherc_ir::optimize::cost::H100;
use fisherc_ir::optimize::{Limits, optimize, optimize_with};
use fisherc_ir::state::kfac::{KfacSettings, KfacState};
use fisherc_ir::state::{Hyperparams, TrainState};
use fisherc_ir::synthetic::random_batch;
use fisherc_ir::{FisherMode, StepOptions, build_training_step};

fn models() -> Vec<(String, ModelSpec)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    let mut specs: Vec<(String, ModelSpec)> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            (path.extension()? == "toml").then(|| {
                let spec = ModelSpec::load(&path).unwrap();
                (spec.name.clone(), spec)
            })
        })
        .collect();
    specs.sort_by(|a, b| a.0.cmp(&b.0));
    specs
}

/// Relative error allowed between optimised and unoptimised outputs (f64 reference; the
/// fused ops sum in a different order, nothing else differs).
const TOLERANCE: f64 = 1e-9;

#[test]
fn optimised_steps_compute_what_the_unoptimised_ones_do() {
    for (name, spec) in models() {
        let batch = if name == "vgg16" { 2 } else { 4 };
        for options in StepOptions::all() {
            let net = build(&spec, &BuildOptions::train(batch)).unwrap();
            let step = build_training_step(net, &options).unwrap();
            let mode = format!("{} {} noise", options.fisher, options.noise);
            let optimized = optimize(&step.graph).unwrap();
            let net = &step.network;
            let state = TrainState::<f64>::init(net, 5);
            let (images, labels) = random_batch::<f64>(batch, net.input, net.classes, 6);
            let hyper = Hyperparams {
                noise_scale: 0.3,
                seed: 9,
                step: 2,
                ..Hyperparams::default()
            };
            let mut feeds = state.feeds(images, labels, &hyper);
            let kfac = KfacState::for_step(&step, KfacSettings::default());
            feeds.extend(kfac.feeds(true));
            let reference = evaluate(&step.graph, &feeds, &[]).unwrap();
            let fused = evaluate(&optimized.graph, &feeds, &[]).unwrap();
            assert_eq!(
                reference.outputs().keys().collect::<Vec<_>>(),
                fused.outputs().keys().collect::<Vec<_>>(),
                "{name} {mode}: the same outputs"
            );
            for (output, value) in reference.outputs() {
                let got = fused.output(output).unwrap().float();
                let expected = value.float();
                if expected.data.iter().all(|v| *v == 0.0) {
                    assert!(got.data.iter().all(|v| *v == 0.0), "{name} {mode} {output}");
                    continue;
                }
                assert_close(
                    &format!("{name} {mode} {output}"),
                    &got.data,
                    &expected.data,
                    TOLERANCE,
                );
            }
        }
    }
}

fn model_step(name: &str, batch: usize, mode: FisherMode) -> fisherc_ir::TrainingStep {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../models/{name}.toml"));
    let net = build(
        &ModelSpec::load(&path).unwrap(),
        &BuildOptions::train(batch),
    )
    .unwrap();
    build_training_step(net, &StepOptions::new(mode)).unwrap()
}

/// Follows scalings back to the node that computes a value: `scale` nodes, and updates that
/// scale their Fisher estimate (output 2) from their noise input.
fn through_scales(graph: &fisherc_ir::Graph, mut p: fisherc_ir::PortRef) -> fisherc_ir::PortRef {
    loop {
        p = match &graph.node(p.node).op {
            Op::Scale(_) => graph.inputs(p.node)[0],
            Op::NoisySgdUpdate(u) if u.fisher_factor.is_some() && p.port == 2 => {
                graph.inputs(p.node)[NoisySgdUpdate::NOISE]
            }
            Op::NoisySgdUpdateGroup(group) => {
                let ports = group.ports();
                let member = ports.iter().find(|m| m.outputs.contains(&p.port)).unwrap();
                assert_eq!(p.port - member.outputs.start, 2, "a Fisher estimate's port");
                graph.inputs(p.node)[member.inputs[NoisySgdUpdate::NOISE]]
            }
            _ => return p,
        }
    }
}

#[test]
fn paper_models_use_the_fused_forms_at_full_batch() {
    for name in ["resnet44", "resnet44x2", "vgg16"] {
        let step = model_step(name, 4096, FisherMode::Exact);
        let optimized = optimize(&step.graph).unwrap();
        let graph = &optimized.graph;
        // no standalone square of a weight gradient, no per-example tensor
        for op in [
            "square",
            "batch_mean",
            "conv_wgrad_per_example",
            "linear_wgrad_per_example",
            "bn_param_grads_per_example",
        ] {
            assert!(
                !optimized.report.ops.contains_key(op),
                "{name}: {op} remains"
            );
        }
        // every conv and linear weight gradient comes out of a fused gradient-and-square node
        for (i, param) in step.network.params.iter().enumerate() {
            if !matches!(param.kind, ParamKind::ConvWeight | ParamKind::LinearWeight) {
                continue;
            }
            let grad = graph.output(&Output::Grad(i)).unwrap();
            let fisher = through_scales(graph, graph.output(&Output::Fisher(i)).unwrap());
            let fused = match &graph.node(grad.node).op {
                Op::FusedWgrad(w) => w.squares == Squares::PerExample,
                Op::LinearWgradSq(_) => true,
                other => panic!("{name}: {} gradient from {}", param.name, other.name()),
            };
            assert!(
                fused,
                "{name}: {} has no squares in its gradient node",
                param.name
            );
            assert_eq!(
                (grad.node, grad.port, fisher.port),
                (fisher.node, 0, 1),
                "{name}: {}",
                param.name
            );
        }
        // every conv → BN → ReLU chain uses the fused forms: no ReLU or BN-apply of its own,
        // and every BN followed by a ReLU takes its statistics from the convolution's epilogue
        assert!(
            !optimized.report.ops.contains_key("relu"),
            "{name}: a ReLU remains"
        );
        assert!(
            !optimized.report.ops.contains_key("bn_apply"),
            "{name}: a BN-apply remains"
        );
        for (i, bn) in step.network.bn_layers.iter().enumerate() {
            let feeds_relu = step
                .network
                .graph
                .consumers(fisherc_ir::PortRef::new(bn.node, 0))
                .iter()
                .any(|(n, _)| matches!(step.network.graph.node(*n).op, Op::Relu(_)));
            if !feeds_relu {
                continue; // a projection shortcut's BN, added before any ReLU
            }
            let mean = graph.inputs(graph.output(&Output::NewRunningMean(i)).unwrap().node)[2];
            let producer = &graph.node(mean.node).op;
            assert!(
                matches!(producer, Op::FusedConv(c) if c.stats),
                "{name}: {} statistics from {}",
                bn.name,
                producer.name()
            );
        }
    }
}

#[test]
fn resnet44_moves_far_fewer_bytes_after_optimisation() {
    for (mode, bound) in [(FisherMode::Exact, 0.60), (FisherMode::None, 0.75)] {
        let step = model_step("resnet44", 4096, mode);
        let report = optimize(&step.graph).unwrap().report;
        let ratio = report.after.bytes as f64 / report.before.bytes as f64;
        assert!(
            ratio <= bound,
            "resnet44 {mode}: bytes {} → {} ({ratio:.3} > {bound})",
            report.before.bytes,
            report.after.bytes
        );
        assert!(report.after.kernels < report.before.kernels);
    }
}

#[test]
fn without_rules_the_graph_round_trips_with_its_updates_grouped() {
    let step = model_step("resnet20", 2, FisherMode::Exact);
    let optimized = optimize_with(&step.graph, &[], &Limits::default(), &H100).unwrap();
    let (mut ops, ops_before) = (optimized.report.ops.clone(), &optimized.report.ops_before);
    let updates = ops_before["noisy_sgd_update"];
    let running = ops_before["bn_running_update"];
    assert_eq!(updates, step.network.params.len());
    assert_eq!(running, step.network.bn_layers.len());
    assert_eq!(ops.remove("noisy_sgd_update_group"), Some(1));
    assert_eq!(ops.remove("bn_running_update_group"), Some(1));
    ops.insert("noisy_sgd_update", updates);
    ops.insert("bn_running_update", running);
    assert_eq!(&ops, ops_before);
    // the group reads the shared scalars (lr, μ, wd, s, seed, step) once, not once a parameter
    let update = step
        .graph
        .node_indices()
        .find(|&n| matches!(step.graph.node(n).op, Op::NoisySgdUpdate(_)))
        .unwrap();
    let shared: u64 = step.graph.inputs(update)[NoisySgdUpdate::LR..NoisySgdUpdate::NOISE]
        .iter()
        .map(|&p| step.graph.ty(p).bytes() as u64)
        .sum();
    let (before, after) = (optimized.report.before, optimized.report.after);
    assert_eq!(
        (after.bytes, after.flops, after.kernels),
        (
            before.bytes - (updates as u64 - 1) * shared,
            before.flops,
            before.kernels - updates + 1 - running + 1
        )
    );
    let net = &step.network;
    let feeds = TrainState::<f32>::init(net, 1).feeds(
        random_batch(net.batch, net.input, net.classes, 2).0,
        random_batch::<f32>(net.batch, net.input, net.classes, 2).1,
        &Hyperparams::default(),
    );
    let (a, b) = (
        evaluate(&step.graph, &feeds, &[]).unwrap(),
        evaluate(&optimized.graph, &feeds, &[]).unwrap(),
    );
    assert_eq!(a.outputs(), b.outputs(), "bit for bit");
}

#[test]
fn one_fused_node_serves_both_the_gradient_and_its_squares() {
    // a tree extractor would pay for the fused tuple once per projection, and so prefer a
    // separate plain wgrad for the gradient; the DAG extractor counts it once
    let step = model_step("resnet20", 8, FisherMode::Exact);
    let optimized = optimize(&step.graph).unwrap();
    let convs = step.network.graph.op_counts()["conv2d"];
    assert_eq!(optimized.report.ops.get("fused_wgrad"), Some(&convs));
    assert!(!optimized.report.ops.contains_key("conv_wgrad"));
}

/// After optimisation one group updates every parameter and one every BN layer's running
/// statistics; each new parameter, momentum and running statistic overwrites the very input (by
/// role) it replaces.
#[test]
fn the_updates_group_into_one_node_each_state_in_place() {
    use fisherc_ir::ops::{Input, Role};
    let spec =
        ModelSpec::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/resnet20.toml"))
            .unwrap();
    for options in StepOptions::all() {
        let mode = format!("{} {} noise", options.fisher, options.noise);
        let net = build(&spec, &BuildOptions::train(2)).unwrap();
        let step = build_training_step(net, &options).unwrap();
        let graph = optimize(&step.graph).unwrap().graph;
        let ops = graph.op_counts();
        for kind in ["noisy_sgd_update", "bn_running_update"] {
            assert_eq!(ops.get(kind), None, "{mode}");
            assert_eq!(ops.get(&*format!("{kind}_group")), Some(&1), "{mode}");
        }
        let role_of = |p: fisherc_ir::PortRef| match &graph.node(p.node).op {
            Op::Input(Input { role, .. }) => role.clone(),
            other => panic!("{mode}: overwrites the output of {}", other.name()),
        };
        let params = (0..step.network.params.len()).flat_map(|i| {
            [
                (Output::NewParam(i), Role::Param(i)),
                (Output::NewMomentum(i), Role::Momentum(i)),
            ]
        });
        let running = (0..step.network.bn_layers.len()).flat_map(|i| {
            [
                (Output::NewRunningMean(i), Role::RunningMean(i)),
                (Output::NewRunningVar(i), Role::RunningVar(i)),
            ]
        });
        for (output, role) in params.chain(running) {
            let p = graph.output(&output).unwrap();
            let overwritten = graph.node(p.node).op.in_place(p.port).unwrap();
            assert_eq!(role_of(graph.inputs(p.node)[overwritten]), role, "{mode}");
        }
    }
}
