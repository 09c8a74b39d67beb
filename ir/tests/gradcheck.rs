//! Finite-difference checks (f64) of every op's gradient rule: for a random projection
//! f = Σ y·R of the op's output y, the gradient autodiff builds must match central differences
//! of f at sampled input elements.

mod common;

use std::collections::BTreeSet;

use common::{rng, uniform, uniform_in};
use fisherc_ir::autodiff::backward;
use fisherc_ir::graph::{Graph, Output, PortRef};
use fisherc_ir::interp::{Feeds, evaluate};
use fisherc_ir::ops::{
    Add, BatchNorm, Conv2d, FloatAttr, GlobalAvgPool, Input, Linear, MaxPool, Op, Relu, Reshape,
    Role, Scale, ShortcutA, SoftmaxCrossEntropy,
};
use fisherc_ir::tensor::{DType, Tensor, TensorType, Value};
use rand::RngExt;

/// Central-difference step; f64 keeps its rounding error far below the tolerance.
const H: f64 = 1e-6;
/// Elements sampled per checked input.
const SAMPLES: usize = 40;
/// Allowed |fd − autodiff| relative to the largest gradient entry of that input.
const TOLERANCE: f64 = 1e-6;

fn role(i: usize) -> Role {
    Role::Named(format!("in{i}"))
}

/// Checks `op`'s gradient with respect to the inputs listed in `checked`, seeding the outputs
/// listed in `seeded` with random cotangents.
fn check(
    op: impl Into<Op>,
    inputs: Vec<Value<f64>>,
    checked: &[usize],
    seeded: &[usize],
    seed: u64,
) {
    let op = op.into();
    let mut rng = rng(seed);
    let mut graph = Graph::new();
    let in_ports: Vec<PortRef> = inputs
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let ty = TensorType::new(v.shape().to_vec(), v.dtype());
            graph
                .add1(Input { role: role(i), ty }, "test", &[])
                .unwrap()
        })
        .collect();
    let node = graph.add(op.clone(), "test", &in_ports).unwrap();
    let mut feeds: Feeds<f64> = inputs
        .iter()
        .enumerate()
        .map(|(i, v)| (role(i), v.clone()))
        .collect();
    let mut seeds = Vec::new();
    let mut cotangents = Vec::new();
    for &j in seeded {
        let y = PortRef::new(node, j);
        let ty = graph.ty(y).clone();
        let r = uniform::<f64>(&mut rng, &ty.shape);
        let seed_role = Role::Named(format!("seed{j}"));
        let r_port = graph
            .add1(
                Input {
                    role: seed_role.clone(),
                    ty,
                },
                "test",
                &[],
            )
            .unwrap();
        feeds.insert(seed_role, Value::Float(r.clone()));
        graph.set_output(Output::Named(format!("out{j}")), y);
        seeds.push((y, r_port));
        cotangents.push((j, r));
    }
    let wrt: Vec<PortRef> = checked.iter().map(|&i| in_ports[i]).collect();
    let grads = backward(&mut graph, &seeds, &wrt).unwrap();
    for &i in checked {
        let g = grads
            .of(in_ports[i])
            .unwrap_or_else(|| panic!("{}: no gradient for input {i}", op.name()));
        graph.set_output(Output::Named(format!("grad{i}")), g);
    }

    let projection = |feeds: &Feeds<f64>| -> f64 {
        let eval = evaluate(&graph, feeds, &[]).unwrap();
        cotangents
            .iter()
            .map(|(j, r)| {
                let y = eval
                    .output(&Output::Named(format!("out{j}")))
                    .unwrap()
                    .float();
                y.data.iter().zip(&r.data).map(|(a, b)| a * b).sum::<f64>()
            })
            .sum()
    };
    let analytic = evaluate(&graph, &feeds, &[]).unwrap();
    for &i in checked {
        let ad = analytic
            .output(&Output::Named(format!("grad{i}")))
            .unwrap()
            .float()
            .clone();
        let x = feeds[&role(i)].float().clone();
        let scale = ad.data.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        let picks: Vec<usize> = if x.numel() <= SAMPLES {
            (0..x.numel()).collect()
        } else {
            (0..SAMPLES)
                .map(|_| rng.random_range(0..x.numel()))
                .collect()
        };
        for k in picks {
            let mut perturbed = |delta: f64| {
                let mut x2 = x.clone();
                x2.data[k] += delta;
                feeds.insert(role(i), Value::Float(x2));
                let f = projection(&feeds);
                feeds.insert(role(i), Value::Float(x.clone()));
                f
            };
            let fd = (perturbed(H) - perturbed(-H)) / (2.0 * H);
            let err = (fd - ad.data[k]).abs() / scale;
            assert!(
                err < TOLERANCE,
                "{}: input {i} element {k}: finite difference {fd}, autodiff {}",
                op.name(),
                ad.data[k]
            );
        }
    }
}

fn float(t: Tensor<f64>) -> Value<f64> {
    Value::Float(t)
}

/// Values bounded away from 0, so no ReLU kink lies within the difference step.
fn away_from_zero(shape: &[usize], seed: u64) -> Tensor<f64> {
    let mut t = uniform::<f64>(&mut rng(seed), shape);
    t.data
        .iter_mut()
        .for_each(|v| *v = v.signum() * (v.abs() + 0.05));
    t
}

#[test]
fn conv2d_gradients_match_finite_differences() {
    let shapes: [(usize, usize, usize, usize, bool); 6] = [
        // (kernel, stride, padding, input size, bias)
        (3, 1, 1, 7, true),
        (3, 2, 1, 7, false), // ragged: 7 → 4
        (3, 1, 0, 6, true),
        (1, 1, 0, 5, false), // pointwise: the patch matrix is the input itself
        (1, 2, 0, 5, true),  // the option-B shortcut
        (5, 2, 2, 9, false),
    ];
    for (case, &(k, stride, padding, size, bias)) in shapes.iter().enumerate() {
        let mut r = rng(100 + case as u64);
        let mut inputs = vec![
            float(uniform(&mut r, &[2, 3, size, size])),
            float(uniform(&mut r, &[4, 3, k, k])),
        ];
        if bias {
            inputs.push(float(uniform(&mut r, &[4])));
        }
        let checked: Vec<usize> = (0..inputs.len()).collect();
        let op = Conv2d {
            stride,
            padding,
            bias,
        };
        check(op, inputs, &checked, &[0], case as u64);
    }
}

#[test]
fn linear_gradients_match_finite_differences() {
    for bias in [false, true] {
        let mut r = rng(200);
        let mut inputs = vec![
            float(uniform(&mut r, &[3, 5])),
            float(uniform(&mut r, &[4, 5])),
        ];
        if bias {
            inputs.push(float(uniform(&mut r, &[4])));
        }
        let checked: Vec<usize> = (0..inputs.len()).collect();
        check(Linear { bias }, inputs, &checked, &[0], 1);
    }
}

#[test]
fn batch_norm_gradients_match_finite_differences() {
    for shape in [vec![4, 3, 3, 3], vec![6, 4]] {
        let mut r = rng(300);
        let c = shape[1];
        let inputs = vec![
            float(uniform_in(&mut r, &shape, -2.0, 3.0)),
            float(uniform_in(&mut r, &[c], 0.5, 1.5)),
            float(uniform(&mut r, &[c])),
        ];
        let op = BatchNorm {
            eps: FloatAttr(1e-5),
        };
        check(op, inputs, &[0, 1, 2], &[0], 2);
    }
}

#[test]
fn relu_gradient_matches_finite_differences() {
    check(
        Relu,
        vec![float(away_from_zero(&[2, 3, 4, 4], 400))],
        &[0],
        &[0],
        3,
    );
}

#[test]
fn max_pool_gradients_match_finite_differences() {
    // non-overlapping with a ragged edge (5 → 2), and overlapping windows (3×3, stride 2)
    for (kernel, stride, size) in [(2, 2, 5), (3, 2, 7)] {
        let x = uniform::<f64>(&mut rng(500 + kernel as u64), &[2, 2, size, size]);
        check(MaxPool { kernel, stride }, vec![float(x)], &[0], &[0], 4);
    }
}

#[test]
fn global_avg_pool_gradient_matches_finite_differences() {
    let x = uniform::<f64>(&mut rng(600), &[2, 3, 4, 5]);
    check(GlobalAvgPool, vec![float(x)], &[0], &[0], 5);
}

#[test]
fn add_gradients_match_finite_differences() {
    let mut r = rng(700);
    let inputs = vec![
        float(uniform(&mut r, &[2, 3])),
        float(uniform(&mut r, &[2, 3])),
    ];
    check(Add, inputs, &[0, 1], &[0], 6);
}

#[test]
fn reshape_gradient_matches_finite_differences() {
    let x = uniform::<f64>(&mut rng(800), &[2, 3, 2, 2]);
    check(
        Reshape { shape: vec![2, 12] },
        vec![float(x)],
        &[0],
        &[0],
        7,
    );
}

#[test]
fn shortcut_a_gradient_matches_finite_differences() {
    let x = uniform::<f64>(&mut rng(900), &[2, 3, 5, 5]);
    let op = ShortcutA {
        stride: 2,
        pad_before: 2,
        pad_after: 2,
    };
    check(op, vec![float(x)], &[0], &[0], 8);
}

#[test]
fn softmax_cross_entropy_gradient_matches_finite_differences() {
    let mut r = rng(1000);
    let logits = uniform_in::<f64>(&mut r, &[4, 5], -3.0, 3.0);
    let labels = common::labels(&mut r, 4, 5);
    check(
        SoftmaxCrossEntropy,
        vec![float(logits), Value::Int(labels)],
        &[0],
        &[0],
        9,
    );
}

#[test]
fn scale_gradient_matches_finite_differences() {
    let x = uniform::<f64>(&mut rng(1100), &[3, 4]);
    check(
        Scale {
            factor: FloatAttr(-2.5),
        },
        vec![float(x)],
        &[0],
        &[0],
        10,
    );
}

/// Every op is either differentiated (and checked above) or listed here with the reason it
/// needs no gradient rule, so a new op cannot slip through unchecked.
#[test]
fn every_op_is_gradient_checked_or_needs_no_gradient() {
    let checked = [
        "conv2d",
        "linear",
        "batch_norm",
        "relu",
        "max_pool",
        "global_avg_pool",
        "add",
        "reshape",
        "shortcut_a",
        "softmax_cross_entropy",
        "scale",
    ];
    let no_gradient = [
        // sources: gradients stop there
        "input",
        "constant",
        // evaluation only / running statistics (not on the loss path)
        "bn_apply",
        "bn_running_update",
        // backward, Fisher and update ops are never differentiated again
        "conv_dgrad",
        "conv_wgrad",
        "linear_dgrad",
        "linear_wgrad",
        "channel_sum",
        "bn_backward_reduce",
        "bn_backward_data",
        "relu_backward",
        "max_pool_backward",
        "global_avg_pool_backward",
        "shortcut_a_backward",
        "softmax_cross_entropy_backward",
        "full_fisher_sample",
        "kfac_input_factor",
        "kfac_grad_factor",
        "kfac_noise",
        "conv_wgrad_per_example",
        "linear_wgrad_per_example",
        "channel_sum_per_example",
        "bn_param_grads_per_example",
        "bn_param_grads_sq",
        "square",
        "batch_mean",
        "noisy_sgd_update",
        "noisy_sgd_update_group",
        "bn_running_update_group",
        // fused forms: the optimizer builds them after autodiff
        "fused_conv",
        "fused_wgrad",
        "fused_dgrad",
        "linear_wgrad_sq",
        "channel_sum_sq",
        "bn_backward_reduce_sq",
        "bn_relu",
        "relu_backward_bn_reduce",
        "elementwise",
    ];
    let listed: BTreeSet<&str> = checked.iter().chain(&no_gradient).copied().collect();
    let all: BTreeSet<&str> = Op::NAMES.iter().copied().collect();
    assert_eq!(listed, all);
    assert_eq!(
        listed.len(),
        checked.len() + no_gradient.len(),
        "an op is listed twice"
    );
}

#[test]
fn a_gradient_reaching_batch_statistics_is_an_error() {
    let mut graph = Graph::new();
    let x_ty = TensorType::f32(&[2, 3]);
    let c_ty = TensorType::f32(&[3]);
    let x = graph
        .add1(
            Input {
                role: role(0),
                ty: x_ty,
            },
            "test",
            &[],
        )
        .unwrap();
    let g = graph
        .add1(
            Input {
                role: role(1),
                ty: c_ty.clone(),
            },
            "test",
            &[],
        )
        .unwrap();
    let b = graph
        .add1(
            Input {
                role: role(2),
                ty: c_ty.clone(),
            },
            "test",
            &[],
        )
        .unwrap();
    let bn = graph
        .add(
            BatchNorm {
                eps: FloatAttr(1e-5),
            },
            "bn7",
            &[x, g, b],
        )
        .unwrap();
    let seed = graph
        .add1(
            Input {
                role: role(3),
                ty: TensorType::new(vec![3], DType::F32),
            },
            "test",
            &[],
        )
        .unwrap();
    let err = backward(&mut graph, &[(PortRef::new(bn, 1), seed)], &[x]).unwrap_err();
    assert_eq!(err.layer, "bn7");
    assert!(err.message.contains("not differentiable"), "{err}");
}
