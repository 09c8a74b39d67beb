//! Pooling: max pooling and its backward (the first maximum of a window wins, as in the
//! reference; the backward recomputes it), and global average pooling (a per-plane sum).

use fisherc_ir::ops::Op;

use super::common::{Cx, Planes, grid_for, input, launch, map, output, per_plane};
use super::{Launch, Lowered};
use crate::builder::{F32, Idx, KernelBuilder, U32};
use crate::kir::{BinOp, Cmp};

pub fn lower(cx: &Cx) -> Lowered {
    Lowered::kernels(vec![match cx.op {
        Op::MaxPool(p) => max_pool(cx, p.kernel as u32, p.stride as u32),
        Op::MaxPoolBackward(p) => max_pool_backward(cx, p.kernel as u32, p.stride as u32),
        Op::GlobalAvgPool(_) => global_avg_pool(cx),
        other => unreachable!("{} is not a pooling op", other.name()),
    }])
}

/// Geometry of one example's pooling: input `h × w`, output `ho × wo`.
#[derive(Clone, Copy)]
struct Window {
    h: u32,
    w: u32,
    ho: u32,
    wo: u32,
    kernel: u32,
    stride: u32,
}

impl Window {
    fn of(x: &[usize], kernel: u32, stride: u32) -> Window {
        let (h, w) = (x[2] as u32, x[3] as u32);
        Window {
            h,
            w,
            ho: (h - kernel) / stride + 1,
            wo: (w - kernel) / stride + 1,
            kernel,
            stride,
        }
    }

    /// The max of window (oy, ox) of the plane starting at `base`, and its position in the plane
    /// (first maximum in row-major order).
    fn argmax(
        &self,
        k: &mut KernelBuilder,
        x: crate::builder::U64,
        base: Idx,
        oy: U32,
        ox: U32,
    ) -> (F32, U32) {
        let top = k.mul_u(oy, self.stride);
        let left = k.mul_u(ox, self.stride);
        let origin = k.mad_u(top, self.w, left);
        let at = k.idx(origin);
        let first = k.idx_add(base, at);
        let best = k.load(x, first);
        let best_at = k.u32(0);
        k.assign_u(best_at, origin);
        for ky in 0..self.kernel {
            for kx in 0..self.kernel {
                let offset = k.add_u(origin, ky * self.w + kx);
                let at = k.idx(offset);
                let at = k.idx_add(base, at);
                let v = k.load(x, at);
                let larger = k.cmp_f32(Cmp::Gt, v, best);
                k.when(larger, |k| {
                    k.assign(best, v);
                    k.assign_u(best_at, offset);
                });
            }
        }
        (best, best_at)
    }
}

fn max_pool(cx: &Cx, kernel: u32, stride: u32) -> Launch {
    let win = Window::of(&cx.inputs[0].shape, kernel, stride);
    let n = cx.outputs[0].numel() as u64;
    let out_plane = (win.ho * win.wo) as u64;
    let mut k = cx.builder("max");
    let (x, y) = (k.ptr_param("x"), k.ptr_param("y"));
    map(&mut k, n, |k, i| {
        let plane = k.idx_div_const(i, out_plane);
        let base = k.idx_mul_const(plane, (win.h * win.w) as u64);
        let position = k.idx_rem_const(i, out_plane);
        let position = k.idx_to_u32(position);
        let oy = k.ubin(BinOp::Div, position, win.wo);
        let ox = k.ubin(BinOp::Rem, position, win.wo);
        let (best, _) = win.argmax(k, x, base, oy, ox);
        k.store(y, i, best);
    });
    launch(k.finish(), grid_for(n), vec![input(0), output(0)])
}

/// One thread per input element: the sum of the output gradients of the windows whose first
/// maximum it is, windows in row-major order.
fn max_pool_backward(cx: &Cx, kernel: u32, stride: u32) -> Launch {
    let win = Window::of(&cx.inputs[1].shape, kernel, stride);
    let n = cx.outputs[0].numel() as u64;
    let in_plane = (win.h * win.w) as u64;
    // output rows (or columns) whose window can cover a given input row: at most this many
    let reach = kernel.div_ceil(stride);
    let mut k = cx.builder("route");
    let (dy, x, dx) = (k.ptr_param("dy"), k.ptr_param("x"), k.ptr_param("dx"));
    map(&mut k, n, |k, i| {
        let plane = k.idx_div_const(i, in_plane);
        let base = k.idx_mul_const(plane, in_plane);
        let out_base = k.idx_mul_const(plane, (win.ho * win.wo) as u64);
        let position = k.idx_rem_const(i, in_plane);
        let position = k.idx_to_u32(position);
        let iy = k.ubin(BinOp::Div, position, win.w);
        let ix = k.ubin(BinOp::Rem, position, win.w);
        let (iy_s, ix_s) = (k.s32_from_u32(iy), k.s32_from_u32(ix));
        let total = k.f32(0.0);
        for dy_back in (0..reach as i32).rev() {
            for dx_back in (0..reach as i32).rev() {
                // candidate window: oy = iy / stride − back
                let oy = {
                    let q = k.sbin(BinOp::Div, iy_s, stride as i32);
                    k.sbin(BinOp::Sub, q, dy_back)
                };
                let ox = {
                    let q = k.sbin(BinOp::Div, ix_s, stride as i32);
                    k.sbin(BinOp::Sub, q, dx_back)
                };
                let in_rows = k.in_range_s(oy, 0, win.ho as i32);
                let in_cols = k.in_range_s(ox, 0, win.wo as i32);
                let exists = k.and(in_rows, in_cols);
                k.when(exists, |k| {
                    // the window must also reach this element
                    let top = k.sbin(BinOp::Mul, oy, stride as i32);
                    let left = k.sbin(BinOp::Mul, ox, stride as i32);
                    let below = k.sbin(BinOp::Sub, iy_s, top);
                    let right = k.sbin(BinOp::Sub, ix_s, left);
                    let covers_row = k.in_range_s(below, 0, kernel as i32);
                    let covers_col = k.in_range_s(right, 0, kernel as i32);
                    let covers = k.and(covers_row, covers_col);
                    k.when(covers, |k| {
                        let (oy, ox) = (k.u32_from_s32(oy), k.u32_from_s32(ox));
                        let (_, winner) = win.argmax(k, x, base, oy, ox);
                        let won = k.cmp_u(Cmp::Eq, winner, position);
                        k.when(won, |k| {
                            let at = k.mad_u(oy, win.wo, ox);
                            let at = k.idx(at);
                            let at = k.idx_add(out_base, at);
                            let g = k.load(dy, at);
                            k.accumulate(total, g);
                        });
                    });
                });
            }
        }
        k.store(dx, i, total);
    });
    launch(k.finish(), grid_for(n), vec![input(0), input(1), output(0)])
}

fn global_avg_pool(cx: &Cx) -> Launch {
    let planes = Planes::of(cx.inputs[0]);
    let inv = 1.0f32 / planes.positions as f32;
    let mut k = cx.builder("average");
    let (x, y) = (k.ptr_param("x"), k.ptr_param("y"));
    per_plane(
        &mut k,
        planes,
        |k, i, _, _, _| vec![k.load(x, i)],
        |k, totals, c, n| {
            let plane = k.mad_u(n, planes.channels as u32, c);
            let mean = k.mul(totals[0], inv);
            k.store(y, plane, mean);
        },
    );
    launch(k.finish(), planes.grid(), vec![input(0), output(0)])
}
