//! Per-channel reductions (bias gradients and their squares): a warp or a block per (channel,
//! example) plane sums its positions into a partial; a block per channel then combines the
//! partials over the batch (squaring them for the per-example Fisher).

use fisherc_ir::ops::{Op, Squares};

use super::Lowered;
use super::common::{
    Combine, Cx, Planes, combine_channels, input, launch, output, partials_bytes, per_plane,
    scratch, store_partials,
};

pub fn lower(cx: &Cx) -> Lowered {
    let planes = Planes::of(cx.inputs[0]);
    let per_example = matches!(cx.op, Op::ChannelSumPerExample(_));
    let squares = match cx.op {
        Op::ChannelSumSq(s) => s.squares,
        _ => Squares::None,
    };
    let mut k = cx.builder("planes");
    let dy = k.ptr_param("dy");
    let target = k.ptr_param(if per_example { "out" } else { "partials" });
    per_plane(
        &mut k,
        planes,
        |k, i, _, _, _| {
            let g = k.load(dy, i);
            match squares {
                Squares::PerPosition => vec![g, k.mul(g, g)],
                _ => vec![g],
            }
        },
        // per example, the plane's sum is the output; otherwise a partial
        |k, totals, c, n| store_partials(k, target, planes, totals, c, n),
    );
    if per_example {
        return Lowered::kernels(vec![launch(
            k.finish(),
            planes.grid(),
            vec![input(0), output(0)],
        )]);
    }
    let combine = match squares {
        Squares::None => vec![Combine::Sum(0)],
        Squares::PerExample => vec![Combine::Sum(0), Combine::SumOfSquares(0)],
        Squares::PerPosition => vec![Combine::Sum(0), Combine::Sum(1)],
    };
    let terms = if squares == Squares::PerPosition {
        2
    } else {
        1
    };
    let outputs: Vec<_> = combine
        .into_iter()
        .zip((0..cx.outputs.len()).map(output))
        .collect();
    Lowered::Kernels {
        launches: vec![
            launch(k.finish(), planes.grid(), vec![input(0), scratch(0)]),
            combine_channels(cx, "channels", planes, scratch(0), &outputs),
        ],
        scratch: vec![partials_bytes(planes, terms)],
    }
}
