//! A tiled GEMM skeleton for implicit-GEMM convolutions.
//!
//! One block computes a `BM × BN` tile of `C = A·B` (`M × K` times `K × N`) for one batch
//! index `z` (grid y), stepping through K in [`BK`]-wide slices staged in shared memory; each
//! of the [`THREADS`] threads keeps a [`TM`]` × `[`TN`] micro-tile of C in registers and adds
//! each product with one `fma`, k in order (so every run gives the same bits). The operands
//! are gathered element by element by the caller's closures (im2col on the fly, prologues
//! applied on load); elements outside `M × K` or `K × N` are zero and never gathered. The
//! skeleton knows nothing about convolutions: the caller reads the finished micro-tile.

use crate::builder::{F32, KernelBuilder, Pred, SharedF32, U32};
use crate::kir::{BinOp, Cmp};

/// Threads per block.
pub const THREADS: u32 = 256;
/// The K slice staged in shared memory per step.
pub const BK: u32 = 8;
/// Rows and columns of C each thread computes.
pub const TM: u32 = 4;
pub const TN: u32 = 4;

/// The GEMM's sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub m: u32,
    pub n: u32,
    pub k: u32,
}

/// A block tile of `bm × bn` (`bm·bn = THREADS·TM·TN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub bm: u32,
    pub bn: u32,
}

impl Tiling {
    /// The tile for `n` columns: as few idle columns as possible (16, 32 or 64 wide), the
    /// rows making up the block's 4096 elements.
    pub fn for_columns(n: u32) -> Tiling {
        let bn = n.next_power_of_two().clamp(16, 64);
        Tiling {
            bm: THREADS * TM * TN / bn,
            bn,
        }
    }

    pub fn tiles(&self, shape: GemmShape) -> (u32, u32) {
        (shape.m.div_ceil(self.bm), shape.n.div_ceil(self.bn))
    }

    /// One block per tile along x, one row of blocks per batch index along y.
    pub fn grid(&self, shape: GemmShape, batch: u32) -> [u32; 2] {
        let (rows, cols) = self.tiles(shape);
        [rows * cols, batch]
    }
}

/// A thread's finished micro-tile: `values[i][j]` is C at (`rows[i]`, `cols[j]`), which lies
/// inside C where `row_ok[i]` and `col_ok[j]` hold. `tile_row` is the block's tile index
/// along M, `z` its batch index.
pub struct MicroTile {
    pub values: Vec<Vec<F32>>,
    pub rows: Vec<U32>,
    pub cols: Vec<U32>,
    pub row_ok: Vec<Pred>,
    pub col_ok: Vec<Pred>,
    pub tile_row: U32,
    pub z: U32,
    /// The thread's position in the block: (row group, column group).
    pub thread: (U32, U32),
}

/// Emits the tiled product. `load_a(k, m, kk, z)` gathers A[m][kk] and `load_b(k, kk, n, z)`
/// B[kk][n], each called only for elements inside the matrix.
pub fn tiled_gemm(
    k: &mut KernelBuilder,
    shape: GemmShape,
    tiling: Tiling,
    load_a: impl Fn(&mut KernelBuilder, U32, U32, U32) -> F32,
    load_b: impl Fn(&mut KernelBuilder, U32, U32, U32) -> F32,
) -> MicroTile {
    assert_eq!(
        k.block_size(),
        THREADS,
        "the GEMM skeleton runs {THREADS} threads"
    );
    assert_eq!(tiling.bm * tiling.bn, THREADS * TM * TN, "{tiling:?}");
    let Tiling { bm, bn } = tiling;
    let (_, tile_cols) = tiling.tiles(shape);
    let (tile, z, tid) = (k.block_x(), k.block_y(), k.tid());
    let tile_row = k.ubin(BinOp::Div, tile, tile_cols);
    let tile_col = k.ubin(BinOp::Rem, tile, tile_cols);
    let m0 = k.mul_u(tile_row, bm);
    let n0 = k.mul_u(tile_col, bn);
    let groups_n = bn / TN;
    let ty = k.ubin(BinOp::Div, tid, groups_n);
    let tx = k.ubin(BinOp::Rem, tid, groups_n);

    // A slice stored k-major ([BK][bm]), B slice k-major ([BK][bn]): a thread's TM (TN)
    // operands of one k are adjacent
    let (a_slice, b_slice) = (k.shared(BK * bm), k.shared(BK * bn));
    let acc: Vec<Vec<F32>> = (0..TM)
        .map(|_| (0..TN).map(|_| k.f32(0.0)).collect())
        .collect();
    let steps = shape.k.div_ceil(BK);
    k.for_u32(0u32, steps, 1, |k, step| {
        let k0 = k.mul_u(step, BK);
        // A (im2col of activations) is contiguous along m, B (weights) along k
        let a_side = Side {
            width: bm,
            origin: m0,
            size: shape.m,
            is_a: true,
            k_fastest: false,
        };
        stage(k, a_side, a_slice, k0, shape.k, &load_a, z);
        let b_side = Side {
            width: bn,
            origin: n0,
            size: shape.n,
            is_a: false,
            k_fastest: true,
        };
        stage(k, b_side, b_slice, k0, shape.k, &load_b, z);
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
        }
        k.barrier();
    });

    let rows: Vec<U32> = (0..TM)
        .map(|i| {
            let local = k.mad_u(ty, TM, i);
            k.add_u(m0, local)
        })
        .collect();
    let cols: Vec<U32> = (0..TN)
        .map(|j| {
            let local = k.mad_u(tx, TN, j);
            k.add_u(n0, local)
        })
        .collect();
    let row_ok = rows.iter().map(|&r| k.cmp_u(Cmp::Lt, r, shape.m)).collect();
    let col_ok = cols.iter().map(|&c| k.cmp_u(Cmp::Lt, c, shape.n)).collect();
    MicroTile {
        values: acc,
        rows,
        cols,
        row_ok,
        col_ok,
        tile_row,
        z,
        thread: (ty, tx),
    }
}

/// One operand's slice: `width` rows of A (or columns of B) from `origin`, of `size` in all.
struct Side {
    width: u32,
    origin: U32,
    size: u32,
    is_a: bool,
    /// Whether consecutive threads take consecutive k (else consecutive rows/columns): the
    /// order of the operand in memory, for coalesced loads.
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
    load: &impl Fn(&mut KernelBuilder, U32, U32, U32) -> F32,
    z: U32,
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
                    load(k, index, kk, z)
                } else {
                    load(k, kk, index, z)
                };
                k.assign(value, v);
            });
            let at = k.mad_u(step_k, side.width, local);
            k.store_shared(slice, at, value);
        });
    }
}

/// Column sums of a finished micro-tile over the block's rows, for per-tile partials: for
/// each term, `terms(k, i, j)` gives the value of element (i, j) (only rows inside C count),
/// and the block's total of column `cols[j]` comes back in thread `(0, tx)`'s `sums[term][j]`
/// (other threads hold garbage). Summed in row order, so the bits never change.
pub fn column_sums(
    k: &mut KernelBuilder,
    tile: &MicroTile,
    tiling: Tiling,
    terms: usize,
    value: impl Fn(&mut KernelBuilder, usize, usize, usize) -> F32,
) -> Vec<Vec<F32>> {
    let groups_m = tiling.bm / TM;
    let (ty, tx) = tile.thread;
    let area = k.shared(groups_m * tiling.bn);
    let mut sums = Vec::with_capacity(terms);
    for t in 0..terms {
        // each thread's own rows first
        let own: Vec<F32> = (0..TN as usize)
            .map(|j| {
                let total = k.f32(0.0);
                for i in 0..TM as usize {
                    let v = value(k, t, i, j);
                    let v = k.select(tile.row_ok[i], v, 0.0f32);
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
