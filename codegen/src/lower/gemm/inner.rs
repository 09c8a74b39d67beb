//! The inner loop: one K slice's products out of shared memory, on fp32 FMA (`fma_slice`) or
//! on tensor cores (`mma_slice`, `mma_tiles`, 3xTF32 or one TF32 product), placed by the
//! instruction's fragments.

use super::*;

/// One K slice on fp32 FMA: the thread's TM × TN micro-tile, k in order.
pub(super) fn fma_slice(
    k: &mut KernelBuilder,
    (a, b): (Slice, Slice),
    (rows, cols): (Vec<LineAt>, Vec<LineAt>),
    acc: &Products,
) {
    for kk in 0..a.depth {
        let a_values: Vec<F32> = rows
            .iter()
            .map(|&(at, plus)| k.load_shared_plus(a.array, at, plus + a.steps.offset(kk)))
            .collect();
        let b_values: Vec<F32> = cols
            .iter()
            .map(|&(at, plus)| k.load_shared_plus(b.array, at, plus + b.steps.offset(kk)))
            .collect();
        for (row, &av) in acc.values.iter().zip(&a_values) {
            for (&c, &bv) in row.iter().zip(&b_values) {
                k.fma_into(c, av, bv);
            }
        }
        if let Some(acc_sq) = &acc.squares {
            let a2: Vec<F32> = a_values.iter().map(|&v| k.mul(v, v)).collect();
            let b2: Vec<F32> = b_values.iter().map(|&v| k.mul(v, v)).collect();
            for (row, &av) in acc_sq.iter().zip(&a2) {
                for (&c, &bv) in row.iter().zip(&b2) {
                    k.fma_into(c, av, bv);
                }
            }
        }
    }
}

/// An operand split for 3xTF32: its TF32 truncation and the rest truncated to TF32, both by
/// clearing bits (ptxas expands `cvt.rna.tf32.f32` to four instructions, which in the main
/// loop cost more issue slots than the mma; and it drops the clearing itself, as the mma
/// reads only a TF32 operand's top bits: a split costs one `and` and one subtraction). The
/// rest is below 2⁻¹⁰ of the operand and kept to 2⁻¹⁰ of itself: the pair holds the operand
/// to 2⁻²⁰, its truncation biasing magnitudes down by at most that (rounding the rest would
/// halve it for one more instruction per element: at 2⁻²¹ against 2⁻²⁰, fp32 sums' own
/// rounding dominates either way). A NaN or infinite operand is carried by the truncation,
/// which keeps it.
pub(super) struct Split<const N: usize> {
    pub(super) hi: [Tf32; N],
    pub(super) lo: [Tf32; N],
}

pub(super) fn split<const N: usize>(k: &mut KernelBuilder, v: [F32; N]) -> Split<N> {
    let hi = v.map(|x| k.tf32_truncated(x));
    let lo = std::array::from_fn(|i| {
        let high = k.tf32_value(hi[i]);
        let rest = k.sub(v[i], high); // exact: the high part holds the leading bits
        k.tf32_truncated(rest)
    });
    Split { hi, lo }
}

/// A warp's lines of one side: for each of its `tiles` mma tiles, `size` apart, the
/// fragment's `offsets`.
pub(super) fn lines(tiles: u32, size: u32, offsets: &[u32]) -> Vec<u32> {
    (0..tiles)
        .flat_map(|tile| offsets.iter().map(move |&offset| size * tile + offset))
        .collect()
}

/// One K slice on tensor cores, one mma's k at a time: the warp's mma tiles. `rows` holds
/// row tile tm's lines (A's row offsets) from `R·tm` on, `cols` column tile tn's from `C·tn`
/// (as [`lines`] lists them).
pub(super) fn mma_slice(
    k: &mut KernelBuilder,
    (a, b): (Slice, Slice),
    (rows, cols): (Vec<LineAt>, Vec<LineAt>),
    (tiles, split): (WarpTiles, bool),
    acc: &Products,
) {
    // register r of row tile tm holds A at its line's row and k offset (t in the lines);
    // register r of column tile tn holds B at its k offset and its line's column
    let a_place = |r: usize| (MMA.a.offsets[r].1, MMA.a.line_of(r).0);
    let b_place = |r: usize| (MMA.b.offsets[r].0, MMA.b.line_of(r).1);
    let (a_lines, b_lines) = (MMA.a.row_offsets().len(), MMA.b.col_offsets().len());
    for step in 0..a.depth / MMA.k {
        let a_values: Vec<[F32; 4]> = fragments(k, (a, &rows), (tiles.m, a_lines), step, a_place);
        let b_values: Vec<[F32; 2]> = fragments(k, (b, &cols), (tiles.n, b_lines), step, b_place);
        mma_tiles(k, &a_values, &b_values, &acc.values, split);
        if let Some(acc_sq) = &acc.squares {
            let square = |k: &mut KernelBuilder, v: F32| k.mul(v, v);
            let a2: Vec<[F32; 4]> = a_values.iter().map(|f| f.map(|v| square(k, v))).collect();
            let b2: Vec<[F32; 2]> = b_values.iter().map(|f| f.map(|v| square(k, v))).collect();
            mma_tiles(k, &a2, &b2, acc_sq, split);
        }
    }
}

/// One side's fragments at mma step `step` for each of `tiles` mma tiles (`lines` of the
/// thread's lines each): register r at the k offset and line `place(r)` gives.
fn fragments<const R: usize>(
    k: &mut KernelBuilder,
    (side, lines): (Slice, &[LineAt]),
    (tiles, per_tile): (u32, usize),
    step: u32,
    place: impl Fn(usize) -> (u32, usize),
) -> Vec<[F32; R]> {
    (0..tiles as usize)
        .map(|tile| {
            std::array::from_fn(|r| {
                let (k_offset, line) = place(r);
                let (at, plus) = lines[per_tile * tile + line];
                let kk = MMA.k * step + k_offset;
                k.load_shared_plus(side.array, at, plus + side.steps.offset(kk))
            })
        })
        .collect()
}

/// acc += A·B over the warp's mma tiles, in 3xTF32 if `split3` (else one TF32 product):
/// accumulator register c of tile (tm, tn) is `acc[R·tm + row line][C·tn + column line]` of
/// C's fragment (the layout `TilePlace::local` gives).
pub(super) fn mma_tiles(
    k: &mut KernelBuilder,
    a: &[[F32; 4]],
    b: &[[F32; 2]],
    acc: &[Vec<F32>],
    split3: bool,
) {
    let (r, c) = (MMA.c.row_offsets().len(), MMA.c.col_offsets().len());
    let tile = |tm: usize, tn: usize| -> [F32; 4] {
        std::array::from_fn(|i| {
            let (row, col) = MMA.c.line_of(i);
            acc[r * tm + row][c * tn + col]
        })
    };
    if !split3 {
        // rounded to nearest (`cvt.rna`): truncating instead biases every product toward
        // zero, which the Fisher's sums of squares pile up (small_cnn: 9% off, not 1%); and
        // adding half an ulp to the bits would turn NaN into zero
        let a: Vec<[Tf32; 4]> = a.iter().map(|f| f.map(|v| k.tf32(v))).collect();
        let b: Vec<[Tf32; 2]> = b.iter().map(|f| f.map(|v| k.tf32(v))).collect();
        for (tm, &a) in a.iter().enumerate() {
            for (tn, &b) in b.iter().enumerate() {
                k.mma_tf32_into(tile(tm, tn), a, b);
            }
        }
        return;
    }
    let a: Vec<Split<4>> = a.iter().map(|&f| split(k, f)).collect();
    let b: Vec<Split<2>> = b.iter().map(|&f| split(k, f)).collect();
    for (tm, a) in a.iter().enumerate() {
        for (tn, b) in b.iter().enumerate() {
            let c = tile(tm, tn);
            k.mma_tf32_into(c, a.lo, b.hi);
            k.mma_tf32_into(c, a.hi, b.lo);
            k.mma_tf32_into(c, a.hi, b.hi);
        }
    }
}
