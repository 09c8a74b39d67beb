//! K-FAC in the training step on the reference interpreter: which parameters take which
//! noise, when the factors refresh, how the running average and the Cholesky factors follow
//! them, and that the update adds exactly `s·√T·L_G Ξ L_Aᵀ`.

use std::path::Path;

use fisherc_ir::graph::{Output, PortRef};
use fisherc_ir::interp::{Evaluation, Feeds, evaluate};
use fisherc_ir::kfac::{Matrix, draw_xi, shape_noise};
use fisherc_ir::model::{BuildOptions, ModelSpec, ParamKind, build};
use fisherc_ir::ops::Op;
use fisherc_ir::state::kfac::{KfacSettings, KfacState};
use fisherc_ir::state::{Hyperparams, TrainState};
use fisherc_ir::synthetic::random_batch;
use fisherc_ir::tensor::Tensor;
use fisherc_ir::{Noise, StepOptions, TrainingStep, build_training_step};

fn kfac_step(batch: usize) -> TrainingStep {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/small_cnn.toml");
    let spec = ModelSpec::load(&path).unwrap();
    let options = BuildOptions {
        input: Some([1, 12, 12]),
        ..BuildOptions::train(batch)
    };
    let net = build(&spec, &options).unwrap();
    build_training_step(net, &StepOptions::with_noise(Noise::Kfac)).unwrap()
}

fn run(step: &TrainingStep, feeds: &Feeds<f32>) -> Evaluation<f32> {
    evaluate(&step.graph, feeds, &[]).unwrap()
}

fn tensor(e: &Evaluation<f32>, o: &Output) -> Tensor<f32> {
    e.output(o).unwrap().float().clone()
}

/// Every convolution and linear layer is a K-FAC layer (its weight and bias read noise
/// vectors, and take no diagonal estimate); batch norm's γ and β keep the diagonal one.
#[test]
fn conv_and_linear_layers_take_kfac_and_batch_norm_the_diagonal() {
    let step = kfac_step(4);
    let kfac = KfacState::for_step(&step, KfacSettings::default());
    let weights: Vec<usize> = kfac.layers.iter().map(|l| l.weight).collect();
    let params = &step.network.params;
    let expected: Vec<usize> = (0..params.len())
        .filter(|&i| {
            matches!(
                params[i].kind,
                ParamKind::ConvWeight | ParamKind::LinearWeight
            )
        })
        .collect();
    assert_eq!(weights, expected);
    for (i, p) in params.iter().enumerate() {
        let diagonal = step.graph.output(&Output::Fisher(i)).is_some();
        assert_eq!(diagonal, p.kind.is_batch_norm(), "{}", p.name);
    }
}

/// Factors come out only on refreshing steps (every `every`-th, step 0 included), zeros
/// else; the running average takes the first as it is and blends the later ones with
/// `decay^every`; the Cholesky factors fed next multiply back to the running factors damped by λ
/// times their mean diagonal. Before the first refresh the Cholesky factors are zero.
#[test]
fn factors_refresh_every_few_steps_and_average_with_decay() {
    let step = kfac_step(4);
    // 0.75 a refresh of every 2 steps
    let settings = KfacSettings {
        damping: 0.01,
        every: 2,
        decay: 0.75f64.sqrt(),
    };
    let mut kfac = KfacState::for_step(&step, settings);
    for layer in &kfac.layers {
        assert!(
            layer
                .cholesky
                .iter()
                .all(|l| l.data.iter().all(|&v| v == 0.0))
        );
    }
    let net = &step.network;
    let state = TrainState::<f32>::init(net, 1);
    let mut expected: Option<Vec<Vec<f64>>> = None;
    for counter in 0..5u64 {
        let refresh = kfac.refreshes(counter);
        assert_eq!(refresh, counter % 2 == 0, "step {counter}");
        let (images, labels) = random_batch::<f32>(4, net.input, net.classes, 10 + counter);
        let hyper = Hyperparams {
            noise_scale: 0.1,
            step: counter,
            ..Hyperparams::default()
        };
        let mut feeds = state.feeds(images, labels, &hyper);
        feeds.extend(kfac.feeds(refresh));
        let e = run(&step, &feeds);
        let factors: Vec<Tensor<f32>> = kfac.outputs().iter().map(|o| tensor(&e, o)).collect();
        let zero = factors.iter().all(|f| f.data.iter().all(|&v| v == 0.0));
        assert_eq!(zero, !refresh, "step {counter}");
        if !refresh {
            continue;
        }
        let new: Vec<Vec<f64>> = factors
            .iter()
            .map(|f| f.data.iter().map(|&v| v as f64).collect())
            .collect();
        expected = Some(match expected {
            None => new,
            Some(old) => old
                .iter()
                .zip(&new)
                .map(|(o, n)| o.iter().zip(n).map(|(o, n)| 0.75 * o + 0.25 * n).collect())
                .collect(),
        });
        kfac.absorb(factors).unwrap();
        let want = expected.as_ref().unwrap();
        for (l, layer) in kfac.layers.iter().enumerate() {
            let running = layer.running.as_ref().unwrap();
            for side in 0..2 {
                let got = &running[side].data;
                let want = &want[2 * l + side];
                let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
                for (g, w) in got.iter().zip(want) {
                    // kept in f32
                    assert!(
                        (*g as f64 - w).abs() <= 1e-6 * scale,
                        "layer {l} side {side}"
                    );
                }
                let l_factor = &layer.cholesky[side];
                let n = l_factor.shape[0];
                // λ relative to the factor's mean diagonal
                let damping = 0.01 * (0..n).map(|i| got[i * n + i] as f64).sum::<f64>() / n as f64;
                for i in 0..n {
                    for j in 0..=i {
                        let product: f64 = (0..=j)
                            .map(|k| {
                                l_factor.data[i * n + k] as f64 * l_factor.data[j * n + k] as f64
                            })
                            .sum();
                        let damped = got[i * n + j] as f64 + if i == j { damping } else { 0.0 };
                        assert!(
                            (product - damped).abs() <= 1e-5 * scale,
                            "layer {l} side {side} ({i}, {j}): {product} vs {damped}"
                        );
                    }
                }
            }
        }
    }
}

/// The update moves each K-FAC parameter by `−lr·s·e` beside the noiseless step, `e` the
/// reference's `√T·L_G Ξ L_Aᵀ` of this step's Philox draw: K-FAC noise, not the diagonal.
#[test]
fn the_update_adds_the_kronecker_shaped_draw() {
    let step = kfac_step(4);
    let net = &step.network;
    let state = TrainState::<f32>::init(net, 2);
    let (images, labels) = random_batch::<f32>(4, net.input, net.classes, 3);
    let base = state.feeds(images.clone(), labels.clone(), &Hyperparams::default());
    let kfac = KfacState::refreshed_on(&step, &base, KfacSettings::default()).unwrap();
    let (lr, s) = (0.1f32, 0.5f32);
    let with = |noise_scale: f32| {
        let hyper = Hyperparams {
            learning_rate: lr,
            momentum: 0.0,
            weight_decay: 0.0,
            noise_scale,
            seed: 5,
            step: 7,
        };
        let mut feeds = state.feeds(images.clone(), labels.clone(), &hyper);
        feeds.extend(kfac.feeds(false));
        run(&step, &feeds)
    };
    let (noisy, plain) = (with(s), with(0.0));
    for layer in &kfac.layers {
        let weight = &net.params[layer.weight];
        let (rows, cols) = (weight.shape[0], weight.numel() / weight.shape[0]);
        let bias = net
            .params
            .get(layer.weight + 1)
            .filter(|p| p.kind == ParamKind::LinearBias)
            .map(|_| layer.weight + 1);
        let cols = cols + bias.is_some() as usize;
        let matrix = |t: &Tensor<f32>| Matrix {
            n: t.shape[0],
            data: t.data.iter().map(|&v| v as f64).collect(),
        };
        let (l_a, l_g) = (matrix(&layer.cholesky[0]), matrix(&layer.cholesky[1]));
        let positions = match weight.kind {
            ParamKind::ConvWeight => {
                let readers = step.graph.consumers(PortRef::new(weight.node, 0));
                let (conv, _) = readers
                    .into_iter()
                    .find(|(n, _)| matches!(step.graph.node(*n).op, Op::Conv2d(_)))
                    .unwrap();
                step.graph.ty(PortRef::new(conv, 0)).shape[2..]
                    .iter()
                    .product()
            }
            _ => 1,
        };
        let xi = draw_xi::<f64>(
            (5, 7),
            (layer.weight as u32, bias.map(|b| b as u32)),
            (rows, cols),
        );
        let e = shape_noise((&l_g, &l_a), &xi, positions, s as f64).unwrap();
        let moved = |i: usize| -> Vec<f64> {
            let (a, b) = (
                tensor(&noisy, &Output::NewParam(i)),
                tensor(&plain, &Output::NewParam(i)),
            );
            a.data
                .iter()
                .zip(&b.data)
                .map(|(a, b)| (*b - *a) as f64 / lr as f64)
                .collect()
        };
        let weight_cols = cols - bias.is_some() as usize;
        let want_w: Vec<f64> = (0..rows)
            .flat_map(|i| e[i * cols..][..weight_cols].to_vec())
            .collect();
        let scale = e.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
        let got_w = moved(layer.weight);
        for (g, w) in got_w.iter().zip(&want_w) {
            assert!((g - w).abs() <= 1e-3 * scale, "{}: {g} vs {w}", weight.name);
        }
        if let Some(b) = bias {
            let want_b: Vec<f64> = (0..rows).map(|i| e[i * cols + cols - 1]).collect();
            for (g, w) in moved(b).iter().zip(&want_b) {
                assert!(
                    (g - w).abs() <= 1e-3 * scale,
                    "{} bias: {g} vs {w}",
                    weight.name
                );
            }
        }
    }
}
