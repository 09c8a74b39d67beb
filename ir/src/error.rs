//! Error types of the IR layer. Each names where the problem is, in the user's words.

use std::path::PathBuf;

use thiserror::Error;

/// What an op's shape rule or CPU reference says is wrong with its inputs: which input and how.
/// Whoever asked adds where (layer and op: [`ShapeError`], [`EvalError`]).
#[derive(Debug, Clone, Error, PartialEq)]
#[error("{0}")]
pub struct OpError(pub String);

impl From<String> for OpError {
    fn from(message: String) -> OpError {
        OpError(message)
    }
}

impl From<&str> for OpError {
    fn from(message: &str) -> OpError {
        OpError(message.to_string())
    }
}

/// A name that is none of the values a setting takes.
#[derive(Debug, Clone, Error, PartialEq)]
#[error("unknown {what} '{found}' (expected {expected})")]
pub struct UnknownName {
    /// The setting: "noise", "Fisher mode".
    pub what: &'static str,
    pub found: String,
    /// The values it takes, in words.
    pub expected: String,
}

/// A node whose inputs do not fit its op: raised while the graph is built.
#[derive(Debug, Clone, Error, PartialEq)]
#[error("layer '{layer}' ({op}): {message}")]
pub struct ShapeError {
    pub layer: String,
    pub op: &'static str,
    pub message: String,
}

/// A failure while the reference interpreter runs a graph (bad input values, not bad types).
#[derive(Debug, Clone, Error, PartialEq)]
#[error("layer '{layer}' ({op}): {message}")]
pub struct EvalError {
    pub layer: String,
    pub op: &'static str,
    pub message: String,
}

/// A model file that cannot be turned into a graph: where, and what is wrong.
#[derive(Debug, Clone, Error, PartialEq)]
#[error("{}: {message}", self.place())]
pub struct ModelError {
    pub file: PathBuf,
    /// 1-based line of the offending entry (0 when the file could not be read at all).
    pub line: usize,
    pub message: String,
}

impl ModelError {
    /// `file:line`, or the file alone where no line is to blame.
    fn place(&self) -> String {
        match self.line {
            0 => self.file.display().to_string(),
            line => format!("{}:{line}", self.file.display()),
        }
    }
}
