//! The script language of Cilium's golden tests (`cilium-golden/`, copied unchanged from the
//! project's `../shared/cilium-golden/`, with its README): the
//! txtar archive, the script's sections and commands, the file commands (`cmp`, `grep`,
//! `empty`, `cp`, `replace`, `sed`, `env`, `sleep`) with the `*` (retry the section) and `!`
//! (expect failure) prefixes, and `kvstore/list`'s output format. The commands of the
//! component under test (`hive/*`, `k8s/*`, `kvstore/*`) are the caller's ([`Component`]).

#![allow(
    clippy::disallowed_methods,
    reason = "the script engine is synchronous and runs on a thread of its own, outside any async runtime"
)]
#![allow(
    dead_code,
    unreachable_pub,
    reason = "a test-support module: each test binary uses part of it"
)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A txtar archive: the script (everything before the first file marker) and the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    /// The script.
    pub script: String,
    /// The embedded files, by name, as written (a file's text runs to the next marker).
    pub files: BTreeMap<String, String>,
}

/// The name of a file marker line `-- NAME --`.
fn marker(line: &str) -> Option<&str> {
    let name = line.strip_prefix("-- ")?.strip_suffix(" --")?.trim();
    (!name.is_empty()).then_some(name)
}

/// Parses a txtar archive (the format of golang.org/x/tools/txtar): a line `-- NAME --`
/// starts a file; the last part gets a final newline when it has none.
pub fn parse_txtar(text: &str) -> Archive {
    let mut script = String::new();
    let mut files = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.split_inclusive('\n') {
        if let Some(name) = marker(line.trim_end_matches('\n')) {
            if let Some((n, body)) = current.take() {
                files.insert(n, body);
            }
            current = Some((name.to_owned(), String::new()));
            continue;
        }
        match &mut current {
            Some((_, body)) => body.push_str(line),
            None => script.push_str(line),
        }
    }
    // As Go's txtar: the last part (file, or script without files) ends with a newline.
    let fix_nl = |mut text: String| {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text
    };
    match current {
        Some((n, body)) => {
            files.insert(n, fix_nl(body));
        }
        None => script = fix_nl(script),
    }
    Archive { script, files }
}

/// One word of a command: its parts, quoted (taken literally) or not (`$VAR` expanded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word(pub Vec<(String, bool)>);

impl Word {
    /// The word with `$NAME` / `${NAME}` expanded from `env` in its unquoted parts.
    pub fn expand(&self, env: &BTreeMap<String, String>) -> String {
        let mut out = String::new();
        for (text, quoted) in &self.0 {
            if *quoted {
                out.push_str(text);
                continue;
            }
            let mut chars = text.char_indices().peekable();
            while let Some((i, c)) = chars.next() {
                if c != '$' {
                    out.push(c);
                    continue;
                }
                let rest = &text[i + 1..];
                let (name, used) = if let Some(inner) = rest.strip_prefix('{') {
                    match inner.find('}') {
                        Some(end) => (&inner[..end], end + 2),
                        None => ("", 0),
                    }
                } else {
                    let end = rest
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len());
                    (&rest[..end], end)
                };
                if name.is_empty() {
                    out.push('$');
                    continue;
                }
                out.push_str(env.get(name).map_or("", String::as_str));
                for _ in 0..used {
                    chars.next();
                }
            }
        }
        out
    }
}

/// One command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Its line in the script (1-based).
    pub line: usize,
    /// `*`: on failure, run the section again until it passes or the deadline.
    pub retry: bool,
    /// `!`: the command must fail.
    pub negate: bool,
    /// The words, the command's name first.
    pub words: Vec<Word>,
}

/// A script: the `#!` flags and the sections (a `#` comment line starts a new one).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Script {
    /// The flags of the `#!` header.
    pub flags: Vec<String>,
    /// The sections, each a list of commands.
    pub sections: Vec<Vec<Command>>,
}

/// Splits a command line into words: spaces separate, single quotes group (a doubled `''`
/// inside them is one quote); double quotes are ordinary characters.
pub fn split_words(line: &str) -> Result<Vec<Word>, String> {
    let mut words = Vec::new();
    let mut parts: Vec<(String, bool)> = Vec::new();
    let mut plain = String::new();
    let mut chars = line.chars().peekable();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    if !plain.is_empty() {
                        parts.push((std::mem::take(&mut plain), false));
                    }
                    words.push(Word(std::mem::take(&mut parts)));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                if !plain.is_empty() {
                    parts.push((std::mem::take(&mut plain), false));
                }
                let mut quoted = String::new();
                loop {
                    match chars.next() {
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                            quoted.push('\'');
                        }
                        Some('\'') => break,
                        Some(q) => quoted.push(q),
                        None => return Err(format!("unterminated quote in {line:?}")),
                    }
                }
                parts.push((quoted, true));
            }
            c => {
                in_word = true;
                plain.push(c);
            }
        }
    }
    if in_word {
        if !plain.is_empty() {
            parts.push((plain, false));
        }
        words.push(Word(parts));
    }
    Ok(words)
}

/// Parses a script.
pub fn parse_script(text: &str) -> Result<Script, String> {
    let mut script = Script::default();
    let mut section = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if i == 0
            && let Some(flags) = line.strip_prefix("#!")
        {
            script.flags = flags.split_whitespace().map(str::to_owned).collect();
            continue;
        }
        if line.is_empty() {
            continue;
        }
        if line.starts_with('#') {
            if !section.is_empty() {
                script.sections.push(std::mem::take(&mut section));
            }
            continue;
        }
        let (retry, negate, rest) = match line.as_bytes()[0] {
            b'*' => (true, false, line[1..].trim_start()),
            b'!' => (false, true, line[1..].trim_start()),
            _ => (false, false, line),
        };
        let words = split_words(rest).map_err(|e| format!("line {}: {e}", i + 1))?;
        if words.is_empty() {
            return Err(format!("line {}: a prefix without a command", i + 1));
        }
        section.push(Command {
            line: i + 1,
            retry,
            negate,
            words,
        });
    }
    if !section.is_empty() {
        script.sections.push(section);
    }
    Ok(script)
}

/// Go's `json.Indent(dst, src, "", "  ")`: the tokens as they are, one value per line, two
/// spaces per level, `{}` and `[]` when empty, a space after `:`.
pub fn json_indent(src: &str) -> Result<String, String> {
    let src = src.trim_start_matches([' ', '\t', '\r', '\n']);
    let mut out = String::with_capacity(src.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    // An opening bracket waiting to see whether its container is empty.
    let mut pending_open = false;
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        for _ in 0..depth {
            out.push_str("  ");
        }
    };
    for c in src.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        if matches!(c, ' ' | '\t' | '\r' | '\n') {
            continue;
        }
        if pending_open {
            pending_open = false;
            if c == '}' || c == ']' {
                depth -= 1;
                out.push(c);
                continue;
            }
            newline(&mut out, depth);
        }
        match c {
            '{' | '[' => {
                out.push(c);
                depth += 1;
                pending_open = true;
            }
            '}' | ']' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("unbalanced {c} in {src:?}"))?;
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(',');
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            '"' => {
                in_string = true;
                out.push('"');
            }
            c => out.push(c),
        }
    }
    if in_string || depth != 0 || pending_open {
        return Err(format!("not a complete JSON value: {src:?}"));
    }
    Ok(out)
}

/// JSON as Go's `json.Marshal` stores it: the indented text without the whitespace between
/// tokens.
pub fn json_compact(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in src.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\r' | '\n') {
            out.push(c);
        }
    }
    out
}

/// How `kvstore/list` prints values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFormat {
    /// Re-indented JSON.
    Json,
    /// The stored bytes.
    Plain,
}

/// `kvstore/list`'s output for `entries` (sorted by key as strings): `# KEY` and the value,
/// each on its own lines.
pub fn list_output(entries: &[(String, Vec<u8>)], format: ListFormat) -> Result<String, String> {
    let mut sorted: Vec<&(String, Vec<u8>)> = entries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::new();
    for (key, value) in sorted {
        let text = String::from_utf8(value.clone()).map_err(|_| format!("{key}: not UTF-8"))?;
        out.push_str("# ");
        out.push_str(key);
        out.push('\n');
        match format {
            ListFormat::Json => {
                out.push_str(&json_indent(&text).map_err(|e| format!("{key}: {e}"))?)
            }
            ListFormat::Plain => out.push_str(&text),
        }
        out.push('\n');
    }
    Ok(out)
}

/// The entries of a `kvstore/list` output: each `# KEY` line and the lines up to the next.
pub fn parse_list_output(text: &str) -> Vec<(String, String)> {
    let mut entries: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(key) = line.strip_prefix("# ") {
            entries.push((key.to_owned(), String::new()));
        } else if let Some((_, value)) = entries.last_mut() {
            if !value.is_empty() {
                value.push('\n');
            }
            value.push_str(line);
        }
    }
    entries
}

/// The `kvstore/list` arguments: format, prefix and output file (the `-o` flag may come
/// anywhere).
pub fn list_args(args: &[String]) -> Result<(ListFormat, String, String), String> {
    let mut format = ListFormat::Plain;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "-o" {
            format = match it.next().map(String::as_str) {
                Some("json") => ListFormat::Json,
                Some("plain") => ListFormat::Plain,
                other => return Err(format!("kvstore/list: unknown format {other:?}")),
            };
        } else {
            rest.push(a.clone());
        }
    }
    match rest.as_slice() {
        [prefix, out] => Ok((format, prefix.clone(), out.clone())),
        _ => Err(format!(
            "kvstore/list [-o json|plain] PREFIX FILE, not {args:?}"
        )),
    }
}

/// The commands of the component under test.
pub trait Component {
    /// Runs `words` (the name first) if it is one of the component's commands, with the
    /// script's files and environment (what `env` set): `Some(result)`, or `None` for a
    /// command it does not have.
    fn run(
        &mut self,
        words: &[String],
        files: &mut BTreeMap<String, String>,
        env: &BTreeMap<String, String>,
    ) -> Option<Result<(), String>>;
}

/// Go's string escapes in `replace`'s arguments (`\n`, `\t`, `\"`, `\\`, ...).
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// Runs one built-in file command; `None` for a command that is not one.
fn builtin(
    words: &[String],
    files: &mut BTreeMap<String, String>,
    env: &mut BTreeMap<String, String>,
) -> Option<Result<(), String>> {
    let file = |files: &BTreeMap<String, String>, name: &str| {
        files
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no file {name}"))
    };
    let args = &words[1..];
    Some(match (words[0].as_str(), args) {
        ("cmp", [a, b]) => (|| {
            let (x, y) = (file(files, a)?, file(files, b)?);
            if x == y {
                return Ok(());
            }
            let line = x
                .lines()
                .zip(y.lines())
                .position(|(l, r)| l != r)
                .unwrap_or_else(|| x.lines().count().min(y.lines().count()));
            Err(format!(
                "{a} and {b} differ from line {}: {:?} vs {:?}",
                line + 1,
                x.lines().nth(line).unwrap_or("<end>"),
                y.lines().nth(line).unwrap_or("<end>")
            ))
        })(),
        ("empty", [a]) => file(files, a).and_then(|x| {
            if x.is_empty() {
                Ok(())
            } else {
                Err(format!("{a} is not empty: {x:?}"))
            }
        }),
        ("grep", rest) => (|| {
            let rest: Vec<&String> = rest.iter().filter(|a| !a.starts_with('-')).collect();
            let [pattern, name] = rest.as_slice() else {
                return Err(format!("grep [-q] PATTERN FILE, not {args:?}"));
            };
            let re = regex::Regex::new(&format!("(?m){pattern}")).map_err(|e| e.to_string())?;
            if re.is_match(&file(files, name)?) {
                Ok(())
            } else {
                Err(format!("no match for {pattern:?} in {name}"))
            }
        })(),
        ("cp", [a, b]) => file(files, a).map(|x| {
            files.insert(b.clone(), x);
        }),
        ("replace", [old, new, name]) => file(files, name).map(|x| {
            files.insert(name.clone(), x.replace(&unescape(old), &unescape(new)));
        }),
        ("sed", [pattern, replacement, name]) => (|| {
            let re = regex::Regex::new(pattern).map_err(|e| e.to_string())?;
            let x = file(files, name)?;
            files.insert(
                name.clone(),
                re.replace_all(&x, replacement.as_str()).into_owned(),
            );
            Ok(())
        })(),
        ("env", [assignment]) => match assignment.split_once('=') {
            Some((k, v)) => {
                env.insert(k.to_owned(), v.to_owned());
                Ok(())
            }
            None => Err(format!("env NAME=VALUE, not {assignment:?}")),
        },
        ("sleep", [d]) => humantime::parse_duration(d)
            .map(std::thread::sleep)
            .map_err(|e| e.to_string()),
        _ => return None,
    })
}

/// How a script ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every command did as expected.
    Passed,
    /// A command the component does not have (reported as skipped, with it).
    Unsupported(String),
    /// A command did not do as expected (line and why).
    Failed(usize, String),
}

/// Runs `script` with `files`: commands in order; a failed `*` command re-runs its section
/// (a back-off of 0.1 s growing to 0.5 s) until it passes or `deadline` has passed.
pub fn run(
    script: &Script,
    files: &mut BTreeMap<String, String>,
    component: &mut dyn Component,
    deadline: Duration,
) -> Outcome {
    let end = Instant::now() + deadline;
    let mut env = BTreeMap::new();
    for section in &script.sections {
        let mut wait = Duration::from_millis(100);
        'attempt: loop {
            for cmd in section {
                let words: Vec<String> = cmd.words.iter().map(|w| w.expand(&env)).collect();
                let result = match builtin(&words, files, &mut env) {
                    Some(r) => r,
                    None => match component.run(&words, files, &env) {
                        Some(r) => r,
                        None => return Outcome::Unsupported(words.join(" ")),
                    },
                };
                let ok = result.is_ok() != cmd.negate;
                if ok {
                    continue;
                }
                let why = match result {
                    Ok(()) => format!("`{}` succeeded, expected to fail", words.join(" ")),
                    Err(e) => format!("`{}`: {e}", words.join(" ")),
                };
                if cmd.retry && Instant::now() < end {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_millis(500));
                    continue 'attempt;
                }
                return Outcome::Failed(cmd.line, why);
            }
            break;
        }
    }
    Outcome::Passed
}

/// The golden archives: `(name, text)`, the top-level ones and those under `clustermesh/`.
pub fn archives() -> Vec<(String, String)> {
    // Found from the crate that includes this module (the apiserver's tests, the agent's).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../apiserver/tests/golden/cilium-golden");
    let mut out = Vec::new();
    for dir in [root.clone(), root.join("clustermesh")] {
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "txtar"))
            .collect();
        names.sort();
        for p in names {
            let name = p
                .strip_prefix(&root)
                .map(|r| r.display().to_string())
                .unwrap_or_default();
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
            out.push((name, text));
        }
    }
    out
}

/// Checks that docs/INTEROP.md holds `table` between the markers of `name` (and writes the
/// table next to the reports, to copy from when it does not).
pub fn check_generated(name: &str, table: &str) {
    let doc_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/INTEROP.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    let begin = format!("<!-- generated by {name}: do not edit -->\n");
    let end = "<!-- end of generated table -->";
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("golden");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{}.md", name.replace('/', "_"))), table).unwrap();
    let start = doc
        .find(&begin)
        .unwrap_or_else(|| panic!("docs/INTEROP.md has no {begin:?}"))
        + begin.len();
    let stop = start + doc[start..].find(end).expect("the end marker");
    assert_eq!(
        &doc[start..stop],
        table,
        "docs/INTEROP.md's table is not what the runner found; the generated one:\n{table}"
    );
}

/// The YAML documents of a file, as JSON values (empty documents left out).
pub fn yaml_documents(text: &str) -> Result<Vec<serde_json::Value>, String> {
    use serde::Deserialize as _;
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v = serde_json::Value::deserialize(doc).map_err(|e| e.to_string())?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}
