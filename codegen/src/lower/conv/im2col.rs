//! Operands gathered element by element: the input's im2col windows (`Positions`, `Taps`)
//! and the data gradient's spread of dy (`Spread`).

use super::*;

/// The im2col matrix of input `x` for example `n`, with the BN-apply + ReLU prologue applied
/// if any: element (output position p = (oy, ox), column (c, ki, kj)) is
/// `x[n][c][oy·stride + ki − pad][ox·stride + kj − pad]`, zero in the padding. What depends
/// on the position ([`Window`]) and on the column ([`Tap`]) is made apart; their offsets add
/// up to the element's (u32 arithmetic modulo 2³², exact where the pixel exists).
pub(super) struct Im2col<'a> {
    pub(super) g: &'a Geometry,
    pub(super) x: U64,
    /// The product's example's start (rows per example), or 0 (rows over the batch: each
    /// window adds its own).
    pub(super) example: Idx,
    pub(super) prologue: Option<PrologueSource>,
    pub(super) order: Order,
    pub(super) rows: Rows,
}

/// An output position's window: its top-left input pixel (which may lie in the padding:
/// "negative" coordinates wrap) and that pixel's offset in the example.
#[derive(Clone, Copy)]
pub(super) struct Window {
    pub(super) y0: U32,
    pub(super) x0: U32,
    pub(super) offset: U32,
}

/// A weight column (c, ki, kj): the channel, the kernel tap, the tap's offset `ki·w + kj`
/// and the channel's `c·h·w` as a register and a constant (`Column`).
#[derive(Clone, Copy)]
pub(super) struct Tap {
    pub(super) c: U32,
    pub(super) ki: U32,
    pub(super) kj: U32,
    pub(super) spatial: U32,
    pub(super) channel_offset: U32,
    pub(super) channel_round: u32,
}

/// A loaded pixel (of an input with a prologue; without, pixels are copied): its value and
/// its channel, or the channel count where the element is padding or outside the matrix.
/// The prologue is read only when finishing: three values, or a predicate, held across a
/// slice's products for every element would take the registers the products need.
#[derive(Clone, Copy)]
pub(super) struct Pixel {
    pub(super) value: F32,
    pub(super) channel: U32,
}

impl<'a> Im2col<'a> {
    pub(super) fn new(
        k: &mut KernelBuilder,
        g: &'a Geometry,
        x: U64,
        prologue: Option<PrologueSource>,
        (n, tiling, rows): (U32, Tiling, Rows),
    ) -> Self {
        let n = rows.product_example(k, n);
        let example = example_start(k, n, g.c * g.h * g.w);
        Im2col {
            g,
            x,
            example,
            prologue,
            order: Order::choose(g.c, tiling, false, g.kernel_area()),
            rows,
        }
    }

    /// The window of output position `p` (of the product's example), or, with rows over the
    /// batch, of row `p`, its example's start in its offset.
    pub(super) fn window(&self, k: &mut KernelBuilder, p: U32) -> Window {
        let g = self.g;
        let zero = k.u32(0);
        let (n, p) = self.rows.split(k, p, zero);
        let (oy, ox) = (k.ubin(BinOp::Div, p, g.wo), k.ubin(BinOp::Rem, p, g.wo));
        let (y0, x0) = (g.window_start(k, oy), g.window_start(k, ox));
        let offset = k.mad_u(y0, g.w, x0);
        let offset = k.mad_u(n, g.c * g.h * g.w, offset);
        Window { y0, x0, offset }
    }

    /// Column `kk` of the im2col matrix, in the K order of the forward convolution.
    pub(super) fn depth_tap(&self, k: &mut KernelBuilder, kk: SliceK) -> Tap {
        let column = self.order.split(k, kk, self.g.kernel_area());
        self.tap(k, column)
    }

    /// Weight column `column` (channel-major: the weight gradient's columns).
    pub(super) fn column_tap(&self, k: &mut KernelBuilder, column: U32) -> Tap {
        let column = Column::channel_major(k, column, self.g.kernel_area());
        self.tap(k, column)
    }

    pub(super) fn tap(&self, k: &mut KernelBuilder, column: Column) -> Tap {
        let g = self.g;
        let (ki, kj) = g.tap_position(k, column.tap);
        Tap {
            c: column.channel(k),
            ki,
            kj,
            spatial: k.mad_u(ki, g.w, kj),
            channel_offset: k.mul_u(column.lane, g.h * g.w),
            channel_round: column.round * g.h * g.w,
        }
    }

    pub(super) fn fetch(
        &self,
        k: &mut KernelBuilder,
        window: Window,
        tap: Tap,
        inside: Pred,
    ) -> Fetch<Pixel> {
        let g = self.g;
        let iy = k.add_u(window.y0, tap.ki);
        let ix = k.add_u(window.x0, tap.kj);
        let row_ok = k.cmp_u(Cmp::Lt, iy, g.h);
        let col_ok = k.cmp_u(Cmp::Lt, ix, g.w);
        let exists = k.and(row_ok, col_ok);
        // the pixel's place in its channel, the same for every channel of a one-tap slice (grouped K);
        // clamped where it does not exist
        let pixel = k.add_u(window.offset, tap.spatial);
        let pixel = k.select_u(exists, pixel, 0u32);
        // the channel's plane in the example: one sum per line where lines outlive slices
        // (the weight gradient's columns)
        let channel = k.idx(tap.channel_offset);
        let plane = k.idx_add(self.example, channel);
        let pixel = k.idx(pixel);
        let at = k.idx_add(plane, pixel);
        let src = k.element_ptr(self.x, at).plus(tap.channel_round);
        let exists = k.and(exists, inside);
        if self.prologue.is_none() {
            return Fetch::Copy { src, exists };
        }
        Fetch::Loaded(Pixel {
            value: k.load_from(src),
            channel: k.select_u(exists, tap.c, g.c),
        })
    }

    pub(super) fn finish(&self, k: &mut KernelBuilder, pixel: Pixel) -> F32 {
        let source = self
            .prologue
            .as_ref()
            .expect("only pixels with a prologue are loaded");
        // channel C's pair is (0, 0): padding comes out relu(x·0 + 0) = 0, x being a real
        // (clamped) pixel; were it infinite or NaN, so would the BN statistics be
        Prologue::load(k, source, pixel.channel).apply(k, pixel.value)
    }
}

/// The im2col matrix as A (lines are output positions): the forward convolution's.
pub(super) struct Positions<'a>(pub(super) Im2col<'a>);

impl Operand for Positions<'_> {
    type Line = Window;
    type Depth = Tap;
    type Fetched = Pixel;

    fn line(&self, k: &mut KernelBuilder, p: U32) -> Window {
        self.0.window(k, p)
    }

    fn depth(&self, k: &mut KernelBuilder, kk: SliceK) -> Tap {
        self.0.depth_tap(k, kk)
    }

    fn fetch(&self, k: &mut KernelBuilder, window: Window, tap: Tap, inside: Pred) -> Fetch<Pixel> {
        self.0.fetch(k, window, tap, inside)
    }

    fn finish(&self, k: &mut KernelBuilder, pixel: Pixel) -> F32 {
        self.0.finish(k, pixel)
    }

    fn loads(&self) -> bool {
        self.0.prologue.is_some()
    }
}

/// The im2col matrix as B, transposed (lines are weight columns, k runs over output
/// positions): the weight gradient's.
pub(super) struct Taps<'a>(pub(super) Im2col<'a>);

impl Operand for Taps<'_> {
    type Line = Tap;
    type Depth = Window;
    type Fetched = Pixel;

    fn line(&self, k: &mut KernelBuilder, column: U32) -> Tap {
        self.0.column_tap(k, column)
    }

    fn depth(&self, k: &mut KernelBuilder, p: SliceK) -> Window {
        self.0.window(k, p.index)
    }

    fn fetch(&self, k: &mut KernelBuilder, tap: Tap, window: Window, inside: Pred) -> Fetch<Pixel> {
        self.0.fetch(k, window, tap, inside)
    }

    fn finish(&self, k: &mut KernelBuilder, pixel: Pixel) -> F32 {
        self.0.finish(k, pixel)
    }

    fn loads(&self) -> bool {
        self.0.prologue.is_some()
    }
}

/// dy of example `n` as the data gradient's A: element (input position p = (iy, ix), column
/// (o, ki, kj)) is `dy[n][o][oy][ox]` at the output position whose window puts tap (ki, kj)
/// on p, `oy = (iy + pad − ki) / stride` where that divides and lies in `0..ho` (likewise
/// ox); zero where no window does.
pub(super) struct Spread<'a> {
    pub(super) g: &'a Geometry,
    pub(super) dy: U64,
    /// As `Im2col::example`.
    pub(super) example: Idx,
    pub(super) order: Order,
    pub(super) rows: Rows,
}

/// An input position shifted by the padding, `(iy + pad, ix + pad)`, and, with rows over the
/// batch, its example's start in dy.
#[derive(Clone, Copy)]
pub(super) struct Lead {
    pub(super) y: U32,
    pub(super) x: U32,
    pub(super) example: U32,
}

/// A column (o, ki, kj) of the data gradient's K: the tap and output channel o's offset, as
/// a register and a constant (`Column`).
#[derive(Clone, Copy)]
pub(super) struct OutputTap {
    pub(super) ki: U32,
    pub(super) kj: U32,
    pub(super) offset: U32,
    pub(super) round: u32,
}

impl Spread<'_> {
    /// The output coordinate `(lead − offset) / stride` and whether it exists: `lead <
    /// offset` wraps to a huge value, which fails the range check.
    pub(super) fn coordinate(
        &self,
        k: &mut KernelBuilder,
        lead: U32,
        offset: U32,
        size: u32,
    ) -> (U32, Pred) {
        let shifted = k.ubin(BinOp::Sub, lead, offset);
        let stride = self.g.stride;
        if stride == 1 {
            return (shifted, k.cmp_u(Cmp::Lt, shifted, size));
        }
        let out = k.ubin(BinOp::Div, shifted, stride);
        let rem = k.ubin(BinOp::Rem, shifted, stride);
        let divides = k.cmp_u(Cmp::Eq, rem, 0u32);
        let inside = k.cmp_u(Cmp::Lt, out, size);
        (out, k.and(divides, inside))
    }
}

impl Operand for Spread<'_> {
    type Line = Lead;
    type Depth = OutputTap;
    type Fetched = Infallible;

    fn line(&self, k: &mut KernelBuilder, p: U32) -> Lead {
        let g = self.g;
        let zero = k.u32(0);
        let (n, p) = self.rows.split(k, p, zero);
        let (iy, ix) = (k.ubin(BinOp::Div, p, g.w), k.ubin(BinOp::Rem, p, g.w));
        Lead {
            y: k.add_u(iy, g.pad),
            x: k.add_u(ix, g.pad),
            example: k.mul_u(n, g.o * g.ho * g.wo),
        }
    }

    fn depth(&self, k: &mut KernelBuilder, kk: SliceK) -> OutputTap {
        let g = self.g;
        let column = self.order.split(k, kk, g.kernel_area());
        let (ki, kj) = g.tap_position(k, column.tap);
        OutputTap {
            ki,
            kj,
            offset: k.mul_u(column.lane, g.ho * g.wo),
            round: column.round * g.ho * g.wo,
        }
    }

    fn fetch(
        &self,
        k: &mut KernelBuilder,
        lead: Lead,
        tap: OutputTap,
        inside: Pred,
    ) -> Fetch<Infallible> {
        let g = self.g;
        let (oy, row_ok) = self.coordinate(k, lead.y, tap.ki, g.ho);
        let (ox, col_ok) = self.coordinate(k, lead.x, tap.kj, g.wo);
        let exists = k.and(row_ok, col_ok);
        // as with Im2col: the same position for every output channel of a one-tap slice (grouped K)
        let position = k.mad_u(oy, g.wo, ox);
        let position = k.add_u(position, lead.example);
        let position = k.select_u(exists, position, 0u32);
        let at = k.add_u(position, tap.offset);
        let at = k.idx(at);
        let at = k.idx_add(self.example, at);
        Fetch::Copy {
            src: k.element_ptr(self.dy, at).plus(tap.round),
            exists: k.and(exists, inside),
        }
    }

    fn finish(&self, _k: &mut KernelBuilder, never: Infallible) -> F32 {
        match never {}
    }

    fn loads(&self) -> bool {
        false
    }
}
