//! The optimizer against the unoptimised graph on the CPU reference.

mod common;

use std::path::Path;

use common::assert_close;
use fisherc_ir::interp::evaluate;
use fisherc_ir::model::{BuildOptions, ModelSpec, build};
use fisherc_ir::optimize::optimize;
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
        for mode in FisherMode::ALL {
            let net = build(&spec, &BuildOptions::train(batch)).unwrap();
            let step = build_training_step(net, &StepOptions::new(mode)).unwrap();
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
            let feeds = state.feeds(images, labels, &hyper);
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
