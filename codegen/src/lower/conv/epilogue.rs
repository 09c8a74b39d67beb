//! The data gradient's and weight gradient's epilogues: the ReLU mask and BN-backward terms
//! of dx, the weight totals and their squares.

use super::*;

/// The epilogue's mask inputs, declared as kernel parameters in the op's input order (after
/// y, mean and var).
pub(super) enum MaskSource {
    /// γ and β: the ReLU recomputed from y.
    Recomputed(BnParams),
    /// The shortcut's gradient and the ReLU's output.
    Residual { shortcut: U64, out: U64 },
}

/// A fused data gradient's epilogue parameters: the BN's input y and statistics, where its
/// ReLU mask comes from, and the squares its reductions sum.
pub(super) struct DgradEpilogue {
    pub(super) y: U64,
    pub(super) mean: U64,
    pub(super) var: U64,
    pub(super) eps: f32,
    pub(super) mask: MaskSource,
    pub(super) squares: Squares,
}

impl DgradEpilogue {
    /// The kernel parameters of `e`'s epilogue, in their order.
    pub(super) fn params(k: &mut KernelBuilder, e: &FusedDgrad) -> DgradEpilogue {
        let y = k.ptr_param("y");
        let (mean, var) = (k.ptr_param("mean"), k.ptr_param("var"));
        let eps = e.eps.0 as f32;
        let mask = if e.residual {
            MaskSource::Residual {
                shortcut: k.ptr_param("shortcut_gradient"),
                out: k.ptr_param("relu_out"),
            }
        } else {
            MaskSource::Recomputed(BnParams {
                mean,
                var,
                gamma: k.ptr_param("gamma"),
                beta: k.ptr_param("beta"),
                eps,
            })
        };
        DgradEpilogue {
            y,
            mean,
            var,
            eps,
            mask,
            squares: e.squares,
        }
    }

    /// The gradient `acc` at element `at` (column `col`, where `col_ok`) masked by the ReLU
    /// and stored to `dx` where `ok`; returns it and x̂ there.
    pub(super) fn store_masked(
        &self,
        k: &mut KernelBuilder,
        (acc, dx): (F32, U64),
        (ok, at): (Pred, Idx),
        (col_ok, col): (Pred, U32),
    ) -> (F32, F32) {
        let yv = load_inside(k, ok, self.y, at);
        let c = k.select_u(col_ok, col, 0u32);
        let dz = match &self.mask {
            MaskSource::Recomputed(params) => {
                let z = bn_apply(k, yv, params, c);
                let active = k.cmp_f32(Cmp::Gt, z, 0.0f32);
                k.select(active, acc, 0.0f32)
            }
            MaskSource::Residual { shortcut, out } => {
                let r = load_inside(k, ok, *shortcut, at);
                let relu = load_inside(k, ok, *out, at);
                let sum = k.add(acc, r);
                let active = k.cmp_f32(Cmp::Gt, relu, 0.0f32);
                k.select(active, sum, 0.0f32)
            }
        };
        k.when(ok, |k| k.store(dx, at, dz));
        (dz, normalised(k, yv, self.mean, self.var, c, self.eps))
    }
}

/// Every element of the tile stored to dx (ReLU-masked under an epilogue); under one, each
/// element's (dz, x̂), which its BN terms are made of.
pub(super) fn store_dx(
    k: &mut KernelBuilder,
    (tile, coords, n): (&Products, &Coordinates, U32),
    (g, batching): (&Geometry, Rows),
    dx: U64,
    bn: Option<&DgradEpilogue>,
) -> Vec<Vec<(F32, F32)>> {
    let positions = g.h * g.w;
    let mut masked = Vec::new();
    for (i, row) in tile.values.iter().enumerate() {
        let mut row_terms = Vec::new();
        let (example, p) = batching.split(k, coords.rows[i], n);
        for (j, &acc) in row.iter().enumerate() {
            let ok = k.and(coords.row_ok[i], coords.col_ok[j]);
            let at = plane_element(k, (example, coords.cols[j]), (g.c, positions), p);
            let Some(bn) = bn else {
                k.when(ok, |k| k.store(dx, at, acc));
                continue;
            };
            let column = (coords.col_ok[j], coords.cols[j]);
            row_terms.push(bn.store_masked(k, (acc, dx), (ok, at), column));
        }
        masked.push(row_terms);
    }
    masked
}

/// Weight element (i, j) of the micro-tile, o·(C·area) + column (`columns` of them a row),
/// and whether it exists; made where used, not kept across a loop (registers).
pub(super) fn weight_element(
    k: &mut KernelBuilder,
    coords: &Coordinates,
    (i, j): (usize, usize),
    columns: u32,
) -> (U32, Pred) {
    let e = k.mad_u(coords.rows[i], columns, coords.cols[j]);
    (e, k.and(coords.row_ok[i], coords.col_ok[j]))
}

/// A weight gradient's totals (and their squares) stored: straight into the outputs
/// `targets`, or with `chunk_of` (this block's chunk, the chunks, the weights) into the
/// partials `targets[0][term][chunk][element]`.
pub(super) fn store_totals(
    k: &mut KernelBuilder,
    (place, columns): (&TilePlace, u32),
    totals: &Products,
    targets: &[U64],
    chunk_of: Option<(U32, u32, u64)>,
) {
    let coords = place.coordinates(k);
    for (i, row) in totals.values.iter().enumerate() {
        for (jj, &total) in row.iter().enumerate() {
            let (e, ok) = weight_element(k, &coords, (i, jj), columns);
            let mut sums = vec![total];
            sums.extend(totals.squares.as_ref().map(|sq| sq[i][jj]));
            k.when(ok, |k| {
                for (t, &total) in sums.iter().enumerate() {
                    let Some((j, chunks, weights)) = chunk_of else {
                        k.store(targets[t], e, total);
                        continue;
                    };
                    let row = k.add_u(j, (t as u32) * chunks);
                    let row = k.idx(row);
                    let e_idx = k.idx(e);
                    let at = k.idx_mad(row, weights, e_idx);
                    k.store(targets[0], at, total);
                }
            });
        }
    }
}
