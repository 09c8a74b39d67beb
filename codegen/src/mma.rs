//! Tensor-core instructions as data: each one's shape, operand type, and where every lane's
//! fragment elements sit in its A (m × k), B (k × n) and C/D (m × n) tiles. The GEMM lowering
//! places its operand loads and accumulators by this table and the CPU executor gathers and
//! scatters lanes by it, so that another instruction is another entry for both: m16n8k8 TF32
//! (one element a register) and m16n8k16 BF16 (two a register).

/// Where a fragment's elements sit. Element `i` of the lane with group `g = lane / 4` and
/// thread-in-group `t = lane % 4` is at row `row.0·g + row.1·t + offsets[i].0` and column
/// `col.0·g + col.1·t + offsets[i].1` of its tile (for B, rows are k). Elements fill the
/// lane's 32-bit registers in order, [`Operand::per_register`] to a register, the first in
/// the low bits (C and D: one f32 each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    pub row: (u32, u32),
    pub col: (u32, u32),
    pub offsets: &'static [(u32, u32)],
}

impl Fragment {
    /// Elements per lane.
    pub fn elements(&self) -> usize {
        self.offsets.len()
    }

    /// (row, column) of element `element` of lane `lane` (0 to 31).
    pub fn at(&self, lane: u32, element: usize) -> (usize, usize) {
        let (g, t) = (lane / 4, lane % 4);
        let (dr, dc) = self.offsets[element];
        let row = self.row.0 * g + self.row.1 * t + dr;
        let col = self.col.0 * g + self.col.1 * t + dc;
        (row as usize, col as usize)
    }

    /// The distinct row offsets, in the order elements first reach them: a thread's lines of
    /// the tile, one per offset.
    pub fn row_offsets(&self) -> Vec<u32> {
        distinct(self.offsets.iter().map(|o| o.0))
    }

    /// The distinct column offsets, in the order elements first reach them.
    pub fn col_offsets(&self) -> Vec<u32> {
        distinct(self.offsets.iter().map(|o| o.1))
    }

    /// Element `element`'s (row, column) offset as positions in [`Self::row_offsets`] and
    /// [`Self::col_offsets`]: which of the thread's lines it lies on.
    pub fn line_of(&self, element: usize) -> (usize, usize) {
        let (dr, dc) = self.offsets[element];
        let position = |all: Vec<u32>, v: u32| all.iter().position(|&x| x == v).expect("listed");
        (
            position(self.row_offsets(), dr),
            position(self.col_offsets(), dc),
        )
    }
}

fn distinct(values: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    for v in values {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// The type of A's and B's elements (C and D are f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    /// An f32 register of which the mma reads the top 19 bits (a TF32 value).
    Tf32,
    /// Two bfloat16 in a register.
    Bf16,
}

impl Operand {
    /// Elements a 32-bit register holds.
    pub fn per_register(self) -> usize {
        match self {
            Operand::Tf32 => 1,
            Operand::Bf16 => 2,
        }
    }

    /// The value of element `half` (0: the low bits) of register bits `bits`.
    pub fn value(self, bits: u32, half: usize) -> f32 {
        match self {
            Operand::Tf32 => f32::from_bits(bits),
            Operand::Bf16 => f32::from_bits((bits >> (16 * half)) << 16),
        }
    }
}

/// A warp-wide `mma.sync`: D (m × n) = A (m × k) · B (k × n) + C, in fragments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mma {
    /// The PTX shape and types.
    pub name: &'static str,
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub operand: Operand,
    pub a: Fragment,
    pub b: Fragment,
    /// C and D alike.
    pub c: Fragment,
}

impl Mma {
    /// A lane's 32-bit registers of A, of B, and of C (or D).
    pub fn registers(&self) -> [usize; 3] {
        let per = self.operand.per_register();
        [
            self.a.elements() / per,
            self.b.elements() / per,
            self.c.elements(),
        ]
    }
}

/// `mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32`: A[g + 8·(i % 2)][t + 4·(i / 2)],
/// B[t + 4·i][g], C[g + 8·(i / 2)][2t + i % 2] (PTX ISA, "Matrix Fragments for mma.m16n8k8").
pub const TF32_M16N8K8: Mma = Mma {
    name: "m16n8k8.row.col.f32.tf32.tf32.f32",
    m: 16,
    n: 8,
    k: 8,
    operand: Operand::Tf32,
    a: Fragment {
        row: (1, 0),
        col: (0, 1),
        offsets: &[(0, 0), (8, 0), (0, 4), (8, 4)],
    },
    b: Fragment {
        row: (0, 1),
        col: (1, 0),
        offsets: &[(0, 0), (4, 0)],
    },
    c: Fragment {
        row: (1, 0),
        col: (0, 2),
        offsets: &[(0, 0), (0, 1), (8, 0), (8, 1)],
    },
};

/// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`: A[g + 8·(i / 2 % 2)][2t + i % 2 +
/// 8·(i / 4)], B[2t + i % 2 + 8·(i / 2)][g], C as [`TF32_M16N8K8`]'s (PTX ISA, "Matrix
/// Fragments for mma.m16n8k16 with floating point type").
pub const BF16_M16N8K16: Mma = Mma {
    name: "m16n8k16.row.col.f32.bf16.bf16.f32",
    m: 16,
    n: 8,
    k: 16,
    operand: Operand::Bf16,
    a: Fragment {
        row: (1, 0),
        col: (0, 2),
        offsets: &[
            (0, 0),
            (0, 1),
            (8, 0),
            (8, 1),
            (0, 8),
            (0, 9),
            (8, 8),
            (8, 9),
        ],
    },
    b: Fragment {
        row: (0, 2),
        col: (1, 0),
        offsets: &[(0, 0), (1, 0), (8, 0), (9, 0)],
    },
    c: TF32_M16N8K8.c,
};

/// Every instruction of the table.
pub const ALL: [Mma; 2] = [TF32_M16N8K8, BF16_M16N8K16];

#[cfg(test)]
mod tests {
    use super::*;

    /// The warp's 32 lanes cover every element of each tile exactly once.
    fn covers(fragment: &Fragment, rows: u32, cols: u32) {
        let mut seen = vec![0u32; (rows * cols) as usize];
        for lane in 0..32 {
            for i in 0..fragment.elements() {
                let (r, c) = fragment.at(lane, i);
                assert!(
                    r < rows as usize && c < cols as usize,
                    "lane {lane} reg {i}"
                );
                seen[r * cols as usize + c] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
    }

    #[test]
    fn every_fragment_covers_its_tile_once() {
        for mma in ALL {
            covers(&mma.a, mma.m, mma.k);
            covers(&mma.b, mma.k, mma.n);
            covers(&mma.c, mma.m, mma.n);
        }
    }

    /// The PTX ISA's formulas for m16n8k8 TF32 ("Matrix Fragments for mma.m16n8k8"), which
    /// the GPU runs: the table must say the same.
    #[test]
    fn tf32_fragments_are_the_ptx_isas() {
        let mma = TF32_M16N8K8;
        for lane in 0..32 {
            let (g, t) = ((lane / 4) as usize, (lane % 4) as usize);
            for i in 0..4 {
                assert_eq!(mma.a.at(lane, i), (g + 8 * (i % 2), t + 4 * (i / 2)));
                assert_eq!(mma.c.at(lane, i), (g + 8 * (i / 2), 2 * t + i % 2));
            }
            for i in 0..2 {
                assert_eq!(mma.b.at(lane, i), (t + 4 * i, g));
            }
        }
    }

    /// The PTX ISA's formulas for m16n8k16 BF16: A's a0..a7, B's b0..b3 (two to a
    /// register, the lower index in the low half).
    #[test]
    fn bf16_fragments_are_the_ptx_isas() {
        let mma = BF16_M16N8K16;
        for lane in 0..32 {
            let (g, t) = ((lane / 4) as usize, (lane % 4) as usize);
            for i in 0..8 {
                let row = g + if i % 4 < 2 { 0 } else { 8 };
                let col = 2 * t + (i & 1) + if i < 4 { 0 } else { 8 };
                assert_eq!(mma.a.at(lane, i), (row, col), "a{i}");
            }
            for i in 0..4 {
                let k = 2 * t + (i & 1) + if i < 2 { 0 } else { 8 };
                assert_eq!(mma.b.at(lane, i), (k, g), "b{i}");
            }
            for i in 0..4 {
                assert_eq!(mma.c.at(lane, i), (g + 8 * (i / 2), 2 * t + i % 2));
            }
        }
        assert_eq!(mma.registers(), [4, 2, 4]);
        assert_eq!(TF32_M16N8K8.registers(), [4, 2, 4]);
    }

    #[test]
    fn bf16_pairs_read_low_half_first() {
        let (one, minus_two) = (0x3f80u32, 0xc000u32);
        let bits = minus_two << 16 | one;
        assert_eq!(Operand::Bf16.value(bits, 0), 1.0);
        assert_eq!(Operand::Bf16.value(bits, 1), -2.0);
        assert_eq!(Operand::Tf32.value(1.5f32.to_bits(), 0), 1.5);
    }

    #[test]
    fn lines_are_numbered_in_the_order_registers_reach_them() {
        let c = TF32_M16N8K8.c;
        assert_eq!((c.row_offsets(), c.col_offsets()), (vec![0, 8], vec![0, 1]));
        let lines: Vec<_> = (0..4).map(|i| c.line_of(i)).collect();
        assert_eq!(lines, [(0, 0), (0, 1), (1, 0), (1, 1)]);
        assert_eq!(TF32_M16N8K8.a.line_of(3), (1, 1));
    }
}
