//! Numeric building blocks of the CPU reference besides the matrix product ([`crate::matmul`]):
//! im2col/col2im for convolutions, and a batch reduction whose summation order does not depend
//! on the number of threads (so CPU runs are bit-for-bit repeatable).
//!
//! Ops' `eval` functions call these; nothing here knows about graphs.

use rayon::prelude::*;

use crate::tensor::Real;

/// Geometry of a 2-D convolution over one example.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride: usize,
    pub padding: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl ConvGeom {
    /// Rows of the im2col matrix: one per (channel, kernel row, kernel column).
    pub fn patch_len(&self) -> usize {
        self.channels * self.kernel_h * self.kernel_w
    }

    /// Columns of the im2col matrix: one per output position.
    pub fn positions(&self) -> usize {
        self.out_h * self.out_w
    }

    pub fn input_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// A 1×1, stride-1, unpadded convolution reads its input as the im2col matrix directly.
    pub fn is_pointwise(&self) -> bool {
        self.kernel_h == 1 && self.kernel_w == 1 && self.stride == 1 && self.padding == 0
    }

    /// Input coordinate read by output coordinate `o` at kernel offset `k`, if inside the image.
    fn source(&self, o: usize, k: usize, size: usize) -> Option<usize> {
        let i = (o * self.stride + k) as isize - self.padding as isize;
        (0..size as isize).contains(&i).then_some(i as usize)
    }

    /// The output coordinates `lo..hi` whose input coordinate at kernel offset `k` lies inside
    /// `0..size`; outside that range the patch reads padding.
    fn valid_outputs(&self, k: usize, size: usize, outputs: usize) -> (usize, usize) {
        // o·stride + k − padding ≥ 0  and  o·stride + k − padding ≤ size − 1
        let lo = self.padding.saturating_sub(k).div_ceil(self.stride);
        let hi = if size + self.padding > k {
            ((size + self.padding - k - 1) / self.stride + 1).min(outputs)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    /// Calls `f(patch row, output row, channel, input row, valid output columns lo..hi, input
    /// column of output column 0)` for every (channel, kernel row, kernel column, output row);
    /// the input row is `None` where the kernel row reads padding.
    #[allow(clippy::type_complexity)]
    fn for_each_row(
        &self,
        mut f: impl FnMut(usize, usize, usize, Option<usize>, (usize, usize), isize),
    ) {
        for c in 0..self.channels {
            for ki in 0..self.kernel_h {
                for kj in 0..self.kernel_w {
                    let row = (c * self.kernel_h + ki) * self.kernel_w + kj;
                    let cols = self.valid_outputs(kj, self.width, self.out_w);
                    let ix0 = kj as isize - self.padding as isize;
                    for oy in 0..self.out_h {
                        f(row, oy, c, self.source(oy, ki, self.height), cols, ix0);
                    }
                }
            }
        }
    }

    /// Expands one example `[C, H, W]` into the `[C·kh·kw, Ho·Wo]` patch matrix.
    pub fn im2col<T: Real>(&self, x: &[T], col: &mut [T]) {
        let (positions, stride) = (self.positions(), self.stride);
        self.for_each_row(|row, oy, c, iy, (lo, hi), ix0| {
            let dst = &mut col[row * positions + oy * self.out_w..][..self.out_w];
            let Some(iy) = iy else {
                dst.fill(T::zero());
                return;
            };
            let src = &x[(c * self.height + iy) * self.width..][..self.width];
            dst[..lo].fill(T::zero());
            dst[hi..].fill(T::zero());
            if lo == hi {
                return; // every window of this kernel column reads padding
            }
            let first = (lo * stride) as isize + ix0;
            if stride == 1 {
                dst[lo..hi].copy_from_slice(&src[first as usize..][..hi - lo]);
            } else {
                let reads = src[first as usize..].iter().step_by(stride);
                dst[lo..hi].iter_mut().zip(reads).for_each(|(d, &v)| *d = v);
            }
        });
    }

    /// Adds the patch matrix back onto one example `[C, H, W]` (the adjoint of `im2col`).
    pub fn col2im<T: Real>(&self, col: &[T], dx: &mut [T]) {
        let (positions, stride) = (self.positions(), self.stride);
        self.for_each_row(|row, oy, c, iy, (lo, hi), ix0| {
            let Some(iy) = iy else { return };
            if lo == hi {
                return;
            }
            let src = &col[row * positions + oy * self.out_w..][..self.out_w];
            let dst = &mut dx[(c * self.height + iy) * self.width..][..self.width];
            let first = ((lo * stride) as isize + ix0) as usize;
            let targets = dst[first..].iter_mut().step_by(stride);
            targets.zip(&src[lo..hi]).for_each(|(d, &g)| *d = *d + g);
        });
    }
}

/// Number of partial sums a batch reduction is split into. Fixed (not the thread count), so the
/// summation order, and therefore every bit of the result, is the same on every machine.
const REDUCTION_PARTS: usize = 16;

/// `Σ_n f(n)` over a batch of `n` examples, where `f(n, acc, scratch)` adds example `n`'s term
/// into the accumulator of length `len` (with a scratch buffer of `scratch` elements). Runs in
/// parallel; the result does not depend on the number of threads.
pub fn sum_over_batch<T, F>(n: usize, len: usize, scratch: usize, f: F) -> Vec<T>
where
    T: Real,
    F: Fn(usize, &mut [T], &mut [T]) + Sync,
{
    let chunk = n.div_ceil(REDUCTION_PARTS).max(1);
    let partials: Vec<Vec<T>> = (0..n.div_ceil(chunk))
        .into_par_iter()
        .map(|part| {
            let mut acc = vec![T::zero(); len];
            let mut buf = vec![T::zero(); scratch];
            for example in part * chunk..((part + 1) * chunk).min(n) {
                f(example, &mut acc, &mut buf);
            }
            acc
        })
        .collect();
    let mut total = vec![T::zero(); len];
    for partial in partials {
        for (t, p) in total.iter_mut().zip(partial) {
            *t = *t + p;
        }
    }
    total
}

/// Runs `f(n, out_n)` for each example's slice of `out` (`per_example` elements each), in
/// parallel, with a per-thread scratch buffer of `scratch` elements.
pub fn for_each_example<T, F>(out: &mut [T], per_example: usize, scratch: usize, f: F)
where
    T: Real,
    F: Fn(usize, &mut [T], &mut Vec<T>) + Sync,
{
    if per_example == 0 {
        return;
    }
    out.par_chunks_mut(per_example).enumerate().for_each_init(
        || vec![T::zero(); scratch],
        |buf, (n, out_n)| f(n, out_n, buf),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// im2col by the definition: one bounds check per element.
    fn im2col_naive(g: &ConvGeom, x: &[f64]) -> Vec<f64> {
        let mut col = vec![0.0; g.patch_len() * g.positions()];
        for c in 0..g.channels {
            for ki in 0..g.kernel_h {
                for kj in 0..g.kernel_w {
                    let row = (c * g.kernel_h + ki) * g.kernel_w + kj;
                    for oy in 0..g.out_h {
                        for ox in 0..g.out_w {
                            if let (Some(iy), Some(ix)) =
                                (g.source(oy, ki, g.height), g.source(ox, kj, g.width))
                            {
                                col[row * g.positions() + oy * g.out_w + ox] =
                                    x[(c * g.height + iy) * g.width + ix];
                            }
                        }
                    }
                }
            }
        }
        col
    }

    #[test]
    fn im2col_and_col2im_agree_with_the_definition_and_are_adjoint() {
        for (kernel, stride, padding, size) in [
            (3, 1, 1, 5),
            (3, 2, 1, 7),
            (1, 2, 0, 5),
            (5, 3, 2, 8),
            (3, 1, 0, 3),
            (2, 2, 0, 5),
            // strides past the padded input: kernel offsets whose only window reads padding
            (3, 9, 1, 4),
            (3, 7, 2, 4),
            (5, 9, 2, 4),
        ] {
            let out = (size + 2 * padding - kernel) / stride + 1;
            let g = ConvGeom {
                channels: 2,
                height: size,
                width: size + 1,
                kernel_h: kernel,
                kernel_w: kernel,
                stride,
                padding,
                out_h: out,
                out_w: (size + 1 + 2 * padding - kernel) / stride + 1,
            };
            let x: Vec<f64> = (0..g.input_len())
                .map(|i| (i as f64 * 0.37).sin())
                .collect();
            let mut col = vec![7.0; g.patch_len() * g.positions()];
            g.im2col(&x, &mut col);
            assert_eq!(
                col,
                im2col_naive(&g, &x),
                "k{kernel} s{stride} p{padding} n{size}"
            );
            // <im2col(x), y> = <x, col2im(y)>
            let y: Vec<f64> = (0..col.len()).map(|i| (i as f64 * 0.11).cos()).collect();
            let mut back = vec![0.0; g.input_len()];
            g.col2im(&y, &mut back);
            let lhs: f64 = col.iter().zip(&y).map(|(a, b)| a * b).sum();
            let rhs: f64 = x.iter().zip(&back).map(|(a, b)| a * b).sum();
            assert!((lhs - rhs).abs() < 1e-9, "adjoint: {lhs} vs {rhs}");
        }
    }
}
