//! Where each recent write to the kvstore came from: the origin time and trace context of the
//! change written. The writers (the source pass, the sync workers) record it; the Export server
//! looks it up for each event it sends, so that the change carries its origin on.
//!
//! A write is announced before it is made ([`Provenance::expect`]) and its revision recorded
//! after ([`Pending::written`]): a watcher may see the event before the writer has its
//! revision, and then takes the key's oldest write still in flight, which is that one (one
//! writer writes a key at a time), but only for an event newer than every write the table knew
//! of when the write was announced: the writers report the revisions of their writes without
//! an origin too ([`Provenance::advance`]), so that an event of such a write is never given
//! the origin of the next one. A write that fails or changes nothing is forgotten when its
//! [`Pending`] is dropped.
//!
//! A bounded table in memory: the oldest writes are forgotten first. A watcher further behind
//! than the table (or one that resumes after a restart) sends those changes without an origin:
//! they are neither traced nor measured, which is the right answer for a change whose delay is
//! the watcher's own lag.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use clustermesh_proto::v1;
use parking_lot::Mutex;

use crate::context::Trace;

/// The origin of one change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Unix time the change was applied at its source, in nanoseconds.
    pub unix_nanos: i64,
    /// The trace context of the span that wrote or sent it, when the change is traced.
    pub trace: Option<Trace>,
}

impl Origin {
    /// A change applied now, traced by `span` when that span is sampled.
    pub fn now(span: &tracing::Span) -> Self {
        Self {
            unix_nanos: crate::now_unix_nanos(),
            trace: Trace::of(span),
        }
    }

    /// The origin an event carries; `None` for none, one with no time, or one older than
    /// [`MAX_AGE_NANOS`] (a peer's clock or a made-up time, not a delay worth measuring). A
    /// peer's malformed or unsampled trace context is dropped (the time is kept).
    pub fn from_proto(o: Option<&v1::Origin>) -> Option<Self> {
        let o = o?;
        let age = crate::now_unix_nanos().saturating_sub(o.unix_nanos);
        if o.unix_nanos <= 0 || age > MAX_AGE_NANOS {
            return None;
        }
        Some(Self {
            unix_nanos: o.unix_nanos,
            trace: Trace::from_headers(&o.traceparent, &o.tracestate),
        })
    }

    /// The same change handed on by `span` (its context replaces the trace, when sampled).
    pub fn handed_on(&self, span: &tracing::Span) -> Self {
        Self {
            unix_nanos: self.unix_nanos,
            trace: Trace::of(span).or_else(|| self.trace.clone()),
        }
    }

    /// The wire form.
    pub fn to_proto(&self) -> v1::Origin {
        let (traceparent, tracestate) = match &self.trace {
            Some(t) => (t.parent.clone(), t.state.clone()),
            None => (String::new(), String::new()),
        };
        v1::Origin {
            unix_nanos: self.unix_nanos,
            traceparent,
            tracestate,
        }
    }
}

/// The oldest origin taken from an event: a day.
pub const MAX_AGE_NANOS: i64 = 24 * 3600 * 1_000_000_000;

/// Writes remembered by default: ~200 bytes each (a key is held twice), ~13 MB for 64k; a
/// peer's maximal trace context (768 bytes, shared by the writes of one event) can make it
/// ~60 MB at worst.
pub const DEFAULT_CAPACITY: usize = 65_536;

#[derive(Debug)]
struct Entry {
    seq: u64,
    revision: Option<i64>,
    /// The newest revision the table knew of when the write was announced: the write's own
    /// revision is above it.
    floor: i64,
    origin: Arc<Origin>,
}

#[derive(Debug, Default)]
struct Table {
    by_key: HashMap<String, VecDeque<Entry>>,
    /// Every entry's key, oldest first.
    order: VecDeque<(u64, String)>,
    next: u64,
    /// Entries in `by_key` (`order` may still name removed ones).
    live: usize,
    /// The newest revision written (with or without an origin) that the table was told of.
    newest: i64,
}

impl Table {
    fn remove(&mut self, key: &str, seq: u64) {
        if let Some(entries) = self.by_key.get_mut(key) {
            let before = entries.len();
            entries.retain(|e| e.seq != seq);
            self.live -= before - entries.len();
            if entries.is_empty() {
                self.by_key.remove(key);
            }
        }
    }
}

/// The origins of recent writes.
#[derive(Debug)]
pub struct Provenance {
    table: Mutex<Table>,
    capacity: usize,
}

impl Default for Provenance {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

/// A write announced to the table; dropped without [`Pending::written`], it is forgotten.
#[must_use = "a pending write is forgotten when dropped"]
pub struct Pending {
    table: Arc<Provenance>,
    key: String,
    seq: u64,
    done: bool,
}

impl Pending {
    /// The write is in the store at `revision`.
    pub fn written(mut self, revision: i64) {
        self.done = true;
        let mut table = self.table.table.lock();
        table.newest = table.newest.max(revision);
        if let Some(e) = table
            .by_key
            .get_mut(&self.key)
            .and_then(|entries| entries.iter_mut().find(|e| e.seq == self.seq))
        {
            e.revision = Some(revision);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            self.table.table.lock().remove(&self.key, self.seq);
        }
    }
}

impl Provenance {
    /// A table of at most `capacity` writes.
    pub fn new(capacity: usize) -> Self {
        Self {
            table: Mutex::new(Table::default()),
            capacity: capacity.max(1),
        }
    }

    /// Announces a write of `key` carrying `origin`, before it is made.
    pub fn expect(self: &Arc<Self>, key: &str, origin: &Arc<Origin>) -> Pending {
        let mut table = self.table.lock();
        let seq = table.next;
        table.next += 1;
        let floor = table.newest;
        table
            .by_key
            .entry(key.to_owned())
            .or_default()
            .push_back(Entry {
                seq,
                revision: None,
                floor,
                origin: Arc::clone(origin),
            });
        table.order.push_back((seq, key.to_owned()));
        table.live += 1;
        while table.order.len() > self.capacity {
            if let Some((old, k)) = table.order.pop_front() {
                table.remove(&k, old);
            }
        }
        Pending {
            table: Arc::clone(self),
            key: key.to_owned(),
            seq,
            done: false,
        }
    }

    /// A write without an origin is in the store at `revision` (its event must not take the
    /// origin of a write announced later).
    pub fn advance(&self, revision: i64) {
        let mut table = self.table.lock();
        table.newest = table.newest.max(revision);
    }

    /// The origin of the write of `key` at `revision`, if remembered.
    pub fn lookup(&self, key: &str, revision: i64) -> Option<Arc<Origin>> {
        let table = self.table.lock();
        let entries = table.by_key.get(key)?;
        entries
            .iter()
            .find(|e| e.revision == Some(revision))
            .or_else(|| {
                entries
                    .iter()
                    .find(|e| e.revision.is_none() && revision > e.floor)
            })
            .map(|e| Arc::clone(&e.origin))
    }

    /// Writes remembered.
    pub fn len(&self) -> usize {
        self.table.lock().live
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a panic is the failure report"
    )]

    use super::*;

    fn origin(n: i64) -> Arc<Origin> {
        Arc::new(Origin {
            unix_nanos: n,
            trace: None,
        })
    }

    #[test]
    fn a_write_is_found_by_key_and_revision_also_before_its_revision_is_known() {
        let p = Arc::new(Provenance::new(100));
        let first = p.expect("k", &origin(1));
        // A watcher faster than the writer: the write in flight.
        assert_eq!(p.lookup("k", 10).unwrap().unix_nanos, 1);
        first.written(10);
        let second = p.expect("k", &origin(2));
        // The first write's event read late still finds the first origin; the second write's
        // event, before its revision is recorded, the second.
        assert_eq!(p.lookup("k", 10).unwrap().unix_nanos, 1);
        assert_eq!(p.lookup("k", 11).unwrap().unix_nanos, 2);
        second.written(11);
        assert_eq!(p.lookup("k", 11).unwrap().unix_nanos, 2);
        // No write in flight: an unknown revision has no origin.
        assert_eq!(p.lookup("k", 12), None);
        assert_eq!(p.lookup("other", 10), None);
    }

    #[test]
    fn an_event_of_a_write_without_origin_never_takes_the_next_write_s() {
        let p = Arc::new(Provenance::new(100));
        p.expect("k", &origin(1)).written(10);
        // A write of k without an origin at 11, then a write of k with one, in flight.
        p.advance(11);
        let next = p.expect("k", &origin(2));
        // The event at 11, read while the next write is in flight: no origin.
        assert_eq!(p.lookup("k", 11), None);
        // The next write's own event (12) takes it.
        assert_eq!(p.lookup("k", 12).unwrap().unix_nanos, 2);
        next.written(12);
        assert_eq!(p.lookup("k", 11), None);
        assert_eq!(p.lookup("k", 12).unwrap().unix_nanos, 2);
    }

    #[test]
    fn a_write_that_was_not_made_is_forgotten() {
        let p = Arc::new(Provenance::new(100));
        drop(p.expect("k", &origin(1)));
        assert_eq!(p.lookup("k", 1), None);
        assert!(p.is_empty());
    }

    #[test]
    fn the_oldest_writes_are_forgotten_first() {
        let p = Arc::new(Provenance::new(3));
        for (i, key) in ["a", "b", "c", "d"].into_iter().enumerate() {
            let rev = i64::try_from(i).unwrap();
            p.expect(key, &origin(rev)).written(rev);
        }
        assert_eq!(p.len(), 3);
        assert_eq!(p.lookup("a", 0), None);
        assert_eq!(p.lookup("d", 3).unwrap().unix_nanos, 3);
        // A pending write evicted meanwhile records nothing when it completes.
        let pending = p.expect("e", &origin(9));
        for key in ["f", "g", "h"] {
            p.expect(key, &origin(0)).written(20);
        }
        pending.written(30);
        assert_eq!(p.lookup("e", 30), None);
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn an_origin_from_a_peer_keeps_its_time_and_drops_a_bad_trace() {
        let good = v1::Origin {
            unix_nanos: crate::now_unix_nanos() - 1_000_000_000,
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: String::new(),
        };
        let o = Origin::from_proto(Some(&good)).unwrap();
        assert_eq!(o.to_proto(), good);
        let bad = v1::Origin {
            traceparent: "not a trace".into(),
            ..good.clone()
        };
        let o = Origin::from_proto(Some(&bad)).unwrap();
        assert_eq!((o.unix_nanos, o.trace), (good.unix_nanos, None));
        // No time, or older than a day.
        let day_and_a_second = crate::now_unix_nanos() - MAX_AGE_NANOS - 1_000_000_000;
        for no_time in [0, -1, 1, day_and_a_second] {
            let o = v1::Origin {
                unix_nanos: no_time,
                ..good.clone()
            };
            assert_eq!(Origin::from_proto(Some(&o)), None);
        }
        assert_eq!(Origin::from_proto(None), None);
    }
}
