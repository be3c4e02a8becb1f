//! The layers of the library, checked on its source.
//!
//! Every path into the crate that a file in `src/` names (`use crate::...` with its groups,
//! `super::...`, and inline `crate::a::b` paths in code and attributes) is an arrow from that
//! file's module to another. An arrow between two top-level modules must be in [`LAYERS`];
//! there must be no circle between top-level modules, and none between the files (or
//! submodules) of one module. `main.rs` is the binary and sits above everything.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// The allowed arrows: each top-level module with the modules it may import, and why.
/// Dependencies point down: `app` wires `api`, `uplink`, `sensors`, `service` and `alerts`
/// over `store`, which stands on `events` and `model`. When this test fails, the design
/// moves, not the table.
const LAYERS: &[(&str, &[&str], &str)] = &[
    (
        "model",
        &[],
        "the wire shapes and validated inputs: the vocabulary every layer speaks, so it \
         speaks nobody else's",
    ),
    (
        "shutdown",
        &[],
        "the shutdown signal and drain: a primitive under every task",
    ),
    (
        "backoff",
        &[],
        "the waits between attempts at something that failed: arithmetic that sources, \
         the uplink and webhooks share without knowing each other",
    ),
    (
        "clock",
        &["model"],
        "whether sample times can be trusted; owns its trust setting",
    ),
    (
        "events",
        &["model"],
        "events with a typed body and the hub that fans them out; knows no transport \
         (no WebSocket, no SSE, no MQTT)",
    ),
    (
        "store",
        &["model", "events", "shutdown"],
        "SQLite: schema, the writer, read queries, retention, the event log and the feed \
         (stored events, then live ones from the hub); owns its storage settings; never \
         sees who produces or consumes the data",
    ),
    (
        "auth",
        &["model", "store", "shutdown"],
        "tokens, scopes and the policy; tokens are read and written through the store \
         like everything else",
    ),
    (
        "sensors",
        &["model", "backoff", "clock", "shutdown"],
        "sources and the scheduler; samples leave through a sink and sensor changes \
         arrive through a stream, both wired in `app`: no `Store`, no `Hub`",
    ),
    (
        "alerts",
        &["model", "backoff", "events", "store", "shutdown"],
        "rules over readings: follows the hub, keeps its state in the store",
    ),
    (
        "uplink",
        &["model", "backoff", "events", "store", "shutdown"],
        "the MQTT uplink: takes the store's feed; owns its settings and their validators",
    ),
    (
        "service",
        &["events", "sensors", "store", "shutdown"],
        "systemd readiness, status and watchdog over the hub, the sensors' health and the \
         writer's health",
    ),
    (
        "demo",
        &[],
        "stand-in hardware for `--demo`: files in a directory",
    ),
    (
        "api",
        &[
            "model", "events", "store", "auth", "sensors", "alerts", "uplink", "clock", "shutdown",
        ],
        "the HTTP surface: REST, the client protocol of WebSocket and SSE sessions, \
         metrics over every part's figures; owns its server, limits and realtime settings",
    ),
    (
        "control",
        &["model", "auth", "store", "shutdown"],
        "the control socket: the command line's token and backup commands, answered by \
         a running daemon that keeps its database to itself; the protocol and both ends",
    ),
    (
        "config",
        &[
            "model",
            "auth",
            "clock",
            "sensors",
            "store",
            "alerts",
            "uplink",
            "api::settings",
        ],
        "reads the file and composes the settings types each part owns, validating with \
         line numbers; no part imports it back. Of `api` it sees the settings alone",
    ),
    (
        "app",
        &[
            "model", "events", "store", "auth", "sensors", "alerts", "uplink", "api", "service",
            "clock", "config", "control", "shutdown",
        ],
        "wiring and ordered shutdown: the only place that sees every part, and the only \
         one that sees `api` beyond its settings",
    ),
];

/// Crates that one layer owns: no other module may name them.
const OWNED_CRATES: &[(&str, &[&str], &str)] = &[
    (
        "rusqlite",
        &["store"],
        "SQLite is opened and queried in the store alone",
    ),
    (
        "tokio_tungstenite",
        &["api"],
        "WebSocket is a transport of the API: events and the rest know nothing of it",
    ),
];

/// One file of the library: its module path and its text.
struct SourceFile {
    /// Relative to the crate, as in a failure message (`src/store/writer.rs`).
    shown: String,
    /// `["store", "writer"]`; empty for `lib.rs`.
    module: Vec<String>,
    /// Whether this file is a directory's `mod.rs` (or `lib.rs`).
    is_dir_module: bool,
    text: String,
}

/// One path into the crate named in a file.
#[derive(Debug, Clone, PartialEq)]
struct Reference {
    line: usize,
    /// Absolute from the crate root, without `crate`.
    path: Vec<String>,
    /// As written, for the failure message.
    written: String,
}

/// An arrow from a file to the module (file) a reference lands in.
struct Arrow {
    from: usize,
    line: usize,
    to: Vec<String>,
    written: String,
}

fn read_sources(root: &Path) -> Vec<SourceFile> {
    let mut files = Vec::new();
    let mut stack = vec![root.join("src")];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let relative = path.strip_prefix(root.join("src")).unwrap();
            let mut module: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module == ["main.rs"] {
                // The binary: a crate of its own above the library.
                continue;
            }
            let last = module.pop().unwrap();
            let is_dir_module = last == "mod.rs" || last == "lib.rs";
            if !is_dir_module {
                module.push(last.trim_end_matches(".rs").to_string());
            }
            files.push(SourceFile {
                shown: format!("src/{}", relative.display()),
                module,
                is_dir_module,
                text: fs::read_to_string(&path).unwrap(),
            });
        }
    }
    files.sort_by(|a, b| a.shown.cmp(&b.shown));
    files
}

/// The text with comments blanked out (newlines kept, so lines still count), and for each
/// byte whether it is code (not inside a string or char literal).
fn strip_comments(text: &str) -> (Vec<u8>, Vec<bool>) {
    let bytes = text.as_bytes();
    let mut out = bytes.to_vec();
    let mut code = vec![true; bytes.len()];
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for b in &mut out[from..to] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
    };
    while i < bytes.len() {
        let rest = &bytes[i..];
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(bytes.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            let mut j = i;
            while j < bytes.len() {
                if bytes[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if bytes[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if rest.starts_with(b"r#") || rest.starts_with(b"r\"") {
            let previous_is_ident =
                i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
            let hashes = rest[1..].iter().take_while(|&&b| b == b'#').count();
            if previous_is_ident || rest.get(1 + hashes) != Some(&b'"') {
                i += 1;
                continue;
            }
            let mut closing = vec![b'"'];
            closing.extend(std::iter::repeat_n(b'#', hashes));
            let start = i + 2 + hashes;
            let end = bytes[start..]
                .windows(closing.len())
                .position(|w| w == closing.as_slice())
                .map_or(bytes.len(), |p| start + p + closing.len());
            code[i..end].fill(false);
            i = end;
        } else if rest[0] == b'"' {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j] != b'"' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(bytes.len());
            code[i..end].fill(false);
            i = end;
        } else if rest[0] == b'\'' {
            // A char literal ('x', '\n', '{'), or else a lifetime.
            let end = if rest.get(1) == Some(&b'\\') {
                rest.iter()
                    .skip(2)
                    .position(|&b| b == b'\'')
                    .map(|p| i + 3 + p)
            } else if rest.get(2) == Some(&b'\'') {
                Some(i + 3)
            } else {
                // A multi-byte char: the closing quote within four bytes.
                rest.iter()
                    .take(6)
                    .skip(2)
                    .position(|&b| b == b'\'')
                    .filter(|_| rest.get(1).is_some_and(|b| !b.is_ascii()))
                    .map(|p| i + 3 + p)
            };
            match end {
                Some(end) => {
                    code[i..end].fill(false);
                    i = end;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    (out, code)
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn word_at(bytes: &[u8], i: usize, word: &[u8]) -> bool {
    bytes[i..].starts_with(word)
        && (i == 0 || !is_ident_byte(bytes[i - 1]))
        && bytes.get(i + word.len()).is_none_or(|&b| !is_ident_byte(b))
}

/// Expands a use tree (`crate::{a, b::{c, d}}`) into its paths, each a list of segments.
fn expand_use_tree(tree: &str) -> Vec<Vec<String>> {
    fn split_top(list: &str) -> Vec<&str> {
        let mut parts = Vec::new();
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in list.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&list[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&list[start..]);
        parts
            .into_iter()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect()
    }
    fn expand(prefix: &[String], tree: &str, out: &mut Vec<Vec<String>>) {
        let tree = tree.trim();
        if let Some(open) = tree.find('{') {
            let head: Vec<String> = tree[..open]
                .split("::")
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            let close = tree.rfind('}').unwrap_or(tree.len());
            let mut base = prefix.to_vec();
            base.extend(head);
            for part in split_top(&tree[open + 1..close]) {
                expand(&base, part, out);
            }
        } else {
            let tree = tree.split(" as ").next().unwrap_or(tree).trim();
            let mut path = prefix.to_vec();
            path.extend(tree.split("::").map(|s| s.trim().to_string()));
            // `a::{self}` names `a` itself.
            if path.last().is_some_and(|s| s == "self") {
                path.pop();
            }
            out.push(path);
        }
    }
    let mut out = Vec::new();
    expand(&[], tree, &mut out);
    out
}

/// Every reference into the crate in one file's text, made absolute. `module` is the file's
/// module path; `is_dir_module` says whether relative `use` paths may start at a child.
fn references(module: &[String], is_dir_module: bool, text: &str) -> Vec<Reference> {
    let (bytes, code) = strip_comments(text);
    let line_of = |i: usize| bytes[..i].iter().filter(|&&b| b == b'\n').count() + 1;
    let mut found = Vec::new();
    // Inline modules (`mod tests { .. }`) open at a brace depth; `super` inside them is
    // relative to them.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        if code[i] && bytes[i] == b'{' {
            depth += 1;
            i += 1;
            continue;
        }
        if code[i] && bytes[i] == b'}' {
            depth = depth.saturating_sub(1);
            while inline.last().is_some_and(|(_, d)| *d > depth) {
                inline.pop();
            }
            i += 1;
            continue;
        }
        let here = || -> Vec<String> {
            module
                .iter()
                .cloned()
                .chain(inline.iter().map(|(n, _)| n.clone()))
                .collect()
        };
        if code[i] && word_at(&bytes, i, b"mod") {
            let rest = std::str::from_utf8(&bytes[i + 3..]).unwrap_or("");
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let after = rest.trim_start()[name.len()..].trim_start();
            if !name.is_empty() && after.starts_with('{') {
                inline.push((name, depth + 1));
            }
            i += 3;
            continue;
        }
        if code[i] && word_at(&bytes, i, b"use") {
            let end = bytes[i..]
                .iter()
                .position(|&b| b == b';')
                .map_or(bytes.len(), |p| i + p);
            let tree = String::from_utf8_lossy(&bytes[i + 3..end]).into_owned();
            let tree: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
            let line = line_of(i);
            for path in expand_use_tree(&tree) {
                let written = path.join("::");
                let relative_to_child = is_dir_module && inline.is_empty();
                if let Some(path) = absolute(&here(), &path, relative_to_child) {
                    found.push(Reference {
                        line,
                        path,
                        written,
                    });
                }
            }
            i = end;
            continue;
        }
        for word in [&b"crate"[..], &b"super"[..]] {
            if word_at(&bytes, i, word) && bytes[i + word.len()..].starts_with(b"::") {
                let mut j = i;
                while j < bytes.len() && (is_ident_byte(bytes[j]) || bytes[j..].starts_with(b"::"))
                {
                    j += if bytes[j] == b':' { 2 } else { 1 };
                }
                let written = String::from_utf8_lossy(&bytes[i..j])
                    .trim_end_matches(':')
                    .to_string();
                let path: Vec<String> = written.split("::").map(String::from).collect();
                if let Some(path) = absolute(&here(), &path, false) {
                    found.push(Reference {
                        line: line_of(i),
                        path,
                        written,
                    });
                }
                i = j;
                break;
            }
        }
        i += 1;
    }
    found
}

/// A path as written, made absolute from the crate root; `None` for paths outside the crate.
fn absolute(here: &[String], path: &[String], relative_to_child: bool) -> Option<Vec<String>> {
    let mut segments = path.iter().peekable();
    let mut base: Vec<String> = match segments.peek().map(|s| s.as_str()) {
        Some("crate") => {
            segments.next();
            Vec::new()
        }
        Some("super") | Some("self") => here.to_vec(),
        // A relative path in a directory module: a child module if it names one, marked
        // for the caller, who knows the modules.
        _ if relative_to_child => {
            return Some(
                std::iter::once("?".to_string())
                    .chain(segments.cloned())
                    .collect(),
            )
        }
        _ => return None,
    };
    while let Some(s) = segments.peek() {
        match s.as_str() {
            "super" => {
                base.pop()?;
                segments.next();
            }
            "self" => {
                segments.next();
            }
            _ => break,
        }
    }
    base.extend(segments.cloned());
    Some(base)
}

/// The library as modules: which file each module path is, and the names each directory
/// module re-exports from a child (`pub use child::Name`), so an arrow lands where the
/// name is defined.
struct Crate {
    files: Vec<SourceFile>,
    by_module: BTreeMap<Vec<String>, usize>,
    reexports: BTreeMap<(Vec<String>, String), Vec<String>>,
}

impl Crate {
    fn new(files: Vec<SourceFile>) -> Crate {
        let by_module = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.module.clone(), i))
            .collect();
        let mut krate = Crate {
            files,
            by_module,
            reexports: BTreeMap::new(),
        };
        let mut reexports = BTreeMap::new();
        for file in &krate.files {
            let (text, _) = strip_comments(&file.text);
            for statement in String::from_utf8_lossy(&text).split(';') {
                // Any `use`, not only a public one: a private import is seen by the
                // module's descendants, which reach it as `super::Name` or `crate::Name`.
                let Some(tree) = use_tree_of(statement) else {
                    continue;
                };
                let tree: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
                for path in expand_use_tree(&tree) {
                    // A glob names nothing: `use super::*` in a test module is no door.
                    let Some(name) = path.last().filter(|n| *n != "*").cloned() else {
                        continue;
                    };
                    let Some(target) = absolute(&file.module, &path, file.is_dir_module) else {
                        continue;
                    };
                    let target = krate.child_path(&file.module, target);
                    reexports.insert((file.module.clone(), name), target);
                }
            }
        }
        krate.reexports = reexports;
        krate
    }

    /// Resolves the `?` mark of a relative path: a child module of `module` if one exists.
    fn child_path(&self, module: &[String], path: Vec<String>) -> Vec<String> {
        if path.first().is_some_and(|s| s == "?") {
            let mut child = module.to_vec();
            child.extend(path[1..].iter().cloned());
            child
        } else {
            path
        }
    }

    /// The module file a path lands in: the longest prefix that is a file, following
    /// re-exports of the name after it.
    fn land(&self, path: &[String]) -> Option<Vec<String>> {
        let mut path = path.to_vec();
        for _ in 0..8 {
            let n = (0..=path.len())
                .rev()
                .find(|&n| self.by_module.contains_key(&path[..n]))?;
            let module = path[..n].to_vec();
            let reexported = path
                .get(n)
                .and_then(|name| self.reexports.get(&(module.clone(), name.clone())));
            match reexported {
                Some(target) => {
                    let mut next = target.clone();
                    next.extend(path[n + 1..].iter().cloned());
                    if next == path {
                        return Some(module);
                    }
                    path = next;
                }
                None => return Some(module),
            }
        }
        None
    }

    fn arrows(&self) -> Vec<Arrow> {
        let mut arrows = Vec::new();
        for (from, file) in self.files.iter().enumerate() {
            for reference in references(&file.module, file.is_dir_module, &file.text) {
                let path = self.child_path(&file.module, reference.path.clone());
                let relative = reference.path.first().is_some_and(|s| s == "?");
                if relative
                    && !path
                        .get(..file.module.len() + 1)
                        .is_some_and(|p| self.by_module.contains_key(p))
                {
                    // A relative path that is not a child module: another crate.
                    continue;
                }
                if let Some(to) = self.land(&path) {
                    arrows.push(Arrow {
                        from,
                        line: reference.line,
                        to,
                        written: reference.written,
                    });
                }
            }
        }
        arrows
    }
}

fn top(module: &[String]) -> Option<&str> {
    module.first().map(String::as_str)
}

/// The circles of a graph: each strongly connected part of more than one node, its nodes
/// sorted.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&String> = graph.keys().chain(graph.values().flatten()).collect();
    let reaches = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(n) = stack.pop() {
            for next in graph.get(&n).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> =
        nodes.iter().map(|n| (*n, reaches(n))).collect();
    let mut done = BTreeSet::new();
    let mut found = Vec::new();
    for &n in &nodes {
        if done.contains(n) || !reach[n].contains(n) {
            continue;
        }
        let part: Vec<String> = nodes
            .iter()
            .filter(|m| reach[n].contains(**m) && reach[**m].contains(n))
            .map(|m| (*m).clone())
            .collect();
        done.extend(part.iter().cloned());
        found.push(part);
    }
    found
}

/// Whether an entry of the table (`store`, or `api::settings` for that submodule alone)
/// lets an arrow land in module `to`.
fn permits(entry: &str, to: &[String]) -> bool {
    let segments: Vec<&str> = entry.split("::").collect();
    to.len() >= segments.len() && to.iter().zip(&segments).all(|(a, b)| a == b)
}

/// The tree of the `use` declaration a statement (text up to a `;`) ends with, of any
/// visibility: `pub use a::b`, `pub(super) use {a, b}`, `use a as b`.
fn use_tree_of(statement: &str) -> Option<&str> {
    let at = statement.rfind("use ")?;
    let head = &statement[..at];
    let start = head.rfind(['\n', '{', '}', ']']).map_or(0, |i| i + 1);
    let visibility = head[start..].trim();
    let is_visibility = visibility.is_empty()
        || visibility == "pub"
        || (visibility.starts_with("pub(") && visibility.ends_with(')'));
    is_visibility.then(|| &statement[at + 4..])
}

/// The lines of `text` that name the crate `name` in code: as a path (`name::...`, also
/// `::name::...`) or in a `use` (`use name as other`).
fn lines_naming_crate(text: &str, name: &str) -> Vec<usize> {
    let (bytes, _) = strip_comments(text);
    let mut lines = Vec::new();
    for i in 0..bytes.len() {
        if !bytes[i..].starts_with(name.as_bytes()) {
            continue;
        }
        let after = bytes.get(i + name.len()).copied();
        if after.is_some_and(is_ident_byte) {
            continue;
        }
        // `other::name` is another crate's module of that name; `::name` is this one.
        let before = &bytes[..i];
        let mid_path = before.ends_with(b"::")
            && before[..before.len() - 2]
                .last()
                .is_some_and(|&b| is_ident_byte(b));
        let in_word = before
            .last()
            .is_some_and(|&b| is_ident_byte(b) || b == b'.');
        if !mid_path && !in_word {
            let line = bytes[..i].iter().filter(|&&b| b == b'\n').count() + 1;
            if lines.last() != Some(&line) {
                lines.push(line);
            }
        }
    }
    lines
}

/// Everything wrong with the tree, one line each; empty when the layers hold.
fn violations(krate: &Crate) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = LAYERS.iter().map(|(m, may, _)| (*m, *may)).collect();
    let arrows = krate.arrows();
    let mut problems = Vec::new();
    let mut top_graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut witness: BTreeMap<(String, String), String> = BTreeMap::new();
    // Per directory module, the arrows between its children.
    let mut inner_graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> =
        BTreeMap::new();
    for arrow in &arrows {
        let file = &krate.files[arrow.from];
        let place = format!("{}:{}", file.shown, arrow.line);
        let (Some(from), Some(to)) = (top(&file.module), top(&arrow.to)) else {
            continue;
        };
        if from != to {
            match allowed.get(from) {
                None => problems.push(format!(
                    "{place}: module `{from}` is not in the table (arrow {from} -> {to}, `{}`)",
                    arrow.written
                )),
                Some(may) if !may.iter().any(|entry| permits(entry, &arrow.to)) => {
                    problems.push(format!(
                        "{place}: {from} -> {to} is not allowed (`{}`)",
                        arrow.written
                    ))
                }
                Some(_) => {}
            }
            top_graph
                .entry(from.to_string())
                .or_default()
                .insert(to.to_string());
            witness
                .entry((from.to_string(), to.to_string()))
                .or_insert_with(|| format!("{place} `{}`", arrow.written));
            continue;
        }
        // Inside one module: the deepest directory module holding both ends, and the
        // children of it they sit in. Arrows to or from that directory's own `mod.rs`
        // are its face, not a sibling.
        let common = file
            .module
            .iter()
            .zip(&arrow.to)
            .take_while(|(a, b)| a == b)
            .count();
        let parent = file.module[..common].to_vec();
        let (Some(a), Some(b)) = (file.module.get(common), arrow.to.get(common)) else {
            continue;
        };
        inner_graphs
            .entry(parent.clone())
            .or_default()
            .entry(a.clone())
            .or_default()
            .insert(b.clone());
        let key = (
            format!("{}::{a}", parent.join("::")),
            format!("{}::{b}", parent.join("::")),
        );
        witness
            .entry(key)
            .or_insert_with(|| format!("{place} `{}`", arrow.written));
    }
    for file in &krate.files {
        let Some(module) = top(&file.module) else {
            // The crate root declares modules and nothing else: a `use` there would let
            // every module reach anything as `crate::Name`, past the table.
            let (text, _) = strip_comments(&file.text);
            let text = String::from_utf8_lossy(&text);
            let mut line = 1;
            for statement in text.split_inclusive(';') {
                if let Some(tree) = use_tree_of(statement.trim_end_matches(';')) {
                    let at = line
                        + statement[..statement.len() - tree.len()]
                            .matches('\n')
                            .count();
                    problems.push(format!(
                        "{}:{at}: the crate root imports `{}`; it declares modules only",
                        file.shown,
                        tree.trim().trim_end_matches(';')
                    ));
                }
                line += statement.matches('\n').count();
            }
            continue;
        };
        for (name, owners, _) in OWNED_CRATES {
            if owners.contains(&module) {
                continue;
            }
            for line in lines_naming_crate(&file.text, name) {
                problems.push(format!(
                    "{}:{line}: {module} uses `{name}`, which only {} may use",
                    file.shown,
                    owners.join(", ")
                ));
            }
        }
    }
    // Every arrow inside a circle, each with the first place that draws it.
    let describe = |graph: &BTreeMap<String, BTreeSet<String>>, part: &[String], prefix: &str| {
        let mut text = String::new();
        for node in part {
            for next in graph[node].iter().filter(|n| part.contains(n)) {
                let (a, b) = if prefix.is_empty() {
                    (node.clone(), next.clone())
                } else {
                    (format!("{prefix}::{node}"), format!("{prefix}::{next}"))
                };
                let _ = write!(
                    text,
                    "\n    {a} -> {b} at {}",
                    witness[&(a.clone(), b.clone())]
                );
            }
        }
        text
    };
    for part in circles(&top_graph) {
        problems.push(format!(
            "import circle between modules {}:{}",
            part.join(", "),
            describe(&top_graph, &part, "")
        ));
    }
    for (parent, graph) in &inner_graphs {
        let prefix = parent.join("::");
        for part in circles(graph) {
            problems.push(format!(
                "import circle inside `{prefix}` between {}:{}",
                part.join(", "),
                describe(graph, &part, &prefix)
            ));
        }
    }
    problems
}

#[test]
fn imports_follow_the_layers() {
    let krate = Crate::new(read_sources(Path::new(env!("CARGO_MANIFEST_DIR"))));
    let problems = violations(&krate);
    assert!(
        problems.is_empty(),
        "{} import(s) break the layers (the table is LAYERS in tests/architecture.rs):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_table_names_every_module_once_and_has_no_circle() {
    let krate = Crate::new(read_sources(Path::new(env!("CARGO_MANIFEST_DIR"))));
    let modules: BTreeSet<&str> = krate.files.iter().filter_map(|f| top(&f.module)).collect();
    let listed: Vec<&str> = LAYERS.iter().map(|(m, _, _)| *m).collect();
    let unique: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!(listed.len(), unique.len(), "a module is listed twice");
    assert_eq!(
        modules, unique,
        "the table and src/ disagree on the modules"
    );
    let graph: BTreeMap<String, BTreeSet<String>> = LAYERS
        .iter()
        .map(|(m, may, _)| {
            let tops = may
                .iter()
                .map(|s| s.split("::").next().unwrap_or(s).to_string());
            (m.to_string(), tops.collect())
        })
        .collect();
    assert_eq!(
        circles(&graph),
        Vec::<Vec<String>>::new(),
        "the table itself has a circle"
    );
}

#[test]
fn imports_through_the_root_private_re_exports_and_renamed_crates_are_seen() {
    let krate = fixture(&[
        ("lib.rs", "pub mod store;\npub mod sensors;\npub mod api;\nuse store::Store;\n"),
        (
            "store/mod.rs",
            "mod writer;\nmod publisher;\npub struct Store;\npub(super) use writer::Sample;\nuse writer::Batch;\n",
        ),
        ("store/writer.rs", "use super::publisher::Publish;\n"),
        ("store/publisher.rs", "use super::Batch;\n"),
        ("sensors.rs", "use crate::Store;\nfn f(_: ::rusqlite::Connection) {}\n"),
        ("api.rs", "use rusqlite as db;\nuse tokio_tungstenite::tungstenite::Message;\n"),
    ]);
    let problems = violations(&krate);
    for (start, naming) in [
        (
            "src/lib.rs:4: the crate root imports `store::Store`; it declares modules only",
            "",
        ),
        // A private re-export in mod.rs still draws the arrow to where the name lives.
        (
            "import circle inside `store` between publisher, writer:",
            "src/store/publisher.rs:1",
        ),
        (
            "src/sensors.rs:2: sensors uses `rusqlite`, which only store may use",
            "",
        ),
        (
            "src/api.rs:1: api uses `rusqlite`, which only store may use",
            "",
        ),
    ] {
        assert_reported(&problems, start, naming);
    }
    assert!(
        !problems.iter().any(|p| p.contains("tungstenite")),
        "a module of another crate is not the crate: {problems:#?}"
    );
}

/// Fails unless a problem starts with `start` and names `naming` somewhere in it.
fn assert_reported(problems: &[String], start: &str, naming: &str) {
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(start) && p.contains(naming)),
        "no problem starting with `{start}` and naming `{naming}` in {problems:#?}"
    );
}

/// A crate in a temporary directory, for checking that the checker sees what it must.
fn fixture(files: &[(&str, &str)]) -> Crate {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let path = dir.path().join("src").join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    Crate::new(read_sources(dir.path()))
}

#[test]
fn grouped_inline_and_relative_paths_are_all_arrows() {
    let krate = fixture(&[
        ("lib.rs", "pub mod model;\npub mod store;\npub mod api;\n"),
        ("model.rs", "// use crate::api::Nothing;\n/* crate::api::Nothing */\n"),
        (
            "store/mod.rs",
            "mod writer;\nmod publisher;\npub use writer::Sample;\nuse crate::{model::Sensor,\n    api::{self, x}};\n",
        ),
        ("store/writer.rs", "use super::publisher::Publish;\nfn f() { crate::api::go(); }\n"),
        (
            "store/publisher.rs",
            "#[cfg(test)]\nmod tests {\n    use super::*;\n    use super::super::Sample;\n}\n",
        ),
        (
            "api.rs",
            "#[serde(serialize_with = \"crate::model::wire\")]\nstruct A;\nuse crate::store::Sample;\nfn f(_: rusqlite::Error) {}\n",
        ),
    ]);
    let seen: Vec<(String, usize, String)> = krate
        .arrows()
        .iter()
        .map(|a| (krate.files[a.from].shown.clone(), a.line, a.to.join("::")))
        .collect();
    let expected = [
        ("src/api.rs", 1, "model"),
        ("src/api.rs", 3, "store::writer"),
        ("src/store/mod.rs", 3, "store::writer"),
        ("src/store/mod.rs", 4, "model"),
        ("src/store/mod.rs", 4, "api"),
        ("src/store/mod.rs", 4, "api"),
        ("src/store/publisher.rs", 3, "store::publisher"),
        ("src/store/publisher.rs", 4, "store::writer"),
        ("src/store/writer.rs", 1, "store::publisher"),
        ("src/store/writer.rs", 2, "api"),
    ];
    let expected: Vec<(String, usize, String)> = expected
        .iter()
        .map(|(f, l, t)| (f.to_string(), *l, t.to_string()))
        .collect();
    assert_eq!(seen, expected);
    let problems = violations(&krate);
    for (start, naming) in [
        ("src/store/mod.rs:4: store -> api is not allowed", ""),
        ("src/store/writer.rs:2: store -> api", ""),
        (
            "import circle inside `store` between publisher, writer:",
            "src/store/writer.rs:1",
        ),
        (
            "import circle between modules api, store:",
            "store -> api at src/store/mod.rs:4",
        ),
        (
            "src/api.rs:4: api uses `rusqlite`, which only store may use",
            "",
        ),
    ] {
        assert_reported(&problems, start, naming);
    }
}
