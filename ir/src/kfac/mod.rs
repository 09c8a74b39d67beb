//! K-FAC noise (supplement A.6; issue #23), in f64: a convolution's or linear layer's
//! Kronecker factors and the noise they shape. The reference the compiled step will be held
//! to; the K-FAC ops compute it in a step.
//!
//! For a layer with input patches `a` (length `c·kh·kw`, and a constant 1 appended where the
//! layer has a bias) and per-example output gradients `g = M·dy` (length `o`; `M·dy` is
//! example n's own loss gradient, as in the ops' Fisher rules), over the batch and the
//! layer's `T` output positions:
//!
//! * `Ā = E_{n,t}[a aᵀ]`, `Ḡ = E_{n,t}[g gᵀ]` ([`Factors`]);
//! * the layer's Fisher block `F ≈ T · Ā ⊗ Ḡ` over `vec(W̃)`, `W̃ = [W | b]` the `o × cols`
//!   weight with its bias as a last column (Grosse and Martens 2016: derivatives spatially
//!   uncorrelated; T = 1 for a linear layer, where this is the supplement's `A ⊗ G`). Its
//!   diagonal is what the diagonal estimate `(1/M) Σₙ (∇ℓₙ)²` becomes when a and g are
//!   independent and uncorrelated across positions;
//! * with damping λ and Cholesky factors `Ā + λI = L_A L_Aᵀ`, `Ḡ + λI = L_G L_Gᵀ`, the noise
//!   `ε = s · √T · L_G Ξ L_Aᵀ` ([`shape_noise`]), `Ξ` standard normal: covariance
//!   `s²·T·(Ḡ+λI) ⊗ (Ā+λI)` in `W̃`'s row-major order (`Cov[εᵢⱼ, εₖₗ] = s²·T·Gᵢₖ·Aⱼₗ`),
//!   with no matrix square root.
//!
//! `Ξ` is drawn from the same Philox stream as every other noise ([`draw_xi`]): the weight's
//! elements from the weight parameter's stream, the bias column from the bias's.

mod cholesky;

use thiserror::Error;

use crate::cpu::ConvGeom;
use crate::philox;
use crate::tensor::Real;

/// Why K-FAC's arithmetic could not go on.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum KfacError {
    #[error(
        "K-FAC: a factor of size {size} is not positive definite with damping {damping}: \
         pivot {pivot:e} at row {row} (raise kfac_damping)"
    )]
    NotPositiveDefinite {
        size: usize,
        damping: f64,
        row: usize,
        pivot: f64,
    },
    #[error("K-FAC: refreshing the factors: {0}")]
    Refresh(String),
    #[error("K-FAC: {what} holds {found} values, expected {expected}")]
    Length {
        what: &'static str,
        expected: usize,
        found: usize,
    },
}

/// A square matrix, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub n: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    pub fn zeros(n: usize) -> Matrix {
        Matrix {
            n,
            data: vec![0.0; n * n],
        }
    }

    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.n + j]
    }

    /// The lower Cholesky factor L of `self + damping·I` (`L Lᵀ`), for a symmetric matrix, by
    /// the plain triple loop (the reference [`Matrix::cholesky_blocked`] is checked against);
    /// an error where a pivot is not positive (the damped matrix is not positive definite).
    pub fn cholesky_damped(&self, damping: f64) -> Result<Matrix, KfacError> {
        let mut l = self.damped(damping);
        cholesky::factor_diagonal(&mut l, 0, self.n, damping)?;
        l.clear_upper();
        Ok(l)
    }

    /// `self + damping·I`.
    pub fn damped(&self, damping: f64) -> Matrix {
        let mut m = self.clone();
        (0..self.n).for_each(|i| m.data[i * self.n + i] += damping);
        m
    }
}

/// A layer's Kronecker factors (see the module docs): `a` over its input patches (with the
/// bias's constant 1 last where it has one), `g` over its per-example output gradients, and
/// its output positions T.
#[derive(Clone, Debug, PartialEq)]
pub struct Factors {
    pub a: Matrix,
    pub g: Matrix,
    pub positions: usize,
}

impl Factors {
    /// The factors of a convolution of geometry `geom` over a batch: `x` its input
    /// `[M, C, H, W]` and `dy` the mean loss's gradient at its output `[M, O, Ho, Wo]`.
    pub fn conv(geom: ConvGeom, x: &[f64], dy: &[f64], bias: bool) -> Result<Factors, KfacError> {
        let batch = x.len() / geom.input_len().max(1);
        expect_len("the input", x.len(), batch * geom.input_len())?;
        let positions = geom.positions();
        let outputs = dy.len() / (batch * positions).max(1);
        expect_len("the output gradient", dy.len(), batch * outputs * positions)?;
        let cols = geom.patch_len() + bias as usize;
        let (mut a, mut g) = (Matrix::zeros(cols), Matrix::zeros(outputs));
        let mut patches = vec![0.0; geom.patch_len() * positions];
        let mut a_t = vec![1.0; cols];
        let mut g_t = vec![0.0; outputs];
        for n in 0..batch {
            geom.im2col(&x[n * geom.input_len()..][..geom.input_len()], &mut patches);
            let dy_n = &dy[n * outputs * positions..][..outputs * positions];
            for t in 0..positions {
                (0..geom.patch_len()).for_each(|r| a_t[r] = patches[r * positions + t]);
                (0..outputs).for_each(|o| g_t[o] = batch as f64 * dy_n[o * positions + t]);
                add_outer(&mut a, &a_t);
                add_outer(&mut g, &g_t);
            }
        }
        let count = (batch * positions) as f64;
        a.data.iter_mut().for_each(|v| *v /= count);
        g.data.iter_mut().for_each(|v| *v /= count);
        Ok(Factors { a, g, positions })
    }

    /// The factors of a linear layer `[M, inputs] → [M, outputs]` (one position): `x` its
    /// input, `dy` the mean loss's gradient at its output.
    pub fn linear(inputs: usize, x: &[f64], dy: &[f64], bias: bool) -> Result<Factors, KfacError> {
        let geom = ConvGeom {
            channels: inputs,
            height: 1,
            width: 1,
            kernel_h: 1,
            kernel_w: 1,
            stride: 1,
            padding: 0,
            out_h: 1,
            out_w: 1,
        };
        Factors::conv(geom, x, dy, bias)
    }

    /// The running average: `decay·self + (1 − decay)·new` for both factors (a layer's
    /// positions do not change).
    pub fn blend(&mut self, new: &Factors, decay: f64) {
        for (old, new) in [(&mut self.a, &new.a), (&mut self.g, &new.g)] {
            old.data
                .iter_mut()
                .zip(&new.data)
                .for_each(|(o, &v)| *o = decay * *o + (1.0 - decay) * v);
        }
    }
}

/// `m += v vᵀ`.
fn add_outer(m: &mut Matrix, v: &[f64]) {
    for (i, &vi) in v.iter().enumerate() {
        let row = &mut m.data[i * m.n..][..m.n];
        row.iter_mut().zip(v).for_each(|(r, &vj)| *r += vi * vj);
    }
}

fn expect_len(what: &'static str, found: usize, expected: usize) -> Result<(), KfacError> {
    if found == expected && expected > 0 {
        Ok(())
    } else {
        Err(KfacError::Length {
            what,
            expected,
            found,
        })
    }
}

/// `ε = s · √T · L_G Ξ L_Aᵀ`: the noise of a layer's `o × cols` weight (with its bias as
/// the last column) from its damped factors' Cholesky factors and a standard normal `Ξ`
/// (`o × cols`, row-major).
pub fn shape_noise(
    (l_g, l_a): (&Matrix, &Matrix),
    xi: &[f64],
    positions: usize,
    scale: f64,
) -> Result<Vec<f64>, KfacError> {
    let (rows, cols) = (l_g.n, l_a.n);
    expect_len("Ξ", xi.len(), rows * cols)?;
    // L_G Ξ, then (L_G Ξ) L_Aᵀ: element (i, j) is Σₗ (L_G Ξ)ᵢₗ · L_A[j][l]
    let mut left = vec![0.0; rows * cols];
    for i in 0..rows {
        for k in 0..=i {
            let g = l_g.at(i, k);
            let row = &mut left[i * cols..][..cols];
            row.iter_mut()
                .zip(&xi[k * cols..][..cols])
                .for_each(|(r, &x)| *r += g * x);
        }
    }
    let factor = scale * (positions as f64).sqrt();
    let mut eps = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let dot: f64 = (0..=j).map(|l| left[i * cols + l] * l_a.at(j, l)).sum();
            eps[i * cols + j] = factor * dot;
        }
    }
    Ok(eps)
}

/// `Ξ` of a layer at `step`: `o × cols` standard normals, the weight's `o × (cols − 1)`
/// (or `o × cols` without a bias) from parameter `weight`'s Philox stream in its row-major
/// order, and the bias column from parameter `bias`'s stream: each parameter's elements
/// draw what its diagonal noise would.
pub fn draw_xi<T: Real>(
    (seed, step): (u64, u64),
    (weight, bias): (u32, Option<u32>),
    (rows, cols): (usize, usize),
) -> Vec<T> {
    let weight_cols = cols - bias.is_some() as usize;
    let mut w = vec![0f32; rows * weight_cols];
    philox::fill_normal(seed, step, weight, &mut w);
    let mut b = vec![0f32; if bias.is_some() { rows } else { 0 }];
    if let Some(bias) = bias {
        philox::fill_normal(seed, step, bias, &mut b);
    }
    (0..rows)
        .flat_map(|i| {
            let row = w[i * weight_cols..][..weight_cols].iter().copied();
            row.chain(b.get(i).copied()).collect::<Vec<_>>()
        })
        .map(T::from_f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{LinearWgradPerExample, OpDef};
    use crate::tensor::{Tensor, TensorType, Value};
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(n: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn geom(channels: usize, size: usize, kernel: usize) -> ConvGeom {
        ConvGeom {
            channels,
            height: size,
            width: size,
            kernel_h: kernel,
            kernel_w: kernel,
            stride: 1,
            padding: kernel / 2,
            out_h: size,
            out_w: size,
        }
    }

    /// Over many steps' draws, the noise's covariance is `s²·T·(Ḡ+λI) ⊗ (Ā+λI)`, off the
    /// diagonal too. Each of the 144 entries within 6 standard errors of its estimate
    /// (`√((σᵢ²σⱼ² + cᵢⱼ²)/K)` for K draws: a false failure has odds far below 10⁻⁶).
    #[test]
    fn sampled_noise_has_the_kronecker_covariance() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // a 2 × 2 convolution of 1 channel to 3, 4 × 4 images, with a bias: W̃ is 3 × (4 + 1)
        let g = ConvGeom {
            kernel_h: 2,
            kernel_w: 2,
            padding: 0,
            out_h: 3,
            out_w: 3,
            ..geom(1, 4, 2)
        };
        let (batch, outputs) = (6, 3);
        let x = random(batch * g.input_len(), &mut rng);
        let dy = random(batch * outputs * g.positions(), &mut rng);
        let f = Factors::conv(g, &x, &dy, true).unwrap();
        let (damping, scale) = (0.1, 0.5);
        let (l_a, l_g) = (
            f.a.cholesky_damped(damping).unwrap(),
            f.g.cholesky_damped(damping).unwrap(),
        );
        let (rows, cols) = (outputs, g.patch_len() + 1);
        let dim = rows * cols;
        let draws = 20_000;
        let mut sum = vec![0.0; dim * dim];
        for step in 0..draws {
            let xi = draw_xi::<f64>((11, step as u64), (3, Some(4)), (rows, cols));
            let eps = shape_noise((&l_g, &l_a), &xi, f.positions, scale).unwrap();
            for p in 0..dim {
                for q in 0..dim {
                    sum[p * dim + q] += eps[p] * eps[q];
                }
            }
        }
        let (a, gm) = (f.a.damped(damping), f.g.damped(damping));
        let want = |p: usize, q: usize| {
            let (i, j, k, l) = (p / cols, p % cols, q / cols, q % cols);
            scale * scale * f.positions as f64 * gm.at(i, k) * a.at(j, l)
        };
        let mut off_diagonal_seen = false;
        for p in 0..dim {
            for q in 0..dim {
                let got = sum[p * dim + q] / draws as f64;
                let (c, vp, vq) = (want(p, q), want(p, p), want(q, q));
                let se = ((vp * vq + c * c) / draws as f64).sqrt();
                assert!(
                    (got - c).abs() <= 6.0 * se,
                    "({p}, {q}): {got} vs {c} ± {se}"
                );
                off_diagonal_seen |= p != q && c.abs() > 20.0 * se;
            }
        }
        assert!(
            off_diagonal_seen,
            "some covariance off the diagonal is clearly not zero"
        );
    }

    /// Where inputs and output gradients are independent (every pairing of a set of inputs
    /// with a set of gradients), K-FAC's diagonal `Ḡᵢᵢ·Āⱼⱼ` is the exact diagonal Fisher
    /// `(1/M) Σₙ (M·cₙ)²` of the per-example contributions the linear layer's own op makes.
    #[test]
    fn independent_inputs_and_gradients_give_the_exact_diagonal() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (inputs, outputs, kinds) = (5, 4, 6);
        let xs = random(kinds * inputs, &mut rng);
        let gs = random(kinds * outputs, &mut rng);
        let batch = kinds * kinds;
        let mut x = Vec::new();
        let mut dy = Vec::new();
        for i in 0..kinds {
            for j in 0..kinds {
                x.extend_from_slice(&xs[i * inputs..][..inputs]);
                dy.extend(
                    gs[j * outputs..][..outputs]
                        .iter()
                        .map(|g| g / batch as f64),
                );
            }
        }
        let f = Factors::linear(inputs, &x, &dy, false).unwrap();
        let contributions = LinearWgradPerExample
            .eval(
                &[
                    &Value::Float(Tensor::from_vec(&[batch, inputs], x.clone())),
                    &Value::Float(Tensor::from_vec(&[batch, outputs], dy.clone())),
                ],
                &[TensorType::f32(&[batch, outputs, inputs])],
            )
            .unwrap()
            .remove(0)
            .into_float();
        for o in 0..outputs {
            for i in 0..inputs {
                let exact: f64 = (0..batch)
                    .map(|n| {
                        (batch as f64 * contributions.data[(n * outputs + o) * inputs + i]).powi(2)
                    })
                    .sum::<f64>()
                    / batch as f64;
                let kfac = f.g.at(o, o) * f.a.at(i, i);
                assert!(
                    (kfac - exact).abs() <= 1e-12 * exact,
                    "({o}, {i}): {kfac} vs {exact}"
                );
            }
        }
        // with each gradient tied to its input (g = the input's first entries), they part
        let tied: Vec<f64> = (0..batch)
            .flat_map(|n| x[n * inputs..][..outputs].iter().map(|v| v / batch as f64))
            .collect();
        let f_tied = Factors::linear(inputs, &x, &tied, false).unwrap();
        let parted = (0..outputs).any(|o| {
            let exact: f64 = (0..batch)
                .map(|n| (x[n * inputs + o] * x[n * inputs + o]).powi(2))
                .sum::<f64>()
                / batch as f64;
            let kfac = f_tied.g.at(o, o) * f_tied.a.at(o, o);
            (kfac - exact).abs() > 0.01 * exact
        });
        assert!(
            parted,
            "correlated a and g: K-FAC's diagonal is not the exact one"
        );
    }

    /// A padded convolution's factors are the means over examples and positions of its
    /// patches' and gradients' outer products, the patches read here straight from the
    /// image (zero outside it) rather than through im2col; the bias's row and column are
    /// the patches' means and a 1.
    #[test]
    fn convolution_factors_are_means_over_examples_and_positions() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (channels, size, batch, outputs) = (2, 5, 3, 4);
        let g = geom(channels, size, 3);
        let x = random(batch * g.input_len(), &mut rng);
        let dy = random(batch * outputs * g.positions(), &mut rng);
        let f = Factors::conv(g, &x, &dy, true).unwrap();
        let cols = g.patch_len() + 1;
        assert_eq!((f.a.n, f.g.n, f.positions), (cols, outputs, 25));
        let pixel = |n: usize, c: usize, y: isize, xx: isize| -> f64 {
            let inside = (0..size as isize).contains(&y) && (0..size as isize).contains(&xx);
            if inside {
                x[((n * channels + c) * size + y as usize) * size + xx as usize]
            } else {
                0.0
            }
        };
        let patch = |n: usize, t: usize| -> Vec<f64> {
            let (oy, ox) = ((t / size) as isize, (t % size) as isize);
            let mut a: Vec<f64> = (0..channels)
                .flat_map(|c| (0..9).map(move |k| (c, k as isize)))
                .map(|(c, k)| pixel(n, c, oy + k / 3 - 1, ox + k % 3 - 1))
                .collect();
            a.push(1.0);
            a
        };
        let count = (batch * 25) as f64;
        let mut want_a = vec![0.0; cols * cols];
        let mut want_g = vec![0.0; outputs * outputs];
        for n in 0..batch {
            for t in 0..25 {
                let a = patch(n, t);
                let gv: Vec<f64> = (0..outputs)
                    .map(|o| batch as f64 * dy[(n * outputs + o) * 25 + t])
                    .collect();
                for i in 0..cols {
                    for j in 0..cols {
                        want_a[i * cols + j] += a[i] * a[j] / count;
                    }
                }
                for i in 0..outputs {
                    for j in 0..outputs {
                        want_g[i * outputs + j] += gv[i] * gv[j] / count;
                    }
                }
            }
        }
        let close = |got: &[f64], want: &[f64]| {
            got.iter()
                .zip(want)
                .all(|(g, w)| (g - w).abs() <= 1e-12 * w.abs().max(1.0))
        };
        assert!(close(&f.a.data, &want_a), "Ā");
        assert!(close(&f.g.data, &want_g), "Ḡ");
        assert_eq!(f.a.at(cols - 1, cols - 1), 1.0, "the bias's E[1·1]");
    }

    #[test]
    fn running_average_blends_and_damping_makes_a_singular_factor_factorable() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let x = random(2 * 4, &mut rng);
        let dy = random(2 * 3, &mut rng);
        let old = Factors::linear(4, &x, &dy, false).unwrap();
        let new = Factors::linear(4, &random(8, &mut rng), &random(6, &mut rng), false).unwrap();
        let mut blended = old.clone();
        blended.blend(&new, 0.75);
        for (b, (o, n)) in blended
            .a
            .data
            .iter()
            .zip(old.a.data.iter().zip(&new.a.data))
        {
            assert!((b - (0.75 * o + 0.25 * n)).abs() < 1e-15);
        }
        // two examples of 4 inputs: Ā has rank 2, so no Cholesky factor without damping
        assert!(matches!(
            old.a.cholesky_damped(0.0),
            Err(KfacError::NotPositiveDefinite { size: 4, .. })
        ));
        let l = old.a.cholesky_damped(1e-3).unwrap();
        let damped = old.a.damped(1e-3);
        for i in 0..4 {
            for j in 0..4 {
                let llt: f64 = (0..4).map(|k| l.at(i, k) * l.at(j, k)).sum();
                assert!((llt - damped.at(i, j)).abs() < 1e-12, "({i}, {j})");
            }
        }
    }

    #[test]
    fn lengths_that_do_not_fit_are_errors() {
        let g = geom(1, 3, 3);
        let err = Factors::conv(g, &[0.0; 9], &[0.0; 10], false).unwrap_err();
        assert!(matches!(err, KfacError::Length { .. }), "{err}");
        let l = Matrix::zeros(2);
        assert!(shape_noise((&l, &l), &[0.0; 3], 1, 1.0).is_err());
    }
}
