//! The weight gradient's input patch staged in shared memory, each pixel once (`Patch`),
//! and where it fits (`PatchDims`).

use super::*;

/// The weight gradient's B (the im2col matrix transposed: lines are weight columns
/// (c, ki, kj), k the output positions) staged as the input patch a K slice reads, where a
/// slice's positions are whole output rows or part of one (`bk` divides the output width,
/// or the width divides `bk`): for the slice's output rows, `rows = (runs − 1)·stride + kh`
/// input rows × `span = (run − 1)·stride + kw` columns of each channel the tile's columns
/// touch, `run` = min(bk, wo) positions per output row, `runs` = bk / run rows. Each pixel
/// is copied (or loaded and its prologue applied) once per slice rather than once per tap
/// (9 times for 3×3), by index arithmetic made once per block; column (c, ki, kj) at the
/// slice's position (qy, qx) is then `patch[c − c₀][qy·stride + ki][qx·stride + kj]`, so the
/// multiply's lines are offsets into the patch and its k step through it ([`KSteps`]). The
/// block's layout of it is made once ([`PatchLayout`]), each example's product stages its
/// own x ([`Patch`]).
pub(super) struct PatchLayout<'a> {
    pub(super) g: &'a Geometry,
    pub(super) dims: PatchDims,
    pub(super) array: SharedF32,
    /// The tile's first column and its channel c₀.
    pub(super) first_column: U32,
    pub(super) first_channel: U32,
    pub(super) elements: Vec<PatchElement>,
    /// Where the thread's columns start in a half ([`Staging::thread_lines`]).
    pub(super) lines: Vec<LineAt>,
}

/// The patch of one example's x: `source` is its channel c₀.
pub(super) struct Patch<'a> {
    pub(super) layout: &'a PatchLayout<'a>,
    pub(super) source: GlobalF32,
}

/// A patch's sizes: `channels` planes of `rows × span`, staged in `rounds` of the block's
/// threads (a half holds `rounds·THREADS` words, so that no thread needs a branch); `run`
/// positions of a slice per output row.
#[derive(Clone, Copy)]
pub(super) struct PatchDims {
    pub(super) channels: u32,
    pub(super) rows: u32,
    pub(super) span: u32,
    pub(super) run: u32,
    pub(super) rounds: u32,
    pub(super) depth: u32,
    pub(super) columns: u32,
    /// Slices staged at once (a patch of at most [`PATCH_ROUNDS`] rounds and dy's slice fit
    /// in shared memory 4 deep).
    pub(super) stages: u32,
}

/// Rounds of patch elements a thread keeps the index arithmetic of (registers).
pub(super) const PATCH_ROUNDS: u32 = 4;

/// A row past every input: where a patch element's channel does not exist, its row lies
/// there, so that the window check alone leaves it zero.
pub(super) const NO_ROW: u32 = 1 << 30;

impl PatchDims {
    /// The patch of weight-gradient `shape` in `tiling`, if its slices are whole output
    /// rows or parts of one, of at least 4 positions (the mma's k lanes step evenly through
    /// 4), and it takes few rounds.
    /// Staged `stages` slices at a time where it is copied; 2 where its pixels are loaded
    /// for a prologue (`loads`), which holds them in registers one step either way.
    pub(super) fn choose(
        g: &Geometry,
        (tiling, shape): (Tiling, GemmShape),
        (stages, loads): (u32, bool),
    ) -> Option<PatchDims> {
        let (area, bk) = (g.kernel_area(), tiling.bk);
        let run = g.wo.min(bk);
        let aligned = g.wo.is_multiple_of(bk) || bk.is_multiple_of(g.wo);
        // the most channels bn consecutive columns touch
        let channels = ((tiling.bn - 1) / area + 2).min(g.c);
        let rows = (bk / run - 1) * g.stride + g.kh;
        let span = (run - 1) * g.stride + g.kw;
        let rounds = (channels * rows * span).div_ceil(THREADS);
        let fits = area > 1 && aligned && run.is_multiple_of(4) && rounds <= PATCH_ROUNDS;
        fits.then_some(PatchDims {
            channels,
            rows,
            span,
            run,
            rounds,
            depth: bk,
            columns: shape.n,
            stages: if loads { DOUBLE_BUFFERED } else { stages },
        })
    }

    pub(super) fn words(&self) -> u32 {
        self.rounds * THREADS
    }

    /// Where a column's k lie in the patch: `stride` apart along an output row, the next row
    /// `stride` input rows down.
    pub(super) fn steps(&self, g: &Geometry) -> KSteps {
        KSteps {
            stride: g.stride,
            run: self.run,
            run_stride: g.stride * self.span,
        }
    }
}

/// A patch element a thread stages at every slice: its row (or `NO_ROW`) and column in the
/// patch, its offset from the patch's corner in the input (from channel c₀), and its
/// channel's prologue.
pub(super) struct PatchElement {
    pub(super) row: U32,
    pub(super) col: U32,
    pub(super) offset: U32,
    pub(super) prologue: Option<Prologue>,
}

impl<'a> PatchLayout<'a> {
    /// The block's patch: where its threads' elements lie, made once for every example.
    pub(super) fn new(
        k: &mut KernelBuilder,
        g: &'a Geometry,
        dims: PatchDims,
        place: &TilePlace,
        prologue: Option<&PrologueSource>,
    ) -> Self {
        let first_column = place.first_column();
        let first_channel = k.ubin(BinOp::Div, first_column, g.kernel_area());
        let tid = k.tid();
        let plane = dims.rows * dims.span;
        let elements = (0..dims.rounds)
            .map(|r| {
                let e = k.add_u(tid, r * THREADS);
                let pc = k.ubin(BinOp::Div, e, plane);
                let within = k.ubin(BinOp::Rem, e, plane);
                let (row, col) = (
                    k.ubin(BinOp::Div, within, dims.span),
                    k.ubin(BinOp::Rem, within, dims.span),
                );
                // elements past the input's channels or past the patch stage zeros (no line
                // reads them, but their loads would leave x)
                let channel = k.add_u(first_channel, pc);
                let exists = k.cmp_u(Cmp::Lt, channel, g.c);
                let in_patch = k.cmp_u(Cmp::Lt, pc, dims.channels);
                let exists = k.and(exists, in_patch);
                let offset = k.mad_u(row, g.w, col);
                let offset = k.mad_u(pc, g.h * g.w, offset);
                // channel C's pair is (0, 0)
                let prologue = prologue.map(|source| {
                    let c = k.ubin(BinOp::Min, channel, g.c);
                    Prologue::load(k, source, c)
                });
                PatchElement {
                    row: k.select_u(exists, row, NO_ROW),
                    col,
                    offset,
                    prologue,
                }
            })
            .collect();
        let mut layout = PatchLayout {
            g,
            dims,
            array: k.shared(dims.stages * dims.words()),
            first_column,
            first_channel,
            elements,
            lines: Vec::new(),
        };
        // the thread's columns are the same in every example's product
        let set = place.line_set(k, Operands::B);
        layout.lines = set.offsets(k, dims.steps(g), |k, first, plus| {
            layout.line_offset(k, first, plus)
        });
        layout
    }

    /// Where column `first + plus` of the tile starts in a half.
    pub(super) fn line_offset(&self, k: &mut KernelBuilder, first: U32, plus: u32) -> (U32, u32) {
        let (g, dims) = (self.g, self.dims);
        // a column past the weights reads the last one's (its products are never stored)
        let column = k.add_u(self.first_column, first);
        let column = k.add_u(column, plus);
        let column = k.ubin(BinOp::Min, column, dims.columns - 1);
        let c = k.ubin(BinOp::Div, column, g.kernel_area());
        let tap = k.ubin(BinOp::Rem, column, g.kernel_area());
        let (ki, kj) = g.tap_position(k, tap);
        let pc = k.ubin(BinOp::Sub, c, self.first_channel);
        let row = k.mad_u(pc, dims.rows, ki);
        (k.mad_u(row, dims.span, kj), 0)
    }

    /// The patch of example `n` of input `x`.
    pub(super) fn for_example(&'a self, k: &mut KernelBuilder, x: U64, n: U32) -> Patch<'a> {
        let g = self.g;
        let example = example_start(k, n, g.c * g.h * g.w);
        let channel = k.mul_u(self.first_channel, g.h * g.w);
        let channel = k.idx(channel);
        let at = k.idx_add(example, channel);
        Patch {
            layout: self,
            source: k.element_ptr(x, at),
        }
    }
}

impl Patch<'_> {
    /// Stage `half` of the staging area.
    pub(super) fn half(&self, k: &mut KernelBuilder, half: U32) -> Slice {
        let dims = self.layout.dims;
        Slice {
            array: self.layout.array,
            base: k.mul_u(half, dims.words()),
            steps: self.layout.dims.steps(self.layout.g),
            depth: dims.depth,
        }
    }
}

impl Staging for Patch<'_> {
    /// Per element round: the loaded pixel, or NaN where none exists (the prologue's ReLU,
    /// `max`, returns its other operand for NaN: zero).
    type Fetched = Vec<F32>;

    fn k_steps(&self) -> KSteps {
        self.layout.dims.steps(self.layout.g)
    }

    fn thread_lines(&self, _k: &mut KernelBuilder, _set: &LineSet) -> Vec<LineAt> {
        self.layout.lines.clone()
    }

    fn slice(&self, k: &mut KernelBuilder, _step: U32, half: U32) -> Slice {
        self.half(k, half)
    }

    fn fetch(&self, k: &mut KernelBuilder, k0: U32, half: U32) -> (Vec<F32>, bool) {
        let g = self.layout.g;
        // the slice after the last (fetched, never used) lies past the output: every pixel
        // is checked anyway
        let oy = k.ubin(BinOp::Div, k0, g.wo);
        let ox = k.ubin(BinOp::Rem, k0, g.wo);
        // the patch's corner in the input
        let (y0, x0) = (g.window_start(k, oy), g.window_start(k, ox));
        let corner = k.mad_u(y0, g.w, x0);
        let slice = self.half(k, half);
        let tid = k.tid();
        let at = k.add_u(slice.base, tid);
        let mut loaded = Vec::new();
        for (r, element) in self.layout.elements.iter().enumerate() {
            let iy = k.add_u(y0, element.row);
            let ix = k.add_u(x0, element.col);
            let row_ok = k.cmp_u(Cmp::Lt, iy, g.h);
            let col_ok = k.cmp_u(Cmp::Lt, ix, g.w);
            let exists = k.and(row_ok, col_ok);
            let offset = k.add_u(corner, element.offset);
            let plus = r as u32 * THREADS;
            if element.prologue.is_none() {
                let offset = k.select_u(exists, offset, 0u32);
                let src = k.element_ptr_past(self.source, offset);
                k.copy_async_from(slice.array, at, plus, src, exists);
                continue;
            }
            let value = k.f32(f32::NAN);
            k.when(exists, |k| {
                let src = k.element_ptr_past(self.source, offset);
                let pixel = k.load_from(src);
                k.assign(value, pixel);
            });
            loaded.push(value);
        }
        // without a prologue, every element went by cp.async
        let copies = loaded.is_empty();
        (loaded, copies)
    }

    fn stages(&self) -> u32 {
        self.layout.dims.stages
    }

    fn describe(&self) -> &'static str {
        "patch"
    }

    fn store(&self, k: &mut KernelBuilder, fetched: &Vec<F32>, half: U32) {
        if fetched.is_empty() {
            return;
        }
        let slice = self.half(k, half);
        let tid = k.tid();
        let at = k.add_u(slice.base, tid);
        for (r, (&pixel, element)) in fetched.iter().zip(&self.layout.elements).enumerate() {
            let prologue = element.prologue.as_ref().expect("loaded with a prologue");
            let value = prologue.apply(k, pixel);
            k.store_shared_plus(slice.array, at, r as u32 * THREADS, value);
        }
    }
}
