//! Convolutions as tiled implicit GEMMs (`gemm/`; fp32 FMA or TF32 tensor cores): forward
//! with the BN-apply + ReLU prologue and the BN-statistics epilogue; data gradient with the
//! ReLU-backward mask and BN-backward reductions (and their squares) in the epilogue; weight
//! gradient with the prologue recomputed and, in the same pass, the Fisher squares: a block
//! runs one product per example of its chunk and adds both the product and its square, so no
//! per-example gradient ever reaches memory.
//!
//! The gathered operand is staged one of two ways: element by element (im2col and its kin:
//! `Positions`, `Taps`, `Spread`), or, where the tile's positions are whole rows or runs of
//! one, as the input pixels they read, each once rather than once per tap (`Halo` for the
//! forward's input and a stride-1 data gradient's dy, `Patch` for the weight gradient's
//! input), the multiply reading the taps out of shared memory.
//!
//! This file holds the three GEMMs (`forward`, `dgrad`, `wgrad`), emitting what
//! [`schedules`] chose for each (tile, rows over the batch, staging, K order, batch chunks);
//! the parts: [`geometry`] (sizes, K order, rows over the batch), [`im2col`] (gathered
//! operands), [`patch`] and [`halo`] (staged operands), [`prologue`], [`epilogue`].

use std::convert::Infallible;

use fisherc_ir::ops::{
    Conv2d, ConvDgrad, ConvWgrad, FloatAttr, FusedDgrad, Op, Squares, prologue_len,
};

use super::Lowered;
use super::common::{
    BnParams, Combine, Cx, TileRows, bn_apply, bn_combine, bn_term_count, bn_terms, combine_tiles,
    grid_for, input, inv_std, launch, map, normalised, output, scratch, sum_rows,
};
use super::gemm::{
    self, Coordinates, Fetch, Gathered, KSteps, Layout, LineAt, LineSet, Operand, Operands,
    Products, Slice, SliceK, Staging, TilePlace, column_sums, staged_gemm, store_column_sums,
    store_segment_sums, tiled_gemm,
};
use super::schedule::{
    self, COLUMN_SUMS_BYTES, DOUBLE_BUFFERED, GemmShape, SEGMENT_SUMS_BYTES, THREADS, Tiling,
    stage_bytes,
};
use crate::builder::{
    F32, GlobalF32, Idx, KernelBuilder, Pred, STATIC_SHARED, SharedF32, U32, U64,
};
use crate::kir::{BinOp, Cmp, MainLoop};

mod epilogue;
mod geometry;
mod halo;
mod im2col;
mod patch;
mod prologue;
mod schedules;

use epilogue::*;
use geometry::*;
use halo::*;
use im2col::*;
use patch::*;
use prologue::*;
use schedules::*;

pub fn lower(cx: &Cx) -> Lowered {
    let lowered = match cx.op {
        Op::Conv2d(conv) => forward(cx, conv, None, false),
        Op::FusedConv(f) => forward(cx, &f.conv, f.prologue, f.stats),
        Op::ConvDgrad(d) => dgrad(cx, d, None),
        Op::FusedDgrad(f) => dgrad(cx, &f.dgrad, Some(f)),
        Op::ConvWgrad(w) => wgrad(cx, w, None, Squares::None, false),
        Op::ConvWgradPerExample(w) => wgrad(cx, &w.0, None, Squares::None, true),
        Op::FusedWgrad(f) => wgrad(cx, &f.wgrad, f.prologue, f.squares, false),
        other => unreachable!("{} is not a convolution", other.name()),
    };
    let prologue = match cx.op {
        Op::FusedConv(f) => f.prologue,
        Op::FusedWgrad(f) => f.prologue,
        _ => None,
    };
    match prologue {
        Some(eps) => with_prologue_pairs(cx, lowered, eps, cx.inputs[0].shape[1] as u64),
        None => lowered,
    }
}

/// Element `p` of plane (`n`, `c`) of an `[n][channels][positions]` tensor.
fn plane_element(
    k: &mut KernelBuilder,
    (n, c): (U32, U32),
    (channels, positions): (u32, u32),
    p: U32,
) -> Idx {
    let nc = k.mad_u(n, channels, c);
    let plane = k.idx(nc);
    let base = k.idx_mul_const(plane, positions as u64);
    let p = k.idx(p);
    k.idx_add(base, p)
}

/// How a forward or data-gradient product gathers its operands: A along m, B along k.
const ROWS_BY_COLUMNS: Layout = Layout {
    a_k_fastest: false,
    b_k_fastest: true,
};

/// The GEMM of example `n` = block y (with rows over the batch, its only product) that
/// `multiply(k, place, n, products)` emits, with where the thread's elements sit: (place, n,
/// products, coordinates).
fn product_per_example(
    k: &mut KernelBuilder,
    cx: &Cx,
    shape: GemmShape,
    tiling: Tiling,
    multiply: impl FnOnce(&mut KernelBuilder, &TilePlace, U32, &Products) -> MainLoop,
) -> (TilePlace, U32, Products, Coordinates) {
    let place = gemm::place(k, shape, tiling, cx.options.precision);
    let n = k.block_y();
    let tile = Products::zeros(k, &place, false);
    let main_loop = multiply(k, &place, n, &tile);
    k.note_main_loop(main_loop);
    let coords = place.coordinates(k);
    (place, n, tile, coords)
}

/// The product of a halo (A) and the weights (B, gathered along k) at `place`, into `tile`.
fn halo_product<B: Operand>(
    k: &mut KernelBuilder,
    (shape, tiling, place): (GemmShape, Tiling, &TilePlace),
    tile: &Products,
    halo: &Halo,
    weights: &B,
) -> MainLoop {
    let sides = (Operands::B, halo.stages());
    let b = Gathered::new(k, (shape, tiling, place), sides, true, weights);
    staged_gemm(k, shape, tiling, place, tile, (halo, &b))
}

/// A dense operand: element (line, k) of `src` at `line(line) + depth(k)`.
struct Dense<L, D> {
    src: U64,
    line: L,
    depth: D,
}

impl<L, D> Operand for Dense<L, D>
where
    L: Fn(&mut KernelBuilder, U32) -> Idx,
    D: Fn(&mut KernelBuilder, SliceK) -> U32,
{
    type Line = Idx;
    type Depth = U32;
    type Fetched = Infallible;

    fn line(&self, k: &mut KernelBuilder, index: U32) -> Idx {
        (self.line)(k, index)
    }

    fn depth(&self, k: &mut KernelBuilder, kk: SliceK) -> U32 {
        (self.depth)(k, kk)
    }

    fn fetch(
        &self,
        k: &mut KernelBuilder,
        line: Idx,
        depth: U32,
        inside: Pred,
    ) -> Fetch<Infallible> {
        let depth = k.idx(depth);
        let at = k.idx_add(line, depth);
        Fetch::Copy {
            src: k.element_ptr(self.src, at),
            exists: inside,
        }
    }

    fn finish(&self, _k: &mut KernelBuilder, never: Infallible) -> F32 {
        match never {}
    }

    fn loads(&self) -> bool {
        false
    }
}

/// The start of example `n`'s `[per_example]` elements, as an element index.
fn example_start(k: &mut KernelBuilder, n: U32, per_example: u32) -> Idx {
    let n = k.idx(n);
    k.idx_mul_const(n, per_example as u64)
}

/// The forward convolution as an implicit GEMM per example (`gemm/`): C[p][o] over the
/// example's output positions p and output channels o (or over every example's positions,
/// `Rows`), K running over (c, ki, kj) in `Order`. A gathers the input window (the BN-apply +
/// ReLU prologue applied on load, padding zero), B reads the weights. The statistics epilogue
/// sums each tile's columns into per-(example, tile) partials, which a second kernel adds in
/// order.
fn forward(cx: &Cx, conv: &Conv2d, prologue: Option<FloatAttr>, stats: bool) -> Lowered {
    let first = prologue_len(prologue);
    let g = Geometry::new(
        &cx.inputs[0].shape,
        &cx.inputs[first].shape,
        &cx.outputs[0].shape,
        conv.stride,
        conv.padding,
    );
    let positions = g.ho * g.wo;
    let PositionsSchedule {
        tiling,
        rows: batching,
        halo,
        order,
    } = PositionsSchedule::forward(&g, cx.options, prologue.is_some());
    let shape = GemmShape {
        m: batching.count(positions, g.batch),
        n: g.o,
        k: g.c * g.kernel_area(),
    };
    let mut k = gemm::builder(cx, "forward");
    let x = k.ptr_param("x");
    let bn = prologue_params(&mut k, prologue);
    let w = k.ptr_param("w");
    let bias = conv.bias.then(|| k.ptr_param("bias"));
    let y = k.ptr_param("y");
    let partials = stats.then(|| k.ptr_param("partials"));
    let bn = prologue_source(&mut k, bn);
    let area = g.kernel_area();
    // w[o][c][tap]: line o, column (c, tap) in the A's order
    let weights = Dense {
        src: w,
        line: |k: &mut KernelBuilder, o: U32| {
            let row = k.mul_u(o, shape.k);
            k.idx(row)
        },
        depth: move |k: &mut KernelBuilder, kk: SliceK| {
            let column = order.split(k, kk, area);
            let c = column.channel(k);
            k.mad_u(c, area, column.tap)
        },
    };
    let (place, n, tile, coords) =
        product_per_example(&mut k, cx, shape, tiling, |k, place, n, tile| match halo {
            Some(dims) => {
                let a = Halo::new(k, &g, dims, (x, bn), (place, n));
                halo_product(k, (shape, tiling, place), tile, &a, &weights)
            }
            None => {
                let a = Positions(Im2col::new(k, &g, x, bn, (n, tiling, batching)));
                tiled_gemm(k, shape, tiling, place, ROWS_BY_COLUMNS, tile, &a, &weights)
            }
        });

    // y = C (+ bias), stored where the element exists
    let outputs: Vec<Vec<F32>> = tile
        .values
        .iter()
        .map(|row| {
            row.iter()
                .zip(&coords.cols)
                .zip(&coords.col_ok)
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
        let (example, p) = batching.split(&mut k, coords.rows[i], n);
        for (j, &v) in row.iter().enumerate() {
            let ok = k.and(coords.row_ok[i], coords.col_ok[j]);
            k.when(ok, |k| {
                let at = plane_element(k, (example, coords.cols[j]), (g.o, positions), p);
                k.store(y, at, v);
            });
        }
    }
    let mut args: Vec<_> = (0..cx.inputs.len()).map(input).collect();
    args.push(output(0));
    let grid = batching.grid(tiling.count(shape), g.batch);
    let Some(partials) = partials else {
        return Lowered::kernels(vec![launch(k.finish(), grid, args)]);
    };

    // per-(example, row tile) sums of y and y² for each channel (per row tile, with rows
    // over the batch)
    let sums = column_sums(&mut k, &place, &coords, tiling, 2, |k, t, i, j| {
        let v = outputs[i][j];
        if t == 0 { v } else { k.mul(v, v) }
    });
    let rows = batching.tile_rows(tiling.tiles(shape).0, g.batch, g.o);
    store_column_sums(&mut k, &place, &coords, n, partials, rows, &sums);
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
            combine_tiles(cx, "statistics", rows, scratch(0), &moments),
        ],
        scratch: vec![rows.bytes(2)],
    }
}

/// The data gradient as an implicit GEMM per example: C[p][c] over the example's input
/// positions p and input channels c (or over every example's positions, `Rows`), K running
/// over (o, ki, kj) in `Order`. A gathers dy at the output position whose window puts tap
/// (ki, kj) on p (zero where none does), B reads the weights. The fused epilogue masks by the
/// ReLU of the BN that produced the input (after adding a residual block's shortcut
/// gradient) and sums the BN backward terms per (example, row tile), or per example of a
/// tile over the batch; `combine_tiles` adds each example's tiles before any per-example
/// square.
fn dgrad(cx: &Cx, d: &ConvDgrad, epilogue: Option<&FusedDgrad>) -> Lowered {
    let (dy_shape, w_shape) = (&cx.inputs[0].shape, &cx.inputs[1].shape);
    let x_shape = &cx.outputs[0].shape;
    let g = Geometry::new(x_shape, w_shape, dy_shape, d.stride, d.padding);
    let positions = g.h * g.w;
    let per_example_sums = matches!(epilogue, Some(e) if e.squares == Squares::PerExample);
    let PositionsSchedule {
        tiling,
        rows: batching,
        halo,
        order,
    } = PositionsSchedule::dgrad(&g, cx.options, (epilogue.is_some(), per_example_sums));
    let shape = GemmShape {
        m: batching.count(positions, g.batch),
        n: g.c,
        k: g.o * g.kernel_area(),
    };
    let mut k = gemm::builder(cx, "dgrad");
    let (dy, w) = (k.ptr_param("dy"), k.ptr_param("w"));
    let bn = epilogue.map(|e| DgradEpilogue::params(&mut k, e));
    let dx = k.ptr_param("dx");
    let partials = bn.as_ref().map(|_| k.ptr_param("partials"));
    let area = g.kernel_area();
    // w[o][c][tap]: line c, column (o, tap) in the A's order
    let weights = Dense {
        src: w,
        line: move |k: &mut KernelBuilder, c: U32| {
            let start = k.mul_u(c, area);
            k.idx(start)
        },
        depth: move |k: &mut KernelBuilder, kk: SliceK| {
            let column = order.split(k, kk, area);
            let o = column.channel(k);
            k.mad_u(o, g.c * area, column.tap)
        },
    };
    let (place, n, tile, coords) =
        product_per_example(&mut k, cx, shape, tiling, |k, place, n, tile| match halo {
            Some(dims) => {
                let a = Halo::new(k, &g, dims, (dy, None), (place, n));
                halo_product(k, (shape, tiling, place), tile, &a, &weights)
            }
            None => {
                let product = batching.product_example(k, n);
                let spread = Spread {
                    g: &g,
                    dy,
                    example: example_start(k, product, g.o * g.ho * g.wo),
                    order,
                    rows: batching,
                };
                tiled_gemm(
                    k,
                    shape,
                    tiling,
                    place,
                    ROWS_BY_COLUMNS,
                    tile,
                    &spread,
                    &weights,
                )
            }
        });

    let masked = store_dx(&mut k, (&tile, &coords, n), (&g, batching), dx, bn.as_ref());
    let mut args: Vec<_> = (0..cx.inputs.len()).map(input).collect();
    args.push(output(0));
    let grid = batching.grid(tiling.count(shape), g.batch);
    let (Some(DgradEpilogue { squares, .. }), Some(partials)) = (bn, partials) else {
        return Lowered::kernels(vec![launch(k.finish(), grid, args)]);
    };
    // the terms are made term by term from (dz, x̂): all of them at once would not fit in
    // registers
    let count = bn_term_count(squares);
    let term = |k: &mut KernelBuilder, t: usize, i: usize, j: usize| {
        let (dz, xhat) = masked[i][j];
        bn_terms(k, dz, xhat, squares)[t]
    };
    let rows = match (batching, squares) {
        // a tile's examples summed apart, for their squares
        (Rows::Batched { positions }, Squares::PerExample) => {
            let each = (positions, g.batch);
            store_segment_sums(&mut k, &place, &coords, tiling, each, partials, count, term);
            TileRows {
                examples: g.batch as u64,
                tiles: 1,
                channels: g.c as u64,
            }
        }
        _ => {
            let sums = column_sums(&mut k, &place, &coords, tiling, count, term);
            let rows = batching.tile_rows(tiling.tiles(shape).0, g.batch, g.c);
            store_column_sums(&mut k, &place, &coords, n, partials, rows, &sums);
            rows
        }
    };
    args.push(scratch(0));
    let outputs: Vec<_> = bn_combine(squares)
        .into_iter()
        .zip((1..cx.outputs.len()).map(output))
        .collect();
    Lowered::Kernels {
        launches: vec![
            launch(k.finish(), grid, args),
            combine_tiles(cx, "reductions", rows, scratch(0), &outputs),
        ],
        scratch: vec![rows.bytes(count)],
    }
}

/// `src[at]` where `inside`, else 0 (no load outside the tensor).
fn load_inside(k: &mut KernelBuilder, inside: Pred, src: U64, at: Idx) -> F32 {
    let value = k.f32(0.0);
    k.when(inside, |k| {
        let v = k.load(src, at);
        k.assign(value, v);
    });
    value
}

/// The weight gradient (and its Fisher squares) as one implicit GEMM per example: C[o][e]
/// over output channels o and the columns e = (c, ki, kj) of the weight, K running over the
/// example's output positions. A reads dy, B gathers the input window (the prologue applied
/// on load). A block owns one tile and a chunk of the batch; it adds each example's product
/// into its totals and, for the exact Fisher, the product's square, so no per-example
/// gradient reaches memory (`per_example` writes them out instead: the unfused form); a²g²
/// accumulates the products of squared operands alongside. With several chunks, per-chunk
/// totals go to partials that a second kernel adds in chunk order.
fn wgrad(
    cx: &Cx,
    wg: &ConvWgrad,
    prologue: Option<FloatAttr>,
    squares: Squares,
    per_example: bool,
) -> Lowered {
    let first = prologue_len(prologue);
    let (x_shape, dy_shape) = (&cx.inputs[0].shape, &cx.inputs[first].shape);
    let w_shape = [dy_shape[1], x_shape[1], wg.kernel.0, wg.kernel.1];
    let g = Geometry::new(x_shape, &w_shape, dy_shape, wg.stride, wg.padding);
    let positions = g.ho * g.wo;
    let shape = GemmShape {
        m: g.o,
        n: g.c * g.kernel_area(),
        k: positions,
    };
    let weights = (shape.m * shape.n) as u64;
    let WgradSchedule {
        tiling,
        patch,
        chunks,
    } = WgradSchedule::choose(&g, shape, cx.options, prologue.is_some());
    let direct = per_example || chunks == 1;
    let terms = if squares == Squares::None { 1 } else { 2 };

    let mut k = gemm::builder(cx, "wgrad");
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
    let bn = prologue_source(&mut k, bn);
    let place = gemm::place(&mut k, shape, tiling, cx.options.precision);
    if per_example {
        // 60 bytes of spills at 80 registers on sm_80
        k.register_tiled(schedule::BLOCKS_PER_SM_LARGE);
    }
    // the exact Fisher squares each example's product, so that has its own accumulators,
    // reset per example; the rest accumulate every example straight into the totals
    let per_position = squares == Squares::PerPosition;
    let totals = Products::zeros(&mut k, &place, squares != Squares::None);
    let element = |k: &mut KernelBuilder, coords: &Coordinates, i: usize, j: usize| {
        weight_element(k, coords, (i, j), shape.n)
    };
    let layout = Layout {
        a_k_fastest: true,
        b_k_fastest: true,
    };
    let chunk = g.batch.div_ceil(chunks);
    let patch = patch.map(|dims| PatchLayout::new(&mut k, &g, dims, &place, bn.as_ref()));
    let mut main_loop = None;
    let j = k.block_y();
    let start = k.mul_u(j, chunk);
    let end = k.add_u(start, chunk);
    let end = k.ubin(BinOp::Min, end, g.batch);
    k.for_u32(start, end, 1, |k, n| {
        // dy[n][o][p]: line o, k the position p
        let example = example_start(k, n, g.o * positions);
        let dy_rows = Dense {
            src: dy,
            line: |k: &mut KernelBuilder, o: U32| {
                let row = k.mul_u(o, positions);
                let row = k.idx(row);
                k.idx_add(example, row)
            },
            depth: |_: &mut KernelBuilder, p: SliceK| p.index,
        };
        // B: the input's patch where slices lie in output rows, else its im2col elements
        let multiply = |k: &mut KernelBuilder, into: &Products| match &patch {
            Some(patch) => {
                let x = patch.for_example(k, x, n);
                let sides = (Operands::A, x.stages());
                let dy = Gathered::new(k, (shape, tiling, &place), sides, true, &dy_rows);
                staged_gemm(k, shape, tiling, &place, into, (&dy, &x))
            }
            None => {
                let windows = Taps(Im2col::new(k, &g, x, bn, (n, tiling, Rows::PerExample)));
                tiled_gemm(k, shape, tiling, &place, layout, into, &dy_rows, &windows)
            }
        };
        if !per_example && squares != Squares::PerExample {
            let into = Products {
                values: totals.values.clone(),
                squares: totals.squares.clone().filter(|_| per_position),
            };
            main_loop = Some(multiply(k, &into));
            return;
        }
        let product = Products::zeros(k, &place, false);
        let one = multiply(k, &product);
        main_loop = Some(one);
        let coords = place.coordinates(k);
        for (i, row) in product.values.iter().enumerate() {
            for (jj, &v) in row.iter().enumerate() {
                if per_example {
                    let (e, ok) = element(k, &coords, i, jj);
                    k.when(ok, |k| {
                        let n_idx = k.idx(n);
                        let e_idx = k.idx(e);
                        let at = k.idx_mad(n_idx, weights, e_idx);
                        k.store(targets[0], at, v);
                    });
                } else {
                    let squares_total = totals.squares.as_ref().expect("exact squares");
                    k.accumulate(totals.values[i][jj], v);
                    k.fma_into(squares_total[i][jj], v, v);
                }
            }
        }
    });
    let main_loop = main_loop.expect("the example loop runs a product");
    k.note_main_loop(main_loop.times(chunk as u64));
    if !per_example {
        let chunk_of = (!direct).then_some((j, chunks, weights));
        store_totals(&mut k, (&place, shape.n), &totals, &targets, chunk_of);
    }
    let mut args: Vec<_> = (0..cx.inputs.len()).map(input).collect();
    let grid = [tiling.count(shape), chunks];
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
