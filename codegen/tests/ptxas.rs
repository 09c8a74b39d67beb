//! Every kernel of every paper model assembles with NVIDIA's ptxas for sm_80 and sm_90: batch
//! 4096, each Fisher mode, fused (on fp32 FMA and on tensor cores, 3xTF32 and TF32) and
//! unfused; and the trainer's kernel that counts non-finite values. Run by `scripts/test.sh`,
//! which installs ptxas.

use std::collections::BTreeMap;
use std::path::Path;

use fisherc_codegen::compile::{CompileOptions, compile};
use fisherc_codegen::kir::Kernel;
use fisherc_codegen::lower::LowerOptions;
use fisherc_codegen::options::{DEFAULT_STAGES, Precision};
use fisherc_codegen::{ptx, ptxas};
use fisherc_ir::model::{BuildOptions, load};
use fisherc_ir::{StepOptions, build_training_step};

const MODELS: [&str; 4] = ["resnet20", "resnet44", "resnet44x2", "vgg16"];

/// Spill bytes a register-tiled kernel may have (see the test).
const TILED_SPILL_BYTES: u32 = 64;

/// The kernels of every configuration, one copy of each (names are unique per op and shape).
fn all_kernels() -> BTreeMap<String, Kernel> {
    let mut kernels = BTreeMap::new();
    for model in MODELS {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../models/{model}.toml"));
        for options in StepOptions::all() {
            let network = load(&path, &BuildOptions::train(4096)).unwrap();
            let step = build_training_step(network, &options).unwrap();
            // the default pipeline, and 3xTF32 three deep (`--stages 3`) as well
            let variants = [
                (true, Precision::Fp32, DEFAULT_STAGES),
                (true, Precision::Tf32x3, DEFAULT_STAGES),
                (true, Precision::Tf32x3, 3),
                (true, Precision::Tf32, DEFAULT_STAGES),
                (false, Precision::Fp32, DEFAULT_STAGES),
            ];
            for (fused, precision, stages) in variants {
                let options = CompileOptions {
                    fused,
                    lowering: LowerOptions { precision, stages },
                    ..CompileOptions::default()
                };
                let compiled = compile(&step, options).unwrap();
                for k in compiled.program.kernels {
                    kernels.entry(k.name.clone()).or_insert(k);
                }
            }
        }
    }
    let finite = fisherc_codegen::finite::count_kernel();
    kernels.insert(finite.name.clone(), finite);
    kernels
}

#[test]
#[ignore = "needs ptxas: run scripts/test.sh (it installs ptxas into .tools/)"]
fn every_kernel_of_every_model_assembles_for_sm80_and_sm90() {
    let ptxas = ptxas::find().expect("ptxas not found: run scripts/install-ptxas.sh");
    let kernels = all_kernels();
    let refs: Vec<&Kernel> = kernels.values().collect();
    for arch in ["sm_80", "sm_90"] {
        let resources = ptxas::assemble(&ptxas, &ptx::module(&refs, arch), arch)
            .unwrap_or_else(|messages| panic!("ptxas rejected the module for {arch}:\n{messages}"));
        let mut assembled: Vec<&str> = resources.iter().map(|r| r.kernel.as_str()).collect();
        assembled.sort_unstable();
        let expected: Vec<&str> = kernels.keys().map(String::as_str).collect(); // sorted
        assert_eq!(assembled, expected, "{arch}: ptxas reports every kernel");
        // register-tiled GEMMs may spill a little: the exact weight gradient's per-chunk
        // totals (touched once per example) when ptxas hoists a whole K slice of operands
        let allowed = |r: &&ptxas::Resources| {
            if kernels[&r.kernel].register_tiled() {
                TILED_SPILL_BYTES
            } else {
                0
            }
        };
        let spilling: Vec<_> = resources
            .iter()
            .filter(|r| r.spill_stores.max(r.spill_loads) > allowed(r))
            .collect();
        assert!(
            spilling.is_empty(),
            "{arch}: kernels that spill registers: {spilling:?}"
        );
        let busiest = resources
            .iter()
            .max_by_key(|r| r.registers)
            .expect("kernels");
        eprintln!(
            "{arch}: {} kernels assembled; most registers: {} ({})",
            resources.len(),
            busiest.registers,
            busiest.kernel
        );
        report_tiled(arch, &kernels, &resources);
    }
}

/// Prints (with `--nocapture`) the register-tiled kernels' registers and spills by kind of
/// GEMM, to compare kernel versions.
fn report_tiled(arch: &str, kernels: &BTreeMap<String, Kernel>, resources: &[ptxas::Resources]) {
    let mut kinds: BTreeMap<String, (usize, u32, u32, u32)> = BTreeMap::new();
    for r in resources
        .iter()
        .filter(|r| kernels[&r.kernel].register_tiled())
    {
        // the name without its shape hash: op, part and options
        let kind = r.kernel.rsplit_once('_').map_or(&*r.kernel, |(k, _)| k);
        let entry = kinds.entry(kind.to_string()).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(r.registers);
        entry.2 += r.spill_stores;
        entry.3 = entry.3.max(r.spill_stores);
    }
    for r in resources.iter().filter(|r| r.spill_stores > 0) {
        eprintln!(
            "{arch} spills: {} ({} registers, {} bytes shared, {} bytes spill stores)",
            r.kernel, r.registers, r.shared_bytes, r.spill_stores
        );
    }
    for (kind, (count, registers, spills, worst)) in kinds {
        eprintln!(
            "{arch} {kind:<40} {count:>4} kernels, most registers {registers:>3}, spill \
             stores {spills:>5} bytes in all, {worst:>3} at most"
        );
    }
}
