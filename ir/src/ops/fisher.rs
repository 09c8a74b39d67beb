//! The definition of the diagonal Fisher estimate, shared by the ops' Fisher rules.
//!
//! The loss is the batch mean `L = (1/M) Σₙ ℓₙ`, so the gradient `dy` reaching a layer carries a
//! factor 1/M. Example n's *contribution* `cₙ` to a parameter's batch gradient is its
//! backpropagated `dy` times its input, summed over positions; its per-example gradient is
//! `M·cₙ`. Without batch norm that is exactly `∇ℓₙ`; with training-mode batch norm (where ℓₙ
//! depends on the whole batch) we *define* it so. Then
//!
//! * `exact`: `F̂ = (1/M) Σₙ (M·cₙ)²`, from materialised contributions;
//! * `a2g2` (supplement A.4/A.5): `F̂ = (1/M) Σₙ Σₜ a²ₙₜ (M·dyₙₜ)²`, which drops the cross terms
//!   between positions (exact for linear layers, which have one position).
//!
//! The graphs are written literally (scale, then square, then mean), with no algebra applied:
//! moving the scalars out of the squares is the optimizer's job.

use super::{BatchMean, ChannelSum, FisherCtx, FloatAttr, Op, Scale, Square};
use crate::error::ShapeError;
use crate::port::PortRef;

/// `M·dy`: the gradient of each example's own loss.
pub(crate) fn per_example_upstream(
    cx: &mut FisherCtx<'_>,
    dy: PortRef,
) -> Result<PortRef, ShapeError> {
    let factor = FloatAttr(cx.batch as f64);
    cx.vjp.add(Scale { factor }, &[dy])
}

/// `(1/M) Σₙ (M·cₙ)²` from the contributions `cₙ`, stacked along axis 0.
pub(crate) fn exact_from_contributions(
    cx: &mut FisherCtx<'_>,
    contributions: PortRef,
) -> Result<PortRef, ShapeError> {
    let factor = FloatAttr(cx.batch as f64);
    let per_example = cx.vjp.add(Scale { factor }, &[contributions])?;
    let squares = cx.vjp.add(Square, &[per_example])?;
    cx.vjp.add(BatchMean, &[squares])
}

/// `(1/M) · Σ`, for a sum over examples (and positions) of squared terms.
pub(crate) fn a2g2_mean(cx: &mut FisherCtx<'_>, sum: PortRef) -> Result<PortRef, ShapeError> {
    let factor = FloatAttr(1.0 / cx.batch as f64);
    cx.vjp.add(Scale { factor }, &[sum])
}

/// a2g2 of a weight: `(1/M)·wgrad(x², (M·dy)²)`, with the layer's own weight-gradient op.
pub(crate) fn a2g2_weight(
    cx: &mut FisherCtx<'_>,
    wgrad: impl Into<Op>,
    x: PortRef,
    dy: PortRef,
) -> Result<PortRef, ShapeError> {
    let upstream = per_example_upstream(cx, dy)?;
    let g2 = cx.vjp.add(Square, &[upstream])?;
    let x2 = cx.vjp.add(Square, &[x])?;
    let sum = cx.vjp.add(wgrad, &[x2, g2])?;
    a2g2_mean(cx, sum)
}

/// a2g2 of a bias (an input of ones): `(1/M)·Σₙₜ (M·dy)²` per channel.
pub(crate) fn a2g2_bias(cx: &mut FisherCtx<'_>, dy: PortRef) -> Result<PortRef, ShapeError> {
    let upstream = per_example_upstream(cx, dy)?;
    let g2 = cx.vjp.add(Square, &[upstream])?;
    let sum = cx.vjp.add(ChannelSum, &[g2])?;
    a2g2_mean(cx, sum)
}
