//! A compiled step on a backend, with the glue a training loop needs: inputs written by role,
//! outputs read by name, the training state read back.
//!
//! Parameters, momenta and running statistics live on the device: the updates write them in
//! place, so after the first step only the batch and the hyper-parameters are fed again.

use fisherc_codegen::artifact::{Artifact, Plan};
use fisherc_codegen::device::{value_of, words_of};
use fisherc_codegen::plan::Buffer;
use fisherc_ir::graph::Output;
use fisherc_ir::interp::Feeds;
use fisherc_ir::model::Network;
use fisherc_ir::ops::Role;
use fisherc_ir::state::{TrainState, state_names};
use fisherc_ir::tensor::{Tensor, TensorType, Value};

use crate::backend::{Backend, RuntimeError};

pub struct Session<B> {
    pub plan: Plan,
    pub network: Network,
    pub backend: B,
}

impl<B: Backend> Session<B> {
    /// A session for `artifact` on `backend` (the network is rebuilt from the artifact's kept
    /// model text: parameter shapes, classes, input shape).
    pub fn new(artifact: &Artifact, backend: B) -> Result<Self, RuntimeError> {
        let network = artifact.plan.source.network()?;
        Ok(Session {
            plan: artifact.plan.clone(),
            network,
            backend,
        })
    }

    fn buffer(&self, index: usize) -> &Buffer {
        &self.plan.buffers[index]
    }

    /// The buffer the step reads `role` from, if it reads it.
    pub(crate) fn input_buffer(&self, role: &Role) -> Option<Buffer> {
        let slot = self.plan.inputs.iter().find(|s| &s.role == role)?;
        Some(self.buffer(slot.buffer).clone())
    }

    /// The buffer the step writes output `name` to, if it has that output.
    fn output_buffer(&self, name: &Output) -> Option<Buffer> {
        let slot = self.plan.outputs.iter().find(|s| &s.role == name)?;
        Some(self.buffer(slot.buffer).clone())
    }

    /// Writes every fed value the step reads (values it does not read are skipped).
    pub fn feed(&mut self, feeds: &Feeds<f32>) -> Result<(), RuntimeError> {
        for (role, value) in feeds {
            let Some(buffer) = self.input_buffer(role) else {
                continue;
            };
            if value.shape() != buffer.shape.as_slice() || value.dtype() != buffer.dtype {
                return Err(RuntimeError::Setup(format!(
                    "input {role}: a {:?} {:?} value for a {:?} {:?} buffer",
                    value.dtype(),
                    value.shape(),
                    buffer.dtype,
                    buffer.shape
                )));
            }
            self.backend.write(&buffer, &words_of(value))?;
        }
        Ok(())
    }

    /// Runs one step; its time in seconds as the backend measures it.
    pub fn step(&mut self) -> Result<f64, RuntimeError> {
        self.backend.run_step()
    }

    /// Runs one step and returns each planned node's time in seconds (0 for nodes without
    /// launches): the backend's own timer where it has one (CUDA events between nodes, no
    /// synchronisation), else the wall clock around [`Backend::run_node`].
    pub fn profile(&mut self) -> Result<Vec<f64>, RuntimeError> {
        if let Some(times) = self.backend.profile()? {
            return Ok(times);
        }
        let mut times = vec![0.0; self.plan.nodes.len()];
        for (n, time) in times.iter_mut().enumerate() {
            if self.plan.nodes[n].launch_count > 0 {
                let started = std::time::Instant::now();
                self.backend.run_node(n)?;
                *time = started.elapsed().as_secs_f64();
            }
        }
        Ok(times)
    }

    /// An output of the last step.
    pub fn output(&mut self, name: &Output) -> Result<Value<f32>, RuntimeError> {
        let buffer = self
            .output_buffer(name)
            .ok_or_else(|| RuntimeError::Setup(format!("the step has no output {name}")))?;
        self.read_value(&buffer)
    }

    pub fn loss(&mut self) -> Result<f32, RuntimeError> {
        Ok(self.output(&Output::Loss)?.float().data[0])
    }

    fn read_value(&mut self, buffer: &Buffer) -> Result<Value<f32>, RuntimeError> {
        let words = self.backend.read(buffer)?;
        Ok(value_of(
            &words,
            &TensorType::new(buffer.shape.clone(), buffer.dtype),
        ))
    }

    fn read_role(&mut self, role: Role) -> Result<Tensor<f32>, RuntimeError> {
        let buffer = self
            .input_buffer(&role)
            .ok_or_else(|| RuntimeError::Setup(format!("the step reads no {role}")))?;
        Ok(self.read_value(&buffer)?.into_float())
    }

    /// The first state tensor (parameter, momentum, running statistic, then the last step's
    /// Fisher estimates) that holds a NaN or an infinity, by name, and how many it holds:
    /// counted on the device, where only the counts come back.
    pub fn non_finite_state(&mut self) -> Result<Option<(String, u64)>, RuntimeError> {
        let mut named: Vec<(String, Buffer)> = state_names(&self.network)
            .into_iter()
            .filter_map(|(name, role)| Some((name, self.input_buffer(&role)?)))
            .collect();
        for (i, param) in self.network.params.iter().enumerate() {
            if let Some(fisher) = self.output_buffer(&Output::Fisher(i)) {
                named.push((format!("fisher/{}", param.name), fisher));
            }
        }
        let buffers: Vec<Buffer> = named.iter().map(|(_, b)| b.clone()).collect();
        let counts = self.backend.count_non_finite(&buffers)?;
        Ok(named
            .into_iter()
            .zip(counts)
            .find(|(_, count)| *count > 0)
            .map(|((name, _), count)| (name, count)))
    }

    /// Parameters, momenta and running statistics as they are on the device now.
    pub fn state(&mut self) -> Result<TrainState<f32>, RuntimeError> {
        let (params, bns) = (self.network.params.len(), self.network.bn_layers.len());
        let list =
            |s: &mut Self, count: usize, role: fn(usize) -> Role| -> Result<Vec<_>, RuntimeError> {
                (0..count).map(|i| s.read_role(role(i))).collect()
            };
        Ok(TrainState {
            params: list(self, params, Role::Param)?,
            momenta: list(self, params, Role::Momentum)?,
            running_means: list(self, bns, Role::RunningMean)?,
            running_vars: list(self, bns, Role::RunningVar)?,
        })
    }
}
