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
    let (dims, pixels) = parse(&images_path, &decompress(&images_path)?, 3)?;
    let (label_dims, labels) = parse(&labels_path, &decompress(&labels_path)?, 1)?;
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
        .find(|p| p.is_file())
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

/// The file's bytes, gunzipped if it starts with the gzip magic.
fn decompress(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = read(path)?;
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_end(&mut out)
        .map_err(|e| DataError::new(path, None, format!("corrupt gzip stream: {e}")))?;
    Ok(out)
}

fn header_bytes(dims: usize) -> u64 {
    4 + 4 * dims as u64
}

/// Dimensions and data of an IDX file of unsigned bytes with `expected` dimensions. Offsets in
/// errors are into the (decompressed) IDX data.
fn parse(path: &Path, bytes: &[u8], expected: usize) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let error = |offset: u64, message: String| DataError::new(path, Some(offset), message);
    if bytes.len() < 4 {
        return Err(error(
            0,
            format!("{} bytes: too short for an IDX header", bytes.len()),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(error(
            0,
            "not an IDX file (it must start with two zero bytes)".into(),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(error(
            2,
            format!(
                "element type {:#04x}; expected 0x08 (unsigned byte)",
                bytes[2]
            ),
        ));
    }
    if bytes[3] as usize != expected {
        return Err(error(
            3,
            format!("{} dimensions; expected {expected}", bytes[3]),
        ));
    }
    let header = header_bytes(expected) as usize;
    if bytes.len() < header {
        return Err(error(
            bytes.len() as u64,
            format!("truncated header: {} of {header} bytes", bytes.len()),
        ));
    }
    let dims: Vec<usize> = (0..expected)
        .map(|d| {
            u32::from_be_bytes(bytes[4 + 4 * d..8 + 4 * d].try_into().expect("4 bytes")) as usize
        })
        .collect();
    if let Some(d) = dims.iter().position(|&n| n == 0) {
        return Err(error(4 + 4 * d as u64, "a dimension of size 0".into()));
    }
    let want = dims.iter().try_fold(1usize, |a, &n| a.checked_mul(n));
    let have = bytes.len() - header;
    match want {
        Some(want) if want == have => Ok((dims, bytes[header..].to_vec())),
        Some(want) => Err(error(
            (header + have.min(want)) as u64,
            format!(
                "{have} data bytes for dimensions {dims:?}, which need {want}{}",
                if have < want { " (truncated)" } else { "" }
            ),
        )),
        None => Err(error(4, format!("dimensions {dims:?} overflow"))),
    }
}
