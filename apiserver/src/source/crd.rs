//! The CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy custom resources, derived with
//! `kube::CustomResource` from the model's policy rule, and their CRDs as the Helm chart
//! ships them (`charts/clustermesh/files/crds/`, kept equal to [`crd_yaml`] by a test).
//!
//! Cilium's resources hold one rule in `spec` or several in `specs`; the derive knows `spec`
//! only, so `specs` is added to the generated schema with the same rule schema. Both keep
//! unknown fields (`x-kubernetes-preserve-unknown-fields`): Cilium accepts more than
//! clustermesh enforces, and the API server must neither reject nor silently prune a field
//! that the source then reports as unsupported.

use clustermesh_model::policy::PolicyRule;
use kube::CustomResource;
use kube::CustomResourceExt;
use serde::{Deserialize, Serialize};

/// One rule of a CiliumNetworkPolicy.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, schemars::JsonSchema)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumNetworkPolicy",
    plural = "ciliumnetworkpolicies",
    shortname = "cnp",
    category = "cilium",
    category = "ciliumpolicy",
    namespaced
)]
pub struct CiliumNetworkPolicySpec {
    /// The rule.
    #[serde(flatten)]
    pub rule: PolicyRule,
}

/// One rule of a CiliumClusterwideNetworkPolicy.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, schemars::JsonSchema)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumClusterwideNetworkPolicy",
    plural = "ciliumclusterwidenetworkpolicies",
    shortname = "ccnp",
    category = "cilium",
    category = "ciliumpolicy"
)]
pub struct CiliumClusterwideNetworkPolicySpec {
    /// The rule.
    #[serde(flatten)]
    pub rule: PolicyRule,
}

/// Adds `specs` beside `spec`, makes neither required, keeps unknown fields.
fn finish(mut crd: serde_json::Value) -> serde_json::Value {
    if let Some(versions) = crd["spec"]["versions"].as_array_mut() {
        for v in versions {
            let schema = &mut v["schema"]["openAPIV3Schema"];
            let mut rule = schema["properties"]["spec"].clone();
            rule["x-kubernetes-preserve-unknown-fields"] = true.into();
            if let Some(props) = schema["properties"].as_object_mut() {
                props.insert("spec".into(), rule.clone());
                props.insert(
                    "specs".into(),
                    serde_json::json!({
                        "description": "Several rules, each as in spec.",
                        "type": "array",
                        "items": rule,
                    }),
                );
            }
            if let Some(obj) = schema.as_object_mut() {
                obj.remove("required");
            }
        }
    }
    crd["metadata"]["labels"] = serde_json::json!({"app.kubernetes.io/name": "clustermesh"});
    crd
}

/// The chart's CRD files: file name and YAML.
pub fn crd_yaml() -> Vec<(&'static str, String)> {
    let render = |crd: serde_json::Value| {
        let header = "# Generated from the types in apiserver/src/source/crd.rs; do not edit.\n# Regenerate: CLUSTERMESH_UPDATE_CRDS=1 cargo test -p clustermesh-apiserver crd\n";
        let body = serde_yaml_ng::to_string(&finish(crd)).unwrap_or_default();
        format!("{header}{body}")
    };
    let json = |c: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        serde_json::to_value(c).unwrap_or_default()
    };
    vec![
        (
            "ciliumnetworkpolicies.yaml",
            render(json(CiliumNetworkPolicy::crd())),
        ),
        (
            "ciliumclusterwidenetworkpolicies.yaml",
            render(json(CiliumClusterwideNetworkPolicy::crd())),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chart ships exactly what the types generate.
    #[test]
    fn crd_files_in_the_chart_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/clustermesh/files/crds");
        let update = std::env::var_os("CLUSTERMESH_UPDATE_CRDS").is_some();
        for (file, yaml) in crd_yaml() {
            let path = dir.join(file);
            if update {
                std::fs::write(&path, &yaml).unwrap();
            }
            let shipped = std::fs::read_to_string(&path).unwrap();
            assert_eq!(
                shipped, yaml,
                "{file} differs from the types; regenerate with CLUSTERMESH_UPDATE_CRDS=1"
            );
        }
    }

    #[test]
    fn the_schema_knows_the_rule_and_keeps_the_rest() {
        let crd = finish(serde_json::to_value(CiliumNetworkPolicy::crd()).unwrap());
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let spec = &schema["properties"]["spec"];
        assert_eq!(spec["x-kubernetes-preserve-unknown-fields"], true);
        assert!(spec["properties"]["endpointSelector"].is_object(), "{spec}");
        assert!(spec["properties"]["ingressDeny"].is_object(), "{spec}");
        assert_eq!(schema["properties"]["specs"]["items"], *spec);
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let ccnp = serde_json::to_value(CiliumClusterwideNetworkPolicy::crd()).unwrap();
        assert_eq!(ccnp["spec"]["scope"], "Cluster");
    }
}
