//! Whole training steps executed kernel by kernel on the CPU executor, checked two ways in one
//! run:
//!
//! * **node by node**: before each node's launches run, its inputs are read back from the
//!   executor's memory; its outputs must match the reference op evaluated on those very inputs
//!   (the noisy update bit for bit, so the noise is the CPU's);
//! * **end to end**: loss, gradients, Fisher, parameters and momenta after the step, against the
//!   reference interpreter running the unoptimised step in f64. The kernels may be at most
//!   [`SLACK`] times as far from it as the same interpreter in f32 is: both sum in f32, in
//!   different orders.
//!
//! End to end, a ReLU whose pre-activation lies within rounding of zero may switch on in one
//! computation and off in the other; the gradient then differs by that element's whole
//! contribution, and no bound on rounding covers it. The random batches below were checked to
//! have none (seed 4 of `resnet20` has one, in `basic6.bn1`); the node-by-node check is immune,
//! since each fused kernel computes its mask from the same inputs in the reference's order.

use std::path::Path;
use std::time::Instant;

use fisherc_codegen::compile::{CompileOptions, compile};
use fisherc_codegen::device::CpuDevice;
use fisherc_ir::graph::Output;
use fisherc_ir::interp::{Feeds, evaluate};
use fisherc_ir::model::{BuildOptions, load};
use fisherc_ir::ops::Op;
use fisherc_ir::state::{Hyperparams, TrainState};
use fisherc_ir::synthetic::random_batch;
use fisherc_ir::tensor::{Tensor, Value};
use fisherc_ir::{FisherMode, StepOptions, build_training_step};
use petgraph::graph::NodeIndex;

/// See the module documentation.
const SLACK: f64 = 4.0;

/// Largest relative difference of one node's output from the reference op's, node by node.
const NODE_BOUND: f64 = 1e-5;

/// Largest absolute difference relative to the largest magnitude of the exact values.
fn rel_error(a: &[f32], exact: &[f64]) -> f64 {
    let scale = exact.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(exact)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
        / scale
}

fn widen(a: &[f32]) -> Vec<f64> {
    a.iter().map(|&v| v as f64).collect()
}

fn to_f64(feeds: &Feeds<f32>) -> Feeds<f64> {
    let cast = |v: &Value<f32>| match v {
        Value::Float(t) => Value::Float(t.cast()),
        Value::Int(t) => Value::Int(t.clone()),
        Value::Word(w) => Value::Word(*w),
    };
    feeds
        .iter()
        .map(|(role, v)| (role.clone(), cast(v)))
        .collect()
}

struct Case {
    model: &'static str,
    batch: usize,
    input: Option<[usize; 3]>,
    mode: FisherMode,
    fused: bool,
    data_seed: u64,
}

fn check_step(case: Case) {
    let Case {
        model,
        batch,
        input,
        mode,
        fused,
        data_seed,
    } = case;
    let what = format!(
        "{model} batch {batch} {mode} {}",
        if fused { "fused" } else { "unfused" }
    );
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../models/{model}.toml"));
    let options = BuildOptions {
        input,
        ..BuildOptions::train(batch)
    };
    let step =
        build_training_step(load(&path, &options).unwrap(), &StepOptions::new(mode)).unwrap();
    let compiled = compile(&step, CompileOptions { fused }).unwrap();
    let (net, program) = (&step.network, &compiled.program);
    let state = TrainState::<f32>::init(net, 3);
    let (images, labels) = random_batch::<f32>(batch, net.input, net.classes, data_seed);
    let hyper = Hyperparams {
        noise_scale: 0.5,
        seed: 77,
        step: 9,
        ..Hyperparams::default()
    };
    let feeds = state.feeds(images, labels, &hyper);

    let mut device = CpuDevice::new(program);
    for (role, value) in &feeds {
        device.upload(role, value).unwrap();
    }
    let started = Instant::now();
    let mut noisy_updates = 0;
    for (i, node) in program.nodes.iter().enumerate() {
        if node.launch_count == 0 {
            continue;
        }
        let n = NodeIndex::new(node.graph_node);
        // a buffer read back has the shape of its first value; reshapes share buffers
        let as_input = |(&b, &port)| match device.read(&program.buffers[b]) {
            Value::Float(t) => {
                Value::Float(Tensor::from_vec(&compiled.graph.ty(port).shape, t.data))
            }
            other => other,
        };
        let inputs: Vec<Value<f32>> = node
            .inputs
            .iter()
            .zip(&compiled.graph.inputs(n))
            .map(as_input)
            .collect();
        device.run_node(i).unwrap_or_else(|e| panic!("{what}: {e}"));
        let graph_node = compiled.graph.node(n);
        let refs: Vec<&Value<f32>> = inputs.iter().collect();
        let expected = graph_node.op.eval(&refs, &graph_node.outputs).unwrap();
        for (port, (&b, want)) in node.outputs.iter().zip(&expected).enumerate() {
            let (got, want) = (device.read(&program.buffers[b]).into_float(), want.float());
            let at = format!("{what}: {} ({}) output {port}", node.layer, node.op);
            assert!(got.data.iter().all(|v| v.is_finite()), "{at}: not finite");
            if matches!(graph_node.op, Op::NoisySgdUpdate(_)) {
                let bits = |d: &[f32]| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got.data),
                    bits(&want.data),
                    "{at}: update not bit-identical"
                );
                noisy_updates += 1;
            } else {
                let err = rel_error(&got.data, &widen(&want.data));
                assert!(err <= NODE_BOUND, "{at}: relative error {err:e}");
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{what}: {} launches of {} kernels, arena {} bytes, executed and checked node by node in {seconds:.1} s",
        program.launches.len(),
        program.kernels.len(),
        program.arena_bytes
    );
    // new parameter and new momentum of every parameter
    assert_eq!(
        noisy_updates,
        2 * net.params.len(),
        "{what}: every parameter's update checked"
    );

    let reference = evaluate(&step.graph, &feeds, &[]).unwrap();
    let exact = evaluate(&step.graph, &to_f64(&feeds), &[]).unwrap();
    let check = |label: &str, name: &Output, floor: f64| {
        let exact = &exact.output(name).unwrap().float().data;
        let ours = rel_error(&device.download(name).unwrap().data, exact);
        let f32_reference = rel_error(&reference.output(name).unwrap().float().data, exact);
        let bound = (SLACK * f32_reference).max(floor);
        assert!(
            ours <= bound,
            "{what}: {label} {name}: relative error {ours:e} > {bound:e} (f32 reference: {f32_reference:e})"
        );
    };
    check("", &Output::Loss, 1e-6);
    for (i, p) in net.params.iter().enumerate() {
        check(&p.name, &Output::NewParam(i), 1e-6);
        check(&p.name, &Output::NewMomentum(i), 1e-5);
        check(&p.name, &Output::Grad(i), 1e-5);
        if mode != FisherMode::None {
            check(&p.name, &Output::Fisher(i), 1e-5);
        }
    }
}

#[test]
fn small_models_step_on_the_executor() {
    for mode in FisherMode::ALL {
        for fused in [true, false] {
            let small_cnn = Case {
                model: "small_cnn",
                batch: 4,
                input: Some([1, 12, 12]),
                mode,
                fused,
                data_seed: 4,
            };
            check_step(small_cnn);
            check_step(Case {
                model: "mlp",
                batch: 4,
                input: None,
                mode,
                fused,
                data_seed: 4,
            });
        }
    }
}

#[test]
fn resnet20_exact_step_on_the_executor_matches_the_reference() {
    check_step(Case {
        model: "resnet20",
        batch: 8,
        input: None,
        mode: FisherMode::Exact,
        fused: true,
        data_seed: 5,
    });
}
