//! Every rewrite rule on its own: on a training step where it applies, with only the rules it
//! needs, it must fire, the extraction must pick up the form it introduces (where that form is
//! cheaper), and the rewritten step must compute what the original does on the CPU reference.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::assert_close;
use fisherc_ir::interp::evaluate;
use fisherc_ir::model::{BuildOptions, ModelSpec, build};
use fisherc_ir::ops::{Instr, Op, Squares};
use fisherc_ir::optimize::cost::H100;
use fisherc_ir::optimize::{Limits, optimize_with, rules};
use fisherc_ir::state::{Hyperparams, TrainState};
use fisherc_ir::synthetic::random_batch;
use fisherc_ir::{FisherMode, StepOptions, build_training_step};

/// Convolutions with biases, no batch norm.
const CONV: &str = r#"
name = "conv"
input = [2, 8, 8]
classes = 3
layers = [
  { op = "conv", out = 3, kernel = 3, padding = 1, bias = true },
  { op = "relu" },
  { op = "conv", out = 4, kernel = 3, stride = 2, bias = true },
  { op = "relu" },
  { op = "avgpool" },
  { op = "linear", out = "$classes" },
]
"#;

/// conv → BN → ReLU → conv → BN → ReLU: the ReLU output only feeds a convolution.
const CONV_BN_RELU_CONV: &str = r#"
name = "chain"
input = [2, 8, 8]
classes = 3
layers = [
  { op = "conv", out = 4, kernel = 3, padding = 1 },
  { op = "bn" },
  { op = "relu" },
  { op = "conv", out = 5, kernel = 3, padding = 1, bias = true },
  { op = "bn" },
  { op = "relu" },
  { op = "avgpool" },
  { op = "linear", out = "$classes" },
]
"#;

/// A residual add whose batch-norm operand comes second.
const ADD_BN_SECOND: &str = r#"
name = "add_bn_second"
input = [2, 6, 6]
classes = 3
layers = [
  { op = "conv", out = 4, kernel = 3, padding = 1 },
  { op = "bn", name = "b" },
  { op = "conv", out = 4, kernel = 3, padding = 1 },
  { op = "add", from = "b" },
  { op = "relu" },
  { op = "avgpool" },
  { op = "linear", out = "$classes" },
]
"#;

enum Model {
    Inline(&'static str),
    File(&'static str, [usize; 3]),
}

struct Case {
    rule: &'static str,
    model: Model,
    mode: FisherMode,
    /// Rules that expose the pattern.
    with: &'static [&'static str],
    /// An op the extraction must use afterwards (when the fused form is cheaper).
    expect: Option<Expect>,
}

/// A kind of node, by name and test.
type Expect = (&'static str, fn(&Op) -> bool);

const SCALARS: &[&str] = &[
    "square-of-scale",
    "scale-of-scale",
    "mean-of-scale",
    "conv-wgrad-of-scaled-gradient",
    "linear-wgrad-of-scaled-gradient",
    "channel-sum-of-scale",
    "bn-squares-of-scaled-gradient",
];

fn case(
    rule: &'static str,
    model: Model,
    mode: FisherMode,
    with: &'static [&'static str],
    expect: Option<Expect>,
) -> Case {
    Case {
        rule,
        model,
        mode,
        with,
        expect,
    }
}

/// The rules that bring the exact Fisher's BN squares to `bn_backward_reduce_sq`.
const EXACT_BN_SQUARES: &[&str] = &[
    "square-of-scale",
    "scale-of-scale",
    "mean-of-scale",
    "bn-grads-with-exact-squares",
];

fn cases() -> Vec<Case> {
    use FisherMode::{A2g2, Exact, None as Plain};
    use Model::{File, Inline};
    let mlp = || File("mlp", [1, 5, 5]);
    let small_cnn = || File("small_cnn", [1, 8, 8]);
    let resnet = || File("resnet20", [3, 8, 8]);
    vec![
        case("square-of-scale", mlp(), Exact, &[], None),
        case(
            "scale-of-scale",
            Inline(CONV),
            Exact,
            &[
                "square-of-scale",
                "mean-of-scale",
                "conv-wgrad-with-exact-squares",
            ],
            None,
        ),
        case("mean-of-scale", mlp(), Exact, &["square-of-scale"], None),
        case(
            "conv-wgrad-of-scaled-gradient",
            Inline(CONV),
            A2g2,
            &["square-of-scale"],
            None,
        ),
        case(
            "linear-wgrad-of-scaled-gradient",
            mlp(),
            A2g2,
            &["square-of-scale"],
            None,
        ),
        case(
            "channel-sum-of-scale",
            Inline(CONV),
            A2g2,
            &["square-of-scale"],
            None,
        ),
        case(
            "bn-squares-of-scaled-gradient",
            small_cnn(),
            A2g2,
            &[],
            None,
        ),
        case(
            "conv-wgrad-with-exact-squares",
            Inline(CONV),
            Exact,
            SCALARS,
            Some((
                "fused_wgrad with exact squares",
                |op| matches!(op, Op::FusedWgrad(w) if w.squares == Squares::PerExample),
            )),
        ),
        case(
            "conv-wgrad-with-a2g2-squares",
            Inline(CONV),
            A2g2,
            SCALARS,
            Some((
                "fused_wgrad with a2g2 squares",
                |op| matches!(op, Op::FusedWgrad(w) if w.squares == Squares::PerPosition),
            )),
        ),
        case(
            "linear-wgrad-with-exact-squares",
            mlp(),
            Exact,
            SCALARS,
            Some(("linear_wgrad_sq", |op| matches!(op, Op::LinearWgradSq(_)))),
        ),
        case(
            "linear-wgrad-with-a2g2-squares",
            mlp(),
            A2g2,
            SCALARS,
            Some(("linear_wgrad_sq", |op| matches!(op, Op::LinearWgradSq(_)))),
        ),
        case(
            "bias-grad-with-exact-squares",
            Inline(CONV),
            Exact,
            SCALARS,
            Some((
                "channel_sum_sq per example",
                |op| matches!(op, Op::ChannelSumSq(c) if c.squares == Squares::PerExample),
            )),
        ),
        case(
            "row-grad-with-exact-squares",
            mlp(),
            Exact,
            SCALARS,
            Some((
                "channel_sum_sq per example",
                |op| matches!(op, Op::ChannelSumSq(c) if c.squares == Squares::PerExample),
            )),
        ),
        case(
            "bias-grad-with-a2g2-squares",
            Inline(CONV),
            A2g2,
            SCALARS,
            Some((
                "channel_sum_sq per position",
                |op| matches!(op, Op::ChannelSumSq(c) if c.squares == Squares::PerPosition),
            )),
        ),
        case(
            "bn-grads-with-exact-squares",
            small_cnn(),
            Exact,
            SCALARS,
            Some((
                "bn_backward_reduce_sq per example",
                |op| matches!(op, Op::BnBackwardReduceSq(b) if b.squares == Squares::PerExample),
            )),
        ),
        case(
            "bn-grads-with-a2g2-squares",
            small_cnn(),
            A2g2,
            SCALARS,
            Some((
                "bn_backward_reduce_sq per position",
                |op| matches!(op, Op::BnBackwardReduceSq(b) if b.squares == Squares::PerPosition),
            )),
        ),
        case("bn-split", small_cnn(), Plain, &[], None),
        case(
            "bn-stats-in-conv-epilogue",
            small_cnn(),
            Plain,
            &["bn-split", "bn-relu"],
            Some((
                "fused_conv with statistics",
                |op| matches!(op, Op::FusedConv(c) if c.stats),
            )),
        ),
        case(
            "bn-relu-in-conv-prologue",
            resnet(),
            Plain,
            &[
                "bn-split",
                "bn-stats-in-conv-epilogue",
                "bn-relu-recomputed-in-wgrad",
                "dgrad-relu-backward",
            ],
            Some((
                "fused_conv with a prologue",
                |op| matches!(op, Op::FusedConv(c) if c.prologue.is_some() && !c.conv.bias),
            )),
        ),
        case(
            "bn-relu-in-biased-conv-prologue",
            Inline(CONV_BN_RELU_CONV),
            Plain,
            &[
                "bn-split",
                "bn-stats-in-conv-epilogue",
                "bn-relu-recomputed-in-wgrad",
                "dgrad-relu-backward",
            ],
            Some((
                "biased fused_conv with a prologue",
                |op| matches!(op, Op::FusedConv(c) if c.prologue.is_some() && c.conv.bias),
            )),
        ),
        case(
            "bn-relu-recomputed-in-wgrad",
            Inline(CONV_BN_RELU_CONV),
            Plain,
            &[
                "bn-split",
                "bn-stats-in-conv-epilogue",
                "bn-relu-in-biased-conv-prologue",
                "dgrad-relu-backward",
            ],
            Some((
                "fused_wgrad with a prologue",
                |op| matches!(op, Op::FusedWgrad(w) if w.prologue.is_some()),
            )),
        ),
        case(
            "bn-relu-recomputed-in-fused-wgrad",
            Inline(CONV_BN_RELU_CONV),
            Exact,
            &[
                "square-of-scale",
                "scale-of-scale",
                "mean-of-scale",
                "conv-wgrad-with-exact-squares",
                "bn-split",
                "bn-stats-in-conv-epilogue",
                "bn-relu-in-biased-conv-prologue",
                "dgrad-relu-backward",
            ],
            Some((
                "fused_wgrad with a prologue and squares",
                |op| matches!(op, Op::FusedWgrad(w) if w.prologue.is_some() && w.squares == Squares::PerExample),
            )),
        ),
        case(
            "bn-relu",
            small_cnn(),
            Plain,
            &["bn-split", "bn-stats-in-conv-epilogue"],
            Some(("bn_relu", |op| matches!(op, Op::BnRelu(b) if !b.residual))),
        ),
        case(
            "bn-add-relu",
            resnet(),
            Plain,
            &["bn-split", "bn-stats-in-conv-epilogue"],
            Some((
                "bn_relu with a residual",
                |op| matches!(op, Op::BnRelu(b) if b.residual),
            )),
        ),
        case(
            "bn-add-relu-commuted",
            Inline(ADD_BN_SECOND),
            Plain,
            &["bn-split", "bn-stats-in-conv-epilogue"],
            Some((
                "bn_relu with a residual",
                |op| matches!(op, Op::BnRelu(b) if b.residual),
            )),
        ),
        case(
            "dgrad-relu-backward",
            Inline(CONV_BN_RELU_CONV),
            Plain,
            &[
                "bn-split",
                "bn-stats-in-conv-epilogue",
                "bn-relu-in-biased-conv-prologue",
                "bn-relu-recomputed-in-wgrad",
                "bn-reductions-in-producer",
            ],
            Some(("fused_dgrad", |op| matches!(op, Op::FusedDgrad(_)))),
        ),
        case(
            "bn-reductions-in-producer",
            small_cnn(),
            Plain,
            &[],
            Some((
                "relu_backward_bn_reduce",
                |op| matches!(op, Op::ReluBackwardBnReduce(r) if r.squares == Squares::None),
            )),
        ),
        case(
            "bn-reductions-in-producer",
            resnet(),
            Plain,
            &[],
            Some((
                "fused_dgrad with the residual add",
                |op| matches!(op, Op::FusedDgrad(d) if d.residual && d.squares == Squares::None),
            )),
        ),
        case(
            "bn-reductions-with-squares-in-producer",
            resnet(),
            Exact,
            EXACT_BN_SQUARES,
            Some((
                "fused_dgrad with the residual add and squares",
                |op| matches!(op, Op::FusedDgrad(d) if d.residual && d.squares == Squares::PerExample),
            )),
        ),
        case(
            "bn-reductions-with-squares-in-producer",
            small_cnn(),
            Exact,
            EXACT_BN_SQUARES,
            Some((
                "relu_backward_bn_reduce with squares",
                |op| matches!(op, Op::ReluBackwardBnReduce(r) if r.squares == Squares::PerExample),
            )),
        ),
        case(
            "fisher-scale-in-update",
            small_cnn(),
            Exact,
            EXACT_BN_SQUARES,
            Some(("noisy_sgd_update with a Fisher factor", |op| match op {
                Op::NoisySgdUpdate(u) => u.fisher_factor.is_some(),
                Op::NoisySgdUpdateGroup(g) => g.members.iter().any(|u| u.fisher_factor.is_some()),
                _ => false,
            })),
        ),
        case("relu-as-elementwise", mlp(), Plain, &[], None),
        case("add-as-elementwise", resnet(), Plain, &[], None),
        case("square-as-elementwise", mlp(), Exact, &[], None),
        case("relu-backward-as-elementwise", mlp(), Plain, &[], None),
        case(
            "elementwise-chain",
            resnet(),
            Plain,
            &[
                "relu-as-elementwise",
                "add-as-elementwise",
                "relu-backward-as-elementwise",
            ],
            Some((
                "a merged elementwise program",
                |op| matches!(op, Op::Elementwise(e) if e.program.iter().filter(|i| !matches!(i, Instr::Input(_))).count() > 1),
            )),
        ),
    ]
}

fn spec(model: &Model) -> (ModelSpec, Option<[usize; 3]>) {
    match model {
        Model::Inline(text) => (
            ModelSpec::parse(text, Path::new("inline.toml")).unwrap(),
            None,
        ),
        Model::File(name, input) => {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../models/{name}.toml"));
            (ModelSpec::load(&path).unwrap(), Some(*input))
        }
    }
}

fn check(case: &Case) -> Result<(), String> {
    let (spec, input) = spec(&case.model);
    let options = BuildOptions {
        input,
        ..BuildOptions::train(3)
    };
    let step = build_training_step(
        build(&spec, &options).unwrap(),
        &StepOptions::new(case.mode),
    )
    .unwrap();
    let mut names: Vec<&str> = case.with.to_vec();
    names.push(case.rule);
    let rules = rules::named(&names).unwrap();
    let optimized = optimize_with(&step.graph, &rules, &Limits::default(), &H100).unwrap();
    let what = format!("{} ({} {})", case.rule, spec.name, case.mode);
    let fired = optimized.report.rules.get(case.rule).copied().unwrap_or(0);
    if fired == 0 {
        return Err(format!(
            "{what}: did not fire; fired: {:?}",
            optimized.report.rules
        ));
    }
    if let Some((kind, test)) = case.expect {
        let graph = &optimized.graph;
        if !graph.node_indices().any(|n| test(&graph.node(n).op)) {
            return Err(format!("{what}: no {kind} in {:?}", optimized.report.ops));
        }
    }
    let net = &step.network;
    let state = TrainState::<f64>::init(net, 3);
    let (images, labels) = random_batch::<f64>(net.batch, net.input, net.classes, 4);
    let hyper = Hyperparams {
        noise_scale: 0.2,
        ..Hyperparams::default()
    };
    let feeds = state.feeds(images, labels, &hyper);
    let before = evaluate(&step.graph, &feeds, &[]).unwrap();
    let after = evaluate(&optimized.graph, &feeds, &[]).unwrap();
    for (name, value) in before.outputs() {
        let (expected, got) = (value.float(), after.output(name).unwrap().float());
        if expected.data.iter().any(|v| *v != 0.0) {
            assert_close(&format!("{what}: {name}"), &got.data, &expected.data, 1e-9);
        }
    }
    Ok(())
}

#[test]
fn every_rule_fires_and_preserves_the_step() {
    let failures: Vec<String> = cases().iter().filter_map(|c| check(c).err()).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_rule_has_a_case() {
    let tested: BTreeSet<&str> = cases().iter().map(|c| c.rule).collect();
    let all: BTreeSet<String> = rules::all().iter().map(|r| r.name.to_string()).collect();
    assert_eq!(
        tested
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>(),
        all
    );
}

#[test]
fn unknown_rule_names_are_an_error() {
    assert!(
        rules::named(&["no-such-rule"])
            .unwrap_err()
            .to_string()
            .contains("no-such-rule")
    );
}
