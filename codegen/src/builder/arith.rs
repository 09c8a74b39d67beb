//! Arithmetic: f32, u32, u64 and s32 registers, predicates, and element indices (`Idx`),
//! whose width the kernel chose.

use super::*;

impl KernelBuilder {
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

    pub(super) fn ibin(&mut self, op: BinOp, a: Idx, b: Operand) -> Idx {
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
}
