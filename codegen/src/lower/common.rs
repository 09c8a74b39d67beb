//! Pieces every lowering uses: kernel naming, launch shapes, the map and per-plane kernel
//! skeletons, batch-norm arithmetic (written in the reference's order of operations, so the
//! results agree bit for bit where no reduction reorders a sum), and helper kernels (zeroing,
//! BN finalize).

use fisherc_ir::ops::{NoisySgdUpdate, Op, Squares};
use fisherc_ir::tensor::TensorType;

use super::{BLOCK, Buf, Launch, LaunchArg, LowerOptions};
use crate::builder::{F32, Idx, KernelBuilder, PARAM_SPACE, Pred, U32, U64, param_bytes};
use crate::kir::{BinOp, Cmp, Kernel, ParamTy, WARP};

/// Most blocks a grid-stride kernel launches along x.
const MAX_BLOCKS: u64 = 1 << 16;

/// The node being lowered.
pub struct Cx<'a> {
    pub op: &'a Op,
    pub inputs: &'a [&'a TensorType],
    pub outputs: &'a [TensorType],
    pub options: LowerOptions,
    specialisation: u64,
}

impl<'a> Cx<'a> {
    pub fn new(
        op: &'a Op,
        inputs: &'a [&'a TensorType],
        outputs: &'a [TensorType],
        options: LowerOptions,
    ) -> Self {
        let op_key = serde_json::to_string(&kernel_key(op)).unwrap_or_default();
        let key = format!("{op_key}|{inputs:?}|{outputs:?}");
        Cx {
            op,
            inputs,
            outputs,
            options,
            specialisation: fnv1a(key.as_bytes()),
        }
    }

    /// A kernel name unique to this op, these attributes and these shapes.
    pub fn name(&self, part: &str) -> String {
        format!(
            "{}_{part}_{:012x}",
            self.op.name(),
            self.specialisation & 0xffff_ffff_ffff
        )
    }

    /// [`Self::name`] for a kernel whose code depends on the [`LowerOptions`]: other options,
    /// another name (the default options keep the plain name).
    pub fn name_with_options(&self, part: &str) -> String {
        if self.options == LowerOptions::default() {
            return self.name(part);
        }
        let key = format!("{:x}|{}", self.specialisation, self.options.name_key());
        format!(
            "{}_{part}_{:012x}",
            self.op.name(),
            fnv1a(key.as_bytes()) & 0xffff_ffff_ffff
        )
    }

    /// Whether some tensor has more elements than u32 indices reach.
    pub fn wide(&self) -> bool {
        self.inputs
            .iter()
            .copied()
            .chain(self.outputs)
            .any(|t| t.numel() as u64 > u32::MAX as u64)
    }

    pub fn builder(&self, part: &str) -> KernelBuilder {
        KernelBuilder::new(self.name(part), BLOCK, self.wide())
    }
}

/// The op as far as its kernels depend on it: attributes passed as launch arguments erased.
fn kernel_key(op: &Op) -> Op {
    match op {
        Op::NoisySgdUpdate(update) => Op::NoisySgdUpdate(NoisySgdUpdate {
            param: 0,
            ..update.clone()
        }),
        other => other.clone(),
    }
}

/// A stable 64-bit FNV-1a hash (kernel names must not change between builds).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// A grid-stride grid for `n` elements.
pub fn grid_for(n: u64) -> [u32; 2] {
    [n.div_ceil(BLOCK as u64).clamp(1, MAX_BLOCKS) as u32, 1]
}

pub fn launch(kernel: Kernel, grid: [u32; 2], args: Vec<LaunchArg>) -> Launch {
    Launch { kernel, grid, args }
}

pub fn input(i: usize) -> LaunchArg {
    LaunchArg::Buf(Buf::Input(i))
}

pub fn output(i: usize) -> LaunchArg {
    LaunchArg::Buf(Buf::Output(i))
}

pub fn scratch(i: usize) -> LaunchArg {
    LaunchArg::Buf(Buf::Scratch(i))
}

/// `[N, C, positions...]` as N·C planes.
#[derive(Clone, Copy, Debug)]
pub struct Planes {
    pub batch: u64,
    pub channels: u64,
    pub positions: u64,
}

impl Planes {
    pub fn of(t: &TensorType) -> Planes {
        Planes {
            batch: t.shape[0] as u64,
            channels: t.shape.get(1).copied().unwrap_or(1) as u64,
            positions: t.shape.get(2..).map_or(1, |s| s.iter().product::<usize>()) as u64,
        }
    }

    /// Whether [`per_plane`] gives each plane one warp (planes of at most
    /// [`WARP_PLANE_POSITIONS`] positions, several to a block) rather than a whole block: at
    /// batch 4096 a block per plane makes 262,144 blocks of 64 busy threads at 8×8, and 2
    /// million of 4 at 2×2, far below the memory's bandwidth.
    pub fn per_warp(&self) -> bool {
        self.positions <= WARP_PLANE_POSITIONS
    }

    /// The grid of [`per_plane`]: a block per `BLOCK / WARP` planes, in order, or a block per
    /// plane (x = channel, y = example).
    pub fn grid(&self) -> [u32; 2] {
        if self.per_warp() {
            let planes = self.batch * self.channels;
            [planes.div_ceil(PLANES_PER_BLOCK as u64) as u32, 1]
        } else {
            [self.channels as u32, self.batch as u32]
        }
    }

    /// Channel of flat element `i`.
    pub fn channel(&self, k: &mut KernelBuilder, i: Idx) -> U32 {
        let plane = k.idx_div_const(i, self.positions);
        let c = k.idx_rem_const(plane, self.channels);
        k.idx_to_u32(c)
    }
}

/// (example, channel, row, column) of flat index `i` into an `[N, channels, rows, columns]`
/// tensor.
pub fn unflatten(k: &mut KernelBuilder, i: Idx, [channels, rows, columns]: [u64; 3]) -> [Idx; 4] {
    let column = k.idx_rem_const(i, columns);
    let rest = k.idx_div_const(i, columns);
    let row = k.idx_rem_const(rest, rows);
    let plane = k.idx_div_const(rest, rows);
    let channel = k.idx_rem_const(plane, channels);
    let example = k.idx_div_const(plane, channels);
    [example, channel, row, column]
}

/// `Σⱼ a[a0 + j·a_step]·b[b0 + j·b_step]` over `len` terms: one fp32 FMA chain, in order.
pub fn strided_dot(
    k: &mut KernelBuilder,
    (a, a0, a_step): (U64, Idx, u64),
    (b, b0, b_step): (U64, Idx, u64),
    len: u64,
) -> F32 {
    let acc = k.f32(0.0);
    let start = k.idx_const(0);
    let one = k.idx_const(1);
    k.for_idx(start, len, one, |k, j| {
        let ai = k.idx_mad(j, a_step, a0);
        let bi = k.idx_mad(j, b_step, b0);
        let (va, vb) = (k.load(a, ai), k.load(b, bi));
        k.fma_into(acc, va, vb);
    });
    acc
}

/// A kernel skeleton: `f` for every element of `0..n`, grid-stride.
pub fn map(k: &mut KernelBuilder, n: u64, f: impl FnOnce(&mut KernelBuilder, Idx)) {
    k.for_each_element(n, f);
}

/// A kernel skeleton with one warp or one block per (channel, example) plane
/// (`grid = planes.grid()`, [`Planes::per_warp`]): each thread runs
/// `element(k, flat index, position, channel, example)` for its positions and returns terms;
/// the warp or block sums every term and its first thread runs
/// `finish(k, totals, channel, example)`.
pub fn per_plane(
    k: &mut KernelBuilder,
    planes: Planes,
    element: impl FnOnce(&mut KernelBuilder, Idx, U32, U32, U32) -> Vec<F32>,
    finish: impl FnOnce(&mut KernelBuilder, &[F32], U32, U32),
) {
    let tid = k.tid();
    if !planes.per_warp() {
        let (c, n) = (k.block_x(), k.block_y());
        let totals = plane_terms(k, planes, (c, n), (tid, BLOCK), element, |k, sums| {
            k.block_sum(sums)
        });
        let first = k.cmp_u(Cmp::Eq, tid, 0u32);
        k.when(first, |k| finish(k, &totals, c, n));
        return;
    }
    let (block, lane) = (k.block_x(), k.ubin(BinOp::Rem, tid, WARP));
    let warp = k.ubin(BinOp::Div, tid, WARP);
    let plane = k.mad_u(block, PLANES_PER_BLOCK, warp);
    let exists = k.cmp_u(Cmp::Lt, plane, (planes.batch * planes.channels) as u32);
    // a whole warp or none: the shuffles see every lane
    k.when(exists, |k| {
        let n = k.ubin(BinOp::Div, plane, planes.channels as u32);
        let c = k.ubin(BinOp::Rem, plane, planes.channels as u32);
        let totals = plane_terms(k, planes, (c, n), (lane, WARP), element, |k, sums| {
            sums.iter().map(|&v| k.warp_sum(v)).collect()
        });
        let first = k.cmp_u(Cmp::Eq, lane, 0u32);
        k.when(first, |k| finish(k, &totals, c, n));
    });
}

/// The terms of plane (`c`, `n`) summed over its positions by `threads` threads (this one
/// `first`, then every `threads`-th), and over the threads by `sum`.
fn plane_terms(
    k: &mut KernelBuilder,
    planes: Planes,
    (c, n): (U32, U32),
    (first, threads): (U32, u32),
    element: impl FnOnce(&mut KernelBuilder, Idx, U32, U32, U32) -> Vec<F32>,
    sum: impl FnOnce(&mut KernelBuilder, &[F32]) -> Vec<F32>,
) -> Vec<F32> {
    let n_idx = k.idx(n);
    let c_idx = k.idx(c);
    let plane = k.idx_mad(n_idx, planes.channels, c_idx);
    let base = k.idx_mul_const(plane, planes.positions);
    let start = k.idx(first);
    let step = k.idx_const(threads as u64);
    // the sums live across the loop, so they are made before it; `element` says how many it uses
    let accumulators: Vec<F32> = (0..MAX_TERMS).map(|_| k.f32(0.0)).collect();
    let mut terms = 0;
    k.for_idx(start, planes.positions, step, |k, p| {
        let i = k.idx_add(base, p);
        let position = k.idx_to_u32(p);
        let values = element(k, i, position, c, n);
        assert!(
            values.len() <= MAX_TERMS,
            "a per-plane kernel sums at most {MAX_TERMS} terms"
        );
        terms = values.len();
        for (acc, v) in accumulators.iter().zip(&values) {
            k.accumulate(*acc, *v);
        }
    });
    if terms == 0 {
        Vec::new()
    } else {
        sum(k, &accumulators[..terms])
    }
}

/// Largest plane [`per_plane`] gives a warp rather than a block (32 elements a lane).
const WARP_PLANE_POSITIONS: u64 = 1024;

/// Planes of a block where each plane has a warp.
const PLANES_PER_BLOCK: u32 = BLOCK / WARP;

/// Most terms a per-plane kernel sums.
const MAX_TERMS: usize = 4;

/// Per-channel statistics in device memory: pointers to mean, var, γ, β.
#[derive(Clone, Copy)]
pub struct BnParams {
    pub mean: U64,
    pub var: U64,
    pub gamma: U64,
    pub beta: U64,
    pub eps: f32,
}

impl BnParams {
    /// Declares the kernel parameters mean, var, gamma, beta (in that order).
    pub fn declare(k: &mut KernelBuilder, eps: f32) -> BnParams {
        BnParams {
            mean: k.ptr_param("mean"),
            var: k.ptr_param("var"),
            gamma: k.ptr_param("gamma"),
            beta: k.ptr_param("beta"),
            eps,
        }
    }
}

/// `1/√(var + ε)` for channel `c` (as the reference computes it).
pub fn inv_std(k: &mut KernelBuilder, var: U64, c: U32, eps: f32) -> F32 {
    let v = k.load(var, c);
    let shifted = k.add(v, eps);
    let root = k.sqrt(shifted);
    k.div(1.0f32, root)
}

/// x̂ = (x − mean)·invstd.
pub fn normalised(k: &mut KernelBuilder, x: F32, mean: U64, var: U64, c: U32, eps: f32) -> F32 {
    let inv = inv_std(k, var, c, eps);
    let m = k.load(mean, c);
    let centred = k.sub(x, m);
    k.mul(centred, inv)
}

/// `γ·x̂ + β`, in the reference's order: `(x − mean)·(γ·invstd) + β`.
pub fn bn_apply(k: &mut KernelBuilder, x: F32, p: &BnParams, c: U32) -> F32 {
    let inv = inv_std(k, p.var, c, p.eps);
    let g = k.load(p.gamma, c);
    let scale = k.mul(g, inv);
    let m = k.load(p.mean, c);
    let centred = k.sub(x, m);
    let scaled = k.mul(centred, scale);
    let b = k.load(p.beta, c);
    k.add(scaled, b)
}

/// How a per-channel output combines the per-plane partial sums of one term over the batch.
#[derive(Clone, Copy, Debug)]
pub enum Combine {
    /// Σₙ partial.
    Sum(usize),
    /// (Σₙ partial) / count.
    Mean(usize, u64),
    /// Σₙ partial².
    SumOfSquares(usize),
    /// Σₙ sums / count, then Σₙ squares / count − mean²: a biased variance from Σy and Σy².
    Variance {
        sums: usize,
        squares: usize,
        count: u64,
    },
}

/// Bytes of the partial sums of `terms` terms over every plane.
pub fn partials_bytes(planes: Planes, terms: usize) -> u64 {
    4 * terms as u64 * planes.batch * planes.channels
}

/// Stores a plane's totals (thread 0 of a per-plane block): `partials[t][n][c]`.
pub fn store_partials(
    k: &mut KernelBuilder,
    partials: U64,
    planes: Planes,
    totals: &[F32],
    c: U32,
    n: U32,
) {
    let plane = k.mad_u(n, planes.channels as u32, c);
    for (t, &total) in totals.iter().enumerate() {
        let plane = k.idx(plane);
        let at = k.idx_add_const(plane, t as u64 * planes.batch * planes.channels);
        k.store(partials, at, total);
    }
}

/// A kernel of one thread per channel that combines the partials over the batch, example by
/// example in order: reductions without atomics, so every run gives the same bits.
pub fn combine_channels(
    cx: &Cx,
    part: &str,
    planes: Planes,
    partials: LaunchArg,
    outputs: &[(Combine, LaunchArg)],
) -> Launch {
    let rows = TileRows {
        examples: planes.batch,
        tiles: 1,
        channels: planes.channels,
    };
    combine_tiles(cx, part, rows, partials, outputs)
}

/// Per-channel partial sums of several tiles per example: `partials[t][n·tiles + tile][c]`.
#[derive(Clone, Copy, Debug)]
pub struct TileRows {
    pub examples: u64,
    pub tiles: u64,
    pub channels: u64,
}

impl TileRows {
    pub fn rows(&self) -> u64 {
        self.examples * self.tiles
    }

    /// Bytes of `terms` terms.
    pub fn bytes(&self, terms: usize) -> u64 {
        4 * terms as u64 * self.rows() * self.channels
    }
}

/// [`combine_channels`] over tiles: each example's tiles are added first (in order), so a
/// per-example square squares the example's whole sum. One block per channel: thread `j`
/// takes examples `j, j + BLOCK, …` in order and the block adds the threads' sums in a fixed
/// tree, so every run gives the same bits. One thread per channel, looping over the whole
/// batch, would leave a few channels' threads working through every example alone.
pub fn combine_tiles(
    cx: &Cx,
    part: &str,
    rows: TileRows,
    partials: LaunchArg,
    outputs: &[(Combine, LaunchArg)],
) -> Launch {
    let mut k = cx.builder(&format!("combine_{part}"));
    let source = k.ptr_param("partials");
    let outs: Vec<U64> = (0..outputs.len())
        .map(|j| k.ptr_param(&format!("out{j}")))
        .collect();
    let sums = distinct_sums(outputs);
    let stride = rows.rows() * rows.channels;
    let (c, tid) = (k.block_x(), k.tid());
    let c_idx = k.idx(c);
    let accumulators: Vec<F32> = sums.iter().map(|_| k.f32(0.0)).collect();
    let (start, step) = (k.idx(tid), k.idx_const(BLOCK as u64));
    k.for_idx(start, rows.examples, step, |k, n| {
        // example n's tiles' slots in term 0; each term's lie `stride` further per term
        let first_row = k.idx_mul_const(n, rows.tiles);
        let slots: Vec<Idx> = (0..rows.tiles)
            .map(|tile| {
                let row = k.idx_add_const(first_row, tile);
                k.idx_mad(row, rows.channels, c_idx)
            })
            .collect();
        for (&(t, square), &total) in sums.iter().zip(&accumulators) {
            let example = k.f32(0.0);
            for &slot in &slots {
                let at = k.idx_add_const(slot, t as u64 * stride);
                let v = k.load(source, at);
                k.accumulate(example, v);
            }
            if square {
                k.fma_into(total, example, example);
            } else {
                k.accumulate(total, example);
            }
        }
    });
    let totals = k.block_sum(&accumulators);
    let first = k.cmp_u(Cmp::Eq, tid, 0u32);
    k.when(first, |k| {
        let sum = |(t, square): (usize, bool)| {
            totals[sums.iter().position(|&s| s == (t, square)).unwrap()]
        };
        for (&(combine, _), &out) in outputs.iter().zip(&outs) {
            let value = match combine {
                Combine::Sum(t) => sum((t, false)),
                Combine::SumOfSquares(t) => sum((t, true)),
                Combine::Mean(t, count) => k.div(sum((t, false)), count as f32),
                Combine::Variance {
                    sums,
                    squares,
                    count,
                } => {
                    let mean = k.div(sum((sums, false)), count as f32);
                    let second = k.div(sum((squares, false)), count as f32);
                    let mean2 = k.mul(mean, mean);
                    let var = k.sub(second, mean2);
                    k.max(var, 0.0f32)
                }
            };
            k.store(out, c, value);
        }
    });
    let mut args = vec![partials];
    args.extend(outputs.iter().map(|(_, a)| *a));
    launch(k.finish(), [rows.channels as u32, 1], args)
}

/// The (term, squared per example) sums `outputs` read, each once, in first-use order.
fn distinct_sums(outputs: &[(Combine, LaunchArg)]) -> Vec<(usize, bool)> {
    let mut sums = Vec::new();
    for (combine, _) in outputs {
        let needs = match *combine {
            Combine::Sum(t) | Combine::Mean(t, _) => vec![(t, false)],
            Combine::SumOfSquares(t) => vec![(t, true)],
            Combine::Variance { sums, squares, .. } => vec![(sums, false), (squares, false)],
        };
        for need in needs {
            if !sums.contains(&need) {
                sums.push(need);
            }
        }
    }
    sums
}

/// Warps of a [`sum_rows`] block, each adding every `ROW_GROUPS`-th row of its columns.
const ROW_GROUPS: u32 = BLOCK / WARP;

/// A kernel that adds `rows` rows of partial sums, `outputs[t][e] = Σⱼ partials[t][j][e]` for
/// `e < len`, without atomics. A block takes 32 columns: its warp w adds rows w, w + 8, … in
/// order (a row's 32 columns one coalesced load), and its first warp adds the 8 warps' sums
/// in order, so every run gives the same bits. (One thread per column, each looping over every
/// row, kept 9 SMs busy for ResNet44's first-stage weight gradients: 2304 columns of 1024
/// chunks.)
pub fn sum_rows(
    cx: &Cx,
    part: &str,
    rows: u32,
    len: u64,
    partials: LaunchArg,
    outputs: &[LaunchArg],
) -> Launch {
    let mut k = cx.builder(&format!("sum_{part}"));
    let source = k.ptr_param("partials");
    let outs: Vec<U64> = (0..outputs.len())
        .map(|t| k.ptr_param(&format!("out{t}")))
        .collect();
    let (tid, block) = (k.tid(), k.block_x());
    let lane = k.ubin(BinOp::Rem, tid, WARP);
    let group = k.ubin(BinOp::Div, tid, WARP);
    let (block, lane_idx) = (k.idx(block), k.idx(lane));
    let e = k.idx_mad(block, WARP as u64, lane_idx);
    let exists = k.idx_lt(e, len);
    let sums: Vec<F32> = outs.iter().map(|_| k.f32(0.0)).collect();
    k.when(exists, |k| {
        let (start, step) = (k.idx(group), k.idx_const(ROW_GROUPS as u64));
        k.for_idx(start, rows as u64, step, |k, j| {
            for (t, &sum) in sums.iter().enumerate() {
                let row = k.idx_add_const(j, t as u64 * rows as u64);
                let at = k.idx_mad(row, len, e);
                let v = k.load(source, at);
                k.accumulate(sum, v);
            }
        });
    });
    let staged = k.shared(outs.len() as u32 * BLOCK);
    for (t, &sum) in sums.iter().enumerate() {
        k.store_shared_plus(staged, tid, t as u32 * BLOCK, sum);
    }
    k.barrier();
    let first_group = k.cmp_u(Cmp::Eq, group, 0u32);
    let finishes = k.and(first_group, exists);
    k.when(finishes, |k| {
        for (t, &out) in outs.iter().enumerate() {
            let total = k.f32(0.0);
            for g in 0..ROW_GROUPS {
                let v = k.load_shared_plus(staged, lane, t as u32 * BLOCK + g * WARP);
                k.accumulate(total, v);
            }
            k.store(out, e, total);
        }
    });
    let mut args = vec![partials];
    args.extend_from_slice(outputs);
    launch(k.finish(), [len.div_ceil(WARP as u64) as u32, 1], args)
}

/// How the BN-reduction terms of [`bn_terms`] become (dγ, dβ [, squares of γ, of β]).
pub fn bn_combine(squares: Squares) -> Vec<Combine> {
    let mut combine = vec![Combine::Sum(0), Combine::Sum(1)];
    match squares {
        Squares::None => {}
        Squares::PerExample => combine.extend([Combine::SumOfSquares(0), Combine::SumOfSquares(1)]),
        Squares::PerPosition => combine.extend([Combine::Sum(2), Combine::Sum(3)]),
    }
    combine
}

/// How many terms [`bn_terms`] gives.
pub fn bn_term_count(squares: Squares) -> usize {
    if squares == Squares::PerPosition {
        4
    } else {
        2
    }
}

/// The per-element terms of the BN reductions (see [`bn_combine`]), from a gradient `g` and x̂.
pub fn bn_terms(k: &mut KernelBuilder, g: F32, xhat: F32, squares: Squares) -> Vec<F32> {
    let gx = k.mul(g, xhat);
    match squares {
        Squares::PerPosition => vec![gx, g, k.mul(gx, gx), k.mul(g, g)],
        _ => vec![gx, g],
    }
}

/// Where a thread of a group's kernel works (see [`member_blocks`]).
pub struct MemberThread {
    /// Its element of its block's member.
    pub element: U32,
    /// Whether that element exists (the member's last block is ragged).
    pub inside: Pred,
    /// The launch's grid: every member's blocks.
    pub grid: [u32; 2],
}

/// The skeleton of a group's kernel (`ops::Group`): one element a thread, member `m` taking a
/// run of whole blocks, `elements[m]` elements. A block finds its member by binary search over
/// the members' first blocks (immediates, so the search is uniform across the block);
/// `leaf(k, m)` runs in member `m`'s branch, in member order: there it declares the member's
/// pointer parameters and sets the caller's registers from them.
pub fn member_blocks(
    k: &mut KernelBuilder,
    elements: &[u32],
    leaf: &mut dyn FnMut(&mut KernelBuilder, usize),
) -> MemberThread {
    let blocks: Vec<u32> = elements.iter().map(|&n| n.div_ceil(BLOCK).max(1)).collect();
    let first: Vec<u32> = blocks
        .iter()
        .scan(0, |next, &b| {
            *next += b;
            Some(*next - b)
        })
        .collect();
    let (count, start) = (k.u32(0), k.u32(0));
    let block = k.block_x();
    let mut choose = |k: &mut KernelBuilder, m: usize| {
        leaf(k, m);
        k.assign_u(count, elements[m]);
        k.assign_u(start, first[m]);
    };
    search_members(k, block, &first, 0..elements.len(), &mut choose);
    let local = k.ubin(BinOp::Sub, block, start);
    let tid = k.tid();
    let element = k.mad_u(local, BLOCK, tid);
    let inside = k.cmp_u(Cmp::Lt, element, count);
    MemberThread {
        element,
        inside,
        grid: [blocks.iter().sum(), 1],
    }
}

/// Binary search over `members` by first block: `choose(k, m)` in the branch of the block's.
fn search_members(
    k: &mut KernelBuilder,
    block: U32,
    first: &[u32],
    members: std::ops::Range<usize>,
    choose: &mut dyn FnMut(&mut KernelBuilder, usize),
) {
    if members.len() == 1 {
        choose(k, members.start);
        return;
    }
    let mid = members.start + members.len() / 2;
    let below = k.cmp_u(Cmp::Lt, block, first[mid]);
    k.when(below, |k| {
        search_members(k, block, first, members.start..mid, choose)
    });
    let above = k.not(below);
    k.when(above, |k| {
        search_members(k, block, first, mid..members.end, choose)
    });
}

/// `members` in launches of as many as the parameter space holds beside `shared` pointers,
/// `pointers` a member.
pub fn within_parameter_space<T>(members: &[T], shared: usize, pointers: usize) -> Vec<&[T]> {
    let used = param_bytes(vec![ParamTy::Ptr; shared]);
    let per_launch = (PARAM_SPACE - used) / param_bytes(vec![ParamTy::Ptr; pointers]);
    members.chunks(per_launch as usize).collect()
}
