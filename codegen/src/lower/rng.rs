//! The noise stream in PTX: Philox4x32-10, uniforms, `ln` and Box–Muller, computed with the
//! very operations and constants of `fisherc_ir::philox`, so every kernel that draws noise
//! reproduces the CPU's bits.

use fisherc_ir::philox::{
    COS_C2, COS_C4, COS_C6, COS_C8, INV_2_24, LN_C3, LN_C5, LN_C7, LN_C9, LN2_HI, LN2_LO, M0, M1,
    SIN_C3, SIN_C5, SIN_C7, SIN_C9, SQRT_2, TWO_PI, W0, W1,
};

use crate::builder::{F32, Idx, KernelBuilder, U32, U64};
use crate::kir::{BinOp, Cmp};

/// (low, high) 32-bit words of a u64.
pub fn split(k: &mut KernelBuilder, w: U64) -> (U32, U32) {
    let lo = k.u32_from_u64(w);
    let high = k.shr_u64(w, 32);
    let hi = k.u32_from_u64(high);
    (lo, hi)
}

/// The Philox block holding element `i` of `stream` (block `i / 4`) and the element's lane
/// in it (`i % 4`), the layout of `philox::fill_normal` and `philox::word`.
fn block_of(
    k: &mut KernelBuilder,
    i: Idx,
    stream: U32,
    key: [U32; 2],
    step: [U32; 2],
) -> ([U32; 4], U32) {
    let block = k.idx_div_const(i, 4);
    let block = k.idx_to_u32(block);
    let lane = k.idx_rem_const(i, 4);
    let lane = k.idx_to_u32(lane);
    (philox(k, [block, stream, step[0], step[1]], key), lane)
}

/// ξ of element `i` of parameter `param`'s stream, as `philox::fill_normal`.
pub fn normal(k: &mut KernelBuilder, i: Idx, param: U32, key: [U32; 2], step: [U32; 2]) -> F32 {
    let (x, lane) = block_of(k, i, param, key, step);
    let second_pair = k.cmp_u(Cmp::Ge, lane, 2u32);
    let first = k.select_u(second_pair, x[2], x[0]);
    let second = k.select_u(second_pair, x[3], x[1]);
    let (cos, sin) = box_muller(k, first, second);
    let odd_lane = k.ubin(BinOp::And, lane, 1u32);
    let is_sin = k.cmp_u(Cmp::Eq, odd_lane, 1u32);
    k.select(is_sin, sin, cos)
}

/// Word `i` of `stream`, as `philox::word`.
pub fn word(k: &mut KernelBuilder, i: Idx, stream: U32, key: [U32; 2], step: [U32; 2]) -> U32 {
    let (x, lane) = block_of(k, i, stream, key, step);
    let mut chosen = x[0];
    for (l, &xl) in x.iter().enumerate().skip(1) {
        let is_lane = k.cmp_u(Cmp::Eq, lane, l as u32);
        chosen = k.select_u(is_lane, xl, chosen);
    }
    chosen
}

/// `philox::gumbel`: `−ln(−ln u)` with `u` the word's uniform.
pub fn gumbel(k: &mut KernelBuilder, x: U32) -> F32 {
    let u = uniform(k, x);
    let log_u = ln(k, u);
    let neg = k.neg(log_u);
    let log_log = ln(k, neg);
    k.neg(log_log)
}

/// `philox::uniform`: `odd24(x) · 2⁻²⁴`, exact.
fn uniform(k: &mut KernelBuilder, x: U32) -> F32 {
    let odd = odd24(k, x);
    let f = k.f32_from_u32(odd);
    k.mul(f, INV_2_24)
}

fn philox(k: &mut KernelBuilder, counter: [U32; 4], key: [U32; 2]) -> [U32; 4] {
    let mut c = counter;
    let mut key = key;
    for round in 0..10 {
        if round > 0 {
            key = [k.add_u(key[0], W0), k.add_u(key[1], W1)];
        }
        let hi0 = k.ubin(BinOp::MulHi, c[0], M0);
        let lo0 = k.mul_u(c[0], M0);
        let hi1 = k.ubin(BinOp::MulHi, c[2], M1);
        let lo1 = k.mul_u(c[2], M1);
        let a = k.ubin(BinOp::Xor, hi1, c[1]);
        let a = k.ubin(BinOp::Xor, a, key[0]);
        let b = k.ubin(BinOp::Xor, hi0, c[3]);
        let b = k.ubin(BinOp::Xor, b, key[1]);
        c = [a, lo1, b, lo0];
    }
    c
}

/// `2·(x >> 9) + 1`.
fn odd24(k: &mut KernelBuilder, x: U32) -> U32 {
    let top = k.ubin(BinOp::Shr, x, 9u32);
    let shifted = k.ubin(BinOp::Shl, top, 1u32);
    k.ubin(BinOp::Or, shifted, 1u32)
}

/// (r·cos θ, r·sin θ) from two Philox words, as `philox::box_muller`.
fn box_muller(k: &mut KernelBuilder, x0: U32, x1: U32) -> (F32, F32) {
    let u = uniform(k, x0);
    let log = ln(k, u);
    let r2 = k.mul(-2.0f32, log);
    let radius = k.sqrt(r2);
    let turns = odd24(k, x1);
    let (cos, sin) = cos_sin_turns(k, turns);
    (k.mul(radius, cos), k.mul(radius, sin))
}

/// `philox::ln`: exponent and mantissa from the bits, then a short atanh series.
pub fn ln(k: &mut KernelBuilder, u: F32) -> F32 {
    let bits = k.bits_of(u);
    let biased = k.ubin(BinOp::Shr, bits, 23u32);
    let biased = k.s32_from_u32(biased);
    let exponent = k.sbin(BinOp::Sub, biased, 127);
    let mantissa_bits = k.ubin(BinOp::And, bits, 0x007f_ffffu32);
    let mantissa_bits = k.ubin(BinOp::Or, mantissa_bits, 0x3f80_0000u32);
    let m = k.float_of(mantissa_bits);
    let big = k.cmp_f32(Cmp::Gt, m, SQRT_2);
    let halved = k.mul(m, 0.5f32);
    let m = k.select(big, halved, m);
    let bumped = k.sbin(BinOp::Add, exponent, 1);
    let exponent = k.select_s(big, bumped, exponent);
    let num = k.sub(m, 1.0f32);
    let den = k.add(m, 1.0f32);
    let s = k.div(num, den);
    let z = k.mul(s, s);
    let t = k.fma(z, LN_C9, LN_C7);
    let t = k.fma(z, t, LN_C5);
    let t = k.fma(z, t, LN_C3);
    let sz = k.mul(s, z);
    let two_s = k.add(s, s);
    let ln_m = k.fma(sz, t, two_s);
    let e = k.f32_from_s32(exponent);
    let low = k.fma(e, LN2_LO, ln_m);
    k.fma(e, LN2_HI, low)
}

/// `philox::cos_sin_turns`: quadrant and remainder in integers, then Taylor polynomials.
fn cos_sin_turns(k: &mut KernelBuilder, turns: U32) -> (F32, F32) {
    const QUARTER: u32 = 1 << 22;
    let biased = k.add_u(turns, QUARTER / 2);
    let rounded = k.ubin(BinOp::Div, biased, QUARTER);
    let whole = k.mul_u(rounded, QUARTER);
    let turns_s = k.s32_from_u32(turns);
    let whole_s = k.s32_from_u32(whole);
    let remainder = k.sbin(BinOp::Sub, turns_s, whole_s);
    let fraction = {
        let f = k.f32_from_s32(remainder);
        k.mul(f, INV_2_24)
    };
    let a = k.mul(fraction, TWO_PI);
    let z = k.mul(a, a);
    let s = k.fma(z, SIN_C9, SIN_C7);
    let s = k.fma(z, s, SIN_C5);
    let s = k.fma(z, s, SIN_C3);
    let az = k.mul(a, z);
    let sin = k.fma(az, s, a);
    let c = k.fma(z, COS_C8, COS_C6);
    let c = k.fma(z, c, COS_C4);
    let c = k.fma(z, c, COS_C2);
    let cos = k.fma(z, c, 1.0f32);
    let quadrant = k.ubin(BinOp::And, rounded, 3u32);
    let (neg_sin, neg_cos) = (k.neg(sin), k.neg(cos));
    // 0: (cos, sin), 1: (−sin, cos), 2: (−cos, −sin), 3: (sin, −cos)
    let q1 = k.cmp_u(Cmp::Eq, quadrant, 1u32);
    let q2 = k.cmp_u(Cmp::Eq, quadrant, 2u32);
    let q3 = k.cmp_u(Cmp::Eq, quadrant, 3u32);
    let cos_out = k.select(q1, neg_sin, cos);
    let cos_out = k.select(q2, neg_cos, cos_out);
    let cos_out = k.select(q3, sin, cos_out);
    let sin_out = k.select(q1, cos, sin);
    let sin_out = k.select(q2, neg_sin, sin_out);
    let sin_out = k.select(q3, neg_cos, sin_out);
    (cos_out, sin_out)
}
