//! Convolutions as tiled implicit GEMMs (`gemm.rs`; fp32 FMA or TF32 tensor cores): forward
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

    /// The first input row (column) of output row (column) `out`'s window: "negative"
    /// (wrapped) where it lies in the padding.
    fn window_start(&self, k: &mut KernelBuilder, out: U32) -> U32 {
        let scaled = k.mul_u(out, self.stride);
        k.ubin(BinOp::Sub, scaled, self.pad)
    }

    /// (kernel row, kernel column) of a tap `ki·kw + kj`.
    fn tap_position(&self, k: &mut KernelBuilder, tap: U32) -> (U32, U32) {
        (
            k.ubin(BinOp::Div, tap, self.kw),
            k.ubin(BinOp::Rem, tap, self.kw),
        )
    }
}

/// The order in which a GEMM's K runs over a convolution's (channel, tap) pairs, the channel
/// being the input's (forward) or the output's (data gradient): channel-major,
/// `channel·area + tap` (the weights' own order), or grouped,
/// `(group·area + tap)·depth + channel in the group`, where the channels fill whole K slices:
/// the taps of one group of `depth` channels in turn, each a slice. Then every slice lies
/// within one tap, so where the tap puts a line's window, whether that pixel exists and its
/// offset are made once per slice and line, and an element only adds its channel's offset;
/// and the next `area` slices read the same weights' sectors (`w[o][c][tap]`: a slice's
/// elements lie `area` words apart, one 32-byte sector each) and the same input pixels,
/// shifted, while the L1 cache still holds them. Tap-major (`tap·channels + channel`) comes
/// back to a sector only a whole pass over the channels later: few L1 hits and a busy L2 in
/// VGG16's 512-channel data gradients (benches/RESULTS.md). A halo (the forward's input, a stride-1 data gradient's dy) is staged a group at a
/// time, so it needs the grouped order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    ChannelMajor,
    Grouped { depth: u32, area: u32 },
}

impl Order {
    /// Grouped where the channels fill whole K slices (always where a halo stages A: its
    /// groups are `bk` channels), else channel-major; `area` taps a channel.
    fn choose(channels: u32, tiling: Tiling, halo: bool, area: u32) -> Order {
        if halo || channels.is_multiple_of(tiling.bk) {
            Order::Grouped {
                depth: tiling.bk,
                area,
            }
        } else {
            Order::ChannelMajor
        }
    }

    /// The channel group and the tap of slice `slice` of a grouped K.
    fn group_and_tap(k: &mut KernelBuilder, slice: U32, area: u32) -> (U32, U32) {
        (
            k.ubin(BinOp::Div, slice, area),
            k.ubin(BinOp::Rem, slice, area),
        )
    }

    /// The column of K at `kk` (`area` taps a channel).
    fn split(self, k: &mut KernelBuilder, kk: SliceK, area: u32) -> Column {
        match self {
            Order::ChannelMajor => Column::channel_major(k, kk.index, area),
            // the slice gives the group and the tap
            Order::Grouped { depth, area } => {
                let slice = k.ubin(BinOp::Div, kk.start, depth);
                let (group, tap) = Order::group_and_tap(k, slice, area);
                let first = k.mul_u(group, depth);
                Column {
                    lane: k.add_u(first, kk.lane),
                    round: kk.round,
                    tap,
                }
            }
        }
    }
}

/// A column of a convolution's K: channel `lane + round` (a register and a constant, see
/// `SliceK`) and the tap.
#[derive(Clone, Copy)]
struct Column {
    lane: U32,
    round: u32,
    tap: U32,
}

impl Column {
    /// Column `index` of a channel-major K (the weights' own order), `area` taps a channel.
    fn channel_major(k: &mut KernelBuilder, index: U32, area: u32) -> Column {
        Column {
            lane: k.ubin(BinOp::Div, index, area),
            round: 0,
            tap: k.ubin(BinOp::Rem, index, area),
        }
    }

    fn channel(&self, k: &mut KernelBuilder) -> U32 {
        k.add_u(self.lane, self.round)
    }
}

/// How the rows of a forward or data-gradient GEMM (an example's positions) meet the batch:
/// one product per example (block y), or, where an example's positions would fill little of
/// a tile (VGG16's 4×4 and 2×2 layers: 16 and 4 of 64 rows), rows over every example's
/// positions, `n·positions + p`. Where an epilogue squares per-example sums, only where a
/// tile holds whole examples (its sums then go per example, `store_segment_sums`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rows {
    PerExample,
    Batched { positions: u32 },
}

impl Rows {
    fn choose(positions: u32, tiling: Tiling, per_example_sums: bool) -> Rows {
        let whole_examples = tiling.bm.is_multiple_of(positions);
        if positions < tiling.bm && (whole_examples || !per_example_sums) {
            Rows::Batched { positions }
        } else {
            Rows::PerExample
        }
    }

    /// The GEMM's rows for `positions` per example.
    fn count(self, positions: u32, batch: u32) -> u32 {
        match self {
            Rows::PerExample => positions,
            Rows::Batched { .. } => batch * positions,
        }
    }

    /// The launch's grid for `tiles` tiles per product.
    fn grid(self, tiles: u32, batch: u32) -> [u32; 2] {
        match self {
            Rows::PerExample => [tiles, batch],
            Rows::Batched { .. } => [tiles, 1],
        }
    }

    /// The example whose start the operands add to every element: the product's, block y
    /// `n`; or none (0) where every row carries its own.
    fn product_example(self, k: &mut KernelBuilder, n: U32) -> U32 {
        match self {
            Rows::PerExample => n,
            Rows::Batched { .. } => k.u32(0),
        }
    }

    /// (example, position) of `row` in the product of example `n` (block y).
    fn split(self, k: &mut KernelBuilder, row: U32, n: U32) -> (U32, U32) {
        match self {
            Rows::PerExample => (n, row),
            Rows::Batched { positions } => (
                k.ubin(BinOp::Div, row, positions),
                k.ubin(BinOp::Rem, row, positions),
            ),
        }
    }

    /// The layout of per-tile column sums, `row_tiles` a product (with rows over the batch,
    /// each tile a row of its own, block y being 0).
    fn tile_rows(self, row_tiles: u32, batch: u32, channels: u32) -> TileRows {
        let (examples, tiles) = match self {
            Rows::PerExample => (batch, row_tiles),
            Rows::Batched { .. } => (row_tiles, 1),
        };
        TileRows {
            examples: examples as u64,
            tiles: tiles as u64,
            channels: channels as u64,
        }
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

/// The im2col matrix of input `x` for example `n`, with the BN-apply + ReLU prologue applied
/// if any: element (output position p = (oy, ox), column (c, ki, kj)) is
/// `x[n][c][oy·stride + ki − pad][ox·stride + kj − pad]`, zero in the padding. What depends
/// on the position ([`Window`]) and on the column ([`Tap`]) is made apart; their offsets add
/// up to the element's (u32 arithmetic modulo 2³², exact where the pixel exists).
struct Im2col<'a> {
    g: &'a Geometry,
    x: U64,
    /// The product's example's start (rows per example), or 0 (rows over the batch: each
    /// window adds its own).
    example: Idx,
    prologue: Option<PrologueSource>,
    order: Order,
    rows: Rows,
}

/// An output position's window: its top-left input pixel (which may lie in the padding:
/// "negative" coordinates wrap) and that pixel's offset in the example.
#[derive(Clone, Copy)]
struct Window {
    y0: U32,
    x0: U32,
    offset: U32,
}

/// A weight column (c, ki, kj): the channel, the kernel tap, the tap's offset `ki·w + kj`
/// and the channel's `c·h·w` as a register and a constant (`Column`).
#[derive(Clone, Copy)]
struct Tap {
    c: U32,
    ki: U32,
    kj: U32,
    spatial: U32,
    channel_offset: U32,
    channel_round: u32,
}

/// A loaded pixel (of an input with a prologue; without, pixels are copied): its value and
/// its channel, or the channel count where the element is padding or outside the matrix.
/// The prologue is read only when finishing: three values, or a predicate, held across a
/// slice's products for every element would take the registers the products need.
#[derive(Clone, Copy)]
struct Pixel {
    value: F32,
    channel: U32,
}

impl<'a> Im2col<'a> {
    fn new(
        k: &mut KernelBuilder,
        g: &'a Geometry,
        x: U64,
        prologue: Option<PrologueSource>,
        (n, tiling, rows): (U32, Tiling, Rows),
    ) -> Self {
        let n = rows.product_example(k, n);
        let example = example_start(k, n, g.c * g.h * g.w);
        Im2col {
            g,
            x,
            example,
            prologue,
            order: Order::choose(g.c, tiling, false, g.kernel_area()),
            rows,
        }
    }

    /// The window of output position `p` (of the product's example), or, with rows over the
    /// batch, of row `p`, its example's start in its offset.
    fn window(&self, k: &mut KernelBuilder, p: U32) -> Window {
        let g = self.g;
        let zero = k.u32(0);
        let (n, p) = self.rows.split(k, p, zero);
        let (oy, ox) = (k.ubin(BinOp::Div, p, g.wo), k.ubin(BinOp::Rem, p, g.wo));
        let (y0, x0) = (g.window_start(k, oy), g.window_start(k, ox));
        let offset = k.mad_u(y0, g.w, x0);
        let offset = k.mad_u(n, g.c * g.h * g.w, offset);
        Window { y0, x0, offset }
    }

    /// Column `kk` of the im2col matrix, in the K order of the forward convolution.
    fn depth_tap(&self, k: &mut KernelBuilder, kk: SliceK) -> Tap {
        let column = self.order.split(k, kk, self.g.kernel_area());
        self.tap(k, column)
    }

    /// Weight column `column` (channel-major: the weight gradient's columns).
    fn column_tap(&self, k: &mut KernelBuilder, column: U32) -> Tap {
        let column = Column::channel_major(k, column, self.g.kernel_area());
        self.tap(k, column)
    }

    fn tap(&self, k: &mut KernelBuilder, column: Column) -> Tap {
        let g = self.g;
        let (ki, kj) = g.tap_position(k, column.tap);
        Tap {
            c: column.channel(k),
            ki,
            kj,
            spatial: k.mad_u(ki, g.w, kj),
            channel_offset: k.mul_u(column.lane, g.h * g.w),
            channel_round: column.round * g.h * g.w,
        }
    }

    fn fetch(&self, k: &mut KernelBuilder, window: Window, tap: Tap, inside: Pred) -> Fetch<Pixel> {
        let g = self.g;
        let iy = k.add_u(window.y0, tap.ki);
        let ix = k.add_u(window.x0, tap.kj);
        let row_ok = k.cmp_u(Cmp::Lt, iy, g.h);
        let col_ok = k.cmp_u(Cmp::Lt, ix, g.w);
        let exists = k.and(row_ok, col_ok);
        // the pixel's place in its channel, the same for every channel of a one-tap slice (grouped K);
        // clamped where it does not exist
        let pixel = k.add_u(window.offset, tap.spatial);
        let pixel = k.select_u(exists, pixel, 0u32);
        // the channel's plane in the example: one sum per line where lines outlive slices
        // (the weight gradient's columns)
        let channel = k.idx(tap.channel_offset);
        let plane = k.idx_add(self.example, channel);
        let pixel = k.idx(pixel);
        let at = k.idx_add(plane, pixel);
        let src = k.element_ptr(self.x, at).plus(tap.channel_round);
        let exists = k.and(exists, inside);
        if self.prologue.is_none() {
            return Fetch::Copy { src, exists };
        }
        Fetch::Loaded(Pixel {
            value: k.load_from(src),
            channel: k.select_u(exists, tap.c, g.c),
        })
    }

    fn finish(&self, k: &mut KernelBuilder, pixel: Pixel) -> F32 {
        let source = self
            .prologue
            .as_ref()
            .expect("only pixels with a prologue are loaded");
        // channel C's pair is (0, 0): padding comes out relu(x·0 + 0) = 0, x being a real
        // (clamped) pixel; were it infinite or NaN, so would the BN statistics be
        Prologue::load(k, source, pixel.channel).apply(k, pixel.value)
    }
}

/// The im2col matrix as A (lines are output positions): the forward convolution's.
struct Positions<'a>(Im2col<'a>);

impl Operand for Positions<'_> {
    type Line = Window;
    type Depth = Tap;
    type Fetched = Pixel;

    fn line(&self, k: &mut KernelBuilder, p: U32) -> Window {
        self.0.window(k, p)
    }

    fn depth(&self, k: &mut KernelBuilder, kk: SliceK) -> Tap {
        self.0.depth_tap(k, kk)
    }

    fn fetch(&self, k: &mut KernelBuilder, window: Window, tap: Tap, inside: Pred) -> Fetch<Pixel> {
        self.0.fetch(k, window, tap, inside)
    }

    fn finish(&self, k: &mut KernelBuilder, pixel: Pixel) -> F32 {
        self.0.finish(k, pixel)
    }

    fn loads(&self) -> bool {
        self.0.prologue.is_some()
    }
}

/// The im2col matrix as B, transposed (lines are weight columns, k runs over output
/// positions): the weight gradient's.
struct Taps<'a>(Im2col<'a>);

impl Operand for Taps<'_> {
    type Line = Tap;
    type Depth = Window;
    type Fetched = Pixel;

    fn line(&self, k: &mut KernelBuilder, column: U32) -> Tap {
        self.0.column_tap(k, column)
    }

    fn depth(&self, k: &mut KernelBuilder, p: SliceK) -> Window {
        self.0.window(k, p.index)
    }

    fn fetch(&self, k: &mut KernelBuilder, tap: Tap, window: Window, inside: Pred) -> Fetch<Pixel> {
        self.0.fetch(k, window, tap, inside)
    }

    fn finish(&self, k: &mut KernelBuilder, pixel: Pixel) -> F32 {
        self.0.finish(k, pixel)
    }

    fn loads(&self) -> bool {
        self.0.prologue.is_some()
    }
}

/// The weight gradient's B (the im2col matrix transposed: lines are weight columns
/// (c, ki, kj), k the output positions) staged as the input patch a K slice reads, where a
/// slice's positions are whole output rows or part of one (`bk` divides the output width,
/// or the width divides `bk`): for the slice's output rows, `rows = (runs − 1)·stride + kh`
/// input rows × `span = (run − 1)·stride + kw` columns of each channel the tile's columns
/// touch, `run` = min(bk, wo) positions per output row, `runs` = bk / run rows. Each pixel
/// is copied (or loaded and its prologue applied) once per slice rather than once per tap
/// (9 times for 3×3), by index arithmetic made once per block; column (c, ki, kj) at the
/// slice's position (qy, qx) is then `patch[c − c₀][qy·stride + ki][qx·stride + kj]`, so the
/// multiply's lines are offsets into the patch and its k step through it ([`KSteps`]). The
/// block's layout of it is made once ([`PatchLayout`]), each example's product stages its
/// own x ([`Patch`]).
struct PatchLayout<'a> {
    g: &'a Geometry,
    dims: PatchDims,
    array: SharedF32,
    /// The tile's first column and its channel c₀.
    first_column: U32,
    first_channel: U32,
    elements: Vec<PatchElement>,
    /// Where the thread's columns start in a half ([`Staging::thread_lines`]).
    lines: Vec<LineAt>,
}

/// The patch of one example's x: `source` is its channel c₀.
struct Patch<'a> {
    layout: &'a PatchLayout<'a>,
    source: GlobalF32,
}

/// A patch's sizes: `channels` planes of `rows × span`, staged in `rounds` of the block's
/// threads (a half holds `rounds·THREADS` words, so that no thread needs a branch); `run`
/// positions of a slice per output row.
#[derive(Clone, Copy)]
struct PatchDims {
    channels: u32,
    rows: u32,
    span: u32,
    run: u32,
    rounds: u32,
    depth: u32,
    columns: u32,
    /// Slices staged at once (a patch of at most [`PATCH_ROUNDS`] rounds and dy's slice fit
    /// in shared memory 4 deep).
    stages: u32,
}

/// Rounds of patch elements a thread keeps the index arithmetic of (registers).
const PATCH_ROUNDS: u32 = 4;

/// A row past every input: where a patch element's channel does not exist, its row lies
/// there, so that the window check alone leaves it zero.
const NO_ROW: u32 = 1 << 30;

impl PatchDims {
    /// The patch of weight-gradient `shape` in `tiling`, if its slices are whole output
    /// rows or parts of one, of at least 4 positions (the mma's k lanes step evenly through
    /// 4), and it takes few rounds.
    /// Staged `stages` slices at a time where it is copied; 2 where its pixels are loaded
    /// for a prologue (`loads`), which holds them in registers one step either way.
    fn choose(
        g: &Geometry,
        (tiling, shape): (Tiling, GemmShape),
        (stages, loads): (u32, bool),
    ) -> Option<PatchDims> {
        let (area, bk) = (g.kernel_area(), tiling.bk);
        let run = g.wo.min(bk);
        let aligned = g.wo.is_multiple_of(bk) || bk.is_multiple_of(g.wo);
        // the most channels bn consecutive columns touch
        let channels = ((tiling.bn - 1) / area + 2).min(g.c);
        let rows = (bk / run - 1) * g.stride + g.kh;
        let span = (run - 1) * g.stride + g.kw;
        let rounds = (channels * rows * span).div_ceil(THREADS);
        let fits = area > 1 && aligned && run.is_multiple_of(4) && rounds <= PATCH_ROUNDS;
        fits.then_some(PatchDims {
            channels,
            rows,
            span,
            run,
            rounds,
            depth: bk,
            columns: shape.n,
            stages: if loads { DOUBLE_BUFFERED } else { stages },
        })
    }

    fn words(&self) -> u32 {
        self.rounds * THREADS
    }

    /// Where a column's k lie in the patch: `stride` apart along an output row, the next row
    /// `stride` input rows down.
    fn steps(&self, g: &Geometry) -> KSteps {
        KSteps {
            stride: g.stride,
            run: self.run,
            run_stride: g.stride * self.span,
        }
    }
}

/// A patch element a thread stages at every slice: its row (or `NO_ROW`) and column in the
/// patch, its offset from the patch's corner in the input (from channel c₀), and its
/// channel's prologue.
struct PatchElement {
    row: U32,
    col: U32,
    offset: U32,
    prologue: Option<Prologue>,
}

impl<'a> PatchLayout<'a> {
    /// The block's patch: where its threads' elements lie, made once for every example.
    fn new(
        k: &mut KernelBuilder,
        g: &'a Geometry,
        dims: PatchDims,
        place: &TilePlace,
        prologue: Option<&PrologueSource>,
    ) -> Self {
        let first_column = place.first_column();
        let first_channel = k.ubin(BinOp::Div, first_column, g.kernel_area());
        let tid = k.tid();
        let plane = dims.rows * dims.span;
        let elements = (0..dims.rounds)
            .map(|r| {
                let e = k.add_u(tid, r * THREADS);
                let pc = k.ubin(BinOp::Div, e, plane);
                let within = k.ubin(BinOp::Rem, e, plane);
                let (row, col) = (
                    k.ubin(BinOp::Div, within, dims.span),
                    k.ubin(BinOp::Rem, within, dims.span),
                );
                // elements past the input's channels or past the patch stage zeros (no line
                // reads them, but their loads would leave x)
                let channel = k.add_u(first_channel, pc);
                let exists = k.cmp_u(Cmp::Lt, channel, g.c);
                let in_patch = k.cmp_u(Cmp::Lt, pc, dims.channels);
                let exists = k.and(exists, in_patch);
                let offset = k.mad_u(row, g.w, col);
                let offset = k.mad_u(pc, g.h * g.w, offset);
                // channel C's pair is (0, 0)
                let prologue = prologue.map(|source| {
                    let c = k.ubin(BinOp::Min, channel, g.c);
                    Prologue::load(k, source, c)
                });
                PatchElement {
                    row: k.select_u(exists, row, NO_ROW),
                    col,
                    offset,
                    prologue,
                }
            })
            .collect();
        let mut layout = PatchLayout {
            g,
            dims,
            array: k.shared(dims.stages * dims.words()),
            first_column,
            first_channel,
            elements,
            lines: Vec::new(),
        };
        // the thread's columns are the same in every example's product
        let set = place.line_set(k, Operands::B);
        layout.lines = set.offsets(k, dims.steps(g), |k, first, plus| {
            layout.line_offset(k, first, plus)
        });
        layout
    }

    /// Where column `first + plus` of the tile starts in a half.
    fn line_offset(&self, k: &mut KernelBuilder, first: U32, plus: u32) -> (U32, u32) {
        let (g, dims) = (self.g, self.dims);
        // a column past the weights reads the last one's (its products are never stored)
        let column = k.add_u(self.first_column, first);
        let column = k.add_u(column, plus);
        let column = k.ubin(BinOp::Min, column, dims.columns - 1);
        let c = k.ubin(BinOp::Div, column, g.kernel_area());
        let tap = k.ubin(BinOp::Rem, column, g.kernel_area());
        let (ki, kj) = g.tap_position(k, tap);
        let pc = k.ubin(BinOp::Sub, c, self.first_channel);
        let row = k.mad_u(pc, dims.rows, ki);
        (k.mad_u(row, dims.span, kj), 0)
    }

    /// The patch of example `n` of input `x`.
    fn for_example(&'a self, k: &mut KernelBuilder, x: U64, n: U32) -> Patch<'a> {
        let g = self.g;
        let example = example_start(k, n, g.c * g.h * g.w);
        let channel = k.mul_u(self.first_channel, g.h * g.w);
        let channel = k.idx(channel);
        let at = k.idx_add(example, channel);
        Patch {
            layout: self,
            source: k.element_ptr(x, at),
        }
    }
}

impl Patch<'_> {
    /// Stage `half` of the staging area.
    fn half(&self, k: &mut KernelBuilder, half: U32) -> Slice {
        let dims = self.layout.dims;
        Slice {
            array: self.layout.array,
            base: k.mul_u(half, dims.words()),
            steps: self.layout.dims.steps(self.layout.g),
            depth: dims.depth,
        }
    }
}

impl Staging for Patch<'_> {
    /// Per element round: the loaded pixel, or NaN where none exists (the prologue's ReLU,
    /// `max`, returns its other operand for NaN: zero).
    type Fetched = Vec<F32>;

    fn k_steps(&self) -> KSteps {
        self.layout.dims.steps(self.layout.g)
    }

    fn thread_lines(&self, _k: &mut KernelBuilder, _set: &LineSet) -> Vec<LineAt> {
        self.layout.lines.clone()
    }

    fn slice(&self, k: &mut KernelBuilder, _step: U32, half: U32) -> Slice {
        self.half(k, half)
    }

    fn fetch(&self, k: &mut KernelBuilder, k0: U32, half: U32) -> (Vec<F32>, bool) {
        let g = self.layout.g;
        // the slice after the last (fetched, never used) lies past the output: every pixel
        // is checked anyway
        let oy = k.ubin(BinOp::Div, k0, g.wo);
        let ox = k.ubin(BinOp::Rem, k0, g.wo);
        // the patch's corner in the input
        let (y0, x0) = (g.window_start(k, oy), g.window_start(k, ox));
        let corner = k.mad_u(y0, g.w, x0);
        let slice = self.half(k, half);
        let tid = k.tid();
        let at = k.add_u(slice.base, tid);
        let mut loaded = Vec::new();
        for (r, element) in self.layout.elements.iter().enumerate() {
            let iy = k.add_u(y0, element.row);
            let ix = k.add_u(x0, element.col);
            let row_ok = k.cmp_u(Cmp::Lt, iy, g.h);
            let col_ok = k.cmp_u(Cmp::Lt, ix, g.w);
            let exists = k.and(row_ok, col_ok);
            let offset = k.add_u(corner, element.offset);
            let plus = r as u32 * THREADS;
            if element.prologue.is_none() {
                let offset = k.select_u(exists, offset, 0u32);
                let src = k.element_ptr_past(self.source, offset);
                k.copy_async_from(slice.array, at, plus, src, exists);
                continue;
            }
            let value = k.f32(f32::NAN);
            k.when(exists, |k| {
                let src = k.element_ptr_past(self.source, offset);
                let pixel = k.load_from(src);
                k.assign(value, pixel);
            });
            loaded.push(value);
        }
        // without a prologue, every element went by cp.async
        let copies = loaded.is_empty();
        (loaded, copies)
    }

    fn stages(&self) -> u32 {
        self.layout.dims.stages
    }

    fn describe(&self) -> &'static str {
        "patch"
    }

    fn store(&self, k: &mut KernelBuilder, fetched: &Vec<F32>, half: U32) {
        if fetched.is_empty() {
            return;
        }
        let slice = self.half(k, half);
        let tid = k.tid();
        let at = k.add_u(slice.base, tid);
        for (r, (&pixel, element)) in fetched.iter().zip(&self.layout.elements).enumerate() {
            let prologue = element.prologue.as_ref().expect("loaded with a prologue");
            let value = prologue.apply(k, pixel);
            k.store_shared_plus(slice.array, at, r as u32 * THREADS, value);
        }
    }
}

/// The forward convolution's A (the im2col matrix: lines are the tile's output positions, k
/// the (channel, tap) pairs in `Order::Grouped`) staged as the input halo the tile's windows
/// cover, a group of `bk` channels at a time, where the tile holds whole output rows:
/// `rows = (tile rows − 1)·stride + kh` input rows × `span = (wo − 1)·stride + kw` columns
/// of each of the group's channels. Each pixel is copied (or loaded and its prologue
/// applied) once for all `area` taps rather than once per tap. A group's slices are its taps:
/// position (py, px) of the tile, tap (ki, kj), the group's channel c is
/// `halo[c][py·stride + ki][px·stride + kj]`, so a slice's base adds its tap's offset and the
/// multiply's lines are offsets of positions. The fetch of a group's first slice stages the
/// whole group, into the half the group before did not use. A stride-1 data gradient's A
/// is staged the same way from dy, its taps flipped ([`HaloOf`]).
struct Halo<'a> {
    g: &'a Geometry,
    dims: HaloDims,
    array: SharedF32,
    /// The source (x, or dy) at the product's example.
    example: GlobalF32,
    /// The thread's places in a channel plane, the same for every channel and group.
    places: Vec<HaloPlace>,
    prologue: Option<PrologueSource>,
}

/// Place `q = tid + j·THREADS` of a halo's channel plane (round j): whether it lies in the
/// plane's `rows × span` (`in_plane`, where a round runs past them), whether its pixel lies
/// in the source (0 or 1: a register, not a predicate, held across the loop), and the pixel's
/// offset in a channel of the source (0 where none).
struct HaloPlace {
    in_plane: Option<Pred>,
    inside: U32,
    pixel: U32,
}

/// A halo's sizes: channel planes of `rows × span` words, `plane` apart (padded); a group of
/// `depth` channels, staged plane place by plane place in `rounds` of the block's threads
/// (each all the group's channels), into one half or two (where there are several groups).
#[derive(Clone, Copy)]
struct HaloDims {
    frame: HaloFrame,
    /// Examples a tile holds whole (rows over the batch), or 1 (rows of one example).
    examples: u32,
    depth: u32,
    area: u32,
    groups: u32,
    tile_rows: u32,
    rows: u32,
    span: u32,
    plane: u32,
    rounds: u32,
    halves: u32,
    /// Slices of the weights in flight beside it.
    stages: u32,
}

/// The most shared words a halo takes (both halves): with the weights' slices (at most
/// 2 · 16 · (64 + 8) words) and the statistics' column sums (at most 16 · 64), within the
/// 48 KiB (12288 words) of static shared memory.
const HALO_WORDS: u32 = 8960;

/// Which tensor a halo stages, and how the GEMM's rows and taps meet it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HaloOf {
    /// The forward's input x: output position (oy, ox) at tap (ki, kj) reads
    /// `x[oy·stride + ki − pad][ox·stride + kj − pad]`.
    Input,
    /// The data gradient's dy, at stride 1: input position (iy, ix) at tap (ki, kj) reads
    /// `dy[iy + pad − ki][ix + pad − kj]`, the taps flipped.
    OutputGradient,
}

/// The halo's source as a GEMM's rows see it: `channels` planes of `height × width`, rows
/// of `row_width` positions `stride` apart in the source, the halo's first row `shift` rows
/// after the tile's first row times the stride (and its first column `shift` columns in).
#[derive(Clone, Copy)]
struct HaloFrame {
    channels: u32,
    height: u32,
    width: u32,
    row_width: u32,
    stride: u32,
    shift: i64,
    flipped: bool,
}

impl HaloFrame {
    fn new(g: &Geometry, of: HaloOf) -> HaloFrame {
        match of {
            HaloOf::Input => HaloFrame {
                channels: g.c,
                height: g.h,
                width: g.w,
                row_width: g.wo,
                stride: g.stride,
                shift: -(g.pad as i64),
                flipped: false,
            },
            HaloOf::OutputGradient => HaloFrame {
                channels: g.o,
                height: g.ho,
                width: g.wo,
                row_width: g.w,
                stride: 1,
                shift: g.pad as i64 - (g.kh as i64 - 1),
                flipped: true,
            },
        }
    }
}

impl HaloDims {
    /// The halo of a forward convolution's input or a stride-1 data gradient's dy in
    /// `tiling`, if its tiles hold whole rows of one example (or, with rows over the batch,
    /// whole examples), its channels fill whole groups and it fits: within [`HALO_WORDS`],
    /// and with the weights' slices, `stages` deep (or 2), and `epilogue_bytes` of the
    /// kernel's other arrays, within static shared memory.
    fn choose(
        g: &Geometry,
        (tiling, rows): (Tiling, Rows),
        of: HaloOf,
        (stages, epilogue_bytes): (u32, u32),
    ) -> Option<HaloDims> {
        let frame = HaloFrame::new(g, of);
        let (depth, area) = (tiling.bk, g.kernel_area());
        let (examples, tile_rows) = match rows {
            Rows::PerExample if tiling.bm.is_multiple_of(frame.row_width) => {
                (1, tiling.bm / frame.row_width)
            }
            Rows::Batched { positions } if tiling.bm.is_multiple_of(positions) => {
                (tiling.bm / positions, positions / frame.row_width)
            }
            _ => return None,
        };
        let square = g.kh == g.kw; // one shift serves rows and columns
        let strided = of == HaloOf::OutputGradient && g.stride != 1;
        if !frame.channels.is_multiple_of(depth) || area == 1 || !square || strided {
            return None;
        }
        let rows = (tile_rows - 1) * frame.stride + g.kh;
        let span = (frame.row_width - 1) * frame.stride + g.kw;
        // an example's rows × span in each channel plane; an A fragment load reads 8
        // positions (adjacent at stride 1) of 4 channels: planes 8 banks apart keep the 32
        // words in 32 banks
        let used = examples * rows * span;
        let plane = if frame.stride == 1 {
            used.next_multiple_of(16) | 8
        } else {
            used
        };
        let rounds = used.div_ceil(THREADS);
        let groups = frame.channels / depth;
        // dy is copied: with several groups, its halo's per-slice work costs what it saves
        // (loop estimate: ResNet44's 32- and 64-channel data gradients even or 1% slower)
        if of == HaloOf::OutputGradient && groups > 1 {
            return None;
        }
        let halves = groups.min(2);
        let halo_bytes = 4 * halves * depth * plane;
        let fits = |stages: u32| {
            halo_bytes + stages * stage_bytes(tiling.bn, depth) + epilogue_bytes <= STATIC_SHARED
        };
        // the next group is staged `stages − 1` slices ahead, while its half is still read
        // unless the group before has ended: a group's taps must outnumber that
        let stages = [stages, DOUBLE_BUFFERED]
            .into_iter()
            .find(|&s| (s == DOUBLE_BUFFERED || area >= s - 1) && fits(s))?;
        (halves * depth * plane <= HALO_WORDS).then_some(HaloDims {
            frame,
            examples,
            depth,
            area,
            groups,
            tile_rows,
            rows,
            span,
            plane,
            rounds,
            halves,
            stages,
        })
    }

    fn words(&self) -> u32 {
        self.depth * self.plane
    }

    fn steps(&self) -> KSteps {
        KSteps::even(self.plane)
    }
}

impl<'a> Halo<'a> {
    /// The halo of example `n`'s product at `place`.
    fn new(
        k: &mut KernelBuilder,
        g: &'a Geometry,
        dims: HaloDims,
        (x, prologue): (U64, Option<PrologueSource>),
        (place, n): (&TilePlace, U32),
    ) -> Self {
        let f = dims.frame;
        let per_example = f.channels * f.height * f.width;
        // the tile's first example and its first output row there
        let (first, first_row) = if dims.examples > 1 {
            let first = k.mul_u(place.tile_row, dims.examples);
            (first, k.u32(0))
        } else {
            (n, k.mul_u(place.tile_row, dims.tile_rows))
        };
        let example = example_start(k, first, per_example);
        let scaled = k.mul_u(first_row, f.stride);
        // the halo's first row and column ("negative", wrapped, in the padding)
        let shift = f.shift as i32 as u32;
        let top = k.add_u(scaled, shift);
        let tid = k.tid();
        let block = dims.rows * dims.span;
        let places = (0..dims.rounds)
            .map(|j| {
                let q = k.add_u(tid, j * THREADS);
                let in_plane = ((j + 1) * THREADS > dims.examples * block)
                    .then(|| k.cmp_u(Cmp::Lt, q, dims.examples * block));
                let e = k.ubin(BinOp::Div, q, block);
                let within = k.ubin(BinOp::Rem, q, block);
                let row = k.ubin(BinOp::Div, within, dims.span);
                let col = k.ubin(BinOp::Rem, within, dims.span);
                let iy = k.add_u(top, row);
                let ix = k.add_u(col, shift);
                let row_ok = k.cmp_u(Cmp::Lt, iy, f.height);
                let col_ok = k.cmp_u(Cmp::Lt, ix, f.width);
                let inside = k.and(row_ok, col_ok);
                // a tile's examples past the batch have no pixels
                let n = k.add_u(first, e);
                let in_batch = k.cmp_u(Cmp::Lt, n, g.batch);
                let inside = k.and(inside, in_batch);
                let pixel = k.mad_u(iy, f.width, ix);
                let pixel = k.mad_u(e, per_example, pixel);
                HaloPlace {
                    in_plane,
                    inside: k.select_u(inside, 1u32, 0u32),
                    pixel: k.select_u(inside, pixel, 0u32),
                }
            })
            .collect();
        Halo {
            g,
            dims,
            array: k.shared(dims.halves * dims.words()),
            example: k.element_ptr(x, example),
            places,
            prologue,
        }
    }

    /// Where group `group`'s half starts.
    fn group_half(&self, k: &mut KernelBuilder, group: U32) -> U32 {
        if self.dims.halves == 1 {
            return k.u32(0);
        }
        let parity = k.ubin(BinOp::And, group, 1u32);
        k.mul_u(parity, self.dims.words())
    }

    /// Stages group `group` into its half: each of the thread's plane places in every
    /// channel of the group (the channel's offsets constants).
    fn stage(&self, k: &mut KernelBuilder, group: U32) {
        let dims = self.dims;
        let half = self.group_half(k, group);
        let tid = k.tid();
        let at = k.add_u(half, tid);
        let plane = dims.frame.height * dims.frame.width;
        let first_channel = k.mul_u(group, dims.depth);
        let channels = k.mul_u(first_channel, plane);
        // channel c's (scale, shift) at pairs + 2c
        let pairs = self.prologue.map(|source| {
            let first = k.mul_u(first_channel, 2u32);
            k.element_ptr(source.pairs, first)
        });
        for (j, place) in self.places.iter().enumerate() {
            let stage_place = |k: &mut KernelBuilder| {
                let inside = k.cmp_u(Cmp::Ne, place.inside, 0u32);
                let offset = k.add_u(channels, place.pixel);
                let src = k.element_ptr_past(self.example, offset);
                for c in 0..dims.depth {
                    let (src, plus) = (src.plus(c * plane), j as u32 * THREADS + c * dims.plane);
                    match pairs {
                        None => k.copy_async_from(self.array, at, plus, src, inside),
                        Some(pairs) => {
                            let prologue = Prologue::at(k, pairs.plus(2 * c));
                            let pixel = k.load_from(src);
                            let value = prologue.apply(k, pixel);
                            let value = k.select(inside, value, 0.0f32);
                            k.store_shared_plus(self.array, at, plus, value);
                        }
                    }
                }
            };
            match place.in_plane {
                Some(in_plane) => k.when(in_plane, stage_place),
                None => stage_place(k),
            }
        }
    }
}

impl Staging for Halo<'_> {
    type Fetched = ();

    fn k_steps(&self) -> KSteps {
        self.dims.steps()
    }

    /// Position p of the tile at tap (0, 0): `(p / wo)·stride` rows and `(p % wo)·stride`
    /// columns into the halo.
    fn thread_lines(&self, k: &mut KernelBuilder, set: &LineSet) -> Vec<LineAt> {
        let (dims, f) = (self.dims, self.dims.frame);
        let positions = dims.tile_rows * f.row_width;
        set.offsets(k, dims.steps(), |k, first, plus| {
            let p = k.add_u(first, plus);
            // the example's block of rows (with rows over the batch), then the row
            let e = k.ubin(BinOp::Div, p, positions);
            let p = k.ubin(BinOp::Rem, p, positions);
            let py = k.ubin(BinOp::Div, p, f.row_width);
            let px = k.ubin(BinOp::Rem, p, f.row_width);
            let row = k.mul_u(py, f.stride);
            let row = k.mad_u(e, dims.rows, row);
            let row = k.mul_u(row, dims.span);
            (k.mad_u(px, f.stride, row), 0)
        })
    }

    fn slice(&self, k: &mut KernelBuilder, step: U32, _half: U32) -> Slice {
        let (g, dims) = (self.g, self.dims);
        let (group, tap) = Order::group_and_tap(k, step, dims.area);
        let tap = if dims.frame.flipped {
            let last = k.u32(dims.area - 1);
            k.ubin(BinOp::Sub, last, tap)
        } else {
            tap
        };
        let (ki, kj) = g.tap_position(k, tap);
        let half = self.group_half(k, group);
        let row = k.mad_u(ki, dims.span, half);
        Slice {
            array: self.array,
            base: k.add_u(row, kj),
            steps: dims.steps(),
            depth: dims.depth,
        }
    }

    /// Slice `k0` stages its group where it is the group's first.
    fn fetch(&self, k: &mut KernelBuilder, k0: U32, _half: U32) -> ((), bool) {
        let dims = self.dims;
        let slice = k.ubin(BinOp::Div, k0, dims.depth);
        let (group, tap) = Order::group_and_tap(k, slice, dims.area);
        let first = k.cmp_u(Cmp::Eq, tap, 0u32);
        let exists = k.cmp_u(Cmp::Lt, group, dims.groups);
        let starts = k.and(first, exists);
        k.when(starts, |k| self.stage(k, group));
        ((), self.prologue.is_none())
    }

    fn store(&self, _k: &mut KernelBuilder, _fetched: &(), _half: U32) {}

    fn staged_every(&self) -> u32 {
        self.dims.area
    }

    /// A halo is staged once per channel group, in halves of its own, `stages − 1` slices
    /// ahead like the weights beside it.
    fn stages(&self) -> u32 {
        self.dims.stages
    }

    fn describe(&self) -> &'static str {
        "halo"
    }
}

/// dy of example `n` as the data gradient's A: element (input position p = (iy, ix), column
/// (o, ki, kj)) is `dy[n][o][oy][ox]` at the output position whose window puts tap (ki, kj)
/// on p, `oy = (iy + pad − ki) / stride` where that divides and lies in `0..ho` (likewise
/// ox); zero where no window does.
struct Spread<'a> {
    g: &'a Geometry,
    dy: U64,
    /// As `Im2col::example`.
    example: Idx,
    order: Order,
    rows: Rows,
}

/// An input position shifted by the padding, `(iy + pad, ix + pad)`, and, with rows over the
/// batch, its example's start in dy.
#[derive(Clone, Copy)]
struct Lead {
    y: U32,
    x: U32,
    example: U32,
}

/// A column (o, ki, kj) of the data gradient's K: the tap and output channel o's offset, as
/// a register and a constant (`Column`).
#[derive(Clone, Copy)]
struct OutputTap {
    ki: U32,
    kj: U32,
    offset: U32,
    round: u32,
}

impl Spread<'_> {
    /// The output coordinate `(lead − offset) / stride` and whether it exists: `lead <
    /// offset` wraps to a huge value, which fails the range check.
    fn coordinate(&self, k: &mut KernelBuilder, lead: U32, offset: U32, size: u32) -> (U32, Pred) {
        let shifted = k.ubin(BinOp::Sub, lead, offset);
        let stride = self.g.stride;
        if stride == 1 {
            return (shifted, k.cmp_u(Cmp::Lt, shifted, size));
        }
        let out = k.ubin(BinOp::Div, shifted, stride);
        let rem = k.ubin(BinOp::Rem, shifted, stride);
        let divides = k.cmp_u(Cmp::Eq, rem, 0u32);
        let inside = k.cmp_u(Cmp::Lt, out, size);
        (out, k.and(divides, inside))
    }
}

impl Operand for Spread<'_> {
    type Line = Lead;
    type Depth = OutputTap;
    type Fetched = Infallible;

    fn line(&self, k: &mut KernelBuilder, p: U32) -> Lead {
        let g = self.g;
        let zero = k.u32(0);
        let (n, p) = self.rows.split(k, p, zero);
        let (iy, ix) = (k.ubin(BinOp::Div, p, g.w), k.ubin(BinOp::Rem, p, g.w));
        Lead {
            y: k.add_u(iy, g.pad),
            x: k.add_u(ix, g.pad),
            example: k.mul_u(n, g.o * g.ho * g.wo),
        }
    }

    fn depth(&self, k: &mut KernelBuilder, kk: SliceK) -> OutputTap {
        let g = self.g;
        let column = self.order.split(k, kk, g.kernel_area());
        let (ki, kj) = g.tap_position(k, column.tap);
        OutputTap {
            ki,
            kj,
            offset: k.mul_u(column.lane, g.ho * g.wo),
            round: column.round * g.ho * g.wo,
        }
    }

    fn fetch(
        &self,
        k: &mut KernelBuilder,
        lead: Lead,
        tap: OutputTap,
        inside: Pred,
    ) -> Fetch<Infallible> {
        let g = self.g;
        let (oy, row_ok) = self.coordinate(k, lead.y, tap.ki, g.ho);
        let (ox, col_ok) = self.coordinate(k, lead.x, tap.kj, g.wo);
        let exists = k.and(row_ok, col_ok);
        // as with Im2col: the same position for every output channel of a one-tap slice (grouped K)
        let position = k.mad_u(oy, g.wo, ox);
        let position = k.add_u(position, lead.example);
        let position = k.select_u(exists, position, 0u32);
        let at = k.add_u(position, tap.offset);
        let at = k.idx(at);
        let at = k.idx_add(self.example, at);
        Fetch::Copy {
            src: k.element_ptr(self.dy, at).plus(tap.round),
            exists: k.and(exists, inside),
        }
    }

    fn finish(&self, _k: &mut KernelBuilder, never: Infallible) -> F32 {
        match never {}
    }

    fn loads(&self) -> bool {
        false
    }
}

/// Per-channel BN-apply + ReLU of a prologue, the reference's `relu((x − mean)·scale + β)`
/// as `relu(x·scale + shift)`, `scale = γ·invstd` and `shift = β − mean·scale` (one fused
/// multiply-add where the reference takes three operations: within the GEMM's bounds, and
/// the same in every convolution that recomputes the activation).
struct Prologue {
    scale: F32,
    shift: F32,
}

/// Where a gather finds its prologue: the per-channel (scale, shift) pairs that
/// `with_prologue_pairs`' first kernel computes once (not at every gathered element), and
/// (0, 0) for channel C, where the gather puts padding.
#[derive(Clone, Copy)]
struct PrologueSource {
    pairs: U64,
}

impl Prologue {
    fn load(k: &mut KernelBuilder, source: &PrologueSource, c: U32) -> Prologue {
        let first = k.mul_u(c, 2u32);
        let at = k.element_ptr(source.pairs, first);
        Prologue::at(k, at)
    }

    /// The pair at `pair`.
    fn at(k: &mut KernelBuilder, pair: GlobalF32) -> Prologue {
        Prologue {
            scale: k.load_from(pair),
            shift: k.load_from(pair.plus(1)),
        }
    }

    fn apply(&self, k: &mut KernelBuilder, x: F32) -> F32 {
        let z = k.fma(x, self.scale, self.shift);
        k.max(z, 0.0f32)
    }
}

/// The prologue's statistics pointers, read from the kernel's parameters.
fn prologue_params(k: &mut KernelBuilder, prologue: Option<FloatAttr>) -> Option<BnParams> {
    prologue.map(|eps| BnParams::declare(k, eps.0 as f32))
}

/// The prologue's pairs parameter, which must be the kernel's last (see
/// `with_prologue_pairs`); the statistics' own parameters stay declared before it.
fn prologue_source(k: &mut KernelBuilder, params: Option<BnParams>) -> Option<PrologueSource> {
    params.map(|_| PrologueSource {
        pairs: k.ptr_param("prologue_pairs"),
    })
}

/// Inputs 1 to 4 of a convolution with a prologue: the BN mean, variance, γ and β.
const PROLOGUE_STATISTICS: std::ops::RangeInclusive<usize> = 1..=4;

/// Adds the prologue's pairs to a lowering whose first launch is the main kernel (with
/// `prologue_pairs` as its last parameter): a first kernel computes, per channel,
/// `scale = γ·(var + ε)^(−½)` (as `bn_apply` does) and `shift = β − mean·scale`, into a new
/// scratch buffer of `channels + 1` pairs, the last (0, 0).
fn with_prologue_pairs(cx: &Cx, lowered: Lowered, eps: FloatAttr, channels: u64) -> Lowered {
    let Lowered::Kernels {
        mut launches,
        scratch: mut buffers,
    } = lowered
    else {
        unreachable!("a convolution lowers to kernels")
    };
    let buffer = scratch(buffers.len());
    buffers.push(4 * 2 * (channels + 1));
    launches[0].args.push(buffer);
    let mut k = cx.builder("prologue_pairs");
    let params = BnParams::declare(&mut k, eps.0 as f32);
    let out = k.ptr_param("pairs");
    map(&mut k, channels + 1, |k, c| {
        let c = k.idx_to_u32(c);
        let real = k.cmp_u(Cmp::Lt, c, channels as u32);
        let safe = k.ubin(BinOp::Min, c, channels as u32 - 1);
        let inv = inv_std(k, params.var, safe, params.eps);
        let g = k.load(params.gamma, safe);
        let scale = k.mul(g, inv);
        let mean = k.load(params.mean, safe);
        let beta = k.load(params.beta, safe);
        let minus_mean = k.neg(mean);
        let shift = k.fma(minus_mean, scale, beta);
        let scale = k.select(real, scale, 0.0f32);
        let shift = k.select(real, shift, 0.0f32);
        let first = k.mul_u(c, 2u32);
        k.store(out, first, scale);
        let second = k.add_u(first, 1u32);
        k.store(out, second, shift);
    });
    let mut args: Vec<_> = PROLOGUE_STATISTICS.map(input).collect();
    args.push(buffer);
    launches.insert(0, launch(k.finish(), grid_for(channels + 1), args));
    Lowered::Kernels {
        launches,
        scratch: buffers,
    }
}

/// The forward convolution as an implicit GEMM per example (`gemm.rs`): C[p][o] over the
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
    let tiling = Tiling::for_columns(g.o, cx.options.precision)
        .with_stages(cx.options.stages, COLUMN_SUMS_BYTES);
    let batching = Rows::choose(positions, tiling, false);
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
    // A: the input's halo where it fits, else its im2col elements
    let budget = (cx.options.stages, COLUMN_SUMS_BYTES);
    let halo = HaloDims::choose(&g, (tiling, batching), HaloOf::Input, budget);
    let area = g.kernel_area();
    let order = Order::choose(g.c, tiling, halo.is_some(), area);
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

/// The epilogue's mask inputs, declared as kernel parameters in the op's input order (after
/// y, mean and var).
enum MaskSource {
    /// γ and β: the ReLU recomputed from y.
    Recomputed(BnParams),
    /// The shortcut's gradient and the ReLU's output.
    Residual { shortcut: U64, out: U64 },
}

/// A fused data gradient's epilogue parameters: the BN's input y and statistics, where its
/// ReLU mask comes from, and the squares its reductions sum.
struct DgradEpilogue {
    y: U64,
    mean: U64,
    var: U64,
    eps: f32,
    mask: MaskSource,
    squares: Squares,
}

impl DgradEpilogue {
    /// The kernel parameters of `e`'s epilogue, in their order.
    fn params(k: &mut KernelBuilder, e: &FusedDgrad) -> DgradEpilogue {
        let y = k.ptr_param("y");
        let (mean, var) = (k.ptr_param("mean"), k.ptr_param("var"));
        let eps = e.eps.0 as f32;
        let mask = if e.residual {
            MaskSource::Residual {
                shortcut: k.ptr_param("shortcut_gradient"),
                out: k.ptr_param("relu_out"),
            }
        } else {
            MaskSource::Recomputed(BnParams {
                mean,
                var,
                gamma: k.ptr_param("gamma"),
                beta: k.ptr_param("beta"),
                eps,
            })
        };
        DgradEpilogue {
            y,
            mean,
            var,
            eps,
            mask,
            squares: e.squares,
        }
    }

    /// The gradient `acc` at element `at` (column `col`, where `col_ok`) masked by the ReLU
    /// and stored to `dx` where `ok`; returns it and x̂ there.
    fn store_masked(
        &self,
        k: &mut KernelBuilder,
        (acc, dx): (F32, U64),
        (ok, at): (Pred, Idx),
        (col_ok, col): (Pred, U32),
    ) -> (F32, F32) {
        let yv = load_inside(k, ok, self.y, at);
        let c = k.select_u(col_ok, col, 0u32);
        let dz = match &self.mask {
            MaskSource::Recomputed(params) => {
                let z = bn_apply(k, yv, params, c);
                let active = k.cmp_f32(Cmp::Gt, z, 0.0f32);
                k.select(active, acc, 0.0f32)
            }
            MaskSource::Residual { shortcut, out } => {
                let r = load_inside(k, ok, *shortcut, at);
                let relu = load_inside(k, ok, *out, at);
                let sum = k.add(acc, r);
                let active = k.cmp_f32(Cmp::Gt, relu, 0.0f32);
                k.select(active, sum, 0.0f32)
            }
        };
        k.when(ok, |k| k.store(dx, at, dz));
        (dz, normalised(k, yv, self.mean, self.var, c, self.eps))
    }
}

/// Every element of the tile stored to dx (ReLU-masked under an epilogue); under one, each
/// element's (dz, x̂), which its BN terms are made of.
fn store_dx(
    k: &mut KernelBuilder,
    (tile, coords, n): (&Products, &Coordinates, U32),
    (g, batching): (&Geometry, Rows),
    dx: U64,
    bn: Option<&DgradEpilogue>,
) -> Vec<Vec<(F32, F32)>> {
    let positions = g.h * g.w;
    let mut masked = Vec::new();
    for (i, row) in tile.values.iter().enumerate() {
        let mut row_terms = Vec::new();
        let (example, p) = batching.split(k, coords.rows[i], n);
        for (j, &acc) in row.iter().enumerate() {
            let ok = k.and(coords.row_ok[i], coords.col_ok[j]);
            let at = plane_element(k, (example, coords.cols[j]), (g.c, positions), p);
            let Some(bn) = bn else {
                k.when(ok, |k| k.store(dx, at, acc));
                continue;
            };
            let column = (coords.col_ok[j], coords.cols[j]);
            row_terms.push(bn.store_masked(k, (acc, dx), (ok, at), column));
        }
        masked.push(row_terms);
    }
    masked
}

/// A weight gradient's tiling: the input patch staged where it fits, in wide K slices where
/// those fit; else the input gathered, as deep as shared memory allows.
fn wgrad_tiling(
    cx: &Cx,
    g: &Geometry,
    shape: GemmShape,
    prologue: bool,
) -> (Tiling, Option<PatchDims>) {
    let narrow = Tiling::for_rows(g.o);
    let staging = (cx.options.stages, prologue);
    [narrow.widened(cx.options.precision), narrow]
        .into_iter()
        .find_map(|t| Some((t, Some(PatchDims::choose(g, (t, shape), staging)?))))
        .unwrap_or_else(|| {
            let gathered = narrow.with_stages(cx.options.stages, COLUMN_SUMS_BYTES);
            (gathered, None)
        })
}

/// Weight element (i, j) of the micro-tile, o·(C·area) + column (`columns` of them a row),
/// and whether it exists; made where used, not kept across a loop (registers).
fn weight_element(
    k: &mut KernelBuilder,
    coords: &Coordinates,
    (i, j): (usize, usize),
    columns: u32,
) -> (U32, Pred) {
    let e = k.mad_u(coords.rows[i], columns, coords.cols[j]);
    (e, k.and(coords.row_ok[i], coords.col_ok[j]))
}

/// A weight gradient's totals (and their squares) stored: straight into the outputs
/// `targets`, or with `chunk_of` (this block's chunk, the chunks, the weights) into the
/// partials `targets[0][term][chunk][element]`.
fn store_totals(
    k: &mut KernelBuilder,
    (place, columns): (&TilePlace, u32),
    totals: &Products,
    targets: &[U64],
    chunk_of: Option<(U32, u32, u64)>,
) {
    let coords = place.coordinates(k);
    for (i, row) in totals.values.iter().enumerate() {
        for (jj, &total) in row.iter().enumerate() {
            let (e, ok) = weight_element(k, &coords, (i, jj), columns);
            let mut sums = vec![total];
            sums.extend(totals.squares.as_ref().map(|sq| sq[i][jj]));
            k.when(ok, |k| {
                for (t, &total) in sums.iter().enumerate() {
                    let Some((j, chunks, weights)) = chunk_of else {
                        k.store(targets[t], e, total);
                        continue;
                    };
                    let row = k.add_u(j, (t as u32) * chunks);
                    let row = k.idx(row);
                    let e_idx = k.idx(e);
                    let at = k.idx_mad(row, weights, e_idx);
                    k.store(targets[0], at, total);
                }
            });
        }
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
    let tiling = Tiling::for_columns(g.c, cx.options.precision);
    let per_example_sums = matches!(epilogue, Some(e) if e.squares == Squares::PerExample);
    let batching = Rows::choose(positions, tiling, per_example_sums);
    let epilogue_bytes = match batching {
        Rows::Batched { .. } if per_example_sums => SEGMENT_SUMS_BYTES,
        _ => COLUMN_SUMS_BYTES,
    };
    // A: dy's halo where it fits, else its spread elements, gathered as deep as shared memory
    // allows (narrower slices where even two would not fit)
    let budget = (cx.options.stages, epilogue_bytes);
    let halo = HaloDims::choose(&g, (tiling, batching), HaloOf::OutputGradient, budget);
    let tiling = match halo {
        Some(_) => tiling,
        None => tiling.with_stages(cx.options.stages, epilogue_bytes),
    };
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
    let order = Order::choose(g.o, tiling, halo.is_some(), area);
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
    let (tiling, patch) = wgrad_tiling(cx, &g, shape, prologue.is_some());
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
