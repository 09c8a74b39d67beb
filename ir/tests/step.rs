//! The whole training step on the reference interpreter: gradients of real models against
//! finite differences, the noisy update against its formula, running statistics, evaluation
//! mode, f32 against f64, and repeatability across thread counts.

mod common;

use std::path::Path;

use common::{assert_close, rng, uniform};
use fisherc_ir::graph::{Output, PortRef};
use fisherc_ir::interp::{Evaluation, evaluate};
use fisherc_ir::model::{BuildOptions, Mode, ModelSpec, Network, ParamKind, build};
use fisherc_ir::ops::{Input, Role, SoftmaxCrossEntropy};
use fisherc_ir::philox;
use fisherc_ir::state::{Hyperparams, TrainState, default_noise_scale};
use fisherc_ir::synthetic::random_batch;
use fisherc_ir::tensor::{Real, Tensor, TensorType, Value};
use fisherc_ir::{FisherMode, StepOptions, TrainingStep, build_training_step};
use rand::RngExt;

fn model_file(name: &str) -> ModelSpec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(format!("{name}.toml"));
    ModelSpec::load(&path).unwrap()
}

fn network(name: &str, batch: usize, input: [usize; 3], shortcut: Option<&str>) -> Network {
    let options = BuildOptions {
        input: Some(input),
        shortcut: shortcut.map(|s| s.parse().unwrap()),
        ..BuildOptions::train(batch)
    };
    build(&model_file(name), &options).unwrap()
}

fn step(net: Network, mode: FisherMode) -> TrainingStep {
    build_training_step(net, &StepOptions::new(mode)).unwrap()
}

fn noisy_hyper() -> Hyperparams {
    Hyperparams {
        learning_rate: 0.05,
        momentum: 0.9,
        weight_decay: 1e-3,
        noise_scale: 0.7,
        seed: 42,
        step: 3,
    }
}

/// State with random momenta and perturbed γ/β, so that no term of the update vanishes.
fn busy_state<T: Real>(net: &Network, seed: u64) -> TrainState<T> {
    let mut state = TrainState::<T>::init(net, seed);
    let mut r = rng(seed);
    for (p, (theta, v)) in net
        .params
        .iter()
        .zip(state.params.iter_mut().zip(&mut state.momenta))
    {
        *v = uniform(&mut r, &p.shape);
        if p.kind.is_batch_norm() {
            let noise = uniform::<T>(&mut r, &p.shape);
            theta
                .data
                .iter_mut()
                .zip(&noise.data)
                .for_each(|(t, n)| *t = *t + *n * T::from_f64(0.3));
        }
    }
    state
}

fn run<T: Real>(
    step: &TrainingStep,
    state: &TrainState<T>,
    hyper: &Hyperparams,
    seed: u64,
) -> Evaluation<T> {
    let net = &step.network;
    let (images, labels) = random_batch::<T>(net.batch, net.input, net.classes, seed);
    evaluate(&step.graph, &state.feeds(images, labels, hyper), &[]).unwrap()
}

fn out<T: Real>(eval: &Evaluation<T>, name: Output) -> &Tensor<T> {
    eval.output(&name)
        .unwrap_or_else(|| panic!("no output {name}"))
        .float()
}

#[test]
fn model_gradients_match_finite_differences_of_the_loss() {
    const H: f64 = 1e-6;
    let cases = [
        ("mlp", [1, 5, 5], None),
        ("small_cnn", [1, 8, 8], None),
        ("resnet20", [3, 8, 8], None),
        ("resnet20", [3, 8, 8], Some("B")),
    ];
    for (name, input, shortcut) in cases {
        let step = step(network(name, 3, input, shortcut), FisherMode::None);
        let net = &step.network;
        let state = busy_state::<f64>(net, 21);
        let (images, labels) = random_batch::<f64>(net.batch, net.input, net.classes, 21);
        let hyper = Hyperparams::default();
        // the differences need only the forward pass and the loss
        let mut forward = net.graph.clone();
        let label_type = TensorType::i32(&[net.batch]);
        let label_input = forward
            .add1(
                Input {
                    role: Role::Labels,
                    ty: label_type,
                },
                "loss",
                &[],
            )
            .unwrap();
        let loss = forward
            .add1(SoftmaxCrossEntropy, "loss", &[net.logits, label_input])
            .unwrap();
        forward.set_output(Output::Loss, loss);
        let loss_at = |state: &TrainState<f64>| {
            let feeds = state.feeds(images.clone(), labels.clone(), &hyper);
            evaluate(&forward, &feeds, &[]).unwrap().loss().unwrap()
        };
        let eval = evaluate(
            &step.graph,
            &state.feeds(images.clone(), labels.clone(), &hyper),
            &[],
        )
        .unwrap();
        let mut r = rng(22);
        let mut probe = state.clone();
        for (i, p) in net.params.iter().enumerate() {
            let grad = out(&eval, Output::Grad(i));
            let scale = grad.data.iter().fold(1e-4f64, |m, v| m.max(v.abs()));
            for _ in 0..3 {
                let k = r.random_range(0..p.numel());
                let original = probe.params[i].data[k];
                probe.params[i].data[k] = original + H;
                let up = loss_at(&probe);
                probe.params[i].data[k] = original - H;
                let down = loss_at(&probe);
                probe.params[i].data[k] = original;
                let fd = (up - down) / (2.0 * H);
                assert!(
                    (fd - grad.data[k]).abs() / scale < 1e-5,
                    "{name}: {}[{k}]: finite difference {fd}, autodiff {}",
                    p.name,
                    grad.data[k]
                );
            }
        }
    }
}

#[test]
fn update_follows_the_noisy_sgd_formula_bit_for_bit() {
    let step = step(network("small_cnn", 4, [1, 8, 8], None), FisherMode::Exact);
    let net = &step.network;
    let state = busy_state::<f32>(net, 31);
    let hyper = noisy_hyper();
    let eval = run(&step, &state, &hyper, 31);
    let mut saw_bn = false;
    for (i, p) in net.params.iter().enumerate() {
        let (theta, v) = (&state.params[i].data, &state.momenta[i].data);
        let g = &out(&eval, Output::Grad(i)).data;
        let fisher = &out(&eval, Output::Fisher(i)).data;
        let mut xi = vec![0.0f32; p.numel()];
        philox::fill_normal(hyper.seed, hyper.step, i as u32, &mut xi);
        let decays = !p.kind.is_batch_norm();
        saw_bn |= !decays;
        for k in 0..p.numel() {
            let mut d = g[k] + (hyper.noise_scale * fisher[k].sqrt()) * xi[k];
            if decays {
                d += hyper.weight_decay * theta[k];
            }
            let new_v = hyper.momentum * v[k] + d;
            let new_theta = theta[k] - hyper.learning_rate * new_v;
            assert_eq!(
                out(&eval, Output::NewMomentum(i)).data[k].to_bits(),
                new_v.to_bits(),
                "{}[{k}]",
                p.name
            );
            assert_eq!(
                out(&eval, Output::NewParam(i)).data[k].to_bits(),
                new_theta.to_bits(),
                "{}[{k}]",
                p.name
            );
        }
    }
    assert!(
        saw_bn,
        "the model has batch-norm parameters, which must not decay"
    );
}

#[test]
fn without_fisher_the_update_is_plain_momentum_sgd() {
    let noisy = step(network("mlp", 4, [1, 5, 5], None), FisherMode::Exact);
    let plain = step(network("mlp", 4, [1, 5, 5], None), FisherMode::None);
    let state = busy_state::<f32>(&plain.network, 32);
    let silent = Hyperparams {
        noise_scale: 0.0,
        ..noisy_hyper()
    };
    let (a, b) = (
        run(&noisy, &state, &silent, 32),
        run(&plain, &state, &noisy_hyper(), 32),
    );
    for i in 0..plain.network.params.len() {
        assert_eq!(out(&a, Output::NewParam(i)), out(&b, Output::NewParam(i)));
        assert_eq!(
            out(&a, Output::NewMomentum(i)),
            out(&b, Output::NewMomentum(i))
        );
    }
    assert!(
        b.output(&Output::Fisher(0)).is_none(),
        "fisher none computes no Fisher"
    );
    // and the noise, when on, moves every parameter
    let c = run(&noisy, &state, &noisy_hyper(), 32);
    assert_ne!(out(&c, Output::NewParam(0)), out(&b, Output::NewParam(0)));
}

#[test]
fn running_statistics_follow_the_pytorch_convention() {
    let step = step(network("small_cnn", 3, [1, 6, 6], None), FisherMode::None);
    let net = &step.network;
    let bn = &net.bn_layers[0];
    let mut state = TrainState::<f64>::init(net, 33);
    state.running_means[0] = Tensor::filled(&[bn.channels], 0.5);
    state.running_vars[0] = Tensor::filled(&[bn.channels], 2.0);
    let (images, labels) = random_batch::<f64>(net.batch, net.input, net.classes, 33);
    let x = step.graph.inputs(bn.node)[0];
    let eval = evaluate(
        &step.graph,
        &state.feeds(images, labels, &Hyperparams::default()),
        &[x],
    )
    .unwrap();
    let x = eval.kept(x).unwrap().float();
    let positions = x.shape[2] * x.shape[3];
    let count = (x.shape[0] * positions) as f64;
    assert_eq!(count as usize, bn.count);
    for c in 0..bn.channels {
        let values: Vec<f64> = (0..x.shape[0])
            .flat_map(|n| x.data[(n * bn.channels + c) * positions..][..positions].to_vec())
            .collect();
        let mean = values.iter().sum::<f64>() / count;
        let unbiased = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (count - 1.0);
        let m = bn.momentum;
        let new_mean = out(&eval, Output::NewRunningMean(0)).data[c];
        let new_var = out(&eval, Output::NewRunningVar(0)).data[c];
        assert!(
            (new_mean - ((1.0 - m) * 0.5 + m * mean)).abs() < 1e-12,
            "channel {c}"
        );
        assert!(
            (new_var - ((1.0 - m) * 2.0 + m * unbiased)).abs() < 1e-12,
            "channel {c}"
        );
    }
}

#[test]
fn evaluation_mode_with_the_batch_statistics_reproduces_training_mode() {
    let spec = model_file("resnet20");
    let options = |mode| BuildOptions {
        input: Some([3, 8, 8]),
        mode,
        ..BuildOptions::train(4)
    };
    let train = build(&spec, &options(Mode::Train)).unwrap();
    let eval_net = build(&spec, &options(Mode::Eval)).unwrap();
    let state = busy_state::<f64>(&train, 34);
    let (images, labels) = random_batch::<f64>(4, train.input, train.classes, 34);
    let stats: Vec<PortRef> = train
        .bn_layers
        .iter()
        .flat_map(|bn| [PortRef::new(bn.node, 1), PortRef::new(bn.node, 2)])
        .collect();
    let mut feeds = state.feeds(images, labels, &Hyperparams::default());
    let trained = evaluate(&train.graph, &feeds, &stats).unwrap();
    for (i, pair) in stats.chunks(2).enumerate() {
        feeds.insert(Role::RunningMean(i), trained.kept(pair[0]).unwrap().clone());
        feeds.insert(Role::RunningVar(i), trained.kept(pair[1]).unwrap().clone());
    }
    let evaluated = evaluate(&eval_net.graph, &feeds, &[]).unwrap();
    let (a, b) = (
        out(&evaluated, Output::Logits),
        out(&trained, Output::Logits),
    );
    assert_close("eval-mode logits", &a.data, &b.data, 1e-12);
    assert!(!eval_net.graph.op_counts().contains_key("batch_norm"));
    assert_eq!(
        eval_net.graph.op_counts()["bn_apply"],
        train.bn_layers.len()
    );
}

#[test]
fn f32_and_f64_steps_agree() {
    let step = step(network("resnet20", 4, [3, 16, 16], None), FisherMode::Exact);
    let net = &step.network;
    let wide = busy_state::<f64>(net, 35);
    let narrow = wide.cast::<f32>();
    let hyper = noisy_hyper();
    let (a, b) = (
        run(&step, &narrow, &hyper, 35),
        run(&step, &wide, &hyper, 35),
    );
    let (la, lb) = (a.loss().unwrap() as f64, b.loss().unwrap());
    assert!((la - lb).abs() / lb < 1e-5, "loss f32 {la} vs f64 {lb}");
    for (i, p) in net.params.iter().enumerate() {
        for (name, tol) in [
            (Output::Grad(i), 2e-3),
            (Output::Fisher(i), 5e-3),
            (Output::NewParam(i), 1e-4),
        ] {
            let narrow: Vec<f64> = out(&a, name.clone())
                .data
                .iter()
                .map(|v| *v as f64)
                .collect();
            assert_close(
                &format!("{} {name}", p.name),
                &narrow,
                &out(&b, name.clone()).data,
                tol,
            );
        }
    }
}

#[test]
fn cpu_results_do_not_depend_on_the_thread_count() {
    let step = step(network("resnet20", 8, [3, 16, 16], None), FisherMode::Exact);
    let state = busy_state::<f32>(&step.network, 36);
    let in_pool = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| run(&step, &state, &noisy_hyper(), 36).into_outputs())
    };
    let (one, three) = (in_pool(1), in_pool(3));
    for (name, value) in &one {
        let bits = |v: &Value<f32>| {
            v.float()
                .data
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            bits(value),
            bits(&three[name]),
            "{name} differs between 1 and 3 threads"
        );
    }
}

#[test]
fn the_loss_falls_on_a_fixed_batch() {
    let step = step(
        network("small_cnn", 16, [1, 12, 12], None),
        FisherMode::Exact,
    );
    let net = &step.network;
    let mut state = TrainState::<f32>::init(net, 37);
    let (images, labels) = random_batch::<f32>(net.batch, net.input, net.classes, 37);
    let mut losses = Vec::new();
    for k in 0..8 {
        let hyper = Hyperparams {
            learning_rate: 0.02,
            noise_scale: default_noise_scale(8, 16),
            step: k,
            ..Hyperparams::default()
        };
        let eval = evaluate(
            &step.graph,
            &state.feeds(images.clone(), labels.clone(), &hyper),
            &[],
        )
        .unwrap();
        losses.push(eval.loss().unwrap());
        state.advance(&eval);
    }
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(losses[7] < 0.5 * losses[0], "losses {losses:?}");
}

#[test]
fn parameters_are_initialised_by_kind() {
    let net = network("small_cnn", 2, [1, 8, 8], None);
    let state = TrainState::<f64>::init(&net, 38);
    for (p, t) in net.params.iter().zip(&state.params) {
        match p.kind {
            ParamKind::BnGamma => assert!(t.data.iter().all(|&v| v == 1.0)),
            ParamKind::BnBeta | ParamKind::ConvBias | ParamKind::LinearBias => {
                assert!(t.data.iter().all(|&v| v == 0.0))
            }
            ParamKind::ConvWeight | ParamKind::LinearWeight => {
                let fan_in: usize = p.shape[1..].iter().product();
                let var = t.data.iter().map(|v| v * v).sum::<f64>() / p.numel() as f64;
                let expected = 2.0 / fan_in as f64;
                assert!(
                    (var / expected - 1.0).abs() < 0.3,
                    "{}: variance {var} vs {expected}",
                    p.name
                );
            }
        }
    }
    assert_ne!(
        state.params[0],
        TrainState::<f64>::init(&net, 39).params[0],
        "seeded"
    );
}
