//! Kernels of one thread per output element: arithmetic, ReLU and its mask, elementwise
//! programs, the option-A shortcut and its backward, the global-average-pool backward, and the
//! batch mean (which loops over the batch in each thread, in the reference's order).

use fisherc_ir::ops::{Instr, Op};

use super::Lowered;
use super::common::{Cx, grid_for, input, launch, map, output, unflatten};
use crate::builder::{F32, KernelBuilder};
use crate::kir::Cmp;

pub fn lower(cx: &Cx) -> Lowered {
    let launch = match cx.op {
        Op::Add(_) => pointwise(cx, &[Instr::Input(0), Instr::Input(1), Instr::Add(0, 1)]),
        Op::Scale(s) => pointwise(cx, &[Instr::Input(0), Instr::Scale(0, s.factor)]),
        Op::Square(_) => pointwise(cx, &[Instr::Input(0), Instr::Square(0)]),
        Op::Relu(_) => pointwise(cx, &[Instr::Input(0), Instr::Relu(0)]),
        Op::ReluBackward(_) => pointwise(
            cx,
            &[Instr::Input(0), Instr::Input(1), Instr::ReluMask(0, 1)],
        ),
        Op::Elementwise(e) => pointwise(cx, &e.program),
        Op::ShortcutA(s) => shortcut_a(cx, s.stride as u64, s.pad_before as u64),
        Op::ShortcutABackward(s) => {
            shortcut_a_backward(cx, s.forward.stride as u64, s.forward.pad_before as u64)
        }
        Op::GlobalAvgPoolBackward(_) => avg_pool_backward(cx),
        Op::BatchMean(_) => batch_mean(cx),
        other => unreachable!("{} is not an elementwise op", other.name()),
    };
    Lowered::kernels(vec![launch])
}

/// Evaluates an elementwise program on loaded values, step by step as the reference does.
fn program(k: &mut KernelBuilder, program: &[Instr], inputs: &[F32]) -> F32 {
    let mut done: Vec<F32> = Vec::with_capacity(program.len());
    for step in program {
        let value = match *step {
            Instr::Input(i) => inputs[i],
            Instr::Add(a, b) => k.add(done[a], done[b]),
            Instr::Scale(a, f) => k.mul(done[a], f.0 as f32),
            Instr::Square(a) => k.mul(done[a], done[a]),
            Instr::Relu(a) => k.max(done[a], 0.0f32),
            Instr::ReluMask(g, y) => {
                let positive = k.cmp_f32(Cmp::Gt, done[y], 0.0f32);
                k.select(positive, done[g], 0.0f32)
            }
        };
        done.push(value);
    }
    *done.last().expect("programs are not empty")
}

fn pointwise(cx: &Cx, steps: &[Instr]) -> super::Launch {
    let n = cx.outputs[0].numel() as u64;
    let mut k = cx.builder("map");
    let ins: Vec<_> = (0..cx.inputs.len())
        .map(|i| k.ptr_param(&format!("in{i}")))
        .collect();
    let out = k.ptr_param("out");
    map(&mut k, n, |k, i| {
        let values: Vec<F32> = ins.iter().map(|&p| k.load(p, i)).collect();
        let y = program(k, steps, &values);
        k.store(out, i, y);
    });
    let mut args: Vec<_> = (0..cx.inputs.len()).map(input).collect();
    args.push(output(0));
    launch(k.finish(), grid_for(n), args)
}

fn shortcut_a(cx: &Cx, stride: u64, pad_before: u64) -> super::Launch {
    let (x, y) = (&cx.inputs[0].shape, &cx.outputs[0].shape);
    let (c_in, h, w) = (x[1] as u64, x[2] as u64, x[3] as u64);
    let (c_out, ho, wo) = (y[1] as u64, y[2] as u64, y[3] as u64);
    let n = cx.outputs[0].numel() as u64;
    let mut k = cx.builder("gather");
    let (src, dst) = (k.ptr_param("x"), k.ptr_param("y"));
    map(&mut k, n, |k, i| {
        let [batch, c, row, j] = unflatten(k, i, [c_out, ho, wo]);
        let value = k.f32(0.0);
        // c − pad_before in [0, c_in): compare without going negative
        let c_lo = k.idx_lt(c, pad_before);
        let c_hi = k.idx_lt(c, pad_before + c_in);
        let not_lo = k.not(c_lo);
        let inside = k.and(not_lo, c_hi);
        k.when(inside, |k| {
            let channel = k.idx_sub_const(c, pad_before);
            let plane = k.idx_mad(batch, c_in, channel);
            let source_row = k.idx_mul_const(row, stride);
            let base = k.idx_mad(plane, h, source_row);
            let column = k.idx_mul_const(j, stride);
            let at = k.idx_mad(base, w, column);
            let v = k.load(src, at);
            k.assign(value, v);
        });
        k.store(dst, i, value);
    });
    launch(k.finish(), grid_for(n), vec![input(0), output(0)])
}

fn shortcut_a_backward(cx: &Cx, stride: u64, pad_before: u64) -> super::Launch {
    let (dy, dx) = (&cx.inputs[0].shape, &cx.outputs[0].shape);
    let (c_out, ho, wo) = (dy[1] as u64, dy[2] as u64, dy[3] as u64);
    let (c_in, h, w) = (dx[1] as u64, dx[2] as u64, dx[3] as u64);
    let n = cx.outputs[0].numel() as u64;
    let mut k = cx.builder("scatter");
    let (src, dst) = (k.ptr_param("dy"), k.ptr_param("dx"));
    map(&mut k, n, |k, i| {
        let [batch, c, row, col] = unflatten(k, i, [c_in, h, w]);
        let value = k.f32(0.0);
        let row_rem = k.idx_rem_const(row, stride);
        let col_rem = k.idx_rem_const(col, stride);
        let row_u = k.idx_to_u32(row_rem);
        let col_u = k.idx_to_u32(col_rem);
        let on_row = k.cmp_u(Cmp::Eq, row_u, 0u32);
        let on_col = k.cmp_u(Cmp::Eq, col_u, 0u32);
        let copied = k.and(on_row, on_col);
        k.when(copied, |k| {
            let channel = k.idx_add_const(c, pad_before);
            let out_plane = k.idx_mad(batch, c_out, channel);
            let out_row = k.idx_div_const(row, stride);
            let base = k.idx_mad(out_plane, ho, out_row);
            let out_col = k.idx_div_const(col, stride);
            let at = k.idx_mad(base, wo, out_col);
            let v = k.load(src, at);
            k.assign(value, v);
        });
        k.store(dst, i, value);
    });
    launch(k.finish(), grid_for(n), vec![input(0), output(0)])
}

fn avg_pool_backward(cx: &Cx) -> super::Launch {
    let dx = &cx.outputs[0];
    let positions = (dx.shape[2] * dx.shape[3]) as u64;
    let inv = 1.0f32 / positions as f32;
    let n = dx.numel() as u64;
    let mut k = cx.builder("spread");
    let (src, dst) = (k.ptr_param("dy"), k.ptr_param("dx"));
    map(&mut k, n, |k, i| {
        let plane = k.idx_div_const(i, positions);
        let g = k.load(src, plane);
        let v = k.mul(g, inv);
        k.store(dst, i, v);
    });
    launch(k.finish(), grid_for(n), vec![input(0), output(0)])
}

fn batch_mean(cx: &Cx) -> super::Launch {
    let batch = cx.inputs[0].shape[0] as u64;
    let len = cx.outputs[0].numel() as u64;
    let inv = 1.0f32 / batch as f32;
    let mut k = cx.builder("mean");
    let (src, dst) = (k.ptr_param("x"), k.ptr_param("mean"));
    map(&mut k, len, |k, i| {
        let total = k.f32(0.0);
        let start = k.idx_const(0);
        let step = k.idx_const(1);
        k.for_idx(start, batch, step, |k, n| {
            let at = k.idx_mad(n, len, i);
            let v = k.load(src, at);
            k.accumulate(total, v);
        });
        let mean = k.mul(total, inv);
        k.store(dst, i, mean);
    });
    launch(k.finish(), grid_for(len), vec![input(0), output(0)])
}
