//! The noise stream: Philox4x32-10 (Salmon et al., SC'11) keyed by the seed, counted by
//! (element block, parameter index, step), and a Box–Muller transform built only from
//! correctly rounded IEEE-754 operations, so the GPU kernel reproduces every bit.
//!
//! # The recipe the PTX kernel must follow, step for step
//! * key = (seed low word, seed high word); counter = (element / 4, parameter index,
//!   step low word, step high word); element `i` takes lane `i % 4` of the Philox output.
//! * Lanes (0, 1) and (2, 3) each feed one Box–Muller pair: the first word gives the radius,
//!   the second the angle; lane 0/2 is the cosine branch, lane 1/3 the sine branch.
//! * Uniforms are `k · 2⁻²⁴` with `k = 2·(x >> 9) + 1`: odd, so never 0 or 1, and exact in f32.
//! * `ln` and `sin`/`cos` are the fixed polynomials below, evaluated with `fma` where written
//!   (`fma.rn.f32`) and separate multiplies/adds elsewhere (`mul.rn`/`add.rn`, which forbid
//!   contraction), `/` as `div.rn.f32` and `sqrt` as `sqrt.rn.f32`; no flush-to-zero.
//!
//! The polynomials are accurate to about 2 ulp, far below what the noise needs; being
//! reproducible bit for bit is the point.

// The constants below are public so that the GPU kernel (codegen) uses these very values.

/// Philox4x32 round multipliers and key increments (Random123).
pub const M0: u32 = 0xD251_1F53;
pub const M1: u32 = 0xCD9E_8D57;
pub const W0: u32 = 0x9E37_79B9;
pub const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = M0 as u64 * c[0] as u64;
        let p1 = M1 as u64 * c[2] as u64;
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// `2⁻²⁴`.
pub const INV_2_24: f32 = 1.0 / 16_777_216.0;

/// The odd 24-bit integer `2·(x >> 9) + 1` behind each uniform.
fn odd24(x: u32) -> u32 {
    ((x >> 9) << 1) | 1
}

/// Uniform in (0, 1): `odd24(x) · 2⁻²⁴`, exact.
pub fn uniform(x: u32) -> f32 {
    odd24(x) as f32 * INV_2_24
}

pub const SQRT_2: f32 = std::f32::consts::SQRT_2;
pub const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0.693145751953125: ln 2 to 15 bits, so e·LN2_HI is exact
pub const LN2_LO: f32 = 1.428_606_8e-6; // ln 2 − LN2_HI
pub const LN_C3: f32 = 2.0 / 3.0;
pub const LN_C5: f32 = 2.0 / 5.0;
pub const LN_C7: f32 = 2.0 / 7.0;
pub const LN_C9: f32 = 2.0 / 9.0;

/// Natural logarithm of a normal positive `u` (here: a uniform in (0, 1)).
///
/// u = 2ᵉ·m with m in (√½, √2]; ln m = 2·atanh(s) with s = (m − 1)/(m + 1), |s| < 0.172.
pub fn ln(u: f32) -> f32 {
    let bits = u.to_bits();
    let mut exponent = (bits >> 23) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    if m > SQRT_2 {
        m *= 0.5;
        exponent += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let mut t = z.mul_add(LN_C9, LN_C7);
    t = z.mul_add(t, LN_C5);
    t = z.mul_add(t, LN_C3);
    let ln_m = (s * z).mul_add(t, s + s);
    let e = exponent as f32;
    e.mul_add(LN2_HI, e.mul_add(LN2_LO, ln_m))
}

pub const TWO_PI: f32 = std::f32::consts::TAU;
pub const SIN_C3: f32 = -1.0 / 6.0;
pub const SIN_C5: f32 = 1.0 / 120.0;
pub const SIN_C7: f32 = -1.0 / 5040.0;
pub const SIN_C9: f32 = 1.0 / 362_880.0;
pub const COS_C2: f32 = -0.5;
pub const COS_C4: f32 = 1.0 / 24.0;
pub const COS_C6: f32 = -1.0 / 720.0;
pub const COS_C8: f32 = 1.0 / 40_320.0;

/// `(cos, sin)` of the angle `2π · k · 2⁻²⁴` for a 24-bit integer `k`.
///
/// The quadrant q = round(4·k·2⁻²⁴) and the remainder are taken in integers (exact), leaving
/// an angle a in [−π/4, π/4] for two short Taylor polynomials.
pub fn cos_sin_turns(k: u32) -> (f32, f32) {
    const QUARTER: u32 = 1 << 22;
    let rounded = (k + QUARTER / 2) / QUARTER;
    let remainder = k as i32 - (rounded * QUARTER) as i32;
    let a = (remainder as f32 * INV_2_24) * TWO_PI;
    let z = a * a;
    let mut s = z.mul_add(SIN_C9, SIN_C7);
    s = z.mul_add(s, SIN_C5);
    s = z.mul_add(s, SIN_C3);
    let sin = (a * z).mul_add(s, a);
    let mut c = z.mul_add(COS_C8, COS_C6);
    c = z.mul_add(c, COS_C4);
    c = z.mul_add(c, COS_C2);
    let cos = z.mul_add(c, 1.0);
    match rounded & 3 {
        0 => (cos, sin),
        1 => (-sin, cos),
        2 => (-cos, -sin),
        _ => (sin, -cos),
    }
}

/// Two independent standard normals from two Philox words.
pub fn box_muller(x0: u32, x1: u32) -> (f32, f32) {
    let radius = (-2.0 * ln(uniform(x0))).sqrt();
    let (cos, sin) = cos_sin_turns(odd24(x1));
    (radius * cos, radius * sin)
}

/// The four normals of Philox block `block` of parameter `param` at `step`.
pub fn normal_block(seed: u64, step: u64, param: u32, block: u32) -> [f32; 4] {
    let counter = [block, param, step as u32, (step >> 32) as u32];
    let x = philox4x32_10(counter, [seed as u32, (seed >> 32) as u32]);
    let (n0, n1) = box_muller(x[0], x[1]);
    let (n2, n3) = box_muller(x[2], x[3]);
    [n0, n1, n2, n3]
}

/// The Philox counter words ("streams") of every draw that is not a parameter's noise (whose
/// stream word is the parameter's index, counting up from 0): one list, so no two kinds of
/// draw share a stream.
pub mod stream {
    /// `synthetic::random_batch`: images and labels.
    pub const RANDOM_IMAGES: u32 = u32::MAX;
    pub const RANDOM_LABELS: u32 = u32::MAX - 1;
    /// The synthetic data set: class templates and per-image noise.
    pub const SYNTHETIC_TEMPLATES: u32 = u32::MAX - 2;
    pub const SYNTHETIC_NOISE: u32 = u32::MAX - 3;
    /// The data pipeline: shuffled order and augmentation.
    pub const ORDER: u32 = u32::MAX - 4;
    pub const AUGMENT: u32 = u32::MAX - 5;
    /// The full-Fisher noises' Rademacher signs and Gumbel draws (`ops::FullFisherSample`).
    pub const FULL_FISHER: u32 = u32::MAX - 6;
}

/// Philox word `i` of `stream` at `step`: lane `i % 4` of block `i / 4`, the layout of
/// [`fill_normal`]. Streams are limited to 2³⁴ words.
pub fn word(seed: u64, step: u64, stream: u32, i: u64) -> u32 {
    let block = u32::try_from(i / 4).expect("a stream has at most 2³⁴ words");
    let counter = [block, stream, step as u32, (step >> 32) as u32];
    philox4x32_10(counter, [seed as u32, (seed >> 32) as u32])[(i % 4) as usize]
}

/// A Rademacher sign from a word: −1 when its top bit is set, else +1.
pub fn rademacher(x: u32) -> f32 {
    if x >> 31 == 1 { -1.0 } else { 1.0 }
}

/// A standard Gumbel draw `−ln(−ln u)` from a word (`u` its [`uniform`]). Both logarithms
/// take normal positive arguments: `u ≤ 1 − 2⁻²⁴`, so `−ln u ≥ 5.9e-8`.
pub fn gumbel(x: u32) -> f32 {
    -ln(-ln(uniform(x)))
}

/// Fills `out` with the noise ξ of parameter `param` at `step`: element i is lane i % 4 of
/// block i / 4. Parameters are limited to 2³⁴ elements.
pub fn fill_normal(seed: u64, step: u64, param: u32, out: &mut [f32]) {
    assert!(
        out.len() as u64 <= 4 * (u32::MAX as u64 + 1),
        "parameter too large"
    );
    for (block, chunk) in out.chunks_mut(4).enumerate() {
        let normals = normal_block(seed, step, param, block as u32);
        chunk.copy_from_slice(&normals[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's published known-answer vectors (kat_vectors, philox4x32 10 rounds).
    #[test]
    fn philox_matches_random123_known_answers() {
        let cases: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0, 0, 0, 0],
                [0, 0],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (counter, key, expected) in cases {
            assert_eq!(
                philox4x32_10(counter, key),
                expected,
                "counter {counter:x?}"
            );
        }
    }

    #[test]
    fn uniforms_stay_strictly_inside_the_unit_interval() {
        assert_eq!(uniform(0), INV_2_24);
        assert_eq!(uniform(u32::MAX), 1.0 - INV_2_24);
        assert!(uniform(u32::MAX) < 1.0);
    }

    #[test]
    fn ln_is_accurate_over_the_uniforms() {
        let mut worst = 0.0f64;
        for i in 0..200_000u32 {
            let u = uniform(i.wrapping_mul(0x9E37_79B9));
            let exact = (u as f64).ln();
            let err = (ln(u) as f64 - exact).abs() / exact.abs().max(1e-30);
            worst = worst.max(err);
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn cos_sin_are_accurate_in_every_quadrant() {
        let mut worst = 0.0f64;
        for i in 0..100_000u32 {
            let k = odd24(i.wrapping_mul(0x85EB_CA6B));
            let angle = std::f64::consts::TAU * k as f64 / 16_777_216.0;
            let (c, s) = cos_sin_turns(k);
            worst = worst
                .max((c as f64 - angle.cos()).abs())
                .max((s as f64 - angle.sin()).abs());
        }
        assert!(worst < 3e-7, "worst absolute error {worst}");
    }

    #[test]
    fn noise_has_standard_normal_moments() {
        let mut xi = vec![0.0f32; 400_000];
        fill_normal(7, 3, 11, &mut xi);
        let n = xi.len() as f64;
        let mean = xi.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = xi.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let kurt = xi.iter().map(|&v| (v as f64 - mean).powi(4)).sum::<f64>() / n / (var * var);
        // standard errors: mean 1/√n ≈ 0.0016, variance √(2/n) ≈ 0.0022, kurtosis √(24/n) ≈ 0.008
        assert!(mean.abs() < 0.008, "mean {mean}");
        assert!((var - 1.0).abs() < 0.011, "variance {var}");
        assert!((kurt - 3.0).abs() < 0.04, "kurtosis {kurt}");
    }

    #[test]
    fn noise_depends_on_every_key_and_counter_word() {
        let base = normal_block(1, 2, 3, 4);
        assert_ne!(base, normal_block(1 << 40, 2, 3, 4), "seed high word");
        assert_ne!(base, normal_block(2, 2, 3, 4), "seed");
        assert_ne!(base, normal_block(1, 2 + (1 << 33), 3, 4), "step high word");
        assert_ne!(base, normal_block(1, 5, 3, 4), "step");
        assert_ne!(base, normal_block(1, 2, 4, 4), "parameter");
        assert_ne!(base, normal_block(1, 2, 3, 5), "block");
        assert_eq!(base, normal_block(1, 2, 3, 4), "deterministic");
    }

    #[test]
    fn words_follow_the_lane_layout_of_the_normals() {
        let key = [5, 0];
        for i in [0u64, 3, 4, 9, 4 * 1000 + 2] {
            let block = philox4x32_10([(i / 4) as u32, stream::FULL_FISHER, 6, 0], key);
            assert_eq!(word(5, 6, stream::FULL_FISHER, i), block[(i % 4) as usize]);
        }
    }

    #[test]
    fn rademacher_signs_are_balanced_and_gumbel_draws_have_their_moments() {
        let n = 200_000u64;
        let words: Vec<u32> = (0..n).map(|i| word(3, 1, stream::FULL_FISHER, i)).collect();
        let sign_sum: f64 = words.iter().map(|&x| rademacher(x) as f64).sum();
        assert!(
            sign_sum.abs() < 4.0 * (n as f64).sqrt(),
            "sum of signs {sign_sum}"
        );
        // Gumbel(0, 1): mean γ (Euler–Mascheroni), variance π²/6
        let g: Vec<f64> = words.iter().map(|&x| gumbel(x) as f64).collect();
        let mean = g.iter().sum::<f64>() / n as f64;
        let var = g.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((mean - 0.577_215_66).abs() < 0.01, "mean {mean}");
        let pi2_6 = std::f64::consts::PI.powi(2) / 6.0;
        assert!((var - pi2_6).abs() < 0.03, "variance {var}");
        // the extremes stay finite: u = 2⁻²⁴ and u = 1 − 2⁻²⁴
        assert!(gumbel(0).is_finite() && gumbel(u32::MAX).is_finite());
    }

    #[test]
    fn fill_normal_lays_blocks_out_lane_by_lane() {
        let mut xi = vec![0.0f32; 10];
        fill_normal(5, 6, 7, &mut xi);
        assert_eq!(xi[4..8], normal_block(5, 6, 7, 1));
        assert_eq!(xi[8..10], normal_block(5, 6, 7, 2)[..2]);
    }
}
