//! An input halo staged in shared memory a channel group at a time (`Halo`): the forward's
//! input, a stride-1 data gradient's dy; and where it fits (`HaloDims`).

use super::*;

/// The forward convolution's A (the im2col matrix: lines are the tile's output positions, k
/// the (channel, tap) pairs in `Order::Grouped`) staged as the input halo the tile's windows
/// cover, a group of `bk` channels at a time, where the tile holds whole output rows:
/// `rows = (tile rows − 1)·stride + kh` input rows × `span = (wo − 1)·stride + kw` columns
/// of each of the group's channels. Each pixel is copied (or loaded and its prologue
/// applied) once for all `area` taps rather than once per tap. A group's slices are its taps:
/// position (py, px) of the tile, tap (ki, kj), the group's channel c is
/// `halo[c][py·stride + ki][px·stride + kj]`, so a slice's base adds its tap's offset and the
/// multiply's lines are offsets of positions. The fetch of a group's first slice stages the
/// whole group, into the half the group before did not use. A stride-1 data gradient's A
/// is staged the same way from dy, its taps flipped ([`HaloOf`]).
pub(super) struct Halo<'a> {
    pub(super) g: &'a Geometry,
    pub(super) dims: HaloDims,
    pub(super) array: SharedF32,
    /// The source (x, or dy) at the product's example.
    pub(super) example: GlobalF32,
    /// The thread's places in a channel plane, the same for every channel and group.
    pub(super) places: Vec<HaloPlace>,
    pub(super) prologue: Option<PrologueSource>,
}

/// Place `q = tid + j·THREADS` of a halo's channel plane (round j): whether it lies in the
/// plane's `rows × span` (`in_plane`, where a round runs past them), whether its pixel lies
/// in the source (0 or 1: a register, not a predicate, held across the loop), and the pixel's
/// offset in a channel of the source (0 where none).
pub(super) struct HaloPlace {
    pub(super) in_plane: Option<Pred>,
    pub(super) inside: U32,
    pub(super) pixel: U32,
}

/// A halo's sizes: channel planes of `rows × span` words, `plane` apart (padded); a group of
/// `depth` channels, staged plane place by plane place in `rounds` of the block's threads
/// (each all the group's channels), into one half or two (where there are several groups).
#[derive(Clone, Copy)]
pub(super) struct HaloDims {
    pub(super) frame: HaloFrame,
    /// Examples a tile holds whole (rows over the batch), or 1 (rows of one example).
    pub(super) examples: u32,
    pub(super) depth: u32,
    pub(super) area: u32,
    pub(super) groups: u32,
    pub(super) tile_rows: u32,
    pub(super) rows: u32,
    pub(super) span: u32,
    pub(super) plane: u32,
    pub(super) rounds: u32,
    pub(super) halves: u32,
    /// Slices of the weights in flight beside it.
    pub(super) stages: u32,
}

/// The most shared words a halo takes (both halves): with the weights' slices (at most
/// 2 · 16 · (64 + 8) words) and the statistics' column sums (at most 16 · 64), within the
/// 48 KiB (12288 words) of static shared memory.
pub(super) const HALO_WORDS: u32 = 8960;

/// Which tensor a halo stages, and how the GEMM's rows and taps meet it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum HaloOf {
    /// The forward's input x: output position (oy, ox) at tap (ki, kj) reads
    /// `x[oy·stride + ki − pad][ox·stride + kj − pad]`.
    Input,
    /// The data gradient's dy, at stride 1: input position (iy, ix) at tap (ki, kj) reads
    /// `dy[iy + pad − ki][ix + pad − kj]`, the taps flipped.
    OutputGradient,
}

/// The halo's source as a GEMM's rows see it: `channels` planes of `height × width`, rows
/// of `row_width` positions `stride` apart in the source, the halo's first row `shift` rows
/// after the tile's first row times the stride (and its first column `shift` columns in).
#[derive(Clone, Copy)]
pub(super) struct HaloFrame {
    pub(super) channels: u32,
    pub(super) height: u32,
    pub(super) width: u32,
    pub(super) row_width: u32,
    pub(super) stride: u32,
    pub(super) shift: i64,
    pub(super) flipped: bool,
}

impl HaloFrame {
    pub(super) fn new(g: &Geometry, of: HaloOf) -> HaloFrame {
        match of {
            HaloOf::Input => HaloFrame {
                channels: g.c,
                height: g.h,
                width: g.w,
                row_width: g.wo,
                stride: g.stride,
                shift: -(g.pad as i64),
                flipped: false,
            },
            HaloOf::OutputGradient => HaloFrame {
                channels: g.o,
                height: g.ho,
                width: g.wo,
                row_width: g.w,
                stride: 1,
                shift: g.pad as i64 - (g.kh as i64 - 1),
                flipped: true,
            },
        }
    }
}

impl HaloDims {
    /// The halo of a forward convolution's input or a stride-1 data gradient's dy in
    /// `tiling`, if its tiles hold whole rows of one example (or, with rows over the batch,
    /// whole examples), its channels fill whole groups and it fits: within [`HALO_WORDS`],
    /// and with the weights' slices, `stages` deep (or 2), and `epilogue_bytes` of the
    /// kernel's other arrays, within static shared memory.
    pub(super) fn choose(
        g: &Geometry,
        (tiling, rows): (Tiling, Rows),
        of: HaloOf,
        (stages, epilogue_bytes): (u32, u32),
    ) -> Option<HaloDims> {
        let frame = HaloFrame::new(g, of);
        let (depth, area) = (tiling.bk, g.kernel_area());
        let (examples, tile_rows) = match rows {
            Rows::PerExample if tiling.bm.is_multiple_of(frame.row_width) => {
                (1, tiling.bm / frame.row_width)
            }
            Rows::Batched { positions } if tiling.bm.is_multiple_of(positions) => {
                (tiling.bm / positions, positions / frame.row_width)
            }
            _ => return None,
        };
        let square = g.kh == g.kw; // one shift serves rows and columns
        let strided = of == HaloOf::OutputGradient && g.stride != 1;
        if !frame.channels.is_multiple_of(depth) || area == 1 || !square || strided {
            return None;
        }
        let rows = (tile_rows - 1) * frame.stride + g.kh;
        let span = (frame.row_width - 1) * frame.stride + g.kw;
        // an example's rows × span in each channel plane; an A fragment load reads 8
        // positions (adjacent at stride 1) of 4 channels: planes 8 banks apart keep the 32
        // words in 32 banks
        let used = examples * rows * span;
        let plane = if frame.stride == 1 {
            used.next_multiple_of(16) | 8
        } else {
            used
        };
        let rounds = used.div_ceil(THREADS);
        let groups = frame.channels / depth;
        // dy is copied: with several groups, its halo's per-slice work costs what it saves
        // (loop estimate: ResNet44's 32- and 64-channel data gradients even or 1% slower)
        if of == HaloOf::OutputGradient && groups > 1 {
            return None;
        }
        let halves = groups.min(2);
        let halo_bytes = 4 * halves * depth * plane;
        let fits = |stages: u32| {
            halo_bytes + stages * stage_bytes(tiling.bn, depth) + epilogue_bytes <= STATIC_SHARED
        };
        // the next group is staged `stages − 1` slices ahead, while its half is still read
        // unless the group before has ended: a group's taps must outnumber that
        let stages = [stages, DOUBLE_BUFFERED]
            .into_iter()
            .find(|&s| (s == DOUBLE_BUFFERED || area >= s - 1) && fits(s))?;
        (halves * depth * plane <= HALO_WORDS).then_some(HaloDims {
            frame,
            examples,
            depth,
            area,
            groups,
            tile_rows,
            rows,
            span,
            plane,
            rounds,
            halves,
            stages,
        })
    }

    pub(super) fn words(&self) -> u32 {
        self.depth * self.plane
    }

    pub(super) fn steps(&self) -> KSteps {
        KSteps::even(self.plane)
    }
}

impl<'a> Halo<'a> {
    /// The halo of example `n`'s product at `place`.
    pub(super) fn new(
        k: &mut KernelBuilder,
        g: &'a Geometry,
        dims: HaloDims,
        (x, prologue): (U64, Option<PrologueSource>),
        (place, n): (&TilePlace, U32),
    ) -> Self {
        let f = dims.frame;
        let per_example = f.channels * f.height * f.width;
        // the tile's first example and its first output row there
        let (first, first_row) = if dims.examples > 1 {
            let first = k.mul_u(place.tile_row, dims.examples);
            (first, k.u32(0))
        } else {
            (n, k.mul_u(place.tile_row, dims.tile_rows))
        };
        let example = example_start(k, first, per_example);
        let scaled = k.mul_u(first_row, f.stride);
        // the halo's first row and column ("negative", wrapped, in the padding)
        let shift = f.shift as i32 as u32;
        let top = k.add_u(scaled, shift);
        let tid = k.tid();
        let block = dims.rows * dims.span;
        let places = (0..dims.rounds)
            .map(|j| {
                let q = k.add_u(tid, j * THREADS);
                let in_plane = ((j + 1) * THREADS > dims.examples * block)
                    .then(|| k.cmp_u(Cmp::Lt, q, dims.examples * block));
                let e = k.ubin(BinOp::Div, q, block);
                let within = k.ubin(BinOp::Rem, q, block);
                let row = k.ubin(BinOp::Div, within, dims.span);
                let col = k.ubin(BinOp::Rem, within, dims.span);
                let iy = k.add_u(top, row);
                let ix = k.add_u(col, shift);
                let row_ok = k.cmp_u(Cmp::Lt, iy, f.height);
                let col_ok = k.cmp_u(Cmp::Lt, ix, f.width);
                let inside = k.and(row_ok, col_ok);
                // a tile's examples past the batch have no pixels
                let n = k.add_u(first, e);
                let in_batch = k.cmp_u(Cmp::Lt, n, g.batch);
                let inside = k.and(inside, in_batch);
                let pixel = k.mad_u(iy, f.width, ix);
                let pixel = k.mad_u(e, per_example, pixel);
                HaloPlace {
                    in_plane,
                    inside: k.select_u(inside, 1u32, 0u32),
                    pixel: k.select_u(inside, pixel, 0u32),
                }
            })
            .collect();
        Halo {
            g,
            dims,
            array: k.shared(dims.halves * dims.words()),
            example: k.element_ptr(x, example),
            places,
            prologue,
        }
    }

    /// Where group `group`'s half starts.
    pub(super) fn group_half(&self, k: &mut KernelBuilder, group: U32) -> U32 {
        if self.dims.halves == 1 {
            return k.u32(0);
        }
        let parity = k.ubin(BinOp::And, group, 1u32);
        k.mul_u(parity, self.dims.words())
    }

    /// Stages group `group` into its half: each of the thread's plane places in every
    /// channel of the group (the channel's offsets constants).
    pub(super) fn stage(&self, k: &mut KernelBuilder, group: U32) {
        let dims = self.dims;
        let half = self.group_half(k, group);
        let tid = k.tid();
        let at = k.add_u(half, tid);
        let plane = dims.frame.height * dims.frame.width;
        let first_channel = k.mul_u(group, dims.depth);
        let channels = k.mul_u(first_channel, plane);
        // channel c's (scale, shift) at pairs + 2c
        let pairs = self.prologue.map(|source| {
            let first = k.mul_u(first_channel, 2u32);
            k.element_ptr(source.pairs, first)
        });
        for (j, place) in self.places.iter().enumerate() {
            let stage_place = |k: &mut KernelBuilder| {
                let inside = k.cmp_u(Cmp::Ne, place.inside, 0u32);
                let offset = k.add_u(channels, place.pixel);
                let src = k.element_ptr_past(self.example, offset);
                for c in 0..dims.depth {
                    let (src, plus) = (src.plus(c * plane), j as u32 * THREADS + c * dims.plane);
                    match pairs {
                        None => k.copy_async_from(self.array, at, plus, src, inside),
                        Some(pairs) => {
                            let prologue = Prologue::at(k, pairs.plus(2 * c));
                            let pixel = k.load_from(src);
                            let value = prologue.apply(k, pixel);
                            let value = k.select(inside, value, 0.0f32);
                            k.store_shared_plus(self.array, at, plus, value);
                        }
                    }
                }
            };
            match place.in_plane {
                Some(in_plane) => k.when(in_plane, stage_place),
                None => stage_place(k),
            }
        }
    }
}

impl Staging for Halo<'_> {
    type Fetched = ();

    fn k_steps(&self) -> KSteps {
        self.dims.steps()
    }

    /// Position p of the tile at tap (0, 0): `(p / wo)·stride` rows and `(p % wo)·stride`
    /// columns into the halo.
    fn thread_lines(&self, k: &mut KernelBuilder, set: &LineSet) -> Vec<LineAt> {
        let (dims, f) = (self.dims, self.dims.frame);
        let positions = dims.tile_rows * f.row_width;
        set.offsets(k, dims.steps(), |k, first, plus| {
            let p = k.add_u(first, plus);
            // the example's block of rows (with rows over the batch), then the row
            let e = k.ubin(BinOp::Div, p, positions);
            let p = k.ubin(BinOp::Rem, p, positions);
            let py = k.ubin(BinOp::Div, p, f.row_width);
            let px = k.ubin(BinOp::Rem, p, f.row_width);
            let row = k.mul_u(py, f.stride);
            let row = k.mad_u(e, dims.rows, row);
            let row = k.mul_u(row, dims.span);
            (k.mad_u(px, f.stride, row), 0)
        })
    }

    fn slice(&self, k: &mut KernelBuilder, step: U32, _half: U32) -> Slice {
        let (g, dims) = (self.g, self.dims);
        let (group, tap) = Order::group_and_tap(k, step, dims.area);
        let tap = if dims.frame.flipped {
            let last = k.u32(dims.area - 1);
            k.ubin(BinOp::Sub, last, tap)
        } else {
            tap
        };
        let (ki, kj) = g.tap_position(k, tap);
        let half = self.group_half(k, group);
        let row = k.mad_u(ki, dims.span, half);
        Slice {
            array: self.array,
            base: k.add_u(row, kj),
            steps: dims.steps(),
            depth: dims.depth,
        }
    }

    /// Slice `k0` stages its group where it is the group's first.
    fn fetch(&self, k: &mut KernelBuilder, k0: U32, _half: U32) -> ((), bool) {
        let dims = self.dims;
        let slice = k.ubin(BinOp::Div, k0, dims.depth);
        let (group, tap) = Order::group_and_tap(k, slice, dims.area);
        let first = k.cmp_u(Cmp::Eq, tap, 0u32);
        let exists = k.cmp_u(Cmp::Lt, group, dims.groups);
        let starts = k.and(first, exists);
        k.when(starts, |k| self.stage(k, group));
        ((), self.prologue.is_none())
    }

    fn store(&self, _k: &mut KernelBuilder, _fetched: &(), _half: U32) {}

    fn staged_every(&self) -> u32 {
        self.dims.area
    }

    /// A halo is staged once per channel group, in halves of its own, `stages − 1` slices
    /// ahead like the weights beside it.
    fn stages(&self) -> u32 {
        self.dims.stages
    }

    fn describe(&self) -> &'static str {
        "halo"
    }
}
