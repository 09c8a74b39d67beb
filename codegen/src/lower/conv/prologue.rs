//! The BN-apply + ReLU prologue a forward or weight gradient applies on load, and the pairs
//! of statistics it reads.

use super::*;

/// Per-channel BN-apply + ReLU of a prologue, the reference's `relu((x − mean)·scale + β)`
/// as `relu(x·scale + shift)`, `scale = γ·invstd` and `shift = β − mean·scale` (one fused
/// multiply-add where the reference takes three operations: within the GEMM's bounds, and
/// the same in every convolution that recomputes the activation).
pub(super) struct Prologue {
    pub(super) scale: F32,
    pub(super) shift: F32,
}

/// Where a gather finds its prologue: the per-channel (scale, shift) pairs that
/// `with_prologue_pairs`' first kernel computes once (not at every gathered element), and
/// (0, 0) for channel C, where the gather puts padding.
#[derive(Clone, Copy)]
pub(super) struct PrologueSource {
    pub(super) pairs: U64,
}

impl Prologue {
    pub(super) fn load(k: &mut KernelBuilder, source: &PrologueSource, c: U32) -> Prologue {
        let first = k.mul_u(c, 2u32);
        let at = k.element_ptr(source.pairs, first);
        Prologue::at(k, at)
    }

    /// The pair at `pair`.
    pub(super) fn at(k: &mut KernelBuilder, pair: GlobalF32) -> Prologue {
        Prologue {
            scale: k.load_from(pair),
            shift: k.load_from(pair.plus(1)),
        }
    }

    pub(super) fn apply(&self, k: &mut KernelBuilder, x: F32) -> F32 {
        let z = k.fma(x, self.scale, self.shift);
        k.max(z, 0.0f32)
    }
}

/// The prologue's statistics pointers, read from the kernel's parameters.
pub(super) fn prologue_params(
    k: &mut KernelBuilder,
    prologue: Option<FloatAttr>,
) -> Option<BnParams> {
    prologue.map(|eps| BnParams::declare(k, eps.0 as f32))
}

/// The prologue's pairs parameter, which must be the kernel's last (see
/// `with_prologue_pairs`); the statistics' own parameters stay declared before it.
pub(super) fn prologue_source(
    k: &mut KernelBuilder,
    params: Option<BnParams>,
) -> Option<PrologueSource> {
    params.map(|_| PrologueSource {
        pairs: k.ptr_param("prologue_pairs"),
    })
}

/// Inputs 1 to 4 of a convolution with a prologue: the BN mean, variance, γ and β.
pub(super) const PROLOGUE_STATISTICS: std::ops::RangeInclusive<usize> = 1..=4;

/// Adds the prologue's pairs to a lowering whose first launch is the main kernel (with
/// `prologue_pairs` as its last parameter): a first kernel computes, per channel,
/// `scale = γ·(var + ε)^(−½)` (as `bn_apply` does) and `shift = β − mean·scale`, into a new
/// scratch buffer of `channels + 1` pairs, the last (0, 0).
pub(super) fn with_prologue_pairs(
    cx: &Cx,
    lowered: Lowered,
    eps: FloatAttr,
    channels: u64,
) -> Lowered {
    let Lowered::Kernels {
        mut launches,
        scratch: mut buffers,
    } = lowered
    else {
        unreachable!("a convolution lowers to kernels")
    };
    let buffer = scratch(buffers.len());
    buffers.push(4 * 2 * (channels + 1));
    launches[0].args.push(buffer);
    let mut k = cx.builder("prologue_pairs");
    let params = BnParams::declare(&mut k, eps.0 as f32);
    let out = k.ptr_param("pairs");
    map(&mut k, channels + 1, |k, c| {
        let c = k.idx_to_u32(c);
        let real = k.cmp_u(Cmp::Lt, c, channels as u32);
        let safe = k.ubin(BinOp::Min, c, channels as u32 - 1);
        let inv = inv_std(k, params.var, safe, params.eps);
        let g = k.load(params.gamma, safe);
        let scale = k.mul(g, inv);
        let mean = k.load(params.mean, safe);
        let beta = k.load(params.beta, safe);
        let minus_mean = k.neg(mean);
        let shift = k.fma(minus_mean, scale, beta);
        let scale = k.select(real, scale, 0.0f32);
        let shift = k.select(real, shift, 0.0f32);
        let first = k.mul_u(c, 2u32);
        k.store(out, first, scale);
        let second = k.add_u(first, 1u32);
        k.store(out, second, shift);
    });
    let mut args: Vec<_> = PROLOGUE_STATISTICS.map(input).collect();
    args.push(buffer);
    launches.insert(0, launch(k.finish(), grid_for(channels + 1), args));
    Lowered::Kernels {
        launches,
        scratch: buffers,
    }
}
