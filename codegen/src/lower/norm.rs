//! Batch-norm kernels: statistics (two passes, as the reference), the affine map with and
//! without ReLU and residual, the running-statistics update, and the backward reductions
//! (with the Fisher squares) and data gradient.

use fisherc_ir::ops::{BnRunningUpdate, BnRunningUpdateGroup, MemberPorts, Op, Squares};

use super::common::{
    BnParams, Combine, Cx, Planes, bn_apply, bn_combine, bn_terms, combine_channels, grid_for,
    input, launch, map, member_blocks, normalised, output, partials_bytes, per_plane, scratch,
    store_partials, within_parameter_space,
};
use super::{Launch, Lowered};
use crate::builder::{FOp, Idx, KernelBuilder, U64};
use crate::kir::{Cmp, Kernel};

pub fn lower(cx: &Cx) -> Lowered {
    match cx.op {
        Op::BatchNorm(bn) => batch_norm(cx, bn.eps.0 as f32),
        Op::BnApply(bn) => Lowered::kernels(vec![apply(cx, bn.eps.0 as f32, false, false)]),
        Op::BnRelu(b) => Lowered::kernels(vec![apply(cx, b.eps.0 as f32, true, b.residual)]),
        Op::BnRunningUpdate(u) => Lowered::kernels(vec![running_update(cx, u)]),
        Op::BnRunningUpdateGroup(g) => running_update_group(cx, g),
        Op::BnBackwardReduce(b) => reductions(cx, b.eps.0 as f32, Squares::None, Form::Sums),
        Op::BnBackwardReduceSq(b) => reductions(cx, b.eps.0 as f32, b.squares, Form::Sums),
        Op::BnParamGradsPerExample(b) => {
            reductions(cx, b.eps.0 as f32, Squares::None, Form::PerExample)
        }
        Op::BnParamGradsSq(b) => reductions(cx, b.eps.0 as f32, Squares::None, Form::SquaresOnly),
        Op::ReluBackwardBnReduce(b) => {
            reductions(cx, b.eps.0 as f32, b.squares, Form::AfterReluMask)
        }
        Op::BnBackwardData(b) => Lowered::kernels(vec![data_gradient(cx, b.eps.0 as f32)]),
        other => unreachable!("{} is not a batch-norm op", other.name()),
    }
}

/// Training-mode batch norm: Σx per plane, combined into the mean; Σ(x − mean)² per plane,
/// combined into the variance; then the affine map.
fn batch_norm(cx: &Cx, eps: f32) -> Lowered {
    let planes = Planes::of(cx.inputs[0]);
    let count = planes.batch * planes.positions;

    let mut sum = cx.builder("sum");
    let (x, partials) = (sum.ptr_param("x"), sum.ptr_param("partials"));
    per_plane(
        &mut sum,
        planes,
        |k, i, _, _, _| vec![k.load(x, i)],
        |k, t, c, n| store_partials(k, partials, planes, t, c, n),
    );

    let mut centred = cx.builder("centred");
    let (x, mean, partials) = (
        centred.ptr_param("x"),
        centred.ptr_param("mean"),
        centred.ptr_param("partials"),
    );
    per_plane(
        &mut centred,
        planes,
        |k, i, _, c, _| {
            let v = k.load(x, i);
            let m = k.load(mean, c);
            let d = k.sub(v, m);
            vec![k.mul(d, d)]
        },
        |k, t, c, n| store_partials(k, partials, planes, t, c, n),
    );

    let normalise = affine_kernel(cx, "normalise", eps, false, false);
    let n = cx.inputs[0].numel() as u64;

    let launches = vec![
        launch(sum.finish(), planes.grid(), vec![input(0), scratch(0)]),
        combine_channels(
            cx,
            "mean",
            planes,
            scratch(0),
            &[(Combine::Mean(0, count), output(1))],
        ),
        launch(
            centred.finish(),
            planes.grid(),
            vec![input(0), output(1), scratch(1)],
        ),
        combine_channels(
            cx,
            "variance",
            planes,
            scratch(1),
            &[(Combine::Mean(0, count), output(2))],
        ),
        launch(
            normalise,
            grid_for(n),
            vec![
                input(0),
                output(1),
                output(2),
                input(1),
                input(2),
                output(0),
            ],
        ),
    ];
    Lowered::Kernels {
        launches,
        scratch: vec![partials_bytes(planes, 1); 2],
    }
}

/// BN-apply (+ residual) (+ ReLU) with given statistics: (x, mean, var, γ, β [, s]).
fn apply(cx: &Cx, eps: f32, relu: bool, residual: bool) -> Launch {
    let kernel = affine_kernel(
        cx,
        if relu { "bn_relu" } else { "apply" },
        eps,
        relu,
        residual,
    );
    let mut args: Vec<_> = (0..cx.inputs.len()).map(input).collect();
    args.push(output(0));
    launch(kernel, grid_for(cx.inputs[0].numel() as u64), args)
}

/// `y = γ·x̂ + β` (+ residual) (+ ReLU) per element; parameters x, mean, var, γ, β
/// [, residual], y.
fn affine_kernel(cx: &Cx, part: &str, eps: f32, relu: bool, residual: bool) -> Kernel {
    let planes = Planes::of(cx.inputs[0]);
    let mut k = cx.builder(part);
    let x = k.ptr_param("x");
    let params = BnParams::declare(&mut k, eps);
    let shortcut = residual.then(|| k.ptr_param("residual"));
    let y = k.ptr_param("y");
    map(&mut k, cx.inputs[0].numel() as u64, |k, i| {
        let c = planes.channel(k, i);
        let v = k.load(x, i);
        let mut z = bn_apply(k, v, &params, c);
        if let Some(s) = shortcut {
            let r = k.load(s, i);
            z = k.add(z, r);
        }
        if relu {
            z = k.max(z, 0.0f32);
        }
        k.store(y, i, z);
    });
    k.finish()
}

/// The blend's factors for `update`: (1 − m, m, the unbiased variance's n/(n − 1)).
fn blend_factors(update: &BnRunningUpdate) -> [f32; 3] {
    let m = update.momentum.0 as f32;
    let count = update.count;
    [1.0 - m, m, count as f32 / (count.max(2) - 1) as f32]
}

/// Pointer parameters of one running update, in its launch arguments' order: running mean and
/// variance, batch mean and variance, new mean and variance.
fn running_params(k: &mut KernelBuilder, tag: &str) -> [U64; 6] {
    [
        "running_mean",
        "running_var",
        "mean",
        "var",
        "new_mean",
        "new_var",
    ]
    .map(|p| k.ptr_param(&format!("{p}{tag}")))
}

/// Blends channel `c`: `(1 − m)·old + m·(new·factor)`, the mean's factor 1.
fn blend_channel(k: &mut KernelBuilder, c: Idx, ptrs: [U64; 6], [keep, m, unbias]: [FOp; 3]) {
    for (old, new, out, factor) in [
        (ptrs[0], ptrs[2], ptrs[4], FOp::from(1.0f32)),
        (ptrs[1], ptrs[3], ptrs[5], unbias),
    ] {
        let o = k.load(old, c);
        let b = k.load(new, c);
        let kept = k.mul(keep, o);
        let corrected = k.mul(b, factor);
        let fresh = k.mul(m, corrected);
        let v = k.add(kept, fresh);
        k.store(out, c, v);
    }
}

fn running_update(cx: &Cx, update: &BnRunningUpdate) -> Launch {
    let channels = cx.inputs[0].numel() as u64;
    let mut k = cx.builder("running");
    let ptrs = running_params(&mut k, "");
    let factors = blend_factors(update).map(FOp::from);
    map(&mut k, channels, |k, c| blend_channel(k, c, ptrs, factors));
    let args = vec![input(0), input(1), input(2), input(3), output(0), output(1)];
    launch(k.finish(), grid_for(channels), args)
}

/// Every BN layer's running update in a launch or a few ([`member_blocks`]): a block's member
/// loads its pointers and factors.
fn running_update_group(cx: &Cx, group: &BnRunningUpdateGroup) -> Lowered {
    let members: Vec<(&BnRunningUpdate, MemberPorts)> =
        group.members.iter().zip(group.ports()).collect();
    let launches = within_parameter_space(&members, 0, 6)
        .into_iter()
        .enumerate()
        .map(|(index, set)| {
            let mut k = cx.builder(&format!("running{index}"));
            let ptrs = [(); 6].map(|_| k.null_ptr());
            let factors = [(); 3].map(|_| k.f32(0.0));
            let channels: Vec<u32> = set
                .iter()
                .map(|(_, ports)| cx.inputs[ports.inputs[0]].numel() as u32)
                .collect();
            let thread = member_blocks(&mut k, &channels, &mut |k, m| {
                for (dst, src) in ptrs.iter().zip(running_params(k, &m.to_string())) {
                    k.assign_ptr(*dst, src);
                }
                for (dst, v) in factors.iter().zip(blend_factors(set[m].0)) {
                    k.assign(*dst, v);
                }
            });
            k.when(thread.inside, |k| {
                let c = k.idx(thread.element);
                blend_channel(k, c, ptrs, factors.map(FOp::from));
            });
            let args = set
                .iter()
                .flat_map(|(_, ports)| {
                    let inputs = ports.inputs.iter().map(|&i| input(i));
                    inputs.chain(ports.outputs.clone().map(output))
                })
                .collect();
            launch(k.finish(), thread.grid, args)
        })
        .collect();
    Lowered::kernels(launches)
}

/// What a BN-reduction node outputs.
#[derive(Clone, Copy, PartialEq)]
enum Form {
    /// (Σ dy·x̂, Σ dy [, squares]) per channel.
    Sums,
    /// ([N, C] Σₜ dy·x̂, [N, C] Σₜ dy).
    PerExample,
    /// (Σ (dy·x̂)², Σ dy²) per channel: the a2g2 sums only.
    SquaresOnly,
    /// Input (dout, out, y, mean, var): du = dout·[out > 0] is output 0, then the sums.
    AfterReluMask,
}

fn reductions(cx: &Cx, eps: f32, squares: Squares, form: Form) -> Lowered {
    let planes = Planes::of(cx.inputs[0]);
    let mut k = cx.builder("reduce");
    let names: &[&str] = match form {
        Form::AfterReluMask => &["dout", "out", "x", "mean", "var"],
        _ => &["dy", "x", "mean", "var"],
    };
    let ins: Vec<U64> = names.iter().map(|p| k.ptr_param(p)).collect();
    let per_element = (form == Form::AfterReluMask).then(|| k.ptr_param("du"));
    let target = k.ptr_param(if form == Form::PerExample {
        "out"
    } else {
        "partials"
    });
    let second = (form == Form::PerExample).then(|| k.ptr_param("out1"));
    let stats = &ins[ins.len() - 3..];
    let (x, mean, var) = (stats[0], stats[1], stats[2]);
    let mut terms = 0;
    per_plane(
        &mut k,
        planes,
        |k, i, _, c, _| {
            let g = match per_element {
                Some(du_out) => {
                    let (dout, out) = (k.load(ins[0], i), k.load(ins[1], i));
                    let active = k.cmp_f32(Cmp::Gt, out, 0.0f32);
                    let du = k.select(active, dout, 0.0f32);
                    k.store(du_out, i, du);
                    du
                }
                None => k.load(ins[0], i),
            };
            let v = k.load(x, i);
            let xhat = normalised(k, v, mean, var, c, eps);
            let values = match form {
                Form::SquaresOnly => {
                    let gx = k.mul(g, xhat);
                    vec![k.mul(gx, gx), k.mul(g, g)]
                }
                _ => bn_terms(k, g, xhat, squares),
            };
            terms = values.len();
            values
        },
        |k, totals, c, n| match second {
            Some(out1) => {
                let plane = k.mad_u(n, planes.channels as u32, c);
                k.store(target, plane, totals[0]);
                k.store(out1, plane, totals[1]);
            }
            None => store_partials(k, target, planes, totals, c, n),
        },
    );
    let mut args: Vec<_> = (0..cx.inputs.len()).map(input).collect();
    if form == Form::PerExample {
        args.extend([output(0), output(1)]);
        return Lowered::kernels(vec![launch(k.finish(), planes.grid(), args)]);
    }
    if per_element.is_some() {
        args.push(output(0));
    }
    args.push(scratch(0));
    let first_sum = usize::from(per_element.is_some());
    let combine = match form {
        Form::SquaresOnly => vec![Combine::Sum(0), Combine::Sum(1)],
        _ => bn_combine(squares),
    };
    let outputs: Vec<_> = combine
        .into_iter()
        .zip((first_sum..cx.outputs.len()).map(output))
        .collect();
    Lowered::Kernels {
        launches: vec![
            launch(k.finish(), planes.grid(), args),
            combine_channels(cx, "channels", planes, scratch(0), &outputs),
        ],
        scratch: vec![partials_bytes(planes, terms)],
    }
}

/// dx = γ·invstd·(dy − Σdy/m − x̂·Σdy·x̂/m), in the reference's order.
fn data_gradient(cx: &Cx, eps: f32) -> Launch {
    let planes = Planes::of(cx.inputs[0]);
    let inv_count = 1.0f32 / (planes.batch * planes.positions) as f32;
    let n = cx.inputs[0].numel() as u64;
    let mut k = cx.builder("data");
    let p: Vec<U64> = ["dy", "x", "mean", "var", "gamma", "dgamma", "dbeta", "dx"]
        .iter()
        .map(|s| k.ptr_param(s))
        .collect();
    map(&mut k, n, |k, i| {
        let c = planes.channel(k, i);
        let (g, v) = (k.load(p[0], i), k.load(p[1], i));
        let inv = super::common::inv_std(k, p[3], c, eps);
        let mean_dy = {
            let b = k.load(p[6], c);
            k.mul(b, inv_count)
        };
        let mean_dy_xhat = {
            let a = k.load(p[5], c);
            k.mul(a, inv_count)
        };
        let m = k.load(p[2], c);
        let centred = k.sub(v, m);
        let xhat = k.mul(centred, inv);
        let t = k.mul(xhat, mean_dy_xhat);
        let u = k.sub(g, mean_dy);
        let u = k.sub(u, t);
        let gamma = k.load(p[4], c);
        let scale = k.mul(gamma, inv);
        let dx = k.mul(scale, u);
        k.store(p[7], i, dx);
    });
    let mut args: Vec<_> = (0..7).map(input).collect();
    args.push(output(0));
    launch(k.finish(), grid_for(n), args)
}
