//! Unsigned division by a constant as a multiply-high and shifts (Granlund and Montgomery,
//! "Division by invariant integers using multiplication", 1994).
//!
//! ptxas does not strength-reduce `div`/`rem` by an immediate: it emits its general division
//! (a reciprocal through the float unit and corrections, about 15 instructions for u32, a
//! call for u64), which the index arithmetic of every kernel would pay per element. NVIDIA's
//! compilers do this rewrite before PTX; fisherc's builder does it here.

/// How to compute `n / d` for every `bits`-bit unsigned `n` (`bits` 32 or 64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Divide {
    /// `n >> shift` (d a power of two, 1 included).
    Shift(u32),
    /// `mulhi(n, magic) >> shift`.
    MulHi { magic: u64, shift: u32 },
    /// The multiplier is `2^bits + magic`, one bit too wide: with `t = mulhi(n, magic)`,
    /// `(((n − t) >> 1) + t) >> shift` (which cannot overflow).
    MulHiAdd { magic: u64, shift: u32 },
}

impl Divide {
    /// The recipe for dividing by `d` (not 0).
    pub fn by(d: u64, bits: u32) -> Divide {
        assert!(d != 0, "division by zero");
        assert!(bits == 32 || bits == 64, "{bits}-bit division");
        assert!(
            bits == 64 || d <= u32::MAX as u64,
            "{d} does not fit {bits} bits"
        );
        let log = 63 - d.leading_zeros(); // floor(log2 d)
        if d.is_power_of_two() {
            return Divide::Shift(log);
        }
        // m = floor(2^(bits + log) / d) fits `bits` bits since d > 2^log
        let scaled = 1u128 << (bits + log);
        let (m, r) = (scaled / d as u128, scaled % d as u128);
        let mask = (1u128 << bits) - 1;
        if d as u128 - r < 1u128 << log {
            // m + 1 = ceil(2^(bits + log) / d) errs by less than 2^log / d per unit: exact
            return Divide::MulHi {
                magic: ((m + 1) & mask) as u64,
                shift: log,
            };
        }
        // one more bit of precision: ceil(2^(bits + log + 1) / d), which exceeds 2^bits
        let twice = 2 * m + u128::from(2 * r >= d as u128);
        Divide::MulHiAdd {
            magic: ((twice + 1) & mask) as u64,
            shift: log,
        }
    }

    /// `n / d` the way the emitted instructions compute it (for tests).
    pub fn apply(self, n: u64, bits: u32) -> u64 {
        let mulhi = |a: u64, b: u64| ((a as u128 * b as u128) >> bits) as u64;
        match self {
            Divide::Shift(s) => n >> s,
            Divide::MulHi { magic, shift } => mulhi(n, magic) >> shift,
            Divide::MulHiAdd { magic, shift } => {
                let t = mulhi(n, magic);
                (((n - t) >> 1) + t) >> shift
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Divide;

    /// Numerators around every multiple of d near the ends of the range, and a spread between.
    fn numerators(d: u64, bits: u32) -> Vec<u64> {
        let max = if bits == 32 {
            u32::MAX as u64
        } else {
            u64::MAX
        };
        let mut n: Vec<u64> = (0..200).collect();
        for q in [1, 2, 3, 1000, max / d - 1, max / d] {
            let at = q.saturating_mul(d);
            n.extend([at.saturating_sub(1), at, at.saturating_add(1)]);
        }
        n.extend((0..64).map(|i| max - i));
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            n.push(if bits == 32 { x >> 32 } else { x });
        }
        n.retain(|&v| v <= max);
        n
    }

    fn assert_exact(divisors: impl Iterator<Item = u64>, bits: u32) {
        for d in divisors {
            let recipe = Divide::by(d, bits);
            for n in numerators(d, bits) {
                assert_eq!(recipe.apply(n, bits), n / d, "{n} / {d} by {recipe:?}");
            }
        }
    }

    #[test]
    fn quotients_are_exact_for_32_bits() {
        let divisors = (1..=3000u64)
            .chain([7919, 65_535, 65_537, 1 << 20, 3 << 20, 1_000_003])
            .chain([u32::MAX as u64 - 1, u32::MAX as u64, (1 << 31) + 1]);
        assert_exact(divisors, 32);
    }

    #[test]
    fn quotients_are_exact_for_64_bits() {
        let divisors = (1..=600u64)
            .chain([7919, 1 << 40, 3 << 40, 1_000_000_007])
            .chain([u64::MAX - 1, u64::MAX, (1 << 63) + 1]);
        assert_exact(divisors, 64);
    }

    #[test]
    fn both_kinds_of_multiplier_occur() {
        // 3 takes a 32-bit multiplier, 7 the one-bit-wider one; powers of two shift
        assert!(matches!(Divide::by(3, 32), Divide::MulHi { .. }));
        assert!(matches!(Divide::by(7, 32), Divide::MulHiAdd { .. }));
        assert_eq!(Divide::by(1, 32), Divide::Shift(0));
        assert_eq!(Divide::by(256, 64), Divide::Shift(8));
    }
}
