//! A tiled GEMM skeleton for implicit-GEMM convolutions: the code it emits. How its tile,
//! slices and warp tiles are chosen is [`super::schedule`]'s. This file holds the skeleton
//! (where a tile sits, the pipeline over slices, the sides' interface); [`inner`] the
//! products of a slice, [`gathered`] the side staged element by element (in
//! [`fragment_order`] on tensor cores), [`epilogue`] the sums over a tile.
//!
//! One block computes a `bm × bn` tile of `C = A·B` (`M × K` times `K × N`), stepping through K
//! in slices `Tiling::bk` deep staged in shared memory; each of the [`THREADS`] threads keeps 16
//! elements of C in registers (64 in a wide tile). Ways to multiply (`LowerOptions::precision`):
//! * fp32 FMA: a thread owns a [`TM`]` × `[`TN`] micro-tile and adds each product with one
//!   `fma`, k in order;
//! * TF32 tensor cores: each warp owns a 32 × 16 warp tile of 2 × 2 `mma.sync` m16n8k8 tiles
//!   (16 × 32, 1 × 4, in block tiles 16 rows high; 64 × 32, 4 × 4, in a wide block tile of
//!   4 times the area, `Tiling::wide_for_columns`), a thread the accumulator elements the
//!   fragment layout gives it, on the rows and columns the warp's deal (`schedule::Deal`)
//!   gives its lane group; a gathered side lies in fragment order ([`fragment_order`]), so
//!   a lane reads its registers of one A tile or two B tiles with one 128-bit load. Each
//!   operand is split
//!   into its TF32 rounding and the TF32 rounding of the rest, and three products (lo·hi,
//!   hi·lo, hi·hi: the small ones first) keep fp32 accuracy ("3xTF32"); or, faster and less
//!   accurate (`Precision::Tf32`), the one product of the TF32 roundings.
//!
//! Either way every sum runs in a fixed order, so every run gives the same bits. Each side of
//! the tile reaches shared memory through a [`Staging`]: gathered element by element by the
//! caller's [`Operand`]s ([`Gathered`]: im2col on the fly, prologues applied on load), their
//! index arithmetic split so that what depends on a row (column) alone is made once per
//! product and what depends on k alone once per slice; or staged some other way by the caller
//! (a convolution's input patch or halo), the multiply then finding each of its lines at an
//! offset the staging gives, and its k by [`KSteps`]. Slices are double-buffered: the next
//! slice's loads are in flight while this one multiplies. Elements outside `M × K` or `K × N`
//! are zero (their loads are clamped inside). Where a tile sits ([`TilePlace`]) is separate
//! from the product, so a block can run several products (one per example, say) into the
//! same place. The skeleton knows nothing about convolutions.

use super::common::{Cx, TileRows};
use crate::builder::{F32, GlobalF32, KernelBuilder, Pred, SharedF32, Tf32, U32, U64};
use crate::kir::{BinOp, Cmp, GemmSchedule, MainLoop};

mod epilogue;
mod fragment_order;
mod gathered;
mod inner;

pub use epilogue::{column_sums, store_column_sums, store_segment_sums};
use fragment_order::{FragmentOrder, LOAD_WORDS, emit_swizzle};
pub use gathered::Gathered;
use inner::*;

use super::schedule::{
    BLOCKS_PER_SM_LARGE, DOUBLE_BUFFERED, Deal, GemmShape, MMA, SLICE_PAD, THREADS, TILE, TM, TN,
    Tiling, WarpTiles,
};
use crate::options::Precision;

/// How each operand lies in memory: whether consecutive k are adjacent (else consecutive rows
/// of A / columns of B are), so that consecutive threads gather adjacent elements.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub a_k_fastest: bool,
    pub b_k_fastest: bool,
}

/// Where a thread's elements sit: the block's tile row `tile_row` (of the grid's x), its first
/// row and column, and the thread's place in the block (`Mapping`). `slot` numbers the threads
/// that share a column (`0..bm/4`), for column sums.
pub struct TilePlace {
    pub tile_row: U32,
    pub slot: U32,
    shape: GemmShape,
    m0: U32,
    n0: U32,
    mapping: Mapping,
}

/// How a block's threads share its tile.
#[derive(Clone, Copy)]
enum Mapping {
    /// fp32 FMA: thread (ty, tx) owns rows `ty·TM + i` and columns `tx·TN + j`.
    Simt { ty: U32, tx: U32 },
    /// Tensor cores: the warp's tile (of `tiles`) starts at (`wm0`, `wn0`) in the block's
    /// tile; the lane is (`g`, `t`) = (lane / 4, lane % 4) of the mma fragment layout.
    Mma {
        wm0: U32,
        wn0: U32,
        g: U32,
        t: U32,
        tiles: WarpTiles,
        split: bool,
    },
}

/// A thread's elements: C at (`rows[i]`, `cols[j]`), inside C where `row_ok[i]` and
/// `col_ok[j]` hold; `local_cols[j]` is the column within the block's tile.
pub struct Coordinates {
    pub rows: Vec<U32>,
    pub cols: Vec<U32>,
    pub row_ok: Vec<Pred>,
    pub col_ok: Vec<Pred>,
    local_cols: Vec<U32>,
}

impl TilePlace {
    /// The mma (or FMA) instructions a warp issues per K slice of `depth`, with `squares`
    /// accumulated alongside or not (as `mma_slice` and `fma_slice` issue them).
    fn multiplies_per_slice(&self, depth: u32, squares: bool) -> u32 {
        let per_slice = match self.mapping {
            Mapping::Simt { .. } => TM * TN * depth,
            Mapping::Mma { tiles, split, .. } => {
                tiles.m * tiles.n * (depth / MMA.k) * if split { 3 } else { 1 }
            }
        };
        if squares { 2 * per_slice } else { per_slice }
    }

    /// The multiply, in words: `fp32 fma`, `tf32 mma m16n8k8`, `3xtf32 mma m16n8k8`.
    fn multiply(&self) -> String {
        let shape = format!("m{}n{}k{}", MMA.m, MMA.n, MMA.k);
        match self.mapping {
            Mapping::Simt { .. } => "fp32 fma".to_string(),
            Mapping::Mma { split: true, .. } => format!("3xtf32 mma {shape}"),
            Mapping::Mma { split: false, .. } => format!("tf32 mma {shape}"),
        }
    }

    /// The fragment order of side `which`'s gathered slices of `width` lines: on tensor
    /// cores, none on fp32 FMA.
    fn fragment_order(&self, which: Operands, width: u32) -> Option<FragmentOrder> {
        match self.mapping {
            Mapping::Simt { .. } => None,
            Mapping::Mma { tiles, .. } => {
                let deal = tiles.deal[which as usize];
                Some(FragmentOrder::new(which, deal, width))
            }
        }
    }

    /// The thread's first word in a slice of side `which` in `order`: its warp's first
    /// unit, its lane's place in a unit.
    fn fragment_at(&self, k: &mut KernelBuilder, which: Operands, order: FragmentOrder) -> U32 {
        let Mapping::Mma { wm0, wn0, g, t, .. } = self.mapping else {
            unreachable!("fragment order on tensor cores")
        };
        let w0 = match which {
            Operands::A => wm0,
            Operands::B => wn0,
        };
        let lane = k.mad_u(g, 4u32, t);
        let lane_word = k.mul_u(lane, LOAD_WORDS);
        let lane_word = emit_swizzle(k, lane_word);
        k.mad_u(w0, order.words_per_line(), lane_word)
    }

    /// Rows and columns of C a warp computes on tensor cores, a thread on fp32 FMA.
    fn tile(&self) -> [u32; 2] {
        match self.mapping {
            Mapping::Simt { .. } => [TM, TN],
            Mapping::Mma { tiles, .. } => [tiles.rows(), tiles.cols()],
        }
    }

    /// How many rows and columns of C the thread holds.
    fn elements(&self) -> (u32, u32) {
        match self.mapping {
            Mapping::Simt { .. } => (TM, TN),
            Mapping::Mma { tiles, .. } => {
                let (rows, cols) = (MMA.c.row_offsets().len(), MMA.c.col_offsets().len());
                (rows as u32 * tiles.m, cols as u32 * tiles.n)
            }
        }
    }

    /// Threads that share a column: the values of `slot`.
    fn slots(&self, tiling: Tiling) -> u32 {
        tiling.bm / self.elements().0
    }

    /// Rows and columns (within the block's tile) of the thread's elements.
    fn local(&self, k: &mut KernelBuilder) -> (Vec<U32>, Vec<U32>) {
        match self.mapping {
            Mapping::Simt { ty, tx } => (
                (0..TM).map(|i| k.mad_u(ty, TM, i)).collect(),
                (0..TN).map(|j| k.mad_u(tx, TN, j)).collect(),
            ),
            // row i: the lane group's i-th line of A (C's rows are A's); column j: mma tile
            // tn = j / C's column c, which is B's column of lane group c (B's line tn)
            Mapping::Mma {
                wm0,
                wn0,
                g,
                t,
                tiles,
                ..
            } => {
                let [rows, cols] = tiles.deal;
                let first_row = first_line(k, rows, wm0, g);
                let offsets = MMA.c.col_offsets();
                let per_tile = offsets.len() as u32;
                let (row_pluses, col_pluses) = (rows.pluses(), cols.pluses());
                (
                    row_pluses.iter().map(|&p| k.add_u(first_row, p)).collect(),
                    (0..per_tile * tiles.n)
                        .map(|j| {
                            let (tn, c) = ((j / per_tile) as usize, (j % per_tile) as usize);
                            let base = k.add_u(wn0, cols.run * offsets[c] + col_pluses[tn]);
                            k.mad_u(t, cols.run * MMA.c.col.1, base)
                        })
                        .collect(),
                )
            }
        }
    }

    /// The lines of A (its rows) or of B (its columns) the thread multiplies.
    pub fn line_set(&self, k: &mut KernelBuilder, which: Operands) -> LineSet {
        match (self.mapping, which) {
            (Mapping::Simt { ty, .. }, Operands::A) => LineSet {
                first: k.mul_u(ty, TM),
                pluses: (0..TM).collect(),
                own_k: None,
            },
            (Mapping::Simt { tx, .. }, Operands::B) => LineSet {
                first: k.mul_u(tx, TN),
                pluses: (0..TN).collect(),
                own_k: None,
            },
            // the lane group's rows of A, as the warp's deal gives them
            (
                Mapping::Mma {
                    wm0, g, t, tiles, ..
                },
                Operands::A,
            ) => LineSet {
                first: first_line(k, tiles.deal[0], wm0, g),
                pluses: tiles.deal[0].pluses(),
                own_k: Some(t),
            },
            // the lane group's columns of B
            (
                Mapping::Mma {
                    wn0, g, t, tiles, ..
                },
                Operands::B,
            ) => LineSet {
                first: first_line(k, tiles.deal[1], wn0, g),
                pluses: tiles.deal[1].pluses(),
                own_k: Some(t),
            },
        }
    }

    /// The first column of the block's tile.
    pub fn first_column(&self) -> U32 {
        self.n0
    }

    /// The coordinates of the thread's elements, computed where this is emitted (after a
    /// long loop rather than before it: registers).
    pub fn coordinates(&self, k: &mut KernelBuilder) -> Coordinates {
        let (local_rows, local_cols) = self.local(k);
        let rows: Vec<U32> = local_rows.iter().map(|&r| k.add_u(self.m0, r)).collect();
        let cols: Vec<U32> = local_cols.iter().map(|&c| k.add_u(self.n0, c)).collect();
        let row_ok = rows
            .iter()
            .map(|&r| k.cmp_u(Cmp::Lt, r, self.shape.m))
            .collect();
        let col_ok = cols
            .iter()
            .map(|&c| k.cmp_u(Cmp::Lt, c, self.shape.n))
            .collect();
        Coordinates {
            rows,
            cols,
            row_ok,
            col_ok,
            local_cols,
        }
    }
}

/// The first of lane group `g`'s lines under `deal`, the warp's first being `w0`:
/// `w0 + run·g` (its others lie `Deal::pluses` after it).
fn first_line(k: &mut KernelBuilder, deal: Deal, w0: U32, g: U32) -> U32 {
    k.mad_u(g, deal.run, w0)
}

/// A builder for a GEMM kernel of `cx`'s node: [`THREADS`] threads, named after the lowering
/// options (which change how it multiplies).
pub fn builder(cx: &Cx, part: &str) -> KernelBuilder {
    KernelBuilder::new(cx.name_with_options(part), THREADS, cx.wide())
}

/// The place of this thread's elements, the block's tile being block x; on tensor cores where
/// `precision` says.
pub fn place(
    k: &mut KernelBuilder,
    shape: GemmShape,
    tiling: Tiling,
    precision: Precision,
) -> TilePlace {
    assert_eq!(
        k.block_size(),
        THREADS,
        "the GEMM skeleton runs {THREADS} threads"
    );
    let on_tensor_cores = precision.on_tensor_cores();
    assert!(
        tiling.bm * tiling.bn == TILE || (on_tensor_cores && tiling.is_wide()),
        "{tiling:?}"
    );
    k.register_tiled(tiling.blocks_per_sm());
    let (_, tile_cols) = tiling.tiles(shape);
    let (tile, tid) = (k.block_x(), k.tid());
    let tile_row = k.ubin(BinOp::Div, tile, tile_cols);
    let tile_col = k.ubin(BinOp::Rem, tile, tile_cols);
    let m0 = k.mul_u(tile_row, tiling.bm);
    let n0 = k.mul_u(tile_col, tiling.bn);
    let (slot, mapping) = if on_tensor_cores {
        let tiles = WarpTiles::for_tiling(tiling);
        let warps = (tiling.bm / tiles.rows()) * (tiling.bn / tiles.cols());
        assert!(
            tiling.bm.is_multiple_of(tiles.rows()) && warps == THREADS / 32,
            "{tiling:?}: warps of {tiles:?}"
        );
        let warps_n = tiling.bn / tiles.cols();
        let (warp, lane) = (
            k.ubin(BinOp::Div, tid, 32u32),
            k.ubin(BinOp::Rem, tid, 32u32),
        );
        let (wm, wn) = (
            k.ubin(BinOp::Div, warp, warps_n),
            k.ubin(BinOp::Rem, warp, warps_n),
        );
        let (g, t) = (
            k.ubin(BinOp::Div, lane, 4u32),
            k.ubin(BinOp::Rem, lane, 4u32),
        );
        let slot = k.mad_u(wm, 8u32, g);
        let (wm0, wn0) = (k.mul_u(wm, tiles.rows()), k.mul_u(wn, tiles.cols()));
        let mapping = Mapping::Mma {
            wm0,
            wn0,
            g,
            t,
            tiles,
            split: precision == Precision::Tf32x3,
        };
        (slot, mapping)
    } else {
        let groups_n = tiling.bn / TN;
        let ty = k.ubin(BinOp::Div, tid, groups_n);
        let tx = k.ubin(BinOp::Rem, tid, groups_n);
        (ty, Mapping::Simt { ty, tx })
    };
    TilePlace {
        tile_row,
        slot,
        shape,
        m0,
        n0,
        mapping,
    }
}

/// A thread's accumulators: `values[i][j]` accumulates C at the place's (i, j); `squares`, if
/// present, `Σₖ A²·B²` there (the supplement's a²g² of a weight gradient).
pub struct Products {
    pub values: Vec<Vec<F32>>,
    pub squares: Option<Vec<Vec<F32>>>,
}

impl Products {
    /// Accumulators for the thread's elements at `place`, set to zero where this is emitted
    /// (in a loop: at every iteration).
    pub fn zeros(k: &mut KernelBuilder, place: &TilePlace, squares: bool) -> Products {
        if squares {
            k.register_tiled(BLOCKS_PER_SM_LARGE);
        }
        let (rows, cols) = place.elements();
        let zeros = |k: &mut KernelBuilder| -> Vec<Vec<F32>> {
            (0..rows)
                .map(|_| (0..cols).map(|_| k.f32(0.0)).collect())
                .collect()
        };
        Products {
            values: zeros(k),
            squares: squares.then(|| zeros(k)),
        }
    }
}

/// One operand of the GEMM: A, whose lines are its rows, or B, whose lines are its columns.
/// It is read in steps, so that its index arithmetic runs as seldom as it can and its loads
/// are in flight while the previous K slice multiplies:
/// * [`Operand::line`]: what depends on the line alone (once per product, where a thread has
///   few lines);
/// * [`Operand::depth`]: what depends on k alone (once per K slice; given as a [`SliceK`], so
///   that what the whole slice shares can be made once);
/// * [`Operand::fetch`]: the element's loads, with no branch, so that they stay in flight, or
///   where the element is a plain global value (or zero), its address, copied with `cp.async`;
/// * [`Operand::finish`]: a loaded element's value (prologue, padding) once the loads are back.
///
/// Every index passed lies inside the matrix: the skeleton clamps the ones outside, and tells
/// `fetch` whether the element is `inside`; one that is not must come out zero. (A loaded
/// element had best carry that in a register rather than a predicate: a slice may hold a
/// dozen elements across its products, and a thread has 7 predicate registers.)
pub trait Operand {
    type Line: Copy;
    type Depth: Copy;
    /// What a loaded element holds until it is finished (`Infallible` for operands that are
    /// only ever copied).
    type Fetched: Copy;
    fn line(&self, k: &mut KernelBuilder, index: U32) -> Self::Line;
    fn depth(&self, k: &mut KernelBuilder, kk: SliceK) -> Self::Depth;
    fn fetch(
        &self,
        k: &mut KernelBuilder,
        line: Self::Line,
        depth: Self::Depth,
        inside: Pred,
    ) -> Fetch<Self::Fetched>;
    fn finish(&self, k: &mut KernelBuilder, fetched: Self::Fetched) -> F32;
    /// Whether `fetch` loads elements into registers ([`Fetch::Loaded`]) rather than
    /// copying them: a product with such a side waits for its loads within each step, so
    /// it gains nothing from more than 2 stages.
    fn loads(&self) -> bool;
}

/// A k of the K slice being fetched: `start + lane + round`, `start` a multiple of the slice
/// depth `bk` (the same register for every element of the slice, so what depends on it alone
/// is made once), `lane` the thread's first step and `round` a constant, `lane + round < bk`.
/// `index` is that k clamped into `0..K` (a slice past the end repeats the last one); where K
/// is a multiple of bk it is the sum itself.
#[derive(Clone, Copy)]
pub struct SliceK {
    pub start: U32,
    pub lane: U32,
    pub round: u32,
    pub index: U32,
}

/// How an element of an [`Operand`] reaches shared memory.
pub enum Fetch<T> {
    /// Loaded into registers, finished after the slice's products and stored.
    Loaded(T),
    /// A plain copy of the element at `src` (zero where `exists` is false), straight into
    /// shared memory with `cp.async`: no registers held across the products, no store.
    Copy { src: GlobalF32, exists: Pred },
}

/// Lines a thread keeps in registers across the whole product; with more, they are made
/// again at every slice (registers).
const HOISTED_LINES: usize = 2;

/// One side of the tile as it is staged in shared memory, slice by slice, and where the
/// multiply finds its elements there: element (kk, line) of the half at `base` sits at
/// `base + offset(line) + k_steps.offset(kk)`. Gathered element by element from an
/// [`Operand`] ([`Gathered`], lines contiguous), or staged some other way (a convolution's
/// input patch, whose lines are offsets into it).
pub trait Staging {
    type Fetched;
    /// Where a line's k lie, from its first.
    fn k_steps(&self) -> KSteps;
    /// Where the lines of `set` sit in a half, each a register and a constant (asked once
    /// per product, before its loop).
    fn thread_lines(&self, k: &mut KernelBuilder, set: &LineSet) -> Vec<LineAt>;
    /// Where slice `step`, staged in half `half` (0 or 1), lies.
    fn slice(&self, k: &mut KernelBuilder, step: U32, half: U32) -> Slice;
    /// Issues the loads and copies of the slice at `k0` (the last step asks for one past
    /// the end, which is fetched clamped and never used), the copies into half `half`; and
    /// whether there were copies.
    fn fetch(&self, k: &mut KernelBuilder, k0: U32, half: U32) -> (Self::Fetched, bool);
    /// Finishes the loaded elements into half `half`.
    fn store(&self, k: &mut KernelBuilder, fetched: &Self::Fetched, half: U32);
    /// Steps in which the side stages once (behind a branch), for cost estimates.
    fn staged_every(&self) -> u32 {
        1
    }
    /// Slices the side holds at once: `slice`, `fetch` and `store` take halves (stages)
    /// `0..stages`.
    fn stages(&self) -> u32;
    /// How the side reaches shared memory, in a word (see `GemmSchedule::staging`).
    fn describe(&self) -> &'static str;
    /// The order of a slice where it is laid out for fragment loads (a thread's fragments
    /// then read a unit at a time, and `thread_lines` is not asked), else `None`.
    fn fragment_order(&self) -> Option<FragmentOrder> {
        None
    }
}

/// Which operand of the GEMM a side stages: A (lines are rows) or B (lines are columns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operands {
    A,
    B,
}

/// Emits one tiled product at `place`, added into `acc` (so several products can accumulate
/// into the same registers), `a` and `b` gathered as [`Operand`]s (see [`staged_gemm`]).
#[allow(clippy::too_many_arguments)]
pub fn tiled_gemm<A: Operand, B: Operand>(
    k: &mut KernelBuilder,
    shape: GemmShape,
    tiling: Tiling,
    place: &TilePlace,
    layout: Layout,
    acc: &Products,
    a: &A,
    b: &B,
) -> MainLoop {
    let stages = if a.loads() || b.loads() {
        DOUBLE_BUFFERED
    } else {
        tiling.stages
    };
    let a = Gathered::new(
        k,
        (shape, tiling, place),
        (Operands::A, stages),
        layout.a_k_fastest,
        a,
    );
    let b = Gathered::new(
        k,
        (shape, tiling, place),
        (Operands::B, stages),
        layout.b_k_fastest,
        b,
    );
    staged_gemm(k, shape, tiling, place, acc, (&a, &b))
}

/// Emits one tiled product at `place`, added into `acc`, its sides staged by `a` and `b`.
/// Pipelined over S stages of shared memory (the sides' [`Staging::stages`], 2 or more):
/// slices 0 to S − 2 are issued before the loop, and step s issues slice s + S − 1 (into
/// stage (s − 1) mod S; loaded elements stored after the products) before slice s
/// multiplies from stage s mod S. So S − 1 slices of copies are in flight while one
/// multiplies, and one barrier per step orders everything: the one at the top, after which
/// slice s has landed (all but the S − 2 newest copy groups waited for) and nobody still
/// reads slice s − 1's stage, which s + S − 1 fills. A last barrier frees the stages for
/// what follows.
pub fn staged_gemm<A: Staging, B: Staging>(
    k: &mut KernelBuilder,
    shape: GemmShape,
    tiling: Tiling,
    place: &TilePlace,
    acc: &Products,
    (a, b): (&A, &B),
) -> MainLoop {
    let bk = tiling.bk;
    let stages = a.stages();
    assert_eq!(stages, b.stages(), "both sides stage alike");
    let loads =
        [a.fragment_order(), b.fragment_order()].map(|order| order.map_or(1, |_| LOAD_WORDS));
    k.note_schedule(GemmSchedule {
        block: [tiling.bm, tiling.bn, bk],
        stages,
        multiply: place.multiply(),
        tile: place.tile(),
        staging: [a.describe().to_string(), b.describe().to_string()],
        fragment_loads: loads,
    });
    let lines = (
        ThreadLines::new(k, a, place, Operands::A),
        ThreadLines::new(k, b, place, Operands::B),
    );
    // slice k0's loads and copies (its copies one group, into half `half`)
    let issue = |k: &mut KernelBuilder, k0: U32, half: U32| {
        let (a_fetched, a_copies) = a.fetch(k, k0, half);
        let (b_fetched, b_copies) = b.fetch(k, k0, half);
        if a_copies || b_copies {
            k.commit_copies();
        }
        ((a_fetched, b_fetched), a_copies || b_copies)
    };
    let store = |k: &mut KernelBuilder, fetched: &(A::Fetched, B::Fetched), half| {
        a.store(k, &fetched.0, half);
        b.store(k, &fetched.1, half);
    };
    let mut copies = false;
    for ahead in 0..stages - 1 {
        let (k0, stage) = (k.u32(ahead * bk), k.u32(ahead));
        let (fetched, copied) = issue(k, k0, stage);
        store(k, &fetched, stage);
        copies |= copied;
    }
    k.for_u32(0u32, tiling.slices(shape), 1, |k, step| {
        if copies {
            k.wait_copies(stages - 2);
        }
        k.barrier();
        let this = k.ubin(BinOp::Rem, step, stages);
        let ahead = k.add_u(step, stages - 1);
        let other = k.ubin(BinOp::Rem, ahead, stages);
        // the last steps fetch clamped, unused slices: no branch around the loads
        let k0 = k.mul_u(ahead, bk);
        let (fetched, _) = issue(k, k0, other);
        let slices = (a.slice(k, step, this), b.slice(k, step, this));
        let at = (lines.0.in_half(k, slices.0), lines.1.in_half(k, slices.1));
        match (place.mapping, at) {
            (Mapping::Simt { .. }, (SideAt::Lines(a), SideAt::Lines(b))) => {
                fma_slice(k, slices, (a, b), acc)
            }
            (Mapping::Simt { .. }, _) => unreachable!("fp32 FMA reads lines"),
            (Mapping::Mma { tiles, split, .. }, at) => {
                mma_slice(k, slices, at, (tiles, split), acc)
            }
        }
        store(k, &fetched, other);
    });
    if copies {
        k.wait_copies(0);
    }
    k.barrier();
    MainLoop {
        trips: tiling.slices(shape) as u64,
        multiplies: place.multiplies_per_slice(tiling.bk, acc.squares.is_some()),
        branch_every: a.staged_every().max(b.staged_every()),
    }
}

/// A slice's elements gathered through an [`Operand`]: the loaded ones by round, and
/// whether any went by `cp.async`.
pub struct Fetched<T> {
    loaded: Vec<(usize, T)>,
    copies: bool,
}

/// One staged K slice of `depth` k in shared memory: element (kk, line) at
/// `base + offset(line) + steps.offset(kk)`.
#[derive(Clone, Copy)]
pub struct Slice {
    pub array: SharedF32,
    pub base: U32,
    pub steps: KSteps,
    pub depth: u32,
}

/// Where a staged line's k lie from its first: in runs of `run` k `stride` words apart, each
/// run `run_stride` words after the one before (evenly spaced: one run).
#[derive(Clone, Copy, Debug)]
pub struct KSteps {
    pub stride: u32,
    pub run: u32,
    pub run_stride: u32,
}

impl KSteps {
    pub fn even(stride: u32) -> KSteps {
        KSteps {
            stride,
            run: 1 << 30, // longer than any slice
            run_stride: 0,
        }
    }

    pub fn offset(self, kk: u32) -> u32 {
        (kk / self.run) * self.run_stride + (kk % self.run) * self.stride
    }
}

/// Where a staged line sits in shared memory: a register and a constant, in words.
pub type LineAt = (U32, u32);

/// The lines of one side a thread multiplies, `first + plus` for each plus (a register and
/// constants), and its own first k where the mma layout gives it one (`t`, below 4).
pub struct LineSet {
    pub first: U32,
    pub pluses: Vec<u32>,
    pub own_k: Option<U32>,
}

impl LineSet {
    /// The lines' places in a half, `offset(first, plus)` each, the thread's own k added
    /// (within a run of `steps`: runs are a multiple of 4 long).
    pub fn offsets(
        &self,
        k: &mut KernelBuilder,
        steps: KSteps,
        mut offset: impl FnMut(&mut KernelBuilder, U32, u32) -> (U32, u32),
    ) -> Vec<LineAt> {
        let mut lines: Vec<LineAt> = self
            .pluses
            .iter()
            .map(|&plus| offset(k, self.first, plus))
            .collect();
        if let Some(t) = self.own_k {
            assert!(steps.run.is_multiple_of(4), "{steps:?}");
            for_each_register(k, &mut lines, |k, r| k.mad_u(t, steps.stride, r));
        }
        lines
    }
}

/// Where a thread finds what it multiplies of one side in a staged slice (of a half, or
/// from the first half's start).
#[derive(Clone)]
pub(super) enum SideAt {
    /// Line by line, each a register and a constant; k at `Slice::steps` from there.
    Lines(Vec<LineAt>),
    /// In fragment order from the thread's first word (`Slice::steps` apart per mma step).
    Fragments(U32, FragmentOrder),
}

/// The staged lines a thread multiplies in a product.
struct ThreadLines(SideAt);

impl ThreadLines {
    fn new(
        k: &mut KernelBuilder,
        stage: &impl Staging,
        place: &TilePlace,
        which: Operands,
    ) -> ThreadLines {
        ThreadLines(match stage.fragment_order() {
            Some(order) => SideAt::Fragments(place.fragment_at(k, which, order), order),
            None => {
                let set = place.line_set(k, which);
                SideAt::Lines(stage.thread_lines(k, &set))
            }
        })
    }

    /// The lines in `slice`'s half: its base added to each distinct register.
    fn in_half(&self, k: &mut KernelBuilder, slice: Slice) -> SideAt {
        match &self.0 {
            SideAt::Lines(lines) => {
                let mut lines = lines.clone();
                for_each_register(k, &mut lines, |k, r| k.add_u(r, slice.base));
                SideAt::Lines(lines)
            }
            &SideAt::Fragments(at, order) => SideAt::Fragments(k.add_u(at, slice.base), order),
        }
    }
}

/// Replaces each distinct register of `lines` by `f` of it (lines that share one, contiguous
/// lines, still share one).
fn for_each_register(
    k: &mut KernelBuilder,
    lines: &mut [LineAt],
    mut f: impl FnMut(&mut KernelBuilder, U32) -> U32,
) {
    let mut done: Vec<(U32, U32)> = Vec::new();
    for (r, _) in lines.iter_mut() {
        let new = match done.iter().find(|(old, _)| old.reg() == r.reg()) {
            Some(&(_, new)) => new,
            None => {
                let new = f(k, *r);
                done.push((*r, new));
                new
            }
        };
        *r = new;
    }
}

#[cfg(test)]
mod tests {
    //! The skeleton alone, on plain matrices: every way of staging (copied or loaded, k
    //! fastest or not, lines hoisted or not), both ways of multiplying, and several products
    //! into one place, whose staging areas are reused (so a missing barrier between products
    //! is a race the executor reports).

    use super::*;
    use crate::exec::{Arg, Memory, run};
    use crate::kir::Kernel;

    /// A row-major `[lines][depth]` matrix from `start`: copied with `cp.async`, or loaded and
    /// finished (negated, then negated back, so that finishing is real work).
    struct Matrix {
        src: U64,
        start: U32,
        depth: u32,
        copied: bool,
    }

    impl Operand for Matrix {
        type Line = U32;
        type Depth = U32;
        type Fetched = (F32, Pred);

        fn line(&self, k: &mut KernelBuilder, index: U32) -> U32 {
            k.mad_u(index, self.depth, self.start)
        }

        fn depth(&self, _k: &mut KernelBuilder, kk: SliceK) -> U32 {
            kk.index
        }

        fn fetch(
            &self,
            k: &mut KernelBuilder,
            line: U32,
            kk: U32,
            inside: Pred,
        ) -> Fetch<Self::Fetched> {
            let at = k.add_u(line, kk);
            if self.copied {
                return Fetch::Copy {
                    src: k.element_ptr(self.src, at),
                    exists: inside,
                };
            }
            let v = k.load(self.src, at);
            Fetch::Loaded((k.neg(v), inside))
        }

        fn finish(&self, k: &mut KernelBuilder, (v, inside): (F32, Pred)) -> F32 {
            let v = k.neg(v);
            k.select(inside, v, 0.0f32)
        }

        fn loads(&self) -> bool {
            !self.copied
        }
    }

    /// `C = Σ_r A_r·B_rᵀ` over `PRODUCTS` pairs, `A_r` `[m][k]` and `B_r` `[n][k]`.
    const PRODUCTS: u32 = 2;

    fn kernel(shape: GemmShape, tiling: Tiling, precision: Precision, layout: Layout) -> Kernel {
        let mut k = KernelBuilder::new("gemm_test", THREADS, false);
        let (a, b, c) = (k.ptr_param("a"), k.ptr_param("b"), k.ptr_param("c"));
        let place = place(&mut k, shape, tiling, precision);
        let acc = Products::zeros(&mut k, &place, false);
        k.for_u32(0u32, PRODUCTS, 1, |k, r| {
            let a = Matrix {
                src: a,
                start: k.mul_u(r, shape.m * shape.k),
                depth: shape.k,
                copied: layout.a_k_fastest,
            };
            let b = Matrix {
                src: b,
                start: k.mul_u(r, shape.n * shape.k),
                depth: shape.k,
                copied: !layout.b_k_fastest,
            };
            tiled_gemm(k, shape, tiling, &place, layout, &acc, &a, &b);
        });
        let at = place.coordinates(&mut k);
        for (i, row) in acc.values.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let ok = k.and(at.row_ok[i], at.col_ok[j]);
                k.when(ok, |k| {
                    let index = k.mad_u(at.rows[i], shape.n, at.cols[j]);
                    k.store(c, index, v);
                });
            }
        }
        k.finish()
    }

    fn values(len: u32, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    }

    #[test]
    fn products_match_f64_whatever_the_staging() {
        // 3 row tiles, columns ragged in the tile, 3 K slices (odd: a product's last slice
        // is in the half the next product's first fills)
        let shape = GemmShape {
            m: 300,
            n: 24,
            k: 20,
        };
        let a = values(PRODUCTS * shape.m * shape.k, 1);
        let b = values(PRODUCTS * shape.n * shape.k, 2);
        let mut want = vec![0f64; (shape.m * shape.n) as usize];
        for r in 0..PRODUCTS as usize {
            for i in 0..shape.m as usize {
                for j in 0..shape.n as usize {
                    for kk in 0..shape.k as usize {
                        let av = a[(r * shape.m as usize + i) * shape.k as usize + kk] as f64;
                        let bv = b[(r * shape.n as usize + j) * shape.k as usize + kk] as f64;
                        want[i * shape.n as usize + j] += av * bv;
                    }
                }
            }
        }
        // 16-deep slices (as convolutions on tensor cores take them; here in every mode) and
        // 8-deep ones in the weight gradient's flattest tile
        let flat = Tiling {
            bm: 16,
            bn: 256,
            bk: 8,
            stages: DOUBLE_BUFFERED,
        };
        // double-buffered, and pipelined 3 and 4 deep (the 20-deep products have 3 slices)
        let tilings = [2, 3, 4].into_iter().flat_map(|stages| {
            [
                Tiling::for_columns(shape.n, Precision::Tf32x3).with_stages(stages, 0),
                flat.with_stages(stages, 0),
            ]
        });
        let modes = [
            (Precision::Fp32, 1e-5),
            (Precision::Tf32x3, 1e-5),
            // operands rounded to 10 bits: 2⁻¹¹ each, over sums of 40 products of ~1
            (Precision::Tf32, 1e-2),
        ];
        // wide tiles on tensor cores: 512 × 32 (the side of 512 rows staged two rounds a k),
        // double-buffered and 3 deep, and narrow slices
        let wide = Tiling::wide_for_columns(shape.n);
        let wide_tilings = [
            wide.with_stages(2, 0),
            wide.with_stages(3, 0),
            wide.narrowed(),
        ];
        let mut worst_single = 0f64;
        for (precision, bound) in modes {
            let wide = wide_tilings.iter().filter(|_| precision.on_tensor_cores());
            for tiling in tilings.clone().chain(wide.copied()) {
                for (a_k_fastest, b_k_fastest) in [(false, true), (true, false), (true, true)] {
                    let layout = Layout {
                        a_k_fastest,
                        b_k_fastest,
                    };
                    let kernel = kernel(shape, tiling, precision, layout);
                    let mut mem = Memory::new();
                    let (pa, pb) = (mem.alloc_f32(&a), mem.alloc_f32(&b));
                    let pc = mem.alloc(4 * want.len());
                    let grid = [tiling.count(shape), 1];
                    let args = [Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(pc)];
                    run(&kernel, grid, &args, &mem).unwrap();
                    let got = mem.read_f32(pc, want.len());
                    for (e, (&g, &w)) in got.iter().zip(&want).enumerate() {
                        let err = (g as f64 - w).abs() / w.abs().max(1.0);
                        assert!(
                            err < bound,
                            "{tiling:?} {precision:?} {a_k_fastest}/{b_k_fastest}: \
                             C[{e}] = {g}, want {w}"
                        );
                        if precision == Precision::Tf32 {
                            worst_single = worst_single.max(err);
                        }
                    }
                }
            }
        }
        // one TF32 product really is less accurate than three
        assert!(worst_single > 1e-5, "TF32 error {worst_single:e}");
        eprintln!("one TF32 product: worst relative error {worst_single:e}");
    }
}
