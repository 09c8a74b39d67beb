//! Fully connected layer `y = x·wᵀ (+ b)` (x `[N, I]`, w `[O, I]` as in PyTorch) and its
//! backward and Fisher ops.

use super::fisher::{a2g2_bias, a2g2_weight, exact_from_contributions};
use super::{
    ChannelSum, FisherCtx, OpClass, OpDef, Rounding, VjpCtx, expect_arity, expect_rank,
    expect_type, float_out, flop_product, shape_str,
};
use crate::cpu::for_each_example;
use crate::error::{OpError, ShapeError};
use crate::matmul::{Mat, matmul};
use crate::noise::FisherMode;
use crate::port::PortRef;
use crate::tensor::{Real, Tensor, TensorType, Value};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Linear {
    pub bias: bool,
}

impl OpDef for Linear {
    const NAME: &'static str = "linear";
    const CLASS: OpClass = OpClass::Linear;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, if self.bias { 3 } else { 2 })?;
        let (x, w) = (inputs[0], inputs[1]);
        expect_rank(x, 2, "input")?;
        expect_rank(w, 2, "weight")?;
        if w.shape[1] != x.shape[1] {
            return Err(format!(
                "weight: expected [O, {}] for {} input features, found {}",
                x.shape[1],
                x.shape[1],
                shape_str(&w.shape)
            )
            .into());
        }
        if self.bias {
            expect_type(inputs[2], &TensorType::f32(&[w.shape[0]]), "bias")?;
        }
        Ok(vec![TensorType::f32(&[x.shape[0], w.shape[0]])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (x, w) = (inputs[0].float(), inputs[1].float());
        let (n, i, o) = (x.shape[0], x.shape[1], w.shape[0]);
        let mut y = Tensor::zeros(&out[0].shape);
        matmul(
            Mat::new(&x.data, n, i),
            Mat::new(&w.data, o, i).t(),
            &mut y.data,
            false,
            true,
        );
        if self.bias {
            let b = &inputs[2].float().data;
            for row in y.data.chunks_mut(o) {
                row.iter_mut().zip(b).for_each(|(v, &bias)| *v = *v + bias);
            }
        }
        Ok(float_out(y))
    }

    fn flops(&self, inputs: &[&TensorType], out: &[TensorType]) -> u64 {
        flop_product(&[2, inputs[0].numel(), inputs[1].shape[0]])
            + self.bias as u64 * out[0].numel() as u64
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        let dy = cx.dout(Self::NAME, 0)?;
        let (x, w) = (cx.inputs[0], cx.inputs[1]);
        let mut grads = vec![None; cx.inputs.len()];
        if cx.wants[0] {
            grads[0] = Some(cx.add(LinearDgrad, &[dy, w])?);
        }
        if cx.wants[1] {
            grads[1] = Some(cx.add(LinearWgrad, &[x, dy])?);
        }
        if self.bias && cx.wants[2] {
            grads[2] = Some(cx.add(ChannelSum, &[dy])?);
        }
        Ok(grads)
    }

    /// One position per example, so `a2g2` is exact here too (computed as wgrad of squares).
    fn fisher(&self, cx: &mut FisherCtx<'_>) -> Result<Vec<Option<PortRef>>, ShapeError> {
        let dy = cx.vjp.dout(Self::NAME, 0)?;
        let x = cx.vjp.inputs[0];
        let mut fisher = vec![None; cx.vjp.inputs.len()];
        fisher[1] = Some(match cx.mode {
            FisherMode::Exact => {
                let contributions = cx.vjp.add(LinearWgradPerExample, &[x, dy])?;
                exact_from_contributions(cx, contributions)?
            }
            _ => a2g2_weight(cx, LinearWgrad, x, dy)?,
        });
        if self.bias {
            // each example's bias contribution is its row of dy
            fisher[2] = Some(match cx.mode {
                FisherMode::Exact => exact_from_contributions(cx, dy)?,
                _ => a2g2_bias(cx, dy)?,
            });
        }
        Ok(fisher)
    }
}

/// `dx = dy·w`: dy `[N, O]`, w `[O, I]` → `[N, I]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LinearDgrad;

impl OpDef for LinearDgrad {
    const NAME: &'static str = "linear_dgrad";
    const CLASS: OpClass = OpClass::Linear;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        expect_arity(inputs, 2)?;
        let (dy, w) = (inputs[0], inputs[1]);
        expect_rank(dy, 2, "output gradient")?;
        expect_rank(w, 2, "weight")?;
        if dy.shape[1] != w.shape[0] {
            return Err(format!(
                "output gradient: expected [N, {}], found {}",
                w.shape[0],
                shape_str(&dy.shape)
            )
            .into());
        }
        Ok(vec![TensorType::f32(&[dy.shape[0], w.shape[1]])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (dy, w) = (inputs[0].float(), inputs[1].float());
        let (n, o, i) = (dy.shape[0], w.shape[0], w.shape[1]);
        let mut dx = Tensor::zeros(&out[0].shape);
        matmul(
            Mat::new(&dy.data, n, o),
            Mat::new(&w.data, o, i),
            &mut dx.data,
            false,
            true,
        );
        Ok(float_out(dx))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        flop_product(&[2, inputs[0].numel(), inputs[1].shape[1]])
    }
}

/// Checks (x `[N, I]`, dy `[N, O]`) and returns (N, I, O).
fn check_wgrad(inputs: &[&TensorType]) -> Result<(usize, usize, usize), OpError> {
    expect_arity(inputs, 2)?;
    let (x, dy) = (inputs[0], inputs[1]);
    expect_rank(x, 2, "input")?;
    expect_rank(dy, 2, "output gradient")?;
    if dy.shape[0] != x.shape[0] {
        return Err(format!(
            "output gradient: expected [{}, O], found {}",
            x.shape[0],
            shape_str(&dy.shape)
        )
        .into());
    }
    Ok((x.shape[0], x.shape[1], dy.shape[1]))
}

/// `dw = dyᵀ·x`: x `[N, I]`, dy `[N, O]` → `[O, I]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LinearWgrad;

impl OpDef for LinearWgrad {
    const NAME: &'static str = "linear_wgrad";
    const CLASS: OpClass = OpClass::Linear;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let (_, i, o) = check_wgrad(inputs)?;
        Ok(vec![TensorType::f32(&[o, i])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (x, dy) = (inputs[0].float(), inputs[1].float());
        let (n, i, o) = (x.shape[0], x.shape[1], dy.shape[1]);
        let mut dw = Tensor::zeros(&out[0].shape);
        matmul(
            Mat::new(&dy.data, n, o).t(),
            Mat::new(&x.data, n, i),
            &mut dw.data,
            false,
            true,
        );
        Ok(float_out(dw))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        let (n, i, o) = check_wgrad(inputs).expect("typed graph");
        flop_product(&[2, n, i, o])
    }
}

/// Per-example weight gradients `[N, O, I]`: the outer products `dyₙ ⊗ xₙ`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LinearWgradPerExample;

impl OpDef for LinearWgradPerExample {
    const NAME: &'static str = "linear_wgrad_per_example";
    const CLASS: OpClass = OpClass::Linear;
    const ROUNDING: Rounding = Rounding::ManyTerms;

    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let (n, i, o) = check_wgrad(inputs)?;
        Ok(vec![TensorType::f32(&[n, o, i])])
    }

    fn eval<T: Real>(
        &self,
        inputs: &[&Value<T>],
        out: &[TensorType],
    ) -> Result<Vec<Value<T>>, OpError> {
        let (x, dy) = (inputs[0].float(), inputs[1].float());
        let (i, o) = (x.shape[1], dy.shape[1]);
        let mut per_example = Tensor::zeros(&out[0].shape);
        for_each_example(&mut per_example.data, o * i, 0, |n, dw_n, _| {
            let x_n = &x.data[n * i..][..i];
            for (row, &g) in dw_n.chunks_mut(i).zip(&dy.data[n * o..][..o]) {
                row.iter_mut().zip(x_n).for_each(|(d, &a)| *d = g * a);
            }
        });
        Ok(float_out(per_example))
    }

    fn flops(&self, inputs: &[&TensorType], _: &[TensorType]) -> u64 {
        let (n, i, o) = check_wgrad(inputs).expect("typed graph");
        flop_product(&[n, i, o])
    }
}
