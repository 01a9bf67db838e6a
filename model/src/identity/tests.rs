use super::*;
use MaxConnectedClusters::{C255, C511};

fn cid(id: u32, mode: MaxConnectedClusters) -> ClusterId {
    ClusterId::new(id, mode).unwrap()
}

#[test]
fn cluster_ranges_in_both_modes() {
    assert_eq!(cluster_range(cid(1, C255), C255), 65_536..=131_071);
    assert_eq!(cluster_range(cid(255, C255), C255), 16_711_680..=16_777_215);
    assert_eq!(cluster_range(cid(1, C511), C511), 32_768..=65_535);
    assert_eq!(cluster_range(cid(511, C511), C511), 16_744_448..=16_777_215);
    assert_eq!(allocatable_range(cid(1, C255), C255).count(), 65_535);
    assert_eq!(allocatable_range(cid(1, C511), C511).count(), 32_767);
}

#[test]
fn cluster_of_identity() {
    let cases: &[(u32, MaxConnectedClusters, Option<u16>)] = &[
        (1, C255, None),
        (255, C255, None),
        (65_536, C255, Some(1)),
        (131_071, C255, Some(1)),
        (131_072, C255, Some(2)),
        (16_777_215, C255, Some(255)),
        (32_768, C511, Some(1)),
        (65_536, C511, Some(2)),
        (16_777_215, C511, Some(511)),
        // Between 256 and the first cluster's range: cluster bits are 0, which is no cluster.
        (300, C255, None),
    ];
    for (raw, mode, want) in cases {
        let got = Identity::new(*raw)
            .unwrap()
            .cluster_id(*mode)
            .map(ClusterId::get);
        assert_eq!(got, *want, "{raw} in {mode}");
    }
}

#[test]
fn identity_must_fit_24_bits() {
    assert_eq!(Identity::new(16_777_215).map(Identity::get), Ok(16_777_215));
    assert_eq!(
        Identity::new(16_777_216),
        Err(IdentityError::TooLarge(16_777_216))
    );
    assert!(serde_json::from_str::<Identity>("16777216").is_err());
}

#[test]
fn reserved_identities_have_cilium_numbers() {
    let got: Vec<(u32, &str)> = ReservedIdentity::ALL
        .iter()
        .map(|r| (r.identity().get(), r.name()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "host"),
            (2, "world"),
            (3, "unmanaged"),
            (4, "health"),
            (5, "init"),
            (6, "remote-node"),
            (7, "kube-apiserver"),
        ]
    );
    assert_eq!(
        Identity::new(6).unwrap().reserved(),
        Some(ReservedIdentity::RemoteNode)
    );
    assert_eq!(Identity::new(8).unwrap().reserved(), None);
    assert!(Identity::new(255).unwrap().is_reserved());
    assert!(!Identity::new(256).unwrap().is_reserved());
}

#[test]
fn foreign_identities_are_rejected() {
    let c2 = cid(2, C255);
    assert_eq!(
        Identity::new(131_072).unwrap().check_owned_by(c2, C255),
        Ok(())
    );
    assert_eq!(
        Identity::new(65_537).unwrap().check_owned_by(c2, C255),
        Err(IdentityError::OutsideClusterRange {
            identity: 65_537,
            cluster: 2,
            start: 131_072,
            end: 196_607
        })
    );
    assert!(Identity::new(5).unwrap().check_owned_by(c2, C255).is_err());
}

#[test]
fn decimal_parsing_is_strict() {
    assert_eq!(
        Identity::parse_decimal("65536").map(Identity::get),
        Ok(65_536)
    );
    for bad in ["", "+1", "-1", "01", "1a", " 1", "99999999999"] {
        assert!(Identity::parse_decimal(bad).is_err(), "{bad:?}");
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_identity_in_a_cluster_range_maps_back(c in 1u32..=511, local in 0u32..32_768) {
            let mode = if c > 255 { C511 } else { C255 };
            let cluster = cid(c, mode);
            let range = cluster_range(cluster, mode);
            let raw = range.start() + local.min(range.end() - range.start());
            let id = Identity::new(raw).unwrap();
            prop_assert_eq!(id.cluster_id(mode), Some(cluster));
            prop_assert_eq!(id.check_owned_by(cluster, mode), Ok(()));
            prop_assert_eq!(Identity::parse_decimal(&id.to_string()).unwrap(), id);
        }
    }
}
