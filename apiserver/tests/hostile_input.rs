//! Decoders of untrusted input, fed arbitrary and mutated input (property tests, a bounded
//! number of cases per run): the manifest parser, Cilium's JSON for the objects a peer or a
//! store hands over, and the label-string form. Each returns a value or an error, never a
//! panic.

#![allow(clippy::unwrap_used, reason = "tests")]

use clustermesh_apiserver::source::manifest::{Loaded, parse_text};
use clustermesh_model::endpoint::IpCacheEntry;
use clustermesh_model::keys::Key;
use clustermesh_model::labels::LabelSet;
use clustermesh_model::node::Node;
use clustermesh_model::policy::NetworkPolicy;
use clustermesh_model::service::ClusterService;
use proptest::prelude::*;

const VALID: &str = include_str!("../../examples/mesh/c1.yaml");

fn parse(text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    parse_text("fuzz.yaml", text, &mut loaded);
    loaded
}

proptest! {
    #[test]
    fn arbitrary_text_is_objects_or_problems(text in "(?s).{0,600}") {
        let _ = parse(&text);
    }

    #[test]
    fn yaml_shaped_text_is_objects_or_problems(
        text in "(apiVersion: (v1|cilium.io/v2|discovery.k8s.io/v1)\nkind: [A-Za-z]{0,30}\n(metadata|spec|status): [\\[\\]{}:, a-z0-9\"'.-]{0,80}\n---\n){0,4}"
    ) {
        let _ = parse(&text);
    }

    #[test]
    fn a_cut_or_changed_valid_manifest_is_objects_or_problems(cut in 0usize..10_000, at in 0usize..10_000, byte in 32u8..127) {
        let cut = cut % VALID.len();
        let _ = parse(&VALID[..VALID.floor_char_boundary(cut)]);
        let mut bytes = VALID.as_bytes().to_vec();
        let at = at % bytes.len();
        bytes[at] = byte;
        if let Ok(text) = String::from_utf8(bytes) {
            let _ = parse(&text);
        }
    }

    #[test]
    fn cilium_json_and_label_strings_are_values_or_errors(text in "(?s).{0,300}") {
        let _ = serde_json::from_str::<IpCacheEntry>(&text);
        let _ = serde_json::from_str::<Node>(&text);
        let _ = serde_json::from_str::<ClusterService>(&text);
        let _ = serde_json::from_str::<NetworkPolicy>(&text);
        let _ = serde_json::from_str::<LabelSet>(&text);
        let _ = text.parse::<LabelSet>();
        let _ = Key::parse(&text);
    }

    #[test]
    fn json_shaped_objects_are_values_or_errors(
        ip in "[0-9a-f:.]{0,40}",
        id in any::<i64>(),
        name in "[a-z0-9.-]{0,70}",
        v in "[\\[\\]{}\":,0-9a-z]{0,40}",
    ) {
        let entry = format!(r#"{{"IP":"{ip}","ID":{id},"HostIP":"{ip}","K8sNamespace":"{name}","K8sPodName":"{name}","NamedPorts":{v}}}"#);
        let _ = serde_json::from_str::<IpCacheEntry>(&entry);
        let node = format!(r#"{{"Name":"{name}","Cluster":"{name}","ClusterID":{id},"IPAddresses":[{{"Type":"InternalIP","IP":"{ip}"}}],"IPv4AllocCIDR":"{ip}/{id}","Labels":{v}}}"#);
        let _ = serde_json::from_str::<Node>(&node);
    }
}
