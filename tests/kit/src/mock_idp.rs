//! A mock OAuth provider (wiremock) on its own runtime, so tests can stay synchronous like the
//! shim: answers are mounted per test, every request is recorded.

use wiremock::{Mock, MockServer};

/// The mock provider and the runtime it runs on.
pub struct Idp {
    server: MockServer,
    rt: tokio::runtime::Runtime,
}

impl Idp {
    pub fn start() -> Idp {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let server = rt.block_on(MockServer::start());
        Idp { server, rt }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.uri())
    }

    pub fn mount(&self, mock: Mock) {
        self.rt.block_on(mock.mount(&self.server));
    }

    /// Forgets every mock and every recorded call.
    pub fn reset(&self) {
        self.rt.block_on(self.server.reset());
    }

    /// Every request received since the last reset.
    pub fn requests(&self) -> Vec<wiremock::Request> {
        self.rt
            .block_on(self.server.received_requests())
            .unwrap_or_default()
    }

    /// Calls received on `path` since the last reset.
    pub fn calls(&self, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.url.path() == path)
            .count()
    }
}
