//! Random batches for timing and tests: standard-normal images and uniform labels, from the
//! Philox stream (so every platform draws the same batch for the same seed).

use crate::philox::{self, stream};
use crate::tensor::{Real, Tensor};

/// A batch of `batch` images of shape `input` (channels, height, width) and labels in
/// `[0, classes)`, determined by `seed`.
pub fn random_batch<T: Real>(
    batch: usize,
    input: [usize; 3],
    classes: usize,
    seed: u64,
) -> (Tensor<T>, Tensor<i32>) {
    let shape = [batch, input[0], input[1], input[2]];
    let mut pixels = vec![0.0f32; shape.iter().product()];
    philox::fill_normal(seed, 0, stream::RANDOM_IMAGES, &mut pixels);
    let images = Tensor::from_vec(&shape, pixels.into_iter().map(T::from_f32).collect());
    let labels = (0..batch)
        .map(|n| {
            let word = philox::philox4x32_10(
                [n as u32, stream::RANDOM_LABELS, 0, 0],
                [seed as u32, (seed >> 32) as u32],
            )[0];
            ((word as u64 * classes as u64) >> 32) as i32
        })
        .collect();
    (images, Tensor::from_vec(&[batch], labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_cover_the_classes_and_batches_are_reproducible() {
        let (images, labels) = random_batch::<f32>(200, [1, 2, 2], 10, 3);
        assert_eq!(images.shape, [200, 1, 2, 2]);
        assert!(labels.data.iter().all(|&y| (0..10).contains(&y)));
        for class in 0..10 {
            assert!(labels.data.contains(&class), "class {class} never drawn");
        }
        assert_eq!(random_batch::<f32>(200, [1, 2, 2], 10, 3).0, images);
        assert_ne!(random_batch::<f32>(200, [1, 2, 2], 10, 4).0, images);
    }
}
