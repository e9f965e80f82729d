//! The daemon library's modules form layers: no module reaches, through any chain of `crate::`
//! paths, back to itself. A new import that closes a cycle fails this test, which names the
//! cycle. Between crates (protocol, daemon, harness, test kit) cargo itself refuses a cycle.
//!
//! The graph is read from the source, not the compiler: every `crate::name` (and every name in
//! a `crate::{a, b::c}` group) outside comments is an arrow from the file's top-level module
//! (`src/validate/jwt.rs` belongs to `validate`) to `name`. Doc comments are skipped, so a doc
//! link may point up a layer; code may not.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        // A directory with its own manifest is another crate (src/protocol/).
        if path.is_dir() && !path.join("Cargo.toml").exists() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to; `None` for the crate roots and binaries.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
    (!matches!(name.as_str(), "lib" | "main" | "bin")).then_some(name)
}

/// The file without comment lines (`//`, `//!`, `///`), so doc links are not arrows.
fn code_of(text: &str) -> String {
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The top-level names a piece of code reaches through `crate::`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Names at depth 1 of the group: after `{` and after each `,` at that depth.
            let (mut depth, mut expect_name) = (1, true);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 1 => break,
                    '}' => depth -= 1,
                    ',' if depth == 1 => expect_name = true,
                    c if expect_name && depth == 1 && !c.is_whitespace() => {
                        names.insert(ident_at(&group[i..]).to_owned());
                        expect_name = false;
                    }
                    _ => {}
                }
            }
        } else {
            names.insert(ident_at(rest).to_owned());
        }
    }
    names
}

fn module_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut graph: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for file in &files {
        let Some(from) = module_of(&src, file) else {
            continue;
        };
        let code = code_of(&fs::read_to_string(file).unwrap());
        for to in crate_paths(&code) {
            if to != from && modules.contains(&to) {
                graph.get_mut(&from).unwrap().insert(to);
            }
        }
    }
    graph
}

/// A cycle as `a -> b -> ... -> a`, if there is one (depth-first search with colours).
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in &graph[node] {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

#[test]
fn the_library_modules_have_no_import_cycle() {
    let graph = module_graph();
    // The reader sees the request path's arrows, so an empty graph cannot pass for a clean one.
    for (from, to) in [
        ("engine", "flight"),
        ("flight", "validate"),
        ("daemon", "config"),
    ] {
        assert!(
            graph[from].contains(to),
            "{from} -> {to} not seen: {graph:?}"
        );
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle between library modules: {}\n(move the shared item into the lower \
             module, or into a leaf module both can use)",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_reader_finds_grouped_and_nested_paths_and_skips_comments() {
    let code =
        code_of("use crate::{a::X, b, c::{d, e}};\n/// [`crate::doc`]\nlet x = crate::f::g();\n");
    assert_eq!(
        crate_paths(&code),
        ["a", "b", "c", "f"].map(String::from).into()
    );
    let mut graph = Graph::new();
    graph.insert("a".into(), ["b".into()].into());
    graph.insert("b".into(), ["c".into()].into());
    graph.insert("c".into(), BTreeSet::new());
    assert_eq!(find_cycle(&graph), None);
    graph.get_mut("c").unwrap().insert("a".into());
    assert_eq!(
        find_cycle(&graph),
        Some(["a", "b", "c", "a"].map(String::from).to_vec())
    );
}

/// The module map of `docs/architecture.md` ("Module map"): its layers, top first, as
/// `N  module, module ...  (what they are)` lines inside the fenced block after the heading.
fn documented_layers() -> BTreeMap<String, usize> {
    let doc =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
            .unwrap();
    let map = doc
        .split("\n## Module map\n")
        .nth(1)
        .expect("docs/architecture.md has a \"## Module map\" section");
    let block = map
        .split("```")
        .nth(1)
        .expect("a fenced block in the module map");
    let mut layers = BTreeMap::new();
    for line in block.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let (number, rest) = line.trim().split_once(' ').expect("`N  modules`");
        let layer: usize = number.parse().expect("a layer number first");
        let modules = rest.split("  (").next().unwrap();
        for module in modules.split(',').map(str::trim) {
            let before = layers.insert(module.to_owned(), layer);
            assert_eq!(before, None, "{module} is on two layers of the map");
        }
    }
    layers
}

#[test]
fn the_documented_module_map_is_the_code() {
    let (graph, layers) = (module_graph(), documented_layers());
    let listed: BTreeSet<&String> = layers.keys().collect();
    let modules: BTreeSet<&String> = graph.keys().collect();
    assert_eq!(
        listed, modules,
        "docs/architecture.md's module map must list every module of src/ once"
    );
    for (from, targets) in &graph {
        for to in targets {
            assert!(
                layers[to] < layers[from],
                "{from} (layer {}) imports {to} (layer {}): the module map in \
                 docs/architecture.md says it may not; move the item down or the map",
                layers[from],
                layers[to]
            );
        }
    }
}
