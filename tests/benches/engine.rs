//! Micro-benchmark of the engine's cached path: an `auth` answered from the in-process cache
//! (input checks, HMAC-SHA256 key, L1 lookup), through the public API a broker is built with.
//!
//! `cargo bench --bench engine`. The engine is configured from flags exactly as the daemon
//! configures it; the token is validated once by the development provider before measuring.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use divan::{black_box, Bencher};
use extauth_broker::devprovider::DevProvider;
use extauth_broker::{build_engine, Engine, RunArgs};
use extauth_protocol::extauth::{self, Command};
use serde_json::json;
use tokio::runtime::Runtime;

fn main() {
    divan::main();
}

struct Fixture {
    rt: Runtime,
    engine: Engine,
    /// A request whose verdict is cached.
    hit: Command,
    _provider: DevProvider,
    _dir: tempfile::TempDir,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let provider = rt
        .block_on(DevProvider::start("bench", "bench-secret"))
        .unwrap();
    provider.insert("tok-bench", json!({"username": "alice"}));
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client.secret");
    std::fs::write(&secret, "bench-secret\n").unwrap();
    let mut args = RunArgs::default();
    args.listen = vec!["unix:/nonexistent/bench.sock".into()];
    args.introspection_url = Some(provider.url());
    args.client_id = Some("bench".into());
    args.client_secret_file = Some(secret);
    let config = args.resolve().unwrap();
    let engine = rt.block_on(build_engine(&config)).unwrap();
    let hit = extauth::parse(b"auth:alice:localhost:tok-bench").unwrap();
    assert!(
        rt.block_on(engine.handle(&hit, deadline())).ok,
        "warm-up must be accepted"
    );
    assert_eq!(provider.calls(), 1);
    Fixture {
        rt,
        engine,
        hit,
        _provider: provider,
        _dir: dir,
    }
});

/// What a shim with `--timeout 10` gives the broker.
fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// One cached `auth`, driven by a current-thread runtime (`block_on` costs tens of ns).
#[divan::bench]
fn cached_auth(bencher: Bencher) {
    let f = &*FIXTURE;
    bencher.bench_local(|| {
        f.rt.block_on(f.engine.handle(black_box(&f.hit), deadline()))
    });
}

/// A malformed request, refused before any cache access: the floor of `handle`.
#[divan::bench]
fn refused_before_the_cache(bencher: Bencher) {
    let f = &*FIXTURE;
    let bad = extauth::parse(b"auth:alice:localhost:").unwrap();
    bencher.bench_local(|| f.rt.block_on(f.engine.handle(black_box(&bad), deadline())));
}
