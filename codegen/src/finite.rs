//! The kernel that counts the NaN and infinite f32 values of a buffer on the device, for the
//! trainer's periodic check of the training state: a device-wide read at memory speed, with
//! only a few hundred counts coming back instead of the state itself.
//!
//! Each of [`GRID`] blocks of [`BLOCK`] threads strides over the buffer's words, counts those
//! whose exponent bits are all set, sums its count over the warp by shuffles, and lane 0
//! writes the warp's count to `counts[warp of the grid]`: [`COUNTS`] words, added up on the
//! host by [`total`].

use crate::builder::{KernelBuilder, U32};
use crate::kir::{BinOp, Cmp, Kernel, WARP};

pub const NAME: &str = "count_non_finite";
/// Threads per block.
pub const BLOCK: u32 = 256;
/// Blocks: enough to keep an H100's memory busy on the largest state tensor.
pub const GRID: u32 = 132;
/// Counts the kernel writes, one per warp of the grid.
pub const COUNTS: usize = (GRID * BLOCK / WARP) as usize;

/// The bits of an f32's exponent: all set in a NaN or an infinity, and only there.
const EXPONENT: u32 = 0x7f80_0000;

/// Whether the f32 with these bits is a NaN or an infinity: the kernel's test.
pub fn is_non_finite(word: u32) -> bool {
    word & EXPONENT == EXPONENT
}

/// `count_non_finite(data, words, counts)`: counts the non-finite values among the `words`
/// f32 at `data` into `counts` ([`COUNTS`] u32, each a warp's share). Launch with
/// [`GRID`] × [`BLOCK`] threads.
pub fn count_kernel() -> Kernel {
    let mut k = KernelBuilder::new(NAME, BLOCK, false);
    let data = k.ptr_param("data");
    let words = k.u32_param("words");
    let counts = k.ptr_param("counts");
    let (tid, block, blocks) = (k.tid(), k.block_x(), k.blocks_x());
    let first = k.mad_u(block, BLOCK, tid);
    let stride = k.ubin(BinOp::Mul, blocks, BLOCK);
    let count = k.u32(0);
    k.for_u32(first, words, stride, |k, i| {
        let value = k.load(data, i);
        let bits = k.bits_of(value);
        let exponent = k.ubin(BinOp::And, bits, EXPONENT);
        let non_finite = k.cmp_u(Cmp::Eq, exponent, EXPONENT);
        let one = k.select_u(non_finite, 1u32, 0u32);
        let sum = k.add_u(count, one);
        k.assign_u(count, sum);
    });
    let warp_count = warp_sum_u(&mut k, count);
    let lane = k.ubin(BinOp::Rem, tid, WARP);
    let first_lane = k.cmp_u(Cmp::Eq, lane, 0u32);
    k.when(first_lane, |k| {
        let warp = k.ubin(BinOp::Div, first, WARP);
        let as_float = k.float_of(warp_count);
        k.store(counts, warp, as_float);
    });
    k.finish()
}

/// A u32 summed over the warp (shuffles move 32-bit words, whatever their type); lane 0
/// holds the total.
fn warp_sum_u(k: &mut KernelBuilder, v: U32) -> U32 {
    let total = k.u32(0);
    k.assign_u(total, v);
    let mut delta = WARP / 2;
    while delta > 0 {
        let as_float = k.float_of(total);
        let other = k.shfl_down(as_float, delta);
        let other = k.bits_of(other);
        let sum = k.add_u(total, other);
        k.assign_u(total, sum);
        delta /= 2;
    }
    total
}

/// The buffer's count of non-finite values, from the words the kernel wrote.
pub fn total(counts: &[u32]) -> u64 {
    counts.iter().map(|&c| c as u64).sum()
}

#[cfg(test)]
mod tests {
    use rand::{RngExt, SeedableRng};

    use super::*;
    use crate::exec::{Arg, Memory, run};

    /// What the kernel counts on the CPU executor.
    fn counted(values: &[f32]) -> u64 {
        let mut memory = Memory::new();
        let data = memory.alloc_f32(values);
        let counts = memory.alloc_f32(&[f32::from_bits(7); COUNTS]);
        let args = [
            Arg::Ptr(data),
            Arg::U32(values.len() as u32),
            Arg::Ptr(counts),
        ];
        run(&count_kernel(), [GRID, 1], &args, &memory).unwrap();
        let words: Vec<u32> = memory.read_words(counts, COUNTS).collect();
        total(&words)
    }

    #[test]
    fn counts_nans_and_infinities_and_nothing_else() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001), // a signalling NaN
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let finite = [f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-45, -0.0, 0.0];
        for len in [
            0usize,
            1,
            31,
            257,
            GRID as usize * BLOCK as usize + 5,
            100_003,
        ] {
            let values: Vec<f32> = (0..len)
                .map(|_| match rng.random_range(0..10) {
                    0 => specials[rng.random_range(0..specials.len())],
                    1 => finite[rng.random_range(0..finite.len())],
                    _ => rng.random_range(-1e6f32..1e6),
                })
                .collect();
            let expected = values.iter().filter(|v| !v.is_finite()).count() as u64;
            assert_eq!(counted(&values), expected, "{len} values");
            let by_bits = values.iter().filter(|v| is_non_finite(v.to_bits())).count();
            assert_eq!(by_bits as u64, expected);
        }
    }
}
