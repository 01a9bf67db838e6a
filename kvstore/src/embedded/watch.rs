//! Watches of the embedded store. Each watch is a task that replays the change log after the
//! requested revision, then follows the live broadcast of new revisions. The subscription is
//! taken under the writer lock's read side, at a known head revision, so nothing falls between
//! replay and live events; a watcher too slow for the broadcast buffer goes back to the log
//! from its last delivered revision instead of losing events.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::Inner;
use crate::{Error, Event, EventKind, Result, Revision, WatchStream};

/// Revisions read from the log per step of a replay.
const REPLAY_CHUNK: i64 = 512;
/// Events buffered between the watch task and its consumer.
const CONSUMER_BUFFER: usize = 256;

pub(super) fn start(inner: Arc<Inner>, prefix: String, after: Revision) -> WatchStream {
    let (tx, rx) = mpsc::channel(CONSUMER_BUFFER);
    tokio::spawn(async move {
        if let Err(e) = run(&inner, &prefix, after, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// Why forwarding stopped without an error to report.
enum Stop {
    /// The consumer dropped the stream.
    ConsumerGone,
    /// The store was dropped.
    StoreClosed,
}

async fn run(
    inner: &Inner,
    prefix: &str,
    mut after: Revision,
    tx: &mpsc::Sender<Result<Event>>,
) -> Result<()> {
    loop {
        let (mut live, head) = {
            let st = inner.state.read();
            if after + 1 < st.floor {
                return Err(Error::Compacted {
                    requested: after + 1,
                    floor: Some(st.floor),
                });
            }
            (inner.events.subscribe(), st.revision)
        };
        while after < head {
            let to = head.min(after + REPLAY_CHUNK);
            for (rev, entry) in inner.read_log(after + 1, to)? {
                for change in entry.0.into_iter().filter(|c| c.key.starts_with(prefix)) {
                    let event = match change.value {
                        Some(value) => Event {
                            kind: EventKind::Put,
                            key: change.key,
                            value,
                            revision: rev,
                        },
                        None => Event {
                            kind: EventKind::Delete,
                            key: change.key,
                            value: Vec::new(),
                            revision: rev,
                        },
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            after = to;
        }
        match follow(&mut live, prefix, &mut after, tx).await {
            Ok(Stop::ConsumerGone | Stop::StoreClosed) => return Ok(()),
            // Lagged behind the broadcast buffer: resubscribe and catch up from the log.
            Err(()) => continue,
        }
    }
}

/// Forwards live revisions until the consumer or the store goes away (`Ok`) or the watcher
/// lags (`Err`).
async fn follow(
    live: &mut broadcast::Receiver<Arc<super::RevisionEvents>>,
    prefix: &str,
    after: &mut Revision,
    tx: &mpsc::Sender<Result<Event>>,
) -> Result<Stop, ()> {
    loop {
        let batch = tokio::select! {
            () = tx.closed() => return Ok(Stop::ConsumerGone),
            msg = live.recv() => match msg {
                Ok(batch) => batch,
                Err(broadcast::error::RecvError::Lagged(_)) => return Err(()),
                Err(broadcast::error::RecvError::Closed) => return Ok(Stop::StoreClosed),
            },
        };
        if batch.revision <= *after {
            continue;
        }
        for event in batch.events.iter().filter(|e| e.key.starts_with(prefix)) {
            if tx.send(Ok(event.clone())).await.is_err() {
                return Ok(Stop::ConsumerGone);
            }
        }
        *after = batch.revision;
    }
}
