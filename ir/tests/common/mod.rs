//! Helpers shared by the IR's integration tests: seeded random tensors and error measures.

#![allow(dead_code)]

use fisherc_ir::tensor::{Real, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform values in [-1, 1).
pub fn uniform<T: Real>(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor<T> {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| T::from_f64(rng.random_range(-1.0..1.0)))
        .collect();
    Tensor::from_vec(shape, data)
}

/// Uniform values in [lo, hi).
pub fn uniform_in<T: Real>(rng: &mut ChaCha8Rng, shape: &[usize], lo: f64, hi: f64) -> Tensor<T> {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| T::from_f64(rng.random_range(lo..hi)))
        .collect();
    Tensor::from_vec(shape, data)
}

pub fn labels(rng: &mut ChaCha8Rng, n: usize, classes: usize) -> Tensor<i32> {
    Tensor::from_vec(
        &[n],
        (0..n)
            .map(|_| rng.random_range(0..classes as i32))
            .collect(),
    )
}

/// max |a − b| / max(max |b|, floor): a relative error over the whole tensor.
pub fn rel_error<T: Real>(a: &[T], b: &[T], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    let scale = b.iter().map(|v| v.as_f64().abs()).fold(floor, f64::max);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.as_f64() - y.as_f64()).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Asserts no NaN or infinity.
pub fn assert_finite<T: Real>(what: &str, values: &[T]) {
    assert!(
        values.iter().all(|v| v.is_finite()),
        "{what} has NaN or infinite values"
    );
}

/// Asserts `actual` matches a non-zero `expected` within relative error `tolerance` (relative to
/// the largest |expected|), with no NaN.
pub fn assert_close<T: Real>(what: &str, actual: &[T], expected: &[T], tolerance: f64) {
    assert_finite(what, actual);
    assert!(
        expected.iter().any(|v| *v != T::zero()),
        "{what}: the expected values are all zero, so the comparison would prove nothing"
    );
    let err = rel_error(actual, expected, 0.0);
    assert!(
        err <= tolerance,
        "{what}: relative error {err} > {tolerance}"
    );
}
