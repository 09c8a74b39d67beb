//! From a [`Dataset`] to batches: a seeded order per epoch, full batches only (a compiled step
//! has one batch size: the partial last batch is dropped, and [`Epoch::dropped`] says how many
//! images that was), augmentation (pad and random crop, horizontal flip), fitting to the
//! network's input (grayscale replicated to three channels, smaller images padded centrally)
//! and per-channel normalisation with the training set's statistics.
//!
//! Every random choice comes from Philox keyed by (seed, epoch, image), so an epoch is the
//! same whatever came before it: runs resume bit for bit.

use fisherc_ir::philox::{philox4x32_10, stream};
use fisherc_ir::tensor::Tensor;
use rayon::prelude::*;

use super::Dataset;

/// Random augmentation of training images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Pad by this many pixels on every side, then crop back at a random offset (0: none).
    #[serde(default)]
    pub pad_crop: usize,
    /// Mirror left-right with probability ½.
    #[serde(default)]
    pub flip: bool,
}

/// The images of one epoch in order, as full batches.
pub struct Epoch {
    pub batches: Vec<Vec<usize>>,
    /// Images left out because they did not fill a batch.
    pub dropped: usize,
}

/// Epoch `epoch`'s batches of `batch` images out of `len`: shuffled (a Philox-driven
/// Fisher–Yates keyed by seed and epoch) or in order.
pub fn epoch(len: usize, batch: usize, seed: u64, epoch: u64, shuffle: bool) -> Epoch {
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        for i in (1..len).rev() {
            let word = philox4x32_10(
                [i as u32, stream::ORDER, epoch as u32, (epoch >> 32) as u32],
                key(seed),
            )[0];
            let j = ((word as u64 * (i as u64 + 1)) >> 32) as usize;
            order.swap(i, j);
        }
    }
    let (count, dropped) = full_batches(len, batch);
    Epoch {
        batches: order[..count * batch]
            .chunks(batch)
            .map(<[usize]>::to_vec)
            .collect(),
        dropped,
    }
}

/// How many full batches of `batch` images an epoch of `len` has, and how many images are
/// left out.
pub fn full_batches(len: usize, batch: usize) -> (usize, usize) {
    (len / batch, len % batch)
}

fn key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// How a set's images become network inputs.
/// A data set whose images do not fit a model's input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "{set} has {}×{}×{} images, which do not fit the model's {}×{}×{} input",
    images[0], images[1], images[2], input[0], input[1], input[2]
)]
pub struct InputMismatch {
    pub set: String,
    pub images: [usize; 3],
    pub input: [usize; 3],
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline {
    /// Channels, height and width the network takes.
    pub input: [usize; 3],
    /// Per-channel mean and standard deviation of the training pixels, in [0, 1] units.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Pipeline {
    /// A pipeline for `train`'s images into `input`, normalised by `train`'s statistics.
    pub fn new(train: &Dataset, input: [usize; 3]) -> Result<Pipeline, InputMismatch> {
        let [c, h, w] = train.shape;
        let channels_fit = c == input[0] || (c == 1 && input[0] == 3);
        if !channels_fit || h > input[1] || w > input[2] {
            return Err(InputMismatch {
                set: train.name.clone(),
                images: train.shape,
                input,
            });
        }
        let (mean, std) = channel_statistics(train);
        Ok(Pipeline { input, mean, std })
    }

    /// The images `indices` of `set` and their labels; with `augment`, each image is
    /// augmented by the draw for (seed, epoch, index).
    pub fn batch(
        &self,
        set: &Dataset,
        indices: &[usize],
        augment: Option<(Augment, u64, u64)>,
    ) -> (Tensor<f32>, Tensor<i32>) {
        let [c, h, w] = self.input;
        let per_image = c * h * w;
        let mut data = vec![0.0f32; indices.len() * per_image];
        data.par_chunks_mut(per_image)
            .zip(indices)
            .for_each(|(out, &i)| {
                let draw = augment.map(|(a, seed, epoch)| (a, draw(seed, epoch, i)));
                self.image(set, i, draw, out);
            });
        let labels = indices.iter().map(|&i| set.label(i) as i32).collect();
        (
            Tensor::from_vec(&[indices.len(), c, h, w], data),
            Tensor::from_vec(&[indices.len()], labels),
        )
    }

    /// Gives `consume` the batches of `batches` in order, each as [`Self::batch`] builds it;
    /// `ahead`, on a worker thread while `consume` still works on the one before, so that a
    /// GPU's step and the next batch's decoding, augmentation and normalisation overlap (at
    /// most two batches wait). Not ahead where the step itself takes the host's cores (a CPU
    /// backend): there the two would only contend. Stops at `consume`'s first error, which it
    /// returns.
    pub fn for_each_batch<E>(
        &self,
        (set, batches): (&Dataset, &[Vec<usize>]),
        augment: Option<(Augment, u64, u64)>,
        ahead: bool,
        mut consume: impl FnMut(usize, (Tensor<f32>, Tensor<i32>)) -> Result<(), E>,
    ) -> Result<(), E> {
        if !ahead {
            for (index, indices) in batches.iter().enumerate() {
                consume(index, self.batch(set, indices, augment))?;
            }
            return Ok(());
        }
        std::thread::scope(|scope| {
            let (ahead, batches_in_order) = std::sync::mpsc::sync_channel(1);
            scope.spawn(move || {
                for indices in batches {
                    if ahead.send(self.batch(set, indices, augment)).is_err() {
                        break; // the consumer stopped early
                    }
                }
            });
            for (index, batch) in batches_in_order.into_iter().enumerate() {
                consume(index, batch)?;
            }
            Ok(())
        })
    }

    /// Writes image `i`, fitted, augmented and normalised, into `out` (`C × H × W`).
    fn image(&self, set: &Dataset, i: usize, draw: Option<(Augment, [u32; 4])>, out: &mut [f32]) {
        let [sc, sh, sw] = set.shape;
        let [c, h, w] = self.input;
        let pixels = set.image(i);
        // the source image centred in the input frame
        let (top, left) = ((h - sh) / 2, (w - sw) / 2);
        let (shift_y, shift_x, flip) = match draw {
            Some((a, bits)) if a.pad_crop > 0 || a.flip => {
                let span = 2 * a.pad_crop as u32 + 1;
                let dy = (bits[0] % span) as isize - a.pad_crop as isize;
                let dx = (bits[1] % span) as isize - a.pad_crop as isize;
                (
                    if a.pad_crop > 0 { dy } else { 0 },
                    if a.pad_crop > 0 { dx } else { 0 },
                    a.flip && bits[2] & 1 == 1,
                )
            }
            _ => (0, 0, false),
        };
        for ch in 0..c {
            let source_channel = if sc == 1 { 0 } else { ch };
            let (mean, std) = (self.mean[source_channel], self.std[source_channel]);
            for y in 0..h {
                for x in 0..w {
                    // output (y, x) shows frame pixel (y + dy, x' + dx), x' mirrored if flipped
                    let fx = if flip { w - 1 - x } else { x } as isize + shift_x;
                    let fy = y as isize + shift_y;
                    let (sy, sx) = (fy - top as isize, fx - left as isize);
                    let raw = if (0..sh as isize).contains(&sy) && (0..sw as isize).contains(&sx) {
                        pixels[(source_channel * sh + sy as usize) * sw + sx as usize]
                    } else {
                        0 // padding is black, as torchvision pads before normalising
                    };
                    out[(ch * h + y) * w + x] = (raw as f32 / 255.0 - mean) / std;
                }
            }
        }
    }
}

/// The Philox words behind image `i`'s augmentation in `epoch`.
fn draw(seed: u64, epoch: u64, i: usize) -> [u32; 4] {
    philox4x32_10(
        [
            i as u32,
            stream::AUGMENT,
            epoch as u32,
            (epoch >> 32) as u32,
        ],
        key(seed),
    )
}

/// Per-channel mean and standard deviation of a set's pixels, in [0, 1] units.
fn channel_statistics(set: &Dataset) -> (Vec<f32>, Vec<f32>) {
    let [c, h, w] = set.shape;
    let plane = h * w;
    let sums: Vec<(f64, f64)> = (0..c)
        .map(|ch| {
            (0..set.len())
                .into_par_iter()
                .map(|i| {
                    let p = &set.image(i)[ch * plane..][..plane];
                    p.iter().fold((0.0, 0.0), |(s, q), &v| {
                        let v = v as f64 / 255.0;
                        (s + v, q + v * v)
                    })
                })
                .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
        })
        .collect();
    let count = (set.len() * plane).max(1) as f64;
    let mean: Vec<f32> = sums.iter().map(|(s, _)| (s / count) as f32).collect();
    let std = sums
        .iter()
        .map(|(s, q)| {
            let m = s / count;
            ((q / count - m * m).max(0.0).sqrt().max(1e-6)) as f32
        })
        .collect();
    (mean, std)
}
