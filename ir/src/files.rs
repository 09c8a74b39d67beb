//! Files users hand us (model and experiment files, plans, checkpoints, data) read with bounds;
//! the files we write (artifacts, checkpoints, run records) written whole or not at all; and
//! users' words echoed back in errors without flooding a terminal.
//!
//! Only regular files are read: a FIFO, a device or `/dev/zero` would block or never end. A
//! file larger than the limit its kind allows is refused from its size before a byte is read,
//! and the read itself stops one byte past the limit (a file may grow while it is read).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The largest text input (model, experiment, plan, metrics file): far beyond any real one
/// (a 50,000-node model file is a few MB), small enough to hold in memory without a thought.
pub const MAX_TEXT_BYTES: u64 = 256 << 20;

/// Why an input file could not be read.
#[derive(Debug, Error)]
pub enum InputError {
    #[error("not a regular file (it is {0}); give a file")]
    NotAFile(&'static str),
    #[error("{size} bytes, more than the {limit} this input may have")]
    TooLarge { size: u64, limit: u64 },
    #[error("not UTF-8 text (byte {0})")]
    NotText(usize),
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
}

/// The whole of a regular file of at most `limit` bytes.
pub fn read_bytes(path: &Path, limit: u64) -> Result<Vec<u8>, InputError> {
    let file = open_regular(path)?;
    let size = file.metadata()?.len();
    if size > limit {
        return Err(InputError::TooLarge { size, limit });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(InputError::TooLarge {
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

/// A text file of at most [`MAX_TEXT_BYTES`].
pub fn read_text(path: &Path) -> Result<String, InputError> {
    let bytes = read_bytes(path, MAX_TEXT_BYTES)?;
    String::from_utf8(bytes).map_err(|e| InputError::NotText(e.utf8_error().valid_up_to()))
}

/// Opens `path` if it is a regular file (after following links).
pub fn open_regular(path: &Path) -> Result<File, InputError> {
    let kind = std::fs::metadata(path)?.file_type();
    if !kind.is_file() {
        return Err(InputError::NotAFile(describe(&kind)));
    }
    Ok(File::open(path)?)
}

fn describe(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// Writes `bytes` to `path` so that a reader (or a run killed at any moment) finds either the
/// old file or the new one, never a part: into `path.partial`, synced, renamed over `path`,
/// and the directory synced so that the rename itself lasts.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = partial(path);
    let mut file = File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Where [`write_atomically`] writes `path` before the rename.
pub fn partial(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// A word longer than this is cut when echoed.
const MAX_WORD_CHARS: usize = 100;
/// A line longer than this (after cutting words) is cut in the middle.
const MAX_LINE_CHARS: usize = 2000;

/// `message` with every word (a run without whitespace) over 100 characters and every line
/// over 2,000 cut, saying how long the cut text was; shorter messages are unchanged.
pub fn shorten(message: &str) -> String {
    message
        .split('\n')
        .map(|line| cut(&shorten_words(line), MAX_LINE_CHARS))
        .collect::<Vec<_>>()
        .join("\n")
}

fn shorten_words(line: &str) -> String {
    let mut out = String::with_capacity(line.len().min(4 * MAX_LINE_CHARS));
    let mut rest = line;
    while !rest.is_empty() {
        let word_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        out.push_str(&cut(&rest[..word_end], MAX_WORD_CHARS));
        rest = &rest[word_end..];
        let space_end = rest
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(rest.len());
        out.push_str(&rest[..space_end]);
        rest = &rest[space_end..];
    }
    out
}

/// `text` if it has at most `max` characters, else its first and last few with the count cut.
fn cut(text: &str, max: usize) -> String {
    let chars = text.chars().count();
    if chars <= max {
        return text.to_string();
    }
    let keep = max / 2 - 10;
    let head: String = text.chars().take(keep).collect();
    let tail: String = text.chars().skip(chars - keep / 4).collect();
    format!("{head}…[{} characters]…{tail}", chars - keep - keep / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_messages_are_unchanged() {
        let message = "m.toml:3: unknown op 'conv2' (known ops: conv, bn)\n  second line";
        assert_eq!(shorten(message), message);
    }

    #[test]
    fn a_long_word_is_cut_and_its_length_told() {
        let word = "x".repeat(1_000_000);
        let shortened = shorten(&format!("unknown variant `{word}`, expected `sb`"));
        assert!(shortened.len() < 200, "{shortened}");
        assert!(shortened.starts_with("unknown variant `xxx"));
        assert!(shortened.ends_with("xx`, expected `sb`"));
        assert!(shortened.contains("[999"), "{shortened}");
    }

    #[test]
    fn a_long_line_of_short_words_is_cut() {
        let line = "ab ".repeat(100_000);
        let shortened = shorten(&format!("first\n{line}\nlast"));
        assert!(shortened.len() < 2 * MAX_LINE_CHARS, "{}", shortened.len());
        assert!(shortened.starts_with("first\nab ab"));
        assert!(shortened.ends_with("\nlast"));
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        let shortened = shorten(&"é".repeat(500));
        assert!(shortened.chars().count() < 120);
    }

    #[test]
    fn special_files_are_refused_by_kind() {
        let error = read_bytes(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(matches!(error, InputError::NotAFile("a character device")));
        let error = read_text(Path::new("/")).unwrap_err();
        assert!(matches!(error, InputError::NotAFile("a directory")));
    }

    #[test]
    fn an_atomic_write_replaces_the_file_whole_and_leaves_nothing_beside_it() {
        let dir = std::env::temp_dir().join(format!("fisherc-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("checkpoint.safetensors");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(partial(&path), dir.join("checkpoint.safetensors.partial"));
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_over_its_limit_is_refused_before_reading() {
        let path = std::env::temp_dir().join(format!("fisherc-input-{}", std::process::id()));
        std::fs::write(&path, vec![b'a'; 1000]).unwrap();
        let error = read_bytes(&path, 999).unwrap_err();
        assert!(matches!(
            error,
            InputError::TooLarge {
                size: 1000,
                limit: 999
            }
        ));
        assert_eq!(read_bytes(&path, 1000).unwrap().len(), 1000);
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_text(&path), Err(InputError::NotText(0))));
        std::fs::remove_file(&path).unwrap();
    }
}
