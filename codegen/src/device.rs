//! A compiled program on the CPU executor: one arena of memory, inputs written by role,
//! outputs read by name, the launches run in order. The CPU twin of the CUDA runtime.

use fisherc_ir::graph::Output;
use fisherc_ir::tensor::{DType, Tensor, TensorType, Value};

use crate::exec::{self, ExecError, Memory};
use crate::plan::{Arg, Buffer, Kind, PlannedLaunch, Program};

/// A value as the words it occupies in device memory (f32 and i32 one word each, u64 two,
/// little end first).
pub fn words_of(value: &Value<f32>) -> Vec<u32> {
    let mut words = vec![0; word_count(value)];
    store_words(value, &mut words);
    words
}

/// How many words [`words_of`] gives.
pub fn word_count(value: &Value<f32>) -> usize {
    match value {
        Value::Float(t) => t.data.len(),
        Value::Int(t) => t.data.len(),
        Value::Word(_) => 2,
    }
}

/// Writes [`words_of`] into the start of `words` (which must hold them), without a copy first.
pub fn store_words(value: &Value<f32>, words: &mut [u32]) {
    match value {
        Value::Float(t) => words
            .iter_mut()
            .zip(&t.data)
            .for_each(|(w, v)| *w = v.to_bits()),
        Value::Int(t) => words
            .iter_mut()
            .zip(&t.data)
            .for_each(|(w, &v)| *w = v as u32),
        Value::Word(v) => words[..2].copy_from_slice(&[*v as u32, (*v >> 32) as u32]),
    }
}

/// The value of type `ty` stored in `words`.
pub fn value_of(words: &[u32], ty: &TensorType) -> Value<f32> {
    match ty.dtype {
        DType::F32 => Value::Float(Tensor::from_vec(
            &ty.shape,
            words[..ty.numel()]
                .iter()
                .map(|&w| f32::from_bits(w))
                .collect(),
        )),
        DType::I32 => Value::Int(Tensor::from_vec(
            &ty.shape,
            words[..ty.numel()].iter().map(|&w| w as i32).collect(),
        )),
        DType::U64 => Value::Word(words[0] as u64 | (words[1] as u64) << 32),
    }
}

pub struct CpuDevice {
    program: Program,
    pub memory: Memory,
}

impl CpuDevice {
    /// Allocates the arena and writes the constants.
    pub fn new(program: Program) -> Self {
        let mut memory = Memory::zeroed(program.arena_bytes);
        for b in &program.buffers {
            if let Kind::Constant(v) = b.kind {
                memory.write_f32(b.offset, &[v]);
            }
        }
        CpuDevice { program, memory }
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Reads an f32 output.
    pub fn download(&self, name: &Output) -> Option<Tensor<f32>> {
        let b = self.program.output(name)?;
        Some(self.read(b).into_float())
    }

    /// Reads any buffer, as the value its type says.
    pub fn read(&self, b: &Buffer) -> Value<f32> {
        let words: Vec<u32> = self
            .memory
            .read_words(b.offset, (b.bytes / 4) as usize)
            .collect();
        value_of(&words, &TensorType::new(b.shape.clone(), b.dtype))
    }

    /// Runs every launch of the step.
    pub fn run(&mut self) -> Result<(), ExecError> {
        for launch in &self.program.launches {
            self.launch(launch)?;
        }
        Ok(())
    }

    /// Runs the launches of node `i` of [`Program::nodes`] alone.
    pub fn run_node(&mut self, i: usize) -> Result<(), ExecError> {
        let node = &self.program.nodes[i];
        for launch in &self.program.launches[node.first_launch..][..node.launch_count] {
            self.launch(launch)?;
        }
        Ok(())
    }

    /// Runs every launch of the step; returns each launch's wall time in seconds.
    pub fn run_timed(&mut self) -> Result<Vec<f64>, ExecError> {
        let mut times = Vec::with_capacity(self.program.launches.len());
        for launch in &self.program.launches {
            let started = std::time::Instant::now();
            self.launch(launch)?;
            times.push(started.elapsed().as_secs_f64());
        }
        Ok(times)
    }

    fn launch(&self, launch: &PlannedLaunch) -> Result<(), ExecError> {
        let args: Vec<exec::Arg> = launch
            .args
            .iter()
            .map(|a| match *a {
                Arg::Buffer(b) => exec::Arg::Ptr(self.program.buffers[b].offset),
                Arg::U32(v) => exec::Arg::U32(v),
                Arg::F32(v) => exec::Arg::F32(v),
            })
            .collect();
        exec::run(
            &self.program.kernels[launch.kernel],
            launch.grid,
            &args,
            &self.memory,
        )
    }
}
