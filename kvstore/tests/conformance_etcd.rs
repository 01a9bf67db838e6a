//! The conformance suite against a real etcd server (Debian's etcd-server), one server per
//! test on free loopback ports.

mod conformance;

use clustermesh_kvstore::etcd::EtcdStore;
use clustermesh_kvstore::testing::EtcdServer;

struct Etcd {
    server: EtcdServer,
    store: EtcdStore,
}

#[async_trait::async_trait]
impl conformance::Backend for Etcd {
    type Store = EtcdStore;

    async fn start() -> Self {
        let server = EtcdServer::start().await;
        let store = server.store().await;
        Self { server, store }
    }

    fn store(&self) -> EtcdStore {
        self.store.clone()
    }

    async fn restart(&mut self) {
        self.server.restart().await;
        self.store = self.server.store().await;
    }
}

conformance_tests!(Etcd);
