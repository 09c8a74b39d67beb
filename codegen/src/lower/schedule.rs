//! How a GEMM runs, chosen apart from the code that runs it: the block's threads, its tile
//! of C and K slice ([`Tiling`], chosen from the problem's shape and the precision), a
//! warp's tile of tensor-core instructions ([`WarpTiles`], of the instruction [`MMA`]) and
//! how its rows and columns are dealt to its lanes ([`Deal`]), how many slices are in
//! flight, how a slice staged in lines is laid out ([`SLICE_PAD`]; gathered slices on tensor
//! cores lie in `gemm::fragment_order`) and how many blocks share an SM. [`super::gemm`] emits what these say; each kernel records what was
//! chosen (`kir::GemmSchedule`). Which of these a convolution's GEMMs take, and how their
//! sides are staged (patch, halo), is chosen in `conv/schedules.rs`.

use crate::builder::STATIC_SHARED;
use crate::mma::{Mma, TF32_M16N8K8};
use crate::options::Precision;

/// The tensor-core instruction of the TF32 GEMMs: its shape and fragments place every operand
/// load and accumulator [`super::gemm`] emits. The emitter takes each lane's rows as `g` plus
/// a register's offset and its k (A) or columns (C) as a multiple of `t` plus one, as the
/// m16n8k8 layouts have them.
pub(super) const MMA: Mma = TF32_M16N8K8;

/// Threads per block.
pub const THREADS: u32 = 256;
/// K slices staged in shared memory per step (multiples of 8, the mma's k): wide where a
/// thread stages few lines, so the slice's fixed work (barrier, wait, a one-tap slice's
/// window) is shared by more products (ResNet44 3xTF32 in machine code, instructions per mma:
/// forward 15.3 → 11.4, dgrad 11.2 → 8.8); narrow for the weight gradient, whose wide B side
/// (up to 256 lines) would stage 16 elements per thread and spill registers.
const WIDE_SLICE: u32 = 16;
const NARROW_SLICE: u32 = 8;
/// Rows and columns of C each thread computes on fp32 FMA.
pub const TM: u32 = 4;
pub const TN: u32 = 4;
/// Elements of C per block tile.
pub(super) const TILE: u32 = THREADS * TM * TN;
/// Elements of C per wide block tile on tensor cores: 64 accumulators a thread, in warp
/// tiles of 64 × 32 ([`WarpTiles`]).
pub(super) const WIDE_TILE: u32 = 4 * TILE;

/// A warp's tile on tensor cores, in mma tiles of 16 × 8: 4 × 4 in a wide block tile (a
/// thread holds 64 accumulators), else 2 × 2, or 1 × 4 where the block tile is only 16 rows
/// high (a weight gradient of 16 output channels), 16 accumulators: `2·m` rows by `2·n`
/// columns. How the warp's rows and columns are
/// dealt to its lanes is `deal`, one [`Deal`] per side (A's rows, B's columns).
#[derive(Clone, Copy, Debug)]
pub(super) struct WarpTiles {
    pub(super) m: u32,
    pub(super) n: u32,
    pub(super) deal: [Deal; 2],
}

impl WarpTiles {
    /// The warp tiles that share `tiling`'s tile among the block's warps: 4 × 4 (64 × 32) in
    /// a wide tile, else 2 × 2, or 1 × 4 in a tile 16 rows high.
    pub(super) fn for_tiling(tiling: Tiling) -> WarpTiles {
        let (m, n) = if tiling.is_wide() {
            (4, 4)
        } else if tiling.bm >= 32 {
            (2, 2)
        } else {
            (1, 4)
        };
        WarpTiles {
            m,
            n,
            deal: [
                Deal::in_pairs(MMA.a.row_offsets().len() as u32, m),
                Deal::in_pairs(MMA.b.col_offsets().len() as u32, n),
            ],
        }
    }

    pub(super) fn rows(self) -> u32 {
        MMA.m * self.m
    }

    pub(super) fn cols(self) -> u32 {
        MMA.n * self.n
    }
}

/// How a warp's lines of one side (A's rows, B's columns) are dealt to the lane groups
/// `g = lane / 4` of the mma fragments, which each hold `per_lane` of them: group g takes
/// the runs of `run` consecutive lines that start at `run·g`, one in every `8·run` lines.
/// Its i-th line is the fragment's i-th (mma tile `i / R`, the R lines of a tile in the
/// fragment's order), so any deal multiplies correctly: a staging of lines finds the lane's
/// lines by it, a slice in fragment order places them by it. A run of 1 is the fragments'
/// own order (lines g, g + 8, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Deal {
    pub(super) run: u32,
    pub(super) per_lane: u32,
}

impl Deal {
    /// Runs of a tile's R lines (A's rows g and g + 8: R = 2; B's column g: R = 1), over
    /// `tiles` mma tiles: a tile's fragment lines of group g are its lines `R·g` to
    /// `R·g + R − 1`.
    pub(super) fn in_pairs(per_tile: u32, tiles: u32) -> Deal {
        Deal {
            run: per_tile,
            per_lane: per_tile * tiles,
        }
    }

    /// The lane group's first line, from the warp's first `w0`, is `w0 + run·g`; its lines
    /// lie these constants after it, in the fragment's order.
    pub(super) fn pluses(self) -> Vec<u32> {
        (0..self.per_lane)
            .map(|i| (i / self.run) * 8 * self.run + i % self.run)
            .collect()
    }
}

/// The GEMM's sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub m: u32,
    pub n: u32,
    pub k: u32,
}

/// A block tile of `bm × bn` (`bm·bn = THREADS·TM·TN`), each a power of two from 16 to 256,
/// stepping through K `bk` at a time (8 or 16), with up to `stages` slices staged at once
/// (see [`staged_gemm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
    pub stages: u32,
}

/// Slices in shared memory at once where a lowering does not ask for more: double buffering.
pub const DOUBLE_BUFFERED: u32 = 2;

/// Shared memory an epilogue may take beside the staging where the lowering names no more:
/// [`column_sums`]' array (a quarter of the tile).
pub const COLUMN_SUMS_BYTES: u32 = TILE;

/// Shared memory [`store_segment_sums`] takes: the whole tile.
pub const SEGMENT_SUMS_BYTES: u32 = 4 * TILE;

impl Tiling {
    /// The tile for `n` columns: as few idle columns as possible (16, 32 or 64 wide), the
    /// rows making up the rest; wide K slices on tensor cores (on fp32 FMA, whose loop
    /// unrolls a slice's k, a wide slice spills registers on sm_80).
    pub fn for_columns(n: u32, precision: Precision) -> Tiling {
        let bn = n.next_power_of_two().clamp(16, 64);
        Tiling {
            bm: TILE / bn,
            bn,
            bk: if precision.on_tensor_cores() {
                WIDE_SLICE
            } else {
                NARROW_SLICE
            },
            stages: DOUBLE_BUFFERED,
        }
    }

    /// The wide tile for `n` columns on tensor cores ([`WIDE_TILE`]): 32, 64 or 128
    /// columns, the rows making up the rest (512 to 128), wide K slices. Each element a warp
    /// loads feeds 4 mma instead of 2, and a block stages each side's slice for 4 times the
    /// products. It takes twice the registers (2 blocks an SM) and 4 times a tile's shared
    /// memory for per-example segment sums, which it leaves to the narrow tile.
    pub fn wide_for_columns(n: u32) -> Tiling {
        let bn = n.next_power_of_two().clamp(32, 128);
        Tiling {
            bm: WIDE_TILE / bn,
            bn,
            bk: WIDE_SLICE,
            stages: DOUBLE_BUFFERED,
        }
    }

    /// Whether this is a wide tile (warp tiles of 64 × 32).
    pub fn is_wide(&self) -> bool {
        self.bm * self.bn == WIDE_TILE
    }

    /// Shared memory [`column_sums`] takes in this tile: a row of the tile for each of its
    /// slots (a quarter of a tile, an eighth of a wide one).
    pub fn column_sums_bytes(&self) -> u32 {
        if self.is_wide() {
            WIDE_TILE / 2
        } else {
            COLUMN_SUMS_BYTES
        }
    }

    /// Blocks an SM runs of a GEMM kernel in this tile ([`BLOCKS_PER_SM`]; a wide tile's 64
    /// accumulators need 128 registers a thread).
    pub fn blocks_per_sm(&self) -> u32 {
        if self.is_wide() {
            BLOCKS_PER_SM_LARGE
        } else {
            BLOCKS_PER_SM
        }
    }

    /// The slices this tile keeps in flight, of the `asked` (`--stages`): a wide tile stays
    /// double buffered (3 deep, 3xTF32 spilled 48–128 bytes on sm_80 beside its 64
    /// accumulators: ptxas 13.5, VGG16 and ResNet44x2).
    pub fn stages_within(&self, asked: u32) -> u32 {
        if self.is_wide() {
            DOUBLE_BUFFERED
        } else {
            asked
        }
    }

    /// The tile for `m` rows (a weight gradient's output channels): as few idle rows as
    /// possible, 16 to 64 high; narrow K slices. Not higher: a weight gradient stages its
    /// tile's rows of dy for every example, and a 256 × 16 tile stages 8 elements per thread
    /// per slice where 64 × 64 stages 2, and reloads each of dy's rows for 4 times as many
    /// column tiles (VGG16's 256- and 512-channel layers: benches/RESULTS.md).
    pub fn for_rows(m: u32) -> Tiling {
        let bm = m.next_power_of_two().clamp(16, 64);
        Tiling {
            bm,
            bn: TILE / bm,
            bk: NARROW_SLICE,
            stages: DOUBLE_BUFFERED,
        }
    }

    /// This tile with narrow K slices.
    pub fn narrowed(self) -> Tiling {
        Tiling {
            bk: NARROW_SLICE,
            ..self
        }
    }

    /// This tile with wide K slices on tensor cores (for a side staged in few rounds).
    pub fn widened(self, precision: Precision) -> Tiling {
        Tiling {
            bk: if precision.on_tensor_cores() {
                WIDE_SLICE
            } else {
                self.bk
            },
            ..self
        }
    }

    /// This tile with up to `stages` slices in flight where a product gathers both sides:
    /// as many as fit in static shared memory beside `epilogue_bytes` of the kernel's other
    /// arrays, and never fewer than 2 (products with a side staged otherwise stay at 2).
    /// Where not even 2 fit, the slices narrow (a 256 × 16 data-gradient tile with per-example
    /// sums over the batch: 36 KiB of wide slices and 16 KiB of sums).
    pub fn with_stages(self, stages: u32, epilogue_bytes: u32) -> Tiling {
        let room = STATIC_SHARED.saturating_sub(epilogue_bytes);
        let per_stage = |bk: u32| stage_bytes(self.bm, bk) + stage_bytes(self.bn, bk);
        let bk = if DOUBLE_BUFFERED * per_stage(self.bk) > room {
            NARROW_SLICE.min(self.bk)
        } else {
            self.bk
        };
        Tiling {
            bk,
            stages: (room / per_stage(bk)).min(stages).max(DOUBLE_BUFFERED),
            ..self
        }
    }

    pub fn tiles(&self, shape: GemmShape) -> (u32, u32) {
        (shape.m.div_ceil(self.bm), shape.n.div_ceil(self.bn))
    }

    /// The K slices of one product.
    pub fn slices(&self, shape: GemmShape) -> u32 {
        shape.k.div_ceil(self.bk)
    }

    pub fn count(&self, shape: GemmShape) -> u32 {
        let (rows, cols) = self.tiles(shape);
        rows * cols
    }
}

/// Blocks an SM runs of a GEMM kernel: 3 leave 80 registers a thread, which no product of
/// the paper models' GEMMs outgrows (ptxas 13.5, sm_80 and sm_90: no spills, and loops within
/// 1% of the instructions they had at 128). At 2 (128 registers) ptxas took 105–125, an SM
/// ran 16 warps, and the H100 ran these loops at 2–3× their issue bound (benches/RESULTS.md):
/// 24 warps hide more of each slice's wait.
pub(super) const BLOCKS_PER_SM: u32 = 3;

/// [`BLOCKS_PER_SM`] for a kernel that keeps more in registers than one product's
/// accumulators (per-example squares beside the totals; an example's own gradient), which
/// spills at 80 registers.
pub const BLOCKS_PER_SM_LARGE: u32 = 2;

/// Slices staged in lines are `[bk][width + SLICE_PAD]` (gathered slices on fp32 FMA): rows
/// 8 words apart in the banks (widths are multiples of 16 words), so a warp staging k
/// fastest (a few lines at every k of the slice) spreads each line's k over 4 banks, not 1.
pub(super) const SLICE_PAD: u32 = 8;

/// The shared memory one stage of a gathered side of `width` lines takes at slice depth
/// `depth`.
pub fn stage_bytes(width: u32, depth: u32) -> u32 {
    4 * depth * (width + SLICE_PAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The warp deals used: A's rows and B's columns of each warp tile the chooser makes.
    fn deals() -> Vec<Deal> {
        let narrow = [16, 32, 64].map(|bm| Tiling {
            bm,
            bn: TILE / bm,
            bk: WIDE_SLICE,
            stages: DOUBLE_BUFFERED,
        });
        let wide = [32, 64, 128].map(Tiling::wide_for_columns);
        narrow
            .into_iter()
            .chain(wide)
            .flat_map(|tiling| WarpTiles::for_tiling(tiling).deal)
            .collect()
    }

    /// A wide tile's warps cover it: 8 warps of 64 × 32, 64 accumulators a thread.
    #[test]
    fn wide_tiles_hold_eight_warps_of_64_accumulators() {
        for n in [20, 32, 64, 100, 128, 512] {
            let tiling = Tiling::wide_for_columns(n);
            let tiles = WarpTiles::for_tiling(tiling);
            assert!(tiling.is_wide() && tiling.bn >= n.min(128), "{tiling:?}");
            let warps = (tiling.bm / tiles.rows()) * (tiling.bn / tiles.cols());
            assert_eq!(warps, THREADS / 32, "{tiling:?}");
            let accumulators = MMA.c.elements() as u32 * tiles.m * tiles.n;
            assert_eq!(accumulators, 64, "{tiles:?}");
        }
        assert!(!Tiling::for_columns(64, Precision::Tf32).is_wide());
    }

    #[test]
    fn a_deal_gives_each_line_of_the_warp_to_one_lane_group() {
        for deal in deals() {
            let mut lines: Vec<u32> = (0..8)
                .flat_map(|g| deal.pluses().into_iter().map(move |p| deal.run * g + p))
                .collect();
            lines.sort();
            assert_eq!(
                lines,
                (0..8 * deal.per_lane).collect::<Vec<_>>(),
                "{deal:?}"
            );
        }
    }
}
