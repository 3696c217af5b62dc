//! The crate's layering, checked on its source: the import rules of
//! `docs/ARCHITECTURE.md` hold for every `crate::`/`super::` path in `src/`.
//!
//! - The top-level modules form layers, and a module names only modules of lower
//!   layers (or itself): `error` < `io` < `config`, `quant` < `format`, `backend` <
//!   `model` < `compress`, `pipeline`, `ffi`. So `format` and `quant` know nothing of backends,
//!   backends nothing of models, and nothing in the library names the CLI.
//! - Outside `src/backend/cpu/`, the library names `backend::cpu` only in
//!   `src/backend/mod.rs` (which re-exports the CPU backend's types).
//! - Inside each module, the files (`mod.rs` aside, which only declares and re-exports)
//!   import each other without cycles.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layer of each top-level module of the library; a module may import lower layers.
const LAYERS: &[(&str, u32)] = &[
    ("error", 0),
    ("io", 1),
    ("config", 2),
    ("quant", 2),
    ("format", 3),
    ("backend", 3),
    ("model", 4),
    ("compress", 5),
    ("pipeline", 5),
    ("ffi", 5),
];

fn layer(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|&(_, l)| l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a library file: `src/model/mmdit.rs` -> `["model", "mmdit"]`,
/// `src/backend/cpu/gemv/mod.rs` -> `["backend", "cpu", "gemv"]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The code of a file without comments (line comments only: the crate has no block
/// comments) and without string literals' contents.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut kept = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !in_str && c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' && !(prev == '\'' && chars.get(i + 1) == Some(&'\'')) {
                in_str = !in_str;
            }
            if !in_str {
                kept.push(c);
            }
            prev = c;
            i += 1;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

/// Every module path a file names through `crate::` or `super::`, expanded to the
/// paths inside a `{...}` group: `use crate::model::{layers::X, memory::Y}` names
/// `model::layers::X` and `model::memory::Y`.
fn named_paths(module: &[String], text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(pos) = text[from..].find(start) {
            let at = from + pos;
            from = at + start.len();
            // A whole word only (not `hiprune_crate::`).
            if at > 0 {
                let before = text[..at].chars().last().unwrap();
                if before.is_alphanumeric() || before == '_' {
                    continue;
                }
            }
            let mut base: Vec<String> = if start == "crate::" {
                Vec::new()
            } else {
                // `super` of module `a::b` (`a/b.rs` or `a/b/mod.rs`) is `a`.
                let mut b = module.to_vec();
                b.pop();
                b
            };
            let rest = &text[from..];
            let mut segs = Vec::new();
            let mut word = String::new();
            for c in rest.chars() {
                if c.is_alphanumeric() || c == '_' || c == ':' {
                    word.push(c);
                } else {
                    break;
                }
            }
            for s in word.split("::").filter(|s| !s.is_empty()) {
                if s == "super" {
                    base.pop();
                } else {
                    segs.push(s.to_string());
                }
            }
            base.extend(segs);
            let next = rest[word.len()..].chars().next();
            if next == Some('{') {
                // A group: each comma-separated entry extends the prefix.
                let close = rest[word.len()..].find('}').unwrap_or(0);
                let group = &rest[word.len() + 1..word.len() + close];
                for entry in group.split(',') {
                    let entry = entry.trim();
                    let mut p = base.clone();
                    p.extend(
                        entry
                            .split("::")
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty() && s != "self"),
                    );
                    out.push(p);
                }
            } else {
                out.push(base);
            }
        }
    }
    out
}

struct Crate {
    /// Module path of each file.
    files: BTreeMap<Vec<String>, PathBuf>,
    /// Paths each file names.
    names: BTreeMap<Vec<String>, Vec<Vec<String>>>,
}

fn read_crate() -> Crate {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    rust_files(&src, &mut all);
    let mut files = BTreeMap::new();
    let mut names = BTreeMap::new();
    for file in all {
        if file.starts_with(src.join("bin")) {
            continue;
        }
        let module = module_of(&src, &file);
        let text = std::fs::read_to_string(&file).unwrap();
        names.insert(module.clone(), named_paths(&module, &code(&text)));
        files.insert(module, file);
    }
    Crate { files, names }
}

/// The file module a path lands in: its longest prefix that is a file.
fn file_of<'a>(c: &'a Crate, path: &[String]) -> Option<&'a Vec<String>> {
    (1..=path.len())
        .rev()
        .find_map(|n| c.files.get_key_value(&path[..n]).map(|(k, _)| k))
}

#[test]
fn top_level_modules_import_only_lower_layers() {
    let c = read_crate();
    let mut broken = Vec::new();
    for (module, paths) in &c.names {
        let Some(top) = module.first() else { continue };
        let Some(own) = layer(top) else {
            continue;
        };
        for p in paths {
            let Some(target) = p.first() else { continue };
            if target == top {
                continue;
            }
            match layer(target) {
                Some(l) if l < own => {}
                Some(_) => broken.push(format!("{} names {}", module.join("::"), p.join("::"))),
                // Not a module: a crate-root item (`crate::Result`, `crate::VERSION`).
                None => {}
            }
        }
    }
    for (m, _) in LAYERS {
        assert!(
            c.files.contains_key(&vec![m.to_string()]),
            "no module `{m}`: update LAYERS"
        );
    }
    assert!(
        broken.is_empty(),
        "imports against the layering:\n{}",
        broken.join("\n")
    );
}

#[test]
fn only_the_backend_module_names_the_cpu_backend() {
    let c = read_crate();
    let mut broken = Vec::new();
    for (module, paths) in &c.names {
        let inside = module.len() >= 2 && module[0] == "backend" && module[1] == "cpu";
        let facade = module.as_slice() == ["backend"];
        if inside || facade {
            continue;
        }
        for p in paths {
            if p.len() >= 2 && p[0] == "backend" && p[1] == "cpu" {
                broken.push(format!("{} names {}", module.join("::"), p.join("::")));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn files_inside_a_module_import_each_other_without_cycles() {
    let c = read_crate();
    // Edges between files, `mod.rs`/`lib.rs` files (declarations and re-exports) aside.
    let is_facade = |m: &Vec<String>| {
        let f = &c.files[m];
        f.file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs")
    };
    let mut edges: BTreeMap<&Vec<String>, BTreeSet<&Vec<String>>> = BTreeMap::new();
    for (module, paths) in &c.names {
        if is_facade(module) {
            continue;
        }
        for p in paths {
            if let Some(target) = file_of(&c, p)
                && target != module
                && !is_facade(target)
            {
                edges.entry(module).or_default().insert(target);
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit<'a>(
        node: &'a Vec<String>,
        edges: &BTreeMap<&'a Vec<String>, BTreeSet<&'a Vec<String>>>,
        state: &mut BTreeMap<&'a Vec<String>, u8>,
        stack: &mut Vec<&'a Vec<String>>,
    ) -> Option<Vec<String>> {
        state.insert(node, 1);
        stack.push(node);
        for &next in edges.get(node).into_iter().flatten() {
            match state.get(next) {
                Some(1) => {
                    let from = stack.iter().position(|n| *n == next).unwrap();
                    let mut cycle: Vec<String> =
                        stack[from..].iter().map(|m| m.join("::")).collect();
                    cycle.push(next.join("::"));
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node, 2);
        None
    }
    let mut state = BTreeMap::new();
    let nodes: Vec<&Vec<String>> = edges.keys().copied().collect();
    for node in nodes {
        if !state.contains_key(node) {
            let mut stack = Vec::new();
            if let Some(cycle) = visit(node, &edges, &mut state, &mut stack) {
                panic!("import cycle: {}", cycle.join(" -> "));
            }
        }
    }
    // The check sees the crate's real imports (not an empty graph).
    let model = vec!["model".to_string(), "mmdit".to_string()];
    let layers = vec!["model".to_string(), "layers".to_string()];
    assert!(
        edges.get(&model).is_some_and(|e| e.contains(&layers)),
        "{edges:?}"
    );
}
