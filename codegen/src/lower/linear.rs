//! Fully connected layers: one thread per output element with a dot-product loop.

use fisherc_ir::ops::Op;

use super::common::{Cx, grid_for, input, launch, map, output, strided_dot};
use super::{Launch, Lowered};
use crate::builder::{F32, Idx, KernelBuilder, U64};

pub fn lower(cx: &Cx) -> Lowered {
    let shape = |t: &fisherc_ir::tensor::TensorType| (t.shape[0] as u64, t.shape[1] as u64);
    Lowered::kernels(vec![match cx.op {
        Op::Linear(l) => {
            let ((n, i), (o, _)) = (shape(cx.inputs[0]), shape(cx.inputs[1]));
            // y[n, o] = Σᵢ x[n, i]·w[o, i] (+ b[o])
            dot(cx, "forward", n * o, i, l.bias, move |k, e| {
                let (row, col) = (k.idx_div_const(e, o), k.idx_rem_const(e, o));
                (
                    k.idx_mul_const(row, i),
                    1,
                    k.idx_mul_const(col, i),
                    1,
                    Some(col),
                )
            })
        }
        Op::LinearDgrad(_) => {
            let ((n, o), (_, i)) = (shape(cx.inputs[0]), shape(cx.inputs[1]));
            // dx[n, i] = Σₒ dy[n, o]·w[o, i]
            dot(cx, "dgrad", n * i, o, false, move |k, e| {
                let (row, col) = (k.idx_div_const(e, i), k.idx_rem_const(e, i));
                (k.idx_mul_const(row, o), 1, col, i, None)
            })
        }
        Op::LinearWgrad(_) => {
            let ((n, i), (_, o)) = (shape(cx.inputs[0]), shape(cx.inputs[1]));
            // dw[o, i] = Σₙ dy[n, o]·x[n, i], computed as Σₙ x·dy
            dot(cx, "wgrad", o * i, n, false, move |k, e| {
                let (row, col) = (k.idx_div_const(e, i), k.idx_rem_const(e, i));
                (col, i, row, o, None)
            })
        }
        Op::LinearWgradPerExample(_) => per_example(cx),
        Op::LinearWgradSq(_) => with_squares(cx),
        other => unreachable!("{} is not a linear op", other.name()),
    }])
}

/// Output element e = Σⱼ a[a0 + j·a_step]·b[b0 + j·b_step] (+ bias[bias_at]) over `len` terms,
/// where `layout(e)` gives (a0, a_step, b0, b_step, bias_at).
fn dot(
    cx: &Cx,
    part: &str,
    outputs: u64,
    len: u64,
    bias: bool,
    layout: impl FnOnce(&mut KernelBuilder, Idx) -> (Idx, u64, Idx, u64, Option<Idx>),
) -> Launch {
    let mut k = cx.builder(part);
    let (a, b) = (k.ptr_param("a"), k.ptr_param("b"));
    let bias_ptr = bias.then(|| k.ptr_param("bias"));
    let y = k.ptr_param("y");
    map(&mut k, outputs, |k, e| {
        let (a0, a_step, b0, b_step, bias_at) = layout(k, e);
        let acc = strided_dot(k, (a, a0, a_step), (b, b0, b_step), len);
        if let (Some(p), Some(at)) = (bias_ptr, bias_at) {
            let v = k.load(p, at);
            k.accumulate(acc, v);
        }
        k.store(y, e, acc);
    });
    let mut args: Vec<_> = (0..cx.inputs.len()).map(input).collect();
    args.push(output(0));
    launch(k.finish(), grid_for(outputs), args)
}

/// dw_n[o, i] = dy[n, o]·x[n, i].
fn per_example(cx: &Cx) -> Launch {
    let (i, o) = (cx.inputs[0].shape[1] as u64, cx.inputs[1].shape[1] as u64);
    let total = cx.outputs[0].numel() as u64;
    let mut k = cx.builder("per_example");
    let (x, dy, out) = (k.ptr_param("x"), k.ptr_param("dy"), k.ptr_param("out"));
    map(&mut k, total, |k, e| {
        let col = k.idx_rem_const(e, i);
        let rest = k.idx_div_const(e, i);
        let n = k.idx_div_const(rest, o);
        let xi = k.idx_mad(n, i, col);
        let v = k.load(x, xi);
        let g = k.load(dy, rest);
        let p = k.mul(g, v);
        k.store(out, e, p);
    });
    launch(
        k.finish(),
        grid_for(total),
        vec![input(0), input(1), output(0)],
    )
}

/// (dw, Σₙ dy²·x²) in one pass over the batch.
fn with_squares(cx: &Cx) -> Launch {
    let (n, i) = (cx.inputs[0].shape[0] as u64, cx.inputs[0].shape[1] as u64);
    let o = cx.inputs[1].shape[1] as u64;
    let mut k = cx.builder("wgrad_sq");
    let (x, dy, dw, sq) = (
        k.ptr_param("x"),
        k.ptr_param("dy"),
        k.ptr_param("dw"),
        k.ptr_param("squares"),
    );
    map(&mut k, o * i, |k, e| {
        let (row, col) = (k.idx_div_const(e, i), k.idx_rem_const(e, i));
        let (acc, acc_sq) = (k.f32(0.0), k.f32(0.0));
        let start = k.idx_const(0);
        let one = k.idx_const(1);
        k.for_idx(start, n, one, |k, b| {
            let (v, g) = (load_at(k, x, b, i, col), load_at(k, dy, b, o, row));
            k.fma_into(acc, v, g);
            let (v2, g2): (F32, F32) = (k.mul(v, v), k.mul(g, g));
            k.fma_into(acc_sq, v2, g2);
        });
        k.store(dw, e, acc);
        k.store(sq, e, acc_sq);
    });
    launch(
        k.finish(),
        grid_for(o * i),
        vec![input(0), input(1), output(0), output(1)],
    )
}

/// `p[row·width + col]`.
fn load_at(k: &mut KernelBuilder, p: U64, row: Idx, width: u64, col: Idx) -> F32 {
    let at = k.idx_mad(row, width, col);
    k.load(p, at)
}
