//! The shipped model files (parameter counts against PyTorch's) and malformed model files
//! (each error names the line and what is wrong).

use std::path::{Path, PathBuf};

use fisherc_ir::ModelError;
use fisherc_ir::model::{BuildOptions, ModelSpec, Network, Shortcut, build, load};

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn shipped(name: &str, shortcut: Option<Shortcut>) -> Network {
    let options = BuildOptions {
        shortcut,
        ..BuildOptions::train(2)
    };
    load(&models_dir().join(format!("{name}.toml")), &options).unwrap()
}

#[test]
fn parameter_counts_match_pytorch() {
    // the reference counts of the PyTorch models in ../shared/reference/torch_anchor.py
    assert_eq!(shipped("resnet44", None).param_count(), 661_338);
    assert_eq!(
        shipped("resnet44", Some(Shortcut::A)).param_count(),
        658_586
    );
    assert_eq!(shipped("vgg16", None).param_count(), 14_724_042);
    assert_eq!(shipped("resnet44x2", None).param_count(), 2_648_068);
    assert_eq!(shipped("resnet20", None).param_count(), 269_722);
}

#[test]
fn each_parameter_is_counted_on_one_layer_row() {
    // a projection shortcut's convolution and BN have rows of their own; the add does not
    // count them again
    for (name, shortcut) in [
        ("resnet44", None),
        ("resnet44", Some(Shortcut::A)),
        ("resnet20", None),
        ("vgg16", None),
    ] {
        let net = shipped(name, shortcut);
        let rows: usize = net.layers.iter().map(|l| l.params).sum();
        assert_eq!(rows, net.param_count(), "{name} {shortcut:?}");
        let adds = net.layers.iter().filter(|l| l.op == "add");
        assert!(adds.clone().count() > 0 || name == "vgg16");
        adds.for_each(|l| assert_eq!(l.params, 0, "{name} {}", l.name));
    }
}

#[test]
fn every_shipped_model_builds_with_its_default_and_alternative_inputs() {
    let mut names: Vec<String> = std::fs::read_dir(models_dir())
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            (path.extension()? == "toml")
                .then(|| path.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    assert!(names.len() >= 6, "models/ holds {names:?}");
    for name in &names {
        let net = shipped(name, None);
        assert_eq!(&net.name, name, "the file name and the model name agree");
        assert_eq!(net.graph.ty(net.logits).shape, [2, net.classes]);
    }
    for name in ["mlp", "small_cnn"] {
        for input in [[1, 28, 28], [3, 32, 32]] {
            let options = BuildOptions {
                input: Some(input),
                ..BuildOptions::train(2)
            };
            load(&models_dir().join(format!("{name}.toml")), &options).unwrap();
        }
    }
}

#[test]
fn resnet_layers_are_named_by_block_and_shortcuts_follow_the_option() {
    let b = shipped("resnet44", None);
    let names: Vec<&str> = b.layers.iter().map(|l| l.name.as_str()).collect();
    assert!(names.contains(&"basic8.conv1"), "{names:?}");
    assert!(names.contains(&"basic8.shortcut1.conv") && names.contains(&"basic8.shortcut1.bn"));
    assert_eq!(b.graph.op_counts()["conv2d"], 43 + 2);
    let a = shipped("resnet44", Some(Shortcut::A));
    assert_eq!(a.graph.op_counts()["shortcut_a"], 2);
    assert_eq!(a.graph.op_counts()["conv2d"], 43);
}

/// Parses `text` as a model file and instantiates it, expecting an error.
fn error_of(text: &str) -> ModelError {
    let path = Path::new("bad.toml");
    let result =
        ModelSpec::parse(text, path).and_then(|spec| build(&spec, &BuildOptions::train(2)));
    match result {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e,
    }
}

fn assert_error(text: &str, line: usize, fragments: &[&str]) {
    let err = error_of(text);
    let shown = err.to_string();
    assert_eq!(err.line, line, "{shown}");
    assert!(shown.starts_with(&format!("bad.toml:{line}: ")), "{shown}");
    for f in fragments {
        assert!(shown.contains(f), "'{f}' missing from: {shown}");
    }
}

const HEADER: &str = "name = \"bad\"\ninput = [3, 8, 8]\nclasses = 10\n";

#[test]
fn unknown_op() {
    let text = format!(
        "{HEADER}layers = [\n  {{ op = \"conv\", out = 4, kernel = 3 }},\n  {{ op = \"conv3d\", out = 4 }},\n]\n"
    );
    assert_error(&text, 6, &["unknown op 'conv3d'", "known ops: conv, bn"]);
}

#[test]
fn bad_shape() {
    // a linear layer straight after a convolution: no flatten
    let text = format!(
        "{HEADER}layers = [\n  {{ op = \"conv\", out = 4, kernel = 3 }},\n  {{ op = \"linear\", out = 10 }},\n]\n"
    );
    assert_error(
        &text,
        6,
        &[
            "layer 'linear1' (linear)",
            "expected [N, features], found f32[2, 4, 6, 6]",
            "flatten",
        ],
    );
}

#[test]
fn kernel_larger_than_its_input() {
    let text = format!(
        "{HEADER}layers = [\n  {{ op = \"conv\", out = 4, kernel = 9 }},\n  {{ op = \"avgpool\" }},\n  {{ op = \"linear\", out = 10 }},\n]\n"
    );
    assert_error(
        &text,
        5,
        &["layer 'conv1' (conv2d)", "smaller than the 9×9 kernel"],
    );
}

#[test]
fn residual_add_of_mismatched_shapes_without_a_shortcut_option() {
    let text = format!(
        "{HEADER}layers = [\n  {{ block = \"down\" }},\n  {{ op = \"avgpool\" }},\n  {{ op = \"linear\", out = 10 }},\n]\n\n[blocks.down]\nlayers = [\n  {{ op = \"conv\", out = 8, kernel = 3, stride = 2, padding = 1 }},\n  {{ op = \"add\", from = \"input\" }},\n]\n"
    );
    assert_error(
        &text,
        13,
        &[
            "adds f32[2, 3, 8, 8] to f32[2, 8, 4, 4]",
            "no `shortcut`",
            "in block 'down' used at line 5",
        ],
    );
}

#[test]
fn missing_block() {
    let text = format!(
        "{HEADER}layers = [\n  {{ op = \"conv\", out = 4, kernel = 3 }},\n  {{ block = \"residual\", width = 4 }},\n]\n\n[blocks.basic]\nlayers = []\n"
    );
    assert_error(
        &text,
        6,
        &["block 'residual' is not defined", "defined blocks: basic"],
    );
}

#[test]
fn cycle_between_blocks() {
    let text = format!(
        "{HEADER}layers = [\n  {{ block = \"a\" }},\n]\n\n[blocks.a]\nlayers = [\n  {{ op = \"relu\" }},\n  {{ block = \"b\" }},\n]\n\n[blocks.b]\nlayers = [\n  {{ block = \"a\" }},\n]\n"
    );
    assert_error(
        &text,
        16,
        &[
            "block 'a' uses itself: a → b → a",
            "in block 'b' used at line 11",
        ],
    );
}

#[test]
fn unknown_key_is_named_with_the_keys_the_op_takes() {
    let text = format!("{HEADER}layers = [\n  {{ op = \"conv\", out = 4, kernal = 3 }},\n]\n");
    assert_error(&text, 5, &["unknown key 'kernal' for op 'conv'", "kernel"]);
}

#[test]
fn missing_required_key() {
    let text = format!("{HEADER}layers = [\n  {{ op = \"conv\", kernel = 3 }},\n]\n");
    assert_error(&text, 5, &["op 'conv' needs 'out'"]);
}

#[test]
fn undefined_variable() {
    let text = format!(
        "{HEADER}layers = [\n  {{ block = \"b\", width = 4 }},\n]\n\n[blocks.b]\nparams = [\"width\"]\nlayers = [\n  {{ op = \"conv\", out = \"$widht\", kernel = 3 }},\n]\n"
    );
    assert_error(&text, 11, &["'$widht' is not defined here", "width"]);
}

#[test]
fn block_argument_that_is_not_a_parameter() {
    let text = format!(
        "{HEADER}layers = [\n  {{ block = \"b\", widht = 4 }},\n]\n\n[blocks.b]\nparams = [\"width\"]\nlayers = []\n"
    );
    assert_error(
        &text,
        5,
        &["block 'b' has no parameter 'widht'", "parameters: width"],
    );
}

#[test]
fn block_parameter_without_value_or_default() {
    let text = format!(
        "{HEADER}layers = [\n  {{ block = \"b\" }},\n]\n\n[blocks.b]\nparams = [\"width\"]\nlayers = []\n"
    );
    assert_error(&text, 5, &["block 'b' needs 'width'"]);
}

#[test]
fn toml_syntax_error_points_at_its_line() {
    let text = format!("{HEADER}layers = [\n  {{ op = \"relu\" \n]\n");
    let err = error_of(&text);
    assert!(err.line >= 5, "{err}");
}

#[test]
fn unknown_top_level_key() {
    let text = format!("{HEADER}shortcutt = \"A\"\nlayers = []\n");
    assert_error(&text, 4, &["shortcutt"]);
}

#[test]
fn bad_input_shape() {
    let text = "name = \"bad\"\nclasses = 10\ninput = [3, 32]\nlayers = []\n";
    assert_error(text, 3, &["input must be [channels, height, width]"]);
}

#[test]
fn unknown_shortcut_option() {
    let text = format!("{HEADER}shortcut = \"C\"\nlayers = []\n");
    assert_error(&text, 4, &["unknown shortcut 'C'"]);
}

#[test]
fn output_that_does_not_match_the_classes() {
    let text = format!(
        "{HEADER}layers = [\n  {{ op = \"avgpool\" }},\n  {{ op = \"linear\", out = 7 }},\n]\n"
    );
    assert_error(&text, 6, &["the model's output is f32[2, 7]", "f32[2, 10]"]);
}

#[test]
fn add_from_an_unknown_layer() {
    let text = format!(
        "{HEADER}layers = [\n  {{ op = \"relu\", name = \"r\" }},\n  {{ op = \"add\", from = \"q\" }},\n]\n"
    );
    assert_error(
        &text,
        6,
        &["'from = \"q\"' names no earlier layer", "input, r"],
    );
}

#[test]
fn unreadable_file_is_an_error_not_a_panic() {
    let err = ModelSpec::load(Path::new("/nonexistent/model.toml")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("/nonexistent/model.toml: the model file: cannot read"),
        "no line is to blame: {err}"
    );
}

#[test]
fn a_layer_name_used_twice() {
    let text = format!(
        "{HEADER}layers = [\n  {{ op = \"relu\", name = \"act\" }},\n  {{ op = \"relu\", name = \"act\" }},\n]\n"
    );
    assert_error(&text, 6, &["the layer name 'act' is used twice"]);
}

#[test]
fn a_default_for_a_parameter_the_block_does_not_have() {
    let text = format!(
        "{HEADER}layers = [\n  {{ block = \"b\", width = 4 }},\n]\n\n[blocks.b]\nparams = [\"width\"]\ndefaults = {{ strid = 1 }}\nlayers = []\n"
    );
    assert_error(&text, 8, &["block 'b': a default for 'strid'"]);
}

#[test]
fn absurd_sizes_are_errors_not_overflows() {
    let text =
        format!("{HEADER}layers = [\n  {{ op = \"conv\", out = 4000000000000, kernel = 3 }},\n]\n");
    assert_error(&text, 5, &["layer 'conv1'", "more than 2^40 elements"]);
    let err = error_of(
        "name = \"bad\"\ninput = [3000000, 3000000, 3000000]\nclasses = 10\nlayers = []\n",
    );
    assert!(err.to_string().contains("more than 2^40 elements"), "{err}");
}
