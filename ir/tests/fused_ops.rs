//! Every fused op against the composition of basic ops it stands for, on fresh random inputs
//! (f64), over several shapes including ones that do not divide evenly.

mod common;

use common::{assert_close, rng, uniform, uniform_in};
use fisherc_ir::ops::{
    Add, BatchMean, BatchNorm, BnApply, BnBackwardReduce, BnBackwardReduceSq,
    BnParamGradsPerExample, BnParamGradsSq, BnRelu, ChannelSum, ChannelSumPerExample, ChannelSumSq,
    Conv2d, ConvDgrad, ConvWgrad, ConvWgradPerExample, Elementwise, FloatAttr, FusedConv,
    FusedDgrad, FusedWgrad, Instr, LinearWgrad, LinearWgradPerExample, LinearWgradSq,
    NoisySgdUpdate, NoisySgdUpdateGroup, Op, Relu, ReluBackward, ReluBackwardBnReduce, Scale,
    Square, Squares, UpdateNoise,
};
use fisherc_ir::tensor::{Tensor, TensorType, Value};
use rand_chacha::ChaCha8Rng;

const EPS: FloatAttr = FloatAttr(1e-5);
const TOLERANCE: f64 = 1e-12;

/// Runs one op on values (the CPU reference, as the interpreter would).
fn run(op: impl Into<Op>, inputs: &[&Value<f64>]) -> Vec<Value<f64>> {
    let op = op.into();
    let types: Vec<TensorType> = inputs
        .iter()
        .map(|v| TensorType::new(v.shape().to_vec(), v.dtype()))
        .collect();
    let refs: Vec<&TensorType> = types.iter().collect();
    let out_types = op
        .infer(&refs)
        .unwrap_or_else(|e| panic!("{}: {e}", op.name()));
    let outputs = op.eval(inputs, &out_types).unwrap();
    for (v, t) in outputs.iter().zip(&out_types) {
        assert!(v.has_type(t), "{}: output type", op.name());
    }
    outputs
}

fn one(op: impl Into<Op>, inputs: &[&Value<f64>]) -> Value<f64> {
    run(op, inputs).remove(0)
}

fn random(r: &mut ChaCha8Rng, shape: &[usize]) -> Value<f64> {
    Value::Float(uniform(r, shape))
}

fn same(what: &str, a: &Value<f64>, b: &Value<f64>) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes");
    assert_close(what, &a.float().data, &b.float().data, TOLERANCE);
}

fn scaled(v: &Value<f64>, factor: f64) -> Value<f64> {
    one(
        Scale {
            factor: FloatAttr(factor),
        },
        &[v],
    )
}

/// A pre-BN tensor with its batch statistics and random γ, β: [y, mean, var, γ, β].
fn bn_inputs(r: &mut ChaCha8Rng, shape: &[usize]) -> Vec<Value<f64>> {
    let c = shape[1];
    let y = Value::Float(uniform_in(r, shape, -2.0, 3.0));
    let ones = Value::Float(Tensor::filled(&[c], 1.0));
    let zeros = Value::Float(Tensor::zeros(&[c]));
    let stats = run(BatchNorm { eps: EPS }, &[&y, &ones, &zeros]);
    let gamma = Value::Float(uniform_in(r, &[c], 0.5, 1.5));
    let beta = random(r, &[c]);
    vec![y, stats[1].clone(), stats[2].clone(), gamma, beta]
}

fn refs(values: &[Value<f64>]) -> Vec<&Value<f64>> {
    values.iter().collect()
}

/// relu(bn_apply(y, mean, var, γ, β)) by the basic ops.
fn bn_relu_by_parts(bn: &[Value<f64>]) -> Value<f64> {
    let applied = one(BnApply { eps: EPS }, &refs(bn));
    one(Relu, &[&applied])
}

/// (kernel, stride, padding, input size, channels in, channels out)
const CONV_SHAPES: [(usize, usize, usize, usize, usize, usize); 4] = [
    (3, 1, 1, 6, 3, 4),
    (3, 2, 1, 7, 2, 5),
    (1, 2, 0, 5, 4, 3),
    (3, 1, 0, 5, 3, 2),
];

#[test]
fn fused_conv_is_bn_relu_then_conv_then_statistics() {
    for (case, &(k, stride, padding, size, c, o)) in CONV_SHAPES.iter().enumerate() {
        let mut r = rng(case as u64);
        let bn = bn_inputs(&mut r, &[3, c, size, size]);
        let w = random(&mut r, &[o, c, k, k]);
        let b = random(&mut r, &[o]);
        for bias in [false, true] {
            let conv = Conv2d {
                stride,
                padding,
                bias,
            };
            let a = bn_relu_by_parts(&bn);
            let mut plain_inputs = vec![&a, &w];
            let mut fused_inputs = refs(&bn);
            fused_inputs.push(&w);
            if bias {
                plain_inputs.push(&b);
                fused_inputs.push(&b);
            }
            let y = one(conv.clone(), &plain_inputs);
            let ones = Value::Float(Tensor::filled(&[o], 1.0));
            let zeros = Value::Float(Tensor::zeros(&[o]));
            let stats = run(BatchNorm { eps: EPS }, &[&y, &ones, &zeros]);
            let fused = FusedConv {
                conv: conv.clone(),
                prologue: Some(EPS),
                stats: true,
            };
            let out = run(fused, &fused_inputs);
            same("prologue conv", &out[0], &y);
            same("epilogue mean", &out[1], &stats[1]);
            same("epilogue variance", &out[2], &stats[2]);
            // without the prologue, on a plain input
            let mut plain_fused_inputs = vec![&bn[0], &w];
            plain_fused_inputs.extend(bias.then_some(&b));
            let fused = FusedConv {
                conv: conv.clone(),
                prologue: None,
                stats: false,
            };
            let out = run(fused, &plain_fused_inputs);
            assert_eq!(out.len(), 1);
            let mut direct = vec![&bn[0], &w];
            direct.extend(bias.then_some(&b));
            same("plain conv", &out[0], &one(conv, &direct));
        }
    }
}

#[test]
fn fused_wgrad_is_wgrad_and_its_squares() {
    for (case, &(k, stride, padding, size, c, o)) in CONV_SHAPES.iter().enumerate() {
        let mut r = rng(10 + case as u64);
        let n = 3;
        let bn = bn_inputs(&mut r, &[n, c, size, size]);
        let wgrad = ConvWgrad {
            stride,
            padding,
            kernel: (k, k),
        };
        let conv = Conv2d {
            stride,
            padding,
            bias: false,
        };
        let w = random(&mut r, &[o, c, k, k]);
        let y_type = one(conv, &[&bn[0], &w]);
        let dy = random(&mut r, y_type.shape());
        let a = bn_relu_by_parts(&bn);
        let dw = one(wgrad.clone(), &[&a, &dy]);
        let per_example = one(ConvWgradPerExample(wgrad.clone()), &[&a, &dy]);
        let squares = one(BatchMean, &[&one(Square, &[&per_example])]);
        let exact = scaled(&squares, n as f64);
        let a2g2 = one(wgrad.clone(), &[&one(Square, &[&a]), &one(Square, &[&dy])]);
        for (squares, expected) in [
            (Squares::None, None),
            (Squares::PerExample, Some(&exact)),
            (Squares::PerPosition, Some(&a2g2)),
        ] {
            let mut inputs = refs(&bn);
            inputs.push(&dy);
            let fused = FusedWgrad {
                wgrad: wgrad.clone(),
                prologue: Some(EPS),
                squares,
            };
            let out = run(fused, &inputs);
            same("weight gradient", &out[0], &dw);
            match expected {
                Some(e) => same(&format!("{squares:?}"), &out[1], e),
                None => assert_eq!(out.len(), 1),
            }
            let fused = FusedWgrad {
                wgrad: wgrad.clone(),
                prologue: None,
                squares,
            };
            let out = run(fused, &[&a, &dy]);
            same("weight gradient without prologue", &out[0], &dw);
        }
    }
}

/// The BN parameter reductions and their squares, by the basic ops.
fn bn_reductions_by_parts(du: &Value<f64>, bn: &[Value<f64>], squares: Squares) -> Vec<Value<f64>> {
    let n = du.shape()[0] as f64;
    let (y, mean, var) = (&bn[0], &bn[1], &bn[2]);
    let mut out = run(BnBackwardReduce { eps: EPS }, &[du, y, mean, var]);
    match squares {
        Squares::None => {}
        Squares::PerExample => {
            let per_example = run(BnParamGradsPerExample { eps: EPS }, &[du, y, mean, var]);
            for c in &per_example {
                out.push(scaled(&one(BatchMean, &[&one(Square, &[c])]), n));
            }
        }
        Squares::PerPosition => out.extend(run(BnParamGradsSq { eps: EPS }, &[du, y, mean, var])),
    }
    out
}

const ALL_SQUARES: [Squares; 3] = [Squares::None, Squares::PerExample, Squares::PerPosition];

/// The masked data gradient and its BN reductions: masked by the recomputed ReLU of the BN
/// below, or (`residual`, a residual block's input) the shortcut's gradient added and
/// masked by the ReLU's stored output.
#[test]
fn fused_dgrad_is_dgrad_relu_backward_and_bn_reductions() {
    for (case, &(k, stride, padding, size, c, o)) in CONV_SHAPES.iter().enumerate() {
        let mut r = rng(20 + case as u64);
        let bn = bn_inputs(&mut r, &[3, c, size, size]);
        let w = random(&mut r, &[o, c, k, k]);
        let conv = Conv2d {
            stride,
            padding,
            bias: false,
        };
        let dy = random(&mut r, one(conv, &[&bn[0], &w]).shape());
        let shortcut = random(&mut r, bn[0].shape());
        let relu_out = one(Relu, &[&random(&mut r, bn[0].shape())]);
        let dgrad = ConvDgrad {
            stride,
            padding,
            input_hw: (size, size),
        };
        let dx = one(dgrad.clone(), &[&dy, &w]);
        for residual in [false, true] {
            let mut inputs = vec![&dy, &w];
            let dz = if residual {
                inputs.extend(refs(&bn[..3]));
                inputs.extend([&shortcut, &relu_out]);
                let sum = one(Add, &[&dx, &shortcut]);
                one(ReluBackward, &[&sum, &relu_out])
            } else {
                inputs.extend(refs(&bn));
                one(ReluBackward, &[&dx, &bn_relu_by_parts(&bn)])
            };
            for squares in ALL_SQUARES {
                let fused = FusedDgrad {
                    dgrad: dgrad.clone(),
                    eps: EPS,
                    squares,
                    residual,
                };
                let out = run(fused, &inputs);
                same("masked data gradient", &out[0], &dz);
                let expected = bn_reductions_by_parts(&dz, &bn, squares);
                assert_eq!(out.len(), 1 + expected.len());
                for (i, e) in expected.iter().enumerate() {
                    let what = format!("{squares:?} residual {residual} output {}", i + 1);
                    same(&what, &out[i + 1], e);
                }
            }
        }
    }
}

#[test]
fn relu_backward_bn_reduce_is_relu_backward_then_bn_reductions() {
    for shape in [vec![3, 4, 5, 5], vec![5, 6]] {
        let mut r = rng(30);
        let bn = bn_inputs(&mut r, &shape);
        let out = bn_relu_by_parts(&bn);
        let dout = random(&mut r, &shape);
        let du = one(ReluBackward, &[&dout, &out]);
        for squares in ALL_SQUARES {
            let fused = ReluBackwardBnReduce { eps: EPS, squares };
            let got = run(fused, &[&dout, &out, &bn[0], &bn[1], &bn[2]]);
            same("masked gradient", &got[0], &du);
            for (i, e) in bn_reductions_by_parts(&du, &bn, squares).iter().enumerate() {
                same(&format!("{squares:?} output {}", i + 1), &got[i + 1], e);
            }
        }
    }
}

#[test]
fn bn_backward_reduce_sq_is_the_reductions_and_their_squares() {
    for shape in [vec![4, 3, 3, 5], vec![6, 5]] {
        let mut r = rng(40);
        let bn = bn_inputs(&mut r, &shape);
        let dy = random(&mut r, &shape);
        for squares in ALL_SQUARES {
            let got = run(
                BnBackwardReduceSq { eps: EPS, squares },
                &[&dy, &bn[0], &bn[1], &bn[2]],
            );
            let expected = bn_reductions_by_parts(&dy, &bn, squares);
            assert_eq!(got.len(), expected.len());
            for (g, e) in got.iter().zip(&expected) {
                same(&format!("{squares:?}"), g, e);
            }
        }
    }
}

#[test]
fn channel_sum_sq_is_the_bias_gradient_and_its_squares() {
    for shape in [vec![4, 3, 3, 5], vec![6, 5]] {
        let mut r = rng(50);
        let dy = random(&mut r, &shape);
        let n = shape[0] as f64;
        let sum = one(ChannelSum, &[&dy]);
        let per_example = one(ChannelSumPerExample, &[&dy]);
        let exact = scaled(&one(BatchMean, &[&one(Square, &[&per_example])]), n);
        let a2g2 = one(ChannelSum, &[&one(Square, &[&dy])]);
        for (squares, expected) in [
            (Squares::None, None),
            (Squares::PerExample, Some(exact)),
            (Squares::PerPosition, Some(a2g2)),
        ] {
            let got = run(ChannelSumSq { squares }, &[&dy]);
            same("bias gradient", &got[0], &sum);
            match expected {
                Some(e) => same(&format!("{squares:?}"), &got[1], &e),
                None => assert_eq!(got.len(), 1),
            }
        }
    }
}

#[test]
fn linear_wgrad_sq_is_the_gradient_and_its_per_example_squares() {
    let mut r = rng(60);
    let (x, dy) = (random(&mut r, &[5, 7]), random(&mut r, &[5, 3]));
    let got = run(LinearWgradSq, &[&x, &dy]);
    same("weight gradient", &got[0], &one(LinearWgrad, &[&x, &dy]));
    let per_example = one(LinearWgradPerExample, &[&x, &dy]);
    let squares = scaled(&one(BatchMean, &[&one(Square, &[&per_example])]), 5.0);
    same("squares", &got[1], &squares);
}

#[test]
fn bn_relu_is_bn_apply_then_relu_with_an_optional_residual() {
    let mut r = rng(70);
    let shape = [3, 4, 5, 5];
    let bn = bn_inputs(&mut r, &shape);
    let s = random(&mut r, &shape);
    same(
        "bn+relu",
        &one(
            BnRelu {
                eps: EPS,
                residual: false,
            },
            &refs(&bn),
        ),
        &bn_relu_by_parts(&bn),
    );
    let mut inputs = refs(&bn);
    inputs.push(&s);
    let applied = one(BnApply { eps: EPS }, &refs(&bn));
    let expected = one(Relu, &[&one(Add, &[&applied, &s])]);
    same(
        "bn+add+relu",
        &one(
            BnRelu {
                eps: EPS,
                residual: true,
            },
            &inputs,
        ),
        &expected,
    );
}

#[test]
fn elementwise_programs_compute_their_chain() {
    let mut r = rng(80);
    let (a, b, y) = (
        random(&mut r, &[3, 4, 5]),
        random(&mut r, &[3, 4, 5]),
        random(&mut r, &[3, 4, 5]),
    );
    // relu_mask(square(2.5·a + b), y)
    let program = vec![
        Instr::Input(0),
        Instr::Input(1),
        Instr::Input(2),
        Instr::Scale(0, FloatAttr(2.5)),
        Instr::Add(3, 1),
        Instr::Square(4),
        Instr::ReluMask(5, 2),
    ];
    let got = one(Elementwise { program }, &[&a, &b, &y]);
    let chain = one(Square, &[&one(Add, &[&scaled(&a, 2.5), &b])]);
    same("chain", &got, &one(ReluBackward, &[&chain, &y]));
    let relu = one(
        Elementwise {
            program: vec![Instr::Input(0), Instr::Relu(0)],
        },
        &[&a],
    );
    same("relu", &relu, &one(Relu, &[&a]));
}

/// An update that makes its Fisher estimate from the sum of squares is `scale` then the
/// update, the estimate its third output; only a diagonal estimate takes a factor.
#[test]
fn an_update_with_a_fisher_factor_is_scale_then_the_update() {
    let mut r = rng(60);
    let n = 37;
    let (theta, v, g) = (
        random(&mut r, &[n]),
        random(&mut r, &[n]),
        random(&mut r, &[n]),
    );
    let sums = Value::Float(uniform_in(&mut r, &[n], 0.0, 40.0));
    let scalar = |x: f64| Value::Float(Tensor::scalar(x));
    let hyper = [scalar(0.05), scalar(0.9), scalar(1e-3), scalar(0.7)];
    let (seed, step) = (Value::Word(42), Value::Word(7));
    let factor = 1.0 / 32.0;
    let estimate = scaled(&sums, factor);
    let with = |noise: &Value<f64>| {
        let mut inputs = vec![theta.clone(), v.clone(), g.clone()];
        inputs.extend(hyper.iter().cloned());
        inputs.extend([seed.clone(), step.clone(), noise.clone()]);
        inputs
    };
    let update = NoisySgdUpdate {
        param: 3,
        decay: true,
        noise: UpdateNoise::Diagonal,
        fisher_factor: None,
    };
    let plain = run(update.clone(), &refs(&with(&estimate)));
    let folded = NoisySgdUpdate {
        fisher_factor: Some(FloatAttr(factor)),
        ..update.clone()
    };
    let got = run(folded.clone(), &refs(&with(&sums)));
    assert_eq!(got.len(), 3);
    same("parameters", &got[0], &plain[0]);
    same("momenta", &got[1], &plain[1]);
    same("Fisher estimate", &got[2], &estimate);
    let scalar_noise = NoisySgdUpdate {
        noise: UpdateNoise::Scalar,
        ..folded
    };
    let variance = Value::Float(Tensor::filled(&[1], 2.0));
    let types: Vec<TensorType> = with(&variance)
        .iter()
        .map(|v| TensorType::new(v.shape().to_vec(), v.dtype()))
        .collect();
    let err = Op::from(scalar_noise)
        .infer(&types.iter().collect::<Vec<_>>())
        .unwrap_err()
        .to_string();
    assert!(err.contains("diagonal"), "{err}");
}

#[test]
fn malformed_fused_ops_are_shape_errors() {
    let x = TensorType::f32(&[2, 3, 4, 4]);
    let bad = Elementwise {
        program: vec![Instr::Input(0), Instr::Add(0, 5)],
    };
    assert!(
        Op::from(bad)
            .infer(&[&x])
            .unwrap_err()
            .to_string()
            .contains("reads a value it cannot see")
    );
    let c4 = TensorType::f32(&[4]);
    let relu = BnRelu {
        eps: EPS,
        residual: false,
    };
    let err = Op::from(relu)
        .infer(&[&x, &c4, &c4, &c4, &c4])
        .unwrap_err()
        .to_string();
    assert!(err.contains("mean: expected f32[3], found f32[4]"), "{err}");
    // a residual data gradient whose shortcut gradient is not the data gradient's shape
    let (dy, w, c3) = (
        TensorType::f32(&[2, 5, 4, 4]),
        TensorType::f32(&[5, 3, 3, 3]),
        TensorType::f32(&[3]),
    );
    let dgrad = FusedDgrad {
        dgrad: ConvDgrad {
            stride: 1,
            padding: 1,
            input_hw: (4, 4),
        },
        eps: EPS,
        squares: Squares::None,
        residual: true,
    };
    let fits = [&dy, &w, &x, &c3, &c3, &x, &x];
    assert_eq!(Op::from(dgrad.clone()).infer(&fits).unwrap().len(), 3);
    let short = TensorType::f32(&[2, 3, 4, 3]);
    let err = Op::from(dgrad)
        .infer(&[&dy, &w, &x, &c3, &c3, &short, &x])
        .unwrap_err()
        .to_string();
    assert!(err.contains("residual gradient"), "{err}");
}

/// A group of updates computes each member exactly as the member alone would, whatever mix of
/// decay, noise and Fisher factor it holds; its new parameters and momenta overwrite their
/// inputs, its Fisher estimates are new.
#[test]
fn an_update_group_is_each_member_alone() {
    let mut r = rng(61);
    let scalar = |x: f64| Value::Float(Tensor::scalar(x));
    let shared = vec![
        scalar(0.05),
        scalar(0.9),
        scalar(1e-3),
        scalar(0.7),
        Value::Word(42),
        Value::Word(7),
    ];
    let members = [
        (5, true, UpdateNoise::Diagonal, Some(FloatAttr(1.0 / 8.0))),
        (1, false, UpdateNoise::Diagonal, None),
        (17, true, UpdateNoise::None, None),
        (3, false, UpdateNoise::Scalar, None),
        (40, true, UpdateNoise::Vector, None),
    ];
    let mut group = NoisySgdUpdateGroup { members: vec![] };
    let mut inputs = shared.clone();
    let mut alone = Vec::new();
    for (param, (n, decay, noise, fisher_factor)) in members.into_iter().enumerate() {
        let update = NoisySgdUpdate {
            param: 2 * param as u32 + 1,
            decay,
            noise,
            fisher_factor,
        };
        let mut own = vec![
            random(&mut r, &[n]),
            random(&mut r, &[n]),
            random(&mut r, &[n]),
        ];
        match noise {
            UpdateNoise::None => {}
            UpdateNoise::Scalar => own.push(Value::Float(uniform_in(&mut r, &[1], 0.0, 2.0))),
            _ => own.push(Value::Float(uniform_in(&mut r, &[n], 0.0, 2.0))),
        }
        let mut member_inputs = own[..3].to_vec();
        member_inputs.extend(shared.iter().cloned());
        member_inputs.extend(own[3..].iter().cloned());
        alone.extend(run(update.clone(), &refs(&member_inputs)));
        inputs.extend(own);
        group.members.push(update);
    }
    let together = run(group.clone(), &refs(&inputs));
    assert_eq!(together.len(), alone.len());
    for (i, (a, b)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(a, b, "output {i}");
    }
    // θ' and v' of each member in place of its θ and v; the Fisher estimate (output 2) is new
    let op = Op::from(group.clone());
    let ports = group.ports();
    assert_eq!(op.in_place(0), Some(ports[0].inputs[NoisySgdUpdate::THETA]));
    assert_eq!(
        op.in_place(1),
        Some(ports[0].inputs[NoisySgdUpdate::VELOCITY])
    );
    assert_eq!(op.in_place(2), None);
    assert_eq!(op.in_place(3), Some(ports[1].inputs[NoisySgdUpdate::THETA]));
    assert_eq!(
        ports[1].inputs[NoisySgdUpdate::LR],
        0,
        "shared scalars first"
    );
    assert_eq!(op.in_place(together.len()), None);
}

#[test]
fn a_malformed_update_group_is_a_shape_error() {
    let f = |shape: &[usize]| TensorType::f32(shape);
    let (one_f32, word) = (f(&[]), TensorType::scalar(fisherc_ir::tensor::DType::U64));
    let member = NoisySgdUpdate {
        param: 4,
        decay: true,
        noise: UpdateNoise::None,
        fisher_factor: None,
    };
    let empty = Op::from(NoisySgdUpdateGroup { members: vec![] });
    assert!(
        empty
            .infer(&[])
            .unwrap_err()
            .to_string()
            .contains("no members")
    );
    let group = Op::from(NoisySgdUpdateGroup {
        members: vec![member.clone(), member],
    });
    let (a, b) = (f(&[3]), f(&[5]));
    let mut inputs = vec![&one_f32, &one_f32, &one_f32, &one_f32, &word, &word];
    inputs.extend([&a, &a, &a, &b, &b]);
    assert!(
        group
            .infer(&inputs)
            .unwrap_err()
            .to_string()
            .contains("expected 12 inputs")
    );
    inputs.push(&a);
    let err = group.infer(&inputs).unwrap_err().to_string();
    assert!(
        err.contains("parameter 4") && err.contains("gradient"),
        "{err}"
    );
}
