//! The conformance suite against the embedded sled backend.

mod conformance;

use clustermesh_kvstore::embedded::{SledConfig, SledStore};
use tempfile::TempDir;

struct Sled {
    dir: TempDir,
    store: Option<SledStore>,
}

impl Sled {
    fn open(dir: &TempDir) -> SledStore {
        SledStore::open(&SledConfig::new(dir.path().join("store"))).expect("opening sled")
    }
}

#[async_trait::async_trait]
impl conformance::Backend for Sled {
    type Store = SledStore;

    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Some(Self::open(&dir));
        Self { dir, store }
    }

    fn store(&self) -> SledStore {
        self.store.clone().expect("store is open")
    }

    async fn restart(&mut self) {
        drop(self.store.take());
        // The lease reaper lets go of the store within its next tick.
        for _ in 0..50 {
            match SledStore::open(&SledConfig::new(self.dir.path().join("store"))) {
                Ok(s) => {
                    self.store = Some(s);
                    return;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
        self.store = Some(Self::open(&self.dir));
    }
}

conformance_tests!(Sled);
