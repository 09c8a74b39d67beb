//! Memory: global loads and stores through element pointers, shared-memory arrays, and
//! asynchronous copies into them.

use super::*;

impl KernelBuilder {
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

    /// A shared-memory array of `len` f32, 16-byte aligned (for vector loads: the arrays
    /// before it take a multiple of 4 words, or padding follows them).
    pub fn shared_aligned(&mut self, len: u32) -> SharedF32 {
        self.shared_bytes = self.shared_bytes.next_multiple_of(16);
        self.shared(len)
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

    /// The `n` (2 or 4) consecutive f32 at `array[index + plus]..`, `plus` a constant, in one
    /// vector load: `index + plus` must be a multiple of `n` (the array is 16-byte aligned).
    pub fn load_shared_vector(
        &mut self,
        array: SharedF32,
        index: impl Into<UOp>,
        plus: u32,
        n: u32,
    ) -> Vec<F32> {
        assert!(matches!(n, 2 | 4), "ld.shared.v{n}");
        assert!(
            array.offset.is_multiple_of(16),
            "{array:?} not 16-byte aligned"
        );
        let addr = self.shared_address(array, index);
        let dst: Vec<Reg> = (0..n).map(|_| self.reg(Ty::F32)).collect();
        self.emit(Inst::LdSharedVector {
            dst: dst.clone(),
            addr,
            offset: 4 * plus as i32,
        });
        dst.into_iter().map(F32).collect()
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
