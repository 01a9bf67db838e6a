use super::*;

#[test]
fn prefix_rules() {
    let cases: &[(&str, Result<&str, AddressError>)] = &[
        ("10.0.1.0/24", Ok("10.0.1.0/24")),
        ("10.0.1.7/32", Ok("10.0.1.7/32")),
        ("0.0.0.0/0", Ok("0.0.0.0/0")),
        ("fd00::/64", Ok("fd00::/64")),
        (
            "10.0.1.1/24",
            Err(AddressError::HostBits("10.0.1.1/24".into())),
        ),
        (
            "fd00::1/64",
            Err(AddressError::HostBits("fd00::1/64".into())),
        ),
        (
            "10.0.1.0/33",
            Err(AddressError::Prefix("10.0.1.0/33".into())),
        ),
        ("fd00::/129", Err(AddressError::Prefix("fd00::/129".into()))),
        ("10.0.1.0", Err(AddressError::Prefix("10.0.1.0".into()))),
        ("10.0.1.0/x", Err(AddressError::Prefix("10.0.1.0/x".into()))),
        ("10.0.1/24", Err(AddressError::Ip("10.0.1".into()))),
    ];
    for (input, want) in cases {
        let got = input.parse::<IpPrefix>().map(|p| p.to_string());
        assert_eq!(got, want.clone().map(str::to_owned), "{input}");
    }
}

#[test]
fn protocol_and_port_rules() {
    assert_eq!("UDP".parse::<Protocol>(), Ok(Protocol::Udp));
    assert_eq!(
        "tcp".parse::<Protocol>(),
        Err(AddressError::Protocol("tcp".into()))
    );
    assert_eq!(L4Addr::new(Protocol::Tcp, 0), Err(AddressError::PortZero));
    let a = L4Addr::new(Protocol::Sctp, 9).unwrap();
    let json = serde_json::to_string(&a).unwrap();
    assert_eq!(json, r#"{"Protocol":"SCTP","Port":9}"#);
    assert_eq!(serde_json::from_str::<L4Addr>(&json).unwrap(), a);
    assert!(serde_json::from_str::<L4Addr>(r#"{"Protocol":"TCP","Port":0}"#).is_err());
    assert!(serde_json::from_str::<L4Addr>(r#"{"Protocol":"TCP","Port":70000}"#).is_err());
    assert!(serde_json::from_str::<L4Addr>(r#"{"Protocol":"ICMP","Port":1}"#).is_err());
}

mod props {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    proptest! {
        #[test]
        fn v4_prefixes_round_trip(raw in any::<u32>(), len in 0u8..=32) {
            let masked = if len == 0 { 0 } else { raw & (u32::MAX << (32 - u32::from(len))) };
            let p = IpPrefix::new(IpAddr::V4(Ipv4Addr::from(masked)), len).unwrap();
            prop_assert_eq!(p.to_string().parse::<IpPrefix>().unwrap(), p);
        }

        #[test]
        fn v6_prefixes_round_trip(raw in any::<u128>(), len in 0u8..=128) {
            let masked = if len == 0 { 0 } else { raw & (u128::MAX << (128 - u32::from(len))) };
            let p = IpPrefix::new(IpAddr::V6(Ipv6Addr::from(masked)), len).unwrap();
            let json = serde_json::to_string(&p).unwrap();
            prop_assert_eq!(serde_json::from_str::<IpPrefix>(&json).unwrap(), p);
        }
    }
}

mod l4_props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn l4_addrs_round_trip(port in 1u16.., proto in 0..3usize) {
            let a = L4Addr::new([Protocol::Tcp, Protocol::Udp, Protocol::Sctp][proto], port).unwrap();
            let json = serde_json::to_string(&a).unwrap();
            prop_assert_eq!(serde_json::from_str::<L4Addr>(&json).unwrap(), a);
            prop_assert_eq!(a.protocol.as_str().parse::<Protocol>().unwrap(), a.protocol);
        }
    }
}

#[test]
fn addresses_no_pod_or_backend_can_have_are_refused() {
    for bad in [
        "0.0.0.0",
        "127.0.0.1",
        "127.1.2.3",
        "224.0.0.1",
        "169.254.1.1",
        "255.255.255.255",
        "::",
        "::1",
        "ff02::1",
        "fe80::1",
        "::ffff:127.0.0.1",
    ] {
        let ip: std::net::IpAddr = bad.parse().unwrap();
        let err = check_usable(ip).unwrap_err();
        assert!(
            err.to_string()
                .contains("not an address of a pod, backend or service"),
            "{bad}: {err}"
        );
    }
    for good in [
        "10.1.0.5",
        "192.0.2.1",
        "198.51.100.7",
        "2001:db8::1",
        "fd00::5",
    ] {
        assert_eq!(check_usable(good.parse().unwrap()), Ok(()), "{good}");
    }
}
