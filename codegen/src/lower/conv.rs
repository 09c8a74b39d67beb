//! Convolutions (no tensor cores yet): forward as a tiled implicit GEMM (`gemm.rs`) with the
//! BN-apply + ReLU prologue and the BN-statistics epilogue; direct loops for the rest: data gradient with the ReLU-backward mask and BN-backward
//! reductions (and their squares) in the epilogue; weight gradient with the prologue
//! recomputed and, in the same pass, the Fisher squares: each thread reduces one example's
//! positions for its weight element, then adds both the value and its square, so no
//! per-example gradient ever reaches memory.

use fisherc_ir::ops::{Conv2d, ConvDgrad, ConvWgrad, FloatAttr, Op, Squares};

use super::Lowered;
use super::common::{
    BnParams, Combine, Cx, Planes, bn_apply, bn_combine, bn_terms, combine_channels, grid_for,
    input, inv_std, launch, map, normalised, output, partials_bytes, per_plane, scratch,
    store_partials, sum_rows,
};
use super::gemm::{GemmShape, THREADS, Tiling, column_sums, tiled_gemm};
use crate::builder::{F32, Idx, KernelBuilder, Pred, S32, U32, U64};
use crate::kir::{BinOp, Cmp};

pub fn lower(cx: &Cx) -> Lowered {
    match cx.op {
        Op::Conv2d(conv) => forward(cx, conv, None, false),
        Op::FusedConv(f) => forward(cx, &f.conv, f.prologue, f.stats),
        Op::ConvDgrad(d) => dgrad(cx, d, None),
        Op::FusedDgrad(f) => dgrad(cx, &f.dgrad, Some((f.eps, f.squares))),
        Op::ConvWgrad(w) => wgrad(cx, w, None, Squares::None, false),
        Op::ConvWgradPerExample(w) => wgrad(cx, &w.0, None, Squares::None, true),
        Op::FusedWgrad(f) => wgrad(cx, &f.wgrad, f.prologue, f.squares, false),
        other => unreachable!("{} is not a convolution", other.name()),
    }
}

/// Sizes of one convolution: input `c × h × w`, output `o × ho × wo`, `kh × kw` kernel.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    batch: u32,
    c: u32,
    h: u32,
    w: u32,
    o: u32,
    ho: u32,
    wo: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad: u32,
}

impl Geometry {
    fn new(x: &[usize], weight: &[usize], y: &[usize], stride: usize, pad: usize) -> Geometry {
        let u = |v: usize| v as u32;
        Geometry {
            batch: u(x[0]),
            c: u(x[1]),
            h: u(x[2]),
            w: u(x[3]),
            o: u(weight[0]),
            ho: u(y[2]),
            wo: u(y[3]),
            kh: u(weight[2]),
            kw: u(weight[3]),
            stride: u(stride),
            pad: u(pad),
        }
    }

    fn kernel_area(&self) -> u32 {
        self.kh * self.kw
    }

    /// The input coordinate `out·stride + offset − pad` (offset a register) and whether it
    /// lies in `0..size`.
    fn input_coordinate(
        &self,
        k: &mut KernelBuilder,
        out: U32,
        offset: U32,
        size: u32,
    ) -> (S32, Pred) {
        let scaled = k.mad_u(out, self.stride, offset);
        let scaled = k.s32_from_u32(scaled);
        let at = k.sbin(BinOp::Sub, scaled, self.pad as i32);
        let inside = k.in_range_s(at, 0, size as i32);
        (at, inside)
    }
}

/// Per-channel BN-apply + ReLU of a prologue: `relu((x − mean)·scale + β)` as the reference.
struct Prologue {
    mean: F32,
    scale: F32,
    beta: F32,
}

impl Prologue {
    fn load(k: &mut KernelBuilder, p: &BnParams, c: U32) -> Prologue {
        let inv = inv_std(k, p.var, c, p.eps);
        let g = k.load(p.gamma, c);
        let scale = k.mul(g, inv);
        Prologue {
            mean: k.load(p.mean, c),
            scale,
            beta: k.load(p.beta, c),
        }
    }

    fn apply(&self, k: &mut KernelBuilder, x: F32) -> F32 {
        let centred = k.sub(x, self.mean);
        let scaled = k.mul(centred, self.scale);
        let z = k.add(scaled, self.beta);
        k.max(z, 0.0f32)
    }
}

/// The prologue's statistics pointers, read from the kernel's parameters.
fn prologue_params(k: &mut KernelBuilder, prologue: Option<FloatAttr>) -> Option<BnParams> {
    prologue.map(|eps| BnParams::declare(k, eps.0 as f32))
}

/// The forward convolution as an implicit GEMM per example (`gemm.rs`): C[p][o] over the
/// example's output positions p and output channels o, K running over (c, ki, kj). A gathers
/// the input window (the BN-apply + ReLU prologue applied on load, padding zero), B reads the
/// weights. The statistics epilogue sums each tile's columns into per-(example, tile)
/// partials, which a second kernel adds in order.
fn forward(cx: &Cx, conv: &Conv2d, prologue: Option<FloatAttr>, stats: bool) -> Lowered {
    let first = if prologue.is_some() { 5 } else { 1 };
    let g = Geometry::new(
        &cx.inputs[0].shape,
        &cx.inputs[first].shape,
        &cx.outputs[0].shape,
        conv.stride,
        conv.padding,
    );
    let positions = g.ho * g.wo;
    let shape = GemmShape {
        m: positions,
        n: g.o,
        k: g.c * g.kernel_area(),
    };
    let tiling = Tiling::for_columns(g.o);
    let mut k = KernelBuilder::new(cx.name("forward"), THREADS, cx.wide());
    let x = k.ptr_param("x");
    let bn = prologue_params(&mut k, prologue);
    let w = k.ptr_param("w");
    let bias = conv.bias.then(|| k.ptr_param("bias"));
    let y = k.ptr_param("y");
    let partials = stats.then(|| k.ptr_param("partials"));
    let load_a = |k: &mut KernelBuilder, p: U32, kk: U32, n: U32| {
        let (oy, ox) = (k.ubin(BinOp::Div, p, g.wo), k.ubin(BinOp::Rem, p, g.wo));
        let (c, tap) = (
            k.ubin(BinOp::Div, kk, g.kernel_area()),
            k.ubin(BinOp::Rem, kk, g.kernel_area()),
        );
        let (ki, kj) = (k.ubin(BinOp::Div, tap, g.kw), k.ubin(BinOp::Rem, tap, g.kw));
        let (iy, row_ok) = g.input_coordinate(k, oy, ki, g.h);
        let (ix, col_ok) = g.input_coordinate(k, ox, kj, g.w);
        let ok = k.and(row_ok, col_ok);
        let at = k.mad_s(iy, g.w as i32, ix);
        let at = k.select_s(ok, at, 0);
        let at = k.u32_from_s32(at);
        let nc = k.mad_u(n, g.c, c);
        let plane = k.idx(nc);
        let base = k.idx_mul_const(plane, (g.h * g.w) as u64);
        let offset = k.idx(at);
        let at = k.idx_add(base, offset);
        let v = k.load(x, at);
        let v = match &bn {
            Some(params) => Prologue::load(k, params, c).apply(k, v),
            None => v,
        };
        k.select(ok, v, 0.0f32)
    };
    let load_b = |k: &mut KernelBuilder, kk: U32, o: U32, _n: U32| {
        let at = k.mad_u(o, shape.k, kk);
        k.load(w, at)
    };
    let tile = tiled_gemm(&mut k, shape, tiling, load_a, load_b);

    // y = C (+ bias), stored where the element exists
    let outputs: Vec<Vec<F32>> = tile
        .values
        .iter()
        .map(|row| {
            row.iter()
                .zip(&tile.cols)
                .zip(&tile.col_ok)
                .map(|((&v, &o), &ok)| match bias {
                    Some(b) => {
                        let safe = k.select_u(ok, o, 0u32);
                        let bv = k.load(b, safe);
                        k.add(v, bv)
                    }
                    None => v,
                })
                .collect()
        })
        .collect();
    for (i, row) in outputs.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let ok = k.and(tile.row_ok[i], tile.col_ok[j]);
            k.when(ok, |k| {
                let no = k.mad_u(tile.z, g.o, tile.cols[j]);
                let plane = k.idx(no);
                let base = k.idx_mul_const(plane, positions as u64);
                let p = k.idx(tile.rows[i]);
                let at = k.idx_add(base, p);
                k.store(y, at, v);
            });
        }
    }
    let mut args: Vec<_> = (0..cx.inputs.len()).map(input).collect();
    args.push(output(0));
    let grid = tiling.grid(shape, g.batch);
    let Some(partials) = partials else {
        return Lowered::kernels(vec![launch(k.finish(), grid, args)]);
    };

    // per-(example, row tile) sums of y and y² for each channel: partials[t][n·tiles + tile][o]
    let sums = column_sums(&mut k, &tile, tiling, 2, |k, t, i, j| {
        let v = outputs[i][j];
        if t == 0 { v } else { k.mul(v, v) }
    });
    let (row_tiles, _) = tiling.tiles(shape);
    let rows = Planes {
        batch: (g.batch * row_tiles) as u64,
        channels: g.o as u64,
        positions: 1,
    };
    let first_group = k.cmp_u(Cmp::Eq, tile.thread.0, 0u32);
    k.when(first_group, |k| {
        let row = k.mad_u(tile.z, row_tiles, tile.tile_row);
        for (t, term) in sums.iter().enumerate() {
            for (j, &total) in term.iter().enumerate() {
                k.when(tile.col_ok[j], |k| {
                    let slot = k.mad_u(row, g.o, tile.cols[j]);
                    let slot = k.idx(slot);
                    let at = k.idx_add_const(slot, t as u64 * rows.batch * rows.channels);
                    k.store(partials, at, total);
                });
            }
        }
    });
    args.push(scratch(0));
    let count = (g.batch * positions) as u64;
    let moments = [
        (Combine::Mean(0, count), output(1)),
        (
            Combine::Variance {
                sums: 0,
                squares: 1,
                count,
            },
            output(2),
        ),
    ];
    Lowered::Kernels {
        launches: vec![
            launch(k.finish(), grid, args),
            combine_channels(cx, "statistics", rows, scratch(0), &moments),
        ],
        scratch: vec![partials_bytes(rows, 2)],
    }
}

fn dgrad(cx: &Cx, d: &ConvDgrad, epilogue: Option<(FloatAttr, Squares)>) -> Lowered {
    let (dy_shape, w_shape) = (&cx.inputs[0].shape, &cx.inputs[1].shape);
    let x_shape = &cx.outputs[0].shape;
    let g = Geometry::new(x_shape, w_shape, dy_shape, d.stride, d.padding);
    let planes = Planes::of(&cx.outputs[0]);
    let mut k = cx.builder("dgrad");
    let (dy, w) = (k.ptr_param("dy"), k.ptr_param("w"));
    let bn = epilogue.map(|(eps, squares)| {
        let y = k.ptr_param("y");
        let params = prologue_params(&mut k, Some(eps)).expect("an epilogue has statistics");
        (y, params, squares)
    });
    let dx = k.ptr_param("dx");
    let partials = bn.as_ref().map(|_| k.ptr_param("partials"));
    let mut terms = 0;
    per_plane(
        &mut k,
        planes,
        |k, i, p, c, n| {
            let (iy, ix) = (k.ubin(BinOp::Div, p, g.w), k.ubin(BinOp::Rem, p, g.w));
            let acc = k.f32(0.0);
            k.for_u32(0u32, g.o, 1, |k, o| {
                let no = k.mad_u(n, g.o, o);
                let plane = k.idx(no);
                let dy_base = k.idx_mul_const(plane, (g.ho * g.wo) as u64);
                let oc = k.mad_u(o, g.c, c);
                let w_base = k.mul_u(oc, g.kernel_area());
                let taps = Taps {
                    src: dy,
                    base: dy_base,
                    width: g.wo,
                    w,
                    w_base,
                };
                let rows = |k: &mut KernelBuilder, ki| output_coordinate(k, &g, iy, ki, g.ho);
                let cols = |k: &mut KernelBuilder, kj| output_coordinate(k, &g, ix, kj, g.wo);
                sum_taps(k, &g, acc, &taps, rows, cols, |_, v| v);
            });
            match &bn {
                None => {
                    k.store(dx, i, acc);
                    Vec::new()
                }
                Some((y, params, squares)) => {
                    let yv = k.load(*y, i);
                    let z = bn_apply(k, yv, params, c);
                    let active = k.cmp_f32(Cmp::Gt, z, 0.0f32);
                    let dz = k.select(active, acc, 0.0f32);
                    k.store(dx, i, dz);
                    let xhat = normalised(k, yv, params.mean, params.var, c, params.eps);
                    let values = bn_terms(k, dz, xhat, *squares);
                    terms = values.len();
                    values
                }
            }
        },
        |k, totals, c, n| {
            if let Some(partials) = partials {
                store_partials(k, partials, planes, totals, c, n);
            }
        },
    );
    let mut args: Vec<_> = (0..cx.inputs.len()).map(input).collect();
    args.push(output(0));
    let Some((_, _, squares)) = bn else {
        return Lowered::kernels(vec![launch(k.finish(), planes.grid(), args)]);
    };
    args.push(scratch(0));
    let outputs: Vec<_> = bn_combine(squares)
        .into_iter()
        .zip((1..cx.outputs.len()).map(output))
        .collect();
    Lowered::Kernels {
        launches: vec![
            launch(k.finish(), planes.grid(), args),
            combine_channels(cx, "reductions", planes, scratch(0), &outputs),
        ],
        scratch: vec![partials_bytes(planes, terms)],
    }
}

/// Where the taps of one (plane, weight-plane) pair read: a `width`-wide plane of `src` from
/// `base`, and the `kh·kw` weights of `w` from `w_base`.
struct Taps {
    src: U64,
    base: Idx,
    width: u32,
    w: U64,
    w_base: U32,
}

/// `acc += transform(src[row, col])·w[tap]` over the kernel taps in row-major order, where
/// `rows(ki)` and `cols(kj)` give the coordinate each tap reads and whether it lies inside.
/// Padding is branch-free: a tap outside reads a valid address and contributes zero.
fn sum_taps(
    k: &mut KernelBuilder,
    g: &Geometry,
    acc: F32,
    taps: &Taps,
    rows: impl Fn(&mut KernelBuilder, u32) -> (S32, Pred),
    cols: impl Fn(&mut KernelBuilder, u32) -> (S32, Pred),
    transform: impl Fn(&mut KernelBuilder, F32) -> F32,
) {
    for ki in 0..g.kh {
        let (row, row_ok) = rows(k, ki);
        for kj in 0..g.kw {
            let (col, col_ok) = cols(k, kj);
            let ok = k.and(row_ok, col_ok);
            let at = k.mad_s(row, taps.width as i32, col);
            let at = k.select_s(ok, at, 0);
            let at = k.u32_from_s32(at);
            let at = k.idx(at);
            let at = k.idx_add(taps.base, at);
            let v = k.load(taps.src, at);
            let v = transform(k, v);
            let v = k.select(ok, v, 0.0f32);
            let wi = k.add_u(taps.w_base, ki * g.kw + kj);
            let wv = k.load(taps.w, wi);
            k.fma_into(acc, v, wv);
        }
    }
}

/// The output coordinate whose window puts kernel offset `offset` on input coordinate `at`:
/// `(at + pad − offset) / stride`, valid when it divides and lies in `0..size`.
fn output_coordinate(
    k: &mut KernelBuilder,
    g: &Geometry,
    at: U32,
    offset: u32,
    size: u32,
) -> (S32, Pred) {
    let at = k.s32_from_u32(at);
    let shifted = k.sbin(BinOp::Add, at, g.pad as i32 - offset as i32);
    let rem = k.sbin(BinOp::Rem, shifted, g.stride as i32);
    let out = k.sbin(BinOp::Div, shifted, g.stride as i32);
    let non_negative = k.cmp_s(Cmp::Ge, shifted, 0);
    let divides = k.cmp_s(Cmp::Eq, rem, 0);
    let below = k.cmp_s(Cmp::Lt, out, size as i32);
    let ok = k.and(non_negative, divides);
    (out, k.and(ok, below))
}

/// Blocks a weight-gradient launch aims for: enough to fill a GPU (132 SMs on an H100) when
/// the weights alone give few.
const WGRAD_TARGET_BLOCKS: u64 = 1024;

/// How many chunks of the batch the weight gradient splits into: one block row per chunk,
/// so that layers with few weights still run on many blocks.
fn batch_chunks(weights: u64, batch: u32) -> u32 {
    let weight_blocks = grid_for(weights)[0] as u64;
    let wanted = WGRAD_TARGET_BLOCKS
        .div_ceil(weight_blocks)
        .clamp(1, batch as u64) as u32;
    // equal chunks, none empty
    batch.div_ceil(batch.div_ceil(wanted))
}

/// The weight gradient (and its Fisher squares): one thread per weight element and chunk of
/// the batch. For each example of its chunk a thread reduces the example's positions into the
/// example's contribution, then adds both the contribution and its square, so no per-example
/// gradient reaches memory (`per_example` writes them out instead: the unfused form). With
/// several chunks, per-chunk sums go to partials that a second kernel adds in chunk order.
fn wgrad(
    cx: &Cx,
    wg: &ConvWgrad,
    prologue: Option<FloatAttr>,
    squares: Squares,
    per_example: bool,
) -> Lowered {
    let first = if prologue.is_some() { 5 } else { 1 };
    let (x_shape, dy_shape) = (&cx.inputs[0].shape, &cx.inputs[first].shape);
    let w_shape = [dy_shape[1], x_shape[1], wg.kernel.0, wg.kernel.1];
    let g = Geometry::new(x_shape, &w_shape, dy_shape, wg.stride, wg.padding);
    let weights = (g.o * g.c * g.kernel_area()) as u64;
    let chunks = batch_chunks(weights, g.batch);
    let direct = per_example || chunks == 1;
    let terms = if squares == Squares::None { 1 } else { 2 };

    let mut k = cx.builder("wgrad");
    let x = k.ptr_param("x");
    let bn = prologue_params(&mut k, prologue);
    let dy = k.ptr_param("dy");
    let targets: Vec<U64> = if direct {
        (0..cx.outputs.len())
            .map(|j| k.ptr_param(&format!("out{j}")))
            .collect()
    } else {
        vec![k.ptr_param("partials")]
    };
    let chunk = g.batch.div_ceil(chunks);
    map(&mut k, weights, |k, e| {
        let e = k.idx_to_u32(e);
        let tap = WeightTap::of(k, &g, e);
        let pro = bn.map(|params| Prologue::load(k, &params, tap.c));
        let (dw, sq) = (k.f32(0.0), k.f32(0.0));
        let j = k.block_y();
        let start = k.mul_u(j, chunk);
        let end = k.add_u(start, chunk);
        let end = k.ubin(BinOp::Min, end, g.batch);
        k.for_u32(start, end, 1, |k, n| {
            let contribution =
                example_contribution(k, &g, &tap, (x, dy), pro.as_ref(), n, squares, sq);
            if per_example {
                let n_idx = k.idx(n);
                let e_idx = k.idx(e);
                let at = k.idx_mad(n_idx, weights, e_idx);
                k.store(targets[0], at, contribution);
            } else {
                k.accumulate(dw, contribution);
                if squares == Squares::PerExample {
                    k.fma_into(sq, contribution, contribution);
                }
            }
        });
        if per_example {
            return;
        }
        let sums = [dw, sq];
        for (t, &total) in sums[..terms].iter().enumerate() {
            if direct {
                k.store(targets[t], e, total);
            } else {
                // partials[t][j][e]
                let row = k.add_u(j, (t as u32) * chunks);
                let row = k.idx(row);
                let e_idx = k.idx(e);
                let at = k.idx_mad(row, weights, e_idx);
                k.store(targets[0], at, total);
            }
        }
    });
    let mut args: Vec<_> = (0..cx.inputs.len()).map(input).collect();
    let grid = [grid_for(weights)[0], chunks];
    if direct {
        args.extend((0..cx.outputs.len()).map(output));
        return Lowered::kernels(vec![launch(k.finish(), grid, args)]);
    }
    args.push(scratch(0));
    let outputs: Vec<_> = (0..terms).map(output).collect();
    Lowered::Kernels {
        launches: vec![
            launch(k.finish(), grid, args),
            sum_rows(cx, "chunks", chunks, weights, scratch(0), &outputs),
        ],
        scratch: vec![4 * terms as u64 * chunks as u64 * weights],
    }
}

/// Where weight element `e` sits: output and input channel, kernel row and column, and the
/// output rows and columns whose windows put it inside the image.
struct WeightTap {
    o: U32,
    c: U32,
    ki: U32,
    kj: U32,
    rows: (U32, U32),
    cols: (U32, U32),
}

impl WeightTap {
    fn of(k: &mut KernelBuilder, g: &Geometry, e: U32) -> WeightTap {
        let (rest, kj) = (k.ubin(BinOp::Div, e, g.kw), k.ubin(BinOp::Rem, e, g.kw));
        let (rest, ki) = (
            k.ubin(BinOp::Div, rest, g.kh),
            k.ubin(BinOp::Rem, rest, g.kh),
        );
        let (o, c) = (k.ubin(BinOp::Div, rest, g.c), k.ubin(BinOp::Rem, rest, g.c));
        let rows = valid_outputs(k, g, ki, g.h, g.ho);
        let cols = valid_outputs(k, g, kj, g.w, g.wo);
        WeightTap {
            o,
            c,
            ki,
            kj,
            rows,
            cols,
        }
    }
}

/// Example `n`'s contribution `Σₜ a·dy` to one weight element; with per-position squares also
/// adds `Σₜ a²·dy²` into `sq`.
#[allow(clippy::too_many_arguments)]
fn example_contribution(
    k: &mut KernelBuilder,
    g: &Geometry,
    tap: &WeightTap,
    (x, dy): (U64, U64),
    pro: Option<&Prologue>,
    n: U32,
    squares: Squares,
    sq: F32,
) -> F32 {
    let contribution = k.f32(0.0);
    let nc = k.mad_u(n, g.c, tap.c);
    let x_plane = k.idx(nc);
    let x_base = k.idx_mul_const(x_plane, (g.h * g.w) as u64);
    let no = k.mad_u(n, g.o, tap.o);
    let dy_plane = k.idx(no);
    let dy_base = k.idx_mul_const(dy_plane, (g.ho * g.wo) as u64);
    k.for_u32(tap.rows.0, tap.rows.1, 1, |k, oy| {
        // iy = oy·stride + ki − pad lies in the image for every oy of the range
        let top = k.mad_u(oy, g.stride, tap.ki);
        let iy = k.ubin(BinOp::Sub, top, g.pad);
        let x_row = k.mul_u(iy, g.w);
        let dy_row = k.mul_u(oy, g.wo);
        k.for_u32(tap.cols.0, tap.cols.1, 1, |k, ox| {
            let left = k.mad_u(ox, g.stride, tap.kj);
            let ix = k.ubin(BinOp::Sub, left, g.pad);
            let at = k.add_u(x_row, ix);
            let at = k.idx(at);
            let at = k.idx_add(x_base, at);
            let mut a = k.load(x, at);
            if let Some(pro) = pro {
                a = pro.apply(k, a);
            }
            let position = k.add_u(dy_row, ox);
            let position = k.idx(position);
            let gi = k.idx_add(dy_base, position);
            let gv = k.load(dy, gi);
            k.fma_into(contribution, a, gv);
            if squares == Squares::PerPosition {
                let (a2, g2) = (k.mul(a, a), k.mul(gv, gv));
                k.fma_into(sq, a2, g2);
            }
        });
    });
    contribution
}

/// The output coordinates `lo..hi` whose input coordinate `out·stride + offset − pad` lies in
/// `0..size`: `lo = ⌈(pad − offset)/stride⌉` (0 if negative), `hi = ⌊(size − 1 + pad −
/// offset)/stride⌋ + 1`, clamped to `0..outputs`.
fn valid_outputs(
    k: &mut KernelBuilder,
    g: &Geometry,
    offset: U32,
    size: u32,
    outputs: u32,
) -> (U32, U32) {
    let offset = k.s32_from_u32(offset);
    let lead = k.sbin(BinOp::Sub, g.pad as i32, offset);
    let lo = k.sbin(BinOp::Add, lead, g.stride as i32 - 1);
    let lo = k.sbin(BinOp::Div, lo, g.stride as i32);
    let lo = k.sbin(BinOp::Max, lo, 0);
    let last = k.sbin(BinOp::Add, lead, size as i32 - 1);
    let hi = k.sbin(BinOp::Div, last, g.stride as i32);
    let hi = k.sbin(BinOp::Add, hi, 1);
    let negative = k.cmp_s(Cmp::Lt, last, 0);
    let hi = k.select_s(negative, 0, hi);
    let hi = k.sbin(BinOp::Min, hi, outputs as i32);
    let lo = k.sbin(BinOp::Min, lo, hi);
    (k.u32_from_s32(lo), k.u32_from_s32(hi))
}

#[cfg(test)]
mod tests {
    use super::batch_chunks;

    #[test]
    fn weight_gradients_split_the_batch_only_where_weights_are_few() {
        // resnet44's first stage: 16·16·9 weights in 9 blocks; 114 chunks of 36 examples
        assert_eq!(batch_chunks(2304, 4096), 114);
        assert_eq!(4096u32.div_ceil(114), 36);
        // vgg16's widest layer fills the GPU on its own
        assert_eq!(batch_chunks(512 * 512 * 9, 4096), 1);
        // never more chunks than examples, never an empty one
        assert_eq!(batch_chunks(90, 3), 3);
        assert_eq!(batch_chunks(90, 1), 1);
        for batch in [5u32, 100, 1000, 4097] {
            let chunks = batch_chunks(300, batch);
            let chunk = batch.div_ceil(chunks);
            assert!(
                (chunks - 1) * chunk < batch,
                "batch {batch}: {chunks} chunks of {chunk}"
            );
        }
    }
}
