//! What a hostile peer can send: arbitrary bytes as an Export event, and valid events whose
//! fields are arbitrary. Decoding and conversion to the model return a value or an error,
//! never a panic; whatever converts passes the model's own validation of what it claims.

#![allow(clippy::unwrap_used, reason = "tests")]

use clustermesh_proto::Object;
use clustermesh_proto::v1::{self, watch_event::Event as Ev};
use proptest::prelude::*;
use prost::Message as _;

fn convert(event: &v1::WatchEvent) {
    if let Some(Ev::Upsert(u)) = &event.event {
        // A value or an error; both are fine, a panic is not.
        let _ = Object::try_from(u);
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_are_an_error_or_an_event(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(event) = v1::WatchEvent::decode(bytes.as_slice()) {
            convert(&event);
        }
    }

    #[test]
    fn arbitrary_fields_of_every_kind_convert_or_are_refused(
        cluster in ".{0,70}",
        name in ".{0,80}",
        ip in ".{0,45}",
        id in any::<u32>(),
        port in any::<u32>(),
        text in ".{0,40}",
    ) {
        let ports = vec![v1::ServicePort { name: text.clone(), protocol: text.clone(), port }];
        let objects = [
            v1::upsert::Object::Ipcache(v1::IpCacheEntry {
                cluster: cluster.clone(),
                ip: ip.clone(),
                identity: id,
                host_ip: ip.clone(),
                namespace: name.clone(),
                pod_name: name.clone(),
                named_ports: vec![v1::NamedPort { name: text.clone(), port, protocol: text.clone() }],
            }),
            v1::upsert::Object::Identity(v1::Identity {
                cluster: cluster.clone(),
                id,
                labels: vec![v1::Label { source: text.clone(), key: name.clone(), value: text.clone() }],
            }),
            v1::upsert::Object::Node(v1::Node {
                name: name.clone(),
                cluster: cluster.clone(),
                cluster_id: id,
                addresses: vec![v1::NodeAddress { r#type: text.clone(), ip: ip.clone() }],
                ..Default::default()
            }),
            v1::upsert::Object::Service(v1::Service {
                cluster: cluster.clone(),
                namespace: name.clone(),
                name: name.clone(),
                frontends: vec![v1::Frontend { ip: ip.clone(), ports: ports.clone() }],
                backends: vec![v1::Backend { ip: ip.clone(), ports, ready: true, serving: true, terminating: false }],
                cluster_id: id,
                affinity: text.clone(),
                ..Default::default()
            }),
        ];
        for object in objects {
            let event = v1::WatchEvent {
                revision: i64::from(id),
                event: Some(Ev::Upsert(v1::Upsert { object: Some(object) })), origin: None,
            };
            // Also through the wire, as a peer would send it.
            let wire = v1::WatchEvent::decode(event.encode_to_vec().as_slice()).unwrap();
            convert(&wire);
        }
    }
}
