//! The CPU backends. Both keep the plan's arena in host memory with the plan's offsets, so a
//! run on either exercises the memory plan:
//!
//! * [`ReferenceBackend`] evaluates each node's op with the CPU reference (`Op::eval`):
//!   fast, and the oracle the others are checked against;
//! * [`ExecutorBackend`] runs the generated kernels on the CPU executor, thread by thread:
//!   slow, and exactly the instruction stream the GPU runs.

use std::time::Instant;

use fisherc_codegen::artifact::Verified;
use fisherc_codegen::compile::Compiled;
use fisherc_codegen::device::{CpuDevice, store_words, value_of, word_count};
use fisherc_codegen::plan::Buffer;
use fisherc_ir::Graph;
use fisherc_ir::tensor::Value;
use petgraph::graph::NodeIndex;

use crate::backend::{Backend, RuntimeError};
use crate::host::check_fits;

pub struct ExecutorBackend {
    device: CpuDevice,
}

impl ExecutorBackend {
    /// The backend for `verified`'s kernels, its arena in host memory if the host has room.
    pub fn new(verified: &Verified) -> Result<Self, RuntimeError> {
        Ok(ExecutorBackend {
            device: device(verified.compiled())?,
        })
    }
}

/// `compiled`'s arena in host memory, if the host has room for it.
fn device(compiled: &Compiled) -> Result<CpuDevice, RuntimeError> {
    check_fits(compiled.program.arena_bytes, "the step's arena")?;
    Ok(CpuDevice::new(compiled.program.clone()))
}

impl Backend for ExecutorBackend {
    fn describe(&self) -> String {
        format!("cpu kernel executor ({} threads)", rayon_threads())
    }

    fn write(&mut self, buffer: &Buffer, words: &[u32]) -> Result<(), RuntimeError> {
        write_words(&mut self.device, buffer, words)
    }

    fn read(&mut self, buffer: &Buffer) -> Result<Vec<u32>, RuntimeError> {
        Ok(read_words(&mut self.device, buffer))
    }

    fn run_node(&mut self, node: usize) -> Result<(), RuntimeError> {
        Ok(self.device.run_node(node)?)
    }

    fn run_step(&mut self) -> Result<f64, RuntimeError> {
        let started = Instant::now();
        self.device.run()?;
        Ok(started.elapsed().as_secs_f64())
    }
}

pub struct ReferenceBackend {
    device: CpuDevice,
    graph: Graph,
}

impl ReferenceBackend {
    /// The backend for `verified`'s graph, its arena in host memory if the host has room.
    pub fn new(verified: &Verified) -> Result<Self, RuntimeError> {
        let compiled = verified.compiled();
        Ok(ReferenceBackend {
            device: device(compiled)?,
            graph: compiled.graph.clone(),
        })
    }
}

impl Backend for ReferenceBackend {
    fn describe(&self) -> String {
        format!("cpu reference ops ({} threads)", rayon_threads())
    }

    fn write(&mut self, buffer: &Buffer, words: &[u32]) -> Result<(), RuntimeError> {
        write_words(&mut self.device, buffer, words)
    }

    fn read(&mut self, buffer: &Buffer) -> Result<Vec<u32>, RuntimeError> {
        Ok(read_words(&mut self.device, buffer))
    }

    fn run_node(&mut self, node: usize) -> Result<(), RuntimeError> {
        let planned = self.device.program().nodes[node].clone();
        if planned.launch_count == 0 {
            return Ok(()); // inputs, constants, reshapes: nothing runs
        }
        let n = NodeIndex::new(planned.graph_node);
        let buffers = &self.device.program().buffers;
        let places: Vec<(u64, usize)> = planned
            .inputs
            .iter()
            .map(|&b| (buffers[b].offset, (buffers[b].bytes / 4) as usize))
            .collect();
        // typed as the graph types the value: a reshape's buffer holds its input's shape
        let inputs: Vec<Value<f32>> = places
            .into_iter()
            .zip(&self.graph.inputs(n))
            .map(|((at, len), &port)| {
                value_of(self.device.memory.words_mut(at, len), self.graph.ty(port))
            })
            .collect();
        let graph_node = self.graph.node(n);
        let refs: Vec<&Value<f32>> = inputs.iter().collect();
        let outputs = graph_node
            .op
            .eval(&refs, &graph_node.outputs)
            .map_err(|message| {
                RuntimeError::Setup(format!(
                    "layer '{}' ({}): {message}",
                    graph_node.layer,
                    graph_node.op.name()
                ))
            })?;
        for (value, &b) in outputs.iter().zip(&planned.outputs) {
            let buffer = self.device.program().buffers[b].clone();
            write_value(&mut self.device, &buffer, value)?;
        }
        Ok(())
    }

    fn run_step(&mut self) -> Result<f64, RuntimeError> {
        let started = Instant::now();
        for node in 0..self.device.program().nodes.len() {
            self.run_node(node)?;
        }
        Ok(started.elapsed().as_secs_f64())
    }
}

fn write_words(device: &mut CpuDevice, buffer: &Buffer, words: &[u32]) -> Result<(), RuntimeError> {
    fits(buffer, words.len())?;
    device
        .memory
        .words_mut(buffer.offset, words.len())
        .copy_from_slice(words);
    Ok(())
}

/// Writes `value` into `buffer` ([`store_words`]: no copy of it first).
fn write_value(
    device: &mut CpuDevice,
    buffer: &Buffer,
    value: &Value<f32>,
) -> Result<(), RuntimeError> {
    let len = word_count(value);
    fits(buffer, len)?;
    store_words(value, device.memory.words_mut(buffer.offset, len));
    Ok(())
}

/// `words` words fit in `buffer`.
fn fits(buffer: &Buffer, words: usize) -> Result<(), RuntimeError> {
    if 4 * words as u64 > buffer.bytes {
        return Err(RuntimeError::Setup(format!(
            "{words} words for buffer {} of {} bytes",
            buffer.name, buffer.bytes
        )));
    }
    Ok(())
}

fn read_words(device: &mut CpuDevice, buffer: &Buffer) -> Vec<u32> {
    let len = (buffer.bytes / 4) as usize;
    device.memory.words_mut(buffer.offset, len).to_vec()
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
