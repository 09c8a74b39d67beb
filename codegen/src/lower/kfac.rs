//! K-FAC's kernels (`fisherc_ir::ops::kfac`): the batch's Kronecker factors, one thread per
//! factor element with a loop over the batch and the positions, and the noise vector as a
//! Philox draw and two triangular-by-dense products, one thread per element each. Plain fp32
//! FMA: the factors run once every few steps and the noise's products are `O·D·(O + D)`,
//! small beside the step's convolutions. A factor element sums each example's positions
//! apart and then the examples, so no chain of fp32 additions is longer than the batch or
//! the positions (a batch of 4096 at 32 × 32 positions would be a chain of 4M).

use fisherc_ir::ops::{KfacGradFactor, KfacInputFactor, KfacNoise, Op};

use super::common::{Cx, grid_for, input, launch, map, output, scratch, strided_dot};
use super::rng::{normal, split};
use super::{Launch, Lowered};
use crate::builder::{F32, Idx, KernelBuilder, U32, U64};
use crate::kir::{BinOp, Cmp};

pub fn lower(cx: &Cx) -> Lowered {
    match cx.op {
        Op::KfacInputFactor(f) => Lowered::kernels(vec![input_factor(cx, f)]),
        Op::KfacGradFactor(_) => Lowered::kernels(vec![grad_factor(cx)]),
        Op::KfacNoise(n) => noise(cx, n),
        other => unreachable!("{} is not a K-FAC op", other.name()),
    }
}

/// The element `[i, j]` of an `side × side` factor this thread computes, and whether the
/// step refreshes the factors (`refresh ≠ 0`; else the factor is zeros and no product runs).
fn factor_element(k: &mut KernelBuilder, e: Idx, side: u64, refresh: U64) -> (U32, U32, F32) {
    let (i, j) = (k.idx_div_const(e, side), k.idx_rem_const(e, side));
    let (i, j) = (k.idx_to_u32(i), k.idx_to_u32(j));
    let flag = k.load(refresh, 0u32);
    (i, j, flag)
}

/// A factor element's `Σₙ Σₜ a·b` over `batch` examples of `positions` positions, each
/// example's positions summed apart first (so no fp32 chain is longer than the batch or the
/// positions): `example(n)` gives what an example's pairs share, `pair(example, t)` the two
/// values (a, b) at position t. Zero, with no loop run, where `flag` (the refresh) is 0.
fn factor_sum<E: Copy>(
    k: &mut KernelBuilder,
    (flag, batch, positions): (F32, u64, u64),
    example: impl FnOnce(&mut KernelBuilder, Idx) -> E,
    pair: impl FnOnce(&mut KernelBuilder, E, Idx) -> [F32; 2],
) -> F32 {
    let acc = k.f32(0.0);
    let refreshes = k.cmp_f32(Cmp::Ne, flag, 0.0f32);
    k.when(refreshes, |k| {
        let (start, one) = (k.idx_const(0), k.idx_const(1));
        k.for_idx(start, batch, one, |k, n| {
            let example = example(k, n);
            let (start, one) = (k.idx_const(0), k.idx_const(1));
            let own = k.f32(0.0);
            k.for_idx(start, positions, one, |k, t| {
                let [a, b] = pair(k, example, t);
                k.fma_into(own, a, b);
            });
            k.accumulate(acc, own);
        });
    });
    acc
}

/// One element of a patch: (channel, kernel row, kernel column) of patch row `row`, and
/// whether the row is the bias's constant 1.
struct PatchRow {
    c: U32,
    ki: U32,
    kj: U32,
    is_one: crate::builder::Pred,
}

/// `Ā[i][j] = (1/(N·T)) Σ_{n,t} a_i a_j`, `a` example n's patch at output position t (zero in
/// the padding) with the bias's 1 last.
fn input_factor(cx: &Cx, f: &KfacInputFactor) -> Launch {
    let g = f
        .geometry(&cx.inputs[0].shape)
        .expect("a typed graph's geometry");
    let (batch, side, positions) = (
        cx.inputs[0].shape[0] as u64,
        f.side(&g) as u64,
        g.positions(),
    );
    let (area, plane) = (g.kernel_h * g.kernel_w, g.height * g.width);
    let mut k = cx.builder("input_factor");
    let (x, refresh, out) = (k.ptr_param("x"), k.ptr_param("refresh"), k.ptr_param("out"));
    map(&mut k, side * side, |k, e| {
        let (i, j, flag) = factor_element(k, e, side, refresh);
        let rows = [i, j].map(|r| {
            let c = k.ubin(BinOp::Div, r, area as u32);
            let tap = k.ubin(BinOp::Rem, r, area as u32);
            PatchRow {
                c,
                ki: k.ubin(BinOp::Div, tap, g.kernel_w as u32),
                kj: k.ubin(BinOp::Rem, tap, g.kernel_w as u32),
                is_one: k.cmp_u(Cmp::Ge, r, g.patch_len() as u32),
            }
        });
        let example = |k: &mut KernelBuilder, n| k.idx_mul_const(n, g.input_len() as u64);
        let pair = |k: &mut KernelBuilder, example, t| {
            let (oy, ox) = (
                k.idx_div_const(t, g.out_w as u64),
                k.idx_rem_const(t, g.out_w as u64),
            );
            let (oy, ox) = (k.idx_to_u32(oy), k.idx_to_u32(ox));
            rows.each_ref()
                .map(|row| patch_value(k, (x, example), (&g, plane), row, (oy, ox)))
        };
        let acc = factor_sum(k, (flag, batch, positions as u64), example, pair);
        let mean = k.mul(acc, (1.0 / (batch * positions as u64) as f64) as f32);
        k.store(out, e, mean);
    });
    launch(
        k.finish(),
        grid_for(side * side),
        vec![input(0), input(1), output(0)],
    )
}

/// Patch row `row` of the example at `example` at output position (oy, ox): its pixel, zero
/// in the padding, or 1 for the bias's row. Coordinates wrap below zero (u32), so one
/// unsigned compare per axis checks both ends.
fn patch_value(
    k: &mut KernelBuilder,
    (x, example): (U64, Idx),
    (g, plane): (&fisherc_ir::cpu::ConvGeom, usize),
    row: &PatchRow,
    (oy, ox): (U32, U32),
) -> F32 {
    let y0 = k.mul_u(oy, g.stride as u32);
    let iy = k.add_u(y0, row.ki);
    let iy = k.ubin(BinOp::Sub, iy, g.padding as u32);
    let x0 = k.mul_u(ox, g.stride as u32);
    let ix = k.add_u(x0, row.kj);
    let ix = k.ubin(BinOp::Sub, ix, g.padding as u32);
    let (in_y, in_x) = (
        k.cmp_u(Cmp::Lt, iy, g.height as u32),
        k.cmp_u(Cmp::Lt, ix, g.width as u32),
    );
    let inside = k.and(in_y, in_x);
    let is_pixel = k.not(row.is_one);
    let inside = k.and(inside, is_pixel);
    let within = k.mad_u(iy, g.width as u32, ix);
    let within = k.mad_u(row.c, plane as u32, within);
    let within = k.select_u(inside, within, 0u32);
    let within = k.idx(within);
    let at = k.idx_add(example, within);
    let pixel = k.load(x, at);
    let pixel = k.select(inside, pixel, 0.0f32);
    k.select(row.is_one, 1.0f32, pixel)
}

/// `Ḡ[i][j] = (N/T) Σ_{n,t} dy[n][i][t]·dy[n][j][t]`.
fn grad_factor(cx: &Cx) -> Launch {
    let shape = &cx.inputs[0].shape;
    let (batch, o) = (shape[0] as u64, shape[1] as u64);
    let positions: u64 = shape[2..].iter().product::<usize>() as u64;
    let mut k = cx.builder("grad_factor");
    let (dy, refresh, out) = (
        k.ptr_param("dy"),
        k.ptr_param("refresh"),
        k.ptr_param("out"),
    );
    map(&mut k, o * o, |k, e| {
        let (i, j, flag) = factor_element(k, e, o, refresh);
        let rows = [i, j].map(|r| {
            let r = k.idx(r);
            k.idx_mul_const(r, positions)
        });
        let example = |k: &mut KernelBuilder, n| k.idx_mul_const(n, o * positions);
        let pair = |k: &mut KernelBuilder, example, t| {
            let at = k.idx_add(example, t);
            rows.map(|row| {
                let at = k.idx_add(at, row);
                k.load(dy, at)
            })
        };
        let acc = factor_sum(k, (flag, batch, positions), example, pair);
        let scale = KfacGradFactor::scale(batch as usize, positions as usize) as f32;
        let factor = k.mul(acc, scale);
        k.store(out, e, factor);
    });
    launch(
        k.finish(),
        grid_for(o * o),
        vec![input(0), input(1), output(0)],
    )
}

/// `e = √T·L_G Ξ L_Aᵀ` in three launches: Ξ drawn into scratch 0, `L_G Ξ` into scratch 1,
/// then each element of `(L_G Ξ) L_Aᵀ`, scaled and written to the weight's output or, in the
/// last column, the bias's.
fn noise(cx: &Cx, n: &KfacNoise) -> Lowered {
    let (rows, cols) = n.dims();
    let (rows, cols) = (rows as u64, cols as u64);
    let elements = rows * cols;
    let bytes = 4 * elements;
    Lowered::Kernels {
        launches: vec![
            draw(cx, n),
            lower_times_xi(cx, (rows, cols)),
            times_upper(cx, n),
        ],
        scratch: vec![bytes, bytes],
    }
}

/// Ξ: the weight's columns from its parameter's stream, in its row-major order; the bias
/// column from the bias's stream, element i in row i.
fn draw(cx: &Cx, n: &KfacNoise) -> Launch {
    let (rows, cols) = n.dims();
    let weight_cols = (cols - n.bias.is_some() as usize) as u64;
    let mut k = cx.builder("draw");
    let (seed, step, xi) = (k.ptr_param("seed"), k.ptr_param("step"), k.ptr_param("xi"));
    let (seed, step) = (k.load_u64(seed, 0), k.load_u64(step, 0));
    let (key, counter) = (split(&mut k, seed), split(&mut k, step));
    let (key, counter) = ([key.0, key.1], [counter.0, counter.1]);
    map(&mut k, (rows * cols) as u64, |k, e| {
        let (i, j) = (
            k.idx_div_const(e, cols as u64),
            k.idx_rem_const(e, cols as u64),
        );
        let in_weight = k.idx_lt(j, weight_cols);
        let value = k.f32(0.0);
        k.when(in_weight, |k| {
            let at = k.idx_mad(i, weight_cols, j);
            let stream = k.u32(n.weight);
            let v = normal(k, at, stream, key, counter);
            k.assign(value, v);
        });
        if let Some(bias) = n.bias {
            let in_bias = k.not(in_weight);
            k.when(in_bias, |k| {
                let stream = k.u32(bias);
                let v = normal(k, i, stream, key, counter);
                k.assign(value, v);
            });
        }
        k.store(xi, e, value);
    });
    launch(
        k.finish(),
        grid_for((rows * cols) as u64),
        vec![input(2), input(3), scratch(0)],
    )
}

/// `left[i][j] = Σ_k L_G[i][k]·Ξ[k][j]`.
fn lower_times_xi(cx: &Cx, (rows, cols): (u64, u64)) -> Launch {
    let mut k = cx.builder("lower_times_xi");
    let (l_g, xi, left) = (k.ptr_param("l_g"), k.ptr_param("xi"), k.ptr_param("left"));
    map(&mut k, rows * cols, |k, e| {
        let (i, j) = (k.idx_div_const(e, cols), k.idx_rem_const(e, cols));
        let row = k.idx_mul_const(i, rows);
        let acc = strided_dot(k, (l_g, row, 1), (xi, j, cols), rows);
        k.store(left, e, acc);
    });
    launch(
        k.finish(),
        grid_for(rows * cols),
        vec![input(1), scratch(0), scratch(1)],
    )
}

/// `e[i][j] = √T·Σ_k left[i][k]·L_A[j][k]`, the weight's columns to output 0, the bias's to
/// output 1.
fn times_upper(cx: &Cx, n: &KfacNoise) -> Launch {
    let (rows, cols) = n.dims();
    let (rows, cols) = (rows as u64, cols as u64);
    let weight_cols = cols - n.bias.is_some() as u64;
    let mut k = cx.builder("times_upper");
    let (l_a, left, weight) = (
        k.ptr_param("l_a"),
        k.ptr_param("left"),
        k.ptr_param("weight"),
    );
    let bias = n.bias.map(|_| k.ptr_param("bias"));
    map(&mut k, rows * cols, |k, e| {
        let (i, j) = (k.idx_div_const(e, cols), k.idx_rem_const(e, cols));
        let (left_row, a_row) = (k.idx_mul_const(i, cols), k.idx_mul_const(j, cols));
        let acc = strided_dot(k, (left, left_row, 1), (l_a, a_row, 1), cols);
        let value = k.mul(acc, n.factor() as f32);
        let in_weight = k.idx_lt(j, weight_cols);
        k.when(in_weight, |k| {
            let at = k.idx_mad(i, weight_cols, j);
            k.store(weight, at, value);
        });
        if let Some(bias) = bias {
            let in_bias = k.not(in_weight);
            k.when(in_bias, |k| k.store(bias, i, value));
        }
    });
    let mut args = vec![input(0), scratch(1), output(0)];
    if n.bias.is_some() {
        args.push(output(1));
    }
    launch(k.finish(), grid_for(rows * cols), args)
}
