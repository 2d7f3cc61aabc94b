//! The layering of ARCHITECTURE.md ("Layers") as a test: every module of `src/` is in the list,
//! and every `crate::`/`super::` path in a module's code (comments and `#[cfg(test)]` modules
//! aside) names its own module or one of a strictly lower layer. Strictly lower means no two
//! modules of one layer import each other, so the graph has no cycle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Layer number of each unit: a top-level module (`hub`) or a listed submodule
/// (`phoenix::codec`).
fn layers() -> HashMap<String, usize> {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let section = doc
        .split("\n## Layers\n")
        .nth(1)
        .expect("ARCHITECTURE.md has a \"## Layers\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut layers = HashMap::new();
    for line in section.lines() {
        let Some((number, rest)) = line.split_once(". ") else {
            continue;
        };
        let Ok(number) = number.trim().parse::<usize>() else {
            continue;
        };
        let units = rest.split(" — ").next().unwrap_or(rest);
        for unit in units.split(',') {
            let unit = unit.trim().trim_matches('`');
            assert!(!unit.is_empty(), "empty unit in layer {number}");
            assert!(
                layers.insert(unit.to_string(), number).is_none(),
                "{unit} listed twice"
            );
        }
    }
    assert!(layers.len() > 10, "the layer list was not found");
    layers
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            if path.file_name().is_some_and(|name| name != "bin") {
                sources(&path, out);
            }
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a source file: `src/phoenix/codec.rs` → `["phoenix", "codec"]`,
/// `src/presence/mod.rs` → `["presence"]`, `src/lib.rs` → `["lib"]`.
fn module_path(file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(root().join("src")).expect("under src");
    let mut parts: Vec<String> = relative
        .with_extension("")
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|last| last == "mod") {
        parts.pop();
    }
    parts
}

/// The unit a module path belongs to: the longest listed prefix.
fn unit_of(path: &[String], layers: &HashMap<String, usize>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|unit| layers.contains_key(unit))
}

/// The code of a file without comments and without its `#[cfg(test)] mod …` blocks (test
/// modules sit at the end of a file in this codebase).
fn code(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]")
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// The paths each `crate::` or `super::` occurrence names, as segment lists (a `{a::b, c}`
/// group yields each member).
fn imports(code: &str, own: &[String]) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for (prefix, base) in [("crate::", Vec::new()), ("super::", parent(own))] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let preceded_by_ident = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
            rest = &rest[at + prefix.len()..];
            if preceded_by_ident {
                continue;
            }
            for member in members(rest) {
                let mut path = base.clone();
                path.extend(member);
                found.push(path);
            }
        }
    }
    found
}

fn parent(own: &[String]) -> Vec<String> {
    own[..own.len().saturating_sub(1)].to_vec()
}

/// The segment lists at the start of `text` (after `crate::`).
fn members(text: &str) -> Vec<Vec<String>> {
    if let Some(group) = text.strip_prefix('{') {
        let mut depth = 0;
        let mut end = group.len();
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    end = i;
                    break;
                }
                '}' => depth -= 1,
                _ => {}
            }
        }
        let mut out = Vec::new();
        let mut depth = 0;
        let mut start = 0;
        let inner = &group[..end];
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(segments(inner[start..i].trim()));
                    start = i + 1;
                }
                _ => {}
            }
        }
        out.push(segments(inner[start..].trim()));
        out.retain(|segments| !segments.is_empty());
        return out;
    }
    vec![segments(text)]
}

fn segments(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    loop {
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        out.push(rest[..end].to_string());
        match rest[end..].strip_prefix("::") {
            Some(next) => rest = next,
            None => break,
        }
    }
    out
}

#[test]
fn no_module_imports_from_a_layer_above_or_beside_it() {
    let layers = layers();
    let mut files = Vec::new();
    sources(&root().join("src"), &mut files);
    files.retain(|file| !file.ends_with("src/main.rs"));
    let mut violations = Vec::new();
    for file in &files {
        let own_path = module_path(file);
        let own = unit_of(&own_path, &layers)
            .unwrap_or_else(|| panic!("{} is in no layer of ARCHITECTURE.md", own_path.join("::")));
        let text = std::fs::read_to_string(file).expect("source");
        for path in imports(&code(&text), &own_path) {
            let Some(target) = unit_of(&path, &layers) else {
                continue; // not a module (a macro or an item of the crate root)
            };
            if target != own && layers[&target] >= layers[&own] {
                violations.push(format!(
                    "{own} (layer {}) imports {} (layer {})",
                    layers[&own],
                    path.join("::"),
                    layers[&target]
                ));
            }
        }
    }
    violations.sort();
    violations.dedup();
    assert!(
        violations.is_empty(),
        "imports that break ARCHITECTURE.md's layers:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_scanner_reads_grouped_and_nested_paths() {
    let own = vec!["phoenix".to_string(), "session".to_string()];
    let found = imports(
        "use crate::{auth::Identity, hub::{Hub, Outbox}};\nuse super::codec::Vsn;\nlet x = crate::metrics::X;\nmy_crate::no;",
        &own,
    );
    let names: Vec<String> = found.iter().map(|p| p.join("::")).collect();
    assert!(names.contains(&"auth::Identity".to_string()), "{names:?}");
    assert!(names.contains(&"hub".to_string()), "{names:?}");
    assert!(
        names.contains(&"phoenix::codec::Vsn".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"metrics::X".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("no")), "{names:?}");
    assert_eq!(
        code("use crate::a;\n// crate::b\n#[cfg(test)]\nmod tests {\nuse crate::c;\n}"),
        "use crate::a;\n"
    );
}
