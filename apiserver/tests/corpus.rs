//! The seed corpus of hostile input (`tests/corpus/`): manifests and kvstore values that broke,
//! or could break, a decoder. Each file is checked for its expected outcome (`good-*`: used
//! whole; `bad-*`: refused with a problem or an error), then mutated (cut, a byte changed, a
//! byte inserted) by property tests, which must give a value or an error and never panic. A new
//! finding goes into the corpus as a file; proptest's failing seeds go under
//! `proptest-regressions/`.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::{Path, PathBuf};

use clustermesh_apiserver::source::manifest::ManifestDir;
use clustermesh_model::endpoint::IpCacheEntry;
use clustermesh_model::keys::Key;
use clustermesh_model::labels::LabelSet;
use clustermesh_model::node::Node;
use clustermesh_model::service::ClusterService;
use proptest::prelude::*;

fn corpus(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "the {kind} corpus is missing");
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_str().unwrap().to_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// A manifest file read as the apiserver reads it: through the manifest directory.
fn read_manifest(name: &str, bytes: &[u8]) -> (usize, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let ext = Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("yaml");
    std::fs::write(dir.path().join(format!("f.{ext}")), bytes).unwrap();
    let loaded = ManifestDir::new(dir.path()).poll().unwrap().unwrap();
    let o = &loaded.objects;
    let objects = o.namespaces.len()
        + o.pods.len()
        + o.services.len()
        + o.endpoint_slices.len()
        + o.nodes.len()
        + o.policies.len();
    (
        objects,
        loaded.problems.iter().map(|p| p.to_string()).collect(),
    )
}

/// Decodes a kvstore corpus file as the kind its name says; whether it was accepted.
fn decode_value(name: &str, bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let kind = name.split(['-', '.']).nth(1).unwrap_or_default();
    match kind {
        "ipcache" => serde_json::from_slice::<IpCacheEntry>(bytes).is_ok(),
        "node" => serde_json::from_slice::<Node>(bytes).is_ok(),
        "service" => serde_json::from_slice::<ClusterService>(bytes).is_ok(),
        "labels" => text.parse::<LabelSet>().is_ok(),
        "key" => Key::parse(&text).is_ok(),
        other => panic!("{name}: no decoder for {other:?}"),
    }
}

/// Why each bad manifest of the corpus is refused: the guard it is there to exercise.
fn expected_problem(name: &str) -> &'static str {
    match name {
        "bad-billion-laughs.yaml" => "repetition limit exceeded",
        "bad-deep-block.yaml" | "bad-merge-key-loop.yaml" => "recursion limit exceeded",
        "bad-deep-flow.yaml" | "bad-json-deep.json" => "nests brackets deeper than 128 levels",
        "bad-duplicate-keys.yaml" => "duplicate entry with key",
        "bad-huge-port.yaml" => "invalid type: integer `99999999999999999999999`",
        "bad-invalid-utf8.yaml" => "is not UTF-8",
        "bad-ip-forms.yaml" => "\"010.001.0.1\" is not an IP address",
        "bad-typo-field.yaml" => "unknown field `fromEndpoint`",
        "bad-long-name.yaml" => "v1 Namespace: namespace \"aaaa",
        "bad-negative-port.yaml" => "port -80 is not 1..=65535",
        "bad-nul-bytes.yaml" => "control characters are not allowed",
        "bad-selector-expression.yaml" => "unknown variant `Bogus`",
        "bad-tags.yaml" => "is not a supported kind",
        "bad-truncated-policy.yaml" => "did not find expected ',' or '}'",
        other => panic!("{other}: add the problem this corpus file must be refused with"),
    }
}

#[test]
fn every_corpus_manifest_has_its_expected_outcome() {
    for (name, bytes) in corpus("manifests") {
        let (objects, problems) = read_manifest(&name, &bytes);
        if name.starts_with("good-") {
            assert!(
                objects > 0 && problems.is_empty(),
                "{name}: {objects} objects, problems {problems:?}"
            );
        } else {
            let why = expected_problem(&name);
            assert!(
                problems.len() == 1 && problems[0].contains(why),
                "{name}: expected one problem saying {why:?}, got {problems:?}"
            );
        }
    }
}

#[test]
fn every_corpus_value_has_its_expected_outcome() {
    for (name, bytes) in corpus("kvstore") {
        assert_eq!(
            decode_value(&name, &bytes),
            name.starts_with("good-"),
            "{name}"
        );
    }
}

/// `bytes` cut at `cut`, with the byte at `at` changed to `byte`, and `byte` inserted at
/// `insert` (positions taken modulo the length).
fn mutate(bytes: &[u8], cut: usize, at: usize, byte: u8, insert: usize) -> Vec<Vec<u8>> {
    let len = bytes.len().max(1);
    let mut changed = bytes.to_vec();
    if !changed.is_empty() {
        changed[at % len] = byte;
    }
    let mut inserted = bytes.to_vec();
    inserted.insert(insert % (bytes.len() + 1), byte);
    vec![bytes[..cut % len].to_vec(), changed, inserted]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn mutated_corpus_manifests_are_objects_or_problems(
        file in any::<prop::sample::Index>(),
        cut in any::<usize>(),
        at in any::<usize>(),
        byte in any::<u8>(),
        insert in any::<usize>(),
    ) {
        let files = corpus("manifests");
        let (name, bytes) = &files[file.index(files.len())];
        for m in mutate(bytes, cut, at, byte, insert) {
            let _ = read_manifest(name, &m);
        }
    }

    #[test]
    fn mutated_corpus_values_are_values_or_errors(
        file in any::<prop::sample::Index>(),
        cut in any::<usize>(),
        at in any::<usize>(),
        byte in any::<u8>(),
        insert in any::<usize>(),
    ) {
        let files = corpus("kvstore");
        let (name, bytes) = &files[file.index(files.len())];
        for m in mutate(bytes, cut, at, byte, insert) {
            let _ = decode_value(name, &m);
        }
    }
}
