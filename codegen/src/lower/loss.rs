//! Softmax cross-entropy, mean over the batch: one block sums the per-row losses; the backward
//! and the full-Fisher sample are one thread per row. exp and log go through the hardware's
//! `ex2`/`lg2`; the sample's random draws through `rng`, bit-identical to the CPU's.

use fisherc_ir::ops::{FisherKind, FullFisherSample, Op};
use fisherc_ir::philox::stream;

use super::common::{Cx, grid_for, input, launch, map, output};
use super::rng::{gumbel, split, word};
use super::{BLOCK, Launch, Lowered};
use crate::builder::{F32, Idx, KernelBuilder, S32, U32, U64};
use crate::kir::Cmp;

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN_2: f32 = std::f32::consts::LN_2;

pub fn lower(cx: &Cx) -> Lowered {
    let (rows, classes) = (cx.inputs[0].shape[0] as u64, cx.inputs[0].shape[1] as u64);
    Lowered::kernels(vec![match cx.op {
        Op::SoftmaxCrossEntropy(_) => {
            let mut k = cx.builder("loss");
            let (logits, labels, loss) = (
                k.ptr_param("logits"),
                k.ptr_param("labels"),
                k.ptr_param("loss"),
            );
            let tid = k.tid();
            let total = k.f32(0.0);
            let start = k.idx(tid);
            let step = k.idx_const(BLOCK as u64);
            k.for_idx(start, rows, step, |k, row| {
                let base = k.idx_mul_const(row, classes);
                let (max, sum) = max_and_sum(k, logits, base, classes);
                let label = k.load_s32(labels, row);
                let term = k.f32(f32::NAN); // an invalid label poisons the loss
                let valid = k.in_range_s(label, 0, classes as i32);
                k.when(valid, |k| {
                    let z = load_class(k, logits, base, label);
                    let log_sum = {
                        let l = k.lg2(sum);
                        k.mul(l, LN_2)
                    };
                    let shifted = k.add(log_sum, max);
                    let row_loss = k.sub(shifted, z);
                    k.assign(term, row_loss);
                });
                k.accumulate(total, term);
            });
            let sum = k.block_sum(&[total])[0];
            let first = k.cmp_u(Cmp::Eq, tid, 0u32);
            k.when(first, |k| {
                let mean = k.div(sum, rows as f32);
                k.store(loss, 0u32, mean);
            });
            launch(k.finish(), [1, 1], vec![input(0), input(1), output(0)])
        }
        Op::SoftmaxCrossEntropyBackward(_) => {
            let mut k = cx.builder("grad");
            let (logits, labels, dloss, grad) = (
                k.ptr_param("logits"),
                k.ptr_param("labels"),
                k.ptr_param("dloss"),
                k.ptr_param("grad"),
            );
            map(&mut k, rows, |k, row| {
                let base = k.idx_mul_const(row, classes);
                let label = k.load_s32(labels, row);
                let d = k.load(dloss, 0u32);
                let scale = k.div(d, rows as f32);
                store_softmax_minus_onehot(k, logits, grad, base, classes, label, scale);
            });
            launch(
                k.finish(),
                grid_for(rows),
                vec![input(0), input(1), input(2), output(0)],
            )
        }
        Op::FullFisherSample(sample) => full_fisher_sample(cx, sample.kind, rows, classes),
        other => unreachable!("{} is not a loss op", other.name()),
    }])
}

/// `FullFisherSample`: per row, the label (the data's, or drawn by Gumbel-max) and the weight
/// (a Rademacher sign, or 1) times 1/√N, then the softmax-minus-onehot row times it.
fn full_fisher_sample(cx: &Cx, kind: FisherKind, rows: u64, classes: u64) -> Launch {
    let mut k = cx.builder(match kind {
        FisherKind::Empirical => "empirical",
        FisherKind::True => "true",
    });
    let (logits, labels, seed, step, grad) = (
        k.ptr_param("logits"),
        k.ptr_param("labels"),
        k.ptr_param("seed"),
        k.ptr_param("step"),
        k.ptr_param("grad"),
    );
    let seed = k.load_u64(seed, 0);
    let step = k.load_u64(step, 0);
    let (key, step) = (split(&mut k, seed), split(&mut k, step));
    let (key, step) = ([key.0, key.1], [step.0, step.1]);
    let stream = k.u32(stream::FULL_FISHER);
    let weight = FullFisherSample::weight(rows as usize);
    map(&mut k, rows, |k, row| {
        let base = k.idx_mul_const(row, classes);
        let (label, scale) = match kind {
            FisherKind::Empirical => {
                let label = k.load_s32(labels, row);
                let x = word(k, row, stream, key, step);
                let negative = k.cmp_u(Cmp::Ge, x, 1u32 << 31);
                (label, k.select(negative, -weight, weight))
            }
            FisherKind::True => {
                let label = gumbel_argmax(k, logits, base, classes, |k, at| {
                    let x = word(k, at, stream, key, step);
                    gumbel(k, x)
                });
                (label, k.f32(weight))
            }
        };
        store_softmax_minus_onehot(k, logits, grad, base, classes, label, scale);
    });
    let args = vec![input(0), input(1), input(2), input(3), output(0)];
    launch(k.finish(), grid_for(rows), args)
}

/// The first class maximising `z + gumbel(index)` over the row at `base` (a loop: the draw is
/// long, and rows of 100 classes would unroll it 100 times).
fn gumbel_argmax(
    k: &mut KernelBuilder,
    logits: U64,
    base: Idx,
    classes: u64,
    gumbel: impl FnOnce(&mut KernelBuilder, Idx) -> F32,
) -> S32 {
    let best = k.f32(f32::NEG_INFINITY);
    let best_class: U32 = k.u32(0);
    k.for_u32(0u32, classes as u32, 1, |k, class| {
        let offset = k.idx(class);
        let at = k.idx_add(base, offset);
        let z = k.load(logits, at);
        let g = gumbel(k, at);
        let v = k.add(z, g);
        let better = k.cmp_f32(Cmp::Gt, v, best);
        let b = k.select(better, v, best);
        k.assign(best, b);
        let c = k.select_u(better, class, best_class);
        k.assign_u(best_class, c);
    });
    k.s32_from_u32(best_class)
}

/// `grad[row] = scale · (softmax(z) − onehot(label))` for the row of logits at `base`.
fn store_softmax_minus_onehot(
    k: &mut KernelBuilder,
    logits: U64,
    grad: U64,
    base: Idx,
    classes: u64,
    label: S32,
    scale: F32,
) {
    let (max, sum) = max_and_sum(k, logits, base, classes);
    for class in 0..classes {
        let at = k.idx_add_const(base, class);
        let z = k.load(logits, at);
        let e = exp_shifted(k, z, max);
        let p = k.div(e, sum);
        let is_label = k.cmp_s(Cmp::Eq, label, class as i32);
        let minus_one = k.sub(p, 1.0f32);
        let g = k.select(is_label, minus_one, p);
        let g = k.mul(g, scale);
        k.store(grad, at, g);
    }
}

/// exp(z − max).
fn exp_shifted(k: &mut KernelBuilder, z: F32, max: F32) -> F32 {
    let d = k.sub(z, max);
    let scaled = k.mul(d, LOG2_E);
    k.ex2(scaled)
}

/// The row's maximum and Σ exp(z − max).
fn max_and_sum(k: &mut KernelBuilder, logits: U64, base: Idx, classes: u64) -> (F32, F32) {
    let max = k.f32(f32::NEG_INFINITY);
    for class in 0..classes {
        let at = k.idx_add_const(base, class);
        let z = k.load(logits, at);
        let m = k.max(max, z);
        k.assign(max, m);
    }
    let sum = k.f32(0.0);
    for class in 0..classes {
        let at = k.idx_add_const(base, class);
        let z = k.load(logits, at);
        let e = exp_shifted(k, z, max);
        k.accumulate(sum, e);
    }
    (max, sum)
}

fn load_class(k: &mut KernelBuilder, logits: U64, base: Idx, label: S32) -> F32 {
    let class = k.u32_from_s32(label);
    let class = k.idx(class);
    let at = k.idx_add(base, class);
    k.load(logits, at)
}
