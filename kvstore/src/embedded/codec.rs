//! The byte layout of the embedded store. One sled tree holds everything, under one-byte
//! prefixes, so that every write is a single atomic sled batch:
//!
//! | tree key | value |
//! |---|---|
//! | `k` + key | [`Record`]: create rev, mod rev, version, lease (0 = none), value |
//! | `l` + revision (big endian) | [`LogEntry`]: the changes of that revision with the records they replaced |
//! | `m` + name (`mrev`, `mfloor`, `mnext-lease`) | meta: `rev`, `floor`, `next-lease` as big-endian i64 |
//! | `mclean` | present only while the store is closed cleanly (written on close, removed on open) |
//! | `L` + lease id (big endian) | TTL in milliseconds |

use crate::{Error, KeyValue, LeaseId, Result, Revision};

pub(super) const DATA: u8 = b'k';
pub(super) const LOG: u8 = b'l';
pub(super) const LEASE: u8 = b'L';

pub(super) const META_REVISION: &[u8] = b"mrev";
pub(super) const META_FLOOR: &[u8] = b"mfloor";
pub(super) const META_NEXT_LEASE: &[u8] = b"mnext-lease";
pub(super) const META_CLEAN: &[u8] = b"mclean";

pub(super) fn data_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(DATA);
    k.extend_from_slice(key.as_bytes());
    k
}

pub(super) fn log_key(revision: Revision) -> [u8; 9] {
    let mut k = [LOG; 9];
    k[1..].copy_from_slice(&revision.to_be_bytes());
    k
}

pub(super) fn lease_key(lease: LeaseId) -> [u8; 9] {
    let mut k = [LEASE; 9];
    k[1..].copy_from_slice(&lease.0.to_be_bytes());
    k
}

pub(super) fn decode_i64(bytes: &[u8], what: &str) -> Result<i64> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| Error::Corrupt(format!("{what} is not 8 bytes")))?;
    Ok(i64::from_be_bytes(arr))
}

pub(super) fn key_of_data(tree_key: &[u8]) -> Result<String> {
    String::from_utf8(tree_key[1..].to_vec()).map_err(|_| Error::Corrupt("key is not UTF-8".into()))
}

/// A stored key's value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) create_revision: Revision,
    pub(super) mod_revision: Revision,
    pub(super) version: i64,
    pub(super) lease: Option<LeaseId>,
    pub(super) value: Vec<u8>,
}

impl Record {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.value.len());
        self.encode_into(&mut out);
        out
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.create_revision.to_be_bytes());
        out.extend_from_slice(&self.mod_revision.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.lease.map_or(0, |l| l.0).to_be_bytes());
        out.extend_from_slice(&self.value);
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader(bytes);
        let create_revision = r.i64()?;
        let mod_revision = r.i64()?;
        let version = r.i64()?;
        let lease = r.i64()?;
        Ok(Self {
            create_revision,
            mod_revision,
            version,
            lease: (lease != 0).then_some(LeaseId(lease)),
            value: r.0.to_vec(),
        })
    }

    pub(super) fn into_kv(self, key: String) -> KeyValue {
        KeyValue {
            key,
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }
}

/// One key's change within a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LogChange {
    pub(super) key: String,
    /// The new value; `None` for a delete.
    pub(super) value: Option<Vec<u8>>,
    /// What the key held before; `None` when it was absent.
    pub(super) prev: Option<Record>,
}

/// Every change of one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LogEntry(pub(super) Vec<LogChange>);

impl LogEntry {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_len(&mut out, self.0.len());
        for c in &self.0 {
            put_bytes(&mut out, c.key.as_bytes());
            match &c.value {
                None => out.push(0),
                Some(v) => {
                    out.push(1);
                    put_bytes(&mut out, v);
                }
            }
            match &c.prev {
                None => out.push(0),
                Some(rec) => {
                    out.push(1);
                    let mut buf = Vec::new();
                    rec.encode_into(&mut buf);
                    put_bytes(&mut out, &buf);
                }
            }
        }
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader(bytes);
        let n = r.len()?;
        let mut changes = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let key = String::from_utf8(r.bytes()?.to_vec())
                .map_err(|_| Error::Corrupt("log key is not UTF-8".into()))?;
            let value = match r.u8()? {
                0 => None,
                _ => Some(r.bytes()?.to_vec()),
            };
            let prev = match r.u8()? {
                0 => None,
                _ => Some(Record::decode(r.bytes()?)?),
            };
            changes.push(LogChange { key, value, prev });
        }
        Ok(Self(changes))
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    let n = u32::try_from(n).expect("keys, values and changes are far below 4 GiB");
    out.extend_from_slice(&n.to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(Error::Corrupt("record is truncated".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn i64(&mut self) -> Result<i64> {
        decode_i64(self.take(8)?, "record field")
    }

    fn len(&mut self) -> Result<usize> {
        let b: [u8; 4] = self.take(4)?.try_into().expect("take(4) returns 4 bytes");
        Ok(u32::from_be_bytes(b) as usize)
    }

    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(lease: Option<i64>) -> Record {
        Record {
            create_revision: 3,
            mod_revision: 9,
            version: 4,
            lease: lease.map(LeaseId),
            value: b"hello".to_vec(),
        }
    }

    #[test]
    fn records_round_trip() {
        for lease in [None, Some(77)] {
            assert_eq!(
                Record::decode(&record(lease).encode()).unwrap(),
                record(lease)
            );
        }
    }

    #[test]
    fn log_entries_round_trip() {
        let entry = LogEntry(vec![
            LogChange {
                key: "a".into(),
                value: Some(b"1".to_vec()),
                prev: None,
            },
            LogChange {
                key: "b".into(),
                value: None,
                prev: Some(record(Some(5))),
            },
        ]);
        assert_eq!(LogEntry::decode(&entry.encode()).unwrap(), entry);
    }

    #[test]
    fn truncated_bytes_are_corrupt_not_a_panic() {
        let bytes = LogEntry(vec![LogChange {
            key: "a".into(),
            value: None,
            prev: Some(record(None)),
        }])
        .encode();
        for cut in 0..bytes.len() {
            assert!(
                matches!(LogEntry::decode(&bytes[..cut]), Err(Error::Corrupt(_))),
                "cut at {cut}"
            );
        }
        assert!(matches!(Record::decode(&[0; 31]), Err(Error::Corrupt(_))));
    }

    proptest::proptest! {
        // Hostile or corrupted bytes on disk: an error, never a panic or a huge allocation.
        #[test]
        fn arbitrary_bytes_decode_to_a_value_or_corrupt(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Err(e) = LogEntry::decode(&bytes) {
                proptest::prop_assert!(matches!(e, Error::Corrupt(_)));
            }
            if let Err(e) = Record::decode(&bytes) {
                proptest::prop_assert!(matches!(e, Error::Corrupt(_)));
            }
        }

        #[test]
        fn flipped_bytes_of_a_real_entry_never_panic(i in 0usize..64, b in proptest::prelude::any::<u8>()) {
            let mut bytes = LogEntry(vec![LogChange {
                key: "cilium/state/ip/v1/default/10.1.0.5".into(),
                value: Some(b"{}".to_vec()),
                prev: Some(record(Some(5))),
            }])
            .encode();
            let i = i % bytes.len();
            bytes[i] = b;
            let _ = LogEntry::decode(&bytes);
        }
    }
}
