//! The `fisherc` binary end to end: `inspect` reports and errors, `step` runs.

use std::process::{Command, Output};

fn fisherc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fisherc"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the fisherc binary runs")
}

/// `fisherc train` of `config` in `run_dir` with the override `set`.
fn train_with(config: &str, run_dir: &str, set: &str) -> Output {
    fisherc(&[
        "train",
        "--config",
        config,
        "--run-dir",
        run_dir,
        "--set",
        set,
    ])
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "fisherc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The loss of each `step N  loss L  time` line that `step` and `run` print, as printed.
fn printed_losses(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("step "))
        .map(|l| l.split_whitespace().nth(3).unwrap().to_string())
        .collect()
}

/// [`printed_losses`] as numbers.
fn losses(text: &str) -> Vec<f64> {
    printed_losses(text)
        .iter()
        .map(|l| l.parse().unwrap())
        .collect()
}

fn inspect_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["inspect"];
    all.extend(args);
    all.push("--json");
    serde_json::from_str(&stdout(&fisherc(&all))).expect("inspect --json prints one JSON object")
}

#[test]
fn inspect_json_gives_the_reference_parameter_counts() {
    for (model, params) in [
        ("resnet44", 661_338),
        ("vgg16", 14_724_042),
        ("resnet44x2", 2_648_068),
    ] {
        let report = inspect_json(&[&format!("models/{model}.toml")]);
        assert_eq!(report["model"], model);
        assert_eq!(report["params"], params, "{model}");
        assert!(report["flops_per_step"].as_u64().unwrap() > 0);
        assert!(report["nodes"].as_u64().unwrap() > 100);
        assert!(report["ops"]["conv2d"].as_u64().unwrap() > 10);
    }
    let option_a = inspect_json(&["models/resnet44.toml", "--shortcut", "A"]);
    assert_eq!(option_a["params"], 658_586);
}

#[test]
fn inspect_counts_the_fisher_nodes_of_each_mode() {
    let none = inspect_json(&["models/resnet20.toml", "--batch", "16", "--fisher", "none"]);
    let exact = inspect_json(&["models/resnet20.toml", "--batch", "16", "--fisher", "exact"]);
    let a2g2 = inspect_json(&["models/resnet20.toml", "--batch", "16", "--fisher", "a2g2"]);
    let convs = &exact["ops"]["conv2d"];
    assert_eq!(&exact["ops"]["conv_wgrad_per_example"], convs);
    assert!(none["ops"].get("conv_wgrad_per_example").is_none());
    assert!(none["ops"].get("square").is_none());
    assert!(a2g2["ops"].get("conv_wgrad_per_example").is_none());
    assert!(a2g2["ops"]["square"].as_u64() > Some(0));
    assert!(exact["nodes"].as_u64() > none["nodes"].as_u64());
    assert!(exact["flops"]["fisher"].as_u64() > Some(0));
    // FLOPs scale with the batch
    let big = inspect_json(&["models/resnet20.toml", "--batch", "32", "--fisher", "none"]);
    let (small, big) = (
        none["flops"]["forward"].as_u64().unwrap(),
        big["flops"]["forward"].as_u64().unwrap(),
    );
    assert!(big > 19 * small / 10 && big <= 2 * small, "{small} → {big}");
}

#[test]
fn inspect_prints_a_layer_table() {
    let text = stdout(&fisherc(&[
        "inspect",
        "models/resnet44.toml",
        "--batch",
        "8",
    ]));
    assert!(text.contains("parameters        661,338"), "{text}");
    assert!(text.contains("basic21.conv2"), "{text}");
    assert!(text.contains("[8, 64, 8, 8]"), "{text}");
}

#[test]
fn a_malformed_model_file_is_reported_with_its_line() {
    let dir = std::env::temp_dir().join(format!("fisherc-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("broken.toml");
    std::fs::write(
        &file,
        "name = \"x\"\ninput = [1, 4, 4]\nclasses = 2\nlayers = [\n  { op = \"dense\" },\n]\n",
    )
    .unwrap();
    let out = fisherc(&["inspect", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.toml:5: unknown op 'dense'"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn inspect_shows_the_second_backward_pass_of_full_fisher_noise() {
    let plain = inspect_json(&["models/resnet20.toml", "--batch", "16", "--fisher", "none"]);
    for noise in ["full-fisher-empirical", "full-fisher-true"] {
        let full = inspect_json(&["models/resnet20.toml", "--batch", "16", "--noise", noise]);
        assert_eq!(full["fisher"], "none", "no diagonal estimate by default");
        assert_eq!(full["noise"], noise);
        assert_eq!(full["ops"]["full_fisher_sample"], 1);
        // every weight gradient twice: the loss's and the noise draw's
        let wgrads = plain["ops"]["conv_wgrad"].as_u64().unwrap();
        assert_eq!(
            full["ops"]["conv_wgrad"].as_u64(),
            Some(2 * wgrads),
            "{noise}"
        );
        assert!(full["flops"]["fisher"].as_u64() > Some(0));
    }
    let refused = fisherc(&[
        "inspect",
        "models/resnet20.toml",
        "--noise",
        "full-fisher-true",
        "--fisher",
        "exact",
    ]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("takes no diagonal Fisher"), "{message}");
    let unknown = fisherc(&["inspect", "models/mlp.toml", "--noise", "full"]);
    let message = String::from_utf8_lossy(&unknown.stderr);
    assert!(message.contains("full-fisher-empirical"), "{message}");
}

#[test]
fn step_runs_and_reports_loss_and_time() {
    let text = stdout(&fisherc(&[
        "step",
        "models/mlp.toml",
        "--batch",
        "8",
        "--seed",
        "3",
        "--steps",
        "2",
        "--noise-scale",
        "0.1",
    ]));
    let losses = losses(&text);
    assert_eq!(losses.len(), 2, "{text}");
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{text}");
    assert!(text.contains("noise scale 0.10000"), "{text}");
    assert!(text.contains("median of steps 1–2: "), "{text}");
}

/// What README's `step` example claims: on its random batch the loss falls, and at the
/// default noise scale, which is 0 at a batch of 128 or less, the step says the noise is off.
#[test]
fn step_says_when_the_default_noise_is_off_and_the_readme_example_learns() {
    let text = stdout(&fisherc(&[
        "step",
        "models/small_cnn.toml",
        "--batch",
        "64",
        "--seed",
        "3",
        "--steps",
        "5",
        "--lr",
        "0.005",
    ]));
    assert!(text.contains("421,738 parameters"), "{text}");
    assert!(text.contains("noise off: the default scale"), "{text}");
    let losses = losses(&text);
    assert_eq!(losses.len(), 5, "{text}");
    assert!(
        losses.windows(2).all(|w| w[1] < w[0]),
        "the loss falls step by step: {text}"
    );
    let help = stdout(&fisherc(&["step", "--help"]));
    for flag in ["Learning rate", "Momentum", "Weight decay"] {
        assert!(help.contains(flag), "{help}");
    }
}

/// The CPU reference's results do not depend on the instruction set: steps with the products
/// on every kernel this CPU runs print the same losses (bit-for-bit equality of the products is
/// `fisherc_ir::matmul`'s own test).
#[test]
fn steps_give_the_same_losses_on_every_instruction_set() {
    let args = [
        "step",
        "models/small_cnn.toml",
        "--batch",
        "16",
        "--steps",
        "3",
        "--lr",
        "0.005",
        "--noise-scale",
        "0.2",
    ];
    let losses_on = |isa: &str| -> Vec<String> {
        let out = Command::new(env!("CARGO_BIN_EXE_fisherc"))
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("FISHERC_MATMUL_ISA", isa)
            .output()
            .unwrap();
        printed_losses(&stdout(&out))
    };
    let baseline = losses_on("baseline");
    assert_eq!(baseline.len(), 3);
    let supported = fisherc_ir::matmul::Isa::supported();
    for (isa, name) in [
        (fisherc_ir::matmul::Isa::Avx2, "avx2"),
        (fisherc_ir::matmul::Isa::Avx512, "avx512"),
    ] {
        if supported.contains(&isa) {
            assert_eq!(losses_on(name), baseline, "{name}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_fisherc"))
        .args(args)
        .env("FISHERC_MATMUL_ISA", "sse9")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected baseline, avx2 or avx512"), "{err}");
}

#[test]
fn a_model_file_that_cannot_be_read_is_named_without_a_line() {
    let out = fisherc(&["inspect", "models/nope.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: models/nope.toml: the model file: cannot read"),
        "{err}"
    );
}

#[test]
fn special_files_are_refused_as_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.toml");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let fifo = fifo.to_str().unwrap();
    let plan = dir.path().join("artifact/plan.json");
    std::fs::create_dir(plan.parent().unwrap()).unwrap();
    assert!(
        Command::new("mkfifo")
            .arg(&plan)
            .status()
            .unwrap()
            .success()
    );
    let artifact = plan.parent().unwrap().to_str().unwrap();
    for (args, says) in [
        (vec!["inspect", "/dev/zero"], "a character device"),
        (vec!["compile", fifo, "--batch", "2"], "a FIFO"),
        (vec!["train", "--config", "/dev/zero"], "a character device"),
        (
            vec!["run", artifact],
            "plan.json: not a regular file (it is a FIFO)",
        ),
    ] {
        let out = fisherc(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn a_megabyte_of_bad_words_is_echoed_in_short() {
    let word = "x".repeat(100_000);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("experiment.toml");
    std::fs::write(&config, SYNTHETIC_EXPERIMENT).unwrap();
    let model = dir.path().join("model.toml");
    let text = std::fs::read_to_string("models/small_cnn.toml").unwrap();
    let text = text.replace(r#"{ op = "flatten" }"#, &format!(r#"{{ op = "{word}" }}"#));
    std::fs::write(&model, text).unwrap();
    let run_dir = dir.path().join("run").display().to_string();
    let config = config.display().to_string();
    let overrides = [
        format!("train.regime={word}"),
        format!("{word}=1"),
        format!("train.lr={word}"),
    ];
    let mut outs: Vec<Output> = overrides
        .iter()
        .map(|set| train_with(&config, &run_dir, set))
        .collect();
    outs.push(fisherc(&["inspect", model.to_str().unwrap()]));
    for out in outs {
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.len() < 2_000, "{} bytes: {}", err.len(), &err[..300]);
        assert!(err.contains("characters]"), "{err}");
    }
}

#[test]
fn run_on_a_directory_that_holds_no_artifact_says_so_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = fisherc(&["run", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a compiled artifact"), "{err}");
    assert!(err.contains("fisherc compile"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // a path that is not there at all: the OS error, once
    let gone = dir.path().join("gone");
    let out = fisherc(&["run", gone.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("os error").count(), 1, "{err}");
}

#[test]
fn a_bad_override_is_blamed_on_the_override() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("experiment.toml");
    std::fs::write(&config, SYNTHETIC_EXPERIMENT).unwrap();
    let config = config.display().to_string();
    let run_dir = dir.path().join("run").display().to_string();
    for (set, says) in [
        ("train.lrr=1", "unknown field `lrr`"),
        ("train.lr=fast", "invalid type"),
        ("train.epochs=0", "train.epochs must be at least 1"),
    ] {
        let out = train_with(&config, &run_dir, set);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with(&format!("error: --set {set}: ")), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(
            !err.contains("experiment.toml"),
            "the file is not to blame: {err}"
        );
    }
}

#[test]
fn inspect_optimize_reports_rules_ops_and_estimates() {
    let report = inspect_json(&["models/resnet20.toml", "--batch", "64", "--optimize"]);
    let optimized = &report["optimized"];
    for key in ["ops", "rules", "est_bytes", "est_flops", "kernels"] {
        assert!(
            !optimized[key].is_null(),
            "optimized.{key} missing: {optimized}"
        );
    }
    assert!(optimized["rules"]["conv-wgrad-with-exact-squares"].as_u64() > Some(0));
    assert!(optimized["ops"]["fused_wgrad"].as_u64() > Some(0));
    assert!(optimized["est_bytes"].as_u64() < report["est_bytes"].as_u64());
    assert!(optimized["kernels"].as_u64() < report["kernels"].as_u64());
    let text = stdout(&fisherc(&["inspect", "models/resnet20.toml", "--optimize"]));
    assert!(
        text.contains("rules fired") && text.contains("% of unoptimised"),
        "{text}"
    );
    // without --optimize there is no optimized section
    assert!(
        inspect_json(&["models/mlp.toml"])
            .get("optimized")
            .is_none()
    );
}

#[test]
fn compile_writes_an_artifact_that_inspect_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("small");
    let out_arg = out.to_str().unwrap();
    let compiled = stdout(&fisherc(&[
        "compile",
        "models/small_cnn.toml",
        "--batch",
        "8",
        "--fisher",
        "a2g2",
        "-o",
        out_arg,
    ]));
    assert!(
        compiled.contains("batch 8 · fisher a2g2 · fused · sm_90"),
        "{compiled}"
    );
    assert!(compiled.contains("arena "), "{compiled}");
    for file in ["module.ptx", "plan.json", "summary.txt"] {
        assert!(out.join(file).is_file(), "{file} written");
    }
    let report = stdout(&fisherc(&["inspect", out_arg]));
    assert!(report.contains("launches by op"), "{report}");
    assert!(report.contains("fused_wgrad"), "{report}");
    assert!(
        report.contains("kernel") && report.contains("regs"),
        "{report}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&fisherc(&["inspect", out_arg, "--json"]))).unwrap();
    let kernels = json["kernel_resources"].as_array().unwrap();
    assert_eq!(
        kernels.len(),
        json["plan"]["kernels"].as_array().unwrap().len()
    );
    assert!(kernels.iter().all(|k| k["launches"].as_u64() >= Some(1)));
    // every GEMM kernel (those with a main loop) states its schedule, here on fp32 FMA
    let plan_kernels = json["plan"]["kernels"].as_array().unwrap();
    let gemms = plan_kernels.iter().filter(|k| !k["schedule"].is_null());
    assert_eq!(
        gemms.count(),
        5,
        "2 convolutions: 2 forwards, 2 weight gradients, 1 dgrad"
    );
    for kernel in plan_kernels {
        let name = kernel["name"].as_str().unwrap();
        let schedule = &kernel["schedule"];
        assert_eq!(schedule.is_null(), kernel["main_loop"].is_null(), "{name}");
        if !schedule.is_null() {
            assert_eq!(schedule["multiply"], "fp32 fma", "{name}");
            assert_eq!(schedule["tile"], serde_json::json!([4, 4]), "{name}");
            assert!(
                schedule["fragment_loads"].is_null(),
                "{name}: one word a load"
            );
        }
    }
    assert!(
        report.contains("GEMM kernel") && report.contains("fp32 fma"),
        "{report}"
    );
    let tensor_cores = dir.path().join("tensor-cores");
    stdout(&fisherc(&[
        "compile",
        "models/small_cnn.toml",
        "--batch",
        "8",
        "--tensor-cores",
        "3xtf32",
        "-o",
        tensor_cores.to_str().unwrap(),
    ]));
    let report = stdout(&fisherc(&["inspect", tensor_cores.to_str().unwrap()]));
    assert!(report.contains("3xtf32 mma m16n8k8"), "{report}");
    assert!(
        report.contains("warp") && report.contains("gathered /"),
        "{report}"
    );
    // a gathered side lies in fragment order, read 4 words a load (a lane's registers of
    // one A tile or two B tiles); a patch or halo a word at a time
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tensor_cores.join("plan.json")).unwrap())
            .unwrap();
    let mut vector_loads = 0;
    for kernel in plan["kernels"].as_array().unwrap() {
        let schedule = &kernel["schedule"];
        if schedule.is_null() {
            continue;
        }
        let gathered = [0, 1].map(|side| schedule["staging"][side] == "gathered");
        let got = match &schedule["fragment_loads"] {
            serde_json::Value::Null => serde_json::json!([1, 1]), // left out: one word each
            loads => loads.clone(),
        };
        let want = serde_json::json!(gathered.map(|g| if g { 4 } else { 1 }));
        assert_eq!(got, want, "{}", kernel["name"]);
        vector_loads += gathered.iter().filter(|&&g| g).count();
    }
    assert!(vector_loads > 0, "{plan}");
    assert!(
        report.contains("words / load") && report.contains("4 / 4"),
        "{report}"
    );

    let unfused = dir.path().join("unfused");
    let text = stdout(&fisherc(&[
        "compile",
        "models/small_cnn.toml",
        "--batch",
        "8",
        "--unfused",
        "--arch",
        "sm_80",
        "-o",
        unfused.to_str().unwrap(),
    ]));
    assert!(text.contains("unfused · sm_80"), "{text}");
    assert!(!text.contains("fused_wgrad"), "{text}");
}

#[test]
fn inspect_reports_a_damaged_artifact() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("plan.json"), "{\"format\": 1,\n \"oops\"").unwrap();
    let out = fisherc(&["inspect", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("plan.json:2:"), "{err}");
}

#[test]
fn run_on_the_reference_backend_repeats_fisherc_step() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mlp");
    let base = ["models/mlp.toml", "--batch", "8", "--fisher", "exact"];
    stdout(&fisherc(
        &[&["compile"][..], &base, &["-o", out.to_str().unwrap()]].concat(),
    ));
    let run = stdout(&fisherc(&[
        "run",
        out.to_str().unwrap(),
        "--steps",
        "3",
        "--seed",
        "2",
        "--noise-scale",
        "0.3",
    ]));
    let step = stdout(&fisherc(
        &[
            &["step"][..],
            &base,
            &["--steps", "3", "--seed", "2", "--noise-scale", "0.3"],
        ]
        .concat(),
    ));
    assert!(run.contains("on cpu reference ops"), "{run}");
    assert!(run.contains("noise scale 0.30000"), "{run}");
    assert_eq!(printed_losses(&run).len(), 3, "{run}");
    // the summary says which steps its median covers
    assert!(
        run.contains("median of steps 2–3 (step 1 left out: warm-up): "),
        "{run}"
    );
    // the same ops in the same order on the same data: the same losses to the printed digit
    assert_eq!(
        printed_losses(&run),
        printed_losses(&step),
        "run:\n{run}\nstep:\n{step}"
    );
}

#[test]
fn check_passes_the_kernel_executor_and_explains_a_missing_cuda_backend() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cnn");
    let out_arg = out.to_str().unwrap();
    stdout(&fisherc(&[
        "compile",
        "models/small_cnn.toml",
        "--batch",
        "2",
        "--input",
        "1x10x10",
        "-o",
        out_arg,
    ]));
    let report = stdout(&fisherc(&["check", out_arg, "--steps", "2"]));
    assert!(
        report.contains("fused_wgrad") && report.contains("noisy_sgd_update"),
        "{report}"
    );
    assert!(report.trim_end().ends_with("PASS"), "{report}");
    // one in 7 of the 200 image values planted NaN or infinite, then counted
    assert!(
        report.contains("among the 200 values of buffer images/input:0: 29 planted, 29 counted"),
        "{report}"
    );
    // steps counted from 1, as `run` counts them
    assert!(
        report.contains("step 1 loss") && report.contains("step 2 loss"),
        "{report}"
    );
    assert!(!report.contains("step 0 "), "{report}");
    let help = stdout(&fisherc(&["check", "--help"]));
    assert!(help.contains("0.5 for a step that draws noise"), "{help}");
    if !cfg!(feature = "cuda") {
        let failed = fisherc(&["run", out_arg, "--backend", "cuda"]);
        assert!(!failed.status.success());
        let err = String::from_utf8_lossy(&failed.stderr);
        assert!(err.contains("scripts/build-cuda.sh"), "{err}");
    }
}

#[test]
fn single_tf32_artifacts_are_checked_within_their_own_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cnn_tf32");
    let out_arg = out.to_str().unwrap();
    let compile = |mode: &str| {
        fisherc(&[
            "compile",
            "models/small_cnn.toml",
            "--batch",
            "8",
            "--input",
            "1x10x10",
            &format!("--tensor-cores={mode}"),
            "-o",
            out_arg,
        ])
    };
    stdout(&compile("tf32"));
    let report = stdout(&fisherc(&["check", out_arg, "--steps", "2"]));
    assert!(
        report.contains("fused, tensor cores (one TF32 product)"),
        "{report}"
    );
    // convolutions get the TF32 bound, the rest keep theirs
    let bound_of = |op: &str| {
        let row = report
            .lines()
            .find(|l| l.split_whitespace().next() == Some(op))
            .unwrap_or_else(|| panic!("no {op} row: {report}"));
        row.split_whitespace().nth(3).unwrap().to_string()
    };
    assert_eq!(bound_of("fused_wgrad"), "5e-3", "{report}");
    assert_eq!(bound_of("linear_dgrad"), "1e-5", "{report}");
    assert!(
        report.contains("within 1e-1 of the f32 reference"),
        "{report}"
    );
    assert!(report.trim_end().ends_with("PASS"), "{report}");
    let wrong = compile("tf16");
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("3xtf32") && err.contains("tf32"), "{err}");
}

/// A two-epoch synthetic experiment (small_cnn on 12×12 images), fast enough for a CLI test.
const SYNTHETIC_EXPERIMENT: &str = r#"
name = "cli_synthetic"
model = "models/small_cnn.toml"
input = [1, 12, 12]
[data]
set = "synthetic"
synthetic = { train = 120, test = 60, shape = [1, 12, 12], classes = 10, noise = 0.5 }
[train]
regime = "sb"
batch = 40
small_batch = 40
epochs = 2
lr = 0.02
"#;

#[test]
fn train_then_plot_overlays_runs_as_svg_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("experiment.toml");
    std::fs::write(&config, SYNTHETIC_EXPERIMENT).unwrap();
    let run_dir = |name: &str| dir.path().join(name).display().to_string();
    let config = config.display().to_string();
    for (name, regime) in [("sb", "sb"), ("lb", "lb")] {
        let out = fisherc(&[
            "train",
            "--config",
            &config,
            "--run-dir",
            &run_dir(name),
            "--set",
            &format!("train.regime={regime}"),
            "--set",
            "train.batch=60",
        ]);
        let text = stdout(&out);
        assert!(text.contains("after epoch 2: test accuracy"), "{text}");
    }
    let prefix = dir.path().join("plots/both").display().to_string();
    let text = stdout(&fisherc(&[
        "plot",
        &run_dir("sb"),
        &run_dir("lb"),
        "-o",
        &prefix,
    ]));
    assert!(
        text.contains("both.svg") && text.contains("both.png"),
        "{text}"
    );
    let png = std::fs::read(format!("{prefix}.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
    let svg = std::fs::read_to_string(format!("{prefix}.svg")).unwrap();
    // both runs are one experiment: the legend names them by directory
    for name in ["sb", "lb"] {
        assert!(svg.contains(&run_dir(name)), "legend entry for {name}");
    }
    for axis in ["epoch", "cross-entropy", "top-1 accuracy (%)"] {
        assert!(svg.contains(axis), "an axis named {axis}");
    }
    // a file with numbers that were not finite (`null`, as older runs wrote them) still plots
    let metrics = dir.path().join("lb/metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let nulls = text
        .replacen("\"loss\":", "\"loss\":null,\"was\":", 1)
        .replace("\"test_loss\":", "\"test_loss\":null,\"was\":");
    std::fs::write(&metrics, nulls).unwrap();
    stdout(&fisherc(&["plot", &run_dir("lb"), "-o", &prefix]));
    // a run without metrics is an error that names the file
    let out = fisherc(&["plot", &dir.path().display().to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics.jsonl"));
}

#[test]
fn bench_times_each_configuration_and_relates_it_to_the_plain_step() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let markdown = dir.path().join("bench.md");
    let text = stdout(&fisherc(&[
        "bench",
        "models/mlp.toml",
        "--batch",
        "4,6",
        "--fisher",
        "none,exact",
        "--variant",
        "fused,fused-tf32",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
        json.to_str().unwrap(),
        "--markdown",
        markdown.to_str().unwrap(),
    ]));
    let results: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        results.len(),
        8,
        "2 batches × 2 Fisher modes × 2 variants: {text}"
    );
    // the JSON names variants as the command line does (the side-by-side script joins on them)
    let variants: std::collections::BTreeSet<&str> = results
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(variants, ["fused", "fused-tf32"].into());
    // the CPU reference runs no kernels: how they would pipeline is not its to say
    assert!(!text.contains("stages"), "{text}");
    for r in &results {
        assert!(r["error"].is_null(), "{r}");
        let median = r["median_ms"].as_f64().unwrap();
        assert!(
            median > 0.0 && median >= r["min_ms"].as_f64().unwrap(),
            "{r}"
        );
        assert!(r["gflop_per_step"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["device"].as_str().unwrap().contains("cpu"), "{r}");
        // the profiled step's ops, slowest first
        let ops = r["ops"].as_array().unwrap();
        assert!(
            ops.iter().any(|o| o["op"] == "noisy_sgd_update_group"),
            "{r}"
        );
        let ms: Vec<f64> = ops.iter().map(|o| o["ms"].as_f64().unwrap()).collect();
        assert!(ms.windows(2).all(|w| w[0] >= w[1]), "{ms:?}");
        // ... and its nodes, each naming its kernels, adding up to the ops' time
        let nodes = r["nodes"].as_array().unwrap();
        assert!(
            nodes
                .iter()
                .all(|n| !n["kernels"].as_array().unwrap().is_empty()),
            "{r}"
        );
        let node_ms: f64 = nodes.iter().map(|n| n["ms"].as_f64().unwrap()).sum();
        let op_ms: f64 = ms.iter().sum();
        assert!((node_ms - op_ms).abs() <= 1e-9 * op_ms.max(1.0), "{r}");
        let ratio = r["vs_plain"].as_f64().unwrap();
        if r["fisher"] == "none" {
            assert_eq!(ratio, 1.0);
        } else {
            let plain = results
                .iter()
                .find(|p| {
                    p["fisher"] == "none"
                        && p["batch"] == r["batch"]
                        && p["variant"] == r["variant"]
                })
                .unwrap();
            let expected = median / plain["median_ms"].as_f64().unwrap();
            assert!((ratio - expected).abs() < 1e-9, "{r}");
        }
    }
    let file = std::fs::read_to_string(&markdown).unwrap();
    let table = file.split("\n\n").next().unwrap();
    assert_eq!(
        table.lines().filter(|l| l.starts_with("| mlp |")).count(),
        8,
        "{table}"
    );
    assert!(text.contains(table), "the table is printed too");
    assert!(
        file.contains("| layer | op |"),
        "and the GEMM nodes' table follows it in the file"
    );

    // a configuration that fails is a row of the table and the exit status, not a crash
    let failed = fisherc(&[
        "bench",
        "models/missing.toml",
        "models/mlp.toml",
        "--batch",
        "2",
        "--fisher",
        "none",
        "--variant",
        "fused",
        "--steps",
        "1",
        "--warmup",
        "0",
    ]);
    assert!(!failed.status.success());
    let out = String::from_utf8_lossy(&failed.stdout);
    assert!(
        out.contains("| missing | 2 | none | fused | failed:"),
        "{out}"
    );
    assert!(out.contains("| mlp | 2 | none | fused |"), "{out}");
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(err.contains("1 of 2 configurations failed"), "{err}");
}

/// A CNN's bench lists its GEMM nodes (the convolutions' GEMM kernels) with how they
/// multiply and, on a card whose peaks are known, the share of them they reach: on the CPU,
/// none.
#[test]
fn bench_lists_each_gemm_node_beside_its_units_peak() {
    let dir = tempfile::tempdir().unwrap();
    let (json, markdown) = (dir.path().join("b.json"), dir.path().join("b.md"));
    let text = stdout(&fisherc(&[
        "bench",
        "models/small_cnn.toml",
        "--batch",
        "2",
        "--fisher",
        "exact",
        "--variant",
        "fused-tf32",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--json",
        json.to_str().unwrap(),
        "--markdown",
        markdown.to_str().unwrap(),
    ]));
    let results: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let nodes = results[0]["nodes"].as_array().unwrap();
    let gemms: Vec<&serde_json::Value> =
        nodes.iter().filter(|n| !n["multiply"].is_null()).collect();
    assert!(
        gemms.len() >= 3,
        "forward, data and weight gradients: {nodes:?}"
    );
    for n in &gemms {
        assert!(n["multiply"].as_str().unwrap().contains("tf32 mma"), "{n}");
        assert!(n["percent_peak"].is_null(), "no peak on the CPU: {n}");
    }
    let table = std::fs::read_to_string(&markdown).unwrap();
    let rows = table
        .lines()
        .filter(|l| l.starts_with("| small_cnn |") && l.contains("tf32 mma"))
        .count();
    assert_eq!(rows, gemms.len(), "{table}");
    assert!(text.contains("slowest GEMM nodes"), "{text}");
}

#[test]
fn counts_of_zero_are_refused_by_name() {
    for args in [
        &["step", "models/mlp.toml", "--steps", "0"][..],
        &["step", "models/mlp.toml", "--batch", "0"],
        &["compile", "models/mlp.toml", "--batch", "0"],
        &["bench", "models/mlp.toml", "--batch", "4,0"],
        &["bench", "models/mlp.toml", "--steps", "0"],
        &["run", "compiled/none", "--steps", "0"],
    ] {
        let out = fisherc(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let flag = args[args.len() - 2];
        assert!(!out.status.success(), "{args:?} ran");
        assert!(
            stderr.contains(flag) && stderr.contains("at least 1"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn an_arena_larger_than_the_host_is_refused_before_it_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("huge");
    let out = out.to_str().unwrap();
    // VGG16 unfused at batch 65,536: an arena of about 1,300 GiB
    let compiled = fisherc(&[
        "compile",
        "models/vgg16.toml",
        "--batch",
        "65536",
        "--unfused",
        "-o",
        out,
    ]);
    assert!(compiled.status.success());
    for backend in ["reference", "executor"] {
        let ran = fisherc(&["run", out, "--backend", backend, "--steps", "1"]);
        let stderr = String::from_utf8_lossy(&ran.stderr);
        assert_eq!(ran.status.code(), Some(1), "{backend}: {stderr}");
        assert!(
            stderr.contains("arena needs") && stderr.contains("GiB of host memory"),
            "{backend}: {stderr}"
        );
    }
}

/// An artifact edited where its indices stay in range (a buffer's dtype and offset, a launch's
/// grid, an immediate in the PTX) is refused by every command before anything runs: it does
/// not compile again to itself.
#[test]
fn an_edited_artifact_is_refused_by_inspect_run_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let good = good.to_str().unwrap();
    let compiled = fisherc(&[
        "compile",
        "models/small_cnn.toml",
        "--batch",
        "4",
        "--input",
        "1x12x12",
        "-o",
        good,
    ]);
    assert!(compiled.status.success());
    let plan = std::fs::read_to_string(format!("{good}/plan.json")).unwrap();
    let ptx = std::fs::read_to_string(format!("{good}/module.ptx")).unwrap();
    let edits: [(&str, String, String); 4] = [
        (
            "dtype",
            plan.replacen("\"dtype\": \"F32\"", "\"dtype\": \"I32\"", 1),
            ptx.clone(),
        ),
        (
            "offset",
            plan.replacen("\"offset\": 256,", "\"offset\": 0,", 1),
            ptx.clone(),
        ),
        (
            "grid",
            plan.replacen("\"grid\": [\n        2,", "\"grid\": [\n        0,", 1),
            ptx.clone(),
        ),
        (
            "ptx",
            plan.clone(),
            ptx.replacen("0f3F800000", "0f40000000", 1),
        ),
    ];
    for (what, plan_text, ptx_text) in edits {
        assert!(
            plan_text != plan || ptx_text != ptx,
            "{what}: the edit applies"
        );
        let bad = dir.path().join(what);
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("plan.json"), plan_text).unwrap();
        std::fs::write(bad.join("module.ptx"), ptx_text).unwrap();
        std::fs::copy(format!("{good}/summary.txt"), bad.join("summary.txt")).unwrap();
        let bad = bad.to_str().unwrap();
        for args in [
            &["inspect", bad][..],
            &["run", bad, "--steps", "1"],
            &["check", bad],
        ] {
            let out = fisherc(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{what}: {args:?} ran");
            assert!(!stderr.contains("panicked"), "{what}: {args:?}: {stderr}");
        }
    }
}

#[test]
fn a_model_of_billions_of_layers_is_refused_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let grown = |repeat: &str| {
        format!(
            "name = \"deep\"\ninput = [1, 8, 8]\nclasses = 3\nlayers = [\n  {{ op = \"relu\", repeat = {repeat} }},\n  {{ op = \"flatten\" }},\n  {{ op = \"linear\", out = 3 }},\n]\n"
        )
    };
    let path = dir.path().join("deep.toml");
    for (repeat, says) in [("4294967296", "repeat is 4294967296"), ("9000", "")] {
        std::fs::write(&path, grown(repeat)).unwrap();
        let out = fisherc(&["inspect", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if says.is_empty() {
            assert!(out.status.success(), "9000 layers build: {stderr}");
        } else {
            assert!(
                stderr.contains(says) && stderr.contains("deep.toml:5"),
                "{stderr}"
            );
        }
    }
    // blocks multiply: 100 uses of a block of 100 × 10 layers pass the node limit
    let nested = "name = \"nested\"\ninput = [1, 8, 8]\nclasses = 3\nlayers = [\n  { block = \"b\", repeat = 100 },\n  { op = \"flatten\" },\n  { op = \"linear\", out = 3 },\n]\n\n[blocks.b]\nlayers = [{ op = \"relu\", repeat = 1000 }]\n";
    std::fs::write(&path, nested).unwrap();
    let out = fisherc(&["inspect", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("grown past"), "{stderr}");
}

/// The experiment of the kill tests: shuffled, augmented and noisy, so that everything random
/// has to resume where it stopped.
const KILLED_EXPERIMENT: &str = r#"
name = "killed"
model = "models/small_cnn.toml"
input = [1, 12, 12]
[data]
set = "synthetic"
synthetic = { train = 160, test = 40, shape = [1, 12, 12], classes = 10, noise = 0.5 }
augment = { pad_crop = 1, flip = true }
[train]
regime = "lb-diagf"
batch = 40
small_batch = 20
epochs = 4
noise_until = 0.5
lr = 0.02
seed = 5
"#;

/// `fisherc train` of `config` in `run_dir`, resuming where the directory holds a run.
fn train_command(config: &str, run_dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fisherc"));
    command
        .args(["train", "--config", config, "--run-dir"])
        .arg(run_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if run_dir.join("experiment.toml").exists() {
        command.arg("--resume");
    }
    command
}

/// What a finished run leaves that must not depend on interruptions: the checkpoint's bytes,
/// and the metrics without their wall times.
fn run_result(run_dir: &std::path::Path) -> (Vec<u8>, Vec<serde_json::Value>) {
    let checkpoint = std::fs::read(run_dir.join("checkpoint.safetensors")).unwrap();
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let records = text
        .lines()
        .map(|line| {
            let mut record: serde_json::Value = serde_json::from_str(line).unwrap();
            let fields = record.as_object_mut().unwrap();
            fields.remove("seconds");
            fields.remove("images_per_second");
            record
        })
        .collect();
    (checkpoint, records)
}

/// Runs `command` and kills it (SIGKILL) after `delay` if it is still running; whether it
/// finished by itself, successfully.
fn run_or_kill(mut command: Command, delay: std::time::Duration) -> bool {
    let mut child = command.spawn().unwrap();
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(status.success(), "a resumed run failed: {err}");
            return true;
        }
        if started.elapsed() >= delay {
            child.kill().unwrap();
            child.wait().unwrap();
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[test]
fn runs_killed_at_random_moments_resume_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("killed.toml");
    std::fs::write(&config, KILLED_EXPERIMENT).unwrap();
    let config = config.to_str().unwrap();
    let straight = dir.path().join("straight");
    let started = std::time::Instant::now();
    assert!(run_or_kill(
        train_command(config, &straight),
        std::time::Duration::from_secs(600)
    ));
    let whole = started.elapsed();
    let expected = run_result(&straight);
    // kills at fixed pseudo-random moments, up to 62% of an uninterrupted run's time: while it
    // loads, compiles, trains, evaluates and writes its checkpoints and metrics
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut fraction = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        0.02 + 0.6 * (seed % 1000) as f64 / 1000.0
    };
    let mut kills = 0;
    for run in 0..4 {
        let run_dir = dir.path().join(format!("killed-{run}"));
        let mut finished = false;
        for _ in 0..5 {
            let delay = whole.mul_f64(fraction());
            finished = run_or_kill(train_command(config, &run_dir), delay);
            kills += !finished as usize;
            if finished {
                break;
            }
        }
        if !finished {
            let forever = std::time::Duration::from_secs(600);
            assert!(run_or_kill(train_command(config, &run_dir), forever));
        }
        assert!(
            run_result(&run_dir) == expected,
            "run {run}: a killed and resumed run ends otherwise"
        );
    }
    eprintln!("{kills} kills, each resumed");
    // each run's first try starts from nothing and is killed before an uninterrupted run's end
    assert!(kills >= 4, "only {kills} kills landed");
}

#[test]
fn a_kill_during_a_checkpoint_write_or_a_metrics_append_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("killed.toml");
    std::fs::write(&config, KILLED_EXPERIMENT).unwrap();
    let config = config.to_str().unwrap();
    let forever = std::time::Duration::from_secs(600);
    let straight = dir.path().join("straight");
    assert!(run_or_kill(train_command(config, &straight), forever));
    let expected = run_result(&straight);
    // a run stopped after 2 epochs, then left as a kill in the middle of writing epoch 3's
    // checkpoint (half of it in the temporary file, never renamed) and in the middle of a
    // record (half a line, no newline) leaves it
    let run_dir = dir.path().join("torn");
    let mut first = train_command(config, &run_dir);
    first.args(["--until-epoch", "2"]);
    assert!(run_or_kill(first, forever));
    let checkpoint = std::fs::read(run_dir.join("checkpoint.safetensors")).unwrap();
    std::fs::write(
        run_dir.join("checkpoint.safetensors.partial"),
        &expected.0[..expected.0.len() / 2],
    )
    .unwrap();
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(run_dir.join("metrics.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut metrics, br#"{"kind":"step","epoch":3,"step":9,"ba"#).unwrap();
    drop(metrics);
    assert_eq!(
        std::fs::read(run_dir.join("checkpoint.safetensors")).unwrap(),
        checkpoint
    );
    assert!(run_or_kill(train_command(config, &run_dir), forever));
    assert!(
        run_result(&run_dir) == expected,
        "the resumed run ends otherwise"
    );
}
