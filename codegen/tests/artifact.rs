//! Artifacts on disk: what is written reads back equal, and damaged artifacts are reported
//! with the file and what is wrong, never a panic.

use std::fs;
use std::path::Path;

use fisherc_codegen::artifact::{
    Artifact, ArtifactError, PLAN_FILE, PTX_FILE, SUMMARY_FILE, Source, SourceError, compile_step,
};
use fisherc_codegen::compile::{CompileOptions, compile};
use fisherc_codegen::options::Arch;
use fisherc_codegen::plan::Arg;
use fisherc_ir::model::{BuildOptions, ModelSpec, build, load};
use fisherc_ir::ops::Hyper;
use fisherc_ir::{FisherMode, StepOptions, build_training_step};

fn artifact(fused: bool) -> Artifact {
    artifact_of_batch(fused, 8)
}

fn artifact_of_batch(fused: bool, batch: usize) -> Artifact {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/small_cnn.toml");
    let network = load(&path, &BuildOptions::train(batch)).unwrap();
    let step = build_training_step(network, &StepOptions::new(FisherMode::Exact)).unwrap();
    let options = CompileOptions {
        arch: Arch::Sm80,
        ..CompileOptions::fused(fused)
    };
    let text = std::fs::read_to_string(&path).unwrap();
    compile_step(&step, (&path, text), options)
        .unwrap()
        .artifact()
        .clone()
}

fn written(a: &Artifact) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    a.write(dir.path()).unwrap();
    dir
}

#[test]
fn artifacts_read_back_equal() {
    for fused in [true, false] {
        let a = artifact(fused);
        let dir = written(&a);
        let back = Artifact::read(dir.path()).unwrap();
        assert_eq!(back.plan, a.plan);
        assert_eq!(back.ptx, a.ptx);
        assert!(a.ptx.contains(".target sm_80"));
        let summary = fs::read_to_string(dir.path().join(SUMMARY_FILE)).unwrap();
        assert!(summary.contains("batch 8 · fisher exact"), "{summary}");
        // no temporary files left behind
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [PTX_FILE, PLAN_FILE, SUMMARY_FILE]);
    }
}

#[test]
fn the_plan_names_the_hyper_parameter_slots_and_the_step_sequence() {
    let plan = artifact(true).plan;
    let hypers: Vec<Hyper> = plan.hyper.iter().map(|h| h.hyper).collect();
    for h in Hyper::ALL {
        assert!(hypers.contains(&h), "{h:?} has a slot");
    }
    for slot in &plan.hyper {
        assert_eq!(slot.offset, plan.buffers[slot.buffer].offset);
    }
    // the launches, in order, are the nodes' launches, in order
    let from_nodes: Vec<usize> = plan
        .nodes
        .iter()
        .flat_map(|n| n.first_launch..n.first_launch + n.launch_count)
        .collect();
    assert_eq!(from_nodes, (0..plan.launches.len()).collect::<Vec<_>>());
    plan.check().unwrap();
}

#[test]
fn damaged_artifacts_are_reported_not_panicked_on() {
    let a = artifact(true);

    let dir = written(&a);
    let plan_path = dir.path().join(PLAN_FILE);
    let text = fs::read_to_string(&plan_path).unwrap();
    fs::write(
        &plan_path,
        text.replacen("\"launches\": [", "\"launches\": [}", 1),
    )
    .unwrap();
    let err = Artifact::read(dir.path()).unwrap_err();
    assert!(
        matches!(err, ArtifactError::Json { line, .. } if line > 1),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with(&plan_path.display().to_string()),
        "{err}"
    );

    let mut bad = a.clone();
    bad.plan.format += 1;
    let err = Artifact::read(written(&bad).path()).unwrap_err();
    assert!(err.to_string().contains("recompile"), "{err}");

    let mut bad = a.clone();
    bad.plan.launches[3].args[0] = Arg::Buffer(bad.plan.buffers.len());
    let err = Artifact::read(written(&bad).path()).unwrap_err();
    assert!(err.to_string().contains("launch 3"), "{err}");

    let mut bad = a.clone();
    bad.plan.launches[2].args.pop();
    let err = Artifact::read(written(&bad).path()).unwrap_err();
    assert!(err.to_string().contains("arguments for"), "{err}");

    // indices whose sum overflows
    let mut bad = a.clone();
    let last = bad.plan.nodes.len() - 1;
    bad.plan.nodes[last].first_launch = usize::MAX;
    let err = Artifact::read(written(&bad).path()).unwrap_err();
    assert!(err.to_string().contains("are not its own"), "{err}");
    let mut bad = a.clone();
    bad.plan.buffers[0].offset = u64::MAX - 1;
    let err = Artifact::read(written(&bad).path()).unwrap_err();
    assert!(err.to_string().contains("outside the arena"), "{err}");

    let mut bad = a.clone();
    let name = bad.plan.kernels[0].name.clone();
    bad.ptx = bad
        .ptx
        .replace(&format!(".entry {name}("), ".entry renamed(");
    let err = Artifact::read(written(&bad).path()).unwrap_err();
    assert!(
        err.to_string().contains(&format!("no kernel {name}")),
        "{err}"
    );

    let dir = written(&a);
    fs::remove_file(dir.path().join(PTX_FILE)).unwrap();
    let err = Artifact::read(dir.path()).unwrap_err();
    assert!(matches!(err, ArtifactError::Input { .. }), "{err}");
    assert!(err.to_string().contains(PTX_FILE), "{err}");
}

#[test]
fn artifacts_stand_alone_and_compile_again_to_themselves() {
    let a = artifact(true);
    let verified = a.clone().verify().unwrap();
    assert_eq!(
        verified.compiled().program.kernels.len(),
        a.plan.kernels.len()
    );
    // a changed model text gives another program, which is refused
    let mut edited = a.clone();
    edited.plan.source.model_text =
        edited
            .plan
            .source
            .model_text
            .replacen("out = 128", "out = 96", 1);
    assert_ne!(
        edited.plan.source.model_text, a.plan.source.model_text,
        "the edit applies"
    );
    let Err(err) = edited.verify() else {
        panic!("an edited model compiled to the same program")
    };
    assert!(matches!(err, SourceError::Changed { .. }), "{err}");
    assert!(err.to_string().contains("recompile it"), "{err}");
}

/// A classifier widened to the data (as the trainer does: VGG16's file is for CIFAR-10, the
/// data CIFAR-100) stays widened in the artifact: read back, its network and its recompiled
/// program are the widened ones, though the kept model text says otherwise.
#[test]
fn an_artifact_keeps_the_classifier_width_it_was_built_with() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/small_cnn.toml");
    let text = fs::read_to_string(&path).unwrap();
    let mut spec = ModelSpec::parse(&text, &path).unwrap();
    assert_ne!(spec.classes, 4, "a width the file does not have");
    spec.classes = 4;
    let network = build(&spec, &BuildOptions::train(8)).unwrap();
    let step = build_training_step(network, &StepOptions::new(FisherMode::Exact)).unwrap();
    let options = CompileOptions::fused(true);
    let compiled = compile(&step, options).unwrap();
    let source = Source::of(&step, &path, text, options);
    let a = Artifact::new(&compiled.program, source, compiled.seconds);
    let back = Artifact::read(written(&a).path()).unwrap();
    let network = back.plan.source.network().unwrap();
    assert_eq!(network.classes, 4);
    let classifier = network.params.iter().rev().find(|p| p.shape.len() == 2);
    assert_eq!(classifier.unwrap().shape[0], 4, "{:?}", network.params);
    let again = back.verify().unwrap();
    assert_eq!(
        again.compiled().program.launches.len(),
        a.plan.launches.len()
    );
}

/// Every convolution GEMM states its main loop, by which cost estimates multiply the loop's
/// machine code: the forward's trips are its K slices (K = c·kh·kw from its weights), the
/// weight gradient's its K slices (K = output positions) times the examples of a block's
/// chunk (several at batch 4096).
#[test]
fn convolution_kernels_state_their_main_loop() {
    let plan = artifact_of_batch(true, 4096).plan;
    let shape_of = |launch: &fisherc_codegen::plan::PlannedLaunch, param: &str| {
        let kernel = &plan.kernels[launch.kernel];
        let at = kernel.params.iter().position(|(p, _)| p == param).unwrap();
        let Arg::Buffer(b) = launch.args[at] else {
            panic!("{param} of {} is not a buffer", kernel.name)
        };
        plan.buffers[b].shape.clone()
    };
    // fp32 FMA (the artifact's options): 8-deep K slices of 4 × 4 FMAs a thread per k
    let slices = |k: usize| k.div_ceil(8) as u64;
    let trips = |kernel: &fisherc_codegen::artifact::KernelInfo| {
        let main_loop = kernel.main_loop?;
        assert_eq!(main_loop.multiplies % (4 * 4 * 8), 0, "{}", kernel.name);
        Some(main_loop.trips)
    };
    let (mut forwards, mut chunks) = (0, Vec::new());
    for launch in &plan.launches {
        let kernel = &plan.kernels[launch.kernel];
        if kernel.name.contains("forward") && kernel.name.contains("conv") {
            let w = shape_of(launch, "w");
            assert_eq!(
                trips(kernel),
                Some(slices(w[1] * w[2] * w[3])),
                "{}",
                kernel.name
            );
            forwards += 1;
        } else if kernel.name.contains("wgrad_wgrad") {
            let dy = shape_of(launch, "dy");
            let chunk = dy[0].div_ceil(launch.grid[1] as usize) as u64;
            chunks.push(chunk);
            assert_eq!(
                trips(kernel),
                Some(chunk * slices(dy[2] * dy[3])),
                "{}",
                kernel.name
            );
        } else if kernel.name.contains("prologue_pairs") || kernel.name.contains("combine") {
            assert_eq!(kernel.main_loop, None, "{}", kernel.name);
        }
    }
    assert!(forwards > 0, "no forward convolution");
    assert!(chunks.iter().any(|&c| c > 1), "chunks {chunks:?}");
}
