//! The noisy SGD update: one thread per element; drawn noise comes from `rng`, bit-identical
//! to the CPU's.

use fisherc_ir::ops::{NoisySgdUpdate, Op, UpdateNoise};

use super::common::{Cx, grid_for, input, launch, map, output};
use super::rng::{normal, split};
use super::{LaunchArg, Lowered};
use crate::builder::{KernelBuilder, U64};

/// The op, whose associated constants are its input positions.
type U = NoisySgdUpdate;

pub fn lower(cx: &Cx) -> Lowered {
    let Op::NoisySgdUpdate(update) = cx.op else {
        unreachable!("{} is not the update", cx.op.name())
    };
    let n = cx.inputs[U::THETA].numel() as u64;
    let mut k = cx.builder("update");
    let ins: Vec<U64> = (0..cx.inputs.len())
        .map(|i| k.ptr_param(&format!("in{i}")))
        .collect();
    let (new_theta, new_v) = (k.ptr_param("new_theta"), k.ptr_param("new_v"));
    let fisher = update.fisher_factor.map(|f| (f, k.ptr_param("fisher")));
    // an argument, not an immediate: parameters of one size share one kernel
    let param = k.u32_param("param");
    let scalar = |k: &mut KernelBuilder, i: usize| k.load(ins[i], 0u32);
    let (lr, mu, wd, s) = (
        scalar(&mut k, U::LR),
        scalar(&mut k, U::MOMENTUM),
        scalar(&mut k, U::WEIGHT_DECAY),
        scalar(&mut k, U::NOISE_SCALE),
    );
    let seed = k.load_u64(ins[U::SEED], 0);
    let step = k.load_u64(ins[U::STEP], 0);
    let (seed_lo, seed_hi) = split(&mut k, seed);
    let (step_lo, step_hi) = split(&mut k, step);
    map(&mut k, n, |k, i| {
        let (theta, v, g) = (
            k.load(ins[U::THETA], i),
            k.load(ins[U::VELOCITY], i),
            k.load(ins[U::GRAD], i),
        );
        let d = k.f32(0.0);
        k.assign(d, g);
        let variance = match update.noise {
            UpdateNoise::None => None,
            UpdateNoise::Diagonal => {
                let estimate = k.load(ins[U::NOISE], i);
                // F̂ = f·S made here, as `scale` makes it, and written for the step's output
                Some(match fisher {
                    Some((factor, out)) => {
                        let scaled = k.mul(estimate, factor.0 as f32);
                        k.store(out, i, scaled);
                        scaled
                    }
                    None => estimate,
                })
            }
            UpdateNoise::Scalar => Some(k.load(ins[U::NOISE], 0u32)),
            UpdateNoise::Vector => {
                let e = k.load(ins[U::NOISE], i);
                let eps = k.mul(s, e);
                k.accumulate(d, eps);
                None
            }
        };
        if let Some(variance) = variance {
            let xi = normal(k, i, param, [seed_lo, seed_hi], [step_lo, step_hi]);
            let root = k.sqrt(variance);
            let amplitude = k.mul(s, root);
            let eps = k.mul(amplitude, xi);
            k.accumulate(d, eps);
        }
        if update.decay {
            let decay = k.mul(wd, theta);
            k.accumulate(d, decay);
        }
        let kept = k.mul(mu, v);
        let velocity = k.add(kept, d);
        let stepped = k.mul(lr, velocity);
        let theta2 = k.sub(theta, stepped);
        k.store(new_v, i, velocity);
        k.store(new_theta, i, theta2);
    });
    let mut args: Vec<_> = (0..cx.inputs.len()).map(input).collect();
    args.extend([output(0), output(1)]);
    if fisher.is_some() {
        args.push(output(2));
    }
    args.push(LaunchArg::U32(update.param));
    Lowered::kernels(vec![launch(k.finish(), grid_for(n), args)])
}
