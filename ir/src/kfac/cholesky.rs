//! The Cholesky factor of a damped Kronecker factor on the host, by blocks: each block column
//! is factored and solved in plain loops, and the trailing update (nearly all the work) is
//! [`matmul`]'s product, so the factor has the same bits on every CPU and every thread count,
//! as every other host result.

use super::{KfacError, Matrix};
use crate::matmul::{Mat, matmul};

/// Columns factored at a time: the loops' work is `n·BLOCK²` of the `n³/3` in all.
const BLOCK: usize = 64;
/// Rows of the trailing matrix updated at a time (the product's scratch).
const UPDATE_ROWS: usize = 256;

impl Matrix {
    /// `tr self / n`: a symmetric positive semidefinite matrix's mean eigenvalue.
    pub fn mean_diagonal(&self) -> f64 {
        (0..self.n).map(|i| self.at(i, i)).sum::<f64>() / self.n.max(1) as f64
    }

    /// The lower Cholesky factor L of `self + damping·I` (`L Lᵀ`, zero above the diagonal)
    /// of a symmetric matrix, by blocks; an error where a pivot is not positive. The zero
    /// matrix, undamped (a layer no gradient reached), gives the zero factor.
    pub fn cholesky_blocked(&self, damping: f64) -> Result<Matrix, KfacError> {
        let n = self.n;
        if damping == 0.0 && self.data.iter().all(|&v| v == 0.0) {
            return Ok(Matrix::zeros(n));
        }
        let mut l = self.damped(damping);
        for start in (0..n).step_by(BLOCK) {
            let width = BLOCK.min(n - start);
            factor_diagonal(&mut l, start, width, damping)?;
            solve_panel(&mut l, start, width);
            update_trailing(&mut l, start, width);
        }
        l.clear_upper();
        Ok(l)
    }

    /// Zeros above the diagonal.
    pub(super) fn clear_upper(&mut self) {
        let n = self.n;
        for i in 0..n {
            self.data[i * n + i + 1..(i + 1) * n].fill(0.0);
        }
    }
}

/// The diagonal block at (`start`, `start`), `width` wide, factored in place (the whole
/// matrix at 0, `n` wide: the plain factorisation).
pub(super) fn factor_diagonal(
    l: &mut Matrix,
    start: usize,
    width: usize,
    damping: f64,
) -> Result<(), KfacError> {
    let n = l.n;
    for i in start..start + width {
        for j in start..=i {
            let dot: f64 = (start..j).map(|k| l.at(i, k) * l.at(j, k)).sum();
            let value = l.at(i, j) - dot;
            if i == j {
                // not above zero, or NaN
                if value.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                    return Err(KfacError::NotPositiveDefinite {
                        size: n,
                        damping,
                        row: i,
                        pivot: value,
                    });
                }
                l.data[i * n + i] = value.sqrt();
            } else {
                l.data[i * n + j] = value / l.at(j, j);
            }
        }
    }
    Ok(())
}

/// The block column below the diagonal block: `L₂₁ = A₂₁ L₁₁⁻ᵀ`, row by row.
fn solve_panel(l: &mut Matrix, start: usize, width: usize) {
    let n = l.n;
    for i in start + width..n {
        for j in start..start + width {
            let dot: f64 = (start..j).map(|k| l.at(i, k) * l.at(j, k)).sum();
            l.data[i * n + j] = (l.at(i, j) - dot) / l.at(j, j);
        }
    }
}

/// `A₂₂ −= L₂₁ L₂₁ᵀ` on and below the diagonal, `UPDATE_ROWS` rows at a time.
fn update_trailing(l: &mut Matrix, start: usize, width: usize) {
    let (n, first) = (l.n, start + width);
    let mut product = Vec::new();
    for top in (first..n).step_by(UPDATE_ROWS) {
        let rows = UPDATE_ROWS.min(n - top);
        // rows top.. of L₂₁ times the columns of L₂₁ᵀ up to the chunk's last row
        let cols = top + rows - first;
        let panel = |row: usize, count: usize| Mat {
            data: &l.data[row * n + start..],
            rows: count,
            cols: width,
            row_stride: n,
            col_stride: 1,
        };
        product.clear();
        product.resize(rows * cols, 0.0);
        matmul(
            panel(top, rows),
            panel(first, cols).t(),
            &mut product,
            false,
            true,
        );
        for r in 0..rows {
            let row = &mut l.data[(top + r) * n + first..][..top + r + 1 - first];
            let update = &product[r * cols..][..row.len()];
            row.iter_mut().zip(update).for_each(|(a, u)| *a -= u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `B Bᵀ / k` of a random `n × k` B: symmetric, positive semidefinite, of rank `k`.
    fn gram(n: usize, k: usize, seed: u64) -> Matrix {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let b: Vec<f64> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut m = Matrix::zeros(n);
        let b = Mat::new(&b, n, k);
        matmul(b, b.t(), &mut m.data, false, false);
        m.data.iter_mut().for_each(|v| *v /= k as f64);
        m
    }

    /// Sizes around the blocks' and update chunks' edges agree with the plain factorisation
    /// to rounding (seen: 4·10⁻¹⁵ relative), including rank-deficient matrices that only the
    /// damping makes definite.
    #[test]
    fn blocks_agree_with_the_plain_factorisation() {
        for (n, k) in [(1, 3), (63, 80), (64, 64), (65, 20), (200, 300), (321, 100)] {
            let m = gram(n, k, n as u64);
            let (plain, blocked) = (
                m.cholesky_damped(1e-3).unwrap(),
                m.cholesky_blocked(1e-3).unwrap(),
            );
            let scale = plain.data.iter().fold(0f64, |a, v| a.max(v.abs()));
            let worst = plain
                .data
                .iter()
                .zip(&blocked.data)
                .fold(0f64, |a, (p, b)| a.max((p - b).abs()));
            assert!(worst <= 1e-11 * scale, "n {n}: {worst:e} of {scale:e}");
            for i in 0..n {
                assert!((i + 1..n).all(|j| blocked.at(i, j) == 0.0), "n {n} row {i}");
            }
        }
    }

    #[test]
    fn an_indefinite_matrix_is_an_error_naming_its_row() {
        let mut m = gram(100, 200, 3);
        m.data[70 * 100 + 70] = -5.0;
        let err = m.cholesky_blocked(1e-3).unwrap_err();
        assert!(
            matches!(
                err,
                KfacError::NotPositiveDefinite {
                    row: 70,
                    size: 100,
                    ..
                }
            ),
            "{err}"
        );
    }
}
