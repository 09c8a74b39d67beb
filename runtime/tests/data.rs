//! Data sets and the pipeline: the real Fashion-MNIST when installed, CIFAR and IDX files
//! written here (well-formed and damaged), the synthetic set, shuffling and augmentation.

use std::io::Write;
use std::path::{Path, PathBuf};

use fisherc_runtime::data::cifar::{self, Cifar};
use fisherc_runtime::data::pipeline::{Augment, Pipeline, epoch};
use fisherc_runtime::data::{idx, synthetic};

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

#[test]
fn fashion_mnist_loads_with_its_known_sizes_and_statistics() {
    if !Path::new(FASHION).is_dir() {
        // the project's setup (scripts/install-data.sh, run by scripts/test.sh) installs it
        panic!("{FASHION} missing: run scripts/install-data.sh");
    }
    let train = idx::load_pair(Path::new(FASHION), "train", 10, "fashion-mnist train").unwrap();
    let test = idx::load_pair(Path::new(FASHION), "t10k", 10, "fashion-mnist test").unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!(train.shape, [1, 28, 28]);
    let mut counts = [0; 10];
    (0..train.len()).for_each(|i| counts[train.label(i)] += 1);
    assert_eq!(
        counts, [6000; 10],
        "Fashion-MNIST's training set is balanced"
    );
    let p = Pipeline::new(&train, [1, 28, 28]).unwrap();
    // the published statistics of Fashion-MNIST's training pixels
    assert!((p.mean[0] - 0.2860).abs() < 1e-3, "{:?}", p.mean);
    assert!((p.std[0] - 0.3530).abs() < 1e-3, "{:?}", p.std);
}

fn temp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// CIFAR records of `classes` (10 or 100) with label `i % classes` and pixels `(i + p) % 251`.
fn cifar_records(count: usize, hundred: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..count {
        if hundred {
            out.push((i % 20) as u8);
        }
        out.push((i % if hundred { 100 } else { 10 }) as u8);
        out.extend((0..3072).map(|p| ((i + p) % 251) as u8));
    }
    out
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::File::create(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    path.to_path_buf()
}

#[test]
fn cifar_files_map_record_by_record() {
    let dir = temp();
    for i in 1..=5 {
        write(
            &dir.path().join(format!("data_batch_{i}.bin")),
            &cifar_records(7, false),
        );
    }
    write(&dir.path().join("test_batch.bin"), &cifar_records(4, false));
    let train = cifar::load(dir.path(), Cifar::Ten, true).unwrap();
    assert_eq!(
        (train.len(), train.shape, train.classes),
        (35, [3, 32, 32], 10)
    );
    // record 9 is the third of the second file
    assert_eq!(train.label(9), 2);
    assert_eq!(train.image(9)[0], 2);
    assert_eq!(train.image(9)[3071], ((2 + 3071) % 251) as u8);
    assert_eq!(cifar::load(dir.path(), Cifar::Ten, false).unwrap().len(), 4);

    write(&dir.path().join("train.bin"), &cifar_records(5, true));
    let hundred = cifar::load(dir.path(), Cifar::Hundred, true).unwrap();
    assert_eq!(
        (hundred.label(3), hundred.image(3)[0]),
        (3, 3),
        "the fine label, then pixels"
    );
}

#[test]
fn damaged_cifar_files_are_reported_with_file_and_offset() {
    let dir = temp();
    for i in 1..=5 {
        write(
            &dir.path().join(format!("data_batch_{i}.bin")),
            &cifar_records(3, false),
        );
    }
    let truncated = cifar_records(3, false);
    let path = write(
        &dir.path().join("data_batch_4.bin"),
        &truncated[..truncated.len() - 100],
    );
    let err = cifar::load(dir.path(), Cifar::Ten, true)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("{}: byte 6146: ", path.display())),
        "{err}"
    );
    assert!(
        err.contains("not a whole number of 3073-byte records"),
        "{err}"
    );

    let mut bad_label = cifar_records(3, false);
    bad_label[3073] = 12;
    let path = write(&dir.path().join("data_batch_4.bin"), &bad_label);
    let err = cifar::load(dir.path(), Cifar::Ten, true)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}: byte 3073: record 1: label 12 is not below 10 classes",
            path.display()
        )
    );

    std::fs::remove_file(dir.path().join("data_batch_2.bin")).unwrap();
    let err = cifar::load(dir.path(), Cifar::Ten, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("data_batch_2.bin: cannot read"), "{err}");
}

/// An IDX file of unsigned bytes with dimensions `dims` and `data`.
fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    dims.iter().for_each(|d| out.extend(d.to_be_bytes()));
    out.extend(data);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn idx_files_load_gzipped_or_raw_and_damage_is_named() {
    let dir = temp();
    let pixels: Vec<u8> = (0..3 * 4 * 5).map(|v| v as u8).collect();
    write(
        &dir.path().join("train-images-idx3-ubyte.gz"),
        &gzip(&idx_bytes(&[3, 4, 5], &pixels)),
    );
    let labels_path = write(
        &dir.path().join("train-labels-idx1-ubyte"),
        &idx_bytes(&[3], &[2, 0, 1]),
    );
    let set = idx::load_pair(dir.path(), "train", 3, "toy").unwrap();
    assert_eq!((set.len(), set.shape, set.label(0)), (3, [1, 4, 5], 2));
    assert_eq!(set.image(2), &pixels[40..60]);

    write(&labels_path, &idx_bytes(&[3], &[2, 7, 1]));
    let err = idx::load_pair(dir.path(), "train", 3, "toy")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}: byte 9: label 7 of image 1 is not below 3 classes",
            labels_path.display()
        )
    );

    write(&labels_path, &idx_bytes(&[2], &[2, 1]));
    let err = idx::load_pair(dir.path(), "train", 3, "toy")
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 labels for 3 images"), "{err}");

    let images = dir.path().join("train-images-idx3-ubyte.gz");
    write(&images, &gzip(&idx_bytes(&[3, 4, 5], &pixels[..50])));
    write(&labels_path, &idx_bytes(&[3], &[2, 0, 1]));
    let err = idx::load_pair(dir.path(), "train", 3, "toy")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("byte 66: 50 data bytes for dimensions [3, 4, 5], which need 60 (truncated)"),
        "{err}"
    );

    write(&images, &gzip(&idx_bytes(&[3, 4, 5], &pixels))[..30]);
    let err = idx::load_pair(dir.path(), "train", 3, "toy")
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt gzip stream"), "{err}");

    let mut endless = idx_bytes(&[3, 4, 5], &pixels);
    endless.resize(64 << 20, 0);
    write(&images, &gzip(&endless));
    let err = idx::load_pair(dir.path(), "train", 3, "toy")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("byte 76: more data than dimensions [3, 4, 5] need (60 bytes)"),
        "{err}"
    );

    write(&images, &gzip(&idx_bytes(&[u32::MAX, 65536, 1], &[])));
    let err = idx::load_pair(dir.path(), "train", 3, "toy")
        .unwrap_err()
        .to_string();
    assert!(err.contains("available"), "{err}");

    std::fs::remove_file(&images).unwrap();
    let fifo = std::process::Command::new("mkfifo")
        .arg(&images)
        .status()
        .unwrap();
    assert!(fifo.success());
    let err = idx::load_pair(dir.path(), "train", 3, "toy")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a regular file (it is a FIFO)"), "{err}");
    std::fs::remove_file(&images).unwrap();

    let mut wrong_type = idx_bytes(&[3, 4, 5], &pixels);
    wrong_type[2] = 0x0d;
    write(&images, &wrong_type);
    let err = idx::load_pair(dir.path(), "train", 3, "toy")
        .unwrap_err()
        .to_string();
    assert!(err.contains("byte 2: element type 0x0d"), "{err}");

    std::fs::remove_file(&images).unwrap();
    let err = idx::load_pair(dir.path(), "train", 3, "toy")
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn epochs_are_seeded_permutations_of_full_batches() {
    let e = epoch(103, 10, 7, 0, true);
    assert_eq!((e.batches.len(), e.dropped), (10, 3));
    let mut seen: Vec<usize> = e.batches.concat();
    assert_ne!(seen, (0..100).collect::<Vec<_>>(), "shuffled");
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 100, "no image twice");
    assert_eq!(
        epoch(103, 10, 7, 0, true).batches,
        e.batches,
        "the same seed and epoch, the same order"
    );
    assert_ne!(
        epoch(103, 10, 7, 1, true).batches,
        e.batches,
        "another epoch, another order"
    );
    assert_eq!(epoch(25, 5, 7, 3, false).batches[1], [5, 6, 7, 8, 9]);
}

#[test]
fn the_pipeline_normalises_fits_and_augments() {
    let set = synthetic::make(50, [1, 6, 6], 5, 0.5, 3);
    assert_eq!(set.label(7), 2);
    let pipeline = Pipeline::new(&set, [3, 8, 8]).unwrap();
    let (images, labels) = pipeline.batch(&set, &[0, 7], None);
    assert_eq!(images.shape, [2, 3, 8, 8]);
    assert_eq!(labels.data, [0, 2]);
    let at = |t: &fisherc_ir::tensor::Tensor<f32>, n: usize, c: usize, y: usize, x: usize| {
        t.data[((n * 3 + c) * 8 + y) * 8 + x]
    };
    let normalised = |raw: u8| (raw as f32 / 255.0 - pipeline.mean[0]) / pipeline.std[0];
    // centred in the 8×8 frame, replicated to three channels, black around
    assert_eq!(at(&images, 1, 2, 1, 1), normalised(set.image(7)[0]));
    assert_eq!(at(&images, 1, 0, 1, 1), at(&images, 1, 1, 1, 1));
    assert_eq!(at(&images, 1, 0, 0, 0), normalised(0));

    // a flip mirrors; find draws that flip without shifting by trying seeds
    let flip = Augment {
        pad_crop: 0,
        flip: true,
    };
    let flipped = (0..20)
        .map(|seed| pipeline.batch(&set, &[7], Some((flip, seed, 0))).0)
        .find(|t| t != &pipeline.batch(&set, &[7], None).0);
    let flipped = flipped.expect("some seed flips");
    let plain = pipeline.batch(&set, &[7], None).0;
    for y in 0..8 {
        for x in 0..8 {
            assert_eq!(flipped.data[y * 8 + x], plain.data[y * 8 + 7 - x]);
        }
    }
    // a crop shifts by at most the padding, and the same draw gives the same image
    let crop = Augment {
        pad_crop: 2,
        flip: false,
    };
    let a = pipeline.batch(&set, &[7], Some((crop, 5, 1))).0;
    assert_eq!(a, pipeline.batch(&set, &[7], Some((crop, 5, 1))).0);
    let shifted = (-2isize..=2)
        .flat_map(|dy| (-2isize..=2).map(move |dx| (dy, dx)))
        .any(|(dy, dx)| {
            (0..8).all(|y| {
                (0..8).all(|x| {
                    let (sy, sx) = (y as isize + dy, x as isize + dx);
                    let want = if (0..8).contains(&sy) && (0..8).contains(&sx) {
                        plain.data[sy as usize * 8 + sx as usize]
                    } else {
                        normalised(0)
                    };
                    a.data[y * 8 + x] == want
                })
            })
        });
    assert!(shifted, "a crop is a shift of the padded image");
    assert!(
        Pipeline::new(&set, [1, 4, 4]).is_err(),
        "a larger image does not fit"
    );
}

/// Batches built ahead on a worker thread arrive in order, each what `batch` builds for its
/// images (augmentation included); the consumer's first error stops the epoch early.
#[test]
fn batches_built_ahead_arrive_in_order_and_stop_at_an_error() {
    let set = synthetic::make(60, [1, 6, 6], 5, 0.5, 4);
    let pipeline = Pipeline::new(&set, [3, 8, 8]).unwrap();
    let order = epoch(60, 7, 3, 2, true);
    let augment = Some((
        Augment {
            pad_crop: 2,
            flip: true,
        },
        3,
        2,
    ));
    for ahead in [true, false] {
        let batches = (&set, order.batches.as_slice());
        let mut seen = Vec::new();
        let done: Result<(), String> = pipeline.for_each_batch(batches, augment, ahead, |i, b| {
            seen.push((i, b));
            Ok(())
        });
        assert_eq!(done, Ok(()));
        assert_eq!(seen.len(), order.batches.len());
        for ((i, got), (j, indices)) in seen.iter().zip(order.batches.iter().enumerate()) {
            assert_eq!(*i, j);
            assert_eq!(
                got,
                &pipeline.batch(&set, indices, augment),
                "batch {j}, {ahead}"
            );
        }
        let mut taken = 0;
        let stopped = pipeline.for_each_batch(batches, augment, ahead, |i, _| {
            taken += 1;
            if i == 2 {
                Err(format!("stop at {i}"))
            } else {
                Ok(())
            }
        });
        assert_eq!(stopped, Err("stop at 2".to_string()));
        assert_eq!(taken, 3, "{ahead}");
    }
}
