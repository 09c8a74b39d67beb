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
/// clearing bits (a rounding costs an instruction on sm_90 and two on sm_80, and ptxas
/// drops the clearing itself, as the mma reads only a TF32 operand's top bits: a split
/// costs one subtraction). The
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

/// One K slice on tensor cores, one mma's k at a time: the warp's mma tiles, each side's
/// fragments read where `at` says (a side in fragment order a unit at a time; else line by
/// line, as the warp's deals (`schedule::Deal`) list the lines: line i is the fragment's
/// i-th, mma tile i / R, the R lines of a tile in the fragment's order).
pub(super) fn mma_slice(
    k: &mut KernelBuilder,
    (a, b): (Slice, Slice),
    (rows, cols): (SideAt, SideAt),
    (tiles, split): (WarpTiles, bool),
    acc: &Products,
) {
    for step in 0..a.depth / MMA.k {
        let a_values: Vec<[F32; 4]> = fragments(k, (a, &rows), Operands::A, tiles.m, step);
        let b_values: Vec<[F32; 2]> = fragments(k, (b, &cols), Operands::B, tiles.n, step);
        mma_tiles(k, &a_values, &b_values, &acc.values, split);
        if let Some(acc_sq) = &acc.squares {
            let square = |k: &mut KernelBuilder, v: F32| k.mul(v, v);
            let a2: Vec<[F32; 4]> = a_values.iter().map(|f| f.map(|v| square(k, v))).collect();
            let b2: Vec<[F32; 2]> = b_values.iter().map(|f| f.map(|v| square(k, v))).collect();
            mma_tiles(k, &a2, &b2, acc_sq, split);
        }
    }
}

/// The fragments of side `which` (R registers each) for `tiles` mma tiles at mma step
/// `step` of `side`.
fn fragments<const R: usize>(
    k: &mut KernelBuilder,
    (side, at): (Slice, &SideAt),
    which: Operands,
    tiles: u32,
    step: u32,
) -> Vec<[F32; R]> {
    match at {
        &SideAt::Fragments(at, order) => {
            assert!(
                tiles.is_multiple_of(order.per_load),
                "{tiles} tiles of {order:?}"
            );
            let step_at = side.steps.offset(MMA.k * step);
            let units = (0..tiles / order.per_load).map(|u| step_at + u * order.unit_words());
            let words: Vec<F32> = units
                .flat_map(|plus| k.load_shared_vector(side.array, at, plus, LOAD_WORDS))
                .collect();
            words
                .chunks(R)
                .map(|c| c.try_into().expect("a tile's registers"))
                .collect()
        }
        SideAt::Lines(lines) => {
            // register r of row tile tm holds A at its line's row and k offset (t in the
            // lines); register r of column tile tn holds B at its k offset and its line's
            // column
            let (fragment, k_offsets, per_tile) = match which {
                Operands::A => (MMA.a, MMA.a.col_offsets(), MMA.a.row_offsets().len()),
                Operands::B => (MMA.b, MMA.b.row_offsets(), MMA.b.col_offsets().len()),
            };
            let place = |r: usize| match which {
                Operands::A => (fragment.offsets[r].1, fragment.line_of(r).0),
                Operands::B => (fragment.offsets[r].0, fragment.line_of(r).1),
            };
            SideValues::load(k, (side, lines), step, k_offsets).fragments(tiles, per_tile, place)
        }
    }
}

/// A side's elements that the thread's fragments hold at one mma step: `values[line][j]` at
/// its line `line` and the fragment's j-th k offset (of `k_offsets`).
struct SideValues {
    values: Vec<Vec<F32>>,
    k_offsets: Vec<u32>,
}

impl SideValues {
    /// Loads them from `side` at mma step `step`, element by element.
    fn load(
        k: &mut KernelBuilder,
        (side, lines): (Slice, &[LineAt]),
        step: u32,
        k_offsets: Vec<u32>,
    ) -> SideValues {
        let mut values = vec![Vec::new(); lines.len()];
        for &k_offset in &k_offsets {
            let kk = side.steps.offset(MMA.k * step + k_offset);
            for (line, &(at, plus)) in lines.iter().enumerate() {
                values[line].push(k.load_shared_plus(side.array, at, plus + kk));
            }
        }
        SideValues { values, k_offsets }
    }

    /// The fragments of `tiles` mma tiles (`per_tile` lines each): register r at the k
    /// offset and line of the tile `place(r)` gives.
    fn fragments<const R: usize>(
        &self,
        tiles: u32,
        per_tile: usize,
        place: impl Fn(usize) -> (u32, usize),
    ) -> Vec<[F32; R]> {
        (0..tiles as usize)
            .map(|tile| {
                std::array::from_fn(|r| {
                    let (k_offset, line) = place(r);
                    let j = self.k_offsets.iter().position(|&o| o == k_offset);
                    self.values[per_tile * tile + line][j.expect("a fragment's k offset")]
                })
            })
            .collect()
    }
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
        // rounded to nearest (one instruction on sm_90, two on sm_80): truncating instead
        // biases every product toward zero, which the Fisher's sums of squares pile up
        // (small_cnn: 9% off, not 1%); and adding half an ulp to the bits unchecked would
        // turn the GPU's NaN into zero
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
