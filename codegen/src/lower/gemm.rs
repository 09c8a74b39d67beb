//! A tiled GEMM skeleton for implicit-GEMM convolutions.
//!
//! One block computes a `bm × bn` tile of `C = A·B` (`M × K` times `K × N`), stepping through K
//! in [`BK`]-wide slices staged in shared memory; each of the [`THREADS`] threads keeps a
//! [`TM`]` × `[`TN`] micro-tile of C in registers and adds each product with one `fma`, k in
//! order (so every run gives the same bits). The operands are gathered element by element by
//! the caller's closures (im2col on the fly, prologues applied on load); elements outside
//! `M × K` or `K × N` are zero and never gathered. Where a tile sits ([`TilePlace`]) is
//! separate from the product, so a block can run several products (one per example, say) into
//! the same place. The skeleton knows nothing about convolutions.

use super::common::TileRows;
use crate::builder::{F32, KernelBuilder, Pred, SharedF32, U32, U64};
use crate::kir::{BinOp, Cmp};

/// Threads per block.
pub const THREADS: u32 = 256;
/// The K slice staged in shared memory per step.
pub const BK: u32 = 8;
/// Rows and columns of C each thread computes.
pub const TM: u32 = 4;
pub const TN: u32 = 4;
/// Elements of C per block tile.
const TILE: u32 = THREADS * TM * TN;

/// The GEMM's sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub m: u32,
    pub n: u32,
    pub k: u32,
}

/// A block tile of `bm × bn` (`bm·bn = THREADS·TM·TN`), each a power of two from 16 to 256.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub bm: u32,
    pub bn: u32,
}

impl Tiling {
    /// The tile for `n` columns: as few idle columns as possible (16, 32 or 64 wide), the
    /// rows making up the rest.
    pub fn for_columns(n: u32) -> Tiling {
        let bn = n.next_power_of_two().clamp(16, 64);
        Tiling { bm: TILE / bn, bn }
    }

    /// The tile for `m` rows: as few idle rows as possible (16 to 256 high).
    pub fn for_rows(m: u32) -> Tiling {
        let bm = m.next_power_of_two().clamp(16, 256);
        Tiling { bm, bn: TILE / bm }
    }

    pub fn tiles(&self, shape: GemmShape) -> (u32, u32) {
        (shape.m.div_ceil(self.bm), shape.n.div_ceil(self.bn))
    }

    pub fn count(&self, shape: GemmShape) -> u32 {
        let (rows, cols) = self.tiles(shape);
        rows * cols
    }
}

/// How each operand lies in memory: whether consecutive k are adjacent (else consecutive rows
/// of A / columns of B are), so that consecutive threads gather adjacent elements.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub a_k_fastest: bool,
    pub b_k_fastest: bool,
}

/// Where a thread's micro-tile sits: the block's tile row `tile_row` (of the grid's x), its
/// first row and column, and the thread's (row group, column group) `thread` in the block.
pub struct TilePlace {
    pub tile_row: U32,
    pub thread: (U32, U32),
    shape: GemmShape,
    m0: U32,
    n0: U32,
}

/// A micro-tile's elements: C at (`rows[i]`, `cols[j]`), inside C where `row_ok[i]` and
/// `col_ok[j]` hold.
pub struct Coordinates {
    pub rows: Vec<U32>,
    pub cols: Vec<U32>,
    pub row_ok: Vec<Pred>,
    pub col_ok: Vec<Pred>,
}

impl TilePlace {
    /// The coordinates of the thread's elements, computed where this is emitted (after a
    /// long loop rather than before it: registers).
    pub fn coordinates(&self, k: &mut KernelBuilder) -> Coordinates {
        let (ty, tx) = self.thread;
        let rows: Vec<U32> = (0..TM)
            .map(|i| {
                let local = k.mad_u(ty, TM, i);
                k.add_u(self.m0, local)
            })
            .collect();
        let cols: Vec<U32> = (0..TN)
            .map(|j| {
                let local = k.mad_u(tx, TN, j);
                k.add_u(self.n0, local)
            })
            .collect();
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
        }
    }
}

/// The place of this thread's micro-tile, the block's tile being block x.
pub fn place(k: &mut KernelBuilder, shape: GemmShape, tiling: Tiling) -> TilePlace {
    assert_eq!(
        k.block_size(),
        THREADS,
        "the GEMM skeleton runs {THREADS} threads"
    );
    assert_eq!(tiling.bm * tiling.bn, TILE, "{tiling:?}");
    k.register_tiled();
    let (_, tile_cols) = tiling.tiles(shape);
    let (tile, tid) = (k.block_x(), k.tid());
    let tile_row = k.ubin(BinOp::Div, tile, tile_cols);
    let tile_col = k.ubin(BinOp::Rem, tile, tile_cols);
    let m0 = k.mul_u(tile_row, tiling.bm);
    let n0 = k.mul_u(tile_col, tiling.bn);
    let groups_n = tiling.bn / TN;
    let ty = k.ubin(BinOp::Div, tid, groups_n);
    let tx = k.ubin(BinOp::Rem, tid, groups_n);
    TilePlace {
        tile_row,
        thread: (ty, tx),
        shape,
        m0,
        n0,
    }
}

/// A thread's accumulators: `values[i][j]` accumulates C at the place's (i, j); `squares`, if
/// present, `Σₖ A²·B²` there (the supplement's a²g² of a weight gradient).
pub struct Products {
    pub values: Vec<Vec<F32>>,
    pub squares: Option<Vec<Vec<F32>>>,
}

impl Products {
    /// Accumulators set to zero where this is emitted (in a loop: at every iteration).
    pub fn zeros(k: &mut KernelBuilder, squares: bool) -> Products {
        let zeros = |k: &mut KernelBuilder| -> Vec<Vec<F32>> {
            (0..TM)
                .map(|_| (0..TN).map(|_| k.f32(0.0)).collect())
                .collect()
        };
        Products {
            values: zeros(k),
            squares: squares.then(|| zeros(k)),
        }
    }
}

/// Emits one tiled product at `place`, added into `acc` (so several products can accumulate
/// into the same registers). `load_a(k, m, kk)` gathers A[m][kk] and `load_b(k, kk, n)`
/// B[kk][n], each called only for elements inside the matrix.
#[allow(clippy::too_many_arguments)]
pub fn tiled_gemm(
    k: &mut KernelBuilder,
    shape: GemmShape,
    tiling: Tiling,
    place: &TilePlace,
    layout: Layout,
    acc: &Products,
    load_a: impl Fn(&mut KernelBuilder, U32, U32) -> F32,
    load_b: impl Fn(&mut KernelBuilder, U32, U32) -> F32,
) {
    let Tiling { bm, bn } = tiling;
    let (ty, tx) = place.thread;
    // both slices k-major ([BK][bm], [BK][bn]): a thread's TM (TN) operands of one k are
    // adjacent
    let (a_slice, b_slice) = (k.shared(BK * bm), k.shared(BK * bn));
    let acc_sq = &acc.squares;
    let acc = &acc.values;
    let steps = shape.k.div_ceil(BK);
    k.for_u32(0u32, steps, 1, |k, step| {
        let k0 = k.mul_u(step, BK);
        let a_side = Side {
            width: bm,
            origin: place.m0,
            size: shape.m,
            is_a: true,
            k_fastest: layout.a_k_fastest,
        };
        stage(k, a_side, a_slice, k0, shape.k, &load_a);
        let b_side = Side {
            width: bn,
            origin: place.n0,
            size: shape.n,
            is_a: false,
            k_fastest: layout.b_k_fastest,
        };
        stage(k, b_side, b_slice, k0, shape.k, &load_b);
        k.barrier();
        for kk in 0..BK {
            let a: Vec<F32> = (0..TM)
                .map(|i| {
                    let at = k.mad_u(ty, TM, kk * bm + i);
                    k.load_shared(a_slice, at)
                })
                .collect();
            let b: Vec<F32> = (0..TN)
                .map(|j| {
                    let at = k.mad_u(tx, TN, kk * bn + j);
                    k.load_shared(b_slice, at)
                })
                .collect();
            for (row, &av) in acc.iter().zip(&a) {
                for (&c, &bv) in row.iter().zip(&b) {
                    k.fma_into(c, av, bv);
                }
            }
            if let Some(acc_sq) = acc_sq {
                let a2: Vec<F32> = a.iter().map(|&v| k.mul(v, v)).collect();
                let b2: Vec<F32> = b.iter().map(|&v| k.mul(v, v)).collect();
                for (row, &av) in acc_sq.iter().zip(&a2) {
                    for (&c, &bv) in row.iter().zip(&b2) {
                        k.fma_into(c, av, bv);
                    }
                }
            }
        }
        k.barrier();
    });
}

/// One operand's slice: `width` rows of A (or columns of B) from `origin`, of `size` in all.
struct Side {
    width: u32,
    origin: U32,
    size: u32,
    is_a: bool,
    k_fastest: bool,
}

/// Fills one k-major shared slice (`[BK][width]`) for the K step at `k0`: outside elements
/// (or beyond K) are stored as zero without gathering.
fn stage(
    k: &mut KernelBuilder,
    side: Side,
    slice: SharedF32,
    k0: U32,
    depth: u32,
    load: &impl Fn(&mut KernelBuilder, U32, U32) -> F32,
) {
    let tid = k.tid();
    let elements = BK * side.width;
    for round in 0..elements.div_ceil(THREADS) {
        let e = k.add_u(tid, round * THREADS);
        let exists = k.cmp_u(Cmp::Lt, e, elements);
        k.when(exists, |k| {
            let (local, step_k) = if side.k_fastest {
                (k.ubin(BinOp::Div, e, BK), k.ubin(BinOp::Rem, e, BK))
            } else {
                (
                    k.ubin(BinOp::Rem, e, side.width),
                    k.ubin(BinOp::Div, e, side.width),
                )
            };
            let index = k.add_u(side.origin, local);
            let kk = k.add_u(k0, step_k);
            let inside = k.cmp_u(Cmp::Lt, index, side.size);
            let in_depth = k.cmp_u(Cmp::Lt, kk, depth);
            let ok = k.and(inside, in_depth);
            let value = k.f32(0.0);
            k.when(ok, |k| {
                let v = if side.is_a {
                    load(k, index, kk)
                } else {
                    load(k, kk, index)
                };
                k.assign(value, v);
            });
            let at = k.mad_u(step_k, side.width, local);
            k.store_shared(slice, at, value);
        });
    }
}

/// Column sums of a finished micro-tile over the block's rows, for per-tile partials: for
/// each term, `value(k, term, i, j)` gives element (i, j) (only rows inside C count), and the
/// block's total of column `at.cols[j]` comes back in the row-group-0 threads' `sums[term][j]`
/// (other threads hold garbage). Summed in row order, so the bits never change.
pub fn column_sums(
    k: &mut KernelBuilder,
    place: &TilePlace,
    at: &Coordinates,
    tiling: Tiling,
    terms: usize,
    value: impl Fn(&mut KernelBuilder, usize, usize, usize) -> F32,
) -> Vec<Vec<F32>> {
    let groups_m = tiling.bm / TM;
    let (ty, tx) = place.thread;
    let area = k.shared(groups_m * tiling.bn);
    let mut sums = Vec::with_capacity(terms);
    for t in 0..terms {
        // each thread's own rows first
        let own: Vec<F32> = (0..TN as usize)
            .map(|j| {
                let total = k.f32(0.0);
                for i in 0..TM as usize {
                    let v = value(k, t, i, j);
                    let v = k.select(at.row_ok[i], v, 0.0f32);
                    k.accumulate(total, v);
                }
                total
            })
            .collect();
        for (j, &v) in own.iter().enumerate() {
            let col = k.mad_u(tx, TN, j as u32);
            let at = k.mad_u(ty, tiling.bn, col);
            k.store_shared(area, at, v);
        }
        k.barrier();
        let first_group = k.cmp_u(Cmp::Eq, ty, 0u32);
        let column: Vec<F32> = (0..TN).map(|_| k.f32(0.0)).collect();
        k.when(first_group, |k| {
            for (j, &total) in column.iter().enumerate() {
                let col = k.mad_u(tx, TN, j as u32);
                for g in 0..groups_m {
                    let at = k.add_u(col, g * tiling.bn);
                    let v = k.load_shared(area, at);
                    k.accumulate(total, v);
                }
            }
        });
        k.barrier(); // the area is reused by the next term
        sums.push(column);
    }
    sums
}

/// Stores [`column_sums`]' totals (row group 0 of the block) as per-(batch index `z`, row
/// tile) partials: `partials[t][z·tiles + tile_row][column]`, the layout `combine_tiles` reads.
pub fn store_column_sums(
    k: &mut KernelBuilder,
    place: &TilePlace,
    at: &Coordinates,
    z: U32,
    partials: U64,
    rows: TileRows,
    sums: &[Vec<F32>],
) {
    let first_group = k.cmp_u(Cmp::Eq, place.thread.0, 0u32);
    k.when(first_group, |k| {
        let row = k.mad_u(z, rows.tiles as u32, place.tile_row);
        for (t, term) in sums.iter().enumerate() {
            for (j, &total) in term.iter().enumerate() {
                k.when(at.col_ok[j], |k| {
                    let slot = k.mad_u(row, rows.channels as u32, at.cols[j]);
                    let slot = k.idx(slot);
                    let at = k.idx_add_const(slot, t as u64 * rows.rows() * rows.channels);
                    k.store(partials, at, total);
                });
            }
        }
    });
}
