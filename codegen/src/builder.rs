//! A typed builder for kernels: registers are typed by what they hold (`F32`, `U32`, `S32`,
//! `U64`, `Pred`, and `Idx` for element indices), so an f32 cannot be added to a pointer by
//! accident; every method emits one or a few kernel-IR instructions.
//!
//! Element indices (`Idx`) are u32 or u64, chosen per kernel by the largest tensor it
//! addresses: u32 arithmetic is much cheaper on the GPU, u64 is needed past 2³² elements.

use crate::kir::{
    BinOp, Cmp, Inst, Kernel, MainLoop, Operand, ParamTy, Reg, Space, Special, Stmt, Ty, UnOp, WARP,
};
use crate::magic::Divide;

/// The bits a TF32 keeps of an f32: sign, exponent and the top 10 mantissa bits.
const TF32_MASK: u32 = 0xffff_e000;

macro_rules! typed_reg {
    ($($name:ident),*) => {$(
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name(pub(crate) Reg);
        impl $name {
            pub fn reg(self) -> Reg { self.0 }
        }
        impl From<$name> for Operand {
            fn from(r: $name) -> Operand { Operand::Reg(r.0) }
        }
    )*};
}

typed_reg!(F32, U32, S32, U64, Pred, Idx, Tf32);

/// Operand types: a typed register or an immediate of the same type.
macro_rules! typed_operand {
    ($($(#[$doc:meta])* $name:ident: $reg:ident | $imm:ty => $variant:ident;)*) => {$(
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name(Operand);
        impl From<$reg> for $name {
            fn from(r: $reg) -> $name { $name(r.into()) }
        }
        impl From<$imm> for $name {
            fn from(v: $imm) -> $name { $name(Operand::$variant(v)) }
        }
    )*};
}

typed_operand! {
    /// An f32 operand.
    FOp: F32 | f32 => F32;
    /// A u32 operand.
    UOp: U32 | u32 => U32;
    /// An s32 operand.
    SOp: S32 | i32 => S32;
}

/// A shared-memory array of f32, by its byte offset in the block's shared memory.
#[derive(Clone, Copy, Debug)]
pub struct SharedF32 {
    offset: u32,
    pub len: u32,
}

pub struct KernelBuilder {
    name: String,
    params: Vec<(String, ParamTy)>,
    block: u32,
    blocks_per_sm: Option<u32>,
    shared_bytes: u32,
    main_loop: Option<MainLoop>,
    regs: Vec<Ty>,
    /// Statement lists being built: the innermost `If`/`Loop` body is last.
    stack: Vec<Vec<Stmt>>,
    index: Ty,
}

/// Shared memory a block may declare statically (bytes).
pub const STATIC_SHARED: u32 = 48 * 1024;

/// Bytes of kernel parameters a launch may pass (PTX ISA 8.0; 8.1 raised it to 32 KiB on
/// newer drivers, which fisherc does not assume).
pub const PARAM_SPACE: u32 = 4096;

impl ParamTy {
    /// Its size (and alignment) in the parameter space.
    pub fn bytes(self) -> u32 {
        match self {
            ParamTy::Ptr => 8,
            ParamTy::U32 | ParamTy::F32 => 4,
        }
    }
}

/// Bytes `params` take in the parameter space, each aligned to its size.
pub fn param_bytes(params: impl IntoIterator<Item = ParamTy>) -> u32 {
    params
        .into_iter()
        .fold(0, |end, p| end.next_multiple_of(p.bytes()) + p.bytes())
}

impl KernelBuilder {
    /// A kernel of `block` threads per block whose element indices fit `index` (u32 or u64).
    pub fn new(name: impl Into<String>, block: u32, wide_index: bool) -> Self {
        KernelBuilder {
            name: name.into(),
            params: Vec::new(),
            block,
            blocks_per_sm: None,
            shared_bytes: 0,
            main_loop: None,
            regs: Vec::new(),
            stack: vec![Vec::new()],
            index: if wide_index { Ty::U64 } else { Ty::U32 },
        }
    }

    pub fn finish(self) -> Kernel {
        assert_eq!(self.stack.len(), 1, "unclosed If or Loop");
        // a lowering that asks for more is wrong
        assert!(
            self.shared_bytes <= STATIC_SHARED,
            "kernel {} declares {} bytes of shared memory, over the 48 KiB static limit",
            self.name,
            self.shared_bytes
        );
        let params = param_bytes(self.params.iter().map(|(_, ty)| *ty));
        assert!(
            params <= PARAM_SPACE,
            "kernel {} takes {params} bytes of parameters, over the {PARAM_SPACE}-byte limit",
            self.name
        );
        Kernel {
            name: self.name,
            params: self.params,
            block: self.block,
            blocks_per_sm: self.blocks_per_sm,
            shared_bytes: self.shared_bytes,
            main_loop: self.main_loop,
            regs: self.regs,
            body: self.stack.into_iter().next().expect("one list"),
        }
    }

    /// Marks the kernel register-tiled, at most `blocks` blocks to an SM (see
    /// `Kernel::blocks_per_sm`; the fewest asked for holds).
    pub fn register_tiled(&mut self, blocks: u32) {
        self.blocks_per_sm = Some(self.blocks_per_sm.map_or(blocks, |b| b.min(blocks)));
    }

    /// Records the kernel's main loop (see [`MainLoop`]).
    pub fn note_main_loop(&mut self, main_loop: MainLoop) {
        self.main_loop = Some(main_loop);
    }

    pub fn block_size(&self) -> u32 {
        self.block
    }

    fn reg(&mut self, ty: Ty) -> Reg {
        let id = self.regs.len() as u32;
        self.regs.push(ty);
        Reg { id, ty }
    }

    /// A fresh register of type `ty`, defined by the instruction `make` builds around it.
    fn def(&mut self, ty: Ty, make: impl FnOnce(Reg) -> Inst) -> Reg {
        let dst = self.reg(ty);
        self.emit(make(dst));
        dst
    }

    fn emit(&mut self, inst: Inst) {
        self.stack
            .last_mut()
            .expect("a statement list")
            .push(Stmt::Inst(inst));
    }

    fn bin(&mut self, op: BinOp, ty: Ty, a: Operand, b: Operand) -> Reg {
        self.def(ty, |dst| Inst::Bin { op, dst, a, b })
    }

    // ---- parameters and special registers ----

    fn param(&mut self, name: &str, ty: ParamTy, reg_ty: Ty) -> Reg {
        let index = self.params.len();
        self.params.push((name.to_string(), ty));
        self.def(reg_ty, |dst| Inst::Param { dst, index })
    }

    /// A device-pointer parameter.
    pub fn ptr_param(&mut self, name: &str) -> U64 {
        U64(self.param(name, ParamTy::Ptr, Ty::U64))
    }

    pub fn u32_param(&mut self, name: &str) -> U32 {
        U32(self.param(name, ParamTy::U32, Ty::U32))
    }

    fn special(&mut self, which: Special) -> U32 {
        U32(self.def(Ty::U32, |dst| Inst::Special { dst, which }))
    }

    pub fn tid(&mut self) -> U32 {
        self.special(Special::TidX)
    }

    pub fn block_x(&mut self) -> U32 {
        self.special(Special::CtaidX)
    }

    pub fn block_y(&mut self) -> U32 {
        self.special(Special::CtaidY)
    }

    pub fn blocks_x(&mut self) -> U32 {
        self.special(Special::NctaidX)
    }

    // ---- f32 ----

    pub fn f32(&mut self, v: f32) -> F32 {
        F32(self.def(Ty::F32, |dst| Inst::Mov {
            dst,
            src: Operand::F32(v),
        }))
    }

    fn fbin(&mut self, op: BinOp, a: impl Into<FOp>, b: impl Into<FOp>) -> F32 {
        F32(self.bin(op, Ty::F32, a.into().0, b.into().0))
    }

    pub fn add(&mut self, a: impl Into<FOp>, b: impl Into<FOp>) -> F32 {
        self.fbin(BinOp::Add, a, b)
    }

    pub fn sub(&mut self, a: impl Into<FOp>, b: impl Into<FOp>) -> F32 {
        self.fbin(BinOp::Sub, a, b)
    }

    pub fn mul(&mut self, a: impl Into<FOp>, b: impl Into<FOp>) -> F32 {
        self.fbin(BinOp::Mul, a, b)
    }

    pub fn div(&mut self, a: impl Into<FOp>, b: impl Into<FOp>) -> F32 {
        self.fbin(BinOp::Div, a, b)
    }

    pub fn max(&mut self, a: impl Into<FOp>, b: impl Into<FOp>) -> F32 {
        self.fbin(BinOp::Max, a, b)
    }

    pub fn fma(&mut self, a: impl Into<FOp>, b: impl Into<FOp>, c: impl Into<FOp>) -> F32 {
        let (a, b, c) = (a.into().0, b.into().0, c.into().0);
        F32(self.def(Ty::F32, |dst| Inst::Fma { dst, a, b, c }))
    }

    fn fun(&mut self, op: UnOp, a: impl Into<FOp>) -> F32 {
        F32(self.def(Ty::F32, |dst| Inst::Un {
            op,
            dst,
            a: a.into().0,
        }))
    }

    pub fn neg(&mut self, a: impl Into<FOp>) -> F32 {
        self.fun(UnOp::Neg, a)
    }

    pub fn sqrt(&mut self, a: impl Into<FOp>) -> F32 {
        self.fun(UnOp::Sqrt, a)
    }

    /// 2ˣ (approximate, as the hardware's `ex2.approx`).
    pub fn ex2(&mut self, a: impl Into<FOp>) -> F32 {
        self.fun(UnOp::Ex2, a)
    }

    /// log₂ x (approximate, as the hardware's `lg2.approx`).
    pub fn lg2(&mut self, a: impl Into<FOp>) -> F32 {
        self.fun(UnOp::Lg2, a)
    }

    /// `p ? a : b`.
    pub fn select(&mut self, p: Pred, a: impl Into<FOp>, b: impl Into<FOp>) -> F32 {
        F32(self.def(Ty::F32, |dst| Inst::Selp {
            dst,
            a: a.into().0,
            b: b.into().0,
            pred: p.0,
        }))
    }

    /// `dst = v` for an existing register (accumulators, loop-carried values).
    pub fn assign(&mut self, dst: F32, v: impl Into<FOp>) {
        self.emit(Inst::Mov {
            dst: dst.0,
            src: v.into().0,
        });
    }

    /// `acc += v`.
    pub fn accumulate(&mut self, acc: F32, v: impl Into<FOp>) {
        self.emit(Inst::Bin {
            op: BinOp::Add,
            dst: acc.0,
            a: acc.into(),
            b: v.into().0,
        });
    }

    /// `acc = fma(a, b, acc)`.
    pub fn fma_into(&mut self, acc: F32, a: impl Into<FOp>, b: impl Into<FOp>) {
        let (a, b) = (a.into().0, b.into().0);
        self.emit(Inst::Fma {
            dst: acc.0,
            a,
            b,
            c: acc.into(),
        });
    }

    pub fn cmp_f32(&mut self, cmp: Cmp, a: impl Into<FOp>, b: impl Into<FOp>) -> Pred {
        Pred(self.def(Ty::Pred, |dst| Inst::Setp {
            cmp,
            dst,
            a: a.into().0,
            b: b.into().0,
        }))
    }

    pub fn f32_from_u32(&mut self, a: impl Into<UOp>) -> F32 {
        F32(self.def(Ty::F32, |dst| Inst::Cvt {
            dst,
            src: a.into().0,
        }))
    }

    pub fn f32_from_s32(&mut self, a: impl Into<SOp>) -> F32 {
        F32(self.def(Ty::F32, |dst| Inst::Cvt {
            dst,
            src: a.into().0,
        }))
    }

    // ---- u32 ----

    pub fn u32(&mut self, v: u32) -> U32 {
        U32(self.def(Ty::U32, |dst| Inst::Mov {
            dst,
            src: Operand::U32(v),
        }))
    }

    /// `a op b`; a division or remainder by a constant becomes multiplies and shifts
    /// ([`Divide`]).
    pub fn ubin(&mut self, op: BinOp, a: impl Into<UOp>, b: impl Into<UOp>) -> U32 {
        let (a, b) = (a.into().0, b.into().0);
        match (op, b) {
            (BinOp::Div | BinOp::Rem, Operand::U32(d)) if d != 0 => {
                U32(self.divide_const(op, Ty::U32, a, d as u64))
            }
            _ => U32(self.bin(op, Ty::U32, a, b)),
        }
    }

    /// `a / d` or `a % d` (`op`) for unsigned `a` of type `ty` and a constant `d` ≠ 0, as
    /// [`Divide`] has it: ptxas would emit its general division.
    fn divide_const(&mut self, op: BinOp, ty: Ty, a: Operand, d: u64) -> Reg {
        let bits = if ty == Ty::U64 { 64 } else { 32 };
        let imm = |v: u64| match ty {
            Ty::U64 => Operand::U64(v),
            _ => Operand::U32(v as u32),
        };
        if op == BinOp::Rem && d.is_power_of_two() {
            return self.bin(BinOp::And, ty, a, imm(d - 1));
        }
        let shifted = |k: &mut Self, v: Operand, shift: u32| match shift {
            0 => k.def(ty, |dst| Inst::Mov { dst, src: v }),
            s => k.bin(BinOp::Shr, ty, v, Operand::U32(s)),
        };
        let quotient = match Divide::by(d, bits) {
            Divide::Shift(shift) => shifted(self, a, shift),
            Divide::MulHi { magic, shift } => {
                let high = self.bin(BinOp::MulHi, ty, a, imm(magic));
                shifted(self, high.into(), shift)
            }
            Divide::MulHiAdd { magic, shift } => {
                let high = self.bin(BinOp::MulHi, ty, a, imm(magic));
                let rest = self.bin(BinOp::Sub, ty, a, high.into());
                let half = self.bin(BinOp::Shr, ty, rest.into(), Operand::U32(1));
                let sum = self.bin(BinOp::Add, ty, half.into(), high.into());
                shifted(self, sum.into(), shift)
            }
        };
        if op == BinOp::Div {
            return quotient;
        }
        let multiple = self.bin(BinOp::Mul, ty, quotient.into(), imm(d));
        self.bin(BinOp::Sub, ty, a, multiple.into())
    }

    pub fn add_u(&mut self, a: impl Into<UOp>, b: impl Into<UOp>) -> U32 {
        self.ubin(BinOp::Add, a, b)
    }

    pub fn mul_u(&mut self, a: impl Into<UOp>, b: impl Into<UOp>) -> U32 {
        self.ubin(BinOp::Mul, a, b)
    }

    /// `a·b + c` (low 32 bits).
    pub fn mad_u(&mut self, a: impl Into<UOp>, b: impl Into<UOp>, c: impl Into<UOp>) -> U32 {
        let (a, b, c) = (a.into().0, b.into().0, c.into().0);
        U32(self.def(Ty::U32, |dst| Inst::Fma { dst, a, b, c }))
    }

    /// A pointer register for [`Self::assign_ptr`] to set (null until then).
    pub fn null_ptr(&mut self) -> U64 {
        U64(self.def(Ty::U64, |dst| Inst::Mov {
            dst,
            src: Operand::U64(0),
        }))
    }

    /// `dst = v` for an existing pointer register.
    pub fn assign_ptr(&mut self, dst: U64, v: U64) {
        self.emit(Inst::Mov {
            dst: dst.0,
            src: v.into(),
        });
    }

    pub fn assign_u(&mut self, dst: U32, v: impl Into<UOp>) {
        self.emit(Inst::Mov {
            dst: dst.0,
            src: v.into().0,
        });
    }

    pub fn cmp_u(&mut self, cmp: Cmp, a: impl Into<UOp>, b: impl Into<UOp>) -> Pred {
        Pred(self.def(Ty::Pred, |dst| Inst::Setp {
            cmp,
            dst,
            a: a.into().0,
            b: b.into().0,
        }))
    }

    /// `p ? a : b` on u32.
    pub fn select_u(&mut self, p: Pred, a: impl Into<UOp>, b: impl Into<UOp>) -> U32 {
        U32(self.def(Ty::U32, |dst| Inst::Selp {
            dst,
            a: a.into().0,
            b: b.into().0,
            pred: p.0,
        }))
    }

    /// The bits of an f32, as a u32.
    pub fn bits_of(&mut self, v: F32) -> U32 {
        U32(self.def(Ty::U32, |dst| Inst::Mov { dst, src: v.into() }))
    }

    /// The f32 with these bits.
    pub fn float_of(&mut self, bits: U32) -> F32 {
        F32(self.def(Ty::F32, |dst| Inst::Mov {
            dst,
            src: bits.into(),
        }))
    }

    // ---- u64 ----

    pub fn u32_from_u64(&mut self, a: U64) -> U32 {
        U32(self.def(Ty::U32, |dst| Inst::Cvt { dst, src: a.into() }))
    }

    pub fn shr_u64(&mut self, a: U64, bits: u32) -> U64 {
        U64(self.bin(BinOp::Shr, Ty::U64, a.into(), Operand::U32(bits)))
    }

    // ---- s32 ----

    pub fn s32_from_u32(&mut self, a: impl Into<UOp>) -> S32 {
        S32(self.def(Ty::S32, |dst| Inst::Cvt {
            dst,
            src: a.into().0,
        }))
    }

    pub fn u32_from_s32(&mut self, a: S32) -> U32 {
        U32(self.def(Ty::U32, |dst| Inst::Cvt { dst, src: a.into() }))
    }

    pub fn sbin(&mut self, op: BinOp, a: impl Into<SOp>, b: impl Into<SOp>) -> S32 {
        S32(self.bin(op, Ty::S32, a.into().0, b.into().0))
    }

    pub fn mad_s(&mut self, a: impl Into<SOp>, b: impl Into<SOp>, c: impl Into<SOp>) -> S32 {
        let (a, b, c) = (a.into().0, b.into().0, c.into().0);
        S32(self.def(Ty::S32, |dst| Inst::Fma { dst, a, b, c }))
    }

    /// `p ? a : b` on s32.
    pub fn select_s(&mut self, p: Pred, a: impl Into<SOp>, b: impl Into<SOp>) -> S32 {
        S32(self.def(Ty::S32, |dst| Inst::Selp {
            dst,
            a: a.into().0,
            b: b.into().0,
            pred: p.0,
        }))
    }

    pub fn cmp_s(&mut self, cmp: Cmp, a: impl Into<SOp>, b: impl Into<SOp>) -> Pred {
        Pred(self.def(Ty::Pred, |dst| Inst::Setp {
            cmp,
            dst,
            a: a.into().0,
            b: b.into().0,
        }))
    }

    /// `lo ≤ v < hi`.
    pub fn in_range_s(&mut self, v: S32, lo: i32, hi: i32) -> Pred {
        let above = self.cmp_s(Cmp::Ge, v, lo);
        let below = self.cmp_s(Cmp::Lt, v, hi);
        self.and(above, below)
    }

    // ---- predicates ----

    pub fn and(&mut self, a: Pred, b: Pred) -> Pred {
        Pred(self.bin(BinOp::And, Ty::Pred, a.into(), b.into()))
    }

    pub fn or(&mut self, a: Pred, b: Pred) -> Pred {
        Pred(self.bin(BinOp::Or, Ty::Pred, a.into(), b.into()))
    }

    pub fn not(&mut self, a: Pred) -> Pred {
        Pred(self.def(Ty::Pred, |dst| Inst::Un {
            op: UnOp::Not,
            dst,
            a: a.into(),
        }))
    }

    // ---- element indices ----

    fn idx_imm(&self, v: u64) -> Operand {
        match self.index {
            Ty::U64 => Operand::U64(v),
            _ => Operand::U32(
                u32::try_from(v).expect("a narrow-index kernel addresses < 2³² elements"),
            ),
        }
    }

    /// An index from a u32 (widened when indices are 64-bit).
    pub fn idx(&mut self, a: impl Into<UOp>) -> Idx {
        let a = a.into().0;
        let dst = self.reg(self.index);
        match self.index {
            Ty::U64 => self.emit(Inst::Cvt { dst, src: a }),
            _ => self.emit(Inst::Mov { dst, src: a }),
        }
        Idx(dst)
    }

    pub fn idx_const(&mut self, v: u64) -> Idx {
        let src = self.idx_imm(v);
        Idx(self.def(self.index, |dst| Inst::Mov { dst, src }))
    }

    fn ibin(&mut self, op: BinOp, a: Idx, b: Operand) -> Idx {
        Idx(self.bin(op, self.index, a.into(), b))
    }

    pub fn idx_add(&mut self, a: Idx, b: Idx) -> Idx {
        self.ibin(BinOp::Add, a, b.into())
    }

    pub fn idx_add_const(&mut self, a: Idx, b: u64) -> Idx {
        let b = self.idx_imm(b);
        self.ibin(BinOp::Add, a, b)
    }

    pub fn idx_sub_const(&mut self, a: Idx, b: u64) -> Idx {
        let b = self.idx_imm(b);
        self.ibin(BinOp::Sub, a, b)
    }

    pub fn idx_mul_const(&mut self, a: Idx, b: u64) -> Idx {
        let b = self.idx_imm(b);
        self.ibin(BinOp::Mul, a, b)
    }

    /// `a·b + c` with a constant `b`.
    pub fn idx_mad(&mut self, a: Idx, b: u64, c: Idx) -> Idx {
        let b = self.idx_imm(b);
        Idx(self.def(self.index, |dst| Inst::Fma {
            dst,
            a: a.into(),
            b,
            c: c.into(),
        }))
    }

    pub fn idx_div_const(&mut self, a: Idx, b: u64) -> Idx {
        self.idx_imm(b); // checks that it fits
        Idx(self.divide_const(BinOp::Div, self.index, a.into(), b))
    }

    pub fn idx_rem_const(&mut self, a: Idx, b: u64) -> Idx {
        self.idx_imm(b);
        Idx(self.divide_const(BinOp::Rem, self.index, a.into(), b))
    }

    /// `a < bound`.
    pub fn idx_lt(&mut self, a: Idx, bound: u64) -> Pred {
        let b = self.idx_imm(bound);
        Pred(self.def(Ty::Pred, |dst| Inst::Setp {
            cmp: Cmp::Lt,
            dst,
            a: a.into(),
            b,
        }))
    }

    /// The index as a u32 (for values known to be small: channels, positions).
    pub fn idx_to_u32(&mut self, a: Idx) -> U32 {
        let dst = self.reg(Ty::U32);
        match self.index {
            Ty::U64 => self.emit(Inst::Cvt { dst, src: a.into() }),
            _ => self.emit(Inst::Mov { dst, src: a.into() }),
        }
        U32(dst)
    }

    /// `blockIdx.x · blockDim.x + threadIdx.x`.
    pub fn global_thread(&mut self) -> Idx {
        let (b, t) = (self.block_x(), self.tid());
        let b = self.idx(b);
        let t = self.idx(t);
        self.idx_mad(b, self.block as u64, t)
    }

    /// `gridDim.x · blockDim.x`.
    pub fn grid_threads(&mut self) -> Idx {
        let n = self.blocks_x();
        let n = self.idx(n);
        self.idx_mul_const(n, self.block as u64)
    }

    // ---- memory ----

    /// `base + index·bytes`.
    fn address(&mut self, base: U64, index: Operand, bytes: u32) -> Reg {
        let offset = self.reg(Ty::U64);
        match index.ty() {
            Ty::U64 => self.emit(Inst::Bin {
                op: BinOp::Mul,
                dst: offset,
                a: index,
                b: Operand::U64(bytes as u64),
            }),
            _ => self.emit(Inst::MulWide {
                dst: offset,
                a: index,
                b: Operand::U32(bytes),
            }),
        }
        let addr = self.reg(Ty::U64);
        self.emit(Inst::Bin {
            op: BinOp::Add,
            dst: addr,
            a: base.into(),
            b: offset.into(),
        });
        addr
    }

    /// The address of f32 element `index` of a global array.
    pub fn element_ptr(&mut self, base: U64, index: impl Into<AnyIdx>) -> GlobalF32 {
        GlobalF32 {
            ptr: U64(self.address(base, index.into().0, 4)),
            plus: 0,
        }
    }

    /// The f32 `index` elements past `at` (a register index: made once where `at` serves
    /// many).
    pub fn element_ptr_past(&mut self, at: GlobalF32, index: impl Into<AnyIdx>) -> GlobalF32 {
        GlobalF32 {
            ptr: U64(self.address(at.ptr, index.into().0, 4)),
            plus: at.plus,
        }
    }

    /// f32 element `index` of a global array.
    pub fn load(&mut self, base: U64, index: impl Into<AnyIdx>) -> F32 {
        let at = self.element_ptr(base, index);
        self.load_from(at)
    }

    /// The f32 at `at` (see [`Self::element_ptr`]).
    pub fn load_from(&mut self, at: GlobalF32) -> F32 {
        let offset = at.offset_bytes() as i32;
        F32(self.def(Ty::F32, |dst| Inst::Ld {
            space: Space::Global,
            dst,
            addr: at.ptr.0,
            offset,
        }))
    }

    /// i32 element `index` of a global array (labels), as s32.
    pub fn load_s32(&mut self, base: U64, index: impl Into<AnyIdx>) -> S32 {
        let addr = self.address(base, index.into().0, 4);
        S32(self.def(Ty::S32, |dst| Inst::Ld {
            space: Space::Global,
            dst,
            addr,
            offset: 0,
        }))
    }

    /// u64 element `index` of a global array (seed, step).
    pub fn load_u64(&mut self, base: U64, index: u32) -> U64 {
        let addr = self.address(base, Operand::U32(index), 8);
        U64(self.def(Ty::U64, |dst| Inst::Ld {
            space: Space::Global,
            dst,
            addr,
            offset: 0,
        }))
    }

    pub fn store(&mut self, base: U64, index: impl Into<AnyIdx>, v: impl Into<FOp>) {
        let addr = self.address(base, index.into().0, 4);
        self.emit(Inst::St {
            space: Space::Global,
            addr,
            offset: 0,
            src: v.into().0,
        });
    }

    // ---- tensor cores ----

    /// `v` rounded to TF32 (`cvt.rna.tf32.f32`), the form `mma_tf32` takes.
    pub fn tf32(&mut self, v: F32) -> Tf32 {
        let dst = self.reg(Ty::B32);
        self.emit(Inst::CvtTf32 { dst, src: v.0 });
        Tf32(dst)
    }

    /// `v` truncated to TF32 (toward zero: the low 13 mantissa bits cleared), one `and`.
    /// Infinities and the GPU's NaN stay what they are.
    pub fn tf32_truncated(&mut self, v: F32) -> Tf32 {
        let bits = self.bits_of(v);
        let kept = self.ubin(BinOp::And, bits, TF32_MASK);
        self.tf32_of_bits(kept)
    }

    fn tf32_of_bits(&mut self, bits: U32) -> Tf32 {
        Tf32(self.def(Ty::B32, |dst| Inst::Mov {
            dst,
            src: bits.into(),
        }))
    }

    /// A TF32 value as the f32 it equals (a move of the bits).
    pub fn tf32_value(&mut self, v: Tf32) -> F32 {
        F32(self.def(Ty::F32, |dst| Inst::Mov { dst, src: v.into() }))
    }

    /// One warp-wide `mma.sync` m16n8k8 TF32: D = A·B + C with this lane's fragments (layout
    /// in `kir::Inst::MmaTf32`). Every lane of the warp must run it.
    pub fn mma_tf32(&mut self, a: [Tf32; 4], b: [Tf32; 2], c: [F32; 4]) -> [F32; 4] {
        let d = [0; 4].map(|_| self.reg(Ty::F32));
        self.emit(Inst::MmaTf32 {
            d,
            a: a.map(|r| r.0),
            b: b.map(|r| r.0),
            c: c.map(|r| r.0),
        });
        d.map(F32)
    }

    /// [`Self::mma_tf32`] accumulating into `acc` (D and C the same registers).
    pub fn mma_tf32_into(&mut self, acc: [F32; 4], a: [Tf32; 4], b: [Tf32; 2]) {
        let acc = acc.map(|r| r.0);
        self.emit(Inst::MmaTf32 {
            d: acc,
            a: a.map(|r| r.0),
            b: b.map(|r| r.0),
            c: acc,
        });
    }

    /// A shared-memory array of `len` f32.
    pub fn shared(&mut self, len: u32) -> SharedF32 {
        let offset = self.shared_bytes;
        self.shared_bytes += 4 * len;
        SharedF32 { offset, len }
    }

    fn shared_address(&mut self, array: SharedF32, index: impl Into<UOp>) -> Reg {
        let base = self.reg(Ty::U32);
        self.emit(Inst::SharedBase { dst: base });
        let byte = self.reg(Ty::U32);
        let index = index.into().0;
        self.emit(Inst::Fma {
            dst: byte,
            a: index,
            b: Operand::U32(4),
            c: Operand::U32(array.offset),
        });
        let addr = self.reg(Ty::U32);
        self.emit(Inst::Bin {
            op: BinOp::Add,
            dst: addr,
            a: base.into(),
            b: byte.into(),
        });
        addr
    }

    pub fn load_shared(&mut self, array: SharedF32, index: impl Into<UOp>) -> F32 {
        self.load_shared_plus(array, index, 0)
    }

    /// The f32 at `array[index + plus]`, `plus` a constant the instruction carries.
    pub fn load_shared_plus(&mut self, array: SharedF32, index: impl Into<UOp>, plus: u32) -> F32 {
        let addr = self.shared_address(array, index);
        F32(self.def(Ty::F32, |dst| Inst::Ld {
            space: Space::Shared,
            dst,
            addr,
            offset: 4 * plus as i32,
        }))
    }

    pub fn store_shared(&mut self, array: SharedF32, index: impl Into<UOp>, v: impl Into<FOp>) {
        self.store_shared_plus(array, index, 0, v);
    }

    /// Stores `v` at `array[index + plus]`, `plus` a constant the instruction carries.
    pub fn store_shared_plus(
        &mut self,
        array: SharedF32,
        index: impl Into<UOp>,
        plus: u32,
        v: impl Into<FOp>,
    ) {
        let addr = self.shared_address(array, index);
        self.emit(Inst::St {
            space: Space::Shared,
            addr,
            offset: 4 * plus as i32,
            src: v.into().0,
        });
    }

    /// Copies f32 element `index` of a global array to `array[at]` with `cp.async` (zero where
    /// `present` fails); it lands after a [`Self::wait_copies`] covering its group.
    pub fn copy_async(
        &mut self,
        array: SharedF32,
        at: impl Into<UOp>,
        src: U64,
        index: impl Into<AnyIdx>,
        present: Pred,
    ) {
        let src = self.element_ptr(src, index);
        self.copy_async_from(array, at, 0, src, present);
    }

    /// [`Self::copy_async`] from `src` (see [`Self::element_ptr`]) to `array[at + plus]`,
    /// `plus` a constant the instruction carries.
    pub fn copy_async_from(
        &mut self,
        array: SharedF32,
        at: impl Into<UOp>,
        plus: u32,
        src: GlobalF32,
        present: Pred,
    ) {
        let dst = self.shared_address(array, at);
        let size = self.select_u(present, 4u32, 0u32);
        self.emit(Inst::CpAsync {
            dst,
            dst_offset: 4 * plus,
            src: src.ptr.0,
            src_offset: src.offset_bytes(),
            size: size.0,
        });
    }

    /// `cp.async.commit_group`: the copies issued since the last commit form a group.
    pub fn commit_copies(&mut self) {
        self.emit(Inst::CpAsyncCommit);
    }

    /// `cp.async.wait_group pending`: all but the `pending` most recent groups have landed.
    pub fn wait_copies(&mut self, pending: u32) {
        self.emit(Inst::CpAsyncWait { pending });
    }

    // ---- control flow ----

    /// Runs `body` in the threads where `p` holds.
    pub fn when(&mut self, p: Pred, body: impl FnOnce(&mut Self)) {
        self.stack.push(Vec::new());
        body(self);
        let then = self.stack.pop().expect("pushed above");
        self.stack
            .last_mut()
            .expect("a list")
            .push(Stmt::If { cond: p.0, then });
    }

    /// `for (i = start; i < end; i += step) body(i)` over u32.
    pub fn for_u32(
        &mut self,
        start: impl Into<UOp>,
        end: impl Into<UOp>,
        step: u32,
        body: impl FnOnce(&mut Self, U32),
    ) {
        let i = self.reg(Ty::U32);
        self.emit(Inst::Mov {
            dst: i,
            src: start.into().0,
        });
        let end = end.into();
        let enter = self.cmp_u(Cmp::Lt, U32(i), end);
        self.when(enter, |k| {
            k.stack.push(Vec::new());
            body(k, U32(i));
            k.emit(Inst::Bin {
                op: BinOp::Add,
                dst: i,
                a: i.into(),
                b: Operand::U32(step),
            });
            let again = k.cmp_u(Cmp::Lt, U32(i), end);
            let body = k.stack.pop().expect("pushed above");
            k.stack.last_mut().expect("a list").push(Stmt::Loop {
                body,
                repeat: again.0,
            });
        });
    }

    /// `for (i = start; i < end; i += step) body(i)` over element indices.
    pub fn for_idx(&mut self, start: Idx, end: u64, step: Idx, body: impl FnOnce(&mut Self, Idx)) {
        let i = self.reg(self.index);
        self.emit(Inst::Mov {
            dst: i,
            src: start.into(),
        });
        let enter = self.idx_lt(Idx(i), end);
        self.when(enter, |k| {
            k.stack.push(Vec::new());
            body(k, Idx(i));
            k.emit(Inst::Bin {
                op: BinOp::Add,
                dst: i,
                a: i.into(),
                b: step.into(),
            });
            let again = k.idx_lt(Idx(i), end);
            let body = k.stack.pop().expect("pushed above");
            k.stack.last_mut().expect("a list").push(Stmt::Loop {
                body,
                repeat: again.0,
            });
        });
    }

    /// Grid-stride loop over `0..n`: each thread takes every `grid threads`-th element.
    pub fn for_each_element(&mut self, n: u64, body: impl FnOnce(&mut Self, Idx)) {
        let start = self.global_thread();
        let step = self.grid_threads();
        self.for_idx(start, n, step, body);
    }

    /// `bar.sync`: every thread of the block waits (must not be inside divergent code).
    pub fn barrier(&mut self) {
        self.emit(Inst::Bar);
    }

    pub fn shfl_down(&mut self, v: F32, delta: u32) -> F32 {
        F32(self.def(Ty::F32, |dst| Inst::ShflDown {
            dst,
            src: v.0,
            delta,
        }))
    }

    /// Sums each of `values` over the whole block (warp shuffles, then shared memory). Every
    /// thread gets the totals. Call from non-divergent code only.
    pub fn block_sum(&mut self, values: &[F32]) -> Vec<F32> {
        let warps = self.block / WARP;
        let partials: Vec<F32> = values.iter().map(|&v| self.warp_sum(v)).collect();
        let scratch = self.shared(warps * values.len() as u32);
        let totals_area = self.shared(values.len() as u32);
        let tid = self.tid();
        let lane = self.ubin(BinOp::Rem, tid, WARP);
        let warp = self.ubin(BinOp::Div, tid, WARP);
        let first_lane = self.cmp_u(Cmp::Eq, lane, 0u32);
        self.when(first_lane, |k| {
            for (j, &p) in partials.iter().enumerate() {
                let slot = k.mad_u(j as u32, warps, warp);
                k.store_shared(scratch, slot, p);
            }
        });
        self.barrier();
        let first_thread = self.cmp_u(Cmp::Eq, tid, 0u32);
        self.when(first_thread, |k| {
            for j in 0..values.len() as u32 {
                let total = k.f32(0.0);
                for w in 0..warps {
                    let v = k.load_shared(scratch, j * warps + w);
                    k.accumulate(total, v);
                }
                k.store_shared(totals_area, j, total);
            }
        });
        self.barrier();
        let totals = (0..values.len() as u32)
            .map(|j| self.load_shared(totals_area, j))
            .collect();
        self.barrier(); // the scratch may be reused right after
        totals
    }

    /// Sums a value over the warp; lane 0 holds the total. Every lane of the warp must run it.
    pub fn warp_sum(&mut self, v: F32) -> F32 {
        let acc = self.f32(0.0);
        self.assign(acc, v);
        let mut delta = WARP / 2;
        while delta > 0 {
            let other = self.shfl_down(acc, delta);
            self.accumulate(acc, other);
            delta /= 2;
        }
        acc
    }
}

/// An index operand of either width (u32 registers, immediates or `Idx`).
#[derive(Clone, Copy, Debug)]
pub struct AnyIdx(Operand);

impl From<Idx> for AnyIdx {
    fn from(i: Idx) -> AnyIdx {
        AnyIdx(i.into())
    }
}
impl From<U32> for AnyIdx {
    fn from(i: U32) -> AnyIdx {
        AnyIdx(i.into())
    }
}
impl From<u32> for AnyIdx {
    fn from(i: u32) -> AnyIdx {
        AnyIdx(Operand::U32(i))
    }
}

/// The address of an f32 in global memory: a register plus a constant number of elements,
/// which the instruction that reads it carries as an immediate offset (an addition of a
/// constant computed apart is not folded into `cp.async` by ptxas).
#[derive(Clone, Copy)]
pub struct GlobalF32 {
    ptr: U64,
    plus: u32,
}

impl GlobalF32 {
    /// The f32 `elements` further on.
    pub fn plus(self, elements: u32) -> GlobalF32 {
        GlobalF32 {
            ptr: self.ptr,
            plus: self.plus + elements,
        }
    }

    fn offset_bytes(self) -> u32 {
        4 * self.plus
    }
}

#[cfg(test)]
mod tests {
    //! Division by a constant as emitted (multiplies and shifts) against the division
    //! instruction, on the executor, for u32 and for u64 indices; TF32 conversions by
    //! integer operations against `cvt.rna`.

    use super::*;
    use crate::exec::{Arg, Memory, run};

    const DIVISORS: [u64; 12] = [1, 2, 3, 7, 9, 10, 32, 100, 641, 4095, 65_537, 4_000_000_007];

    /// Thread t of block b hashes (b, t) into a numerator and writes 1 where each constant's
    /// quotient and remainder equal the division instruction's.
    fn kernel(wide: bool) -> Kernel {
        let mut k = KernelBuilder::new("divide_test", 128, wide);
        let out = k.ptr_param("out");
        let t = k.global_thread();
        // spread over the whole range: t·φ (mod 2^bits)
        let n = k.idx_mul_const(
            t,
            0x9e37_79b9_7f4a_7c15 & if wide { u64::MAX } else { 0xffff_ffff },
        );
        let all = k.u32(1);
        for d in DIVISORS
            .into_iter()
            .filter(|&d| wide || d <= u32::MAX as u64)
        {
            for op in [BinOp::Div, BinOp::Rem] {
                let fast = match op {
                    BinOp::Div => k.idx_div_const(n, d),
                    _ => k.idx_rem_const(n, d),
                };
                let divisor = k.idx_const(d);
                let slow = k.ibin(op, n, divisor.into());
                let same = Pred(k.def(Ty::Pred, |dst| Inst::Setp {
                    cmp: Cmp::Eq,
                    dst,
                    a: fast.into(),
                    b: slow.into(),
                }));
                let one = k.select_u(same, 1u32, 0u32);
                let both = k.ubin(BinOp::And, all, one);
                k.assign_u(all, both);
            }
        }
        let flag = k.f32_from_u32(all);
        k.store(out, t, flag);
        k.finish()
    }

    #[test]
    fn constant_divisions_match_the_division_instruction() {
        for wide in [false, true] {
            let mut mem = Memory::new();
            let out = mem.alloc(4 * 128 * 64);
            run(&kernel(wide), [64, 1], &[Arg::Ptr(out)], &mem).unwrap();
            let flags = mem.read_f32(out, 128 * 64);
            assert!(flags.iter().all(|&f| f == 1.0), "wide {wide}: {flags:?}");
        }
    }

    #[test]
    fn tf32_truncation_by_an_and() {
        let mut k = KernelBuilder::new("tf32_test", 64, false);
        let (x, truncated) = (k.ptr_param("x"), k.ptr_param("t"));
        let t = k.tid();
        let v = k.load(x, t);
        let down = k.tf32_truncated(v);
        let down = k.tf32_value(down);
        k.store(truncated, t, down);
        let kernel = k.finish();

        let mut values: Vec<f32> = vec![1.0, -1.0, 0.0, -0.0, 1e-40, -3.5e-39, 3.0e38, -2.5e-20];
        // half a TF32 ulp above 1 and below -3, their neighbours, and a spread
        values.extend([
            f32::from_bits(0x3f80_1000),
            f32::from_bits(0x3f80_0fff),
            f32::from_bits(0xc040_1000),
            f32::from_bits(0x3f80_1001),
        ]);
        values.extend((0..40).map(|i| ((i * 7919) % 1000) as f32 * 0.0137 - 6.1));
        values.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x7fff_ffff),
        ]);
        let mut mem = Memory::new();
        let px = mem.alloc_f32(&values);
        let pt = mem.alloc(4 * 64);
        run(&kernel, [1, 1], &[Arg::Ptr(px), Arg::Ptr(pt)], &mem).unwrap();
        let got = mem.read_f32(pt, values.len());
        for (&v, &t) in values.iter().zip(&got) {
            assert_eq!(t.to_bits(), v.to_bits() & TF32_MASK, "truncating {v:e}");
            if !v.is_finite() {
                assert!(t.is_nan() == v.is_nan() && t.is_infinite() == v.is_infinite());
            }
        }
    }

    #[test]
    #[ignore = "needs ptxas: run scripts/test.sh (it installs ptxas into .tools/)"]
    fn constant_divisions_assemble() {
        let ptxas = crate::ptxas::find().expect("ptxas not found: run scripts/install-ptxas.sh");
        for (wide, multiply) in [(false, "mul.hi.u32"), (true, "mul.hi.u64")] {
            for arch in ["sm_80", "sm_90"] {
                let module = crate::ptx::module(&[&kernel(wide)], arch);
                assert!(module.contains(multiply), "{module}");
                crate::ptxas::assemble(&ptxas, &module, arch).unwrap();
            }
        }
    }
}
