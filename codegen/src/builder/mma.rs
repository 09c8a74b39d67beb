//! Tensor cores: TF32 and BF16 conversions and the `mma` instructions of [`crate::mma`].

use super::*;
use crate::mma::{BF16_M16N8K16, Mma, TF32_M16N8K8};

impl KernelBuilder {
    // ---- tensor cores ----

    /// `v` rounded to TF32 (to nearest, ties to even: `Inst::CvtTf32`), the form `mma_tf32`
    /// takes.
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
    /// in [`TF32_M16N8K8`]). Every lane of the warp must run it.
    pub fn mma_tf32(&mut self, a: [Tf32; 4], b: [Tf32; 2], c: [F32; 4]) -> [F32; 4] {
        let d = [0; 4].map(|_| F32(self.reg(Ty::F32)));
        self.mma(&TF32_M16N8K8, d, (a.map(|r| r.0), b.map(|r| r.0)), c);
        d
    }

    /// [`Self::mma_tf32`] accumulating into `acc` (D and C the same registers).
    pub fn mma_tf32_into(&mut self, acc: [F32; 4], a: [Tf32; 4], b: [Tf32; 2]) {
        self.mma(&TF32_M16N8K8, acc, (a.map(|r| r.0), b.map(|r| r.0)), acc);
    }

    /// `d = a·b + c` by the table's `shape`.
    fn mma(&mut self, shape: &'static Mma, d: [F32; 4], (a, b): ([Reg; 4], [Reg; 2]), c: [F32; 4]) {
        self.emit(Inst::Mma {
            shape,
            d: d.map(|r| r.0),
            a,
            b,
            c: c.map(|r| r.0),
        });
    }

    /// `hi` and `lo` rounded to bfloat16 (to nearest, ties to even) and packed, `lo` in the
    /// low half: an element pair of a BF16 `mma` operand.
    pub fn bf16x2(&mut self, lo: F32, hi: F32) -> Bf16x2 {
        Bf16x2(self.def(Ty::B32, |dst| Inst::CvtBf16x2 {
            dst,
            hi: hi.0,
            lo: lo.0,
        }))
    }

    /// One warp-wide `mma.sync` m16n8k16 BF16 with f32 accumulation: D = A·B + C with this
    /// lane's fragments (layout in [`BF16_M16N8K16`]). Every lane of the warp must run it.
    pub fn mma_bf16(&mut self, a: [Bf16x2; 4], b: [Bf16x2; 2], c: [F32; 4]) -> [F32; 4] {
        let d = [0; 4].map(|_| F32(self.reg(Ty::F32)));
        self.mma(&BF16_M16N8K16, d, (a.map(|r| r.0), b.map(|r| r.0)), c);
        d
    }
}
