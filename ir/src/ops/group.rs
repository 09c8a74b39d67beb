//! Ops of one kind side by side as one node: a [`Group`] of the step's per-tensor updates (each
//! parameter's noisy update, each BN layer's running statistics), so that the device runs them
//! in a kernel or a few instead of one launch per tensor. The optimizer's last pass
//! (`optimize::group`) makes them; each member computes exactly what it computes alone.
//!
//! Inputs: the members' shared inputs ([`Groupable::SHARED`], taken once), then each member's
//! own inputs in the member's order. Outputs: each member's outputs, member after member. An
//! output a member writes in place of one of its inputs is written in place of that input of
//! the group.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::{BnRunningUpdate, NoisySgdUpdate, OpClass, OpDef, Rounding, UpdateNoise, expect_arity};
use crate::error::OpError;
use crate::tensor::{Real, TensorType, Value};

/// An op whose nodes may stand side by side in a [`Group`].
pub trait Groupable: OpDef + Clone {
    /// The group's op name.
    const GROUP_NAME: &'static str;
    /// The input positions every member of a group reads the same value at.
    const SHARED: Range<usize>;

    /// How many inputs this member takes (shared ones included).
    fn input_count(&self) -> usize;

    /// How many outputs it makes.
    fn output_count(&self) -> usize;

    /// The member in an error message, e.g. `parameter 4`.
    fn describe(&self) -> String;
}

/// Members of one kind as one node (see the module).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Group<M> {
    pub members: Vec<M>,
}

/// Every parameter's noisy update.
pub type NoisySgdUpdateGroup = Group<NoisySgdUpdate>;
/// Every BN layer's running-statistics update.
pub type BnRunningUpdateGroup = Group<BnRunningUpdate>;

/// Where one member's inputs and outputs sit in its group's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberPorts {
    /// The group's input positions of the member's inputs, in the member's own order.
    pub inputs: Vec<usize>,
    /// The group's output positions of the member's outputs.
    pub outputs: Range<usize>,
}

impl<M: Groupable> Group<M> {
    /// Every member's ports, in member order.
    pub fn ports(&self) -> Vec<MemberPorts> {
        let (mut next_input, mut next_output) = (M::SHARED.len(), 0);
        self.members
            .iter()
            .map(|m| {
                let inputs = (0..m.input_count())
                    .map(|i| {
                        if M::SHARED.contains(&i) {
                            i - M::SHARED.start
                        } else {
                            next_input += 1;
                            next_input - 1
                        }
                    })
                    .collect();
                let outputs = next_output..next_output + m.output_count();
                next_output = outputs.end;
                MemberPorts { inputs, outputs }
            })
            .collect()
    }

    /// The group's inputs: the shared ones and every member's own.
    pub fn input_count(&self) -> usize {
        let own = |m: &M| m.input_count() - M::SHARED.len();
        M::SHARED.len() + self.members.iter().map(own).sum::<usize>()
    }
}

impl<M: Groupable> OpDef for Group<M> {
    const NAME: &'static str = M::GROUP_NAME;
    const CLASS: OpClass = M::CLASS;
    const ROUNDING: Rounding = M::ROUNDING;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        if self.members.is_empty() {
            return Err("a group of no members".to_string().into());
        }
        expect_arity(inputs, self.input_count())?;
        let mut outputs = Vec::new();
        for (m, ports) in self.members.iter().zip(self.ports()) {
            let own: Vec<&TensorType> = ports.inputs.iter().map(|&i| inputs[i]).collect();
            let types = m
                .infer(&own)
                .map_err(|e| format!("{}: {e}", m.describe()))?;
            outputs.extend(types);
        }
        Ok(outputs)
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        outputs: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let mut values = Vec::with_capacity(outputs.len());
        for (m, ports) in self.members.iter().zip(self.ports()) {
            let own: Vec<&Value<T>> = ports.inputs.iter().map(|&i| inputs[i]).collect();
            values.extend(m.eval(&own, &outputs[ports.outputs])?);
        }
        Ok(values)
    }

    fn flops(&self, inputs: &[&TensorType], outputs: &[TensorType]) -> u64 {
        self.members
            .iter()
            .zip(self.ports())
            .map(|(m, ports)| {
                let own: Vec<&TensorType> = ports.inputs.iter().map(|&i| inputs[i]).collect();
                m.flops(&own, &outputs[ports.outputs])
            })
            .sum()
    }

    fn in_place(&self, output: usize) -> Option<usize> {
        let (m, ports) = self
            .members
            .iter()
            .zip(self.ports())
            .find(|(_, p)| p.outputs.contains(&output))?;
        let overwritten = m.in_place(output - ports.outputs.start)?;
        Some(ports.inputs[overwritten])
    }
}

impl Groupable for NoisySgdUpdate {
    const GROUP_NAME: &'static str = "noisy_sgd_update_group";
    /// lr, μ, wd, s, seed and step.
    const SHARED: Range<usize> = NoisySgdUpdate::LR..NoisySgdUpdate::NOISE;

    fn input_count(&self) -> usize {
        NoisySgdUpdate::NOISE + (self.noise != UpdateNoise::None) as usize
    }

    fn output_count(&self) -> usize {
        2 + self.fisher_factor.is_some() as usize
    }

    fn describe(&self) -> String {
        format!("update of parameter {}", self.param)
    }
}

impl Groupable for BnRunningUpdate {
    const GROUP_NAME: &'static str = "bn_running_update_group";
    const SHARED: Range<usize> = 0..0;

    fn input_count(&self) -> usize {
        4
    }

    fn output_count(&self) -> usize {
        2
    }

    fn describe(&self) -> String {
        format!("running statistics over {} elements a channel", self.count)
    }
}
