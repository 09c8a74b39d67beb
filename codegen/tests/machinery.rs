//! The kernel IR machinery on small kernels: the typed builder, the executor (grid-stride
//! loops, divergence, barriers, shuffles, TF32 and BF16 tensor-core mma, cp.async, vector loads, bounds
//! and alignment checks, shared-memory races) and the PTX renderer with ptxas.

use fisherc_codegen::builder::{KernelBuilder, U32};
use fisherc_codegen::exec::{Arg, Memory, bf16_bits, run, tf32_bits};
use fisherc_codegen::kir::{BinOp, Cmp, Kernel};
use fisherc_codegen::mma::{BF16_M16N8K16, Fragment, Mma, Operand, TF32_M16N8K8};
use fisherc_codegen::{ptx, ptxas};

/// y[i] = 2·x[i] + 1 where x[i] > 0, else 0; grid-stride over n elements.
fn scale_kernel(n: u64) -> Kernel {
    let mut k = KernelBuilder::new("scale_test", 128, false);
    let (x, y) = (k.ptr_param("x"), k.ptr_param("y"));
    k.for_each_element(n, |k, i| {
        let v = k.load(x, i);
        let out = k.f32(0.0);
        let positive = k.cmp_f32(Cmp::Gt, v, 0.0f32);
        k.when(positive, |k| {
            let doubled = k.fma(v, 2.0f32, 1.0f32);
            k.assign(out, doubled);
        });
        k.store(y, i, out);
    });
    k.finish()
}

/// out[0] = Σ x over n elements, one block.
fn sum_kernel(n: u64) -> Kernel {
    let mut k = KernelBuilder::new("sum_test", 256, false);
    let (x, out) = (k.ptr_param("x"), k.ptr_param("out"));
    let acc = k.f32(0.0);
    let tid = k.tid();
    let start = k.idx(tid);
    let step = k.idx_const(256);
    k.for_idx(start, n, step, |k, i| {
        let v = k.load(x, i);
        k.accumulate(acc, v);
    });
    let total = k.block_sum(&[acc])[0];
    let first = k.cmp_u(Cmp::Eq, tid, 0u32);
    k.when(first, |k| k.store(out, 0u32, total));
    k.finish()
}

/// A finite f32 rounded to `mantissa` bits, worked out in f64 apart from the bits: the value
/// over its quantum (2^(e − mantissa) in binade e, 2^(−126 − mantissa) below the normal
/// range), rounded to an integer with ties to even.
fn rounded_by_scaling(x: f32, mantissa: i32) -> f32 {
    let exponent = ((x.to_bits() >> 23) & 0xff) as i32;
    let binade = if exponent == 0 { -126 } else { exponent - 127 };
    let quantum = 2f64.powi(binade - mantissa);
    ((x as f64 / quantum).round_ties_even() * quantum) as f32
}

/// Random f32 bits, one in four a tie of a rounding that keeps the top `kept` bits.
fn bits_with_ties(count: usize, kept: u32) -> Vec<u32> {
    let tie = 1u32 << (31 - kept);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    (0..count)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let bits = rng as u32;
            if (rng >> 40) & 3 == 0 {
                (bits & !(2 * tie - 1)) | tie
            } else {
                bits
            }
        })
        .collect()
}

#[test]
fn tf32_rounds_to_nearest_with_ties_to_even() {
    let tf32 = |x: f32| f32::from_bits(tf32_bits(x.to_bits()));
    let ulp = 2f32.powi(-10); // of TF32 at 1
    assert_eq!(tf32(1.0 + ulp / 4.0), 1.0);
    assert_eq!(
        tf32(1.0 + ulp / 2.0),
        1.0,
        "a tie goes to the even neighbour"
    );
    assert_eq!(
        tf32(1.0 + 1.5 * ulp),
        1.0 + 2.0 * ulp,
        "a tie goes to the even neighbour"
    );
    assert_eq!(tf32(-(1.0 + 1.5 * ulp)), -(1.0 + 2.0 * ulp));
    assert_eq!(tf32(1.0 + 0.75 * ulp), 1.0 + ulp);
    assert_eq!(tf32(3.0), 3.0);
    assert_eq!(
        tf32(f32::MAX),
        f32::INFINITY,
        "past the largest TF32: infinity"
    );
    assert!(tf32(f32::NAN).is_nan());
    assert!(tf32(f32::from_bits(0x7fff_ffff)).is_nan(), "the GPU's NaN");
    assert_eq!(tf32(f32::NEG_INFINITY), f32::NEG_INFINITY);
    // every binade, subnormals included, and ties
    for bits in bits_with_ties(200_000, 19) {
        let x = f32::from_bits(bits);
        if x.is_finite() {
            let want = rounded_by_scaling(x, 10);
            assert_eq!(tf32(x).to_bits(), want.to_bits(), "{x:e} ({bits:#x})");
        }
    }
}

#[test]
fn bf16_rounds_to_nearest_with_ties_to_even() {
    let bf16 = |x: f32| f32::from_bits((bf16_bits(x.to_bits()) as u32) << 16);
    let ulp = 2f32.powi(-7); // of bfloat16 at 1
    assert_eq!(
        bf16(1.0 + ulp / 2.0),
        1.0,
        "a tie goes to the even neighbour"
    );
    assert_eq!(bf16(1.0 + 1.5 * ulp), 1.0 + 2.0 * ulp);
    assert_eq!(bf16(-(1.0 + 0.75 * ulp)), -(1.0 + ulp));
    assert_eq!(
        bf16(f32::MAX),
        f32::INFINITY,
        "past the largest bfloat16: infinity"
    );
    assert_eq!(bf16(f32::NEG_INFINITY), f32::NEG_INFINITY);
    assert_eq!(bf16_bits(f32::NAN.to_bits()), 0x7fff, "the canonical NaN");
    assert_eq!(bf16_bits(0xffff_ffff), 0x7fff);
    for bits in bits_with_ties(200_000, 16) {
        let x = f32::from_bits(bits);
        if x.is_finite() {
            let want = rounded_by_scaling(x, 7);
            assert_eq!(bf16(x).to_bits(), want.to_bits(), "{x:e} ({bits:#x})");
        }
    }
}

/// Element `e` of fragment `f` of lane (g, t), as an index into a row-major matrix `width`
/// wide.
fn fragment_index(
    k: &mut KernelBuilder,
    f: &Fragment,
    (g, t): (U32, U32),
    (e, width): (usize, u32),
) -> U32 {
    let (dr, dc) = f.offsets[e];
    let row = k.mad_u(g, f.row.0, dr);
    let row = k.mad_u(t, f.row.1, row);
    let col = k.mad_u(g, f.col.0, dc);
    let col = k.mad_u(t, f.col.1, col);
    k.mad_u(row, width, col)
}

/// One warp: D = A·B + C through the table's `shape` (`mma_tf32` or `mma_bf16`), A
/// 16 × k, B k × 8 (k, n) and C, D 16 × 8, all row-major f32, each lane loading its elements
/// where the table places them and rounding them to the operand type (TF32 one to a
/// register; bfloat16 packed two to a register, the lower index low).
fn mma_kernel(shape: &Mma) -> Kernel {
    let name = match shape.operand {
        Operand::Tf32 => "mma_test_tf32",
        Operand::Bf16 => "mma_test_bf16",
    };
    let mut k = KernelBuilder::new(name, 32, false);
    let (a, b, c, d) = (
        k.ptr_param("a"),
        k.ptr_param("b"),
        k.ptr_param("c"),
        k.ptr_param("d"),
    );
    let lane = k.tid();
    let g = k.ubin(BinOp::Div, lane, 4u32);
    let t = k.ubin(BinOp::Rem, lane, 4u32);
    // element e of fragment f, loaded from `src` (`width` wide)
    let element = |k: &mut KernelBuilder, f: &Fragment, src, width, e: usize| {
        let index = fragment_index(k, f, (g, t), (e, width));
        k.load(src, index)
    };
    let c_at: [U32; 4] =
        std::array::from_fn(|e| fragment_index(&mut k, &shape.c, (g, t), (e, shape.n)));
    let c_frag = c_at.map(|index| k.load(c, index));
    let d_frag = match shape.operand {
        Operand::Tf32 => {
            let a_frag = std::array::from_fn(|e| {
                let v = element(&mut k, &shape.a, a, shape.k, e);
                k.tf32(v)
            });
            let b_frag = std::array::from_fn(|e| {
                let v = element(&mut k, &shape.b, b, shape.n, e);
                k.tf32(v)
            });
            k.mma_tf32(a_frag, b_frag, c_frag)
        }
        Operand::Bf16 => {
            let pair = |k: &mut KernelBuilder, f: &Fragment, src, width, r: usize| {
                let lo = element(k, f, src, width, 2 * r);
                let hi = element(k, f, src, width, 2 * r + 1);
                k.bf16x2(lo, hi)
            };
            let a_frag = std::array::from_fn(|r| pair(&mut k, &shape.a, a, shape.k, r));
            let b_frag = std::array::from_fn(|r| pair(&mut k, &shape.b, b, shape.n, r));
            k.mma_bf16(a_frag, b_frag, c_frag)
        }
    };
    for (index, v) in c_at.into_iter().zip(d_frag) {
        k.store(d, index, v);
    }
    k.finish()
}

/// Runs a one-warp mma test kernel (`a`, `b`, `c`, `d`: A 16 × `depth`, B `depth` × 8, C
/// and D 16 × 8, row-major) on fixed inputs and checks D against the exact sum of the
/// operands as `round` rounds them, plus C, rounded once to f32; and that the rounding
/// changed some element (the operands really were rounded).
fn check_mma(kernel: &Kernel, depth: usize, round: impl Fn(f32) -> f64) {
    let values = |n: usize, seed: f32| -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + seed) * 0.731).sin() * 1.7)
            .collect()
    };
    let (a, b, c) = (
        values(16 * depth, 0.3),
        values(depth * 8, 5.1),
        values(128, 9.7),
    );
    let mut mem = Memory::new();
    let (pa, pb, pc, pd) = (
        mem.alloc_f32(&a),
        mem.alloc_f32(&b),
        mem.alloc_f32(&c),
        mem.alloc(4 * 128),
    );
    let args = [Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(pc), Arg::Ptr(pd)];
    run(kernel, [1, 1], &args, &mem).unwrap();
    let got = mem.read_f32(pd, 128);
    let mut rounded_somewhere = false;
    for row in 0..16 {
        for col in 0..8 {
            let product = |f: &dyn Fn(f32) -> f64| -> f32 {
                let sum: f64 = (0..depth)
                    .map(|k| f(a[row * depth + k]) * f(b[k * 8 + col]))
                    .sum();
                (sum + c[row * 8 + col] as f64) as f32
            };
            let expected = product(&round);
            assert_eq!(got[row * 8 + col], expected, "D[{row}][{col}]");
            rounded_somewhere |= product(&|x| x as f64) != expected;
        }
    }
    assert!(rounded_somewhere, "the operands were rounded");
}

#[test]
fn mma_multiplies_bf16_fragments_of_the_whole_warp() {
    let bf16 = |x: f32| f32::from_bits((bf16_bits(x.to_bits()) as u32) << 16) as f64;
    check_mma(&mma_kernel(&BF16_M16N8K16), 16, bf16);
}

#[test]
fn mma_multiplies_tf32_fragments_of_the_whole_warp() {
    let tf32 = |x: f32| f32::from_bits(tf32_bits(x.to_bits())) as f64;
    check_mma(&mma_kernel(&TF32_M16N8K8), 8, tf32);
}

#[test]
fn mma_needs_the_whole_warp() {
    let mut mem = Memory::new();
    let args: Vec<Arg> = (0..4).map(|_| Arg::Ptr(mem.alloc(4 * 128))).collect();
    // 48 threads: the second warp is partial
    let mut kernel = mma_kernel(&TF32_M16N8K8);
    kernel.block = 48;
    let err = run(&kernel, [1, 1], &args, &mem).unwrap_err();
    assert!(err.message.contains("part of a warp"), "{err}");
}

#[test]
fn grid_stride_loops_and_divergent_branches() {
    let n = 1000;
    let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut mem = Memory::new();
    let (x, y) = (mem.alloc_f32(&xs), mem.alloc(4 * n));
    run(
        &scale_kernel(n as u64),
        [3, 1],
        &[Arg::Ptr(x), Arg::Ptr(y)],
        &mem,
    )
    .unwrap();
    let got = mem.read_f32(y, n);
    for (g, v) in got.iter().zip(&xs) {
        let expected = if *v > 0.0 { v.mul_add(2.0, 1.0) } else { 0.0 };
        assert_eq!(g.to_bits(), expected.to_bits());
    }
}

#[test]
fn block_sums_use_shuffles_and_shared_memory() {
    let n = 1001;
    let xs: Vec<f32> = (0..n).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
    let mut mem = Memory::new();
    let (x, out) = (mem.alloc_f32(&xs), mem.alloc(4));
    run(
        &sum_kernel(n as u64),
        [1, 1],
        &[Arg::Ptr(x), Arg::Ptr(out)],
        &mem,
    )
    .unwrap();
    assert_eq!(mem.read_f32(out, 1)[0], xs.iter().sum::<f32>());
}

#[test]
fn out_of_bounds_accesses_are_errors() {
    let mut mem = Memory::new();
    let x = mem.alloc_f32(&[1.0; 10]);
    let err = run(
        &scale_kernel(1000),
        [1, 1],
        &[Arg::Ptr(x), Arg::Ptr(x)],
        &mem,
    )
    .unwrap_err();
    assert!(err.message.contains("outside"), "{err}");
    assert_eq!(err.kernel, "scale_test");
}

#[test]
fn misaligned_accesses_are_errors() {
    let mut mem = Memory::new();
    let x = mem.alloc_f32(&[1.0; 16]);
    let y = mem.alloc(64);
    let err = run(
        &scale_kernel(8),
        [1, 1],
        &[Arg::Ptr(x + 2), Arg::Ptr(y)],
        &mem,
    )
    .unwrap_err();
    assert!(
        err.message.contains("misaligned access of 4 bytes"),
        "{err}"
    );
}

#[test]
fn arguments_must_match_the_parameters() {
    let mem = Memory::new();
    let err = run(&scale_kernel(10), [1, 1], &[Arg::U32(3), Arg::Ptr(0)], &mem).unwrap_err();
    assert!(err.message.contains("parameter x"), "{err}");
}

#[test]
fn barriers_in_divergent_code_are_errors() {
    let mut k = KernelBuilder::new("bad_barrier", 64, false);
    let tid = k.tid();
    let some = k.cmp_u(Cmp::Lt, tid, 10u32);
    k.when(some, |k| k.barrier());
    let mem = Memory::new();
    let err = run(&k.finish(), [1, 1], &[], &mem).unwrap_err();
    assert!(
        err.message.contains("bar.sync reached by 10 of 64 threads"),
        "{err}"
    );
}

#[test]
fn log_lines_point_at_their_kernels() {
    let text = ptx::module(&[&scale_kernel(10), &sum_kernel(10)], "sm_90");
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let (in_scale, in_sum) = (line_of(".entry scale_test") + 3, line_of("bar.sync 0;"));
    assert_eq!(ptx::kernel_at_line(&text, in_scale), Some("scale_test"));
    assert_eq!(ptx::kernel_at_line(&text, in_sum), Some("sum_test"));
    assert_eq!(ptx::kernel_at_line(&text, 1), None);
    let log = format!(
        "ptxas x.ptx, line {in_sum}; error : bad\nptxas x.ptx, line {in_scale}; error : worse\nline {in_sum}"
    );
    assert_eq!(ptx::kernels_in_log(&text, &log), ["sum_test", "scale_test"]);
}

#[test]
fn rendered_ptx_declares_registers_and_structures_control_flow() {
    let text = ptx::module(&[&sum_kernel(1000)], "sm_90");
    assert!(text.starts_with("//\n// Generated by fisherc\n//\n.version 8.0\n.target sm_90"));
    assert!(text.contains(".visible .entry sum_test("));
    assert!(text.contains("shfl.sync.down.b32"));
    assert!(text.contains("bar.sync 0;"));
    assert!(text.contains(".shared .align 16 .b8 smem["));
    assert!(text.contains("@!%p"), "branches around conditional code");
}

#[test]
#[ignore = "needs ptxas: run scripts/test.sh (it installs ptxas into .tools/)"]
fn rendered_kernels_assemble_for_sm80_and_sm90() {
    let ptxas = ptxas::find().expect("ptxas not found: run scripts/install-ptxas.sh");
    let (scale, sum, mma) = (
        scale_kernel(1 << 20),
        sum_kernel(1000),
        mma_kernel(&TF32_M16N8K8),
    );
    let (copy, vector) = (copy_kernel(Wait::Landed), vector_kernel(4, 0, true));
    let bf16 = mma_kernel(&BF16_M16N8K16);
    // TF32 rounding: sm_90's one instruction (ties to even, as the executor), sm_80's
    // `cvt.rna` (it has no `.rn`: ptxas refuses it)
    for (arch, rounding) in [("sm_80", "cvt.rna.tf32.f32"), ("sm_90", "cvt.rn.tf32.f32")] {
        let module = ptx::module(&[&scale, &sum, &mma, &copy, &vector, &bf16], arch);
        assert!(module.contains(rounding), "{arch}");
        assert!(module.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
        let resources = ptxas::assemble(&ptxas, &module, arch).unwrap();
        assert_eq!(resources.len(), 6);
        assert!(
            resources
                .iter()
                .all(|r| r.registers > 0 && r.spill_stores == 0),
            "{resources:?}"
        );
    }
}

#[test]
#[ignore = "needs ptxas: run scripts/test.sh (it installs ptxas into .tools/)"]
fn ptxas_errors_come_back_as_messages() {
    let ptxas = ptxas::find().expect("ptxas not found: run scripts/install-ptxas.sh");
    let broken =
        ptx::module(&[&sum_kernel(1000)], "sm_90").replace("bar.sync 0;", "bar.sync %undefined;");
    let messages = ptxas::assemble(&ptxas, &broken, "sm_90")
        .unwrap_err()
        .to_string();
    assert!(messages.contains("undefined"), "{messages}");
    assert!(
        messages.starts_with("in kernel sum_test:"),
        "the message names the kernel: {messages}"
    );
}

/// A block of 64 threads: each stores its id at shared[tid], then (after a barrier when
/// `barrier`) reads its neighbour's word; with `overwrite`, then writes its own word again
/// (after a barrier when `barrier`).
fn neighbour_kernel(barrier: bool, overwrite: bool) -> Kernel {
    let mut k = KernelBuilder::new("neighbours", 64, false);
    let out = k.ptr_param("out");
    let area = k.shared(64);
    let tid = k.tid();
    let v = k.f32_from_u32(tid);
    k.store_shared(area, tid, v);
    if barrier {
        k.barrier();
    }
    let next = k.add_u(tid, 1u32);
    let next = k.ubin(BinOp::Rem, next, 64u32);
    let seen = k.load_shared(area, next);
    if overwrite {
        if barrier {
            k.barrier();
        }
        k.store_shared(area, tid, seen);
    }
    k.store(out, tid, seen);
    k.finish()
}

#[test]
fn shared_memory_races_are_errors() {
    let mut mem = Memory::new();
    let out = mem.alloc(4 * 64);
    let run_it = |kernel, mem: &Memory| run(&kernel, [2, 1], &[Arg::Ptr(out)], mem);
    // read after another thread's write, no barrier between
    let err = run_it(neighbour_kernel(false, false), &mem).unwrap_err();
    assert!(
        err.message
            .contains("thread 0 reads 0x4, which thread 1 written since the last bar.sync"),
        "{err}"
    );
    // write over a word another thread read, no barrier between
    let mut k = KernelBuilder::new("war", 64, false);
    let area = k.shared(64);
    let tid = k.tid();
    let next = k.add_u(tid, 1u32);
    let next = k.ubin(BinOp::Rem, next, 64u32);
    let v = k.load_shared(area, next);
    k.store_shared(area, tid, v);
    let err = run(&k.finish(), [1, 1], &[], &mem).unwrap_err();
    assert!(
        err.message
            .contains("thread 0 writes 0x0, which thread 63 read since the last bar.sync"),
        "{err}"
    );
    // two threads writing one word
    let mut k = KernelBuilder::new("waw", 64, false);
    let area = k.shared(64);
    let tid = k.tid();
    let half = k.ubin(BinOp::Div, tid, 2u32);
    let v = k.f32(1.0);
    k.store_shared(area, half, v);
    let err = run(&k.finish(), [1, 1], &[], &mem).unwrap_err();
    assert!(err.message.contains("which thread 0 written"), "{err}");
    // with barriers every access is ordered, and each block starts afresh
    run_it(neighbour_kernel(true, true), &mem).unwrap();
    let got = mem.read_f32(out, 64);
    let want: Vec<f32> = (0..64).map(|t| ((t + 1) % 64) as f32).collect();
    assert_eq!(got, want);
}

/// How [`copy_kernel`] waits for its copies.
#[derive(Clone, Copy, PartialEq)]
enum Wait {
    /// wait_group 0, then a barrier: everything landed and visible.
    Landed,
    /// wait_group 1: the first group landed, the second is still in flight.
    AllButLast,
    /// no wait at all.
    Never,
}

/// 64 threads: group 1 copies `src[tid]` to `first[(tid + 1) % 64]` (zero for odd tid), group
/// 2 copies `src[tid]` to `second[tid]`; after the wait, `out[tid] = first[tid]` and, unless
/// the second group may be in flight, `out[64 + tid] = second[tid]`.
fn copy_kernel(wait: Wait) -> Kernel {
    let mut k = KernelBuilder::new("copies", 64, false);
    let (src, out) = (k.ptr_param("src"), k.ptr_param("out"));
    let (first, second) = (k.shared(64), k.shared(64));
    let tid = k.tid();
    let next = k.add_u(tid, 1u32);
    let next = k.ubin(BinOp::Rem, next, 64u32);
    let parity = k.ubin(BinOp::Rem, tid, 2u32);
    let even = k.cmp_u(Cmp::Eq, parity, 0u32);
    k.copy_async(first, next, src, tid, even);
    k.commit_copies();
    let always = k.cmp_u(Cmp::Lt, tid, 64u32);
    k.copy_async(second, tid, src, tid, always);
    k.commit_copies();
    match wait {
        Wait::Landed => k.wait_copies(0),
        Wait::AllButLast => k.wait_copies(1),
        Wait::Never => {}
    }
    if wait != Wait::Never {
        k.barrier();
    }
    let v = k.load_shared(first, tid);
    k.store(out, tid, v);
    if wait != Wait::AllButLast {
        let v = k.load_shared(second, tid);
        let at = k.add_u(tid, 64u32);
        k.store(out, at, v);
    }
    k.finish()
}

#[test]
fn async_copies_land_at_their_wait_zero_filled() {
    let mut mem = Memory::new();
    let values: Vec<f32> = (0..64).map(|i| i as f32 + 0.5).collect();
    let src = mem.alloc_f32(&values);
    let out = mem.alloc(4 * 128);
    let args = [Arg::Ptr(src), Arg::Ptr(out)];
    run(&copy_kernel(Wait::Landed), [1, 1], &args, &mem).unwrap();
    let got = mem.read_f32(out, 128);
    for t in 0..64 {
        let from = (t + 63) % 64;
        let want = if from % 2 == 0 { values[from] } else { 0.0 };
        assert_eq!(got[t], want, "first[{t}]");
        assert_eq!(got[64 + t], values[t], "second[{t}]");
    }
    // the first group alone has landed: reading it is fine, the second is never waited for
    let err = run(&copy_kernel(Wait::AllButLast), [1, 1], &args, &mem).unwrap_err();
    assert!(
        err.message
            .contains("thread 0 ends with cp.async copies never waited for"),
        "{err}"
    );
    let err = run(&copy_kernel(Wait::Never), [1, 1], &args, &mem).unwrap_err();
    assert!(
        err.message
            .contains("thread 0 reads 0x0 before the cp.async copy to it landed"),
        "{err}"
    );
}

/// 64 threads stage `src` in shared memory, wait at a barrier (or not), then each loads the
/// `n` words from `n·(tid % 16) + skew` with one vector load and stores them to `out[n·tid..]`.
fn vector_kernel(n: u32, skew: u32, barrier: bool) -> Kernel {
    let mut k = KernelBuilder::new("vector_loads", 64, false);
    let (src, out) = (k.ptr_param("src"), k.ptr_param("out"));
    k.shared(1); // an odd word before the array: it must still start 16-byte aligned
    let area = k.shared_aligned(64);
    let tid = k.tid();
    let v = k.load(src, tid);
    k.store_shared(area, tid, v);
    if barrier {
        k.barrier();
    }
    let lane = k.ubin(BinOp::Rem, tid, 16u32);
    let at = k.mul_u(lane, n);
    let values = k.load_shared_vector(area, at, skew, n);
    for (i, v) in values.into_iter().enumerate() {
        let to = k.mad_u(tid, n, i as u32);
        k.store(out, to, v);
    }
    k.finish()
}

#[test]
fn vector_loads_read_consecutive_aligned_words_and_are_race_checked() {
    let mut mem = Memory::new();
    let values: Vec<f32> = (0..64).map(|i| i as f32 * 1.5).collect();
    let src = mem.alloc_f32(&values);
    let out = mem.alloc(4 * 64 * 4);
    let args = [Arg::Ptr(src), Arg::Ptr(out)];
    for n in [2, 4] {
        run(&vector_kernel(n, 0, true), [1, 1], &args, &mem).unwrap();
        let got = mem.read_f32(out, 64 * n as usize);
        let want: Vec<f32> = (0..64 * n as usize)
            .map(|e| values[(n as usize) * ((e / n as usize) % 16) + e % n as usize])
            .collect();
        assert_eq!(got, want, "v{n}");
        // an address one word off its vector's alignment
        let err = run(&vector_kernel(n, 1, true), [1, 1], &args, &mem).unwrap_err();
        let expect = format!("misaligned shared access of {} bytes", 4 * n);
        assert!(err.message.contains(&expect), "{err}");
        // words another thread wrote, no barrier between
        let err = run(&vector_kernel(n, 0, false), [1, 1], &args, &mem).unwrap_err();
        assert!(err.message.contains("since the last bar.sync"), "{err}");
    }
    let text = ptx::module(&[&vector_kernel(4, 0, true)], "sm_90");
    assert!(
        text.contains("ld.shared.v4.f32 {%f"),
        "{}",
        text.lines()
            .filter(|l| l.contains("ld.shared"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
