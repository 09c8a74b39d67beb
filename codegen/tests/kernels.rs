//! Every kernel kind on the CPU executor against its op's CPU reference (f64), on fresh random
//! inputs, over several shapes including ragged ones that do not divide the block size.
//! Bounds: 1e-6 relative for elementwise kernels, 1e-5 for reductions and convolutions (sums
//! in a different order), 1e-4 where approximate exp/log are used.

mod common;

use common::{check, check_with, labels, random, rng, uniform};
use fisherc_codegen::lower::{LowerOptions, SINGLE_TF32_ERROR};
use fisherc_codegen::options::{DEFAULT_STAGES, Precision};
use fisherc_ir::ops::*;

const ELEMENTWISE: f64 = 1e-6;

#[test]
fn pointwise_arithmetic_and_relu() {
    for shape in [vec![3, 5], vec![2, 3, 7, 9], vec![1, 1000]] {
        let mut r = rng(1);
        let (a, b) = (random(&mut r, &shape), random(&mut r, &shape));
        check(Add, &[a.clone(), b.clone()], ELEMENTWISE);
        check(
            Scale {
                factor: FloatAttr(-2.5),
            },
            std::slice::from_ref(&a),
            ELEMENTWISE,
        );
        check(Square, std::slice::from_ref(&a), ELEMENTWISE);
        check(Relu, std::slice::from_ref(&a), ELEMENTWISE);
        check(ReluBackward, &[a.clone(), b.clone()], ELEMENTWISE);
        let program = vec![
            Instr::Input(0),
            Instr::Input(1),
            Instr::Scale(0, FloatAttr(3.0)),
            Instr::Add(2, 1),
            Instr::ReluMask(3, 0),
        ];
        check(Elementwise { program }, &[a, b], ELEMENTWISE);
    }
}

#[test]
fn shortcut_pooling_backward_and_batch_mean() {
    let mut r = rng(2);
    for (c, size, stride, pad) in [(3, 5, 2, 2), (4, 8, 2, 0), (2, 7, 3, 1)] {
        let x = random(&mut r, &[2, c, size, size]);
        let op = ShortcutA {
            stride,
            pad_before: pad,
            pad_after: pad + 1,
        };
        check(op.clone(), &[x], ELEMENTWISE);
        let out = size.div_ceil(stride);
        let dy = random(&mut r, &[2, c + 2 * pad + 1, out, out]);
        check(
            ShortcutABackward {
                forward: op,
                input_shape: vec![2, c, size, size],
            },
            &[dy],
            ELEMENTWISE,
        );
    }
    check(
        GlobalAvgPoolBackward {
            height: 5,
            width: 3,
        },
        &[random(&mut r, &[3, 4])],
        ELEMENTWISE,
    );
    check(BatchMean, &[random(&mut r, &[7, 3, 5])], ELEMENTWISE);
    let _ = (labels(&mut r, 1, 2), uniform(&mut r, &[1], 0.0, 1.0));
}

const REDUCTION: f64 = 1e-5;

#[test]
fn channel_sums_and_their_squares() {
    let mut r = rng(3);
    // planes of a warp and (33×33) of a block; 530 examples: each thread of a per-channel
    // combine takes three
    for shape in [
        vec![3, 4, 5, 7],
        vec![6, 5],
        vec![2, 3, 17, 17],
        vec![2, 2, 33, 33],
        vec![530, 2, 3],
    ] {
        let dy = random(&mut r, &shape);
        check(ChannelSum, std::slice::from_ref(&dy), REDUCTION);
        check(ChannelSumPerExample, std::slice::from_ref(&dy), REDUCTION);
        for squares in [Squares::None, Squares::PerExample, Squares::PerPosition] {
            check(
                ChannelSumSq { squares },
                std::slice::from_ref(&dy),
                REDUCTION,
            );
        }
    }
}

/// (y, mean, biased var, γ, β) with realistic statistics for `shape`.
fn bn_inputs(
    r: &mut rand_chacha::ChaCha8Rng,
    shape: &[usize],
) -> Vec<fisherc_ir::tensor::Value<f32>> {
    use fisherc_ir::tensor::Value;
    let c = shape[1];
    let y = uniform(r, shape, -2.0, 3.0);
    let ones = Value::Float(fisherc_ir::tensor::Tensor::filled(&[c], 1.0f32));
    let zeros = Value::Float(fisherc_ir::tensor::Tensor::zeros(&[c]));
    let stats = common::reference(
        &BatchNorm {
            eps: FloatAttr(1e-5),
        }
        .into(),
        &[y.clone(), ones, zeros],
    );
    let narrow = |t: &fisherc_ir::tensor::Tensor<f64>| Value::Float(t.cast::<f32>());
    vec![
        y,
        narrow(&stats[1]),
        narrow(&stats[2]),
        uniform(r, &[c], 0.5, 1.5),
        random(r, &[c]),
    ]
}

const EPS: FloatAttr = FloatAttr(1e-5);

/// A ReLU's output of `shape`: about half zeros, the rest in (0, 1).
fn relu_output(r: &mut rand_chacha::ChaCha8Rng, shape: &[usize]) -> fisherc_ir::tensor::Value<f32> {
    let x = random(r, shape);
    let data = x.float().data.iter().map(|v| v.max(0.0)).collect();
    fisherc_ir::tensor::Value::Float(fisherc_ir::tensor::Tensor::from_vec(shape, data))
}

#[test]
fn batch_norm_forward_kernels() {
    let mut r = rng(4);
    for shape in [
        vec![4, 3, 5, 5],
        vec![6, 7],
        vec![2, 5, 9, 11],
        vec![3, 2, 17, 19],
        vec![2, 2, 33, 31],
        vec![530, 3],
    ] {
        let bn = bn_inputs(&mut r, &shape);
        check(
            BatchNorm { eps: EPS },
            &[bn[0].clone(), bn[3].clone(), bn[4].clone()],
            REDUCTION,
        );
        check(BnApply { eps: EPS }, &bn, REDUCTION);
        check(
            BnRelu {
                eps: EPS,
                residual: false,
            },
            &bn,
            REDUCTION,
        );
        let mut with_residual = bn.clone();
        with_residual.push(random(&mut r, &shape));
        check(
            BnRelu {
                eps: EPS,
                residual: true,
            },
            &with_residual,
            REDUCTION,
        );
        let c = shape[1];
        let running = [
            uniform(&mut r, &[c], -1.0, 1.0),
            uniform(&mut r, &[c], 0.5, 2.0),
        ];
        let update = BnRunningUpdate {
            momentum: FloatAttr(0.1),
            count: shape[0] * shape[2..].iter().product::<usize>(),
        };
        check(
            update,
            &[
                running[0].clone(),
                running[1].clone(),
                bn[1].clone(),
                bn[2].clone(),
            ],
            ELEMENTWISE,
        );
    }
}

#[test]
fn batch_norm_backward_kernels() {
    let mut r = rng(5);
    for shape in [
        vec![4, 3, 5, 5],
        vec![6, 7],
        vec![3, 4, 13, 3],
        vec![2, 3, 16, 17],
        vec![2, 2, 35, 33],
        vec![530, 2, 3],
    ] {
        let bn = bn_inputs(&mut r, &shape);
        let dy = random(&mut r, &shape);
        let stats = [dy.clone(), bn[0].clone(), bn[1].clone(), bn[2].clone()];
        check(BnBackwardReduce { eps: EPS }, &stats, REDUCTION);
        check(BnParamGradsPerExample { eps: EPS }, &stats, REDUCTION);
        check(BnParamGradsSq { eps: EPS }, &stats, REDUCTION);
        for squares in [Squares::None, Squares::PerExample, Squares::PerPosition] {
            check(BnBackwardReduceSq { eps: EPS, squares }, &stats, REDUCTION);
            let out = common::run_kernels(
                &BnRelu {
                    eps: EPS,
                    residual: false,
                }
                .into(),
                &bn,
            )
            .remove(0);
            let relu_inputs = [
                dy.clone(),
                fisherc_ir::tensor::Value::Float(out),
                bn[0].clone(),
                bn[1].clone(),
                bn[2].clone(),
            ];
            check(
                ReluBackwardBnReduce { eps: EPS, squares },
                &relu_inputs,
                REDUCTION,
            );
        }
        let sums = common::run_kernels(&BnBackwardReduce { eps: EPS }.into(), &stats);
        let data = [
            dy.clone(),
            bn[0].clone(),
            bn[1].clone(),
            bn[2].clone(),
            bn[3].clone(),
            fisherc_ir::tensor::Value::Float(sums[0].clone()),
            fisherc_ir::tensor::Value::Float(sums[1].clone()),
        ];
        check(BnBackwardData { eps: EPS }, &data, REDUCTION);
    }
}

#[test]
fn pooling_kernels() {
    let mut r = rng(6);
    for (size, kernel, stride) in [(6, 2, 2), (7, 2, 2), (7, 3, 2), (5, 3, 1), (33, 2, 2)] {
        let x = random(&mut r, &[2, 3, size, size]);
        let op = MaxPool { kernel, stride };
        check(op.clone(), std::slice::from_ref(&x), ELEMENTWISE);
        let out = (size - kernel) / stride + 1;
        let dy = random(&mut r, &[2, 3, out, out]);
        check(
            MaxPoolBackward { kernel, stride },
            &[dy, x.clone()],
            ELEMENTWISE,
        );
        check(GlobalAvgPool, &[x], REDUCTION);
    }
}

#[test]
fn linear_kernels() {
    let mut r = rng(7);
    for (n, i, o) in [(5, 7, 3), (1, 33, 10), (9, 4, 17), (3, 300, 5)] {
        let (x, w, b, dy) = (
            random(&mut r, &[n, i]),
            random(&mut r, &[o, i]),
            random(&mut r, &[o]),
            random(&mut r, &[n, o]),
        );
        check(Linear { bias: true }, &[x.clone(), w.clone(), b], REDUCTION);
        check(Linear { bias: false }, &[x.clone(), w.clone()], REDUCTION);
        check(LinearDgrad, &[dy.clone(), w], REDUCTION);
        check(LinearWgrad, &[x.clone(), dy.clone()], REDUCTION);
        check(LinearWgradPerExample, &[x.clone(), dy.clone()], ELEMENTWISE);
        check(LinearWgradSq, &[x, dy], REDUCTION);
    }
}

#[test]
fn loss_kernels() {
    let mut r = rng(8);
    for (n, classes) in [(5, 10), (300, 7), (2, 100)] {
        let logits = uniform(&mut r, &[n, classes], -4.0, 4.0);
        let y = labels(&mut r, n, classes);
        check(SoftmaxCrossEntropy, &[logits.clone(), y.clone()], 1e-5);
        let dloss = fisherc_ir::tensor::Value::Float(fisherc_ir::tensor::Tensor::scalar(1.0f32));
        check(SoftmaxCrossEntropyBackward, &[logits, y, dloss], 1e-5);
    }
}

#[test]
fn full_fisher_samples_draw_the_cpu_signs_and_labels() {
    let mut r = rng(10);
    let word = fisherc_ir::tensor::Value::<f32>::Word;
    for (n, classes, seed, step) in [
        (5, 10, 1, 0),
        (300, 7, 42 + (1 << 40), 3),
        (2, 100, 9, 1 << 33),
    ] {
        let logits = uniform(&mut r, &[n, classes], -4.0, 4.0);
        let y = labels(&mut r, n, classes);
        for kind in [FisherKind::Empirical, FisherKind::True] {
            // a wrong sign or label is an error of the whole row, far above the bound
            let inputs = [logits.clone(), y.clone(), word(seed), word(step)];
            check(FullFisherSample { kind }, &inputs, 1e-5);
        }
    }
}

fn scalar(v: f32) -> fisherc_ir::tensor::Value<f32> {
    fisherc_ir::tensor::Value::Float(fisherc_ir::tensor::Tensor::scalar(v))
}

#[test]
fn noisy_update_kernel_matches_the_formula() {
    let mut r = rng(9);
    // the last: a Fisher estimate made from its sum of squares (and written) in the update
    let cases = [
        (13, UpdateNoise::Diagonal, true, None),
        (1000, UpdateNoise::Diagonal, false, None),
        (7, UpdateNoise::None, true, None),
        (300, UpdateNoise::Scalar, true, None),
        (301, UpdateNoise::Vector, true, None),
        (
            333,
            UpdateNoise::Diagonal,
            true,
            Some(FloatAttr(1.0 / 96.0)),
        ),
    ];
    for (n, noise, decay, fisher_factor) in cases {
        let mut inputs = vec![
            random(&mut r, &[n]),
            random(&mut r, &[n]),
            random(&mut r, &[n]),
        ];
        inputs.extend([scalar(0.05), scalar(0.9), scalar(1e-3), scalar(0.7)]);
        inputs.extend([
            fisherc_ir::tensor::Value::Word(42 + (1 << 40)),
            fisherc_ir::tensor::Value::Word(3),
        ]);
        match noise {
            UpdateNoise::None => {}
            UpdateNoise::Scalar => inputs.push(uniform(&mut r, &[1], 0.0, 2.0)),
            UpdateNoise::Diagonal => inputs.push(uniform(&mut r, &[n], 0.0, 2.0)),
            UpdateNoise::Vector => inputs.push(random(&mut r, &[n])),
        }
        check(
            NoisySgdUpdate {
                param: 7,
                decay,
                noise,
                fisher_factor,
            },
            &inputs,
            ELEMENTWISE,
        );
    }
}

#[test]
fn kernel_noise_is_bit_identical_to_the_cpu_stream() {
    // θ' = θ − lr·(μ·v + g + s·√F·ξ) with θ = v = g = μ = 0, lr = −1, s = F = 1 is ξ itself
    let n = 4099;
    let zeros = || fisherc_ir::tensor::Value::Float(fisherc_ir::tensor::Tensor::zeros(&[n]));
    let ones = fisherc_ir::tensor::Value::Float(fisherc_ir::tensor::Tensor::filled(&[n], 1.0f32));
    let (seed, step, param) = (0xDEAD_BEEF_0000_0007u64, (1u64 << 33) + 5, 11);
    let inputs = vec![
        zeros(),
        zeros(),
        zeros(),
        scalar(-1.0),
        scalar(0.0),
        scalar(0.0),
        scalar(1.0),
        fisherc_ir::tensor::Value::Word(seed),
        fisherc_ir::tensor::Value::Word(step),
        ones,
    ];
    let got = common::run_kernels(
        &NoisySgdUpdate {
            param,
            decay: false,
            noise: UpdateNoise::Diagonal,
            fisher_factor: None,
        }
        .into(),
        &inputs,
    );
    let mut xi = vec![0.0f32; n];
    fisherc_ir::philox::fill_normal(seed, step, param, &mut xi);
    for (i, (g, e)) in got[0].data.iter().zip(&xi).enumerate() {
        assert_eq!(g.to_bits(), e.to_bits(), "element {i}: kernel {g}, CPU {e}");
    }
}

/// A convolution to test: (kernel, stride, padding, size, in channels, out channels).
type ConvShape = (usize, usize, usize, usize, usize, usize);

/// (kernel, stride, padding, size, in channels, out channels); two have planes of more than
/// one block of positions with a ragged tail (17·17 = 289 = 256 + 33); one has a 7×7 kernel.
const CONVS: [ConvShape; 8] = [
    (3, 1, 1, 6, 3, 4),
    (3, 2, 1, 7, 2, 5),
    (1, 2, 0, 5, 4, 3),
    (3, 1, 0, 5, 3, 2),
    (1, 1, 0, 4, 3, 3),
    (3, 1, 1, 17, 2, 3),
    (3, 2, 1, 33, 2, 2),
    (7, 2, 3, 9, 2, 3),
];

/// Wider ones for the GEMM tiles of forward (columns: channels out), data gradient (columns:
/// channels in) and weight gradient (rows: channels out, columns: c·kh·kw): several tiles
/// (70 = 64 + 6), the 32-wide tile (33), the 16-wide one with K = 17 (two full K slices and a
/// ragged one). The last four have channel counts that fill 16-deep K slices, so K runs
/// grouped, a slice per tap of 16 channels (forward: channels in, all four; data gradient:
/// channels out, the first three), strided, 1×1 and 5×5 among them.
const WIDE_CONVS: [ConvShape; 8] = [
    (3, 1, 1, 9, 5, 70),
    (3, 2, 1, 10, 9, 33),
    (1, 1, 0, 20, 17, 12),
    (3, 1, 1, 6, 70, 3),
    (3, 1, 1, 9, 16, 32),
    (3, 2, 1, 10, 32, 16),
    (1, 2, 0, 9, 16, 48),
    (5, 1, 2, 6, 16, 5),
];

/// A convolution's kernels on fp32 FMA and on TF32 tensor cores: 3xTF32 within the same
/// bound (pipelined as by default, and three slices deep), one TF32 product within
/// `SINGLE_TF32_ERROR`.
fn check_conv(op: impl Into<Op>, inputs: &[fisherc_ir::tensor::Value<f32>], tolerance: f64) {
    let op = op.into();
    for (precision, stages, tolerance) in [
        (Precision::Fp32, DEFAULT_STAGES, tolerance),
        (Precision::Tf32x3, DEFAULT_STAGES, tolerance),
        (Precision::Tf32x3, 3, tolerance),
        (Precision::Tf32, DEFAULT_STAGES, SINGLE_TF32_ERROR),
    ] {
        let options = LowerOptions { precision, stages };
        check_with(op.clone(), inputs, tolerance, options);
    }
}

fn conv_out(size: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    (size + 2 * padding - kernel) / stride + 1
}

#[test]
fn convolution_forward_kernels() {
    let mut r = rng(10);
    for &(kernel, stride, padding, size, c, o) in CONVS.iter().chain(&WIDE_CONVS) {
        check_forward(&mut r, (kernel, stride, padding, size, c, o), 2);
    }
}

/// Forward convolutions whose tiles hold whole output rows, or whole examples, stage the
/// input halo, a group of channels at a time (kernel, stride, padding, size, in channels, out
/// channels; batch): one group on tensor cores (two on fp32 FMA) in a 256-row tile of 16
/// rows; groups in two halves (32 and 64 channels); strided (a 17 × 17 halo); 5×5; four row
/// tiles of a 32 × 32 plane; rows over the batch, 4 × 4 planes (4 examples to a 64-row tile,
/// batch 6: the second tile half past the batch), strided, and 2 × 2 planes.
const HALO_CONVS: [(ConvShape, usize); 9] = [
    ((3, 1, 1, 16, 16, 16), 1),
    ((3, 1, 1, 16, 32, 32), 1),
    ((3, 1, 1, 8, 64, 64), 1),
    ((3, 2, 1, 16, 16, 64), 1),
    ((5, 1, 2, 8, 16, 64), 1),
    ((3, 1, 1, 32, 16, 16), 1),
    ((3, 1, 1, 4, 32, 64), 6),
    ((3, 2, 1, 8, 16, 64), 5),
    ((3, 1, 1, 2, 16, 64), 20),
];

#[test]
fn forward_convolutions_from_the_input_halo() {
    let mut r = rng(13);
    for &(shape, batch) in &HALO_CONVS {
        check_forward(&mut r, shape, batch);
    }
}

/// A forward convolution's kernels, plain and fused (prologue or not, statistics or not),
/// with and without bias.
fn check_forward(
    r: &mut rand_chacha::ChaCha8Rng,
    (kernel, stride, padding, size, c, o): ConvShape,
    batch: usize,
) {
    {
        let bn = bn_inputs(r, &[batch, c, size, size]);
        let (w, b) = (random(r, &[o, c, kernel, kernel]), random(r, &[o]));
        for bias in [false, true] {
            let conv = Conv2d {
                stride,
                padding,
                bias,
            };
            let mut plain = vec![bn[0].clone(), w.clone()];
            if bias {
                plain.push(b.clone());
            }
            check_conv(conv.clone(), &plain, REDUCTION);
            let mut with_prologue = bn.clone();
            with_prologue.extend(plain[1..].iter().cloned());
            for stats in [false, true] {
                // the statistics epilogue sums y and y² in one pass, hence the looser bound
                check_conv(
                    FusedConv {
                        conv: conv.clone(),
                        prologue: Some(EPS),
                        stats,
                    },
                    &with_prologue,
                    1e-4,
                );
                check_conv(
                    FusedConv {
                        conv: conv.clone(),
                        prologue: None,
                        stats,
                    },
                    &plain,
                    1e-4,
                );
            }
        }
    }
}

/// Data gradients whose planes divide a tile run their rows over the batch, and the exact
/// Fisher's per-example BN sums come from each tile's segments: several tiles of whole
/// examples here (8·8 = 64 positions, 4 examples to a 256-row tile; batch 6: the second tile
/// half past the batch), gathered (3 channels: on tensor cores the slices narrow to fit the
/// segments in shared memory) and from dy's halo (16 channels), the 2×2 plane of a wider
/// layer (16 examples to a 64-row tile), and a 4×4 plane with 32 channels out (K grouped, a
/// slice per tap of 16 channels, as VGG16's 512-channel layers).
#[test]
fn data_gradients_over_the_batch_sum_each_example_apart() {
    let mut r = rng(12);
    for (size, c, o, batch) in [(8, 3, 4, 6), (8, 16, 16, 6), (2, 40, 8, 21), (4, 24, 32, 7)] {
        let bn = bn_inputs(&mut r, &[batch, c, size, size]);
        let w = random(&mut r, &[o, c, 3, 3]);
        let dy = random(&mut r, &[batch, o, size, size]);
        let dgrad = ConvDgrad {
            stride: 1,
            padding: 1,
            input_hw: (size, size),
        };
        let squares = [Squares::PerExample, Squares::PerPosition];
        check_fused_dgrads(&dgrad, (&dy, &w), &bn, &squares);
    }
}

#[test]
fn convolution_gradient_kernels() {
    let mut r = rng(11);
    // batch 1: one chunk, written directly; batch 3: a chunk per example, summed after
    for (&(kernel, stride, padding, size, c, o), batch) in CONVS
        .iter()
        .chain(&WIDE_CONVS)
        .zip([3, 1].into_iter().cycle())
    {
        let out = conv_out(size, kernel, stride, padding);
        let bn = bn_inputs(&mut r, &[batch, c, size, size]);
        let (w, dy) = (
            random(&mut r, &[o, c, kernel, kernel]),
            random(&mut r, &[batch, o, out, out]),
        );
        check_dgrad(&bn, (&dy, &w), (stride, padding, size));
        check_wgrad(&bn, &dy, (kernel, stride, padding));
    }
    // batch 21: 21 chunks, each of a block's 8 row groups adding two or three
    let (kernel, stride, padding, size, c, o) = (3, 1, 1, 4, 3, 5);
    let bn = bn_inputs(&mut r, &[21, c, size, size]);
    let dy = random(&mut r, &[21, o, size, size]);
    check_wgrad(&bn, &dy, (kernel, stride, padding));
}

/// The data-gradient kernels of `dy` and `w`: plain, and fused with the BN backward of `bn`
/// and each kind of squares.
fn check_dgrad(
    bn: &[fisherc_ir::tensor::Value<f32>],
    (dy, w): (
        &fisherc_ir::tensor::Value<f32>,
        &fisherc_ir::tensor::Value<f32>,
    ),
    (stride, padding, size): (usize, usize, usize),
) {
    let dgrad = ConvDgrad {
        stride,
        padding,
        input_hw: (size, size),
    };
    check_conv(dgrad.clone(), &[dy.clone(), w.clone()], REDUCTION);
    let squares = [Squares::None, Squares::PerExample, Squares::PerPosition];
    check_fused_dgrads(&dgrad, (dy, w), bn, &squares);
}

/// The fused data-gradient kernels of `dy` and `w` with each of `squares` over the BN of
/// `bn`: masked by its recomputed ReLU, and as at a residual block's input, the shortcut's
/// gradient added and masked by a stored ReLU output (half zeros).
fn check_fused_dgrads(
    dgrad: &ConvDgrad,
    (dy, w): (
        &fisherc_ir::tensor::Value<f32>,
        &fisherc_ir::tensor::Value<f32>,
    ),
    bn: &[fisherc_ir::tensor::Value<f32>],
    squares: &[Squares],
) {
    let mut r = rng(bn[0].float().data.len() as u64);
    let shortcut = random(&mut r, bn[0].shape());
    let relu_out = relu_output(&mut r, bn[0].shape());
    for &squares in squares {
        for residual in [false, true] {
            let mut inputs = vec![dy.clone(), w.clone()];
            if residual {
                inputs.extend(bn[..3].iter().cloned());
                inputs.extend([shortcut.clone(), relu_out.clone()]);
            } else {
                inputs.extend(bn.iter().cloned());
            }
            let op = FusedDgrad {
                dgrad: dgrad.clone(),
                eps: EPS,
                squares,
                residual,
            };
            check_conv(op, &inputs, REDUCTION);
        }
    }
}

/// Stride-1 data gradients whose tiles hold whole input rows, and whose output channels fit
/// one group of a K slice (16 on tensor cores), stage dy's halo (kernel, stride, padding,
/// size, in channels, out channels): a 256-row tile; 64- and 48-row tiles (64 and 48 input
/// channels); no padding (the halo starts two rows above the tile's); 5×5; four row tiles of
/// a 32 × 32 plane.
const DGRAD_HALO_CONVS: [ConvShape; 6] = [
    (3, 1, 1, 16, 16, 16),
    (3, 1, 1, 16, 48, 16),
    (3, 1, 1, 8, 64, 16),
    (3, 1, 0, 16, 16, 16),
    (5, 1, 2, 16, 16, 16),
    (3, 1, 1, 32, 16, 16),
];

#[test]
fn data_gradients_from_the_dy_halo() {
    let mut r = rng(14);
    for &(kernel, stride, padding, size, c, o) in &DGRAD_HALO_CONVS {
        let out = conv_out(size, kernel, stride, padding);
        let bn = bn_inputs(&mut r, &[1, c, size, size]);
        let (w, dy) = (
            random(&mut r, &[o, c, kernel, kernel]),
            random(&mut r, &[1, o, out, out]),
        );
        check_dgrad(&bn, (&dy, &w), (stride, padding, size));
    }
}

/// The weight-gradient kernels of input `bn[0]` (with the BN prologue of `bn`) and `dy`:
/// plain, per example, and fused with each kind of squares, with and without the prologue.
fn check_wgrad(
    bn: &[fisherc_ir::tensor::Value<f32>],
    dy: &fisherc_ir::tensor::Value<f32>,
    (kernel, stride, padding): (usize, usize, usize),
) {
    let wgrad = ConvWgrad {
        stride,
        padding,
        kernel: (kernel, kernel),
    };
    check_conv(wgrad.clone(), &[bn[0].clone(), dy.clone()], REDUCTION);
    check_conv(
        ConvWgradPerExample(wgrad.clone()),
        &[bn[0].clone(), dy.clone()],
        REDUCTION,
    );
    for squares in [Squares::None, Squares::PerExample, Squares::PerPosition] {
        check_conv(
            FusedWgrad {
                wgrad: wgrad.clone(),
                prologue: None,
                squares,
            },
            &[bn[0].clone(), dy.clone()],
            REDUCTION,
        );
        let mut inputs = bn.to_vec();
        inputs.push(dy.clone());
        check_conv(
            FusedWgrad {
                wgrad: wgrad.clone(),
                prologue: Some(EPS),
                squares,
            },
            &inputs,
            REDUCTION,
        );
    }
}

/// Weight gradients whose K slices (8 positions, 16 on tensor cores) are parts of output rows
/// or whole rows stage the input patch (kernel, stride, padding, size, in channels, out
/// channels): few channels, 8 wide (one row of a slice, or two); strided (a 17-wide patch);
/// several tiles whose edges split a channel's taps (360 columns in tiles of 128); a 5×5
/// kernel; 24 channels in the 256-wide tile; 4 wide (slices of 2 and 4 rows), one strided;
/// 64 channels out (64 × 64 tiles: 16 channels' 144 columns in three).
const PATCH_CONVS: [ConvShape; 9] = [
    (3, 1, 1, 8, 3, 4),
    (3, 2, 1, 16, 5, 6),
    (3, 1, 1, 16, 40, 32),
    (5, 1, 2, 8, 7, 20),
    (3, 1, 1, 8, 24, 16),
    (3, 2, 1, 16, 16, 32),
    (3, 1, 1, 4, 6, 8),
    (3, 2, 1, 8, 12, 24),
    (3, 1, 1, 8, 16, 64),
];

#[test]
fn weight_gradients_from_the_input_patch() {
    let mut r = rng(12);
    for (&(kernel, stride, padding, size, c, o), batch) in
        PATCH_CONVS.iter().zip([2, 1].into_iter().cycle())
    {
        let out = conv_out(size, kernel, stride, padding);
        assert!(
            out.is_multiple_of(8) || 8usize.is_multiple_of(out),
            "slices of whole rows or rows of whole slices"
        );
        let bn = bn_inputs(&mut r, &[batch, c, size, size]);
        let dy = random(&mut r, &[batch, o, out, out]);
        check_wgrad(&bn, &dy, (kernel, stride, padding));
    }
}

/// Runs a group's kernels: `launches` of them, every output bit for bit the CPU's (which is
/// each member's alone), every element written (outputs start as NaN).
fn check_group_bits(
    op: Op,
    inputs: &[fisherc_ir::tensor::Value<f32>],
    launches: usize,
    what: &str,
) {
    use fisherc_codegen::lower::{Lowered, lower};
    use fisherc_ir::tensor::TensorType;
    let types: Vec<TensorType> = inputs
        .iter()
        .map(|v| TensorType::new(v.shape().to_vec(), v.dtype()))
        .collect();
    let refs: Vec<&TensorType> = types.iter().collect();
    let outputs = op.infer(&refs).unwrap();
    let Lowered::Kernels { launches: got, .. } =
        lower(&op, &refs, &outputs, LowerOptions::default()).unwrap()
    else {
        panic!("{what}: a group lowers to kernels")
    };
    assert_eq!(got.len(), launches, "{what}: launches");
    let want = op
        .eval(&inputs.iter().collect::<Vec<_>>(), &outputs)
        .unwrap();
    let got = common::run_kernels(&op, inputs);
    for (port, (g, w)) in got.iter().zip(&want).enumerate() {
        let w = &w.float().data;
        let differ = g
            .data
            .iter()
            .zip(w)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(differ, None, "{what}: output {port}");
    }
}

/// 150 parameters' updates as one group: alike members (decay, noise, Fisher factor) share a
/// launch, as many as a launch's parameter space holds; sizes from one element to several
/// blocks with ragged tails.
#[test]
fn grouped_update_kernels_match_the_cpu_bit_for_bit() {
    use fisherc_ir::tensor::Value;
    let mut r = rng(10);
    let sizes = [1, 16, 64, 255, 256, 257, 1000, 2305];
    // launches: 100 members decay, 50 do not; a launch holds (4096 − 6·8) / (8·pointers) of
    // them: 72 at 7 pointers a member, 84 at 6, 101 at 5 (no noise input); members of two
    // Fisher factors (the last case) do not share a launch: 50, 50, 25 and 25 alike
    let (f1, f2) = (Some(FloatAttr(1.0 / 96.0)), Some(FloatAttr(1.0 / 32.0)));
    let cases = [
        (UpdateNoise::Diagonal, [f1, f1], 3),
        (UpdateNoise::Diagonal, [None, None], 3),
        (UpdateNoise::None, [None, None], 2),
        (UpdateNoise::Scalar, [None, None], 3),
        (UpdateNoise::Vector, [None, None], 3),
        (UpdateNoise::Diagonal, [f1, f2], 4),
    ];
    for (noise, factors, launches) in cases {
        let mut inputs = vec![scalar(0.05), scalar(0.9), scalar(1e-3), scalar(0.7)];
        inputs.extend([Value::Word(42 + (1 << 40)), Value::Word(3)]);
        let mut members = Vec::new();
        for j in 0..150 {
            let n = sizes[j % sizes.len()];
            members.push(NoisySgdUpdate {
                param: 3 * j as u32 + 1,
                decay: j % 3 != 0,
                noise,
                fisher_factor: factors[j % 2],
            });
            inputs.extend([
                random(&mut r, &[n]),
                random(&mut r, &[n]),
                random(&mut r, &[n]),
            ]);
            match noise {
                UpdateNoise::None => {}
                UpdateNoise::Scalar => inputs.push(uniform(&mut r, &[1], 0.0, 2.0)),
                _ => inputs.push(uniform(&mut r, &[n], 0.0, 2.0)),
            }
        }
        let what = format!("{noise:?} noise, factors {factors:?}");
        check_group_bits(
            NoisySgdUpdateGroup { members }.into(),
            &inputs,
            launches,
            &what,
        );
    }
}

/// 90 BN layers' running statistics as one group: 84 to a launch (6 pointers each), each
/// layer its own momentum and count; from 1 to 600 channels.
#[test]
fn grouped_running_statistics_kernels_match_the_cpu_bit_for_bit() {
    let mut r = rng(11);
    let mut members = Vec::new();
    let mut inputs = Vec::new();
    for j in 0..90 {
        let channels = [1, 16, 64, 256, 257, 600][j % 6];
        members.push(BnRunningUpdate {
            momentum: FloatAttr([0.1, 0.01, 0.3][j % 3]),
            count: 1 + 37 * j,
        });
        inputs.extend([
            uniform(&mut r, &[channels], -1.0, 1.0),
            uniform(&mut r, &[channels], 0.5, 2.0),
            uniform(&mut r, &[channels], -1.0, 1.0),
            uniform(&mut r, &[channels], 0.1, 3.0),
        ]);
    }
    check_group_bits(
        BnRunningUpdateGroup { members }.into(),
        &inputs,
        2,
        "running statistics",
    );
}
