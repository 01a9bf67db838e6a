//! The golden-data runner's foundation (issue 16): Cilium's golden archives parse, their
//! scripts name only files they have, the script engine follows the language's rules (quoting,
//! sections, `*` retries, `!`), and `kvstore/list`'s output format reproduces, byte for byte,
//! every dump Cilium's own expected files hold.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

mod golden;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use golden::{
    Component, ListFormat, Outcome, archives, json_compact, json_indent, list_args, list_output,
    parse_list_output, parse_script, parse_txtar, run, split_words,
};

fn words(line: &str) -> Vec<String> {
    split_words(line)
        .unwrap()
        .iter()
        .map(|w| w.expand(&BTreeMap::new()))
        .collect()
}

#[test]
fn words_split_on_spaces_and_group_in_single_quotes_only() {
    assert_eq!(
        words("sed http \"\" service.yaml"),
        ["sed", "http", "\"\"", "service.yaml"]
    );
    assert_eq!(
        words("grep -q '^# cilium/synced/cluster3/cilium/state/services/v1$' synced.actual"),
        [
            "grep",
            "-q",
            "^# cilium/synced/cluster3/cilium/state/services/v1$",
            "synced.actual"
        ]
    );
    assert_eq!(words("echo 'it''s'  x"), ["echo", "it's", "x"]);
    assert_eq!(words("a'b c'd"), ["ab cd"]);
    assert!(split_words("echo 'open").is_err());
    // $VAR expands outside quotes only.
    let env = BTreeMap::from([("X".to_owned(), "1".to_owned())]);
    let w = split_words("$X '$X' ${X}y $").unwrap();
    let expanded: Vec<String> = w.iter().map(|w| w.expand(&env)).collect();
    assert_eq!(expanded, ["1", "$X", "1y", "$"]);
}

#[test]
fn a_comment_starts_a_section_and_prefixes_are_read() {
    let s = parse_script(
        "#! --cluster-id=3 --cluster-name=cluster3\n\nhive/start\n# wait\nk8s/add a.yaml\n* cmp x y\n! grep -q z y\n",
    )
    .unwrap();
    assert_eq!(s.flags, ["--cluster-id=3", "--cluster-name=cluster3"]);
    assert_eq!(s.sections.len(), 2);
    assert_eq!(s.sections[0].len(), 1);
    let c = &s.sections[1];
    assert_eq!((c[1].retry, c[1].negate, c[1].line), (true, false, 6));
    assert_eq!((c[2].retry, c[2].negate), (false, true));
    assert!(parse_script("*\n").is_err());
}

/// A component whose `probe` fails until it has run `passes_at` times, and that counts the
/// runs of `count`.
struct Probe {
    runs: usize,
    passes_at: usize,
    counted: usize,
}

impl Component for Probe {
    fn run(
        &mut self,
        words: &[String],
        _: &mut BTreeMap<String, String>,
        _: &BTreeMap<String, String>,
    ) -> Option<Result<(), String>> {
        match words[0].as_str() {
            "count" => {
                self.counted += 1;
                Some(Ok(()))
            }
            "probe" => {
                self.runs += 1;
                Some(if self.runs >= self.passes_at {
                    Ok(())
                } else {
                    Err("not yet".into())
                })
            }
            _ => None,
        }
    }
}

#[test]
fn a_failed_retry_runs_its_section_again_until_it_passes_or_the_deadline() {
    let script = parse_script("count\n# section\ncount\n* probe\ncount\n").unwrap();
    let mut p = Probe {
        runs: 0,
        passes_at: 3,
        counted: 0,
    };
    let mut files = BTreeMap::new();
    assert_eq!(
        run(&script, &mut files, &mut p, Duration::from_secs(10)),
        Outcome::Passed
    );
    // The first section once; the second three times up to the probe, then the last count.
    assert_eq!((p.runs, p.counted), (3, 1 + 3 + 1));
    let mut p = Probe {
        runs: 0,
        passes_at: 1000,
        counted: 0,
    };
    assert!(matches!(
        run(&script, &mut files, &mut p, Duration::from_millis(300)),
        Outcome::Failed(4, _)
    ));
    // `!`: a passing command fails the script; a failing one passes.
    let script = parse_script("! probe\n").unwrap();
    let mut p = Probe {
        runs: 0,
        passes_at: 1,
        counted: 0,
    };
    assert!(matches!(
        run(&script, &mut files, &mut p, Duration::from_secs(1)),
        Outcome::Failed(1, _)
    ));
    let mut p = Probe {
        runs: 0,
        passes_at: 5,
        counted: 0,
    };
    assert_eq!(
        run(&script, &mut files, &mut p, Duration::from_secs(1)),
        Outcome::Passed
    );
    // A command nobody has is reported, not failed.
    let script = parse_script("db/cmp frontends f.table\n").unwrap();
    assert_eq!(
        run(&script, &mut files, &mut p, Duration::from_secs(1)),
        Outcome::Unsupported("db/cmp frontends f.table".into())
    );
}

#[test]
fn the_file_commands_do_what_the_language_says() {
    let script = parse_script(
        "cp a b\nreplace 'x' 'y\\n' b\nsed '([0-9]+)' 'n$1' b\n! cmp a b\ncmp b c\ngrep -q '^y$' b\n! grep -q '^x' b\nempty e\n! empty a\nenv V=w\ncp $V d\n",
    )
    .unwrap();
    let mut files = BTreeMap::from([
        ("a".to_owned(), "x 12\n".to_owned()),
        ("c".to_owned(), "y\n n12\n".to_owned()),
        ("e".to_owned(), String::new()),
        ("w".to_owned(), "from w".to_owned()),
    ]);
    let mut p = Probe {
        runs: 0,
        passes_at: 0,
        counted: 0,
    };
    assert_eq!(
        run(&script, &mut files, &mut p, Duration::from_secs(1)),
        Outcome::Passed
    );
    assert_eq!(files["d"], "from w");
}

/// The files a command reads, and the one it writes.
fn reads_and_writes(words: &[String]) -> (Vec<String>, Option<String>) {
    let a = &words[1..];
    match (words[0].as_str(), a) {
        ("k8s/add" | "k8s/update" | "k8s/delete", files) => (files.to_vec(), None),
        ("kvstore/list", _) => (Vec::new(), Some(list_args(a).unwrap().2)),
        ("kvstore/update", [_, file]) | ("db/cmp", [_, file]) | ("empty", [file]) => {
            (vec![file.clone()], None)
        }
        ("cmp", [x, y]) => (vec![x.clone(), y.clone()], None),
        ("cp", [x, y]) => (vec![x.clone()], Some(y.clone())),
        ("replace" | "sed", [_, _, file]) => (vec![file.clone()], Some(file.clone())),
        ("grep", rest) => (vec![rest.last().unwrap().clone()], None),
        _ => (Vec::new(), None),
    }
}

#[test]
fn every_golden_archive_parses_and_names_only_files_it_has_or_makes() {
    let all = archives();
    assert_eq!(
        all.len(),
        23,
        "{:?}",
        all.iter().map(|a| &a.0).collect::<Vec<_>>()
    );
    for (name, text) in &all {
        let archive = parse_txtar(text);
        assert!(!archive.files.is_empty(), "{name}: no files");
        let script = parse_script(&archive.script).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            script
                .flags
                .iter()
                .any(|f| f.starts_with("--cluster-name=")),
            "{name}: {:?}",
            script.flags
        );
        let mut known: BTreeSet<String> = archive.files.keys().cloned().collect();
        for cmd in script.sections.iter().flatten() {
            let w: Vec<String> = cmd
                .words
                .iter()
                .map(|w| w.expand(&BTreeMap::new()))
                .collect();
            let (reads, writes) = reads_and_writes(&w);
            for f in reads {
                assert!(known.contains(&f), "{name} line {}: no file {f}", cmd.line);
            }
            known.extend(writes);
        }
    }
}

#[test]
fn json_indent_is_go_s() {
    assert_eq!(json_indent("{}").unwrap(), "{}");
    assert_eq!(json_indent("{\"a\":[]}").unwrap(), "{\n  \"a\": []\n}");
    assert_eq!(
        json_indent("{\"a\":{\"b\":[1,\"x,{}\"]},\"c\":null}").unwrap(),
        "{\n  \"a\": {\n    \"b\": [\n      1,\n      \"x,{}\"\n    ]\n  },\n  \"c\": null\n}"
    );
    assert_eq!(json_indent("\"a\\\"b\"").unwrap(), "\"a\\\"b\"");
    for bad in ["{", "{\"a\":1}}", "\"open"] {
        assert!(json_indent(bad).is_err(), "{bad}");
    }
}

#[test]
fn kvstore_list_reproduces_every_dump_cilium_expects() {
    let mut checked = 0;
    for (name, text) in archives() {
        let archive = parse_txtar(&text);
        let script = parse_script(&archive.script).unwrap();
        // Which format made each output file; each expected file it is compared with.
        let mut made: BTreeMap<String, ListFormat> = BTreeMap::new();
        let mut expected: BTreeMap<String, ListFormat> = BTreeMap::new();
        for cmd in script.sections.iter().flatten() {
            let w: Vec<String> = cmd
                .words
                .iter()
                .map(|w| w.expand(&BTreeMap::new()))
                .collect();
            match w[0].as_str() {
                "kvstore/list" => {
                    let (format, _, out) = list_args(&w[1..]).unwrap();
                    made.insert(out, format);
                }
                "cmp" if !cmd.negate => {
                    if let Some(f) = made.get(&w[1]) {
                        expected.insert(w[2].clone(), *f);
                    }
                }
                _ => {}
            }
        }
        for (file, format) in expected {
            let Some(want) = archive.files.get(&file) else {
                // Made at run time (cp, replace) from a file that is checked itself.
                continue;
            };
            // What the store holds: each value as Go stores it (compact JSON, or as written).
            let entries: Vec<(String, Vec<u8>)> = parse_list_output(want)
                .into_iter()
                .map(|(k, v)| {
                    let stored = match format {
                        ListFormat::Json => json_compact(&v),
                        ListFormat::Plain => v,
                    };
                    (k, stored.into_bytes())
                })
                .collect();
            let got = list_output(&entries, format).unwrap();
            assert_eq!(&got, want, "{name}: {file}");
            checked += 1;
        }
    }
    // Every expected dump of a `kvstore/list` output in the archives (38 of them).
    assert_eq!(checked, 38, "expected dumps checked");
}
