//! MNIST-style IDX files (MNIST, Fashion-MNIST), gzip-compressed or raw: an images file of
//! unsigned bytes with 3 dimensions (count, rows, columns) and a labels file with 1.
//!
//! Header: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions,
//! then each dimension as a big-endian u32; the data follow.

use std::io::Read;
use std::path::Path;

use super::{DataError, Dataset, read};

/// Loads `prefix-images-idx3-ubyte[.gz]` and `prefix-labels-idx1-ubyte[.gz]` from `dir`
/// (e.g. prefix `train` or `t10k`), checking that they agree and every label is below
/// `classes`.
pub fn load_pair(
    dir: &Path,
    prefix: &str,
    classes: usize,
    name: &str,
) -> Result<Dataset, DataError> {
    let images_path = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels_path = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let (dims, pixels) = load(&images_path, 3)?;
    let (label_dims, labels) = load(&labels_path, 1)?;
    if label_dims[0] != dims[0] {
        return Err(DataError::new(
            &labels_path,
            Some(4),
            format!(
                "{} labels for {} images in {}",
                label_dims[0],
                dims[0],
                images_path.display()
            ),
        ));
    }
    if let Some(i) = labels.iter().position(|&y| y as usize >= classes) {
        let offset = header_bytes(1) + i as u64;
        return Err(DataError::new(
            &labels_path,
            Some(offset),
            format!(
                "label {} of image {i} is not below {classes} classes",
                labels[i]
            ),
        ));
    }
    Ok(Dataset::owned(
        name.to_string(),
        [1, dims[1], dims[2]],
        classes,
        pixels,
        labels,
    ))
}

/// The file `name.gz` or `name` in `dir`.
fn find(dir: &Path, name: &str) -> Result<std::path::PathBuf, DataError> {
    let candidates = [dir.join(format!("{name}.gz")), dir.join(name)];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .ok_or_else(|| {
            DataError::new(
                &candidates[0],
                None,
                format!(
                    "missing (neither {name}.gz nor {name} is in {})",
                    dir.display()
                ),
            )
        })
}

/// Dimensions and data of the IDX file at `path` (gzip or raw) with `expected` dimensions. A
/// gzip stream is decoded only as far as its header's dimensions say (and the host's memory
/// allows), so a stream that expands without end is refused, not followed.
fn load(path: &Path, expected: usize) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let bytes = read(path)?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        parse(path, flate2::read::GzDecoder::new(&bytes[..]), expected)
    } else {
        parse(path, &bytes[..], expected)
    }
}

fn header_bytes(dims: usize) -> u64 {
    4 + 4 * dims as u64
}

/// Up to `n` bytes from `reader` (fewer at its end).
fn take(path: &Path, reader: &mut impl Read, n: u64) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::new();
    reader
        .take(n)
        .read_to_end(&mut out)
        .map_err(|e| DataError::new(path, None, format!("corrupt gzip stream: {e}")))?;
    Ok(out)
}

/// Dimensions and data of an IDX stream of unsigned bytes with `expected` dimensions. Offsets
/// in errors are into the (decompressed) IDX data.
fn parse(
    path: &Path,
    mut reader: impl Read,
    expected: usize,
) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let error = |offset: u64, message: String| DataError::new(path, Some(offset), message);
    let magic = take(path, &mut reader, 4)?;
    if magic.len() < 4 {
        return Err(error(
            0,
            format!("{} bytes: too short for an IDX header", magic.len()),
        ));
    }
    if magic[0] != 0 || magic[1] != 0 {
        return Err(error(
            0,
            "not an IDX file (it must start with two zero bytes)".into(),
        ));
    }
    if magic[2] != 0x08 {
        return Err(error(
            2,
            format!(
                "element type {:#04x}; expected 0x08 (unsigned byte)",
                magic[2]
            ),
        ));
    }
    if magic[3] as usize != expected {
        return Err(error(
            3,
            format!("{} dimensions; expected {expected}", magic[3]),
        ));
    }
    let header = header_bytes(expected);
    let sizes = take(path, &mut reader, header - 4)?;
    if (sizes.len() as u64) < header - 4 {
        let got = 4 + sizes.len() as u64;
        return Err(error(
            got,
            format!("truncated header: {got} of {header} bytes"),
        ));
    }
    let dims: Vec<usize> = sizes
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
        .collect();
    if let Some(d) = dims.iter().position(|&n| n == 0) {
        return Err(error(4 + 4 * d as u64, "a dimension of size 0".into()));
    }
    let Some(want) = dims.iter().try_fold(1u64, |a, &n| a.checked_mul(n as u64)) else {
        return Err(error(4, format!("dimensions {dims:?} overflow")));
    };
    if let Some(available) = crate::host::available_memory().filter(|&a| want > a) {
        return Err(error(
            4,
            format!("dimensions {dims:?} need {want} bytes; the host has {available} available"),
        ));
    }
    let data = take(path, &mut reader, want + 1)?;
    let have = data.len() as u64;
    match have.cmp(&want) {
        std::cmp::Ordering::Equal => Ok((dims, data)),
        std::cmp::Ordering::Less => Err(error(
            header + have,
            format!("{have} data bytes for dimensions {dims:?}, which need {want} (truncated)"),
        )),
        std::cmp::Ordering::Greater => Err(error(
            header + want,
            format!("more data than dimensions {dims:?} need ({want} bytes)"),
        )),
    }
}
