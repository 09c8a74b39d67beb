//! Model files: parsing ([`spec`]) and instantiation into a forward graph ([`build`]).

mod build;
mod spec;

pub use build::{BnLayer, BuildOptions, LayerInfo, Mode, Network, Param, ParamKind, build};
pub use spec::{BlockSpec, Entry, ModelSpec, Shortcut};

use std::path::Path;

use crate::error::ModelError;

/// Reads a model file and instantiates it.
pub fn load(path: &Path, options: &BuildOptions) -> Result<Network, ModelError> {
    build(&ModelSpec::load(path)?, options)
}
