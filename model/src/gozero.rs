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
