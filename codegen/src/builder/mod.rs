//! A typed builder for kernels: registers are typed by what they hold (`F32`, `U32`, `S32`,
//! `U64`, `Pred`, and `Idx` for element indices), so an f32 cannot be added to a pointer by
//! accident; every method emits one or a few kernel-IR instructions. This file holds the
//! builder itself, its parameters and special registers; the methods are split by concern:
//! [`arith`], [`memory`], [`mma`] and [`control`].
//!
//! Element indices (`Idx`) are u32 or u64, chosen per kernel by the largest tensor it
//! addresses: u32 arithmetic is much cheaper on the GPU, u64 is needed past 2³² elements.

use crate::kir::{
    BinOp, Cmp, GemmSchedule, Inst, Kernel, MainLoop, Operand, ParamTy, Reg, Space, Special, Stmt,
    Ty, UnOp, WARP,
};
use crate::magic::Divide;

mod arith;
mod control;
mod memory;
mod mma;

pub use memory::{AnyIdx, GlobalF32};

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

typed_reg!(F32, U32, S32, U64, Pred, Idx, Tf32, Bf16x2);

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
    schedule: Option<GemmSchedule>,
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
            schedule: None,
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
            schedule: self.schedule,
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

    /// Records how the kernel's GEMM runs (see [`GemmSchedule`]).
    pub fn note_schedule(&mut self, schedule: GemmSchedule) {
        self.schedule = Some(schedule);
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
}

#[cfg(test)]
mod tests {
    //! Division by a constant as emitted (multiplies and shifts) against the division
    //! instruction, on the executor, for u32 and for u64 indices; TF32 conversions by
    //! an `and` against the bits.

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
