//! The kernel IR: a GPU kernel one mechanical step above PTX.
//!
//! Instructions are PTX instructions with typed registers (mutable, as PTX's are) and typed
//! immediates. Control flow is structured, `If` and do-while `Loop`, which the PTX renderer
//! turns into labels and predicated branches, and which the CPU executor runs over all threads
//! of a block at once with activity masks. Floating-point instructions are the correctly
//! rounded ones (`add.rn`, `mul.rn`, `fma.rn`, `div.rn`, `sqrt.rn`) unless named approximate,
//! so the executor computes what the GPU computes, bit for bit.

use serde::{Deserialize, Serialize};

/// A register's or immediate's PTX type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Ty {
    Pred,
    U32,
    S32,
    U64,
    F32,
    /// Untyped 32 bits: a TF32 operand of `mma` (an f32 whose low 13 mantissa bits are zero).
    B32,
}

impl Ty {
    /// The PTX type name.
    pub fn ptx(self) -> &'static str {
        match self {
            Ty::Pred => "pred",
            Ty::U32 => "u32",
            Ty::S32 => "s32",
            Ty::U64 => "u64",
            Ty::F32 => "f32",
            Ty::B32 => "b32",
        }
    }

    pub fn bytes(self) -> u32 {
        match self {
            Ty::U64 => 8,
            _ => 4,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reg {
    pub id: u32,
    pub ty: Ty,
}

/// A source operand: a register or a typed immediate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Operand {
    Reg(Reg),
    U32(u32),
    S32(i32),
    U64(u64),
    F32(f32),
}

impl Operand {
    pub fn ty(&self) -> Ty {
        match self {
            Operand::Reg(r) => r.ty,
            Operand::U32(_) => Ty::U32,
            Operand::S32(_) => Ty::S32,
            Operand::U64(_) => Ty::U64,
            Operand::F32(_) => Ty::F32,
        }
    }
}

impl From<Reg> for Operand {
    fn from(r: Reg) -> Operand {
        Operand::Reg(r)
    }
}

/// Special registers (1-D blocks, 2-D grids).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    TidX,
    NtidX,
    CtaidX,
    CtaidY,
    NctaidX,
    NctaidY,
}

impl Special {
    pub fn ptx(self) -> &'static str {
        match self {
            Special::TidX => "%tid.x",
            Special::NtidX => "%ntid.x",
            Special::CtaidX => "%ctaid.x",
            Special::CtaidY => "%ctaid.y",
            Special::NctaidX => "%nctaid.x",
            Special::NctaidY => "%nctaid.y",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    /// Low half for integers, `mul.rn` for f32.
    Mul,
    /// High half of an unsigned product (u32 or u64).
    MulHi,
    /// Integer division, `div.rn` for f32.
    Div,
    Rem,
    Min,
    Max,
    And,
    Or,
    Xor,
    Shl,
    Shr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Abs,
    /// `sqrt.rn.f32`.
    Sqrt,
    /// Bitwise not, or predicate negation.
    Not,
    /// `ex2.approx.f32`: 2ˣ.
    Ex2,
    /// `lg2.approx.f32`: log₂ x.
    Lg2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Global,
    Shared,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Inst {
    Mov {
        dst: Reg,
        src: Operand,
    },
    Special {
        dst: Reg,
        which: Special,
    },
    /// The start of the block's shared memory (a shared-window address).
    SharedBase {
        dst: Reg,
    },
    /// Kernel parameter `index`.
    Param {
        dst: Reg,
        index: usize,
    },
    Bin {
        op: BinOp,
        dst: Reg,
        a: Operand,
        b: Operand,
    },
    /// `fma.rn.f32` for f32, `mad.lo` for integers.
    Fma {
        dst: Reg,
        a: Operand,
        b: Operand,
        c: Operand,
    },
    /// `mul.wide.u32`: the full 64-bit product of two u32.
    MulWide {
        dst: Reg,
        a: Operand,
        b: Operand,
    },
    Un {
        op: UnOp,
        dst: Reg,
        a: Operand,
    },
    /// Conversion between the operand's and the destination's type: f32 from integers rounds
    /// to nearest, integers from f32 round toward zero, u32 from u64 truncates.
    Cvt {
        dst: Reg,
        src: Operand,
    },
    Setp {
        cmp: Cmp,
        dst: Reg,
        a: Operand,
        b: Operand,
    },
    /// `pred ? a : b`.
    Selp {
        dst: Reg,
        a: Operand,
        b: Operand,
        pred: Reg,
    },
    Ld {
        space: Space,
        dst: Reg,
        addr: Reg,
        offset: i32,
    },
    St {
        space: Space,
        addr: Reg,
        offset: i32,
        src: Operand,
    },
    /// `ld.shared.v{N}.f32`: the N (2 or 4) consecutive f32 from shared `addr + offset` (in
    /// bytes), which must be aligned to their size, into `dst` in order.
    LdSharedVector {
        dst: Vec<Reg>,
        addr: Reg,
        offset: i32,
    },
    /// `bar.sync 0`: every thread of the block waits here.
    Bar,
    /// `cp.async.ca.shared.global [dst+dst_offset], [src+src_offset], 4, size`: copies the 4
    /// bytes at global `src + src_offset` to shared `dst + dst_offset` (a shared-window
    /// address; the offsets in bytes) without going through registers, the bytes
    /// past `size` (0 or 4) zero. The copy joins the thread's open group; it has landed only
    /// after a [`Inst::CpAsyncWait`] that covers the group.
    CpAsync {
        dst: Reg,
        dst_offset: u32,
        src: Reg,
        src_offset: u32,
        size: Reg,
    },
    /// `cp.async.commit_group`: closes the thread's open group of copies.
    CpAsyncCommit,
    /// `cp.async.wait_group pending`: waits until all but the `pending` most recent committed
    /// groups of this thread have landed.
    CpAsyncWait {
        pending: u32,
    },
    /// `shfl.sync.down.b32` over the full warp.
    ShflDown {
        dst: Reg,
        src: Reg,
        delta: u32,
    },
    /// `cvt.rn.tf32.f32`: an f32 rounded to TF32 (10 mantissa bits, to nearest, ties to
    /// even), into a `B32` register: one instruction on sm_90, which the executor follows.
    /// sm_80 has no `.rn` form and takes `cvt.rna` (ties away from zero): there a tie (low
    /// 13 bits exactly half, one f32 in 8192) rounds one TF32 ulp away from the executor's.
    CvtTf32 {
        dst: Reg,
        src: Reg,
    },
    /// `cvt.rn.bf16x2.f32`: `hi` and `lo` rounded to bfloat16 (to nearest, ties to even;
    /// NaN to the canonical NaN), packed into a `B32` register, `lo` in the low half.
    CvtBf16x2 {
        dst: Reg,
        hi: Reg,
        lo: Reg,
    },
    /// `mma.sync.aligned` of `shape` (a [`crate::mma`] table entry: m16n8k8 TF32, m16n8k16
    /// BF16): the warp's D = A·B + C, A's and B's elements in `B32` registers (4 and 2 per
    /// lane in both), C and D f32 (4 per lane), where the entry places them. Every lane of
    /// the warp must take part.
    Mma {
        shape: &'static crate::mma::Mma,
        d: [Reg; 4],
        a: [Reg; 4],
        b: [Reg; 2],
        c: [Reg; 4],
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Inst(Inst),
    /// Runs `then` in the threads where `cond` holds.
    If {
        cond: Reg,
        then: Vec<Stmt>,
    },
    /// `do { body } while (repeat)`, per thread.
    Loop {
        body: Vec<Stmt>,
        repeat: Reg,
    },
}

/// A kernel parameter's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamTy {
    /// A device pointer (u64).
    Ptr,
    U32,
    F32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub params: Vec<(String, ParamTy)>,
    /// Threads per block.
    pub block: u32,
    /// Register-tiled kernels (whose tiles must stay in registers) tell ptxas how many blocks
    /// per SM they need (`.minnctapersm`: at 256 threads, 2 allow 128 registers a thread, 3
    /// allow 80); left to itself it spills them to reach a higher occupancy.
    pub blocks_per_sm: Option<u32>,
    /// Bytes of shared memory per block.
    pub shared_bytes: u32,
    /// The main loop, where the lowering states it.
    pub main_loop: Option<MainLoop>,
    /// How a GEMM kernel's product runs, as its lowering chose it.
    pub schedule: Option<GemmSchedule>,
    /// The type of every register, by id.
    pub regs: Vec<Ty>,
    pub body: Vec<Stmt>,
}

impl Kernel {
    pub fn register_tiled(&self) -> bool {
        self.blocks_per_sm.is_some()
    }
}

/// How a GEMM kernel runs, as its lowering chose it (for `fisherc inspect DIR` and cost
/// work): the block's tile of C and its K slice, the slices in flight, the multiply and its
/// tile per warp, and how each side reaches shared memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GemmSchedule {
    /// Rows and columns of C per block, and the K slice staged at a time.
    pub block: [u32; 3],
    /// K slices in shared memory at once.
    pub stages: u32,
    /// `fp32 fma`, `tf32 mma m16n8k8`, `3xtf32 mma m16n8k8`.
    pub multiply: String,
    /// Rows and columns of C per warp (per thread on fp32 FMA).
    pub tile: [u32; 2],
    /// How A and B reach shared memory: `gathered` (element by element, with any
    /// prologue), `patch` (one example's input patch), `halo` (an input halo).
    pub staging: [String; 2],
    /// Words per shared-memory load of the mma fragments, A's and B's (4: `ld.shared.v4`
    /// of a side in fragment order); left out of plan.json where both are 1.
    #[serde(default = "one_word_each", skip_serializing_if = "is_one_word_each")]
    pub fragment_loads: [u32; 2],
}

fn one_word_each() -> [u32; 2] {
    [1, 1]
}

fn is_one_word_each(loads: &[u32; 2]) -> bool {
    *loads == one_word_each()
}

/// A kernel's main loop as its lowering states it, for static cost estimates: each block
/// takes `trips` steps (a GEMM's K slices, times its products), in each of which every warp
/// issues `multiplies` tensor-core mma instructions (or, on fp32, FMAs); a part of the loop
/// behind a branch (staging a convolution's input halo) runs in one step of `branch_every`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MainLoop {
    pub trips: u64,
    pub multiplies: u32,
    #[serde(default = "every_step")]
    pub branch_every: u32,
}

fn every_step() -> u32 {
    1
}

impl MainLoop {
    /// The loop run `products` times over.
    pub fn times(self, products: u64) -> MainLoop {
        MainLoop {
            trips: self.trips * products,
            ..self
        }
    }
}

/// Threads per warp.
pub const WARP: u32 = 32;
