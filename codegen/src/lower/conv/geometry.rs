//! A convolution's sizes (`Geometry`) and how its GEMM meets them: the order of K's
//! columns (`Order`, `Column`) and how the rows meet the batch (`Rows`).

use super::*;

/// Sizes of one convolution: input `c × h × w`, output `o × ho × wo`, `kh × kw` kernel.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    pub(super) batch: u32,
    pub(super) c: u32,
    pub(super) h: u32,
    pub(super) w: u32,
    pub(super) o: u32,
    pub(super) ho: u32,
    pub(super) wo: u32,
    pub(super) kh: u32,
    pub(super) kw: u32,
    pub(super) stride: u32,
    pub(super) pad: u32,
}

impl Geometry {
    pub(super) fn new(
        x: &[usize],
        weight: &[usize],
        y: &[usize],
        stride: usize,
        pad: usize,
    ) -> Geometry {
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

    pub(super) fn kernel_area(&self) -> u32 {
        self.kh * self.kw
    }

    /// The first input row (column) of output row (column) `out`'s window: "negative"
    /// (wrapped) where it lies in the padding.
    pub(super) fn window_start(&self, k: &mut KernelBuilder, out: U32) -> U32 {
        let scaled = k.mul_u(out, self.stride);
        k.ubin(BinOp::Sub, scaled, self.pad)
    }

    /// (kernel row, kernel column) of a tap `ki·kw + kj`.
    pub(super) fn tap_position(&self, k: &mut KernelBuilder, tap: U32) -> (U32, U32) {
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
pub(super) enum Order {
    ChannelMajor,
    Grouped { depth: u32, area: u32 },
}

impl Order {
    /// Grouped where the channels fill whole K slices (always where a halo stages A: its
    /// groups are `bk` channels), else channel-major; `area` taps a channel.
    pub(super) fn choose(channels: u32, tiling: Tiling, halo: bool, area: u32) -> Order {
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
    pub(super) fn group_and_tap(k: &mut KernelBuilder, slice: U32, area: u32) -> (U32, U32) {
        (
            k.ubin(BinOp::Div, slice, area),
            k.ubin(BinOp::Rem, slice, area),
        )
    }

    /// The column of K at `kk` (`area` taps a channel).
    pub(super) fn split(self, k: &mut KernelBuilder, kk: SliceK, area: u32) -> Column {
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
pub(super) struct Column {
    pub(super) lane: U32,
    pub(super) round: u32,
    pub(super) tap: U32,
}

impl Column {
    /// Column `index` of a channel-major K (the weights' own order), `area` taps a channel.
    pub(super) fn channel_major(k: &mut KernelBuilder, index: U32, area: u32) -> Column {
        Column {
            lane: k.ubin(BinOp::Div, index, area),
            round: 0,
            tap: k.ubin(BinOp::Rem, index, area),
        }
    }

    pub(super) fn channel(&self, k: &mut KernelBuilder) -> U32 {
        k.add_u(self.lane, self.round)
    }
}

/// How the rows of a forward or data-gradient GEMM (an example's positions) meet the batch:
/// one product per example (block y), or, where an example's positions would fill little of
/// a tile (VGG16's 4×4 and 2×2 layers: 16 and 4 of 64 rows), rows over every example's
/// positions, `n·positions + p`. Where an epilogue squares per-example sums, only where a
/// tile holds whole examples (its sums then go per example, `store_segment_sums`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rows {
    PerExample,
    Batched { positions: u32 },
}

impl Rows {
    pub(super) fn choose(positions: u32, tiling: Tiling, per_example_sums: bool) -> Rows {
        let whole_examples = tiling.bm.is_multiple_of(positions);
        if positions < tiling.bm && (whole_examples || !per_example_sums) {
            Rows::Batched { positions }
        } else {
            Rows::PerExample
        }
    }

    /// The GEMM's rows for `positions` per example.
    pub(super) fn count(self, positions: u32, batch: u32) -> u32 {
        match self {
            Rows::PerExample => positions,
            Rows::Batched { .. } => batch * positions,
        }
    }

    /// The launch's grid for `tiles` tiles per product.
    pub(super) fn grid(self, tiles: u32, batch: u32) -> [u32; 2] {
        match self {
            Rows::PerExample => [tiles, batch],
            Rows::Batched { .. } => [tiles, 1],
        }
    }

    /// The example whose start the operands add to every element: the product's, block y
    /// `n`; or none (0) where every row carries its own.
    pub(super) fn product_example(self, k: &mut KernelBuilder, n: U32) -> U32 {
        match self {
            Rows::PerExample => n,
            Rows::Batched { .. } => k.u32(0),
        }
    }

    /// (example, position) of `row` in the product of example `n` (block y).
    pub(super) fn split(self, k: &mut KernelBuilder, row: U32, n: U32) -> (U32, U32) {
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
    pub(super) fn tile_rows(self, row_tiles: u32, batch: u32, channels: u32) -> TileRows {
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
