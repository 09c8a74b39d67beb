//! The CPU executor: runs a kernel's instruction stream exactly as the GPU would, so kernels
//! are tested without a GPU.
//!
//! Blocks run in parallel on the host's cores; inside a block every thread runs, instruction by
//! instruction, in lock step over the threads active at that point (structured `If`/`Loop`
//! narrow the active set, as SIMT divergence does). Barriers therefore hold trivially, and a
//! barrier reached by only part of the block is reported as the bug it is; shuffles read the
//! other lanes' registers. Lock step would hide a missing barrier, so shared memory is
//! race-checked instead: a thread touching a word that another thread wrote (or, for a write,
//! read) since the last barrier is an error, as it would be a race on the GPU. `cp.async`
//! copies land only at the `wait_group` that covers them: touching their words before, or
//! ending a block with copies in flight, is an error too. Every memory access is bounds- and
//! alignment-checked. Floating-point instructions are IEEE-754 correctly rounded, as the PTX
//! `.rn` forms are (the `approx` ones are computed exactly, which the hardware's are not,
//! within their documented error).

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use thiserror::Error;

use crate::kir::{
    BinOp, Cmp, Inst, Kernel, Operand, ParamTy, Reg, Space, Special, Stmt, Ty, UnOp, WARP,
};
use crate::mma::Mma;
use crate::plan::ALIGN;

/// A kernel argument: a device address (a byte offset in the executor's memory) or a scalar.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    Ptr(u64),
    U32(u32),
    F32(f32),
}

impl Arg {
    fn bits(self) -> u64 {
        match self {
            Arg::Ptr(p) => p,
            Arg::U32(v) => v as u64,
            Arg::F32(v) => v.to_bits() as u64,
        }
    }
}

#[derive(Debug, Error, PartialEq)]
#[error("kernel {kernel}, block ({}, {}): {message}", block.0, block.1)]
pub struct ExecError {
    pub kernel: String,
    pub block: (u32, u32),
    pub message: String,
}

/// Runs `kernel` over a `grid` of blocks on `memory` (global memory, addressed from 0).
///
/// Blocks run in parallel: blocks of one kernel never touch what another block writes (that is
/// the contract every lowering keeps: reductions go through per-block partials, never atomics),
/// so the result does not depend on the order and every run gives the same bits.
pub fn run(
    kernel: &Kernel,
    grid: [u32; 2],
    args: &[Arg],
    memory: &Memory,
) -> Result<(), ExecError> {
    check_args(kernel, args).map_err(|message| ExecError {
        kernel: kernel.name.clone(),
        block: (0, 0),
        message,
    })?;
    let blocks: Vec<(u32, u32)> = (0..grid[1])
        .flat_map(|y| (0..grid[0]).map(move |x| (x, y)))
        .collect();
    let run_blocks = |ids: &[(u32, u32)]| -> Result<(), ExecError> {
        let mut block = Block::new(kernel, args, grid);
        let all: Vec<u32> = (0..kernel.block).collect();
        for &id in ids {
            block.id = id;
            block.shared.fill(0);
            block.races.reset();
            block.copies.iter_mut().for_each(Copies::clear);
            block
                .stmts(&kernel.body, &all, memory, 0)
                .and_then(|()| block.all_copies_landed())
                .map_err(|message| ExecError {
                    kernel: kernel.name.clone(),
                    block: id,
                    message,
                })?;
        }
        Ok(())
    };
    if blocks.len() < 2 {
        return run_blocks(&blocks);
    }
    let chunk = blocks
        .len()
        .div_ceil(4 * rayon::current_num_threads())
        .max(1);
    use rayon::prelude::*;
    blocks.par_chunks(chunk).try_for_each(run_blocks)
}

fn check_args(kernel: &Kernel, args: &[Arg]) -> Result<(), String> {
    if args.len() != kernel.params.len() {
        return Err(format!(
            "{} arguments for {} parameters",
            args.len(),
            kernel.params.len()
        ));
    }
    for ((name, ty), arg) in kernel.params.iter().zip(args) {
        let fits = matches!(
            (ty, arg),
            (ParamTy::Ptr, Arg::Ptr(_)) | (ParamTy::U32, Arg::U32(_)) | (ParamTy::F32, Arg::F32(_))
        );
        if !fits {
            return Err(format!("parameter {name} ({ty:?}) given {arg:?}"));
        }
    }
    Ok(())
}

impl<'a> Block<'a> {
    fn new(kernel: &Kernel, args: &'a [Arg], grid: [u32; 2]) -> Self {
        let threads = kernel.block as usize;
        Block {
            args,
            threads,
            regs: vec![0; kernel.regs.len() * threads],
            shared: vec![0; kernel.shared_bytes as usize],
            races: RaceCheck::new(kernel.shared_bytes as usize),
            copies: (0..threads).map(|_| Copies::default()).collect(),
            grid,
            id: (0, 0),
            pool: Vec::new(),
        }
    }
}

struct Block<'a> {
    args: &'a [Arg],
    threads: usize,
    /// Register `r` of thread `t` is `regs[r·threads + t]`, as raw bits.
    regs: Vec<u64>,
    shared: Vec<u8>,
    races: RaceCheck,
    /// Each thread's `cp.async` copies not yet landed.
    copies: Vec<Copies>,
    grid: [u32; 2],
    id: (u32, u32),
    /// Reused lists of active lanes, one per nesting depth of `If`/`Loop`.
    pool: Vec<Vec<u32>>,
}

/// A thread's `cp.async` copies (shared address, value) not yet landed: the open group and
/// the committed ones, oldest first.
#[derive(Default)]
struct Copies {
    open: Vec<(u64, u64)>,
    committed: std::collections::VecDeque<Vec<(u64, u64)>>,
}

impl Copies {
    fn clear(&mut self) {
        self.open.clear();
        self.committed.clear();
    }

    fn is_empty(&self) -> bool {
        self.open.is_empty() && self.committed.iter().all(Vec::is_empty)
    }
}

impl Block<'_> {
    /// A block must not end with copies in flight: their data would never be used, and they
    /// would land on whatever the next kernel keeps there.
    fn all_copies_landed(&self) -> Result<(), String> {
        match self.copies.iter().position(|c| !c.is_empty()) {
            Some(t) => Err(format!(
                "thread {t} ends with cp.async copies never waited for"
            )),
            None => Ok(()),
        }
    }
}

/// An operand resolved for a lane loop: a register's first slot, or an immediate's bits.
#[derive(Clone, Copy)]
enum Src {
    Reg(usize),
    Imm(u64),
}

impl Block<'_> {
    fn stmts(
        &mut self,
        stmts: &[Stmt],
        active: &[u32],
        memory: &Memory,
        depth: usize,
    ) -> Result<(), String> {
        for stmt in stmts {
            match stmt {
                Stmt::Inst(inst) => self.inst(inst, active, memory)?,
                Stmt::If { cond, then } => {
                    let mut taken = self.lanes_buffer(depth);
                    taken.extend(active.iter().copied().filter(|&t| self.get(*cond, t) != 0));
                    if !taken.is_empty() {
                        self.stmts(then, &taken, memory, depth + 1)?;
                    }
                    self.pool[depth] = taken;
                }
                Stmt::Loop { body, repeat } => {
                    let mut running = self.lanes_buffer(depth);
                    running.extend_from_slice(active);
                    while !running.is_empty() {
                        self.stmts(body, &running, memory, depth + 1)?;
                        running.retain(|&t| self.get(*repeat, t) != 0);
                    }
                    self.pool[depth] = running;
                }
            }
        }
        Ok(())
    }

    /// An empty list of lanes for nesting depth `depth`, reusing its allocation.
    fn lanes_buffer(&mut self, depth: usize) -> Vec<u32> {
        if self.pool.len() <= depth {
            self.pool.resize_with(depth + 1, Vec::new);
        }
        let mut v = std::mem::take(&mut self.pool[depth]);
        v.clear();
        v
    }

    fn get(&self, r: Reg, t: u32) -> u64 {
        self.regs[r.id as usize * self.threads + t as usize]
    }

    fn set(&mut self, r: Reg, t: u32, bits: u64) {
        self.regs[r.id as usize * self.threads + t as usize] = bits;
    }

    fn read(&self, o: &Operand, t: u32) -> u64 {
        match *o {
            Operand::Reg(r) => self.get(r, t),
            Operand::U32(v) => v as u64,
            Operand::S32(v) => v as u32 as u64,
            Operand::U64(v) => v,
            Operand::F32(v) => v.to_bits() as u64,
        }
    }

    fn src(&self, o: &Operand) -> Src {
        match *o {
            Operand::Reg(r) => Src::Reg(r.id as usize * self.threads),
            _ => Src::Imm(self.read(o, 0)),
        }
    }

    #[inline(always)]
    fn lanes1(&mut self, dst: Reg, a: Src, active: &[u32], f: impl Fn(u64) -> u64) {
        let d = dst.id as usize * self.threads;
        let regs = &mut self.regs;
        match a {
            Src::Reg(x) => active
                .iter()
                .for_each(|&t| regs[d + t as usize] = f(regs[x + t as usize])),
            Src::Imm(x) => {
                let v = f(x);
                active.iter().for_each(|&t| regs[d + t as usize] = v);
            }
        }
    }

    #[inline(always)]
    fn lanes2(&mut self, dst: Reg, a: Src, b: Src, active: &[u32], f: impl Fn(u64, u64) -> u64) {
        let d = dst.id as usize * self.threads;
        let regs = &mut self.regs;
        match (a, b) {
            (Src::Reg(x), Src::Reg(y)) => active.iter().for_each(|&t| {
                regs[d + t as usize] = f(regs[x + t as usize], regs[y + t as usize])
            }),
            (Src::Reg(x), Src::Imm(y)) => active
                .iter()
                .for_each(|&t| regs[d + t as usize] = f(regs[x + t as usize], y)),
            (Src::Imm(x), Src::Reg(y)) => active
                .iter()
                .for_each(|&t| regs[d + t as usize] = f(x, regs[y + t as usize])),
            (Src::Imm(x), Src::Imm(y)) => {
                let v = f(x, y);
                active.iter().for_each(|&t| regs[d + t as usize] = v);
            }
        }
    }

    #[inline(always)]
    fn lanes3(
        &mut self,
        dst: Reg,
        a: Src,
        b: Src,
        c: Src,
        active: &[u32],
        f: impl Fn(u64, u64, u64) -> u64,
    ) {
        let d = dst.id as usize * self.threads;
        let regs = &mut self.regs;
        let at = |s: Src, regs: &Vec<u64>, t: usize| match s {
            Src::Reg(x) => regs[x + t],
            Src::Imm(v) => v,
        };
        for &t in active {
            let t = t as usize;
            let v = f(at(a, regs, t), at(b, regs, t), at(c, regs, t));
            regs[d + t] = v;
        }
    }

    /// Whether some active lane of `b` is zero (integer division guard).
    fn any_zero(&self, b: Src, active: &[u32], mask: u64) -> bool {
        match b {
            Src::Imm(v) => v & mask == 0,
            Src::Reg(y) => active
                .iter()
                .any(|&t| self.regs[y + t as usize] & mask == 0),
        }
    }

    /// `mma.sync` of `shape` (its fragments as the [`crate::mma`] entry places them, its
    /// operands' elements as it types them), warp by warp: the products of the TF32 or BF16
    /// operands are exact in f64 and summed there, then rounded once to f32 (the hardware's
    /// order and intermediate rounding are unspecified; this is the exact sum, as the
    /// executor computes approximate instructions exactly).
    fn mma(
        &mut self,
        shape: &Mma,
        (d, c): (&[Reg; 4], &[Reg; 4]),
        (a, b): (&[Reg; 4], &[Reg; 2]),
        active: &[u32],
    ) -> Result<(), String> {
        for warp in active.chunks(WARP as usize) {
            let full = warp.len() == WARP as usize && warp[0] % WARP == 0;
            if !full || warp.windows(2).any(|w| w[1] != w[0] + 1) {
                return Err("mma.sync reached by part of a warp".to_string());
            }
            let (m, n, depth) = (shape.m as usize, shape.n as usize, shape.k as usize);
            let per = shape.operand.per_register();
            let (mut ma, mut mb, mut mc) = (
                vec![0f64; m * depth],
                vec![0f64; depth * n],
                vec![0f64; m * n],
            );
            let value = |this: &Self, r: Reg, t: u32| f32::from_bits(this.get(r, t) as u32) as f64;
            // element e of an operand: half e % per of register e / per
            let element = |this: &Self, regs: &[Reg], t: u32, e: usize| {
                let bits = this.get(regs[e / per], t) as u32;
                shape.operand.value(bits, e % per) as f64
            };
            for &t in warp {
                let lane = t % WARP;
                for e in 0..shape.a.elements() {
                    let (row, k) = shape.a.at(lane, e);
                    ma[row * depth + k] = element(self, a, t, e);
                }
                for e in 0..shape.b.elements() {
                    let (k, col) = shape.b.at(lane, e);
                    mb[k * n + col] = element(self, b, t, e);
                }
                for (i, &r) in c.iter().enumerate() {
                    let (row, col) = shape.c.at(lane, i);
                    mc[row * n + col] = value(self, r, t);
                }
            }
            for &t in warp {
                for (i, &r) in d.iter().enumerate() {
                    let (row, col) = shape.c.at(t % WARP, i);
                    let sum: f64 = (0..depth)
                        .map(|k| ma[row * depth + k] * mb[k * n + col])
                        .sum::<f64>();
                    self.set(r, t, fb((sum + mc[row * n + col]) as f32));
                }
            }
        }
        Ok(())
    }

    fn inst(&mut self, inst: &Inst, active: &[u32], memory: &Memory) -> Result<(), String> {
        match inst {
            Inst::Mov { dst, src } => {
                let a = self.src(src);
                self.lanes1(*dst, a, active, |x| x);
            }
            Inst::Special { dst, which } => {
                let (bx, by) = self.id;
                let value = match which {
                    Special::TidX => None,
                    Special::NtidX => Some(self.threads as u64),
                    Special::CtaidX => Some(bx as u64),
                    Special::CtaidY => Some(by as u64),
                    Special::NctaidX => Some(self.grid[0] as u64),
                    Special::NctaidY => Some(self.grid[1] as u64),
                };
                for &t in active {
                    self.set(*dst, t, value.unwrap_or(t as u64));
                }
            }
            Inst::SharedBase { dst } => self.lanes1(*dst, Src::Imm(0), active, |x| x),
            Inst::Param { dst, index } => {
                let bits = self.args[*index].bits();
                self.lanes1(*dst, Src::Imm(bits), active, |x| x);
            }
            Inst::Bin { op, dst, a, b } => {
                let (a, b) = (self.src(a), self.src(b));
                self.binary(*op, *dst, a, b, active)?;
            }
            Inst::Fma { dst, a, b, c } => {
                let (a, b, c) = (self.src(a), self.src(b), self.src(c));
                match dst.ty {
                    Ty::F32 => {
                        self.lanes3(
                            *dst,
                            a,
                            b,
                            c,
                            active,
                            |a, b, c| fb(f(a).mul_add(f(b), f(c))),
                        )
                    }
                    Ty::U64 => self.lanes3(*dst, a, b, c, active, |a, b, c| {
                        a.wrapping_mul(b).wrapping_add(c)
                    }),
                    _ => self.lanes3(*dst, a, b, c, active, |a, b, c| {
                        (a as u32).wrapping_mul(b as u32).wrapping_add(c as u32) as u64
                    }),
                }
            }
            Inst::MulWide { dst, a, b } => {
                let (a, b) = (self.src(a), self.src(b));
                self.lanes2(*dst, a, b, active, |a, b| {
                    (a as u32 as u64) * (b as u32 as u64)
                });
            }
            Inst::Un { op, dst, a } => {
                let a = self.src(a);
                unary(*op, dst.ty)?; // rejects unsupported combinations once
                let (op, ty) = (*op, dst.ty);
                self.lanes1(*dst, a, active, |x| unary_value(op, ty, x));
            }
            Inst::Cvt { dst, src } => {
                let (to, from) = (dst.ty, src.ty());
                let a = self.src(src);
                self.lanes1(*dst, a, active, |x| convert(to, from, x));
            }
            Inst::Setp { cmp, dst, a, b } => {
                let (ty, cmp) = (a.ty(), *cmp);
                let (a, b) = (self.src(a), self.src(b));
                self.lanes2(*dst, a, b, active, |x, y| compare(cmp, ty, x, y) as u64);
            }
            Inst::Selp { dst, a, b, pred } => {
                let (a, b) = (self.src(a), self.src(b));
                let p = Src::Reg(pred.id as usize * self.threads);
                self.lanes3(*dst, p, a, b, active, |p, a, b| if p != 0 { a } else { b });
            }
            Inst::Ld {
                space,
                dst,
                addr,
                offset,
            } => {
                let bytes = dst.ty.bytes() as usize;
                for &t in active {
                    let at = address(self.get(*addr, t), *offset);
                    let v = match space {
                        Space::Global => memory.load(at, bytes)?,
                        Space::Shared => {
                            let v = shared_load(&self.shared, at, bytes)?;
                            self.races.read(t, at, bytes)?;
                            v
                        }
                    };
                    self.set(*dst, t, v);
                }
            }
            Inst::St {
                space,
                addr,
                offset,
                src,
            } => {
                let bytes = src.ty().bytes() as usize;
                for &t in active {
                    let at = address(self.get(*addr, t), *offset);
                    let v = self.read(src, t);
                    match space {
                        Space::Global => memory.store(at, bytes, v)?,
                        Space::Shared => {
                            shared_store(&mut self.shared, at, bytes, v)?;
                            self.races.store(t, at, bytes)?;
                        }
                    }
                }
            }
            Inst::LdSharedVector { dst, addr, offset } => {
                let bytes = 4 * dst.len();
                for &t in active {
                    let at = address(self.get(*addr, t), *offset);
                    shared_range(self.shared.len(), at, bytes)?;
                    self.races.read(t, at, bytes)?;
                    for (i, &r) in dst.iter().enumerate() {
                        let v = shared_load(&self.shared, at + 4 * i as u64, 4)?;
                        self.set(r, t, v);
                    }
                }
            }
            Inst::Bar => {
                if active.len() != self.threads {
                    return Err(format!(
                        "bar.sync reached by {} of {} threads",
                        active.len(),
                        self.threads
                    ));
                }
                self.races.barrier();
            }
            Inst::CpAsync {
                dst,
                dst_offset,
                src,
                src_offset,
                size,
            } => {
                for &t in active {
                    let at = address(self.get(*dst, t), *dst_offset as i32);
                    let from = address(self.get(*src, t), *src_offset as i32);
                    let value = match self.get(*size, t) {
                        0 => 0,
                        4 => memory.load(from, 4)?,
                        other => return Err(format!("cp.async of {other} source bytes")),
                    };
                    shared_range(self.shared.len(), at, 4)?;
                    self.races.issue(t, at)?;
                    self.copies[t as usize].open.push((at, value));
                }
            }
            Inst::CpAsyncCommit => {
                for &t in active {
                    let copies = &mut self.copies[t as usize];
                    let group = std::mem::take(&mut copies.open);
                    copies.committed.push_back(group);
                }
            }
            Inst::CpAsyncWait { pending } => {
                for &t in active {
                    let committed = &mut self.copies[t as usize].committed;
                    while committed.len() > *pending as usize {
                        for (at, value) in committed.pop_front().unwrap_or_default() {
                            shared_store(&mut self.shared, at, 4, value)?;
                            self.races.land(t, at)?;
                        }
                    }
                }
            }
            Inst::CvtTf32 { dst, src } => {
                let a = Src::Reg(src.id as usize * self.threads);
                self.lanes1(*dst, a, active, |x| tf32_bits(x as u32) as u64);
            }
            Inst::CvtBf16x2 { dst, hi, lo } => {
                let (hi, lo) = (
                    Src::Reg(hi.id as usize * self.threads),
                    Src::Reg(lo.id as usize * self.threads),
                );
                self.lanes2(*dst, hi, lo, active, |h, l| {
                    let (h, l) = (bf16_bits(h as u32) as u64, bf16_bits(l as u32) as u64);
                    h << 16 | l
                });
            }
            Inst::Mma { shape, d, a, b, c } => self.mma(shape, (d, c), (a, b), active)?,
            Inst::ShflDown { dst, src, delta } => {
                let values: Vec<u64> = active
                    .iter()
                    .map(|&t| {
                        let lane = t % WARP;
                        let from = if lane + delta < WARP { t + delta } else { t };
                        if !active.contains(&from) {
                            return Err(format!("shfl.sync from inactive thread {from}"));
                        }
                        Ok(self.get(*src, from))
                    })
                    .collect::<Result<_, _>>()?;
                for (&t, v) in active.iter().zip(values) {
                    self.set(*dst, t, v);
                }
            }
        }
        Ok(())
    }

    fn binary(
        &mut self,
        op: BinOp,
        dst: Reg,
        a: Src,
        b: Src,
        active: &[u32],
    ) -> Result<(), String> {
        macro_rules! lanes {
            (|$x:ident, $y:ident| $e:expr) => {
                self.lanes2(dst, a, b, active, |$x, $y| $e)
            };
        }
        match (dst.ty, op) {
            (Ty::F32, BinOp::Add) => lanes!(|x, y| fb(f(x) + f(y))),
            (Ty::F32, BinOp::Sub) => lanes!(|x, y| fb(f(x) - f(y))),
            (Ty::F32, BinOp::Mul) => lanes!(|x, y| fb(f(x) * f(y))),
            (Ty::F32, BinOp::Div) => lanes!(|x, y| fb(f(x) / f(y))),
            (Ty::F32, BinOp::Min) => lanes!(|x, y| fb(f(x).min(f(y)))),
            (Ty::F32, BinOp::Max) => lanes!(|x, y| fb(f(x).max(f(y)))),
            (Ty::Pred | Ty::U64, BinOp::And) => lanes!(|x, y| x & y),
            (Ty::Pred | Ty::U64, BinOp::Or) => lanes!(|x, y| x | y),
            (Ty::Pred | Ty::U64, BinOp::Xor) => lanes!(|x, y| x ^ y),
            (Ty::U32, BinOp::Add) => lanes!(|x, y| (x as u32).wrapping_add(y as u32) as u64),
            (Ty::U32, BinOp::Sub) => lanes!(|x, y| (x as u32).wrapping_sub(y as u32) as u64),
            (Ty::U32, BinOp::Mul) => lanes!(|x, y| (x as u32).wrapping_mul(y as u32) as u64),
            (Ty::U32, BinOp::MulHi) => lanes!(|x, y| (x as u32 as u64 * y as u32 as u64) >> 32),
            (Ty::U32, BinOp::Div | BinOp::Rem) => {
                if self.any_zero(b, active, 0xffff_ffff) {
                    return Err("u32 division by zero".to_string());
                }
                if op == BinOp::Div {
                    lanes!(|x, y| ((x as u32) / (y as u32)) as u64)
                } else {
                    lanes!(|x, y| ((x as u32) % (y as u32)) as u64)
                }
            }
            (Ty::U32, BinOp::Min) => lanes!(|x, y| (x as u32).min(y as u32) as u64),
            (Ty::U32, BinOp::Max) => lanes!(|x, y| (x as u32).max(y as u32) as u64),
            (Ty::U32, BinOp::And) => lanes!(|x, y| ((x as u32) & (y as u32)) as u64),
            (Ty::U32, BinOp::Or) => lanes!(|x, y| ((x as u32) | (y as u32)) as u64),
            (Ty::U32, BinOp::Xor) => lanes!(|x, y| ((x as u32) ^ (y as u32)) as u64),
            (Ty::U32, BinOp::Shl) => {
                lanes!(|x, y| (x as u32).checked_shl(y as u32).unwrap_or(0) as u64)
            }
            (Ty::U32, BinOp::Shr) => {
                lanes!(|x, y| (x as u32).checked_shr(y as u32).unwrap_or(0) as u64)
            }
            (Ty::S32, BinOp::Add) => lanes!(|x, y| s(x).wrapping_add(s(y)) as u32 as u64),
            (Ty::S32, BinOp::Sub) => lanes!(|x, y| s(x).wrapping_sub(s(y)) as u32 as u64),
            (Ty::S32, BinOp::Mul) => lanes!(|x, y| s(x).wrapping_mul(s(y)) as u32 as u64),
            (Ty::S32, BinOp::Div | BinOp::Rem) => {
                if self.any_zero(b, active, 0xffff_ffff) {
                    return Err("s32 division by zero".to_string());
                }
                if op == BinOp::Div {
                    lanes!(|x, y| s(x).wrapping_div(s(y)) as u32 as u64)
                } else {
                    lanes!(|x, y| s(x).wrapping_rem(s(y)) as u32 as u64)
                }
            }
            (Ty::S32, BinOp::Min) => lanes!(|x, y| s(x).min(s(y)) as u32 as u64),
            (Ty::S32, BinOp::Max) => lanes!(|x, y| s(x).max(s(y)) as u32 as u64),
            (Ty::U64, BinOp::Add) => lanes!(|x, y| x.wrapping_add(y)),
            (Ty::U64, BinOp::Sub) => lanes!(|x, y| x.wrapping_sub(y)),
            (Ty::U64, BinOp::Mul) => lanes!(|x, y| x.wrapping_mul(y)),
            (Ty::U64, BinOp::MulHi) => lanes!(|x, y| ((x as u128 * y as u128) >> 64) as u64),
            (Ty::U64, BinOp::Div | BinOp::Rem) => {
                if self.any_zero(b, active, u64::MAX) {
                    return Err("u64 division by zero".to_string());
                }
                if op == BinOp::Div {
                    lanes!(|x, y| x / y)
                } else {
                    lanes!(|x, y| x % y)
                }
            }
            (Ty::U64, BinOp::Min) => lanes!(|x, y| x.min(y)),
            (Ty::U64, BinOp::Max) => lanes!(|x, y| x.max(y)),
            (Ty::U64, BinOp::Shl) => lanes!(|x, y| x.checked_shl(y as u32).unwrap_or(0)),
            (Ty::U64, BinOp::Shr) => lanes!(|x, y| x.checked_shr(y as u32).unwrap_or(0)),
            (ty, op) => return Err(format!("{op:?} on {ty:?}")),
        }
        Ok(())
    }
}

fn s(bits: u64) -> i32 {
    bits as u32 as i32
}

fn f(bits: u64) -> f32 {
    f32::from_bits(bits as u32)
}

fn fb(v: f32) -> u64 {
    v.to_bits() as u64
}

fn address(base: u64, offset: i32) -> u64 {
    base.wrapping_add(offset as i64 as u64)
}

fn shared_range(len: usize, at: u64, bytes: usize) -> Result<usize, String> {
    if !at.is_multiple_of(bytes as u64) {
        return Err(format!(
            "misaligned shared access of {bytes} bytes at {at:#x}"
        ));
    }
    usize::try_from(at)
        .ok()
        .filter(|&start| start + bytes <= len)
        .ok_or_else(|| format!("shared access of {bytes} bytes at {at:#x} outside {len} bytes"))
}

fn shared_load(shared: &[u8], at: u64, bytes: usize) -> Result<u64, String> {
    let start = shared_range(shared.len(), at, bytes)?;
    let mut buf = [0u8; 8];
    buf[..bytes].copy_from_slice(&shared[start..start + bytes]);
    Ok(u64::from_le_bytes(buf))
}

fn shared_store(shared: &mut [u8], at: u64, bytes: usize, value: u64) -> Result<(), String> {
    let start = shared_range(shared.len(), at, bytes)?;
    shared[start..start + bytes].copy_from_slice(&value.to_le_bytes()[..bytes]);
    Ok(())
}

/// Who touched each 4-byte word of shared memory since the last barrier (epoch), to report
/// the accesses the GPU would race on. Accesses are checked after `shared_range`, so they lie
/// inside the array.
struct RaceCheck {
    epoch: u32,
    words: Vec<WordUse>,
    /// Words a `cp.async` copy is on its way to (whatever the epoch).
    pending: Vec<bool>,
}

#[derive(Clone, Copy, Default)]
struct WordUse {
    /// The epoch the fields below belong to; older entries count as untouched.
    epoch: u32,
    writer: Option<u32>,
    reader: Reader,
}

#[derive(Clone, Copy, Default, PartialEq)]
enum Reader {
    #[default]
    None,
    One(u32),
    Many,
}

impl RaceCheck {
    fn new(bytes: usize) -> Self {
        RaceCheck {
            epoch: 1,
            words: vec![WordUse::default(); bytes.div_ceil(4)],
            pending: vec![false; bytes.div_ceil(4)],
        }
    }

    fn reset(&mut self) {
        self.epoch = 1;
        self.words.fill(WordUse::default());
        self.pending.fill(false);
    }

    fn barrier(&mut self) {
        self.epoch += 1;
    }

    /// This epoch's uses of the words `at..at + bytes` covers.
    fn uses(&mut self, at: u64, bytes: usize) -> impl Iterator<Item = (u64, &mut WordUse)> {
        let epoch = self.epoch;
        let first = (at / 4) as usize;
        let words = bytes.div_ceil(4);
        self.words[first..first + words]
            .iter_mut()
            .enumerate()
            .map(move |(i, word)| {
                if word.epoch != epoch {
                    *word = WordUse {
                        epoch,
                        ..WordUse::default()
                    };
                }
                (4 * (first + i) as u64, word)
            })
    }

    /// An error if a word of `at..at + bytes` awaits a copy.
    fn not_pending(&self, thread: u32, at: u64, bytes: usize, verb: &str) -> Result<(), String> {
        let first = (at / 4) as usize;
        match (first..first + bytes.div_ceil(4)).find(|&w| self.pending[w]) {
            Some(w) => Err(format!(
                "thread {thread} {verb} {:#x} before the cp.async copy to it landed",
                4 * w
            )),
            None => Ok(()),
        }
    }

    /// A `cp.async` copy issued to the word at `at`: it counts as a write from now on.
    fn issue(&mut self, thread: u32, at: u64) -> Result<(), String> {
        self.not_pending(thread, at, 4, "copies to")?;
        self.write(thread, at, 4)?;
        self.pending[(at / 4) as usize] = true;
        Ok(())
    }

    /// The copy to the word at `at` lands (a write by the waiting thread).
    fn land(&mut self, thread: u32, at: u64) -> Result<(), String> {
        self.pending[(at / 4) as usize] = false;
        self.write(thread, at, 4)
    }

    fn read(&mut self, thread: u32, at: u64, bytes: usize) -> Result<(), String> {
        self.not_pending(thread, at, bytes, "reads")?;
        for (word_at, word) in self.uses(at, bytes) {
            if let Some(writer) = word.writer.filter(|&w| w != thread) {
                return Err(race("reads", thread, word_at, "written", writer));
            }
            word.reader = match word.reader {
                Reader::None => Reader::One(thread),
                Reader::One(r) if r == thread => Reader::One(r),
                _ => Reader::Many,
            };
        }
        Ok(())
    }

    fn store(&mut self, thread: u32, at: u64, bytes: usize) -> Result<(), String> {
        self.not_pending(thread, at, bytes, "writes")?;
        self.write(thread, at, bytes)
    }

    fn write(&mut self, thread: u32, at: u64, bytes: usize) -> Result<(), String> {
        for (word_at, word) in self.uses(at, bytes) {
            if let Some(writer) = word.writer.filter(|&w| w != thread) {
                return Err(race("writes", thread, word_at, "written", writer));
            }
            match word.reader {
                Reader::One(r) if r != thread => {
                    return Err(race("writes", thread, word_at, "read", r));
                }
                Reader::Many => {
                    return Err(format!(
                        "shared-memory race: thread {thread} writes {word_at:#x}, which other \
                         threads read since the last bar.sync"
                    ));
                }
                _ => {}
            }
            word.writer = Some(thread);
        }
        Ok(())
    }
}

fn race(verb: &str, thread: u32, at: u64, done: &str, other: u32) -> String {
    format!(
        "shared-memory race: thread {thread} {verb} {at:#x}, which thread {other} {done} since \
         the last bar.sync"
    )
}

/// Rejects unary operations the executor (and PTX) does not define.
fn unary(op: UnOp, ty: Ty) -> Result<(), String> {
    match (op, ty) {
        (UnOp::Neg | UnOp::Abs | UnOp::Sqrt | UnOp::Ex2 | UnOp::Lg2, Ty::F32)
        | (UnOp::Neg | UnOp::Abs, Ty::S32)
        | (UnOp::Not, Ty::Pred | Ty::U32) => Ok(()),
        (op, ty) => Err(format!("{op:?} on {ty:?}")),
    }
}

fn unary_value(op: UnOp, ty: Ty, a: u64) -> u64 {
    match (op, ty) {
        (UnOp::Neg, Ty::F32) => fb(-f(a)),
        (UnOp::Abs, Ty::F32) => fb(f(a).abs()),
        (UnOp::Sqrt, Ty::F32) => fb(f(a).sqrt()),
        (UnOp::Ex2, Ty::F32) => fb(f(a).exp2()),
        (UnOp::Lg2, Ty::F32) => fb(f(a).log2()),
        (UnOp::Neg, _) => s(a).wrapping_neg() as u32 as u64,
        (UnOp::Abs, _) => s(a).wrapping_abs() as u32 as u64,
        (UnOp::Not, Ty::Pred) => (a == 0) as u64,
        (_, _) => !(a as u32) as u64,
    }
}

/// A finite f32's bits rounded to nearest with ties to even at bit `dropped` (its low
/// `dropped` bits cleared): half an ulp less one, plus the lowest kept bit, added to the
/// bits, so that a carry into the exponent is the rounding up to the next binade, or to
/// infinity.
fn rounded_bits(bits: u32, dropped: u32) -> u32 {
    let lowest_kept = (bits >> dropped) & 1;
    (bits + (1 << (dropped - 1)) - 1 + lowest_kept) & !((1 << dropped) - 1)
}

/// `cvt.rn.tf32.f32`: the f32 rounded to 10 mantissa bits (its low 13 cleared), to nearest
/// with ties to even; NaN and infinity pass unchanged. sm_80's `cvt.rna` differs on ties
/// only (`kir::Inst::CvtTf32`).
pub fn tf32_bits(bits: u32) -> u32 {
    if f32::from_bits(bits).is_finite() {
        rounded_bits(bits, 13)
    } else {
        bits
    }
}

/// `cvt.rn.bf16.f32`: the f32's top 16 bits, rounded to nearest with ties to even; NaN
/// becomes the canonical NaN, infinity stays.
pub fn bf16_bits(bits: u32) -> u16 {
    if f32::from_bits(bits).is_nan() {
        0x7fff
    } else {
        (rounded_bits(bits, 16) >> 16) as u16
    }
}

fn convert(to: Ty, from: Ty, bits: u64) -> u64 {
    match (to, from) {
        (Ty::F32, Ty::U32) => fb(bits as u32 as f32),
        (Ty::F32, Ty::S32) => fb(bits as u32 as i32 as f32),
        (Ty::F32, Ty::U64) => fb(bits as f32),
        (Ty::U32, Ty::F32) => f(bits) as u32 as u64,
        (Ty::S32, Ty::F32) => f(bits) as i32 as u32 as u64,
        (Ty::U64, Ty::S32) => bits as u32 as i32 as i64 as u64,
        (Ty::U64, _) => bits & 0xffff_ffff,
        (Ty::U32 | Ty::S32, _) => bits & 0xffff_ffff,
        (Ty::F32, Ty::F32 | Ty::Pred | Ty::B32) | (Ty::Pred | Ty::B32, _) => bits,
    }
}

fn compare(cmp: Cmp, ty: Ty, a: u64, b: u64) -> bool {
    use std::cmp::Ordering;
    let order = match ty {
        Ty::F32 => f(a).partial_cmp(&f(b)),
        Ty::S32 => Some((a as u32 as i32).cmp(&(b as u32 as i32))),
        Ty::U32 => Some((a as u32).cmp(&(b as u32))),
        Ty::U64 | Ty::Pred | Ty::B32 => Some(a.cmp(&b)),
    };
    match (cmp, order) {
        (_, None) => false, // PTX comparisons without a "u" suffix are ordered: false on NaN
        (Cmp::Eq, Some(o)) => o == Ordering::Equal,
        (Cmp::Ne, Some(o)) => o != Ordering::Equal,
        (Cmp::Lt, Some(o)) => o == Ordering::Less,
        (Cmp::Le, Some(o)) => o != Ordering::Greater,
        (Cmp::Gt, Some(o)) => o == Ordering::Greater,
        (Cmp::Ge, Some(o)) => o != Ordering::Less,
    }
}

/// Global memory for the executor: 4-byte words that the blocks of a launch share, with a
/// bump allocator (buffers 256-byte aligned, as CUDA allocations are).
///
/// The words are relaxed atomics, which cost nothing over plain loads and stores on the hosts
/// we run on, so that concurrent blocks are sound Rust even if a kernel broke the contract of
/// [`run`]. Accesses must be naturally aligned, as on the GPU.
#[derive(Debug, Default)]
pub struct Memory {
    words: Vec<AtomicU32>,
}

impl Memory {
    pub fn new() -> Self {
        Memory::default()
    }

    /// `bytes` bytes of zeroed memory (rounded up to whole words).
    pub fn zeroed(bytes: u64) -> Self {
        let mut memory = Memory::new();
        memory.grow(bytes);
        memory
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        4 * self.words.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    fn grow(&mut self, bytes: u64) {
        let words = bytes.div_ceil(4) as usize;
        self.words
            .resize_with(words.max(self.words.len()), || AtomicU32::new(0));
    }

    /// A zeroed buffer of `bytes` bytes, aligned as the arena's buffers ([`ALIGN`]).
    pub fn alloc(&mut self, bytes: usize) -> u64 {
        let start = self.len().div_ceil(ALIGN) * ALIGN;
        self.grow(start + bytes.max(1) as u64);
        start
    }

    pub fn alloc_f32(&mut self, values: &[f32]) -> u64 {
        let p = self.alloc(4 * values.len());
        self.write_f32(p, values);
        p
    }

    pub fn alloc_i32(&mut self, values: &[i32]) -> u64 {
        let p = self.alloc(4 * values.len());
        self.write_words(p, values.iter().map(|&v| v as u32));
        p
    }

    pub fn write_f32(&mut self, at: u64, values: &[f32]) {
        self.write_words(at, values.iter().map(|v| v.to_bits()));
    }

    pub fn write_u64(&mut self, at: u64, value: u64) {
        self.write_words(at, [value as u32, (value >> 32) as u32]);
    }

    /// Writes consecutive words from `at` (word-aligned, in bounds: a host-side bug otherwise).
    pub fn write_words(&mut self, at: u64, words: impl IntoIterator<Item = u32>) {
        assert!(
            at.is_multiple_of(4),
            "host write at unaligned address {at:#x}"
        );
        let slots = &mut self.words[(at / 4) as usize..];
        let mut slots = slots.iter_mut();
        for w in words {
            *slots
                .next()
                .expect("host write past the end of memory")
                .get_mut() = w;
        }
    }

    /// The `len` words from `at` as plain memory (word-aligned, in bounds: a host-side bug
    /// otherwise), for the host to read or write in bulk while no kernel runs.
    pub fn words_mut(&mut self, at: u64, len: usize) -> &mut [u32] {
        assert!(
            at.is_multiple_of(4),
            "host access at unaligned address {at:#x}"
        );
        let slots = &mut self.words[(at / 4) as usize..][..len];
        // SAFETY: AtomicU32 has u32's size, alignment and bit validity, and `&mut self` rules
        // out any other access to these words for the slice's life
        unsafe { std::slice::from_raw_parts_mut(slots.as_mut_ptr().cast::<u32>(), len) }
    }

    pub fn read_f32(&self, at: u64, len: usize) -> Vec<f32> {
        self.read_words(at, len).map(f32::from_bits).collect()
    }

    /// Consecutive words from `at` (word-aligned, in bounds: a host-side bug otherwise).
    pub fn read_words(&self, at: u64, len: usize) -> impl Iterator<Item = u32> + '_ {
        assert!(
            at.is_multiple_of(4),
            "host read at unaligned address {at:#x}"
        );
        self.words[(at / 4) as usize..][..len]
            .iter()
            .map(|w| w.load(Relaxed))
    }

    fn word(&self, at: u64, bytes: usize) -> Result<usize, String> {
        if !at.is_multiple_of(bytes as u64) {
            return Err(format!("misaligned access of {bytes} bytes at {at:#x}"));
        }
        let end = at.checked_add(bytes as u64);
        if end.is_none_or(|end| end > self.len()) {
            return Err(format!(
                "access of {bytes} bytes at {at:#x} outside {} bytes of memory",
                self.len()
            ));
        }
        Ok((at / 4) as usize)
    }

    fn load(&self, at: u64, bytes: usize) -> Result<u64, String> {
        let w = self.word(at, bytes)?;
        let low = self.words[w].load(Relaxed) as u64;
        Ok(if bytes == 8 {
            low | (self.words[w + 1].load(Relaxed) as u64) << 32
        } else {
            low
        })
    }

    fn store(&self, at: u64, bytes: usize, value: u64) -> Result<(), String> {
        let w = self.word(at, bytes)?;
        self.words[w].store(value as u32, Relaxed);
        if bytes == 8 {
            self.words[w + 1].store((value >> 32) as u32, Relaxed);
        }
        Ok(())
    }
}
