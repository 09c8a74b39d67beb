//! The CPU reference's matrix product, `c = a·b` or `c += a·b`, defined element by element:
//! every output is one chain of fused multiply-adds over k in order,
//! `c ← fma(a[i,k], b[k,j], c)` for k = 0, 1, …, starting from zero (or from the element's
//! value when accumulating). Blocking, threads and the instruction set decide only which
//! elements are computed side by side, never that chain, so a product has the same bits on
//! every x86-64 CPU and at every thread count, and so does everything the reference computes
//! from it. General-purpose GEMM crates (`gemm`, `matrixmultiply`, BLAS) choose their K
//! blocking from the CPU's caches and their kernels by instruction set: their results, and
//! training runs built on them, differ from one CPU to another.
//!
//! The kernel is the classic packed one: `KC` steps of k at a time, panels of `MR` rows of `a`
//! and `NR` columns of `b` copied contiguously, an `MR × NR` block of accumulators in
//! registers, resumed from `c` between k blocks (an f32 store and load are exact, so the chain
//! goes on unchanged). One generic kernel is compiled for AVX-512, for AVX2 with FMA and for
//! the x86-64 baseline (where `fma` is a library call: slow, the same bits), chosen at run time.

use rayon::prelude::*;

/// A read-only matrix view with arbitrary strides (so transposes are free).
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `rows × cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transposed view.
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Rows `first..first + count` as a matrix of their own.
    fn row_range(self, first: usize, count: usize) -> Self {
        Mat {
            data: &self.data[first * self.row_stride..],
            rows: count,
            ..self
        }
    }

    fn last_index(&self) -> usize {
        (self.rows.max(1) - 1) * self.row_stride + (self.cols.max(1) - 1) * self.col_stride
    }
}

/// `c = a·b` (or `c += a·b` when `accumulate`), with `c` row-major `a.rows × b.cols`, each
/// element one in-order chain of fused multiply-adds (module docs). `parallel` spreads row
/// blocks over the rayon threads; leave it off inside already-parallel loops. The result is the
/// same either way.
pub fn matmul<T: Element>(a: Mat<T>, b: Mat<T>, c: &mut [T], accumulate: bool, parallel: bool) {
    matmul_with(Isa::chosen(), a, b, c, accumulate, parallel);
}

/// [`matmul`] with the kernel compiled for `isa`, which the CPU must support.
pub fn matmul_with<T: Element>(
    isa: Isa,
    a: Mat<T>,
    b: Mat<T>,
    c: &mut [T],
    accumulate: bool,
    parallel: bool,
) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    assert_eq!(c.len(), a.rows * b.cols, "matmul: output size");
    assert!(isa.is_supported(), "matmul: {isa:?} is not supported here");
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            c.fill(T::zero());
        }
        return;
    }
    assert!(a.last_index() < a.data.len() && b.last_index() < b.data.len());
    let n = b.cols;
    if parallel && a.rows > MC {
        c.par_chunks_mut(MC * n)
            .enumerate()
            .for_each(|(block, c_rows)| {
                let rows = a.row_range(block * MC, c_rows.len() / n);
                T::product(isa, rows, b, c_rows, accumulate);
            });
    } else {
        T::product(isa, a, b, c, accumulate);
    }
}

/// Instruction sets the kernel is compiled for. Each computes the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Any CPU: SSE2 on x86-64, with `fma` as a library call.
    Baseline,
    /// AVX2 and FMA (Intel since 2013, AMD since 2015).
    Avx2,
    /// AVX-512 foundation and FMA.
    Avx512,
}

/// A value of [`ISA_VARIABLE`] that names no instruction set this CPU runs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{ISA_VARIABLE}={value}: {problem}")]
pub struct IsaError {
    pub value: String,
    pub problem: &'static str,
}

/// The environment variable that picks the products' instruction set (`baseline`, `avx2`,
/// `avx512`): the same results, at another speed, which is how a user sees for themselves that
/// results do not depend on the CPU.
pub const ISA_VARIABLE: &str = "FISHERC_MATMUL_ISA";

impl Isa {
    /// The instruction set every product runs on: the one [`ISA_VARIABLE`] names, else the
    /// widest this CPU runs (a name that [`Isa::from_env`] refuses counts as none).
    pub fn chosen() -> Isa {
        static CHOSEN: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| Isa::from_env().ok().flatten().unwrap_or_else(Isa::detected))
    }

    /// The instruction set [`ISA_VARIABLE`] names, if it is set; an error for a name that is
    /// not one, or one this CPU does not run.
    pub fn from_env() -> Result<Option<Isa>, IsaError> {
        let Ok(value) = std::env::var(ISA_VARIABLE) else {
            return Ok(None);
        };
        let error = |problem: &'static str| IsaError {
            value: value.clone(),
            problem,
        };
        let isa = match value.trim().to_ascii_lowercase().as_str() {
            "baseline" => Isa::Baseline,
            "avx2" => Isa::Avx2,
            "avx512" => Isa::Avx512,
            _ => return Err(error("expected baseline, avx2 or avx512")),
        };
        match isa.is_supported() {
            true => Ok(Some(isa)),
            false => Err(error("this CPU does not run it")),
        }
    }

    /// The widest instruction set this CPU runs.
    pub fn detected() -> Isa {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.is_supported())
            .unwrap_or(Isa::Baseline)
    }

    /// Every instruction set this CPU runs, the baseline first.
    pub fn supported() -> Vec<Isa> {
        [Isa::Baseline, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }

    pub fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Baseline => true,
                Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                Isa::Avx512 => {
                    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Baseline
        }
    }
}

/// Steps of k packed at a time: an `NR`-column panel of `b` stays in the L1 cache.
const KC: usize = 256;
/// Rows of `a` packed at a time (and a parallel task's rows).
const MC: usize = 96;
/// Columns of `b` packed at a time.
const NC: usize = 512;

/// Element types the product is compiled for: each picks its kernels' register blocks.
pub trait Element: num_traits::Float + Send + Sync + 'static {
    /// The packed product on `isa`'s kernel, which the CPU supports.
    fn product(isa: Isa, a: Mat<Self>, b: Mat<Self>, c: &mut [Self], accumulate: bool);
}

/// Each element type's kernels, by the vector registers that hold its lanes: `MR × NV` registers
/// of accumulators, 12 × 2 of AVX-512's 32 registers, 6 × 2 of AVX2's 16, and 4 × 4 one-lane
/// ones on the baseline.
macro_rules! element {
    ($t:ty, $avx512:ident, $avx2:ident) => {
        impl Element for $t {
            fn product(isa: Isa, a: Mat<$t>, b: Mat<$t>, c: &mut [$t], accumulate: bool) {
                // SAFETY: `matmul_with` checked that the CPU supports `isa`.
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => unsafe {
                        x86::avx512::<x86::$avx512, 12, 2>(a, b, c, accumulate)
                    },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { x86::avx2::<x86::$avx2, 6, 2>(a, b, c, accumulate) },
                    _ => blocked::<$t, 4, 4>(a, b, c, accumulate),
                }
            }
        }
    };
}

element!(f32, F32x16, F32x8);
element!(f64, F64x8, F64x4);

/// A register of `LANES` elements and the four operations the kernel needs. The element type
/// itself is a one-lane register (`mul_add`: the baseline kernel).
trait Lanes: Copy {
    type Elem: Element;
    const LANES: usize;
    /// # Safety
    /// The CPU supports the register's instruction set (so for all of these).
    unsafe fn zero() -> Self;
    unsafe fn splat(x: Self::Elem) -> Self;
    /// # Safety
    /// `p` points at `LANES` readable elements.
    unsafe fn load(p: *const Self::Elem) -> Self;
    /// # Safety
    /// `p` points at `LANES` writable elements.
    unsafe fn store(self, p: *mut Self::Elem);
    /// `a·b + self` rounded once.
    unsafe fn fma(self, a: Self, b: Self) -> Self;
}

impl<T: Element> Lanes for T {
    type Elem = T;
    const LANES: usize = 1;
    unsafe fn zero() -> T {
        T::zero()
    }
    unsafe fn splat(x: T) -> T {
        x
    }
    unsafe fn load(p: *const T) -> T {
        unsafe { *p }
    }
    unsafe fn store(self, p: *mut T) {
        unsafe { *p = self }
    }
    unsafe fn fma(self, a: T, b: T) -> T {
        a.mul_add(b, self)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Lanes, Mat, blocked};

    macro_rules! lanes {
        ($name:ident, $reg:ty, $elem:ty, $lanes:expr, $zero:ident, $splat:ident, $load:ident,
         $store:ident, $fma:ident) => {
            #[derive(Clone, Copy)]
            pub(super) struct $name($reg);

            impl Lanes for $name {
                type Elem = $elem;
                const LANES: usize = $lanes;
                #[inline(always)]
                unsafe fn zero() -> Self {
                    $name(unsafe { $zero() })
                }
                #[inline(always)]
                unsafe fn splat(x: $elem) -> Self {
                    $name(unsafe { $splat(x) })
                }
                #[inline(always)]
                unsafe fn load(p: *const $elem) -> Self {
                    $name(unsafe { $load(p) })
                }
                #[inline(always)]
                unsafe fn store(self, p: *mut $elem) {
                    unsafe { $store(p, self.0) }
                }
                #[inline(always)]
                unsafe fn fma(self, a: Self, b: Self) -> Self {
                    $name(unsafe { $fma(a.0, b.0, self.0) })
                }
            }
        };
    }

    lanes!(
        F32x16,
        __m512,
        f32,
        16,
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_fmadd_ps
    );
    lanes!(
        F64x8,
        __m512d,
        f64,
        8,
        _mm512_setzero_pd,
        _mm512_set1_pd,
        _mm512_loadu_pd,
        _mm512_storeu_pd,
        _mm512_fmadd_pd
    );
    lanes!(
        F32x8,
        __m256,
        f32,
        8,
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_fmadd_ps
    );
    lanes!(
        F64x4,
        __m256d,
        f64,
        4,
        _mm256_setzero_pd,
        _mm256_set1_pd,
        _mm256_loadu_pd,
        _mm256_storeu_pd,
        _mm256_fmadd_pd
    );

    /// # Safety
    /// The CPU supports AVX-512F and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn avx512<V: Lanes, const MR: usize, const NV: usize>(
        a: Mat<V::Elem>,
        b: Mat<V::Elem>,
        c: &mut [V::Elem],
        accumulate: bool,
    ) {
        blocked::<V, MR, NV>(a, b, c, accumulate)
    }

    /// # Safety
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<V: Lanes, const MR: usize, const NV: usize>(
        a: Mat<V::Elem>,
        b: Mat<V::Elem>,
        c: &mut [V::Elem],
        accumulate: bool,
    ) {
        blocked::<V, MR, NV>(a, b, c, accumulate)
    }
}

/// The packed product over `KC × NC` blocks of `b` and `MC × KC` blocks of `a`, with
/// `MR × NV` registers of accumulators; inlined into each instruction set's function so the
/// kernel is compiled for it.
#[inline(always)]
fn blocked<V: Lanes, const MR: usize, const NV: usize>(
    a: Mat<V::Elem>,
    b: Mat<V::Elem>,
    c: &mut [V::Elem],
    accumulate: bool,
) {
    let nr = NV * V::LANES;
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let zero = <V::Elem as num_traits::Zero>::zero();
    let mut a_pack = vec![zero; MC.min(m).next_multiple_of(MR) * KC.min(k)];
    let mut b_pack = vec![zero; NC.min(n).next_multiple_of(nr) * KC.min(k)];
    // an edge tile's rows, full width, so that the registers always move whole
    let mut edge = vec![zero; MR * nr];
    for j0 in (0..n).step_by(NC) {
        let nc = NC.min(n - j0);
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            pack(b.t(), j0, nc, p0, kc, nr, &mut b_pack);
            let resume = accumulate || p0 > 0;
            for i0 in (0..m).step_by(MC) {
                let mc = MC.min(m - i0);
                pack(a, i0, mc, p0, kc, MR, &mut a_pack);
                for jr in (0..nc).step_by(nr) {
                    let b_panel = &b_pack[jr * kc..][..nr * kc];
                    for ir in (0..mc).step_by(MR) {
                        let tile = Tile {
                            row: i0 + ir,
                            col: j0 + jr,
                            rows: MR.min(mc - ir),
                            cols: nr.min(nc - jr),
                            stride: n,
                        };
                        let a_panel = &a_pack[ir * kc..][..MR * kc];
                        // SAFETY: the caller runs this on a CPU with `V`'s instruction set.
                        unsafe {
                            kernel::<V, MR, NV>((a_panel, b_panel), c, &mut edge, tile, resume)
                        };
                    }
                }
            }
        }
    }
}

/// Copies rows `first..first + count` of `m`, columns `p0..p0 + kc`, into panels of `r` rows:
/// a panel holds, for each k in turn, its `r` rows' values (zero past the last row).
#[inline(always)]
fn pack<T: Element>(
    m: Mat<T>,
    first: usize,
    count: usize,
    p0: usize,
    kc: usize,
    r: usize,
    out: &mut [T],
) {
    assert!(first + count <= m.rows && p0 + kc <= m.cols && m.last_index() < m.data.len());
    for (panel, rows) in out[..count.next_multiple_of(r) * kc]
        .chunks_exact_mut(r * kc)
        .enumerate()
    {
        let row0 = first + panel * r;
        let live = r.min(first + count - row0);
        for (p, values) in rows.chunks_exact_mut(r).enumerate() {
            let at = row0 * m.row_stride + (p0 + p) * m.col_stride;
            if m.row_stride == 1 {
                values[..live].copy_from_slice(&m.data[at..at + live]);
            } else {
                for (i, v) in values[..live].iter_mut().enumerate() {
                    // SAFETY: row0 + i < m.rows and p0 + p < m.cols, so the index is at most
                    // `m.last_index()`, which the assert keeps inside the data.
                    *v = unsafe { *m.data.get_unchecked(at + i * m.row_stride) };
                }
            }
            values[live..].fill(T::zero());
        }
    }
}

/// Where an `MR × NR` register block lands in the row-major output.
#[derive(Clone, Copy)]
struct Tile {
    row: usize,
    col: usize,
    /// Rows and columns inside the output (the block's others are padding).
    rows: usize,
    cols: usize,
    stride: usize,
}

/// One register block: `kc` fused multiply-adds into each accumulator, in k order, starting
/// from zero or (`resume`) from the output's value. A tile at the output's edge goes through
/// `edge` (`MR` rows of `NV·LANES`); what lies outside the output there is never stored.
///
/// # Safety
/// The CPU supports `V`'s instruction set; the panels hold `kc` steps of `MR` and
/// `NV·LANES` elements.
#[inline(always)]
unsafe fn kernel<V: Lanes, const MR: usize, const NV: usize>(
    (a_panel, b_panel): (&[V::Elem], &[V::Elem]),
    c: &mut [V::Elem],
    edge: &mut [V::Elem],
    tile: Tile,
    resume: bool,
) {
    let nr = NV * V::LANES;
    let kc = a_panel.len() / MR;
    assert_eq!(b_panel.len(), kc * nr);
    assert_eq!(edge.len(), MR * nr);
    let full = tile.rows == MR && tile.cols == nr;
    let origin = tile.row * tile.stride + tile.col;
    assert!(origin + (tile.rows - 1) * tile.stride + tile.cols <= c.len());
    let (base, stride) = if full {
        (c.as_mut_ptr().wrapping_add(origin), tile.stride)
    } else {
        if resume {
            for (i, row) in edge.chunks_exact_mut(nr).enumerate().take(tile.rows) {
                row[..tile.cols].copy_from_slice(&c[origin + i * tile.stride..][..tile.cols]);
            }
        }
        (edge.as_mut_ptr(), nr)
    };
    unsafe {
        let mut acc = [[V::zero(); NV]; MR];
        if resume {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, reg) in row.iter_mut().enumerate() {
                    *reg = V::load(base.add(i * stride + v * V::LANES));
                }
            }
        }
        let (a_ptr, b_ptr) = (a_panel.as_ptr(), b_panel.as_ptr());
        for p in 0..kc {
            let b: [V; NV] = std::array::from_fn(|v| V::load(b_ptr.add(p * nr + v * V::LANES)));
            for (i, row) in acc.iter_mut().enumerate() {
                let a_i = V::splat(*a_ptr.add(p * MR + i));
                for (reg, &b_v) in row.iter_mut().zip(&b) {
                    *reg = reg.fma(a_i, b_v);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, reg) in row.iter().enumerate() {
                reg.store(base.add(i * stride + v * V::LANES));
            }
        }
    }
    if !full {
        for (i, row) in edge.chunks_exact(nr).enumerate().take(tile.rows) {
            c[origin + i * tile.stride..][..tile.cols].copy_from_slice(&row[..tile.cols]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl<T: Copy> Mat<'_, T> {
        fn at(&self, row: usize, col: usize) -> T {
            self.data[row * self.row_stride + col * self.col_stride]
        }
    }

    /// The definition: each element one in-order chain of fused multiply-adds.
    fn chain<T: Element>(a: Mat<T>, b: Mat<T>, c: &mut [T], accumulate: bool) {
        for i in 0..a.rows {
            for j in 0..b.cols {
                let out = &mut c[i * b.cols + j];
                let mut sum = if accumulate { *out } else { T::zero() };
                for p in 0..a.cols {
                    sum = a.at(i, p).mul_add(b.at(p, j), sum);
                }
                *out = sum;
            }
        }
    }

    /// Values whose products and sums round, with a spread of magnitudes and signs.
    fn values<T: Element>(len: usize, seed: u64) -> Vec<T> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let unit = (state >> 11) as f64 / (1u64 << 53) as f64;
                T::from((unit - 0.5) * 2f64.powi((state % 7) as i32 - 3)).expect("a small float")
            })
            .collect()
    }

    /// Every shape class: edges smaller than a register block, several k blocks, several row
    /// and column blocks, transposed operands, accumulation.
    fn check<T: Element>() {
        let shapes = [
            (1, 1, 1),
            (5, 3, 7),
            (9, 17, 33),
            (13, 300, 40),
            (100, 9, 600),
            (200, 520, 19),
        ];
        for isa in Isa::supported() {
            for (index, &(m, k, n)) in shapes.iter().enumerate() {
                let seed = index as u64;
                let a_data: Vec<T> = values(m * k, seed);
                let b_data: Vec<T> = values(k * n, seed + 100);
                let views = [
                    (Mat::new(&a_data, m, k), Mat::new(&b_data, k, n)),
                    (Mat::new(&a_data, k, m).t(), Mat::new(&b_data, n, k).t()),
                ];
                for (a, b) in views {
                    for accumulate in [false, true] {
                        for parallel in [false, true] {
                            let start: Vec<T> = values(m * n, seed + 200);
                            let (mut got, mut want) = (start.clone(), start);
                            matmul_with(isa, a, b, &mut got, accumulate, parallel);
                            chain(a, b, &mut want, accumulate);
                            let same = got.iter().zip(&want).all(|(g, w)| {
                                g.to_f64().map(f64::to_bits) == w.to_f64().map(f64::to_bits)
                            });
                            assert!(
                                same,
                                "{isa:?} {m}x{k}x{n} accumulate {accumulate} parallel {parallel}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_instruction_set_computes_the_defining_chain_bit_for_bit_in_f32() {
        check::<f32>();
    }

    #[test]
    fn every_instruction_set_computes_the_defining_chain_bit_for_bit_in_f64() {
        check::<f64>();
    }

    #[test]
    fn empty_products_leave_or_clear_the_output() {
        let (a, b) = (Mat::new(&[] as &[f32], 2, 0), Mat::new(&[] as &[f32], 0, 3));
        let mut c = vec![1.5f32; 6];
        matmul(a, b, &mut c, true, false);
        assert_eq!(c, vec![1.5; 6]);
        matmul(a, b, &mut c, false, false);
        assert_eq!(c, vec![0.0; 6]);
    }
}
