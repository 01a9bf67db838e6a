//! The tests of `clustermesh connectivity test`: Cilium's multi-cluster connectivity tests
//! that need no L7 proxy and no DNS, with their scenarios and expected verdicts as cilium-cli
//! defines them (`cilium-cli/connectivity/builder/<test>.go`; restated in
//! `connectivity/README.md`). The policies are Cilium's files, unchanged, from
//! `connectivity/manifests/`.

/// The test pods (namespace `cilium-test`), as cilium-cli deploys them in multi-cluster mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TestPod {
    /// The pod's name (also its service account's, as cilium-cli names them).
    pub(crate) name: &'static str,
    /// Its labels.
    pub(crate) labels: &'static [(&'static str, &'static str)],
    /// In the destination cluster (else the source cluster).
    pub(crate) remote: bool,
    /// Serves TCP 8080 (container port named `http-8080`).
    pub(crate) echo: bool,
}

impl TestPod {
    /// Whether it carries `key=value`.
    pub(crate) fn has(&self, key: &str, value: &str) -> bool {
        self.labels.iter().any(|(k, v)| *k == key && *v == value)
    }
}

/// The namespace of the test pods and policies.
pub(crate) const NAMESPACE: &str = "cilium-test";
/// The echo pods' port.
pub(crate) const ECHO_PORT: u16 = 8080;

pub(crate) const CLIENT: TestPod = TestPod {
    name: "client",
    labels: &[("name", "client"), ("kind", "client")],
    remote: false,
    echo: false,
};
pub(crate) const CLIENT2: TestPod = TestPod {
    name: "client2",
    labels: &[("name", "client2"), ("kind", "client"), ("other", "client")],
    remote: false,
    echo: false,
};
pub(crate) const ECHO_SAME_NODE: TestPod = TestPod {
    name: "echo-same-node",
    labels: &[
        ("name", "echo-same-node"),
        ("kind", "echo"),
        ("other", "echo"),
    ],
    remote: false,
    echo: true,
};
pub(crate) const ECHO_OTHER_NODE: TestPod = TestPod {
    name: "echo-other-node",
    labels: &[
        ("name", "echo-other-node"),
        ("kind", "echo"),
        ("first", "echo"),
    ],
    remote: true,
    echo: true,
};

/// Every test pod, in address order (the n-th gets the n-th address).
pub(crate) const PODS: [TestPod; 4] = [CLIENT, CLIENT2, ECHO_SAME_NODE, ECHO_OTHER_NODE];
/// The client pods (in the source cluster).
pub(crate) const CLIENTS: [TestPod; 2] = [CLIENT, CLIENT2];
/// The echo pods (one per cluster).
pub(crate) const ECHOES: [TestPod; 2] = [ECHO_SAME_NODE, ECHO_OTHER_NODE];

/// One step of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// TCP to the echo pod's address, port 8080.
    PodToPod(TestPod, TestPod),
    /// ICMP echo request to the other client's address.
    ClientToClient(TestPod, TestPod),
    /// TCP to the echo pod's Service (its VIP, port 8080), through the socket load balancer.
    PodToService(TestPod, TestPod),
}

impl Action {
    /// The source pod.
    pub(crate) fn source(&self) -> TestPod {
        match self {
            Self::PodToPod(s, _) | Self::ClientToClient(s, _) | Self::PodToService(s, _) => *s,
        }
    }

    /// The destination pod (behind the Service for pod-to-service).
    pub(crate) fn destination(&self) -> TestPod {
        match self {
            Self::PodToPod(_, d) | Self::ClientToClient(_, d) | Self::PodToService(_, d) => *d,
        }
    }

    /// The scenario's name, as cilium-cli names it.
    pub(crate) fn scenario(&self) -> &'static str {
        match self {
            Self::PodToPod(..) => "pod-to-pod",
            Self::ClientToClient(..) => "client-to-client",
            Self::PodToService(..) => "pod-to-service",
        }
    }

    /// The destination port (none for ICMP).
    pub(crate) fn port(&self) -> Option<u16> {
        match self {
            Self::ClientToClient(..) => None,
            _ => Some(ECHO_PORT),
        }
    }

    /// `pod-to-pod client -> cilium-test/echo-same-node:8080`.
    pub(crate) fn describe(&self) -> String {
        let (s, d) = (self.source(), self.destination());
        match self {
            Self::PodToPod(..) => format!(
                "pod-to-pod {} -> {NAMESPACE}/{}:{ECHO_PORT} (TCP)",
                s.name, d.name
            ),
            Self::ClientToClient(..) => {
                format!(
                    "client-to-client {} -> {NAMESPACE}/{} (ICMP echo)",
                    s.name, d.name
                )
            }
            Self::PodToService(..) => format!(
                "pod-to-service {} -> service {NAMESPACE}/{}:{ECHO_PORT} (TCP)",
                s.name, d.name
            ),
        }
    }
}

/// Where a connection is dropped, and by what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropAt {
    /// No egress rule of the source allows it (default deny at egress).
    DefaultEgress,
    /// An egress deny rule of the source.
    DenyEgress,
    /// No ingress rule of the destination allows it.
    DefaultIngress,
    /// An ingress deny rule of the destination.
    DenyIngress,
}

impl DropAt {
    /// `egress` or `ingress`, as verdict events name the direction.
    pub(crate) fn direction(self) -> &'static str {
        match self {
            Self::DefaultEgress | Self::DenyEgress => "egress",
            Self::DefaultIngress | Self::DenyIngress => "ingress",
        }
    }

    /// Whether a deny rule (not the default deny) drops it.
    pub(crate) fn by_deny_rule(self) -> bool {
        matches!(self, Self::DenyEgress | Self::DenyIngress)
    }

    /// `dropped at egress (default deny)`.
    pub(crate) fn describe(self) -> String {
        format!(
            "dropped at {} ({})",
            self.direction(),
            if self.by_deny_rule() {
                "deny rule"
            } else {
                "default deny"
            }
        )
    }
}

/// What an action must give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// The connection succeeds (the echo pod answers, or the ping is answered).
    Ok,
    /// It is dropped, as said.
    Drop(DropAt),
}

impl Expect {
    pub(crate) fn describe(self) -> String {
        match self {
            Self::Ok => "ok".to_owned(),
            Self::Drop(d) => d.describe(),
        }
    }
}

/// A scenario of a test, with cilium-cli's source and destination filters.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scenario {
    /// Every client to every echo pod (both clusters), optionally only from / to pods with a
    /// label (`WithSourceLabelsOption` / `WithDestinationLabelsOption`).
    PodToPod {
        from: Option<(&'static str, &'static str)>,
        to: Option<(&'static str, &'static str)>,
    },
    /// client -> client2 and client2 -> client.
    ClientToClient,
    /// Every client to every echo Service.
    PodToService,
}

const POD_TO_POD: Scenario = Scenario::PodToPod {
    from: None,
    to: None,
};

impl Scenario {
    fn actions(self) -> Vec<Action> {
        let keeps = |p: &TestPod, l: Option<(&str, &str)>| l.is_none_or(|(k, v)| p.has(k, v));
        match self {
            Self::PodToPod { from, to } => CLIENTS
                .iter()
                .filter(|s| keeps(s, from))
                .flat_map(|s| {
                    ECHOES
                        .iter()
                        .filter(move |d| keeps(d, to))
                        .map(move |d| Action::PodToPod(*s, *d))
                })
                .collect(),
            Self::ClientToClient => vec![
                Action::ClientToClient(CLIENT, CLIENT2),
                Action::ClientToClient(CLIENT2, CLIENT),
            ],
            Self::PodToService => CLIENTS
                .iter()
                .flat_map(|s| ECHOES.iter().map(move |d| Action::PodToService(*s, *d)))
                .collect(),
        }
    }
}

/// One test of the suite.
pub(crate) struct Test {
    /// cilium-cli's name for it.
    pub(crate) name: &'static str,
    /// The policy files (from `connectivity/manifests/`) applied while it runs.
    pub(crate) policies: &'static [&'static str],
    /// Its scenarios.
    scenarios: &'static [Scenario],
    /// The expected verdict of an action.
    expect: fn(&Action) -> Expect,
}

impl Test {
    /// Every action with its expectation.
    pub(crate) fn actions(&self) -> Vec<(Action, Expect)> {
        let mut out: Vec<(Action, Expect)> = Vec::new();
        for s in self.scenarios {
            for a in s.actions() {
                if !out.iter().any(|(b, _)| *b == a) {
                    out.push((a, (self.expect)(&a)));
                }
            }
        }
        out
    }
}

fn all_ok(_: &Action) -> Expect {
    Expect::Ok
}

/// The policy files, embedded: `(file name, text)`.
pub(crate) fn policy_file(name: &str) -> Option<&'static str> {
    macro_rules! files {
        ($($f:literal),* $(,)?) => {
            &[$(($f, include_str!(concat!("../../../connectivity/manifests/", $f, ".yaml")))),*]
        };
    }
    const FILES: &[(&str, &str)] = files!(
        "allow-all-egress",
        "allow-all-ingress",
        "allow-cluster-entity",
        "client-egress-to-echo-deny-port-range",
        "client-egress-to-echo-deny",
        "client-egress-to-echo-expression-deny-port-range",
        "client-egress-to-echo-expression-deny",
        "client-egress-to-echo-expression-knp-port-range",
        "client-egress-to-echo-expression-knp",
        "client-egress-to-echo-expression-port-range",
        "client-egress-to-echo-expression",
        "client-egress-to-echo-knp",
        "client-egress-to-echo-named-port-deny",
        "client-egress-to-echo-no-cluster-policy",
        "client-egress-to-echo-service-account-deny-port-range",
        "client-egress-to-echo-service-account-deny",
        "client-egress-to-echo-service-account-port-range",
        "client-egress-to-echo-service-account",
        "client-egress-to-echo",
        "client-ingress-from-client2-knp",
        "client-ingress-from-client2",
        "client-with-service-account-egress-to-echo-deny-port-range",
        "client-with-service-account-egress-to-echo-deny",
        "client-with-service-account-egress-to-echo-port-range",
        "client-with-service-account-egress-to-echo",
        "deny-all-egress-knp",
        "deny-all-egress",
        "deny-all-entities",
        "deny-all-ingress-knp",
        "deny-all-ingress",
        "echo-ingress-from-other-client-deny",
        "echo-ingress-from-other-client-knp",
        "echo-ingress-from-other-client",
        "echo-ingress-icmp-deny",
        "echo-ingress-icmp",
    );
    FILES.iter().find(|(f, _)| *f == name).map(|(_, t)| *t)
}

/// Ingress from a client without `other=client` is not allowed (client-ingress and its
/// variants).
fn only_other_client_in(a: &Action) -> Expect {
    if a.source().has("other", "client") {
        Expect::Ok
    } else {
        Expect::Drop(DropAt::DefaultIngress)
    }
}

/// echo-ingress: an echo pod admits only sources with `other=client`.
fn echo_only_from_other_client(a: &Action) -> Expect {
    if a.destination().has("kind", "echo") && !a.source().has("other", "client") {
        Expect::Drop(DropAt::DefaultIngress)
    } else {
        Expect::Ok
    }
}

/// Egress allowed to echo-same-node only (a service-account or local-cluster selector).
fn only_echo_same_node_out(a: &Action) -> Expect {
    if a.destination().has("name", "echo-same-node") {
        Expect::Ok
    } else {
        Expect::Drop(DropAt::DefaultEgress)
    }
}

/// An egress deny from name=client to the echo pods.
fn deny_client_to_echo_out(a: &Action) -> Expect {
    if a.destination().has("kind", "echo") && a.source().has("name", "client") {
        Expect::Drop(DropAt::DenyEgress)
    } else {
        Expect::Ok
    }
}

const ALLOW_ALL: [&str; 2] = ["allow-all-egress", "allow-all-ingress"];

macro_rules! with_allow_all {
    ($f:literal) => {
        &[ALLOW_ALL[0], ALLOW_ALL[1], $f]
    };
}

/// The suite, in cilium-cli's order.
pub(crate) const TESTS: &[Test] = &[
    Test {
        name: "no-policies",
        policies: &[],
        scenarios: &[POD_TO_POD, Scenario::ClientToClient, Scenario::PodToService],
        expect: all_ok,
    },
    Test {
        name: "client-ingress",
        policies: &["client-ingress-from-client2"],
        scenarios: &[Scenario::ClientToClient],
        expect: only_other_client_in,
    },
    Test {
        name: "client-ingress-knp",
        policies: &["client-ingress-from-client2-knp"],
        scenarios: &[Scenario::ClientToClient],
        expect: only_other_client_in,
    },
    Test {
        name: "all-ingress-deny",
        policies: &["deny-all-ingress"],
        scenarios: &[POD_TO_POD],
        expect: |_| Expect::Drop(DropAt::DefaultIngress),
    },
    Test {
        name: "all-ingress-deny-knp",
        policies: &["deny-all-ingress-knp"],
        scenarios: &[POD_TO_POD],
        expect: |_| Expect::Drop(DropAt::DefaultIngress),
    },
    Test {
        name: "all-egress-deny",
        policies: &["deny-all-egress"],
        scenarios: &[POD_TO_POD],
        expect: |_| Expect::Drop(DropAt::DefaultEgress),
    },
    Test {
        name: "all-egress-deny-knp",
        policies: &["deny-all-egress-knp"],
        scenarios: &[POD_TO_POD],
        expect: |_| Expect::Drop(DropAt::DefaultEgress),
    },
    Test {
        name: "all-entities-deny",
        policies: &["deny-all-entities"],
        scenarios: &[POD_TO_POD],
        expect: |_| Expect::Drop(DropAt::DenyEgress),
    },
    Test {
        name: "cluster-entity",
        policies: &["allow-cluster-entity"],
        scenarios: &[Scenario::PodToPod {
            from: None,
            to: Some(("name", "echo-same-node")),
        }],
        expect: all_ok,
    },
    Test {
        name: "cluster-entity-multi-cluster",
        policies: &["allow-cluster-entity"],
        scenarios: &[Scenario::PodToPod {
            from: None,
            to: Some(("name", "echo-other-node")),
        }],
        expect: |_| Expect::Drop(DropAt::DefaultEgress),
    },
    Test {
        name: "echo-ingress",
        policies: &["echo-ingress-from-other-client"],
        scenarios: &[POD_TO_POD],
        expect: echo_only_from_other_client,
    },
    Test {
        name: "echo-ingress-knp",
        policies: &["echo-ingress-from-other-client-knp"],
        scenarios: &[POD_TO_POD],
        expect: echo_only_from_other_client,
    },
    Test {
        name: "client-egress",
        policies: &["client-egress-to-echo"],
        scenarios: &[POD_TO_POD],
        expect: all_ok,
    },
    Test {
        name: "client-egress-knp",
        policies: &["client-egress-to-echo-knp"],
        scenarios: &[POD_TO_POD],
        expect: all_ok,
    },
    Test {
        name: "client-egress-expression",
        policies: &["client-egress-to-echo-expression"],
        scenarios: &[POD_TO_POD],
        expect: all_ok,
    },
    Test {
        name: "client-egress-expression-port-range",
        policies: &["client-egress-to-echo-expression-port-range"],
        scenarios: &[POD_TO_POD],
        expect: all_ok,
    },
    Test {
        name: "client-egress-expression-knp",
        policies: &["client-egress-to-echo-expression-knp"],
        scenarios: &[POD_TO_POD],
        expect: all_ok,
    },
    Test {
        name: "client-egress-expression-knp-port-range",
        policies: &["client-egress-to-echo-expression-knp-port-range"],
        scenarios: &[POD_TO_POD],
        expect: all_ok,
    },
    Test {
        name: "client-with-service-account-egress-to-echo",
        policies: &["client-with-service-account-egress-to-echo"],
        scenarios: &[Scenario::PodToPod {
            from: Some(("kind", "client")),
            to: None,
        }],
        expect: all_ok,
    },
    Test {
        name: "client-with-service-account-egress-to-echo-port-range",
        policies: &["client-with-service-account-egress-to-echo-port-range"],
        scenarios: &[Scenario::PodToPod {
            from: Some(("kind", "client")),
            to: None,
        }],
        expect: all_ok,
    },
    Test {
        name: "client-egress-to-echo-service-account",
        policies: &["client-egress-to-echo-service-account"],
        scenarios: &[Scenario::PodToPod {
            from: Some(("kind", "client")),
            to: None,
        }],
        expect: only_echo_same_node_out,
    },
    Test {
        name: "client-egress-to-echo-service-account-port-range",
        policies: &["client-egress-to-echo-service-account-port-range"],
        scenarios: &[Scenario::PodToPod {
            from: Some(("kind", "client")),
            to: None,
        }],
        expect: only_echo_same_node_out,
    },
    Test {
        name: "echo-ingress-from-other-client-deny",
        policies: with_allow_all!("echo-ingress-from-other-client-deny"),
        scenarios: &[
            Scenario::PodToPod {
                from: Some(("name", "client")),
                to: None,
            },
            Scenario::PodToPod {
                from: Some(("name", "client2")),
                to: None,
            },
            Scenario::ClientToClient,
        ],
        expect: |a| {
            if a.source().has("other", "client") && a.destination().has("kind", "echo") {
                Expect::Drop(DropAt::DenyIngress)
            } else {
                Expect::Ok
            }
        },
    },
    Test {
        name: "client-egress-to-echo-deny",
        policies: with_allow_all!("client-egress-to-echo-deny"),
        scenarios: &[Scenario::ClientToClient, POD_TO_POD],
        expect: client_to_echo_8080_denied,
    },
    Test {
        name: "client-egress-to-echo-deny-port-range",
        policies: with_allow_all!("client-egress-to-echo-deny-port-range"),
        scenarios: &[Scenario::ClientToClient, POD_TO_POD],
        expect: client_to_echo_8080_denied,
    },
    Test {
        name: "client-ingress-to-echo-named-port-deny",
        policies: with_allow_all!("client-egress-to-echo-named-port-deny"),
        scenarios: &[
            Scenario::PodToPod {
                from: Some(("name", "client")),
                to: None,
            },
            Scenario::PodToPod {
                from: Some(("name", "client2")),
                to: None,
            },
        ],
        expect: |a| {
            if a.destination().has("kind", "echo") && a.source().has("name", "client") {
                Expect::Drop(DropAt::DenyIngress)
            } else {
                Expect::Ok
            }
        },
    },
    Test {
        name: "client-egress-to-echo-expression-deny",
        policies: with_allow_all!("client-egress-to-echo-expression-deny"),
        scenarios: &[POD_TO_POD],
        expect: deny_client_to_echo_out,
    },
    Test {
        name: "client-egress-to-echo-expression-deny-port-range",
        policies: with_allow_all!("client-egress-to-echo-expression-deny-port-range"),
        scenarios: &[POD_TO_POD],
        expect: deny_client_to_echo_out,
    },
    Test {
        name: "client-with-service-account-egress-to-echo-deny",
        policies: with_allow_all!("client-with-service-account-egress-to-echo-deny"),
        scenarios: &[POD_TO_POD],
        expect: deny_client_to_echo_out,
    },
    Test {
        name: "client-with-service-account-egress-to-echo-deny-port-range",
        policies: with_allow_all!("client-with-service-account-egress-to-echo-deny-port-range"),
        scenarios: &[POD_TO_POD],
        expect: deny_client_to_echo_out,
    },
    Test {
        name: "client-egress-to-echo-service-account-deny",
        policies: with_allow_all!("client-egress-to-echo-service-account-deny"),
        scenarios: &[Scenario::PodToPod {
            from: Some(("name", "client")),
            to: None,
        }],
        expect: echo_same_node_denied_out,
    },
    Test {
        name: "client-egress-to-echo-service-account-deny-port-range",
        policies: with_allow_all!("client-egress-to-echo-service-account-deny-port-range"),
        scenarios: &[Scenario::PodToPod {
            from: Some(("name", "client")),
            to: None,
        }],
        expect: echo_same_node_denied_out,
    },
    Test {
        name: "client-ingress-icmp",
        policies: &["echo-ingress-icmp"],
        scenarios: &[Scenario::ClientToClient],
        expect: only_other_client_in,
    },
    Test {
        name: "client-ingress-from-other-client-icmp-deny",
        policies: with_allow_all!("echo-ingress-icmp-deny"),
        scenarios: &[POD_TO_POD, Scenario::ClientToClient],
        expect: |a| {
            if a.source().has("other", "client") && a.destination().has("kind", "client") {
                Expect::Drop(DropAt::DenyIngress)
            } else {
                Expect::Ok
            }
        },
    },
    Test {
        name: "policy-local-cluster-egress",
        policies: &["client-egress-to-echo-no-cluster-policy"],
        scenarios: &[POD_TO_POD],
        expect: only_echo_same_node_out,
    },
];

/// client-egress-to-echo-deny: kind=client to an echo pod on 8080 is denied at egress.
fn client_to_echo_8080_denied(a: &Action) -> Expect {
    if a.source().has("kind", "client")
        && a.destination().has("kind", "echo")
        && a.port() == Some(ECHO_PORT)
    {
        Expect::Drop(DropAt::DenyEgress)
    } else {
        Expect::Ok
    }
}

/// client-egress-to-echo-service-account-deny: to echo-same-node's service account denied.
fn echo_same_node_denied_out(a: &Action) -> Expect {
    if a.destination().has("name", "echo-same-node") {
        Expect::Drop(DropAt::DenyEgress)
    } else {
        Expect::Ok
    }
}

#[cfg(test)]
mod tests;
