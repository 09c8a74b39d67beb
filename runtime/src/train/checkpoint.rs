//! Checkpoints: the training state (parameters, momenta, batch-norm running statistics) as
//! safetensors, with the run's position (epochs done, steps done: the noise's step counter)
//! and its experiment in the metadata. Written atomically: a temporary file in the same
//! directory, flushed to disk, then renamed over the old checkpoint, so a crash leaves the
//! previous checkpoint or the new one, never half of one.
//!
//! Tensors are named `param/<name>`, `momentum/<name>`, `running_mean/<bn layer>` and
//! `running_var/<bn layer>`, f32, with the network's shapes; reading checks all of them. A run
//! with K-FAC noise adds its running factors (`kfac/<weight>/input`, `kfac/<weight>/grad`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use fisherc_ir::model::Network;
use fisherc_ir::state::kfac::TENSOR_PREFIX;
use fisherc_ir::state::{TrainState, state_names};
use fisherc_ir::tensor::Tensor;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// The format tag in every checkpoint's metadata.
pub const FORMAT: &str = "fisherc-checkpoint-1";

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub state: TrainState<f32>,
    /// K-FAC's running factors by name (`KfacState::tensors`), where a K-FAC phase has
    /// refreshed them.
    pub kfac: BTreeMap<String, Tensor<f32>>,
    /// Epochs completed.
    pub epoch: usize,
    /// Steps completed (the noise's step counter continues from here).
    pub step: u64,
    /// The experiment, as TOML.
    pub experiment: String,
    /// The model file's text (checkpoints written before it was recorded have none).
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointError {
    pub path: PathBuf,
    pub message: String,
}

impl std::fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for CheckpointError {}

/// The first state tensor of `net`'s training holding a NaN or an infinity, by its
/// checkpoint name (`param/conv1.weight`, `running_var/bn1`), and how many of its values are.
pub fn non_finite(net: &Network, state: &TrainState<f32>) -> Option<(String, usize)> {
    named(net, state).into_iter().find_map(|(name, t)| {
        let count = t.data.iter().filter(|v| !v.is_finite()).count();
        (count > 0).then_some((name, count))
    })
}

/// (name, tensor) of every state tensor, in a fixed order.
fn named<'a>(net: &Network, state: &'a TrainState<f32>) -> Vec<(String, &'a Tensor<f32>)> {
    let names = state_names(net).into_iter().map(|(name, _)| name);
    names.zip(state.tensors()).collect()
}

fn little_endian(t: &Tensor<f32>) -> Vec<u8> {
    t.data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A safetensors file with its JSON header's keys in sorted order. safetensors writes the
/// metadata in hash-map order, so the same state would give other bytes each time; the header
/// is read back into serde_json's sorted map and written again, padded to 8 bytes as
/// safetensors pads it, in front of the same tensor data.
fn with_sorted_header(data: Vec<u8>) -> Result<Vec<u8>, String> {
    let length = data
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or("no header length")?;
    let header = data.get(8..8 + length).ok_or("a header past the end")?;
    let header: BTreeMap<String, BTreeMap<String, serde_json::Value>> =
        serde_json::from_slice(header).map_err(|e| format!("its own header: {e}"))?;
    let mut text = serde_json::to_string(&header).map_err(|e| e.to_string())?;
    text.extend(std::iter::repeat_n(' ', (8 - text.len() % 8) % 8));
    let mut out = Vec::with_capacity(data.len() + 8);
    out.extend((text.len() as u64).to_le_bytes());
    out.extend(text.as_bytes());
    out.extend(&data[8 + length..]);
    Ok(out)
}

/// Writes `checkpoint` of `net`'s training to `path`, atomically.
pub fn write(path: &Path, net: &Network, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
    let error = |message: String| CheckpointError {
        path: path.to_path_buf(),
        message,
    };
    if let Some((tensor, count)) = non_finite(net, &checkpoint.state) {
        return Err(error(format!(
            "not written: {tensor} holds {count} NaN or infinite values"
        )));
    }
    let mut tensors = named(net, &checkpoint.state);
    tensors.extend(checkpoint.kfac.iter().map(|(name, t)| (name.clone(), t)));
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, t)| little_endian(t)).collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), b)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, t.shape.clone(), b).expect("sizes agree"),
            )
        })
        .collect();
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("epoch".to_string(), checkpoint.epoch.to_string()),
        ("step".to_string(), checkpoint.step.to_string()),
        ("experiment".to_string(), checkpoint.experiment.clone()),
    ]);
    let mut metadata = metadata;
    if let Some(model) = &checkpoint.model {
        metadata.insert("model".to_string(), model.clone());
    }
    let data = safetensors::serialize(views, Some(metadata))
        .map_err(|e| error(format!("serialising: {e}")))
        .and_then(|data| with_sorted_header(data).map_err(error))?;
    fisherc_ir::files::write_atomically(path, &data).map_err(|e| error(format!("writing: {e}")))
}

/// A tensor's little-endian f32 values.
fn f32_values(view: &TensorView) -> Vec<f32> {
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect()
}

/// Reads a checkpoint of `net`'s training, checking every tensor's presence, type and shape.
pub fn read(path: &Path, net: &Network) -> Result<Checkpoint, CheckpointError> {
    let error = |message: String| CheckpointError {
        path: path.to_path_buf(),
        message,
    };
    let limit = crate::host::available_memory().unwrap_or(u64::MAX);
    let data = fisherc_ir::files::read_bytes(path, limit).map_err(|e| error(e.to_string()))?;
    let (_, metadata) = SafeTensors::read_metadata(&data)
        .map_err(|e| error(format!("not a safetensors file: {e}")))?;
    let tensors = SafeTensors::deserialize(&data)
        .map_err(|e| error(format!("not a safetensors file: {e}")))?;
    let meta = metadata.metadata().clone().unwrap_or_default();
    let field = |key: &str| {
        meta.get(key).ok_or_else(|| {
            error(format!(
                "no '{key}' in the metadata: not a fisherc checkpoint"
            ))
        })
    };
    if field("format")? != FORMAT {
        return Err(error(format!(
            "format '{}'; this fisherc reads '{FORMAT}'",
            field("format")?
        )));
    }
    let number = |key: &str| {
        field(key)?
            .parse::<u64>()
            .map_err(|e| error(format!("metadata '{key}': {e}")))
    };
    let template = TrainState::<f32>::init(net, 0);
    let mut state = template.clone();
    let wanted = named(net, &template);
    let mut loaded: Vec<Tensor<f32>> = Vec::with_capacity(wanted.len());
    for (name, like) in &wanted {
        let view = tensors
            .tensor(name)
            .map_err(|_| error(format!("no tensor {name}: a checkpoint of another model?")))?;
        if view.dtype() != Dtype::F32 {
            return Err(error(format!("{name} is {:?}, not F32", view.dtype())));
        }
        if view.shape() != like.shape.as_slice() {
            return Err(error(format!(
                "{name} has shape {:?}; the model's is {:?}",
                view.shape(),
                like.shape
            )));
        }
        loaded.push(Tensor::from_vec(&like.shape, f32_values(&view)));
    }
    let mut kfac = BTreeMap::new();
    for (name, view) in tensors.tensors() {
        if !name.starts_with(TENSOR_PREFIX) {
            continue;
        }
        let square = matches!(view.shape(), [a, b] if a == b);
        if view.dtype() != Dtype::F32 || !square {
            return Err(error(format!(
                "{name} is {:?} of shape {:?}, not a square F32 factor",
                view.dtype(),
                view.shape()
            )));
        }
        kfac.insert(name, Tensor::from_vec(view.shape(), f32_values(&view)));
    }
    if tensors.len() != wanted.len() + kfac.len() {
        return Err(error(format!(
            "{} tensors; the model's state has {} (and {} K-FAC factors)",
            tensors.len(),
            wanted.len(),
            kfac.len()
        )));
    }
    let mut loaded = loaded.into_iter();
    let lists = [
        &mut state.params,
        &mut state.momenta,
        &mut state.running_means,
        &mut state.running_vars,
    ];
    for list in lists {
        for t in list.iter_mut() {
            *t = loaded.next().expect("one loaded tensor per state tensor");
        }
    }
    if let Some((tensor, count)) = non_finite(net, &state) {
        return Err(error(format!(
            "{tensor} holds {count} NaN or infinite values: not a state to train from"
        )));
    }
    Ok(Checkpoint {
        state,
        kfac,
        epoch: number("epoch")? as usize,
        step: number("step")?,
        experiment: field("experiment")?.clone(),
        model: meta.get("model").cloned(),
    })
}
