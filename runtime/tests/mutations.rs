//! Damaged inputs of every kind fisherc reads, made by mutating good ones with a fixed seed:
//! model files, experiment files and overrides, plan.json, checkpoints and IDX data headers.
//! Each is read (and, where it reads, built on) inside `catch_unwind`: every case must end in a
//! value or an error, never a panic, and an error must say something.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use fisherc_codegen::artifact::Artifact;
use fisherc_codegen::compile::CompileOptions;
use fisherc_ir::model::{BuildOptions, ModelSpec, build};
use fisherc_ir::{StepOptions, build_training_step};
use fisherc_runtime::train::checkpoint::{self, Checkpoint};
use fisherc_runtime::train::experiment::Experiment;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// xorshift64*: the mutations' only randomness, seeded.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Values a number or a word in a text is replaced by.
const ODD_VALUES: [&str; 14] = [
    "0",
    "-1",
    "1",
    "3",
    "65536",
    "4294967296",
    "18446744073709551615",
    "1e30",
    "-0.5",
    "nan",
    "inf",
    "\"x\"",
    "[]",
    "{}",
];

/// `text` with one mutation: a line deleted or repeated, a number or word replaced, the text
/// cut short, or a character inserted.
fn mutate_text(text: &str, rng: &mut Rng) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let line = rng.below(lines.len());
    match rng.below(5) {
        0 => {
            let mut out = lines.clone();
            out.remove(line);
            out.join("\n")
        }
        1 => {
            let mut out = lines.clone();
            out.insert(line, lines[line]);
            out.join("\n")
        }
        2 => {
            // a token (digits, or a word) of one line replaced
            let tokens: Vec<(usize, usize)> = token_spans(lines[line]);
            if tokens.is_empty() {
                return text[..rng.below(text.len())].to_string();
            }
            let (start, end) = *rng.pick(&tokens);
            let mut out = lines.clone();
            let changed = format!(
                "{}{}{}",
                &lines[line][..start],
                rng.pick(&ODD_VALUES),
                &lines[line][end..]
            );
            out[line] = &changed;
            out.join("\n")
        }
        3 => {
            let mut at = rng.below(text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            text[..at].to_string()
        }
        _ => {
            let mut at = rng.below(text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let c = *rng.pick(&['[', ']', '{', '}', '"', '=', ',', '\n', '0', '-']);
            format!("{}{c}{}", &text[..at], &text[at..])
        }
    }
}

/// Spans of digit runs and of identifier-like words in `line`.
fn token_spans(line: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'.';
        if word(bytes[i]) {
            let start = i;
            while i < bytes.len() && word(bytes[i]) {
                i += 1;
            }
            spans.push((start, i));
        } else {
            i += 1;
        }
    }
    spans
}

/// Runs `case` for each of `count` mutations of `text`; every panic is collected with the
/// input that caused it.
fn no_panics<R>(
    what: &str,
    text: &str,
    count: usize,
    seed: u64,
    case: impl Fn(&str) -> Result<R, String>,
) {
    let mut rng = Rng(seed);
    let mut panics = Vec::new();
    for _ in 0..count {
        let input = mutate_text(text, &mut rng);
        match catch_unwind(AssertUnwindSafe(|| case(&input))) {
            Ok(Err(message)) => assert!(!message.trim().is_empty(), "{what}: an empty error"),
            Ok(Ok(_)) => {}
            Err(_) => panics.push(input),
        }
    }
    assert!(
        panics.is_empty(),
        "{what}: {} of {count} inputs panicked; the first:\n{}",
        panics.len(),
        panics[0]
    );
}

#[test]
fn mutated_model_files_build_or_fail_with_an_error() {
    for (i, model) in ["small_cnn", "resnet20", "vgg16", "mlp"].iter().enumerate() {
        let path = root().join(format!("models/{model}.toml"));
        let text = std::fs::read_to_string(&path).unwrap();
        no_panics(model, &text, 150, 17 + i as u64, |text| {
            let spec = ModelSpec::parse(text, &path).map_err(|e| e.to_string())?;
            let options = BuildOptions {
                input: Some([spec.input[0].min(3), 8, 8]),
                ..BuildOptions::train(2)
            };
            let network = build(&spec, &options).map_err(|e| e.to_string())?;
            build_training_step(network, &StepOptions::new(fisherc_ir::FisherMode::Exact))
                .map_err(|e| e.to_string())
        });
    }
}

#[test]
fn mutated_experiment_files_and_overrides_read_or_fail_with_an_error() {
    let path = root().join("experiments/fashion_small_cnn_sb.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    no_panics("experiment", &text, 300, 5, |text| {
        Experiment::parse(text, &[]).map_err(|e| e.to_string())
    });
    let keys = [
        "train.lr",
        "train.batch",
        "train.epochs",
        "data.train_subset",
        "train.momentum",
        "compile.stages",
        "compile.tensor_cores",
        "train.regime",
        "eval.bn_batches",
        "data.augment.pad_crop",
    ];
    let mut rng = Rng(11);
    for _ in 0..200 {
        let set = format!("{}={}", rng.pick(&keys), rng.pick(&ODD_VALUES));
        let result =
            catch_unwind(|| Experiment::parse(&text, std::slice::from_ref(&set)).map(|_| ()));
        assert!(result.is_ok(), "--set {set} panicked");
    }
}

#[test]
fn mutated_plans_read_or_fail_with_an_error() {
    let path = root().join("models/small_cnn.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let network = fisherc_ir::model::load(
        &path,
        &BuildOptions {
            input: Some([1, 12, 12]),
            ..BuildOptions::train(4)
        },
    )
    .unwrap();
    let step =
        build_training_step(network, &StepOptions::new(fisherc_ir::FisherMode::Exact)).unwrap();
    let verified =
        fisherc_codegen::artifact::compile_step(&step, (&path, text), CompileOptions::default())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    verified.artifact().write(dir.path()).unwrap();
    let plan = std::fs::read_to_string(dir.path().join("plan.json")).unwrap();
    no_panics("plan.json", &plan, 300, 23, |text| {
        std::fs::write(dir.path().join("plan.json"), text).unwrap();
        let artifact = Artifact::read(dir.path()).map_err(|e| e.to_string())?;
        artifact.verify().map(|_| ()).map_err(|e| e.to_string())
    });
}

#[test]
fn mutated_checkpoints_and_data_headers_fail_with_an_error() {
    let path = root().join("models/small_cnn.toml");
    let net = fisherc_ir::model::load(
        &path,
        &BuildOptions {
            input: Some([1, 12, 12]),
            ..BuildOptions::train(4)
        },
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("checkpoint.safetensors");
    let good = Checkpoint {
        state: fisherc_ir::state::TrainState::init(&net, 1),
        kfac: Default::default(),
        epoch: 1,
        step: 10,
        experiment: "name = \"x\"".into(),
        model: None,
    };
    checkpoint::write(&file, &net, &good).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut rng = Rng(31);
    let mut panics = 0;
    for _ in 0..300 {
        let mut bad = bytes.clone();
        match rng.below(3) {
            // a byte of the length or the header
            0 => {
                let at = rng.below(8 + header);
                bad[at] = rng.next() as u8;
            }
            1 => bad.truncate(rng.below(bytes.len())),
            _ => {
                let at = 8 + rng.below(header);
                bad.splice(
                    at..at,
                    rng.pick(&[&b"1"[..], b"\"", b"9999999999", b"-"])
                        .iter()
                        .copied(),
                );
            }
        }
        std::fs::write(&file, &bad).unwrap();
        panics += catch_unwind(|| checkpoint::read(&file, &net).map(|_| ())).is_err() as usize;
    }
    assert_eq!(panics, 0, "checkpoints that panicked the reader");

    // IDX files: every header field at odd values
    let data = tempfile::tempdir().unwrap();
    let idx = |dims: &[u32], kind: u8, body: usize| {
        let mut out = vec![0, 0, kind, dims.len() as u8];
        for d in dims {
            out.extend(d.to_be_bytes());
        }
        out.extend(vec![1u8; body]);
        out
    };
    let odd = [0u32, 1, 2, 28, 60000, u32::MAX];
    let mut rng = Rng(37);
    for _ in 0..200 {
        let images = [*rng.pick(&odd), *rng.pick(&odd), *rng.pick(&odd)];
        let labels = [*rng.pick(&odd)];
        let kind = *rng.pick(&[8u8, 9, 0x0d]);
        let body = rng.below(4096);
        std::fs::write(
            data.path().join("t-images-idx3-ubyte"),
            idx(&images, kind, body),
        )
        .unwrap();
        std::fs::write(
            data.path().join("t-labels-idx1-ubyte"),
            idx(&labels, 8, body / 64),
        )
        .unwrap();
        let read = catch_unwind(|| {
            fisherc_runtime::data::idx::load_pair(data.path(), "t", 10, "t").map(|_| ())
        });
        assert!(
            read.is_ok(),
            "idx {images:?} {labels:?} kind {kind} body {body} panicked"
        );
    }
}
