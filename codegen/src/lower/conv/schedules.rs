//! How each of a convolution's three GEMMs runs, chosen in one place from its geometry and
//! the lowering options, apart from the code that emits it: the block tile and K slice
//! (`schedule::Tiling`), how rows meet the batch ([`Rows`]), how the gathered side is staged
//! (an input or dy halo, [`HaloDims`]; an input patch, [`PatchDims`]; else element by
//! element) and the order K runs in ([`Order`]); for the weight gradient, how the batch is
//! split. Each part's own rule lives with the part; this file says which parts a GEMM asks,
//! in which order, and what each decision depends on.

use super::*;
use crate::options::{LowerOptions, Precision};

/// The forward convolution's GEMM, C[p][o] (positions by output channels), or the data
/// gradient's, C[p][c] (input positions by input channels): one schedule, two choosers.
#[derive(Clone, Copy)]
pub(super) struct PositionsSchedule {
    pub(super) tiling: Tiling,
    pub(super) rows: Rows,
    /// A: the input's halo (forward) or dy's (a stride-1 data gradient) where it fits, else
    /// its gathered elements.
    pub(super) halo: Option<HaloDims>,
    pub(super) order: Order,
}

impl PositionsSchedule {
    /// The forward's. Columns (output channels) decide the tile, wide on tensor cores; the
    /// tile's height whether rows run over the batch; both whether the input halo fits
    /// beside the statistics epilogue's sums. Where a prologue is applied to the input
    /// (`prologue`), its gathered elements wait in registers while a slice multiplies: a
    /// wide tile then takes narrow slices (8 elements a thread, not 16: at 16, 3xTF32
    /// spilled 32 bytes on sm_80, ptxas 13.5).
    pub(super) fn forward(g: &Geometry, options: LowerOptions, prologue: bool) -> Self {
        let tiling = columns_tile(g.o, options.precision);
        let tiling = if prologue && tiling.is_wide() {
            tiling.narrowed()
        } else {
            tiling
        };
        let epilogue_bytes = tiling.column_sums_bytes();
        let stages = tiling.stages_within(options.stages);
        let tiling = tiling.with_stages(stages, epilogue_bytes);
        let rows = Rows::choose(g.ho * g.wo, tiling, false);
        let budget = (stages, epilogue_bytes);
        let halo = HaloDims::choose(g, (tiling, rows), HaloOf::Input, budget);
        PositionsSchedule {
            tiling,
            rows,
            halo,
            order: Order::choose(g.c, tiling, halo.is_some(), g.kernel_area()),
        }
    }

    /// The data gradient's. Columns (input channels) decide the tile, wide on tensor cores
    /// where no BN-backward epilogue is fused (`epilogue`: it holds each element's dz and x̂
    /// beside the 64 accumulators, and spills at 128 registers: 232–248 bytes in VGG16's,
    /// ptxas 13.5 sm_90); rows run over the batch where an epilogue's per-example sums
    /// allow (`per_example_sums`: only where a tile holds whole examples); the epilogue's
    /// shared memory (segment sums or column sums) bounds the staging: dy's halo where it
    /// fits, else gathered slices as deep as the rest allows (narrower where even two would
    /// not fit).
    pub(super) fn dgrad(
        g: &Geometry,
        options: LowerOptions,
        (epilogue, per_example_sums): (bool, bool),
    ) -> Self {
        let tiling = if epilogue {
            Tiling::for_columns(g.c, options.precision)
        } else {
            columns_tile(g.c, options.precision)
        };
        let rows = Rows::choose(g.h * g.w, tiling, per_example_sums);
        let epilogue_bytes = match rows {
            Rows::Batched { .. } if per_example_sums => SEGMENT_SUMS_BYTES,
            _ => tiling.column_sums_bytes(),
        };
        let stages = tiling.stages_within(options.stages);
        let budget = (stages, epilogue_bytes);
        let halo = HaloDims::choose(g, (tiling, rows), HaloOf::OutputGradient, budget);
        let tiling = match halo {
            Some(_) => tiling,
            None => tiling.with_stages(stages, epilogue_bytes),
        };
        PositionsSchedule {
            tiling,
            rows,
            halo,
            order: Order::choose(g.o, tiling, halo.is_some(), g.kernel_area()),
        }
    }
}

/// The tile of a forward or data-gradient GEMM of `n` columns: wide on tensor cores where
/// the columns fill its warps' 32 (16 would leave half of every mma idle).
fn columns_tile(n: u32, precision: Precision) -> Tiling {
    if precision.on_tensor_cores() && n >= 32 {
        Tiling::wide_for_columns(n)
    } else {
        Tiling::for_columns(n, precision)
    }
}

/// The weight gradient's GEMM: C[o][e] (output channels by the weight's columns), K the
/// example's positions, one product per example of a block's chunk of the batch.
#[derive(Clone, Copy)]
pub(super) struct WgradSchedule {
    pub(super) tiling: Tiling,
    /// B: the input's patch where slices lie in output rows, else its im2col elements.
    pub(super) patch: Option<PatchDims>,
    /// Chunks of the batch, one block row each.
    pub(super) chunks: u32,
}

impl WgradSchedule {
    /// Rows (output channels) decide the tile; the input patch is staged where it fits, in
    /// wide K slices where those fit (narrow ones else), else the input is gathered as deep
    /// as shared memory allows; the batch splits into chunks where the weights alone give
    /// few tiles. `prologue`: the patch's pixels are loaded for a prologue, not copied.
    pub(super) fn choose(
        g: &Geometry,
        shape: GemmShape,
        options: LowerOptions,
        prologue: bool,
    ) -> WgradSchedule {
        let narrow = Tiling::for_rows(g.o);
        let staging = (options.stages, prologue);
        let (tiling, patch) = [narrow.widened(options.precision), narrow]
            .into_iter()
            .find_map(|t| Some((t, Some(PatchDims::choose(g, (t, shape), staging)?))))
            .unwrap_or_else(|| {
                let gathered = narrow.with_stages(options.stages, COLUMN_SUMS_BYTES);
                (gathered, None)
            });
        WgradSchedule {
            tiling,
            patch,
            chunks: batch_chunks(tiling.count(shape) as u64, g.batch),
        }
    }
}

/// Blocks a weight-gradient launch aims for: enough to fill a GPU (132 SMs on an H100) when
/// the weights alone give few tiles.
const WGRAD_TARGET_BLOCKS: u64 = 1024;

/// How many chunks of the batch the weight gradient splits into, given the blocks of one
/// chunk: one block row per chunk, so that layers with few weights still run on many blocks.
fn batch_chunks(blocks: u64, batch: u32) -> u32 {
    let wanted = WGRAD_TARGET_BLOCKS.div_ceil(blocks).clamp(1, batch as u64) as u32;
    // equal chunks, none empty
    batch.div_ceil(batch.div_ceil(wanted))
}

#[cfg(test)]
mod tests {
    use super::batch_chunks;

    #[test]
    fn weight_gradients_split_the_batch_only_where_weights_are_few() {
        // resnet44's first stage: 16 × 144 weights in one tile; 1024 chunks of 4 examples
        assert_eq!(batch_chunks(1, 4096), 1024);
        // vgg16's widest layer (512 × 4608 weights: 576 tiles of 64 × 64) takes 2 chunks
        assert_eq!(batch_chunks(576, 4096), 2);
        assert_eq!(batch_chunks(2048, 4096), 1);
        // never more chunks than examples, never an empty one
        assert_eq!(batch_chunks(1, 3), 3);
        assert_eq!(batch_chunks(1, 1), 1);
        for batch in [5u32, 100, 1000, 4097] {
            let chunks = batch_chunks(3, batch);
            let chunk = batch.div_ceil(chunks);
            assert!(
                (chunks - 1) * chunk < batch,
                "batch {batch}: {chunks} chunks of {chunk}"
            );
        }
    }
}
