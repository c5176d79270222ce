//! The top-level modules of `agent/src` import one another one way only: this test reads
//! every source file (test code included), collects the `crate::<module>` references of each
//! top-level module (`use crate::a::b`, `use crate::{a, b}`, `crate::a::f()` in code, and
//! `super::` chains that climb to the crate root), and fails on a cycle, naming the edges that
//! form it and the files behind each edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Edges between top-level modules, each with the files that make it.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

/// The top-level modules: `src/<m>.rs` and `src/<m>/`, without the crate roots.
fn modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if e.path().is_dir() {
                Some(name)
            } else {
                name.strip_suffix(".rs").filter(|n| *n != "lib" && *n != "main").map(str::to_string)
            }
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without `//` comments (doc links are not imports).
fn strip_comments(text: &str) -> String {
    text.lines().map(|line| line.split_once("//").map_or(line, |(code, _)| code)).collect::<Vec<_>>().join("\n")
}

/// The top-level modules `code` refers to, in a file `depth` modules below the crate root.
fn references(code: &str, depth: usize, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut found = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        if i > 0 && code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c, d::{e, f}}`: the first segment of each top-level item.
            let (mut nesting, mut start) = (0, true);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => nesting += 1,
                    '}' if nesting == 0 => break,
                    '}' => nesting -= 1,
                    ',' if nesting == 0 => start = true,
                    c if start && (c.is_alphanumeric() || c == '_') => {
                        found.insert(ident(&group[j..]));
                        start = false;
                    }
                    c if !c.is_whitespace() => start = false,
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    // `super::super::x` from `a/b/c.rs` (depth 3) is `crate::a::x`; only chains that reach
    // the root name a top-level module.
    for (i, _) in code.match_indices("super::") {
        if i > 0 && code[..i].ends_with("::") {
            continue;
        }
        let mut rest = &code[i..];
        let mut climbs = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            climbs += 1;
            rest = r;
        }
        if climbs >= depth {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| modules.contains(m));
    found
}

/// The module graph of the crate whose sources are in `src`.
fn graph(src: &Path) -> Graph {
    let modules = modules(src);
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        let top = parts[0].trim_end_matches(".rs").to_string();
        if !modules.contains(&top) {
            continue;
        }
        // `a.rs` and `a/mod.rs` are at depth 1, `a/b.rs` at depth 2.
        let depth = parts.len() - usize::from(parts.last().is_some_and(|p| p == "mod.rs"));
        let code = strip_comments(&std::fs::read_to_string(&file).unwrap());
        for target in references(&code, depth, &modules) {
            if target != top {
                graph.entry(top.clone()).or_default().entry(target).or_default().insert(rel.display().to_string());
            }
        }
    }
    graph
}

/// A cycle, as the edges that form it with the files behind each; `None` when there is none.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(node: &str, graph: &Graph, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(|edges| edges.keys()) {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut Vec::new(), &mut done) {
            let edges = cycle
                .windows(2)
                .map(|w| {
                    let files: Vec<_> = graph[&w[0]][&w[1]].iter().cloned().collect();
                    format!("{} -> {} ({})", w[0], w[1], files.join(", "))
                })
                .collect();
            return Some(edges);
        }
    }
    None
}

#[test]
fn top_level_modules_import_one_another_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&src);
    assert!(graph.contains_key("agent") && graph["agent"].contains_key("pipeline"), "the graph is read: {graph:?}");
    if let Some(edges) = find_cycle(&graph) {
        panic!("import cycle between top-level modules:\n  {}", edges.join("\n  "));
    }
}

#[test]
fn a_cycle_is_found_and_reported_with_its_edges() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\npub mod c;\n").unwrap();
    std::fs::write(src.join("a.rs"), "use crate::b::Thing;\n// crate::c in a comment is no import\n").unwrap();
    std::fs::create_dir(src.join("b")).unwrap();
    std::fs::write(src.join("b/mod.rs"), "pub mod inner;\npub struct Thing;\n").unwrap();
    std::fs::write(src.join("b/inner.rs"), "use crate::{c::{self, D}, b};\n").unwrap();
    std::fs::write(src.join("c.rs"), "pub struct D;\nfn f() { super::a::g() }\n").unwrap();
    let cyclic = graph(src);
    let cycle = find_cycle(&cyclic).expect("a -> b -> c -> a is a cycle");
    assert_eq!(cycle, ["a -> b (a.rs)", "b -> c (b/inner.rs)", "c -> a (c.rs)"]);

    // Without the edge back, no cycle; the comment made no edge.
    std::fs::write(src.join("c.rs"), "pub struct D;\n").unwrap();
    let acyclic = graph(src);
    assert_eq!(find_cycle(&acyclic), None);
    assert!(!acyclic["a"].contains_key("c"), "{acyclic:?}");
}
