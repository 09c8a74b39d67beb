//! The diagonal Fisher estimates, checked against independent computations (f64):
//!
//! * `exact` without batch norm: per-example gradients from one-example batches;
//! * `exact` with batch norm: per-example contributions materialised by running each
//!   parameter's own gradient op on one example's slice of its inputs;
//! * `a2g2`: the supplement's formula written out as loops.

mod common;

use std::path::Path;

use common::{assert_close, rel_error, rng, uniform};
use fisherc_ir::graph::{Output, PortRef};
use fisherc_ir::interp::{Evaluation, evaluate};
use fisherc_ir::model::{BuildOptions, ModelSpec, Network, ParamKind, build};
use fisherc_ir::ops::Op;
use fisherc_ir::state::{Hyperparams, TrainState};
use fisherc_ir::tensor::{Tensor, Value};
use fisherc_ir::{FisherMode, StepOptions, TrainingStep, build_training_step};

/// A convolutional model without batch norm: convolutions with bias, a strided one, pooling.
const CONV_NO_BN: &str = r#"
name = "conv_no_bn"
input = [2, 9, 9]
classes = 4
layers = [
  { op = "conv", out = 3, kernel = 3, padding = 1, bias = true },
  { op = "relu" },
  { op = "conv", out = 5, kernel = 3, stride = 2, bias = true },
  { op = "relu" },
  { op = "maxpool", kernel = 2 },
  { op = "flatten" },
  { op = "linear", out = 6 },
  { op = "relu" },
  { op = "linear", out = "$classes", bias = false },
]
"#;

/// Batch norm after strided and biased convolutions and in the classifier.
const CONV_BN: &str = r#"
name = "conv_bn"
input = [2, 9, 9]
classes = 4
layers = [
  { op = "conv", out = 3, kernel = 3, padding = 1, bias = true },
  { op = "bn" },
  { op = "relu" },
  { op = "conv", out = 5, kernel = 3, stride = 2 },
  { op = "bn" },
  { op = "relu" },
  { op = "avgpool" },
  { op = "linear", out = 6 },
  { op = "bn" },
  { op = "relu" },
  { op = "linear", out = "$classes" },
]
"#;

fn spec(text: &str) -> ModelSpec {
    ModelSpec::parse(text, Path::new("inline.toml")).unwrap()
}

fn model_file(name: &str) -> ModelSpec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(format!("{name}.toml"));
    ModelSpec::load(&path).unwrap()
}

fn network(spec: &ModelSpec, batch: usize, input: Option<[usize; 3]>) -> Network {
    let options = BuildOptions {
        input,
        ..BuildOptions::train(batch)
    };
    build(spec, &options).unwrap()
}

/// One step on a random batch; keeps the inputs of every parameter-gradient node.
struct Run {
    step: TrainingStep,
    state: TrainState<f64>,
    images: Tensor<f64>,
    labels: Tensor<i32>,
    eval: Evaluation<f64>,
}

fn run(network: Network, mode: FisherMode, seed: u64) -> Run {
    let step = build_training_step(network, &StepOptions::new(mode)).unwrap();
    let net = &step.network;
    let mut state = TrainState::<f64>::init(net, seed);
    // non-trivial γ and β, so their gradients are not special
    let mut r = rng(seed);
    for (p, t) in net.params.iter().zip(&mut state.params) {
        if p.kind.is_batch_norm() {
            let noise = uniform::<f64>(&mut r, &p.shape);
            t.data
                .iter_mut()
                .zip(&noise.data)
                .for_each(|(v, n)| *v += 0.3 * n);
        }
    }
    let mut images = uniform::<f64>(
        &mut r,
        &[net.batch, net.input[0], net.input[1], net.input[2]],
    );
    images.data.iter_mut().for_each(|v| *v *= 2.0);
    let labels = common::labels(&mut r, net.batch, net.classes);
    let feeds = state.feeds(images.clone(), labels.clone(), &Hyperparams::default());
    let keep: Vec<PortRef> = (0..net.params.len())
        .flat_map(|i| {
            let g = step.graph.output(&Output::Grad(i)).unwrap();
            step.graph.inputs(g.node)
        })
        .collect();
    let eval = evaluate(&step.graph, &feeds, &keep).unwrap();
    Run {
        step,
        state,
        images,
        labels,
        eval,
    }
}

fn output(eval: &Evaluation<f64>, name: Output) -> &Tensor<f64> {
    eval.output(&name)
        .unwrap_or_else(|| panic!("no output {name}"))
        .float()
}

/// Example `n` of a batch tensor, as a batch of one.
fn example(t: &Tensor<f64>, n: usize) -> Tensor<f64> {
    let len = t.numel() / t.shape[0];
    let mut shape = t.shape.clone();
    shape[0] = 1;
    Tensor::from_vec(&shape, t.data[n * len..(n + 1) * len].to_vec())
}

/// Example n's contribution to parameter i's gradient: the parameter's own gradient op run on
/// example n's slice of its batch inputs (rank ≥ 2); per-channel statistics are shared.
fn contributions(run: &Run, i: usize) -> Vec<Tensor<f64>> {
    let graph = &run.step.graph;
    let g = graph.output(&Output::Grad(i)).unwrap();
    let node = graph.node(g.node);
    let inputs: Vec<Value<f64>> = graph
        .inputs(g.node)
        .iter()
        .map(|p| run.eval.kept(*p).expect("kept").clone())
        .collect();
    (0..run.step.batch())
        .map(|n| {
            let sliced: Vec<Value<f64>> = inputs
                .iter()
                .map(|v| match v {
                    Value::Float(t) if t.shape.len() >= 2 => Value::Float(example(t, n)),
                    other => other.clone(),
                })
                .collect();
            let args: Vec<&Value<f64>> = sliced.iter().collect();
            let mut out = node.op.eval(&args, &node.outputs).unwrap();
            out.swap_remove(g.port).into_float()
        })
        .collect()
}

/// `(1/M) Σₙ (M·cₙ)²`.
fn mean_square_of_scaled(contributions: &[Tensor<f64>]) -> Vec<f64> {
    let m = contributions.len() as f64;
    let mut f = vec![0.0; contributions[0].numel()];
    for c in contributions {
        f.iter_mut()
            .zip(&c.data)
            .for_each(|(f, v)| *f += (m * v).powi(2) / m);
    }
    f
}

#[test]
fn exact_fisher_without_batch_norm_matches_one_example_batches() {
    let cases = [
        (spec(CONV_NO_BN), None),
        (model_file("mlp"), Some([1, 6, 6])),
    ];
    for (spec, input) in cases {
        let batch = 5;
        let full = run(network(&spec, batch, input), FisherMode::Exact, 11);
        let single = build_training_step(
            network(&spec, 1, input),
            &StepOptions::new(FisherMode::None),
        )
        .unwrap();
        let params = &full.step.network.params;
        let mut expected: Vec<Vec<f64>> = params.iter().map(|p| vec![0.0; p.numel()]).collect();
        for n in 0..batch {
            let labels = Tensor::from_vec(&[1], vec![full.labels.data[n]]);
            let feeds = full
                .state
                .feeds(example(&full.images, n), labels, &Hyperparams::default());
            let eval = evaluate(&single.graph, &feeds, &[]).unwrap();
            for (i, f) in expected.iter_mut().enumerate() {
                let g = output(&eval, Output::Grad(i));
                f.iter_mut()
                    .zip(&g.data)
                    .for_each(|(f, g)| *f += g * g / batch as f64);
            }
        }
        for (i, p) in params.iter().enumerate() {
            let fisher = output(&full.eval, Output::Fisher(i));
            assert_close(
                &format!("{}: {}", spec.name, p.name),
                &fisher.data,
                &expected[i],
                1e-10,
            );
        }
    }
}

#[test]
fn exact_fisher_with_batch_norm_matches_materialised_contributions() {
    let cases = [
        (spec(CONV_BN), None, None),
        (model_file("small_cnn"), Some([1, 8, 8]), None),
        (model_file("resnet20"), Some([3, 8, 8]), None),
        (model_file("resnet20"), Some([3, 8, 8]), Some("B")),
    ];
    for (spec, input, shortcut) in cases {
        let options = BuildOptions {
            input,
            shortcut: shortcut.map(|s| s.parse().unwrap()),
            ..BuildOptions::train(4)
        };
        let full = run(build(&spec, &options).unwrap(), FisherMode::Exact, 12);
        for (i, p) in full.step.network.params.iter().enumerate() {
            let parts = contributions(&full, i);
            // the contributions decompose the batch gradient ...
            let mut total = vec![0.0; p.numel()];
            for c in &parts {
                total.iter_mut().zip(&c.data).for_each(|(t, v)| *t += v);
            }
            let what = format!("{}: {}", spec.name, p.name);
            // (relative to the contributions: a bias before batch norm has a zero gradient
            // but non-zero contributions)
            let grad = output(&full.eval, Output::Grad(i));
            let scale = parts
                .iter()
                .flat_map(|c| &c.data)
                .fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{what}: all contributions are zero");
            let err = rel_error(&total, &grad.data, scale);
            assert!(err < 1e-10, "{what}: Σ contributions vs gradient: {err}");
            // ... and the Fisher is the mean of their scaled squares
            let fisher = output(&full.eval, Output::Fisher(i));
            assert_close(&what, &fisher.data, &mean_square_of_scaled(&parts), 1e-10);
        }
    }
}

/// The a2g2 formula, written out: `(1/M) Σₙ Σₜ a²ₙₜ (M·dyₙₜ)²` for each parameter kind.
fn a2g2_direct(run: &Run, i: usize) -> Vec<f64> {
    let graph = &run.step.graph;
    let param = &run.step.network.params[i];
    let g = graph.output(&Output::Grad(i)).unwrap();
    let args: Vec<&Tensor<f64>> = graph
        .inputs(g.node)
        .iter()
        .map(|p| run.eval.kept(*p).unwrap().float())
        .collect();
    let m = run.step.batch() as f64;
    let mut f = vec![0.0; param.numel()];
    match (&graph.node(g.node).op, param.kind) {
        (Op::ConvWgrad(wg), ParamKind::ConvWeight) => {
            let (x, dy) = (args[0], args[1]);
            let [o_n, c_n, kh, kw] = param.shape[..] else {
                unreachable!()
            };
            let (h, w, oh, ow) = (x.shape[2], x.shape[3], dy.shape[2], dy.shape[3]);
            for n in 0..x.shape[0] {
                for o in 0..o_n {
                    for c in 0..c_n {
                        for i in 0..kh {
                            for j in 0..kw {
                                for oy in 0..oh {
                                    for ox in 0..ow {
                                        let iy =
                                            (oy * wg.stride + i) as isize - wg.padding as isize;
                                        let ix =
                                            (ox * wg.stride + j) as isize - wg.padding as isize;
                                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize
                                        {
                                            continue;
                                        }
                                        let a = x.data
                                            [((n * c_n + c) * h + iy as usize) * w + ix as usize];
                                        let d = m * dy.data[((n * o_n + o) * oh + oy) * ow + ox];
                                        f[((o * c_n + c) * kh + i) * kw + j] += a * a * d * d / m;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        (Op::LinearWgrad(_), ParamKind::LinearWeight) => {
            let (x, dy) = (args[0], args[1]);
            let (inputs, outputs) = (x.shape[1], dy.shape[1]);
            for n in 0..x.shape[0] {
                for o in 0..outputs {
                    for k in 0..inputs {
                        let (a, d) = (x.data[n * inputs + k], m * dy.data[n * outputs + o]);
                        f[o * inputs + k] += a * a * d * d / m;
                    }
                }
            }
        }
        (Op::ChannelSum(_), ParamKind::ConvBias | ParamKind::LinearBias) => {
            let dy = args[0];
            let (c_n, positions) = (dy.shape[1], dy.numel() / (dy.shape[0] * dy.shape[1]));
            for (k, d) in dy.data.iter().enumerate() {
                f[(k / positions) % c_n] += (m * d).powi(2) / m;
            }
        }
        (Op::BnBackwardReduce(bn), ParamKind::BnGamma | ParamKind::BnBeta) => {
            let (dy, x, mean, var) = (args[0], args[1], args[2], args[3]);
            let (c_n, positions) = (x.shape[1], x.numel() / (x.shape[0] * x.shape[1]));
            for (k, (d, v)) in dy.data.iter().zip(&x.data).enumerate() {
                let c = (k / positions) % c_n;
                let xhat = (v - mean.data[c]) / (var.data[c] + bn.eps.0).sqrt();
                let a = if param.kind == ParamKind::BnGamma {
                    xhat
                } else {
                    1.0
                };
                f[c] += (a * m * d).powi(2) / m;
            }
        }
        (op, kind) => panic!("unexpected gradient op {} for {kind:?}", op.name()),
    }
    f
}

#[test]
fn a2g2_fisher_matches_the_direct_formula() {
    for (spec, input) in [
        (spec(CONV_BN), None),
        (model_file("resnet20"), Some([3, 8, 8])),
    ] {
        let options = BuildOptions {
            input,
            ..BuildOptions::train(3)
        };
        let full = run(build(&spec, &options).unwrap(), FisherMode::A2g2, 13);
        for (i, p) in full.step.network.params.iter().enumerate() {
            let fisher = output(&full.eval, Output::Fisher(i));
            let what = format!("{}: {}", spec.name, p.name);
            assert_close(&what, &fisher.data, &a2g2_direct(&full, i), 1e-10);
        }
    }
}

#[test]
fn a2g2_is_exact_for_linear_layers() {
    let mlp = model_file("mlp");
    let exact = run(network(&mlp, 6, Some([1, 5, 5])), FisherMode::Exact, 14);
    let a2g2 = run(network(&mlp, 6, Some([1, 5, 5])), FisherMode::A2g2, 14);
    for (i, p) in exact.step.network.params.iter().enumerate() {
        let (e, a) = (
            output(&exact.eval, Output::Fisher(i)),
            output(&a2g2.eval, Output::Fisher(i)),
        );
        assert_close(&p.name, &a.data, &e.data, 1e-10);
    }
}

#[test]
fn a2g2_differs_from_exact_for_convolutions() {
    let spec = spec(CONV_NO_BN);
    let exact = run(network(&spec, 4, None), FisherMode::Exact, 15);
    let a2g2 = run(network(&spec, 4, None), FisherMode::A2g2, 15);
    let conv = exact
        .step
        .network
        .params
        .iter()
        .position(|p| p.kind == ParamKind::ConvWeight)
        .unwrap();
    let (e, a) = (
        output(&exact.eval, Output::Fisher(conv)),
        output(&a2g2.eval, Output::Fisher(conv)),
    );
    assert!(
        rel_error(&a.data, &e.data, 1e-30) > 1e-3,
        "the approximation drops cross terms"
    );
}
