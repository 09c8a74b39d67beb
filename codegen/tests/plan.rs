//! The memory plan, checked independently of how it was made: from the step sequence alone,
//! every two buffers that are live at the same time occupy disjoint bytes, and transient
//! buffers do reuse memory.

use std::path::Path;

use fisherc_codegen::compile::{CompileOptions, compile};
use fisherc_codegen::plan::{Kind, Program};
use fisherc_ir::model::{BuildOptions, load};
use fisherc_ir::{FisherMode, StepOptions, build_training_step};

fn program(model: &str, batch: usize, mode: FisherMode, fused: bool) -> Program {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../models/{model}.toml"));
    let step = build_training_step(
        load(&path, &BuildOptions::train(batch)).unwrap(),
        &StepOptions::new(mode),
    )
    .unwrap();
    compile(&step, CompileOptions::fused(fused))
        .unwrap()
        .program
}

/// Per buffer, the first and last node (schedule position) that touches it; persistent
/// buffers live throughout. Scratch buffers are touched by their node's launches only.
fn lifetimes(p: &Program) -> Vec<(usize, usize)> {
    let whole = (0, p.nodes.len());
    let mut span: Vec<Option<(usize, usize)>> = vec![None; p.buffers.len()];
    let mut touch = |b: usize, at: usize| {
        let s = span[b].get_or_insert((at, at));
        *s = (s.0.min(at), s.1.max(at));
    };
    for (at, node) in p.nodes.iter().enumerate() {
        node.inputs
            .iter()
            .chain(&node.outputs)
            .for_each(|&b| touch(b, at));
    }
    for launch in &p.launches {
        for arg in &launch.args {
            if let fisherc_codegen::plan::Arg::Buffer(b) = *arg {
                touch(b, launch.node);
            }
        }
    }
    p.buffers
        .iter()
        .zip(span)
        .map(|(b, s)| {
            if b.kind == Kind::Transient {
                s.unwrap_or(whole)
            } else {
                whole
            }
        })
        .collect()
}

fn assert_sound(p: &Program, what: &str) {
    let life = lifetimes(p);
    for (i, a) in p.buffers.iter().enumerate() {
        assert!(
            a.offset + a.bytes <= p.arena_bytes,
            "{what}: {} outside the arena",
            a.name
        );
        assert_eq!(a.offset % 256, 0, "{what}: {} not 256-byte aligned", a.name);
        for (j, b) in p.buffers.iter().enumerate().skip(i + 1) {
            let overlap_in_time = life[i].0 <= life[j].1 && life[j].0 <= life[i].1;
            let overlap_in_memory = a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
            assert!(
                !(overlap_in_time && overlap_in_memory),
                "{what}: {} and {} are live together at overlapping addresses",
                a.name,
                b.name
            );
        }
    }
}

#[test]
fn live_buffers_never_share_memory() {
    for (model, mode, fused) in [
        ("resnet20", FisherMode::Exact, true),
        ("resnet20", FisherMode::A2g2, false),
        ("vgg16", FisherMode::None, true),
        ("small_cnn", FisherMode::Exact, false),
    ] {
        assert_sound(
            &program(model, 16, mode, fused),
            &format!("{model} {mode} fused={fused}"),
        );
    }
}

#[test]
fn transient_buffers_reuse_memory_and_state_persists() {
    let p = program("resnet44", 64, FisherMode::Exact, true);
    let life = lifetimes(&p);
    let transient: Vec<usize> = (0..p.buffers.len())
        .filter(|&i| p.buffers[i].kind == Kind::Transient)
        .collect();
    let total: u64 = transient.iter().map(|&i| p.buffers[i].bytes).sum();
    // the least any plan needs: the most bytes live at one time
    let least = (0..p.nodes.len())
        .map(|t| {
            transient
                .iter()
                .filter(|&&i| life[i].0 <= t && t <= life[i].1)
                .map(|&i| p.buffers[i].bytes)
                .sum::<u64>()
        })
        .max()
        .unwrap();
    let peak = p.arena_bytes - p.persistent_bytes;
    eprintln!("transient: {total} bytes in all, {least} live at most, {peak} planned");
    assert!(
        peak < total / 2,
        "little reuse: peak {peak} of {total} bytes"
    );
    assert!(
        peak as f64 <= 1.1 * least as f64,
        "fragmented: peak {peak}, {least} bytes live at most"
    );
    // parameters, momenta, running statistics and Fisher buffers are persistent, never reused
    for b in &p.buffers {
        let name = &b.name;
        if matches!(&b.kind, Kind::Input(_) | Kind::Output(_)) {
            assert!(
                b.offset + b.bytes <= p.persistent_bytes,
                "{name} outside the persistent region"
            );
        }
    }
    assert!(
        p.inputs
            .keys()
            .any(|r| matches!(r, fisherc_ir::ops::Role::Param(_)))
    );
    assert!(
        p.outputs
            .keys()
            .any(|o| matches!(o, fisherc_ir::graph::Output::Fisher(_)))
    );
}
