//! Whole training steps on the CPU backends.
//!
//! * The kernel executor, node by node: every node's outputs against the reference op on the
//!   very inputs the kernels read (the noisy update bit for bit, so the noise is the CPU's);
//!   then end to end: loss, gradients, Fisher, parameters and momenta after the step against
//!   the reference interpreter running the unoptimised step in f64. The kernels may be at most
//!   [`SLACK`] times as far from it as the same interpreter in f32 is (both sum in f32, in
//!   different orders).
//! * The reference backend over the memory plan against the interpreter on the same graph:
//!   bit for bit, which a buffer overwritten while still live would break.
//!
//! End to end, a ReLU whose pre-activation lies within rounding of zero may switch on in one
//! computation and off in the other; the gradient then differs by that element's whole
//! contribution, and no bound on rounding covers it. The random batches below have none
//! (seed 4 of `resnet20` has one, in `basic6.bn1`); the node-by-node check is immune, since
//! each fused kernel computes its mask from the same inputs in the reference's order.

use std::path::Path;
use std::time::Instant;

use fisherc_codegen::artifact::{Source, Verified};
use fisherc_codegen::compile::{CompileOptions, compile};
use fisherc_codegen::lower::LowerOptions;
use fisherc_codegen::options::Precision;
use fisherc_codegen::plan::Buffer;
use fisherc_ir::graph::Output;
use fisherc_ir::interp::{Feeds, evaluate};
use fisherc_ir::model::{BuildOptions, load};
use fisherc_ir::state::kfac::{KfacSettings, KfacState};
use fisherc_ir::state::{Hyperparams, TrainState};
use fisherc_ir::synthetic::random_batch;
use fisherc_ir::tensor::Value;
use fisherc_ir::{FisherMode, Noise, StepOptions, TrainingStep, build_training_step};
use fisherc_runtime::Session;
use fisherc_runtime::backend::{Backend, RuntimeError};
use fisherc_runtime::check::{
    Bounds, compare_steps, node_by_node, reference_state, step_with_forward_aligned,
};
use fisherc_runtime::cpu::{ExecutorBackend, ReferenceBackend};

/// See the module documentation.
const SLACK: f64 = 4.0;

struct Case {
    model: &'static str,
    batch: usize,
    input: Option<[usize; 3]>,
    mode: FisherMode,
    noise: Noise,
    options: CompileOptions,
    data_seed: u64,
}

impl Case {
    fn small(model: &'static str, mode: FisherMode, fused: bool) -> Case {
        let input = (model == "small_cnn").then_some([1, 12, 12]);
        Case {
            model,
            batch: 4,
            input,
            mode,
            noise: Noise::DiagonalFisher,
            options: CompileOptions::fused(fused),
            data_seed: 4,
        }
    }

    fn what(&self) -> String {
        let variant = self.options.describe();
        format!(
            "{} batch {} {} {} noise {variant}",
            self.model, self.batch, self.mode, self.noise
        )
    }

    fn build(&self) -> (TrainingStep, Verified) {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../models/{}.toml", self.model));
        let options = BuildOptions {
            input: self.input,
            ..BuildOptions::train(self.batch)
        };
        let step = build_training_step(
            load(&path, &options).unwrap(),
            &StepOptions {
                noise: self.noise,
                ..StepOptions::new(self.mode)
            },
        )
        .unwrap();
        let compiled = compile(&step, self.options).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let source = Source::of(&step, &path, text, self.options);
        (step, Verified::package(compiled, source))
    }

    fn feeds(&self, step: &TrainingStep) -> Feeds<f32> {
        let net = &step.network;
        let state = TrainState::<f32>::init(net, 3);
        let (images, labels) =
            random_batch::<f32>(self.batch, net.input, net.classes, self.data_seed);
        let mut feeds = state.feeds(
            images,
            labels,
            &Hyperparams {
                noise_scale: 0.5,
                seed: 77,
                step: 9,
                ..Hyperparams::default()
            },
        );
        // K-FAC: Cholesky factors of this batch's own factors, and a refreshing step
        let kfac = KfacState::refreshed_on(step, &feeds, KfacSettings::default()).unwrap();
        feeds.extend(kfac.feeds(true));
        feeds
    }
}

/// Largest absolute difference relative to the largest magnitude of the exact values.
fn error_vs_exact(a: &[f32], exact: &[f64]) -> f64 {
    let scale = exact.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(exact)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
        / scale
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

/// A noisy update's op name: one parameter's or a group's.
fn is_update(op: &str) -> bool {
    op == "noisy_sgd_update" || op == "noisy_sgd_update_group"
}

fn executor_step_matches_the_reference(case: Case) {
    let what = case.what();
    let (step, verified) = case.build();
    let (artifact, compiled) = (verified.artifact(), verified.compiled());
    let feeds = case.feeds(&step);
    let mut session = Session::new(artifact, ExecutorBackend::new(&verified).unwrap()).unwrap();
    session.feed(&feeds).unwrap();

    let started = Instant::now();
    let checks =
        node_by_node(&mut session, compiled, Bounds::CPU).unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!(
        "{what}: {} launches, checked node by node in {:.1} s",
        artifact.plan.launches.len(),
        started.elapsed().as_secs_f64()
    );
    for c in &checks {
        assert!(
            c.passed(),
            "{what}: {} ({}) output {}: relative error {:e} > {:e}",
            c.layer,
            c.op,
            c.port,
            c.error,
            c.bound
        );
        if is_update(&c.op) {
            assert!(c.identical, "{what}: {} update not bit-identical", c.layer);
        }
    }
    // new parameter and new momentum of every parameter (and, where the update makes it,
    // the Fisher estimate), each checked bit for bit above, whether updates are grouped or not
    let update_outputs: usize = compiled
        .graph
        .node_indices()
        .map(|n| compiled.graph.node(n))
        .filter(|node| is_update(node.op.name()))
        .map(|node| node.outputs.len())
        .sum();
    let updates = checks.iter().filter(|c| is_update(&c.op)).count();
    assert_eq!(updates, update_outputs, "{what}: every update checked");
    assert!(
        updates >= 2 * step.network.params.len(),
        "{what}: {updates} update outputs for {} parameters",
        step.network.params.len()
    );

    let reference = evaluate(&step.graph, &feeds, &[]).unwrap();
    let exact = evaluate(&step.graph, &to_f64(&feeds), &[]).unwrap();
    let mut check = |label: &str, name: &Output, floor: f64| {
        let exact = &exact.output(name).unwrap().float().data;
        let ours = error_vs_exact(&session.output(name).unwrap().float().data, exact);
        let f32_reference = error_vs_exact(&reference.output(name).unwrap().float().data, exact);
        let bound = (SLACK * f32_reference).max(floor);
        assert!(
            ours <= bound,
            "{what}: {label} {name}: relative error {ours:e} > {bound:e} (f32 reference: {f32_reference:e})"
        );
    };
    check("", &Output::Loss, 1e-6);
    for (i, p) in step.network.params.iter().enumerate() {
        check(&p.name, &Output::NewParam(i), 1e-6);
        check(&p.name, &Output::NewMomentum(i), 1e-5);
        check(&p.name, &Output::Grad(i), 1e-5);
        // K-FAC's layers take no diagonal estimate, but their factors
        for output in [
            Output::Fisher(i),
            Output::KfacInputFactor(i),
            Output::KfacGradFactor(i),
        ] {
            if step.graph.output(&output).is_some() {
                check(&p.name, &output, 1e-5);
            }
        }
    }
}

#[test]
fn small_models_step_on_the_kernel_executor() {
    for mode in FisherMode::ALL {
        for fused in [true, false] {
            executor_step_matches_the_reference(Case::small("small_cnn", mode, fused));
            executor_step_matches_the_reference(Case::small("mlp", mode, fused));
        }
    }
    for fused in [true, false] {
        for options in StepOptions::all() {
            if options.noise != Noise::DiagonalFisher {
                executor_step_matches_the_reference(Case {
                    noise: options.noise,
                    ..Case::small("small_cnn", options.fisher, fused)
                });
            }
        }
    }
}

#[test]
fn tensor_core_steps_on_the_kernel_executor_match_the_reference() {
    let on_tensor_cores = CompileOptions {
        lowering: LowerOptions {
            precision: Precision::Tf32x3,
            ..LowerOptions::default()
        },
        ..CompileOptions::fused(true)
    };
    for mode in [FisherMode::Exact, FisherMode::A2g2] {
        executor_step_matches_the_reference(Case {
            options: on_tensor_cores,
            ..Case::small("small_cnn", mode, true)
        });
    }
    executor_step_matches_the_reference(Case {
        model: "resnet20",
        batch: 8,
        input: None,
        mode: FisherMode::Exact,
        noise: Noise::DiagonalFisher,
        options: on_tensor_cores,
        data_seed: 5,
    });
}

#[test]
fn resnet20_exact_step_on_the_kernel_executor_matches_the_reference() {
    let case = Case {
        model: "resnet20",
        batch: 8,
        input: None,
        mode: FisherMode::Exact,
        noise: Noise::DiagonalFisher,
        options: CompileOptions::fused(true),
        data_seed: 5,
    };
    executor_step_matches_the_reference(case);
}

#[test]
fn the_reference_backend_over_the_memory_plan_is_bit_identical_to_the_interpreter() {
    let small = Some([3, 16, 16]);
    for (model, input, mode, fused) in [
        ("resnet20", small, FisherMode::Exact, true),
        ("resnet20", small, FisherMode::A2g2, false),
        ("vgg16", None, FisherMode::Exact, true),
        ("small_cnn", small, FisherMode::None, true),
    ] {
        let case = Case {
            model,
            batch: 2,
            input,
            mode,
            noise: Noise::DiagonalFisher,
            options: CompileOptions::fused(fused),
            data_seed: 8,
        };
        let what = case.what();
        let (step, verified) = case.build();
        let (artifact, compiled) = (verified.artifact(), verified.compiled());
        let feeds = case.feeds(&step);
        let mut session =
            Session::new(artifact, ReferenceBackend::new(&verified).unwrap()).unwrap();
        session.feed(&feeds).unwrap();
        session.step().unwrap();
        let expected = evaluate(&compiled.graph, &feeds, &[]).unwrap();
        for slot in &artifact.plan.outputs {
            let got = session.output(&slot.role).unwrap();
            let want = expected.output(&slot.role).unwrap();
            let bits = |v: &Value<f32>| {
                v.float()
                    .data
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&got), bits(want), "{what}: {}", slot.role);
        }
    }
}

/// Hyper-parameters of the step comparisons: noise drawn (scale 0.5), seed 5.
fn noisy_hyper() -> Hyperparams {
    Hyperparams {
        noise_scale: 0.5,
        seed: 5,
        ..Hyperparams::default()
    }
}

#[test]
fn several_steps_on_the_executor_follow_the_reference_backend() {
    let case = Case::small("small_cnn", FisherMode::Exact, true);
    let (_, verified) = case.build();
    let artifact = verified.artifact();
    let mut executor = Session::new(artifact, ExecutorBackend::new(&verified).unwrap()).unwrap();
    let mut reference = Session::new(artifact, ReferenceBackend::new(&verified).unwrap()).unwrap();
    let hyper = noisy_hyper();
    let rows = compare_steps(
        (&mut executor, &mut reference),
        (None, &Feeds::new()),
        3,
        11,
        &hyper,
    )
    .unwrap();
    let losses = rows.iter().filter(|r| r.what.ends_with("loss")).count();
    assert_eq!(losses, 3, "one loss per step: {rows:?}");
    for what in ["parameters", "momenta", "fisher"] {
        let count = |bounded: bool| {
            rows.iter()
                .filter(|r| r.bounded == bounded && r.what.ends_with(what))
                .count()
        };
        assert_eq!((count(true), count(false)), (3, 1), "{what}: {rows:?}");
    }
    // small_cnn is shallow: even the free-running steps stay close
    for row in &rows {
        assert!(
            row.error < 1e-4,
            "{}: relative error {:e}",
            row.what,
            row.error
        );
    }
    // the steps did train: parameters moved from their initial values
    let initial = TrainState::<f32>::init(&executor.network, 11);
    let now = executor.state().unwrap();
    assert!(initial.params.iter().zip(&now.params).any(|(a, b)| a != b));
}

/// The evaluation program (the forward pass in evaluation mode, compiled as a training step
/// is) on the kernel executor: its logits are the CPU reference's, with running statistics
/// away from the initial ones so that the BN-apply kernels matter.
#[test]
fn evaluation_programs_on_the_kernel_executor_match_the_reference() {
    use fisherc_codegen::compile::compile_graph;
    use fisherc_ir::model::{Mode, ModelSpec, build};
    use fisherc_ir::ops::Role;
    for (model, input, precision) in [
        ("small_cnn", [1, 12, 12], Precision::Fp32),
        ("resnet20", [3, 8, 8], Precision::Tf32x3),
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../models/{model}.toml"));
        let text = std::fs::read_to_string(&path).unwrap();
        let spec = ModelSpec::parse(&text, &path).unwrap();
        let options = BuildOptions {
            input: Some(input),
            mode: Mode::Eval,
            ..BuildOptions::train(3)
        };
        let network = build(&spec, &options).unwrap();
        let compile_options = CompileOptions {
            lowering: LowerOptions {
                precision,
                ..LowerOptions::default()
            },
            ..CompileOptions::fused(true)
        };
        let compiled = compile_graph(&network.graph, compile_options).unwrap();
        let source = Source::of_evaluation(&network, (&path, text), compile_options);
        let launches = compiled.program.launches.len();
        let verified = Verified::package(compiled, source);
        let again = verified.artifact().clone().verify().unwrap();
        assert_eq!(again.compiled().program.launches.len(), launches);
        let mut session = Session::new(
            verified.artifact(),
            ExecutorBackend::new(&verified).unwrap(),
        )
        .unwrap();
        let mut state = TrainState::<f32>::init(&network, 4);
        let mut r = 0.3f32;
        for (m, v) in state.running_means.iter_mut().zip(&mut state.running_vars) {
            m.data.iter_mut().for_each(|x| *x = r);
            v.data.iter_mut().for_each(|x| *x = 1.0 + r);
            r = -r * 0.7;
        }
        let (images, _) = random_batch::<f32>(3, input, network.classes, 5);
        let mut feeds = state.state_feeds();
        feeds.insert(Role::Images, Value::Float(images));
        session.feed(&feeds).unwrap();
        session.step().unwrap();
        let got = session.output(&Output::Logits).unwrap().into_float();
        let want = evaluate(&network.graph, &feeds, &[]).unwrap();
        let want = &want.output(&Output::Logits).unwrap().float().data;
        let scale = want.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
        for (g, w) in got.data.iter().zip(want) {
            assert!((g - w).abs() <= 1e-4 * scale, "{model}: logit {g} vs {w}");
        }
    }
}

/// The reference backend, except that the node producing a max-pooling input lifts one
/// window's second-largest value just above its largest (by 10⁻⁶ of it): it takes another
/// maximum there, as a device whose rounding lands on the other side of a near-tie does.
struct TakesAnotherMaximum {
    inner: ReferenceBackend,
    plan: fisherc_codegen::artifact::Plan,
    /// (producing node, the pooling input buffer, window side)
    producers: Vec<(usize, usize, usize)>,
    /// Each lifted window's gap (largest − second largest) relative to the largest |value| of
    /// its buffer, in the order lifted.
    gaps: Vec<f64>,
}

impl TakesAnotherMaximum {
    fn new(verified: &Verified) -> TakesAnotherMaximum {
        use fisherc_ir::ops::Op;
        let (plan, compiled) = (verified.plan().clone(), verified.compiled());
        let mut producers = Vec::new();
        for node in &plan.nodes {
            let graph_node = compiled.graph.node((node.graph_node as u32).into());
            if let Op::MaxPool(pool) = &graph_node.op {
                let input = node.inputs[0];
                let producer = plan.nodes.iter().position(|n| n.outputs.contains(&input));
                producers.push((producer.unwrap(), input, pool.kernel));
            }
        }
        TakesAnotherMaximum {
            inner: ReferenceBackend::new(verified).unwrap(),
            plan,
            producers,
            gaps: Vec::new(),
        }
    }

    /// In the first window (of plane 0's row-major windows) whose two largest values are
    /// positive and apart, the second becomes the largest; the gap it overcame is kept.
    fn lift(&mut self, buffer: usize, side: usize) -> Result<(), RuntimeError> {
        let buffer = self.plan.buffers[buffer].clone();
        let mut x: Vec<f32> = self
            .inner
            .read(&buffer)?
            .into_iter()
            .map(f32::from_bits)
            .collect();
        let w = buffer.shape[3];
        for (oy, ox) in (0..buffer.shape[2] / side).flat_map(|y| (0..w / side).map(move |x| (y, x)))
        {
            let mut at: Vec<usize> = (0..side * side)
                .map(|i| (oy * side + i / side) * w + ox * side + i % side)
                .collect();
            at.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
            let (first, second) = (x[at[0]], x[at[1]]);
            if second > 0.0 && first > second {
                let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                self.gaps.push((first - second) as f64 / scale as f64);
                x[at[1]] = first * (1.0 + 1e-6);
                let words: Vec<u32> = x.iter().map(|v| v.to_bits()).collect();
                return self.inner.write(&buffer, &words);
            }
        }
        panic!("no window to lift in buffer {}", buffer.name)
    }
}

impl Backend for TakesAnotherMaximum {
    fn describe(&self) -> String {
        "the reference, another maximum in one window".into()
    }
    fn write(&mut self, buffer: &Buffer, words: &[u32]) -> Result<(), RuntimeError> {
        self.inner.write(buffer, words)
    }
    fn read(&mut self, buffer: &Buffer) -> Result<Vec<u32>, RuntimeError> {
        self.inner.read(buffer)
    }
    fn run_node(&mut self, node: usize) -> Result<(), RuntimeError> {
        self.inner.run_node(node)?;
        let lifted: Vec<(usize, usize)> = self
            .producers
            .iter()
            .filter(|p| p.0 == node)
            .map(|p| (p.1, p.2))
            .collect();
        for (buffer, side) in lifted {
            self.lift(buffer, side)?;
        }
        Ok(())
    }
    fn run_step(&mut self) -> Result<f64, RuntimeError> {
        for node in 0..self.plan.nodes.len() {
            if self.plan.nodes[node].launch_count > 0 {
                self.run_node(node)?;
            }
        }
        Ok(0.0)
    }
}

/// A step whose max pooling takes another maximum in one window differs by a discrete amount
/// (the gradient flows through the other element); `step_with_forward_aligned` finds that
/// window, and with the reference given the same forward pass the two steps agree.
#[test]
fn a_step_that_takes_another_window_maximum_agrees_once_the_forward_pass_is_aligned() {
    let case = Case::small("small_cnn", FisherMode::Exact, true);
    let (_, verified) = case.build();
    let (artifact, compiled) = (verified.artifact(), verified.compiled());
    let mut other = Session::new(artifact, TakesAnotherMaximum::new(&verified)).unwrap();
    let mut reference = Session::new(artifact, ReferenceBackend::new(&verified).unwrap()).unwrap();
    let hyper = noisy_hyper();
    let rows = compare_steps(
        (&mut other, &mut reference),
        (None, &Feeds::new()),
        1,
        11,
        &hyper,
    )
    .unwrap();
    let parameters = rows.iter().find(|r| r.what == "step 1 parameters").unwrap();
    assert!(
        parameters.error > 1e-3,
        "the lifted window moves the step: {rows:?}"
    );

    let state = reference_state(&mut reference, 0, 11, &hyper).unwrap();
    assert_eq!(
        state.params,
        TrainState::<f32>::init(&reference.network, 11).params
    );
    let (choices, aligned) = step_with_forward_aligned(
        (&mut other, &mut reference),
        &compiled.graph,
        &state,
        (0, 11),
        &hyper,
    )
    .unwrap();
    assert_eq!(choices.len(), 2, "small_cnn pools twice: {choices:?}");
    // found: the one window lifted in each layer, the gap it overcame
    let gaps = &other.backend.gaps[other.backend.gaps.len() - 2..];
    for (c, gap) in choices.iter().zip(gaps) {
        assert_eq!(c.differing, 1, "{c:?}");
        assert!(
            (c.closest - gap).abs() <= 1e-6 * gap,
            "{c:?}: lifted over {gap}"
        );
    }
    // the same forward pass, the same reference ops after it: the same bits
    for row in &aligned {
        assert_eq!(row.error, 0.0, "{}", row.what);
    }
    assert_eq!(
        aligned.len(),
        rows.iter().filter(|r| r.step == Some(0)).count() - 1
    );
}
