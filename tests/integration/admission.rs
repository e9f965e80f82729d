//! Peers that never authenticate hold nothing: hundreds of hostile connections against real
//! brokers with few slots, while real shims log in. A test binary of its own, so the attack's
//! load and sockets never overlap another test's (cargo runs test binaries one at a time).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use extauth_testkit::faults::{metrics_flags, Metrics};
use extauth_testkit::hostile_peers::Attack;
use extauth_testkit::pki::{open_dir, Pki};
use extauth_testkit::services::{free_port, token, Broker, BrokerSpec, Provider, Shim};
use serde_json::json;

/// `nobody` and `nogroup` on Debian.
const NOBODY: u32 = 65534;

/// Slots each broker of the attack test has: a small pool, as in the finding.
const ATTACK_SLOTS: usize = 8;
/// The brokers' default `--max-handshakes`.
const MAX_HANDSHAKES: usize = 256;
/// Rounds of fresh shims per phase; every shim logs in `LOGINS_PER_SHIM` times.
const ROUNDS: usize = 6;
const LOGINS_PER_SHIM: usize = 5;

/// `127.0.0.N`: loopback answers on all of 127/8, so each N is a source address of its own.
fn loopback(n: u8) -> IpAddr {
    Ipv4Addr::new(127, 0, 0, n).into()
}

/// Lifts this process's soft open-file limit to `want` (within the hard limit): the attack
/// holds about a thousand sockets. The brokers inherit it, but the budgets keep each one far
/// below the common default of 1024 (checked below).
fn raise_fd_limit(want: u64) {
    let mut limit = nix::libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        assert_eq!(
            nix::libc::getrlimit(nix::libc::RLIMIT_NOFILE, &mut limit),
            0
        );
        limit.rlim_cur = limit.rlim_cur.max(want).min(limit.rlim_max);
        assert_eq!(nix::libc::setrlimit(nix::libc::RLIMIT_NOFILE, &limit), 0);
    }
}

/// Where a shim connects: its `--broker` address and other flags.
struct Route {
    broker: String,
    flags: Vec<String>,
}

/// Runs `ROUNDS` rounds of two fresh shims per route, each logging in `LOGINS_PER_SHIM` times
/// with `request`; `between` runs after each round. Returns each login's latency, `None` for a
/// refused one.
fn login_rounds(
    routes: &[Route],
    request: &str,
    mut between: impl FnMut(),
) -> Vec<Option<Duration>> {
    let mut logins = Vec::new();
    for _ in 0..ROUNDS {
        std::thread::scope(|scope| {
            let shims: Vec<_> = routes
                .iter()
                .flat_map(|route| [route, route])
                .map(|route| {
                    scope.spawn(move || {
                        let flags: Vec<&str> = route.flags.iter().map(String::as_str).collect();
                        let mut shim = Shim::spawn(&route.broker, 10.0, &flags);
                        (0..LOGINS_PER_SHIM)
                            .map(|_| {
                                let asked = Instant::now();
                                let ok = shim.try_ask(request).unwrap_or(false);
                                ok.then(|| asked.elapsed())
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for shim in shims {
                logins.extend(shim.join().unwrap());
            }
        });
        between();
    }
    logins
}

/// `(refused, p50, p99, max)` of a phase's logins.
fn summary(logins: &[Option<Duration>]) -> (usize, Duration, Duration, Duration) {
    let mut ok: Vec<Duration> = logins.iter().flatten().copied().collect();
    ok.sort();
    let at = |q: f64| {
        ok.get(((ok.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    (
        logins.len() - ok.len(),
        at(0.5),
        at(0.99),
        ok.last().copied().unwrap_or_default(),
    )
}

fn open_fds(broker: &Broker) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", broker.pid())).map_or(0, |dir| dir.count())
}

/// The finding: the acceptor took a `--max-connections` slot before the peer check, TLS and
/// the `Hello`, so silent connections, peers that said `Hello` on plaintext loopback TCP and
/// then nothing, and TLS clients without a certificate took every slot, and new shims could
/// not log in. Here a thousand such peers (and peers that ask once and then sit idle, refused
/// Unix peers, reconnect loops) attack two brokers of 8 slots each, one with a Unix socket and
/// plaintext TCP, one with mTLS, while fresh shims log in on every kind of listener: no login
/// may be refused. Prints the login latency with and without the attack.
#[test]
fn peers_that_never_authenticate_cannot_keep_shims_out() {
    raise_fd_limit(4096);
    let root = nix::unistd::Uid::effective().is_root();
    let provider = Provider::start();
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let request = format!("auth:alice:example.com:{alice}");
    let pki = Pki::new();
    let dir = open_dir();
    let open_socket = dir.path().join("open.sock");
    let (plain_port, tls_port) = (free_port(), free_port());
    let (plain_metrics, tls_metrics) = (free_port(), free_port());
    let slots = ["--max-connections".to_owned(), ATTACK_SLOTS.to_string()];

    let mut spec = BrokerSpec::new(&provider);
    spec.extra = vec![
        "--listen".into(),
        format!("tcp:127.0.0.1:{plain_port}"),
        "--listen".into(),
        format!("unix:{}", open_socket.display()),
        "--socket-mode".into(),
        "0666".into(),
    ];
    if root {
        // Anyone may reach the socket; only root passes the peer check.
        spec.extra.extend(["--allow-uid".into(), "root".into()]);
    }
    spec.extra.extend(slots.clone());
    spec.extra.extend(metrics_flags(plain_metrics));
    let plain = Broker::start(&spec);
    let mut spec = BrokerSpec::new(&provider);
    spec.extra = vec![
        "--listen".into(),
        format!("tcp:127.0.0.1:{tls_port}"),
        "--tls-cert".into(),
        pki.path("server.pem"),
        "--tls-key".into(),
        pki.path("server.key"),
        "--client-ca".into(),
        pki.path("ca.pem"),
    ];
    spec.extra.extend(slots);
    spec.extra.extend(metrics_flags(tls_metrics));
    let mtls = Broker::start(&spec);

    let routes = [
        Route {
            broker: plain.addr(),
            flags: vec![],
        },
        Route {
            broker: format!("tcp:127.0.0.1:{plain_port}"),
            flags: vec![],
        },
        Route {
            broker: mtls.addr(),
            flags: vec![],
        },
        Route {
            broker: format!("tls:localhost:{tls_port}"),
            flags: vec![
                "--ca".into(),
                pki.path("ca.pem"),
                "--cert".into(),
                pki.path("client.pem"),
                "--key".into(),
                pki.path("client.key"),
            ],
        },
    ];
    let baseline = login_rounds(&routes, &request, || {});
    let idle_fds = [open_fds(&plain), open_fds(&mtls)];

    let mut attack = Attack::new();
    let plain_addr = SocketAddr::from(([127, 0, 0, 1], plain_port));
    let tls_addr = SocketAddr::from(([127, 0, 0, 1], tls_port));
    for target in [plain_addr, tls_addr] {
        // One source far past its per-source cap, and enough others to fill the budget.
        attack.silent(target, loopback(2), 100);
        for n in 3..=12 {
            attack.silent(target, loopback(n), 25);
        }
        attack.reconnect_loop(target, loopback(14));
    }
    attack.idle_after_hello(plain_addr, loopback(13), 100);
    attack.idle_after_request(plain_addr, loopback(16), 50);
    attack.tls_without_certificate(tls_addr, loopback(15), Path::new(&pki.path("ca.pem")), 50);
    if root {
        attack.unix_hello_as(&open_socket, NOBODY, NOBODY, 100);
    } else {
        eprintln!(
            "SKIPPED PART: the refused-uid Unix peers need root (to connect as another user); \
             the other hostile peers still run"
        );
    }
    // Every hostile peer connects within a second or two; a broker that stops accepting (as
    // before the fix) leaves some waiting, and the logins below are what must not fail then.
    let arriving = Instant::now();
    while attack.arrived() < attack.peers() && arriving.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "{} of {} hostile peers connected after {:?}",
        attack.arrived(),
        attack.peers(),
        arriving.elapsed()
    );
    let mut peak_fds = [0, 0];
    let mut peak_hostile = 0;
    let attacked = login_rounds(&routes, &request, || {
        for (peak, broker) in peak_fds.iter_mut().zip([&plain, &mtls]) {
            *peak = (*peak).max(open_fds(broker));
        }
        peak_hostile = peak_hostile.max(attack.open());
    });
    let (peers, connects) = (attack.peers(), attack.connects());
    attack.stop();

    let (base_refused, base_p50, base_p99, base_max) = summary(&baseline);
    let (refused, p50, p99, max) = summary(&attacked);
    println!(
        "{} logins per phase; without attack: p50 {base_p50:?} p99 {base_p99:?} max {base_max:?}; \
         under attack: p50 {p50:?} p99 {p99:?} max {max:?}; added p99: {:?}",
        baseline.len(),
        p99.saturating_sub(base_p99)
    );
    println!(
        "hostile peers: {peers}, connections made: {connects}, open at once (peak seen): \
         {peak_hostile}; broker fds idle {idle_fds:?}, peak under attack {peak_fds:?}"
    );
    assert_eq!(base_refused, 0, "logins refused without any attack");
    assert_eq!(
        refused,
        0,
        "{refused} of {} valid logins refused under the attack",
        attacked.len()
    );
    // What hostile peers hold is bounded by the handshake budget and the slots, whatever they
    // open; a little room for sockets being closed.
    for (idle, peak) in idle_fds.iter().zip(peak_fds) {
        assert!(
            peak <= idle + MAX_HANDSHAKES + ATTACK_SLOTS + 64,
            "broker fds: {peak} under attack, {idle} idle"
        );
    }
    // Every defence was exercised: the budget and the per-source cap on both brokers, the
    // reconnect loop's empty connections, evictions of the peers that asked once, the mTLS
    // check, the peer check.
    let (p, m) = (Metrics::scrape(plain_metrics), Metrics::scrape(tls_metrics));
    let failed = |m: &Metrics, reason: &str| {
        m.sum(&format!(
            "extauth_handshakes_failed_total{{reason=\"{reason}\"}}"
        ))
    };
    for (name, metrics, reason) in [
        ("plain", &p, "budget"),
        ("plain", &p, "source_budget"),
        ("plain", &p, "hello"),
        ("mtls", &m, "budget"),
        ("mtls", &m, "source_budget"),
        ("mtls", &m, "tls"),
    ] {
        assert!(failed(metrics, reason) > 0.0, "{name}: no {reason} failure");
    }
    assert!(
        p.sum("extauth_connections_evicted_total") > 0.0,
        "no eviction"
    );
    assert!(!root || failed(&p, "peer") > 0.0, "no refused Unix peer");
}
