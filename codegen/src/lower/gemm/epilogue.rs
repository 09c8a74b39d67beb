//! Epilogues over a tile's accumulators: column sums (BN statistics, per-tile partials) and
//! segment sums (per-example sums of a tile over the batch).

use super::*;

/// Column sums of a finished tile over the block's rows, for per-tile partials: for each
/// term, `value(k, term, i, j)` gives element (i, j) (only rows inside C count), and the
/// block's total of column `at.cols[j]` comes back in the slot-0 threads' `sums[term][j]`
/// (other threads hold garbage). Summed in slot order, so the bits never change.
pub fn column_sums(
    k: &mut KernelBuilder,
    place: &TilePlace,
    at: &Coordinates,
    tiling: Tiling,
    terms: usize,
    value: impl Fn(&mut KernelBuilder, usize, usize, usize) -> F32,
) -> Vec<Vec<F32>> {
    let slots = place.slots(tiling);
    let (rows, cols) = place.elements();
    let area = k.shared(slots * tiling.bn);
    let mut sums = Vec::with_capacity(terms);
    for t in 0..terms {
        // each thread's own rows first
        let own: Vec<F32> = (0..cols as usize)
            .map(|j| {
                let total = k.f32(0.0);
                for i in 0..rows as usize {
                    let v = value(k, t, i, j);
                    let v = k.select(at.row_ok[i], v, 0.0f32);
                    k.accumulate(total, v);
                }
                total
            })
            .collect();
        for (&v, &col) in own.iter().zip(&at.local_cols) {
            let slot = k.mad_u(place.slot, tiling.bn, col);
            k.store_shared(area, slot, v);
        }
        k.barrier();
        let first_slot = k.cmp_u(Cmp::Eq, place.slot, 0u32);
        let column: Vec<F32> = (0..cols).map(|_| k.f32(0.0)).collect();
        k.when(first_slot, |k| {
            for (&total, &col) in column.iter().zip(&at.local_cols) {
                for s in 0..slots {
                    let slot = k.add_u(col, s * tiling.bn);
                    let v = k.load_shared(area, slot);
                    k.accumulate(total, v);
                }
            }
        });
        k.barrier(); // the area is reused by the next term
        sums.push(column);
    }
    sums
}

/// Per-segment column sums of a finished tile whose rows run over several examples, `segment`
/// rows each (the tile's height a multiple of it), stored straight as per-example partials
/// `partials[t][n][column]` of `examples × columns` (the layout `combine_tiles` reads with one
/// tile per example): example n's rows summed in order, so a per-example square squares the
/// example's whole sum. `value(k, term, i, j)` gives the thread's element (i, j); rows past
/// C count zero, examples past the batch are not stored.
#[allow(clippy::too_many_arguments)]
pub fn store_segment_sums(
    k: &mut KernelBuilder,
    place: &TilePlace,
    at: &Coordinates,
    tiling: Tiling,
    (segment, examples): (u32, u32),
    partials: U64,
    terms: usize,
    value: impl Fn(&mut KernelBuilder, usize, usize, usize) -> F32,
) {
    assert!(
        tiling.bm.is_multiple_of(segment),
        "{tiling:?}, segments of {segment}"
    );
    let per_tile = tiling.bm / segment;
    let outputs = per_tile * tiling.bn;
    let area = k.shared(tiling.bm * tiling.bn);
    let (rows, cols) = place.elements();
    let tid = k.tid();
    let columns = place.shape.n;
    for t in 0..terms {
        for i in 0..rows as usize {
            let local_row = k.ubin(BinOp::Sub, at.rows[i], place.m0);
            for j in 0..cols as usize {
                let v = value(k, t, i, j);
                let v = k.select(at.row_ok[i], v, 0.0f32);
                let slot = k.mad_u(local_row, tiling.bn, at.local_cols[j]);
                k.store_shared(area, slot, v);
            }
        }
        k.barrier();
        for round in 0..outputs.div_ceil(THREADS) {
            let out = k.add_u(tid, round * THREADS);
            let (e, col) = (
                k.ubin(BinOp::Div, out, tiling.bn),
                k.ubin(BinOp::Rem, out, tiling.bn),
            );
            let first = k.mul_u(e, segment * tiling.bn);
            let first = k.add_u(first, col);
            let total = k.f32(0.0);
            let live = k.cmp_u(Cmp::Lt, out, outputs);
            k.when(live, |k| {
                for r in 0..segment {
                    let v = k.load_shared_plus(area, first, r * tiling.bn);
                    k.accumulate(total, v);
                }
            });
            let example = k.mad_u(place.tile_row, per_tile, e);
            let column = k.add_u(place.n0, col);
            let stored = k.cmp_u(Cmp::Lt, example, examples);
            let inside = k.cmp_u(Cmp::Lt, column, columns);
            let stored = k.and(stored, inside);
            let stored = k.and(stored, live);
            k.when(stored, |k| {
                let slot = k.mad_u(example, columns, column);
                let slot = k.idx(slot);
                let offset = t as u64 * examples as u64 * columns as u64;
                let at = k.idx_add_const(slot, offset);
                k.store(partials, at, total);
            });
        }
        k.barrier(); // the area is reused by the next term
    }
}

/// Stores [`column_sums`]' totals (the slot-0 threads) as per-(batch index `z`, row tile)
/// partials: `partials[t][z·tiles + tile_row][column]`, the layout `combine_tiles` reads.
pub fn store_column_sums(
    k: &mut KernelBuilder,
    place: &TilePlace,
    at: &Coordinates,
    z: U32,
    partials: U64,
    rows: TileRows,
    sums: &[Vec<F32>],
) {
    let first_slot = k.cmp_u(Cmp::Eq, place.slot, 0u32);
    k.when(first_slot, |k| {
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
