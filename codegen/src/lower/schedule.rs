//! How a GEMM runs, chosen apart from the code that runs it: the block's threads, its tile
//! of C and K slice ([`Tiling`], chosen from the problem's shape and the precision), a
//! warp's tile of tensor-core instructions ([`WarpTiles`], of the instruction [`MMA`]), how
//! many slices are in flight, how a staged slice is laid out ([`SLICE_PAD`]) and how many
//! blocks share an SM. [`super::gemm`] emits what these say; each kernel records what was
//! chosen (`kir::GemmSchedule`). How a convolution's side is staged (patch, halo) is chosen
//! beside its staging in [`super::conv`].

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

/// A warp's tile on tensor cores, in mma tiles of 16 × 8: 2 × 2, or 1 × 4 where the block
/// tile is only 16 rows high (a weight gradient of 16 output channels). Either way a thread
/// holds 16 accumulators: `2·m` rows by `2·n` columns.
#[derive(Clone, Copy, Debug)]
pub(super) struct WarpTiles {
    pub(super) m: u32,
    pub(super) n: u32,
}

impl WarpTiles {
    pub(super) fn for_tiling(tiling: Tiling) -> WarpTiles {
        if tiling.bm >= 32 {
            WarpTiles { m: 2, n: 2 }
        } else {
            WarpTiles { m: 1, n: 4 }
        }
    }

    pub(super) fn rows(self) -> u32 {
        MMA.m * self.m
    }

    pub(super) fn cols(self) -> u32 {
        MMA.n * self.n
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

/// Shared slices are `[bk][width + SLICE_PAD]`: rows 8 words apart in the banks, so the mma
/// fragment loads (8 lines × 4 k per instruction) hit 32 different banks.
pub(super) const SLICE_PAD: u32 = 8;

/// The shared memory one stage of a gathered side of `width` lines takes at slice depth
/// `depth`.
pub fn stage_bytes(width: u32, depth: u32) -> u32 {
    4 * depth * (width + SLICE_PAD)
}
