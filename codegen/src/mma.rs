//! Tensor-core instructions as data: each one's shape, and where every lane's fragment
//! registers sit in its A (m × k), B (k × n) and C/D (m × n) tiles. The GEMM lowering places
//! its operand loads and accumulators by this table and the CPU executor gathers and scatters
//! lanes by it, so that another instruction (m16n8k16 BF16) is another entry for both.

/// Where a fragment's registers sit. Register `i` of the lane with group `g = lane / 4` and
/// thread-in-group `t = lane % 4` holds the element at row `row.0·g + row.1·t + offsets[i].0`
/// and column `col.0·g + col.1·t + offsets[i].1` of its tile (for B, rows are k).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    pub row: (u32, u32),
    pub col: (u32, u32),
    pub offsets: &'static [(u32, u32)],
}

impl Fragment {
    /// Registers per lane.
    pub fn registers(&self) -> usize {
        self.offsets.len()
    }

    /// (row, column) of register `register` of lane `lane` (0 to 31).
    pub fn at(&self, lane: u32, register: usize) -> (usize, usize) {
        let (g, t) = (lane / 4, lane % 4);
        let (dr, dc) = self.offsets[register];
        let row = self.row.0 * g + self.row.1 * t + dr;
        let col = self.col.0 * g + self.col.1 * t + dc;
        (row as usize, col as usize)
    }

    /// The distinct row offsets, in the order registers first reach them: a thread's lines of
    /// the tile, one per offset.
    pub fn row_offsets(&self) -> Vec<u32> {
        distinct(self.offsets.iter().map(|o| o.0))
    }

    /// The distinct column offsets, in the order registers first reach them.
    pub fn col_offsets(&self) -> Vec<u32> {
        distinct(self.offsets.iter().map(|o| o.1))
    }

    /// Register `register`'s (row, column) offset as positions in [`Self::row_offsets`] and
    /// [`Self::col_offsets`]: which of the thread's lines it lies on.
    pub fn line_of(&self, register: usize) -> (usize, usize) {
        let (dr, dc) = self.offsets[register];
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

/// A warp-wide `mma.sync`: D (m × n) = A (m × k) · B (k × n) + C, in fragments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mma {
    /// The PTX shape and types.
    pub name: &'static str,
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub a: Fragment,
    pub b: Fragment,
    /// C and D alike.
    pub c: Fragment,
}

/// `mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32`: A[g + 8·(i % 2)][t + 4·(i / 2)],
/// B[t + 4·i][g], C[g + 8·(i / 2)][2t + i % 2] (PTX ISA, "Matrix Fragments for mma.m16n8k8").
pub const TF32_M16N8K8: Mma = Mma {
    name: "m16n8k8.row.col.f32.tf32.tf32.f32",
    m: 16,
    n: 8,
    k: 8,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The warp's 32 lanes cover every element of each tile exactly once.
    fn covers(fragment: &Fragment, rows: u32, cols: u32) {
        let mut seen = vec![0u32; (rows * cols) as usize];
        for lane in 0..32 {
            for i in 0..fragment.registers() {
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
        let all: &[Mma] = &[TF32_M16N8K8];
        for mma in all {
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

    #[test]
    fn lines_are_numbered_in_the_order_registers_reach_them() {
        let c = TF32_M16N8K8.c;
        assert_eq!((c.row_offsets(), c.col_offsets()), (vec![0, 8], vec![0, 1]));
        let lines: Vec<_> = (0..4).map(|i| c.line_of(i)).collect();
        assert_eq!(lines, [(0, 0), (0, 1), (1, 0), (1, 1)]);
        assert_eq!(TF32_M16N8K8.a.line_of(3), (1, 1));
    }
}
