//! A side staged element by element through an [`Operand`] (`Gathered`): its lines, their
//! index arithmetic split by what it depends on, and the slices' loads and copies, placed in
//! lines on fp32 FMA and in fragment order on tensor cores.

use super::fragment_order::{FragmentOrder, bits_below, emit_swizzle};
use super::*;

/// A side gathered element by element through an [`Operand`] (see [`Side`]), in
/// `[bk][width + SLICE_PAD]` halves of lines on fp32 FMA and in [`FragmentOrder`] on tensor
/// cores.
pub struct Gathered<'o, O: Operand> {
    side: Side,
    operand: &'o O,
    hoisted: Option<Vec<(O::Line, Pred)>>,
    depth: u32,
}

impl<'o, O: Operand> Gathered<'o, O> {
    /// Side `which` of the product, staged `stages` slices at a time (the other side's
    /// count, where that is another staging).
    pub fn new(
        k: &mut KernelBuilder,
        (shape, tiling, place): (GemmShape, Tiling, &TilePlace),
        (which, stages): (Operands, u32),
        k_fastest: bool,
        operand: &'o O,
    ) -> Self {
        let (row_tiles, column_tiles) = tiling.tiles(shape);
        let (width, origin, size, only_tile) = match which {
            Operands::A => (tiling.bm, place.m0, shape.m, row_tiles == 1),
            Operands::B => (tiling.bn, place.n0, shape.n, column_tiles == 1),
        };
        let side = Side::new(
            k,
            (width, tiling.bk, stages),
            (origin, size, only_tile),
            k_fastest,
            place.fragment_order(which, width),
        );
        let hoisted = side.hoisted_lines(k, operand);
        Gathered {
            side,
            operand,
            hoisted,
            depth: shape.k,
        }
    }
}

impl<O: Operand> Staging for Gathered<'_, O> {
    type Fetched = Fetched<O::Fetched>;

    fn k_steps(&self) -> KSteps {
        self.side.k_steps()
    }

    fn thread_lines(&self, k: &mut KernelBuilder, set: &LineSet) -> Vec<LineAt> {
        set.offsets(k, self.k_steps(), |_, first, plus| (first, plus))
    }

    fn slice(&self, k: &mut KernelBuilder, _step: U32, half: U32) -> Slice {
        self.side.slice(k, half)
    }

    fn fetch(&self, k: &mut KernelBuilder, k0: U32, half: U32) -> (Self::Fetched, bool) {
        let fetched = self
            .side
            .fetch(k, self.operand, &self.hoisted, k0, self.depth, half);
        let copies = fetched.copies;
        (fetched, copies)
    }

    fn store(&self, k: &mut KernelBuilder, fetched: &Self::Fetched, half: U32) {
        self.side.store(k, self.operand, fetched, half);
    }

    fn stages(&self) -> u32 {
        self.side.stages
    }

    fn describe(&self) -> &'static str {
        "gathered"
    }

    fn fragment_order(&self) -> Option<FragmentOrder> {
        match self.side.placement {
            Placement::Lines => None,
            Placement::Fragments { order, .. } => Some(order),
        }
    }
}

/// A thread's lines (or steps) of a slice: `lane + r·every` for rounds r in `0..count`, the
/// same register plus a constant per round, so that what a round adds can be an immediate.
#[derive(Clone, Copy)]
pub(super) struct Series {
    pub(super) lane: U32,
    pub(super) every: u32,
    pub(super) count: u32,
}

impl Series {
    pub(super) fn constant(&self, r: usize) -> u32 {
        r as u32 * self.every
    }

    pub(super) fn value(&self, k: &mut KernelBuilder, r: usize) -> U32 {
        k.add_u(self.lane, self.constant(r))
    }

    /// A bound on `lane` in a series over `span` values: below the step between rounds
    /// where there are several (so a round's constant and the lane share no bit).
    fn lane_bound(&self, span: u32) -> u32 {
        if self.count > 1 { self.every } else { span }
    }
}

/// Where a side's elements lie in a slice.
#[derive(Clone, Copy)]
pub(super) enum Placement {
    /// `[depth][width + SLICE_PAD]`: line l at k `kk` at `kk·stride + l` (fp32 FMA).
    Lines,
    /// In [`FragmentOrder`] (tensor cores). `own` is the place of the thread's first line at
    /// its first step; a round's constant place adds to it where it has no bit in `reach`
    /// (the bits `own` can have), and is XORed into it where it has (the order is linear
    /// over the bits of lines and k).
    Fragments {
        order: FragmentOrder,
        own: U32,
        reach: u32,
    },
}

impl Placement {
    /// Words between a line's consecutive k (in lines), or between mma steps over the mma's
    /// k (in fragment order) in a slice of `width` lines.
    fn stride(&self, width: u32) -> u32 {
        match self {
            Placement::Lines => width + SLICE_PAD,
            Placement::Fragments { order, .. } => order.step_words() / MMA.k,
        }
    }
}

/// One operand's side of the tile: `width` lines from `origin` (of `size` in all), staged
/// through `stages` `[depth][width + SLICE_PAD]` slices of shared memory ("halves" where
/// there are two). Element e = tid +
/// r·THREADS of a `[depth][width]` slice (round r) is (`lines` l, `steps` s) for
/// `(l, s) = rounds[r]`: with k fastest, a thread keeps one k and a line per round, otherwise
/// one line and a k per round (a side wider than the block: one line in each block's width of
/// them, at each k in turn). `exists` is false for the threads beyond a slice smaller than
/// the block. Where each element lies is `placement`'s.
pub(super) struct Side {
    pub(super) array: SharedF32,
    pub(super) width: u32,
    pub(super) depth: u32,
    pub(super) stages: u32,
    pub(super) origin: U32,
    pub(super) size: u32,
    pub(super) lines: Series,
    pub(super) steps: Series,
    pub(super) rounds: Vec<(usize, usize)>,
    pub(super) exists: Option<Pred>,
    pub(super) placement: Placement,
}

impl Side {
    /// The side of `width` lines of a tile at `origin` (of `size`), `depth` k per slice;
    /// `only_tile` where the tile is the only one along the lines, so at origin 0; in
    /// `order` where there is one (tensor cores), else in lines.
    pub(super) fn new(
        k: &mut KernelBuilder,
        (width, depth, stages): (u32, u32, u32),
        (origin, size, only_tile): (U32, u32, bool),
        k_fastest: bool,
        order: Option<FragmentOrder>,
    ) -> Side {
        let elements = depth * width;
        let (lanes, across) = if k_fastest {
            (depth, THREADS / depth)
        } else {
            (width, THREADS / width)
        };
        let mut rounds = elements.div_ceil(THREADS);
        if k_fastest && only_tile {
            // rounds whose lines all lie past the matrix stage nothing anyone keeps: the
            // products' columns (rows) there are never stored
            rounds = rounds.min(size.div_ceil(across));
        }
        let tid = k.tid();
        // the thread's first line and step; a whole block's width of lines leaves one step
        // per round, the same in every thread (a constant, not a register)
        let lane = k.ubin(BinOp::Rem, tid, lanes);
        let first = if lanes >= THREADS {
            k.u32(0)
        } else {
            k.ubin(BinOp::Div, tid, lanes)
        };
        let one = |lane| Series {
            lane,
            every: 0,
            count: 1,
        };
        let many = Series {
            lane: first,
            every: across,
            count: rounds,
        };
        let (lines, steps, rounds) = if k_fastest {
            (
                many,
                one(lane),
                (0..rounds as usize).map(|r| (r, 0)).collect(),
            )
        } else if width > THREADS {
            // wider than the block: each step's lines in `width / THREADS` rounds
            let (blocks, steps) = (width / THREADS, depth);
            assert_eq!(blocks * THREADS, width, "lines a multiple of the block");
            let lines = Series {
                lane,
                every: THREADS,
                count: blocks,
            };
            let each_step = Series {
                lane: first,
                every: 1,
                count: steps,
            };
            let rounds = (0..steps as usize)
                .flat_map(|s| (0..blocks as usize).map(move |l| (l, s)))
                .collect();
            (lines, each_step, rounds)
        } else {
            (
                one(lane),
                many,
                (0..rounds as usize).map(|r| (0, r)).collect(),
            )
        };
        let exists = (elements < THREADS).then(|| k.cmp_u(Cmp::Lt, tid, elements));
        let placement = match order {
            None => Placement::Lines,
            Some(order) => Placement::Fragments {
                order,
                own: own_place(k, order, (lines.lane, steps.lane), (width, depth)),
                reach: order.reach(lines.lane_bound(width), steps.lane_bound(depth)),
            },
        };
        Side {
            array: k.shared_aligned(stages * depth * placement.stride(width)),
            width,
            depth,
            stages,
            origin,
            size,
            lines,
            steps,
            rounds,
            exists,
            placement,
        }
    }

    fn stride(&self) -> u32 {
        self.placement.stride(self.width)
    }

    pub(super) fn k_steps(&self) -> KSteps {
        KSteps::even(self.stride())
    }

    /// Stage `half` (0 to `stages` − 1) of the staging area.
    pub(super) fn slice(&self, k: &mut KernelBuilder, half: U32) -> Slice {
        Slice {
            array: self.array,
            base: k.mul_u(half, self.depth * self.stride()),
            depth: self.depth,
            steps: self.k_steps(),
        }
    }

    /// Line `l`'s index, clamped into the matrix, and whether it lies inside.
    pub(super) fn line_index(&self, k: &mut KernelBuilder, l: usize) -> (U32, Pred) {
        let line = self.lines.value(k, l);
        let index = k.add_u(self.origin, line);
        let inside = k.cmp_u(Cmp::Lt, index, self.size);
        (k.ubin(BinOp::Min, index, self.size - 1), inside)
    }

    /// The operand's lines, made once before the loop where the thread has few.
    pub(super) fn hoisted_lines<O: Operand>(
        &self,
        k: &mut KernelBuilder,
        operand: &O,
    ) -> Option<Vec<(O::Line, Pred)>> {
        (self.lines.count as usize <= HOISTED_LINES).then(|| self.make_lines(k, operand))
    }

    pub(super) fn make_lines<O: Operand>(
        &self,
        k: &mut KernelBuilder,
        operand: &O,
    ) -> Vec<(O::Line, Pred)> {
        (0..self.lines.count as usize)
            .map(|l| {
                let (index, inside) = self.line_index(k, l);
                (operand.line(k, index), inside)
            })
            .collect()
    }

    /// Issues the loads and copies of the slice at `k0` (of `depth` in all), the copies into
    /// half `half` of the staging area.
    pub(super) fn fetch<O: Operand>(
        &self,
        k: &mut KernelBuilder,
        operand: &O,
        hoisted: &Option<Vec<(O::Line, Pred)>>,
        k0: U32,
        depth: u32,
        half: U32,
    ) -> Fetched<O::Fetched> {
        let lines = match hoisted {
            Some(lines) => lines.clone(),
            None => self.make_lines(k, operand),
        };
        // the slice after the last (fetched but never used) repeats the last
        let bk = self.depth;
        let last = (depth.div_ceil(bk) - 1) * bk;
        let start = k.ubin(BinOp::Min, k0, last);
        let whole = depth.is_multiple_of(bk);
        let depths: Vec<(O::Depth, Option<Pred>)> = (0..self.steps.count as usize)
            .map(|s| {
                let offset = self.steps.value(k, s);
                let sum = k.add_u(start, offset);
                let (index, in_depth) = if whole {
                    (sum, None)
                } else {
                    let in_depth = k.cmp_u(Cmp::Lt, sum, depth);
                    (k.ubin(BinOp::Min, sum, depth - 1), Some(in_depth))
                };
                let kk = SliceK {
                    start,
                    lane: self.steps.lane,
                    round: self.steps.constant(s),
                    index,
                };
                (operand.depth(k, kk), in_depth)
            })
            .collect();
        let mut fetched = Fetched {
            loaded: Vec::new(),
            copies: false,
        };
        let slice = self.slice(k, half);
        for (round, &(l, s)) in self.rounds.iter().enumerate() {
            let (line, inside) = lines[l];
            let (d, in_depth) = depths[s];
            let inside = match in_depth {
                Some(in_depth) => k.and(inside, in_depth),
                None => inside,
            };
            match operand.fetch(k, line, d, inside) {
                Fetch::Loaded(f) => {
                    debug_assert!(operand.loads(), "an operand that says it copies loaded");
                    fetched.loaded.push((round, f))
                }
                Fetch::Copy { src, exists } => {
                    self.for_existing(k, |k| {
                        let (at, plus) = self.element(k, slice, (l, s));
                        k.copy_async_from(slice.array, at, plus, src, exists);
                    });
                    fetched.copies = true;
                }
            }
        }
        fetched
    }

    /// Where element (line l, step s) sits in `slice`: the thread's place in it and the
    /// round's constant.
    pub(super) fn element(
        &self,
        k: &mut KernelBuilder,
        slice: Slice,
        (l, s): (usize, usize),
    ) -> (U32, u32) {
        let (line, kk) = (self.lines.constant(l), self.steps.constant(s));
        match self.placement {
            Placement::Lines => {
                let at = k.mad_u(self.steps.lane, slice.steps.stride, slice.base);
                let at = k.add_u(at, self.lines.lane);
                (at, kk * slice.steps.stride + line)
            }
            Placement::Fragments { order, own, reach } => {
                // the slice's base lies above every bit of a place in it
                let at = k.add_u(slice.base, own);
                let constant = order.word(line, kk);
                if constant & reach == 0 {
                    (at, constant)
                } else {
                    (k.ubin(BinOp::Xor, at, constant), 0)
                }
            }
        }
    }

    /// Runs `body` in the threads that stage an element.
    pub(super) fn for_existing(
        &self,
        k: &mut KernelBuilder,
        body: impl FnOnce(&mut KernelBuilder),
    ) {
        match self.exists {
            Some(exists) => k.when(exists, body),
            None => body(k),
        }
    }

    /// Finishes the loaded elements into half `half` of the staging area.
    pub(super) fn store<O: Operand>(
        &self,
        k: &mut KernelBuilder,
        operand: &O,
        fetched: &Fetched<O::Fetched>,
        half: U32,
    ) {
        if fetched.loaded.is_empty() {
            return;
        }
        self.for_existing(k, |k| {
            let slice = self.slice(k, half);
            for &(round, f) in &fetched.loaded {
                let v = operand.finish(k, f);
                let (at, plus) = self.element(k, slice, self.rounds[round]);
                k.store_shared_plus(slice.array, at, plus, v);
            }
        });
    }
}

/// The place in `order` of line `line` at k `kk` (registers below `width` and `depth`): the
/// sum of their fields, swizzled.
fn own_place(
    k: &mut KernelBuilder,
    order: FragmentOrder,
    (line, kk): (U32, U32),
    (width, depth): (u32, u32),
) -> U32 {
    let mut place = k.u32(0);
    let fields = [
        (line, order.line_fields(bits_below(width))),
        (kk, order.k_fields(bits_below(depth))),
    ];
    for (x, fields) in fields {
        for f in fields {
            let shifted = k.ubin(BinOp::Shr, x, f.shift);
            let field = k.ubin(BinOp::And, shifted, (1u32 << f.bits) - 1);
            place = k.mad_u(field, f.weight, place);
        }
    }
    emit_swizzle(k, place)
}
