//! Go's zero values, as Cilium (and Kubernetes) write them: a nil slice or map is `null`, an
//! unset `net.IP` is `""`. Decoders of Cilium's JSON take them as empty or absent; our own
//! encoders never write them.

use serde::{Deserialize, Deserializer};

/// `null` as the type's default (an empty list or map).
pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An optional IP: `null`, absent or `""` is none; anything else must be an IP.
pub fn empty_ip_as_none<'de, D>(d: D) -> Result<Option<std::net::IpAddr>, D::Error>
where
    D: Deserializer<'de>,
{
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an IP address"))),
    }
}

/// An optional prefix in the form of Go's `net.IPNet`, as Cilium writes a node's pod CIDRs:
/// `{"IP": "10.1.0.0", "Mask": "////AA=="}` (the mask's bytes in base64), or `null`. Reading
/// also takes the text form `"10.1.0.0/24"` that earlier versions of this project wrote.
pub mod ipnet {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::ip::IpPrefix;

    #[derive(Serialize, Deserialize)]
    struct GoIpNet {
        #[serde(rename = "IP")]
        ip: String,
        #[serde(rename = "Mask")]
        mask: String,
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Object(GoIpNet),
        Text(String),
    }

    /// The mask's bytes: `len` leading ones in 4 (IPv4) or 16 bytes.
    fn mask_bytes(len: u8, v4: bool) -> Vec<u8> {
        let total = if v4 { 4 } else { 16 };
        (0..total)
            .map(|i| {
                let ones = usize::from(len).saturating_sub(i * 8).min(8);
                if ones == 0 { 0 } else { 0xffu8 << (8 - ones) }
            })
            .collect()
    }

    /// Writes `prefix` as Go's `net.IPNet`.
    pub fn serialize<S: Serializer>(prefix: &Option<IpPrefix>, s: S) -> Result<S::Ok, S::Error> {
        match prefix {
            None => s.serialize_none(),
            Some(p) => GoIpNet {
                ip: p.addr().to_string(),
                mask: base64::engine::general_purpose::STANDARD
                    .encode(mask_bytes(p.prefix_len(), p.addr().is_ipv4())),
            }
            .serialize(s),
        }
    }

    /// Reads Go's `net.IPNet`, the text form, or `null`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpPrefix>, D::Error> {
        use serde::de::Error as _;
        let Some(written) = Option::<Written>::deserialize(d)? else {
            return Ok(None);
        };
        let net = match written {
            Written::Text(t) => return t.parse().map(Some).map_err(D::Error::custom),
            Written::Object(net) => net,
        };
        let ip: std::net::IpAddr = net
            .ip
            .parse()
            .map_err(|_| D::Error::custom(format!("{:?} is not an IP address", net.ip)))?;
        let mask = base64::engine::general_purpose::STANDARD
            .decode(&net.mask)
            .map_err(|e| D::Error::custom(format!("mask {:?}: {e}", net.mask)))?;
        // Go keeps an IPv4 network's mask in 4 bytes, or 16 (an IPv4-mapped form).
        let (ip, mask) = match (ip, mask.len()) {
            (std::net::IpAddr::V4(_), 4) => (ip, mask),
            (std::net::IpAddr::V4(_), 16) if mask[..12].iter().all(|b| *b == 0xff) => {
                (ip, mask[12..].to_vec())
            }
            (std::net::IpAddr::V6(v6), 4) => match v6.to_ipv4_mapped() {
                Some(v4) => (std::net::IpAddr::V4(v4), mask),
                None => return Err(D::Error::custom("an IPv6 network with a 4-byte mask")),
            },
            (std::net::IpAddr::V6(_), 16) => (ip, mask),
            _ => {
                return Err(D::Error::custom(format!(
                    "mask {:?} does not fit the address {ip}",
                    net.mask
                )));
            }
        };
        let len = mask.iter().map(|b| b.leading_ones()).sum::<u32>();
        let len = u8::try_from(len).map_err(D::Error::custom)?;
        if mask != mask_bytes(len, ip.is_ipv4()) {
            return Err(D::Error::custom(format!(
                "mask {:?} is not a prefix mask",
                net.mask
            )));
        }
        IpPrefix::new(ip, len).map(Some).map_err(D::Error::custom)
    }
}
