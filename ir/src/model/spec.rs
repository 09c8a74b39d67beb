//! Reading a model file: TOML through serde into a [`ModelSpec`] that remembers the line of
//! every layer entry, so that every later error can say `file:line`.
//!
//! The format (see `models/README.md`):
//!
//! ```toml
//! name = "resnet20"
//! input = [3, 32, 32]        # channels, height, width
//! classes = 10
//! shortcut = "A"             # used where a residual add changes shape: "A" or "B"
//! layers = [
//!   { op = "conv", out = 16, kernel = 3, padding = 1 },
//!   { block = "basic", width = 16, repeat = 3 },
//!   ...
//! ]
//!
//! [blocks.basic]
//! params = ["width", "stride"]
//! defaults = { stride = 1 }
//! layers = [ { op = "conv", out = "$width", kernel = 3, stride = "$stride", padding = 1 }, ... ]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::error::{ModelError, UnknownName};

/// How a residual `add` matches shapes when its two inputs differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Shortcut {
    /// Strided identity with zero channel padding (no parameters).
    A,
    /// 1×1 strided convolution + batch norm.
    B,
}

impl std::str::FromStr for Shortcut {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "A" | "a" => Ok(Shortcut::A),
            "B" | "b" => Ok(Shortcut::B),
            _ => Err(UnknownName {
                what: "shortcut",
                found: s.to_string(),
                expected: "\"A\" or \"B\"".to_string(),
            }),
        }
    }
}

/// One entry of a `layers` list, with its 1-based line in the file.
#[derive(Clone, Debug)]
pub struct Entry {
    pub line: usize,
    pub table: toml::Table,
}

/// A reusable block: a parameterised list of layers.
#[derive(Clone, Debug)]
pub struct BlockSpec {
    pub line: usize,
    pub params: Vec<String>,
    pub defaults: toml::Table,
    pub layers: Vec<Entry>,
}

/// A parsed model file. Batch-independent: [`super::build`] instantiates it for a batch size.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub path: PathBuf,
    pub name: String,
    pub description: Option<String>,
    /// Channels, height, width.
    pub input: [usize; 3],
    pub classes: usize,
    pub shortcut: Option<Shortcut>,
    pub layers: Vec<Entry>,
    pub blocks: BTreeMap<String, BlockSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    #[serde(default)]
    description: Option<String>,
    input: Spanned<Vec<i64>>,
    classes: Spanned<i64>,
    #[serde(default)]
    shortcut: Option<Spanned<String>>,
    layers: Vec<Spanned<toml::Table>>,
    #[serde(default)]
    blocks: BTreeMap<String, Spanned<RawBlock>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlock {
    #[serde(default)]
    params: Vec<String>,
    #[serde(default)]
    defaults: toml::Table,
    layers: Vec<Spanned<toml::Table>>,
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl ModelSpec {
    /// Reads and parses a model file.
    pub fn load(path: &Path) -> Result<ModelSpec, ModelError> {
        ModelSpec::parse(&ModelSpec::read_text(path)?, path)
    }

    /// A model file's text, read with the bounds of [`crate::files`].
    pub fn read_text(path: &Path) -> Result<String, ModelError> {
        crate::files::read_text(path).map_err(|e| ModelError {
            file: path.to_path_buf(),
            line: 0,
            message: format!("the model file: {e}"),
        })
    }

    /// Parses model-file text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<ModelSpec, ModelError> {
        let error = |offset: usize, message: String| ModelError {
            file: path.to_path_buf(),
            line: line_of(text, offset),
            message,
        };
        let raw: RawModel = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            error(offset, e.message().trim().to_string())
        })?;
        let entries = |layers: Vec<Spanned<toml::Table>>| -> Vec<Entry> {
            layers
                .into_iter()
                .map(|t| Entry {
                    line: line_of(text, t.span().start),
                    table: t.into_inner(),
                })
                .collect()
        };

        let input_span = raw.input.span().start;
        let input = match raw.input.get_ref()[..] {
            [c, h, w] if c > 0 && h > 0 && w > 0 => [c as usize, h as usize, w as usize],
            _ => {
                return Err(error(
                    input_span,
                    format!(
                        "input must be [channels, height, width] with positive sizes, found {:?}",
                        raw.input.get_ref()
                    ),
                ));
            }
        };
        let classes = *raw.classes.get_ref();
        if classes < 1 {
            return Err(error(
                raw.classes.span().start,
                format!("classes must be at least 1, found {classes}"),
            ));
        }
        let shortcut = match raw.shortcut {
            None => None,
            Some(s) => Some(
                s.get_ref()
                    .parse()
                    .map_err(|e: UnknownName| error(s.span().start, e.to_string()))?,
            ),
        };
        let blocks = raw
            .blocks
            .into_iter()
            .map(|(name, block)| {
                let line = line_of(text, block.span().start);
                let block = block.into_inner();
                let spec = BlockSpec {
                    line,
                    params: block.params,
                    defaults: block.defaults,
                    layers: entries(block.layers),
                };
                (name, spec)
            })
            .collect();
        Ok(ModelSpec {
            path: path.to_path_buf(),
            name: raw.name,
            description: raw.description,
            input,
            classes: classes as usize,
            shortcut,
            layers: entries(raw.layers),
            blocks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_count_from_one() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 4), 3);
    }
}
