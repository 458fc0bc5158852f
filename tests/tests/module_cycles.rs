//! No import cycles between the modules of any crate: a module may use its ancestors' items,
//! but siblings (at every level) must form a DAG. Reads every workspace crate's sources and
//! resolves `crate::…`, `super::…` and `self::…` paths (in `use` trees and in code) to the
//! modules they name; a cycle fails with the imports that close it (docs/architecture.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tests::repo_root;

/// Source roots (`src/` folders) of every library and binary crate in the workspace.
const CRATE_SOURCES: &[&str] = &[
    "vmm/core/src",
    "vmm/api/src",
    "vmm/fc-api/src",
    "vmm/sandbox/src",
    "vmm/bench/src",
    "vmm/jail/src",
    "vmm/cli/src",
    "vmm/metrics/src",
    "devices/src",
    "devices/bench-support/src",
    "snapshot/src",
    "snapshot/store/src",
    "agent/proto/src",
    "agent/client/src",
    "agent/guest/src",
    "tests/src",
];

type ModPath = Vec<String>;

/// Module path of each source file under `src` (`a/b.rs` and `a/b/mod.rs` are `a::b`; the crate
/// roots are the empty path).
fn modules(src: &Path) -> BTreeMap<ModPath, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: ModPath = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            // Binaries beside a library (`src/bin/x.rs`) are crates of their own.
            if parts.first().is_some_and(|p| p == "bin") {
                continue;
            }
            // `lib.rs` and `main.rs` side by side are both the root: read both.
            let text = std::fs::read_to_string(&path).unwrap();
            out.entry(parts)
                .or_insert_with(String::new)
                .push_str(&strip_comments(&text));
        }
    }
    out
}

/// The source without `//` comments (doc comments mention paths that are not imports).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path a `use` tree names: `a::{b, c::{d, e as f}}` → `a::b`, `a::c::d`, `a::c::e`.
fn use_tree_paths(tree: &str) -> Vec<Vec<String>> {
    fn parse(chars: &[char], at: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut segments = prefix.to_vec();
        loop {
            while *at < chars.len() && chars[*at].is_whitespace() {
                *at += 1;
            }
            if *at >= chars.len() {
                out.push(segments);
                return;
            }
            if chars[*at] == '{' {
                *at += 1;
                loop {
                    parse(chars, at, &segments, out);
                    while *at < chars.len() && chars[*at].is_whitespace() {
                        *at += 1;
                    }
                    match chars.get(*at) {
                        Some(',') => {
                            *at += 1;
                            while *at < chars.len() && chars[*at].is_whitespace() {
                                *at += 1;
                            }
                            if chars.get(*at) == Some(&'}') {
                                *at += 1;
                                return;
                            }
                        }
                        Some('}') => {
                            *at += 1;
                            return;
                        }
                        _ => return,
                    }
                }
            }
            let start = *at;
            while *at < chars.len()
                && (chars[*at].is_alphanumeric() || chars[*at] == '_' || chars[*at] == '*')
            {
                *at += 1;
            }
            if start == *at {
                out.push(segments);
                return;
            }
            segments.push(chars[start..*at].iter().collect());
            if chars.get(*at) == Some(&':') && chars.get(*at + 1) == Some(&':') {
                *at += 2;
                continue;
            }
            // `as alias`: skip it.
            let rest: String = chars[*at..].iter().take(4).collect();
            if rest.trim_start().starts_with("as ") {
                while *at < chars.len() && chars[*at].is_whitespace() {
                    *at += 1;
                }
                *at += 2;
                while *at < chars.len() && chars[*at].is_whitespace() {
                    *at += 1;
                }
                while *at < chars.len() && (chars[*at].is_alphanumeric() || chars[*at] == '_') {
                    *at += 1;
                }
            }
            out.push(segments);
            return;
        }
    }
    let chars: Vec<char> = tree.chars().collect();
    let mut out = Vec::new();
    parse(&chars, &mut 0, &[], &mut out);
    out
}

/// The relative paths (`crate::…`, `super::…`, `self::…`) a module's source names.
fn named_paths(text: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    // `use` items (possibly `pub use`), up to their `;`.
    let mut rest = text;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        rest = &rest[at + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(end) = rest.find(';') {
            paths.extend(use_tree_paths(&rest[..end]));
        }
    }
    // Paths in code: `crate::a::b`, `super::x`, `self::y`.
    let bytes = text.as_bytes();
    for keyword in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(found) = text[from..].find(keyword) {
            let start = from + found;
            from = start + keyword.len();
            if start > 0
                && (bytes[start - 1].is_ascii_alphanumeric()
                    || bytes[start - 1] == b'_'
                    || bytes[start - 1] == b':')
            {
                continue;
            }
            let mut end = start;
            while end < bytes.len()
                && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':')
            {
                end += 1;
            }
            paths.push(
                text[start..end]
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
            );
        }
    }
    paths
}

/// Sibling edges (at the level where two modules' paths part) and the imports behind each.
fn sibling_edges(
    mods: &BTreeMap<ModPath, String>,
) -> BTreeMap<(ModPath, ModPath), BTreeSet<String>> {
    let known: BTreeSet<&ModPath> = mods.keys().collect();
    let resolve = |path: &[String]| -> ModPath {
        (1..=path.len())
            .rev()
            .map(|k| path[..k].to_vec())
            .find(|p| known.contains(p))
            .unwrap_or_default()
    };
    let mut edges: BTreeMap<(ModPath, ModPath), BTreeSet<String>> = BTreeMap::new();
    for (module, text) in mods {
        for path in named_paths(text) {
            let Some(first) = path.first() else { continue };
            let absolute: ModPath = match first.as_str() {
                "crate" => path[1..].to_vec(),
                "super" => {
                    let mut base = module.clone();
                    let mut rest = &path[..];
                    while rest.first().is_some_and(|s| s == "super") {
                        base.pop();
                        rest = &rest[1..];
                    }
                    base.extend(rest.iter().cloned());
                    base
                }
                "self" => module.iter().chain(&path[1..]).cloned().collect(),
                _ => continue,
            };
            let target = resolve(&absolute);
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if common < module.len() && common < target.len() {
                let from = module[..=common].to_vec();
                let to = target[..=common].to_vec();
                edges.entry((from, to)).or_default().insert(format!(
                    "{} -> {}",
                    module.join("::"),
                    target.join("::")
                ));
            }
        }
    }
    edges
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(edges: &BTreeMap<(ModPath, ModPath), BTreeSet<String>>) -> Vec<Vec<ModPath>> {
    let mut graph: BTreeMap<&ModPath, Vec<&ModPath>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        graph.entry(from).or_default().push(to);
        graph.entry(to).or_default();
    }
    struct Tarjan<'a> {
        graph: &'a BTreeMap<&'a ModPath, Vec<&'a ModPath>>,
        index: BTreeMap<&'a ModPath, usize>,
        low: BTreeMap<&'a ModPath, usize>,
        stack: Vec<&'a ModPath>,
        on_stack: BTreeSet<&'a ModPath>,
        found: Vec<Vec<ModPath>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a ModPath) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for &w in &self.graph[v] {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.clone());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    self.found.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph: &graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.found
}

fn crate_cycles(src: &Path) -> Vec<String> {
    let mods = modules(src);
    let edges = sibling_edges(&mods);
    cycles(&edges)
        .into_iter()
        .map(|component| {
            let members: BTreeSet<&ModPath> = component.iter().collect();
            let imports: Vec<&String> = edges
                .iter()
                .filter(|((a, b), _)| members.contains(a) && members.contains(b))
                .flat_map(|(_, why)| why)
                .collect();
            format!(
                "{}: modules {:?} import each other: {imports:?}",
                src.display(),
                component.iter().map(|m| m.join("::")).collect::<Vec<_>>()
            )
        })
        .collect()
}

#[test]
fn no_crate_has_a_module_cycle() {
    let root = repo_root();
    let mut problems = Vec::new();
    for src in CRATE_SOURCES {
        let dir: PathBuf = root.join(src);
        assert!(
            dir.is_dir(),
            "{} is not a crate's source folder",
            dir.display()
        );
        problems.extend(crate_cycles(&dir));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The checker finds what it must: a two-module cycle through a grouped `use`, one through a
/// path in code, and one between nested siblings through `super::`; a child using its parent
/// is not a cycle.
#[test]
fn the_checker_sees_cycles_of_every_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let write = |rel: &str, text: &str| {
        let path = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("lib.rs", "mod a; mod b; mod c; mod d;\nuse crate::a::A;\n");
    write("a.rs", "use crate::{b::{self, B}, c};\npub struct A;\n");
    write("b.rs", "// crate::a::A in a comment is not an import\npub struct B;\nfn f() { let _ = crate::a::A; }\n");
    write("c.rs", "pub struct C;\nfn g() -> super::a::A { todo!() }\n");
    write("d/mod.rs", "mod x; mod y;\npub struct D;\n");
    write("d/x.rs", "use super::y::Y;\nuse super::D;\npub struct X;\n");
    write(
        "d/y.rs",
        "pub struct Y;\nfn h() { let _ = self::Y; let _ = super::x::X; }\n",
    );
    let found = crate_cycles(dir.path());
    assert_eq!(found.len(), 2, "{found:#?}");
    let all = found.join("\n");
    assert!(
        all.contains("\"a\"") && all.contains("\"b\"") && all.contains("\"c\""),
        "{all}"
    );
    assert!(
        all.contains("d::x -> d::y") && all.contains("d::y -> d::x"),
        "{all}"
    );
    assert!(!all.contains("d::x -> d\""), "{all}");

    // Without the back edges: no cycle.
    write("b.rs", "pub struct B;\n");
    write("c.rs", "pub struct C;\n");
    write("d/y.rs", "pub struct Y;\n");
    assert!(crate_cycles(dir.path()).is_empty());
}
