//! A synthetic labelled set that can be learnt: each class has a fixed random template, and
//! an image is its class's template plus noise, all from the Philox stream (the same set on
//! every platform for the same seed).

use fisherc_ir::philox::{self, stream};

use super::Dataset;

/// `len` images of `shape` in `classes` classes; `noise` is the pixel noise's standard
/// deviation relative to the templates' (0.0 to 1.0 and beyond: harder).
pub fn make(len: usize, shape: [usize; 3], classes: usize, noise: f32, seed: u64) -> Dataset {
    make_from(0, len, shape, classes, noise, seed)
}

/// Images `first..first + len` of the endless set [`make`] begins: the same templates, other
/// draws (a test set beside a training set).
pub fn make_from(
    first: usize,
    len: usize,
    shape: [usize; 3],
    classes: usize,
    noise: f32,
    seed: u64,
) -> Dataset {
    let bytes: usize = shape.iter().product();
    let mut templates = vec![0.0f32; classes * bytes];
    philox::fill_normal(
        seed,
        u64::MAX - 1,
        stream::SYNTHETIC_TEMPLATES,
        &mut templates,
    );
    let mut pixels = Vec::with_capacity(len * bytes);
    let mut labels = Vec::with_capacity(len);
    let mut draw = vec![0.0f32; bytes];
    for i in first..first + len {
        let class = i % classes;
        philox::fill_normal(seed, i as u64, stream::SYNTHETIC_NOISE, &mut draw);
        let template = &templates[class * bytes..][..bytes];
        pixels.extend(
            template
                .iter()
                .zip(&draw)
                .map(|(t, n)| (128.0 + 40.0 * (t + noise * n)).clamp(0.0, 255.0) as u8),
        );
        labels.push(class as u8);
    }
    Dataset::owned(format!("synthetic {len}"), shape, classes, pixels, labels)
}
