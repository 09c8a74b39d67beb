//! Rules of the design that the sources must keep, read from the sources themselves so that a
//! change breaking one fails here: in each library crate (ir, codegen, runtime) no module
//! imports (through `crate::`) a module that imports it back, directly or through others; and
//! no public function of theirs returns its errors as a `String`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// Top-level module → the top-level modules its files name through `crate::`.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("readable source directory") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src");
            let first = relative.components().next().expect("a component");
            let module = first
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if module == "lib" || path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = fs::read_to_string(&path).expect("readable source file");
            // unit tests (at the end of a file) may use any module
            let code = text.split("#[cfg(test)]").next().unwrap_or(&text);
            let named = graph.entry(module.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if name != module && !name.is_empty() {
                    named.insert(name);
                }
            }
        }
    }
    graph
}

/// A path `from → … → from` through the graph, if there is one.
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![from.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().expect("non-empty path");
        for next in graph.get(last).into_iter().flatten() {
            if next == from {
                return Some([path.clone(), vec![next.clone()]].concat());
            }
            if seen.insert(next.clone()) {
                stack.push([path.clone(), vec![next.clone()]].concat());
            }
        }
    }
    None
}

const LIBRARIES: [&str; 3] = ["ir", "codegen", "runtime"];

fn source_dir(library: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(library)
        .join("src")
}

#[test]
fn no_module_imports_itself_through_others() {
    for library in LIBRARIES {
        let graph = imports(&source_dir(library));
        assert!(graph.len() > 5, "{library}: modules read");
        let cycles: Vec<String> = graph
            .keys()
            .filter_map(|m| cycle_through(&graph, m))
            .map(|path| path.join(" → "))
            .collect();
        assert!(
            cycles.is_empty(),
            "{library}: import cycles:\n{}",
            cycles.join("\n")
        );
    }
    let ir = imports(&source_dir("ir"));
    assert!(ir["step"].contains("autodiff"), "the reader sees imports");
}

/// `file:line: fn name` of every public function (outside tests) whose result's error type is
/// `String`, and of every `FromStr` whose `Err` is.
fn string_errors(text: &str, file: &str) -> Vec<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut found = Vec::new();
    for (start, _) in code.match_indices("pub fn ") {
        let signature = &code[start..];
        let end = signature.find(['{', ';']).unwrap_or(signature.len());
        let signature: String = signature[..end]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let returns_string_error = signature
            .split_once("->")
            .is_some_and(|(_, result)| result.trim_end().ends_with(", String>"));
        if returns_string_error {
            let line = code[..start].lines().count() + 1;
            found.push(format!("{file}:{line}: {signature}"));
        }
    }
    for (start, _) in code.match_indices("type Err = String") {
        let line = code[..start].lines().count() + 1;
        found.push(format!("{file}:{line}: FromStr with String errors"));
    }
    found
}

#[test]
fn no_public_function_returns_string_errors() {
    let example = "pub fn parse(\n    text: &str,\n) -> Result<Vec<u8>, String> {}";
    assert_eq!(
        string_errors(example, "x.rs").len(),
        1,
        "the reader finds one"
    );
    let mut found = Vec::new();
    for library in LIBRARIES {
        let mut stack = vec![source_dir(library)];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).expect("readable source directory") {
                let path = entry.expect("directory entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = fs::read_to_string(&path).expect("readable source file");
                    found.extend(string_errors(&text, &path.display().to_string()));
                }
            }
        }
    }
    assert!(found.is_empty(), "errors as strings:\n{}", found.join("\n"));
}
