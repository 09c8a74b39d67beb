//! Running one op's kernels on the CPU executor and comparing with the op's CPU reference.

#![allow(dead_code)]

use fisherc_codegen::exec::{Arg, Memory, run};
use fisherc_codegen::lower::{Buf, LaunchArg, LowerOptions, Lowered, lower};
use fisherc_ir::ops::Op;
use fisherc_ir::tensor::{DType, Tensor, TensorType, Value};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn uniform(r: &mut ChaCha8Rng, shape: &[usize], lo: f32, hi: f32) -> Value<f32> {
    let n = shape.iter().product();
    Value::Float(Tensor::from_vec(
        shape,
        (0..n).map(|_| r.random_range(lo..hi)).collect(),
    ))
}

pub fn random(r: &mut ChaCha8Rng, shape: &[usize]) -> Value<f32> {
    uniform(r, shape, -1.0, 1.0)
}

pub fn labels(r: &mut ChaCha8Rng, n: usize, classes: usize) -> Value<f32> {
    Value::Int(Tensor::from_vec(
        &[n],
        (0..n).map(|_| r.random_range(0..classes as i32)).collect(),
    ))
}

fn type_of(v: &Value<f32>) -> TensorType {
    TensorType::new(v.shape().to_vec(), v.dtype())
}

/// Writes a value into executor memory.
fn upload(mem: &mut Memory, v: &Value<f32>) -> u64 {
    match v {
        Value::Float(t) => mem.alloc_f32(&t.data),
        Value::Int(t) => mem.alloc_i32(&t.data),
        Value::Word(w) => {
            let p = mem.alloc(8);
            mem.write_u64(p, *w);
            p
        }
    }
}

/// Runs the op's kernels on the executor and returns its outputs.
pub fn run_kernels(op: &Op, inputs: &[Value<f32>]) -> Vec<Tensor<f32>> {
    run_kernels_with(op, inputs, LowerOptions::default())
}

/// [`run_kernels`] lowered with `options`.
pub fn run_kernels_with(op: &Op, inputs: &[Value<f32>], options: LowerOptions) -> Vec<Tensor<f32>> {
    let types: Vec<TensorType> = inputs.iter().map(type_of).collect();
    let refs: Vec<&TensorType> = types.iter().collect();
    let out_types = op
        .infer(&refs)
        .unwrap_or_else(|e| panic!("{}: {e}", op.name()));
    let lowered = lower(op, &refs, &out_types, options).unwrap();
    let mut mem = Memory::new();
    let in_ptrs: Vec<u64> = inputs.iter().map(|v| upload(&mut mem, v)).collect();
    // outputs start as garbage, so a kernel that forgets an element is caught
    let out_ptrs: Vec<u64> = out_types
        .iter()
        .map(|t| mem.alloc_f32(&vec![f32::NAN; t.numel()]))
        .collect();
    match lowered {
        Lowered::Kernels { launches, scratch } => {
            let scratch_ptrs: Vec<u64> = scratch.iter().map(|&b| mem.alloc(b as usize)).collect();
            for launch in &launches {
                let args: Vec<Arg> = launch
                    .args
                    .iter()
                    .map(|a| match *a {
                        LaunchArg::Buf(Buf::Input(i)) => Arg::Ptr(in_ptrs[i]),
                        LaunchArg::Buf(Buf::Output(i)) => Arg::Ptr(out_ptrs[i]),
                        LaunchArg::Buf(Buf::Scratch(i)) => Arg::Ptr(scratch_ptrs[i]),
                        LaunchArg::U32(v) => Arg::U32(v),
                        LaunchArg::F32(v) => Arg::F32(v),
                    })
                    .collect();
                run(&launch.kernel, launch.grid, &args, &mem).unwrap_or_else(|e| panic!("{e}"));
            }
        }
        other => panic!("{} lowers to {other:?}, not kernels", op.name()),
    }
    out_types
        .iter()
        .zip(&out_ptrs)
        .map(|(t, &p)| {
            assert_eq!(t.dtype, DType::F32);
            Tensor::from_vec(&t.shape, mem.read_f32(p, t.numel()))
        })
        .collect()
}

/// The op's CPU reference in f64 on the same inputs.
pub fn reference(op: &Op, inputs: &[Value<f32>]) -> Vec<Tensor<f64>> {
    let wide: Vec<Value<f64>> = inputs
        .iter()
        .map(|v| match v {
            Value::Float(t) => Value::Float(t.cast()),
            Value::Int(t) => Value::Int(t.clone()),
            Value::Word(w) => Value::Word(*w),
        })
        .collect();
    let types: Vec<TensorType> = inputs.iter().map(type_of).collect();
    let refs: Vec<&TensorType> = types.iter().collect();
    let out_types = op.infer(&refs).unwrap();
    let args: Vec<&Value<f64>> = wide.iter().collect();
    op.eval(&args, &out_types)
        .unwrap()
        .into_iter()
        .map(Value::into_float)
        .collect()
}

/// Kernels vs reference: every output within `tolerance` of the largest reference magnitude,
/// no NaN.
pub fn check(op: impl Into<Op>, inputs: &[Value<f32>], tolerance: f64) {
    check_with(op, inputs, tolerance, LowerOptions::default())
}

/// [`check`] with the kernels lowered with `options`.
pub fn check_with(op: impl Into<Op>, inputs: &[Value<f32>], tolerance: f64, options: LowerOptions) {
    let op = op.into();
    let got = run_kernels_with(&op, inputs, options);
    let expected = reference(&op, inputs);
    for (k, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g.shape, e.shape, "{} output {k}: shape", op.name());
        let scale = e.data.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
        for (i, (a, b)) in g.data.iter().zip(&e.data).enumerate() {
            assert!(
                !a.is_nan(),
                "{} ({options:?}) output {k}[{i}] is NaN",
                op.name()
            );
            let err = (*a as f64 - b).abs() / scale;
            assert!(
                err <= tolerance,
                "{} ({options:?}) output {k}[{i}]: kernel {a}, reference {b} (relative {err:e} > {tolerance:e})",
                op.name()
            );
        }
    }
}
