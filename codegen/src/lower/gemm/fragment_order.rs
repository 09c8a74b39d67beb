//! Fragment order: how a gathered K slice lies in shared memory on tensor cores, so that a
//! lane reads its mma fragments 128 bits at a time. Layout arithmetic (and the swizzle's
//! emitted form); `gathered` emits the stores that follow it and `inner` the loads.
//!
//! A slice of `width` lines is cut into mma steps (k in runs of the mma's k) and each step
//! into units of `per_load` mma tiles (A: one 16 × 8 tile, its 4 registers; B: two 8 × 8
//! tiles, 2 registers each). A unit holds 32 lanes × 4 words, lane after lane: the lane's
//! registers of the unit's tiles, tile after tile, in register order. So one `ld.shared.v4`
//! fills a lane's fragment registers where the mma reads them, and a warp's load reads 512
//! contiguous bytes. Which lane group holds which of the tile's lines is the warp's
//! [`Deal`]'s. Each lane's 16 bytes are swizzled (bits 3 and 4 of its place XORed into bits
//! 0 and 1): a warp storing 32 adjacent lines at one k would otherwise hit 4 banks.

use super::Operands;
use crate::builder::{KernelBuilder, U32};
use crate::kir::BinOp;
use crate::lower::schedule::{Deal, MMA};
use crate::mma::Fragment;

/// Words one lane reads per load: a `v4`.
pub const LOAD_WORDS: u32 = 4;

/// The fragment order of one side's slices (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentOrder {
    fragment: Fragment,
    lines_are_rows: bool,
    deal: Deal,
    /// mma tiles one load serves.
    pub per_load: u32,
    /// Lines in the slice (a multiple of a unit's).
    pub width: u32,
}

/// A bit field of an index and the words it moves a place by: `((x >> shift) & (2^bits −
/// 1)) · weight`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub shift: u32,
    pub bits: u32,
    pub weight: u32,
}

impl FragmentOrder {
    /// The order of side `which`'s slices of `width` lines, dealt to lane groups by `deal`.
    pub fn new(which: Operands, deal: Deal, width: u32) -> FragmentOrder {
        let (fragment, lines_are_rows) = match which {
            Operands::A => (MMA.a, true),
            Operands::B => (MMA.b, false),
        };
        let order = FragmentOrder {
            fragment,
            lines_are_rows,
            deal,
            per_load: LOAD_WORDS / fragment.elements() as u32,
            width,
        };
        assert_eq!(
            8 * deal.run,
            order.tile_lines(),
            "{deal:?} deals whole tiles"
        );
        assert_eq!(
            MMA.operand.per_register(),
            1,
            "fragment order places 32-bit elements"
        );
        assert!(
            width.is_power_of_two() && width.is_multiple_of(order.unit_lines()),
            "{width} lines in units of {}",
            order.unit_lines()
        );
        order
    }

    fn registers(&self) -> u32 {
        self.fragment.elements() as u32
    }

    /// Lines of one mma tile on this side: A's rows or B's columns.
    fn tile_lines(&self) -> u32 {
        if self.lines_are_rows { MMA.m } else { MMA.n }
    }

    /// Lines of one unit (the tiles of one load).
    pub fn unit_lines(&self) -> u32 {
        self.tile_lines() * self.per_load
    }

    /// Words of one unit: 32 lanes' loads.
    pub fn unit_words(&self) -> u32 {
        32 * LOAD_WORDS
    }

    /// Words of one mma step of the slice.
    pub fn step_words(&self) -> u32 {
        self.width * MMA.k
    }

    /// Words a line moves the unit's place by: a warp's first line `w0` (a multiple of a
    /// unit's lines) starts at `w0` times this.
    pub fn words_per_line(&self) -> u32 {
        self.unit_words() / self.unit_lines()
    }

    /// The place of (line, k) in a slice, in words.
    pub fn word(&self, line: u32, kk: u32) -> u32 {
        swizzle(self.unswizzled(line, kk))
    }

    /// The place before the swizzle: step, unit, lane, the tile within the unit, register.
    fn unswizzled(&self, line: u32, kk: u32) -> u32 {
        let (step, kk) = (kk / MMA.k, kk % MMA.k);
        let (tile, within) = (line / self.tile_lines(), line % self.tile_lines());
        let (lane, register) = self.holder(within, kk);
        step * self.step_words()
            + (tile / self.per_load) * self.unit_words()
            + lane * LOAD_WORDS
            + (tile % self.per_load) * self.registers()
            + register
    }

    /// The lane and register of a tile's fragment holding line `within` of the tile at `kk`:
    /// the deal gives group g its j-th line at `run·g + j`, the fragment its j-th at the
    /// fragment's j-th line offset from g's first.
    fn holder(&self, within: u32, kk: u32) -> (u32, u32) {
        let (g, j) = (within / self.deal.run, within % self.deal.run);
        let (offsets, per_group) = if self.lines_are_rows {
            (self.fragment.row_offsets(), self.fragment.row.0)
        } else {
            (self.fragment.col_offsets(), self.fragment.col.0)
        };
        let line = per_group * g + offsets[j as usize];
        let want = if self.lines_are_rows {
            (line as usize, kk as usize)
        } else {
            (kk as usize, line as usize)
        };
        (0..32u32)
            .flat_map(|lane| (0..self.registers()).map(move |r| (lane, r)))
            .find(|&(lane, r)| self.fragment.at(lane, r as usize) == want)
            .expect("the fragment covers its tile")
    }

    /// Where a line index of `bits` bits moves a place (before the swizzle), as fields.
    pub fn line_fields(&self, bits: u32) -> Vec<Field> {
        fields(bits, |bit| self.unswizzled(1 << bit, 0))
    }

    /// Where a k of `bits` bits moves a place (before the swizzle), as fields.
    pub fn k_fields(&self, bits: u32) -> Vec<Field> {
        fields(bits, |bit| self.unswizzled(0, 1 << bit))
    }

    /// The bits of a place that a line below `lines` and a k below `ks` can set: a constant
    /// place with none of them adds to such a register's place.
    pub fn reach(&self, lines: u32, ks: u32) -> u32 {
        let line_bits = (0..bits_below(lines)).map(|b| self.word(1 << b, 0));
        let k_bits = (0..bits_below(ks)).map(|b| self.word(0, 1 << b));
        line_bits.chain(k_bits).fold(0, |all, w| all | w)
    }
}

/// The bits a value below `bound` can have set.
pub fn bits_below(bound: u32) -> u32 {
    u32::BITS - bound.saturating_sub(1).leading_zeros()
}

/// XOR of bits 3 and 4 of a word's 16-byte chunk (word bits 5, 6) into its bits 0 and 1
/// (word bits 2, 3): the 8 lanes of a load's phase keep distinct chunks (their bits 3 and
/// 4 are the same), and 32 lines stored at one k reach 16 banks, not 4.
pub fn swizzle(word: u32) -> u32 {
    word ^ (((word >> SWIZZLE_FROM) & SWIZZLE_MASK) << SWIZZLE_TO)
}

const SWIZZLE_FROM: u32 = 5;
const SWIZZLE_TO: u32 = 2;
const SWIZZLE_MASK: u32 = 3;

/// [`swizzle`] of a register.
pub fn emit_swizzle(k: &mut KernelBuilder, word: U32) -> U32 {
    let high = k.ubin(BinOp::Shr, word, SWIZZLE_FROM);
    let high = k.ubin(BinOp::And, high, SWIZZLE_MASK);
    let mask = k.ubin(BinOp::Shl, high, SWIZZLE_TO);
    k.ubin(BinOp::Xor, word, mask)
}

/// The place of each of `bits` input bits (`weight(bit)`, linear in the bits), merged into
/// fields where consecutive bits double the weight.
fn fields(bits: u32, weight: impl Fn(u32) -> u32) -> Vec<Field> {
    let mut out: Vec<Field> = Vec::new();
    for bit in 0..bits {
        let w = weight(bit);
        match out.last_mut() {
            Some(f) if f.shift + f.bits == bit && f.weight << f.bits == w => f.bits += 1,
            _ => out.push(Field {
                shift: bit,
                bits: 1,
                weight: w,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::schedule::{Tiling, WarpTiles};
    use crate::options::Precision;

    /// Shared-memory wavefronts of one warp-wide load or store, each lane reaching `vector`
    /// words from its address (in words): lanes are served in phases of 128 bytes' worth
    /// (32 lanes of one word, 16 of two, 8 of four), each phase taking as many wavefronts
    /// as the most distinct words it asks of one of the 32 banks.
    fn wavefronts(addresses: &[u32], vector: u32) -> usize {
        addresses
            .chunks((32 / vector) as usize)
            .map(|phase| {
                let mut words: Vec<Vec<u32>> = vec![Vec::new(); 32];
                for &at in phase {
                    for word in at..at + vector {
                        let bank = &mut words[(word % 32) as usize];
                        if !bank.contains(&word) {
                            bank.push(word);
                        }
                    }
                }
                words.iter().map(Vec::len).max().unwrap_or(0)
            })
            .sum()
    }

    /// Every side's order the chooser can make, at slice depth `depth`: both sides of the
    /// narrow tiles (16 to 256 lines) and the wide ones (32 to 512).
    fn orders(depth: u32) -> Vec<(FragmentOrder, u32)> {
        let narrow = [16, 32, 64].map(|n| Tiling::for_columns(n, Precision::Tf32));
        let wide = [32, 64, 128].map(Tiling::wide_for_columns);
        narrow
            .into_iter()
            .chain([Tiling::for_rows(16)])
            .chain(wide)
            .map(|tiling| Tiling {
                bk: depth,
                ..tiling
            })
            .flat_map(|tiling| {
                let [a, b] = WarpTiles::for_tiling(tiling).deal;
                [
                    (FragmentOrder::new(Operands::A, a, tiling.bm), tiling.bk),
                    (FragmentOrder::new(Operands::B, b, tiling.bn), tiling.bk),
                ]
            })
            .collect()
    }

    fn all_orders() -> Vec<(FragmentOrder, u32)> {
        [8, 16].into_iter().flat_map(orders).collect()
    }

    #[test]
    fn each_element_of_a_slice_has_its_own_word() {
        for (order, depth) in all_orders() {
            let mut seen = vec![false; (order.width * depth) as usize];
            for line in 0..order.width {
                for kk in 0..depth {
                    let w = order.word(line, kk) as usize;
                    assert!(!seen[w], "{order:?}: ({line}, {kk}) on a taken word");
                    seen[w] = true;
                }
            }
            assert!(seen.iter().all(|&s| s), "{order:?}");
        }
    }

    /// The 4 words from a lane's place in a unit are its registers of the unit's tiles, in
    /// register order, at the lines the deal gives its group.
    #[test]
    fn a_lanes_load_is_its_fragment_registers() {
        for (order, depth) in all_orders() {
            let tile_lines = order.tile_lines();
            for lane in 0..32 {
                let (g, t) = (lane / 4, lane % 4);
                let at = swizzle(lane * LOAD_WORDS);
                for unit in 0..order.width / order.unit_lines() {
                    for step in 0..depth / MMA.k {
                        for tile in 0..order.per_load {
                            for r in 0..order.registers() {
                                let (row, col) = order.fragment.at(lane, r as usize);
                                let (f, kk) = if order.lines_are_rows {
                                    (row as u32, col as u32)
                                } else {
                                    (col as u32, row as u32)
                                };
                                let offsets = if order.lines_are_rows {
                                    order.fragment.row_offsets()
                                } else {
                                    order.fragment.col_offsets()
                                };
                                let j = offsets.iter().position(|&o| o == f - g).unwrap();
                                let line = (unit * order.per_load + tile) * tile_lines
                                    + order.deal.run * g
                                    + j as u32;
                                let want = step * order.step_words()
                                    + unit * order.unit_words()
                                    + at
                                    + tile * order.registers()
                                    + r;
                                assert_eq!(
                                    order.word(line, step * MMA.k + kk),
                                    want,
                                    "{order:?} lane {lane} (t {t}) tile {tile} r {r}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_warps_fragment_load_has_no_bank_conflict() {
        let addresses: Vec<u32> = (0..32).map(|lane| swizzle(lane * LOAD_WORDS)).collect();
        assert_eq!(wavefronts(&addresses, LOAD_WORDS), 4);
        // unswizzled it would be the same: the swizzle keeps each phase's chunks distinct
        let plain: Vec<u32> = (0..32).map(|lane| lane * LOAD_WORDS).collect();
        assert_eq!(wavefronts(&plain, LOAD_WORDS), 4);
    }

    /// The gathered side's two store patterns (`gathered::Side`): 32 adjacent lines at one
    /// k (lines fastest), or `32 / depth` lines at every k of the slice (k fastest). At most
    /// two wavefronts each: a unit's 16 bytes hold at most two of its lines at one k (A: rows
    /// g and g + 8; B: column g of two tiles), so a warp's 32 words at one k can reach only
    /// 16 banks.
    #[test]
    fn a_warps_stores_take_at_most_two_wavefronts() {
        for (order, depth) in all_orders() {
            let width = order.width;
            for kk in 0..depth {
                for first in (0..width.min(64)).step_by(32.min(width) as usize) {
                    let words: Vec<u32> = (0..32.min(width))
                        .map(|l| order.word(first + l, kk))
                        .collect();
                    let got = wavefronts(&words, 1);
                    assert!(got <= 2, "{order:?} lines fastest at k {kk}: {got}");
                }
            }
            let lines = 32 / depth;
            for first in (0..width).step_by(lines as usize).take(8) {
                let words: Vec<u32> = (0..32)
                    .map(|i| order.word(first + i / depth, i % depth))
                    .collect();
                let got = wavefronts(&words, 1);
                assert!(got <= 2, "{order:?} k fastest from {first}: {got}");
            }
        }
        // without the swizzle, lines fastest would take 8
        let order = FragmentOrder::new(
            Operands::B,
            WarpTiles::for_tiling(Tiling::wide_for_columns(128)).deal[1],
            128,
        );
        let words: Vec<u32> = (0..32).map(|l| order.unswizzled(l, 0)).collect();
        assert_eq!(wavefronts(&words, 1), 8);
    }

    /// A place is the sum of its fields (line and k apart), swizzled; a constant outside a
    /// register's reach adds to it.
    #[test]
    fn places_are_sums_of_fields() {
        let value = |fields: &[Field], x: u32| -> u32 {
            fields
                .iter()
                .map(|f| ((x >> f.shift) & ((1 << f.bits) - 1)) * f.weight)
                .sum()
        };
        for (order, depth) in all_orders() {
            let (lines, ks) = (
                order.line_fields(bits_below(order.width)),
                order.k_fields(bits_below(depth)),
            );
            for line in 0..order.width {
                for kk in 0..depth {
                    let sum = value(&lines, line) + value(&ks, kk);
                    assert_eq!(
                        swizzle(sum),
                        order.word(line, kk),
                        "{order:?} ({line}, {kk})"
                    );
                }
            }
            // lines below 16 at one k, and lines 16 apart: the constants add
            let reach = order.reach(16, depth);
            for c in (16..order.width).step_by(16) {
                let cw = order.word(c, 0);
                assert_eq!(cw & reach, 0, "{order:?} {c}");
                for line in 0..16 {
                    for kk in 0..depth {
                        assert_eq!(order.word(line + c, kk), order.word(line, kk) + cw);
                    }
                }
            }
        }
    }
}
