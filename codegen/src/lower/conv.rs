//! Convolutions as tiled implicit GEMMs (`gemm.rs`; fp32 FMA, no tensor cores yet): forward
//! with the BN-apply + ReLU prologue and the BN-statistics epilogue; data gradient with the
//! ReLU-backward mask and BN-backward reductions (and their squares) in the epilogue; weight
//! gradient with the prologue recomputed and, in the same pass, the Fisher squares: a block
//! runs one product per example of its chunk and adds both the product and its square, so no
//! per-example gradient ever reaches memory.

use fisherc_ir::ops::{Conv2d, ConvDgrad, ConvWgrad, FloatAttr, Op, Squares};

use super::Lowered;
use super::common::{
    BnParams, Combine, Cx, TileRows, bn_apply, bn_combine, bn_term_count, bn_terms, combine_tiles,
    grid_for, input, inv_std, launch, map, normalised, output, scratch, sum_rows,
};
use super::gemm::{
    self, Coordinates, GemmShape, Layout, Products, TilePlace, Tiling, column_sums,
    store_column_sums, tiled_gemm,
};
use crate::builder::{F32, KernelBuilder, Pred, S32, U32, U64};
use crate::kir::{BinOp, Cmp};

pub fn lower(cx: &Cx) -> Lowered {
    let lowered = match cx.op {
        Op::Conv2d(conv) => forward(cx, conv, None, false),
        Op::FusedConv(f) => forward(cx, &f.conv, f.prologue, f.stats),
        Op::ConvDgrad(d) => dgrad(cx, d, None),
        Op::FusedDgrad(f) => dgrad(cx, &f.dgrad, Some((f.eps, f.squares))),
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
        Some(eps) => with_prologue_scale(cx, lowered, eps, cx.inputs[0].shape[1] as u64),
        None => lowered,
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

    /// (channel, kernel row, kernel column) of a weight column `channel·kh·kw + ki·kw + kj`.
    fn split_column(&self, k: &mut KernelBuilder, column: U32) -> (U32, U32, U32) {
        let area = self.kernel_area();
        let (channel, tap) = (
            k.ubin(BinOp::Div, column, area),
            k.ubin(BinOp::Rem, column, area),
        );
        let (ki, kj) = (
            k.ubin(BinOp::Div, tap, self.kw),
            k.ubin(BinOp::Rem, tap, self.kw),
        );
        (channel, ki, kj)
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

/// The GEMM of example `n` = block y (A gathered along m, B along k), with where the thread's
/// elements sit: (place, n, products, coordinates).
fn product_per_example(
    k: &mut KernelBuilder,
    cx: &Cx,
    shape: GemmShape,
    tiling: Tiling,
    load_a: impl Fn(&mut KernelBuilder, U32, U32, U32) -> F32,
    load_b: impl Fn(&mut KernelBuilder, U32, U32, U32) -> F32,
) -> (TilePlace, U32, Products, Coordinates) {
    let place = gemm::place(k, shape, tiling, cx.options.tensor_cores);
    let n = k.block_y();
    let layout = Layout {
        a_k_fastest: false,
        b_k_fastest: true,
    };
    let tile = Products::zeros(k, false);
    tiled_gemm(
        k,
        shape,
        tiling,
        &place,
        layout,
        &tile,
        |k, m, kk| load_a(k, m, kk, n),
        |k, kk, col| load_b(k, kk, col, n),
    );
    let coords = place.coordinates(k);
    (place, n, tile, coords)
}

/// `src[n][c][row][col]` of an `[N, channels, height, width]` tensor, read where `ok` holds
/// (elsewhere the plane's first element: a valid address, whose value the caller discards).
fn load_pixel(
    k: &mut KernelBuilder,
    src: U64,
    [n, c]: [U32; 2],
    channels: u32,
    (row, col, ok): (S32, S32, Pred),
    [height, width]: [u32; 2],
) -> F32 {
    let at = k.mad_s(row, width as i32, col);
    let at = k.select_s(ok, at, 0);
    let at = k.u32_from_s32(at);
    let nc = k.mad_u(n, channels, c);
    let plane = k.idx(nc);
    let base = k.idx_mul_const(plane, (height * width) as u64);
    let offset = k.idx(at);
    let at = k.idx_add(base, offset);
    k.load(src, at)
}

/// One element of the im2col matrix of input `x` (with the BN-apply + ReLU prologue of `bn`,
/// if any): what output position `p` of example `n` sees through column `column` =
/// (c, ki, kj) of the weight; zero in the padding.
fn gather_input(
    k: &mut KernelBuilder,
    g: &Geometry,
    (x, bn): (U64, Option<&PrologueSource>),
    n: U32,
    p: U32,
    column: U32,
) -> F32 {
    let (oy, ox) = (k.ubin(BinOp::Div, p, g.wo), k.ubin(BinOp::Rem, p, g.wo));
    let (c, ki, kj) = g.split_column(k, column);
    let (iy, row_ok) = g.input_coordinate(k, oy, ki, g.h);
    let (ix, col_ok) = g.input_coordinate(k, ox, kj, g.w);
    let ok = k.and(row_ok, col_ok);
    let v = load_pixel(k, x, [n, c], g.c, (iy, ix, ok), [g.h, g.w]);
    let v = match bn {
        Some(params) => Prologue::load(k, params, c).apply(k, v),
        None => v,
    };
    k.select(ok, v, 0.0f32)
}

/// Per-channel BN-apply + ReLU of a prologue: `relu((x − mean)·scale + β)` as the reference.
struct Prologue {
    mean: F32,
    scale: F32,
    beta: F32,
}

/// Where a gather finds its prologue: the BN statistics, and the per-channel scale γ·invstd
/// that `with_prologue_scale`'s first kernel computes once (not at every gathered element).
#[derive(Clone, Copy)]
struct PrologueSource {
    params: BnParams,
    scale: U64,
}

impl Prologue {
    fn load(k: &mut KernelBuilder, source: &PrologueSource, c: U32) -> Prologue {
        Prologue {
            mean: k.load(source.params.mean, c),
            scale: k.load(source.scale, c),
            beta: k.load(source.params.beta, c),
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

/// The prologue's scale parameter, which must be the kernel's last (see
/// `with_prologue_scale`).
fn prologue_source(k: &mut KernelBuilder, params: Option<BnParams>) -> Option<PrologueSource> {
    params.map(|params| PrologueSource {
        params,
        scale: k.ptr_param("prologue_scale"),
    })
}

/// Inputs 2 and 3 of a convolution with a prologue: the BN variance and γ.
const PROLOGUE_VAR: usize = 2;
const PROLOGUE_GAMMA: usize = 3;

/// Adds the prologue's scale to a lowering whose first launch is the main kernel (with
/// `prologue_scale` as its last parameter): a first kernel computes γ·(var + ε)^(−½) per
/// channel, exactly as `bn_apply` does, into a new scratch buffer.
fn with_prologue_scale(cx: &Cx, lowered: Lowered, eps: FloatAttr, channels: u64) -> Lowered {
    let Lowered::Kernels {
        mut launches,
        scratch: mut buffers,
    } = lowered
    else {
        unreachable!("a convolution lowers to kernels")
    };
    let buffer = scratch(buffers.len());
    buffers.push(4 * channels);
    launches[0].args.push(buffer);
    let mut k = cx.builder("prologue_scale");
    let (var, gamma, out) = (
        k.ptr_param("var"),
        k.ptr_param("gamma"),
        k.ptr_param("scale"),
    );
    map(&mut k, channels, |k, c| {
        let c = k.idx_to_u32(c);
        let inv = inv_std(k, var, c, eps.0 as f32);
        let g = k.load(gamma, c);
        let scale = k.mul(g, inv);
        k.store(out, c, scale);
    });
    let args = vec![input(PROLOGUE_VAR), input(PROLOGUE_GAMMA), buffer];
    launches.insert(0, launch(k.finish(), grid_for(channels), args));
    Lowered::Kernels {
        launches,
        scratch: buffers,
    }
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
    let mut k = gemm::builder(cx, "forward");
    let x = k.ptr_param("x");
    let bn = prologue_params(&mut k, prologue);
    let w = k.ptr_param("w");
    let bias = conv.bias.then(|| k.ptr_param("bias"));
    let y = k.ptr_param("y");
    let partials = stats.then(|| k.ptr_param("partials"));
    let bn = prologue_source(&mut k, bn);
    let load_a = |k: &mut KernelBuilder, p: U32, kk: U32, n: U32| {
        gather_input(k, &g, (x, bn.as_ref()), n, p, kk)
    };
    let load_b = |k: &mut KernelBuilder, kk: U32, o: U32, _n: U32| {
        let at = k.mad_u(o, shape.k, kk);
        k.load(w, at)
    };
    let (place, n, tile, coords) = product_per_example(&mut k, cx, shape, tiling, load_a, load_b);

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
        for (j, &v) in row.iter().enumerate() {
            let ok = k.and(coords.row_ok[i], coords.col_ok[j]);
            k.when(ok, |k| {
                let no = k.mad_u(n, g.o, coords.cols[j]);
                let plane = k.idx(no);
                let base = k.idx_mul_const(plane, positions as u64);
                let p = k.idx(coords.rows[i]);
                let at = k.idx_add(base, p);
                k.store(y, at, v);
            });
        }
    }
    let mut args: Vec<_> = (0..cx.inputs.len()).map(input).collect();
    args.push(output(0));
    let grid = [tiling.count(shape), g.batch];
    let Some(partials) = partials else {
        return Lowered::kernels(vec![launch(k.finish(), grid, args)]);
    };

    // per-(example, row tile) sums of y and y² for each channel
    let sums = column_sums(&mut k, &place, &coords, tiling, 2, |k, t, i, j| {
        let v = outputs[i][j];
        if t == 0 { v } else { k.mul(v, v) }
    });
    let rows = TileRows {
        examples: g.batch as u64,
        tiles: tiling.tiles(shape).0 as u64,
        channels: g.o as u64,
    };
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
/// positions p and input channels c, K running over (o, ki, kj). A gathers dy at the output
/// position whose window puts tap (ki, kj) on p (zero where none does), B reads the weights.
/// The fused epilogue masks by the ReLU of the BN that produced the input and sums the BN
/// backward terms per (example, row tile); `combine_tiles` adds each example's tiles before
/// any per-example square.
fn dgrad(cx: &Cx, d: &ConvDgrad, epilogue: Option<(FloatAttr, Squares)>) -> Lowered {
    let (dy_shape, w_shape) = (&cx.inputs[0].shape, &cx.inputs[1].shape);
    let x_shape = &cx.outputs[0].shape;
    let g = Geometry::new(x_shape, w_shape, dy_shape, d.stride, d.padding);
    let positions = g.h * g.w;
    let shape = GemmShape {
        m: positions,
        n: g.c,
        k: g.o * g.kernel_area(),
    };
    let tiling = Tiling::for_columns(g.c);
    let mut k = gemm::builder(cx, "dgrad");
    let (dy, w) = (k.ptr_param("dy"), k.ptr_param("w"));
    let bn = epilogue.map(|(eps, squares)| {
        let y = k.ptr_param("y");
        let params = prologue_params(&mut k, Some(eps)).expect("an epilogue has statistics");
        (y, params, squares)
    });
    let dx = k.ptr_param("dx");
    let partials = bn.as_ref().map(|_| k.ptr_param("partials"));
    let load_a = |k: &mut KernelBuilder, p: U32, kk: U32, n: U32| {
        let (iy, ix) = (k.ubin(BinOp::Div, p, g.w), k.ubin(BinOp::Rem, p, g.w));
        let (o, ki, kj) = g.split_column(k, kk);
        let (oy, row_ok) = output_coordinate(k, &g, iy, ki, g.ho);
        let (ox, col_ok) = output_coordinate(k, &g, ix, kj, g.wo);
        let ok = k.and(row_ok, col_ok);
        let v = load_pixel(k, dy, [n, o], g.o, (oy, ox, ok), [g.ho, g.wo]);
        k.select(ok, v, 0.0f32)
    };
    let load_b = |k: &mut KernelBuilder, kk: U32, c: U32, _n: U32| {
        let (o, tap) = (
            k.ubin(BinOp::Div, kk, g.kernel_area()),
            k.ubin(BinOp::Rem, kk, g.kernel_area()),
        );
        let oc = k.mad_u(o, g.c, c);
        let at = k.mad_u(oc, g.kernel_area(), tap);
        k.load(w, at)
    };
    let (place, n, tile, coords) = product_per_example(&mut k, cx, shape, tiling, load_a, load_b);

    // every element stored (ReLU-masked under the epilogue), with what its BN terms need
    let mut masked: Vec<Vec<(F32, F32)>> = Vec::new();
    for (i, row) in tile.values.iter().enumerate() {
        let mut row_terms = Vec::new();
        for (j, &acc) in row.iter().enumerate() {
            let ok = k.and(coords.row_ok[i], coords.col_ok[j]);
            let nc = k.mad_u(n, g.c, coords.cols[j]);
            let plane = k.idx(nc);
            let base = k.idx_mul_const(plane, positions as u64);
            let p = k.idx(coords.rows[i]);
            let at = k.idx_add(base, p);
            let Some((y, params, _)) = &bn else {
                k.when(ok, |k| k.store(dx, at, acc));
                continue;
            };
            let yv = k.f32(0.0);
            k.when(ok, |k| {
                let v = k.load(*y, at);
                k.assign(yv, v);
            });
            let c = k.select_u(coords.col_ok[j], coords.cols[j], 0u32);
            let z = bn_apply(&mut k, yv, params, c);
            let active = k.cmp_f32(Cmp::Gt, z, 0.0f32);
            let dz = k.select(active, acc, 0.0f32);
            k.when(ok, |k| k.store(dx, at, dz));
            let xhat = normalised(&mut k, yv, params.mean, params.var, c, params.eps);
            row_terms.push((dz, xhat));
        }
        masked.push(row_terms);
    }
    let mut args: Vec<_> = (0..cx.inputs.len()).map(input).collect();
    args.push(output(0));
    let grid = [tiling.count(shape), g.batch];
    let (Some((_, _, squares)), Some(partials)) = (bn, partials) else {
        return Lowered::kernels(vec![launch(k.finish(), grid, args)]);
    };
    // the terms are made term by term from (dz, x̂): all of them at once would not fit in
    // registers
    let count = bn_term_count(squares);
    let sums = column_sums(&mut k, &place, &coords, tiling, count, |k, t, i, j| {
        let (dz, xhat) = masked[i][j];
        bn_terms(k, dz, xhat, squares)[t]
    });
    let rows = TileRows {
        examples: g.batch as u64,
        tiles: tiling.tiles(shape).0 as u64,
        channels: g.c as u64,
    };
    store_column_sums(&mut k, &place, &coords, n, partials, rows, &sums);
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

/// The output coordinate whose window puts kernel offset `offset` on input coordinate `at`:
/// `(at + pad − offset) / stride`, valid when it divides and lies in `0..size`.
fn output_coordinate(
    k: &mut KernelBuilder,
    g: &Geometry,
    at: U32,
    offset: U32,
    size: u32,
) -> (S32, Pred) {
    let lead = k.add_u(at, g.pad);
    let lead = k.s32_from_u32(lead);
    let offset = k.s32_from_u32(offset);
    let shifted = k.sbin(BinOp::Sub, lead, offset);
    let rem = k.sbin(BinOp::Rem, shifted, g.stride as i32);
    let out = k.sbin(BinOp::Div, shifted, g.stride as i32);
    let non_negative = k.cmp_s(Cmp::Ge, shifted, 0);
    let divides = k.cmp_s(Cmp::Eq, rem, 0);
    let below = k.cmp_s(Cmp::Lt, out, size as i32);
    let ok = k.and(non_negative, divides);
    (out, k.and(ok, below))
}

/// Blocks a weight-gradient launch aims for: enough to fill a GPU (132 SMs on an H100) when
/// the weights alone give few tiles.
const WGRAD_TARGET_BLOCKS: u64 = 1024;

/// How many chunks of the batch the weight gradient splits into, given the blocks of one
/// chunk: one block row per chunk, so that layers with few weights still run on many blocks.
fn batch_chunks(blocks: u64, batch: u32) -> u32 {
    let wanted = WGRAD_TARGET_BLOCKS.div_ceil(blocks).clamp(1, batch as u64) as u32;
    // equal chunks, none empty
    batch.div_ceil(batch.div_ceil(wanted))
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
    let first = if prologue.is_some() { 5 } else { 1 };
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
    let tiling = Tiling::for_rows(g.o, cx.options.tensor_cores);
    let chunks = batch_chunks(tiling.count(shape) as u64, g.batch);
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
    let place = gemm::place(&mut k, shape, tiling, cx.options.tensor_cores);
    // the exact Fisher squares each example's product, so that has its own accumulators,
    // reset per example; the rest accumulate every example straight into the totals
    let per_position = squares == Squares::PerPosition;
    let totals = Products::zeros(&mut k, squares != Squares::None);
    // weight element (i, j) of the micro-tile, o·(C·area) + column, and whether it exists;
    // made where used, not kept across the loop (registers)
    let element = |k: &mut KernelBuilder, coords: &Coordinates, i: usize, j: usize| {
        let e = k.mad_u(coords.rows[i], shape.n, coords.cols[j]);
        (e, k.and(coords.row_ok[i], coords.col_ok[j]))
    };
    let layout = Layout {
        a_k_fastest: true,
        b_k_fastest: true,
    };
    let chunk = g.batch.div_ceil(chunks);
    let j = k.block_y();
    let start = k.mul_u(j, chunk);
    let end = k.add_u(start, chunk);
    let end = k.ubin(BinOp::Min, end, g.batch);
    k.for_u32(start, end, 1, |k, n| {
        let load_a = |k: &mut KernelBuilder, o: U32, p: U32| {
            let no = k.mad_u(n, g.o, o);
            let plane = k.idx(no);
            let base = k.idx_mul_const(plane, positions as u64);
            let p = k.idx(p);
            let at = k.idx_add(base, p);
            k.load(dy, at)
        };
        let load_b = |k: &mut KernelBuilder, p: U32, column: U32| {
            gather_input(k, &g, (x, bn.as_ref()), n, p, column)
        };
        if !per_example && squares != Squares::PerExample {
            let into = Products {
                values: totals.values.clone(),
                squares: totals.squares.clone().filter(|_| per_position),
            };
            tiled_gemm(k, shape, tiling, &place, layout, &into, load_a, load_b);
            return;
        }
        let product = Products::zeros(k, false);
        tiled_gemm(k, shape, tiling, &place, layout, &product, load_a, load_b);
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
    if !per_example {
        let coords = place.coordinates(&mut k);
        for (i, row) in totals.values.iter().enumerate() {
            for (jj, &total) in row.iter().enumerate() {
                let (e, ok) = element(&mut k, &coords, i, jj);
                let mut sums = vec![total];
                sums.extend(totals.squares.as_ref().map(|sq| sq[i][jj]));
                k.when(ok, |k| {
                    for (t, &total) in sums.iter().enumerate() {
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
            }
        }
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

#[cfg(test)]
mod tests {
    use super::batch_chunks;

    #[test]
    fn weight_gradients_split_the_batch_only_where_weights_are_few() {
        // resnet44's first stage: 16 × 144 weights in one tile; 1024 chunks of 4 examples
        assert_eq!(batch_chunks(1, 4096), 1024);
        // vgg16's widest layer (512 × 4608 weights: 576 tiles of 64 × 64) takes 2 chunks
        assert_eq!(batch_chunks(576, 4096), 2);
        assert_eq!(batch_chunks(2048, 4096), 1);
        // never more chunks than examples, never an empty one
        assert_eq!(batch_chunks(1, 3), 3);
        assert_eq!(batch_chunks(1, 1), 1);
        for batch in [5u32, 100, 1000, 4097] {
            let chunks = batch_chunks(3, batch);
            let chunk = batch.div_ceil(chunks);
            assert!(
                (chunks - 1) * chunk < batch,
                "batch {batch}: {chunks} chunks of {chunk}"
            );
        }
    }
}
