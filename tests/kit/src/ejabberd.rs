//! Test harness: a REAL ejabberd cluster (Debian's ejabberd 23.01 package, two nodes unless a
//! [`ClusterSpec`] asks for another count) with `auth_method: external`, plus a real XMPP client
//! (slixmpp, `tests/xmpp_login.py`).
//!
//! The one ejabberd launcher of the repository: the end-to-end tests call it directly, and
//! `deploy/tsung/run.sh` through the `extauth-lab ejabberd-cluster` binary of this package
//! (`src/bin/extauth-lab.rs`), which prints what a script needs and stops the cluster on
//! SIGTERM, SIGINT or the end of its stdin.
//!
//! Facts this relies on are in docs/testing.md (the "pitfall N" references below).
//!
//! ```ignore
//! if !common::ejabberd::Cluster::available() { return; }
//! let cluster = Cluster::start("/path/in/cluster.dir()/extauth-shim --broker unix:/…/broker.sock");
//! assert_eq!(xmpp_login(cluster.c2s_port(2), "alice", DOMAIN, "tok"), Ok(true));
//! ```
//!
//! Isolation: every cluster has its own dir (a temp dir unless [`ClusterSpec::dir`] names one),
//! its own epmd on a loopback port (`ERL_EPMD_PORT`; the nodes run with `-start_epmd false`, so
//! they never start one of their own), its own random cookie, unique node names
//! `ejabberd{1,2,…}_<pid>_<n>@localhost`, and c2s listeners on 127.0.0.1 ports (free ones unless
//! [`ClusterSpec::c2s_ports`] names them). Nothing listens on 0.0.0.0 and nothing under /etc or
//! /var/lib/ejabberd is used or written. Drop stops everything by PID; a watchdog shell (the
//! "reaper") kills the nodes and epmd if the process that started them dies without running
//! Drop (SIGKILL, Ctrl-C, a cluster kept in a `static`).
//!
//! Needs: root (Debian's ejabberdctl runs the node as user `ejabberd` via `su`, pitfall 2),
//! ejabberdctl, epmd, openssl, and a python with slixmpp (env `EXTAUTH_XMPP_PYTHON`, default
//! `/opt/extauth-venv/bin/python`). `tests/run` installs all of it.
//!
//! Environment:
//! - `EXTAUTH_REQUIRE_EJABBERD=1`: a missing prerequisite is a test failure instead of a skip.
//! - `KEEP_ON_FAIL=1`: when a test panics, the cluster is left running (and its dir kept) for
//!   inspection; how to reach and stop it is printed.
//! - `EXTAUTH_XMPP_PYTHON`, `EXTAUTH_XMPP_SCRIPT`: the client's python and script.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{chown, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::services::skip_or_require;

/// The only XMPP domain the cluster serves.
pub const DOMAIN: &str = "localhost";
/// `extauth_pool_size` of every node: each node runs this many extauth programs.
pub const EXTAUTH_POOL_SIZE: usize = 2;
/// Upper bound of every wait in `start` (node boot, join, listeners, extauth programs).
const WAIT: Duration = Duration::from_secs(60);
/// Upper bound of one ejabberdctl call.
const CTL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long Drop waits for a graceful `ejabberdctl stop` before killing the nodes.
const STOP_GRACE: Duration = Duration::from_secs(20);
/// Port programs of Erlang/ejabberd itself, which are not extauth programs (`/proc/PID/comm`).
const ERLANG_HELPERS: &[&str] = &[
    "erl_child_setup",
    "inet_gethost",
    "eimp",
    "memsup",
    "cpu_sup",
    "epmd",
];

static CLUSTER_SEQ: AtomicUsize = AtomicUsize::new(0);

struct Node {
    name: String,
    dir: PathBuf,
    c2s_port: u16,
    /// Loopback port of the node's `ejabberd_http` listener serving `mod_http_api` under `/api`.
    api_port: u16,
    /// The node's beam.smp, from `EJABBERD_PID_PATH` (or, before that exists, from its cmdline).
    pid: Option<u32>,
}

/// A running ejabberd cluster (two nodes unless its [`ClusterSpec`] says otherwise). Dropping
/// it stops everything it started; [`Cluster::keep_running`] leaves it running instead.
pub struct Cluster {
    /// The temp dir to remove on drop: `None` for a caller's dir ([`ClusterSpec::dir`]) and
    /// once Drop decided to keep the directory (KEEP_ON_FAIL).
    tmp: Option<tempfile::TempDir>,
    path: PathBuf,
    ejabberdctl: PathBuf,
    epmd_port: u16,
    epmd: Option<Child>,
    reaper: Option<Child>,
    nodes: Vec<Node>,
    /// `extauth_pool_size` of every node.
    pool_size: usize,
    /// Left running ([`Cluster::keep_running`]): Drop does nothing.
    kept: bool,
    ctl_seq: AtomicUsize,
}

impl Cluster {
    /// Whether a real cluster can be run here. When it cannot, prints a loud `SKIPPED` line to
    /// stderr and returns false, or panics if `EXTAUTH_REQUIRE_EJABBERD=1`.
    pub fn available() -> bool {
        let mut missing = missing_for_cluster();
        let python = xmpp_python();
        if !python.exists() {
            missing.push(format!(
                "the XMPP client python {} (python3 -m venv /opt/extauth-venv && /opt/extauth-venv/bin/pip install slixmpp)",
                python.display()
            ));
        }
        let script = xmpp_script();
        if !script.exists() {
            missing.push(format!("the XMPP client script {}", script.display()));
        }
        runnable("This end-to-end test", &missing)
    }

    /// Starts a cluster as [`ClusterSpec::default`] lays it out (two nodes, free ports, a temp
    /// dir): epmd, node 1 and node 2, joins node 2 to node 1, waits for both, and checks that
    /// each node runs [`EXTAUTH_POOL_SIZE`] live extauth programs. Panics (after stopping
    /// whatever it started, unless `KEEP_ON_FAIL=1`) with the node logs on any failure.
    ///
    /// `extauth_program` is the command line ejabberd runs through `/bin/sh -c` as user
    /// `ejabberd`; everything it names must be readable/executable by that user (copy binaries
    /// into [`Cluster::dir`], see [`Cluster::start_with`]). Erlang itself runs a port command as
    /// `/bin/sh -c "exec CMD"`; the harness makes CMD
    /// `/bin/sh -c 'exec <extauth_program>' 2>>NODE_DIR/extauth.stderr`, so its stderr ends up in
    /// [`Cluster::logs`] and its environment has `EXTAUTH_NODE` and `EXTAUTH_TEST_NODE` set to
    /// the node's name (the shim sends `EXTAUTH_NODE` to the broker), plus whatever the test
    /// process had (the environment passes through ejabberdctl, su and the Erlang VM).
    pub fn start(extauth_program: &str) -> Cluster {
        Cluster::start_with(|_dir| extauth_program.to_string())
    }

    /// Like [`Cluster::start`], but the command line comes from `program(dir)`, which is called
    /// with [`Cluster::dir`] before the nodes boot: copy the binaries/scripts user `ejabberd` must
    /// run (or start what they connect to) there, and return the command line.
    pub fn start_with(program: impl FnOnce(&Path) -> String) -> Cluster {
        ClusterSpec::default().start_with(program)
    }
}

/// How to lay out a cluster: how many nodes, which ports, how many extauth programs, where.
/// [`ClusterSpec::default`] is what the tests use; `extauth-lab ejabberd-cluster` fills it from
/// its command line. Start it with [`ClusterSpec::start_with`].
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Number of nodes, at least 1; nodes 2.. join node 1's cluster. Default 2.
    pub nodes: usize,
    /// `extauth_pool_size` of every node: the extauth programs each node runs and must keep
    /// alive before the cluster is reported up (pitfall 7). At least 1; default
    /// [`EXTAUTH_POOL_SIZE`].
    pub pool_size: usize,
    /// The c2s port of each node on 127.0.0.1, node 1 first: empty for free ports, else exactly
    /// one per node. A port somebody already listens on fails the start.
    pub c2s_ports: Vec<u16>,
    /// The cluster's own epmd port on 127.0.0.1; `None` for a free one. A port somebody already
    /// listens on fails the start.
    pub epmd_port: Option<u16>,
    /// Where the cluster keeps its files (`node1/`, `node2/`, …, `cert.pem`, `epmd.log`): `None`
    /// for a fresh temp dir, removed when the cluster stops; `Some(dir)` for `dir`, created if
    /// missing, made 0755 (user `ejabberd` must traverse it), and kept after the stop, logs
    /// included. Its `nodeN/` directories must not exist yet.
    pub dir: Option<PathBuf>,
}

impl Default for ClusterSpec {
    /// Two nodes, [`EXTAUTH_POOL_SIZE`] programs each, free ports, a temp dir.
    fn default() -> ClusterSpec {
        ClusterSpec {
            nodes: 2,
            pool_size: EXTAUTH_POOL_SIZE,
            c2s_ports: Vec::new(),
            epmd_port: None,
            dir: None,
        }
    }
}

impl ClusterSpec {
    /// Starts the cluster: its own epmd, every node in parallel, joins nodes 2.. to node 1 and
    /// waits for each (pitfall 8), waits for every c2s listener, and checks that each node keeps
    /// [`ClusterSpec::pool_size`] live extauth programs. Takes 7 to 12 s for two nodes on 2
    /// vCPUs. `program(dir)` is called with [`Cluster::dir`] before the nodes boot and returns
    /// the `extauth_program` command line, as for [`Cluster::start_with`].
    ///
    /// Panics on a spec it cannot honour (no node, a pool of 0, a c2s port count other than
    /// the node count, a port already taken, node directories left from an earlier cluster)
    /// and on any start failure, with the node logs; whatever was started is stopped first,
    /// unless `KEEP_ON_FAIL=1`.
    pub fn start_with(&self, program: impl FnOnce(&Path) -> String) -> Cluster {
        let t0 = Instant::now();
        assert!(self.nodes >= 1, "a cluster needs at least one node");
        assert!(self.pool_size >= 1, "extauth_pool_size must be at least 1");
        assert!(
            self.c2s_ports.is_empty() || self.c2s_ports.len() == self.nodes,
            "{} c2s ports for {} nodes: give one per node, or none for free ports",
            self.c2s_ports.len(),
            self.nodes
        );
        let ejabberdctl = find_program("ejabberdctl")
            .expect("ejabberdctl not found: call Cluster::available() before Cluster::start()");
        let epmd_bin = find_program("epmd").expect("epmd not found");
        let (uid, gid) = ejabberd_user().expect("no system user `ejabberd`");

        let (tmp, path) = match &self.dir {
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("extauth-ejabberd-")
                    .tempdir_in(scratch_base())
                    .expect("create the cluster's temp dir");
                let path = tmp.path().to_path_buf();
                (Some(tmp), path)
            }
            Some(dir) => {
                fs::create_dir_all(dir)
                    .unwrap_or_else(|e| panic!("create the cluster dir {}: {e}", dir.display()));
                let path = fs::canonicalize(dir).expect("canonicalize the cluster dir");
                for i in 1..=self.nodes {
                    let node = path.join(format!("node{i}"));
                    assert!(
                        !node.exists(),
                        "{} exists (an earlier cluster's?): give a fresh directory",
                        node.display()
                    );
                }
                (None, path)
            }
        };
        // tempfile makes it 0700; user ejabberd must reach the node dirs and the caller's binaries.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .expect("chmod 0755 the cluster dir");

        let seq = CLUSTER_SEQ.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}_{}", std::process::id(), seq);
        // epmd, then a c2s and an API port per node.
        let mut free = free_ports(1 + 2 * self.nodes).into_iter();
        let mut ports = || free.next().expect("enough free ports");
        for &port in self.epmd_port.iter().chain(&self.c2s_ports) {
            assert!(
                !port_taken(port),
                "port 127.0.0.1:{port} is taken (a stock ejabberd or epmd? another cluster?)"
            );
        }
        let epmd_port = self.epmd_port.unwrap_or_else(&mut ports);
        let nodes = (1..=self.nodes)
            .map(|i| Node {
                name: format!("ejabberd{i}_{tag}@localhost"),
                dir: path.join(format!("node{i}")),
                c2s_port: self
                    .c2s_ports
                    .get(i - 1)
                    .copied()
                    .unwrap_or_else(&mut ports),
                api_port: ports(),
                pid: None,
            })
            .collect();
        let cookie = random_hex(16);

        let mut cluster = Cluster {
            tmp,
            path: path.clone(),
            ejabberdctl,
            epmd_port,
            epmd: None,
            reaper: None,
            nodes,
            pool_size: self.pool_size,
            kept: false,
            ctl_seq: AtomicUsize::new(0),
        };
        // From here on a panic unwinds through `cluster`, whose Drop stops what was started.

        cluster.spawn_reaper();
        cluster.make_cert(uid, gid);
        cluster.start_epmd(&epmd_bin);
        let extauth_program = program(&path);
        let extauth_program = extauth_program.as_str();
        let count = cluster.nodes.len();
        for i in 1..=count {
            cluster.write_node_files(i, &cookie, extauth_program, uid, gid);
        }

        // Boot every node in parallel. Never pipe `ejabberdctl start` (pitfall 11): its output
        // goes to a file.
        let t_boot = Instant::now();
        let mut starters = Vec::new();
        for i in 1..=count {
            let out = cluster.nodes[i - 1].dir.join("start.out");
            let mut cmd = cluster.ctl_command(i, &["start"]);
            starters.push((
                i,
                spawn_logged(&mut cmd, &out)
                    .unwrap_or_else(|e| panic!("spawn ejabberdctl start: {e}")),
            ));
        }
        for (i, child) in starters {
            let out = cluster.nodes[i - 1].dir.join("start.out");
            match wait_bounded(child, CTL_TIMEOUT) {
                Ok(Some(0)) => {}
                other => cluster.fail(&format!(
                    "`ejabberdctl start` of node {i} failed ({other:?}): {}",
                    read_lossy(&out)
                )),
            }
        }
        for i in 1..=count {
            cluster.wait_started(i, t_boot);
        }
        let boot = t_boot.elapsed();

        let t_join = Instant::now();
        let node1 = cluster.nodes[0].name.clone();
        for i in 2..=count {
            if let Err(e) = cluster.ctl(i, &["join_cluster", &node1]) {
                cluster.fail(&format!("join_cluster {node1} on node {i} failed: {e}"));
            }
            // join_cluster restarts the joining node's ejabberd application (pitfall 8).
            cluster.wait_started(i, t_join);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let listed = cluster.ctl(1, &["list_cluster"]).unwrap_or_default();
            if cluster.nodes.iter().all(|n| listed.contains(&n.name)) {
                break;
            }
            if Instant::now() > deadline {
                cluster.fail(&format!(
                    "list_cluster on node 1 never showed all {count} nodes; last output: {listed}"
                ));
            }
            sleep(Duration::from_millis(300));
        }
        let join = t_join.elapsed();

        let t_check = Instant::now();
        for i in 1..=count {
            cluster.wait_c2s(i);
        }
        cluster.wait_extauth_programs();
        let listeners: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("{} c2s 127.0.0.1:{}", n.name, n.c2s_port))
            .collect();
        eprintln!(
            "[ejabberd harness] cluster up in {:.1}s (boot {:.1}s, join {:.1}s, checks {:.1}s): {}, epmd 127.0.0.1:{}, dir {}",
            t0.elapsed().as_secs_f64(),
            boot.as_secs_f64(),
            join.as_secs_f64(),
            t_check.elapsed().as_secs_f64(),
            listeners.join(", "),
            cluster.epmd_port,
            cluster.path.display()
        );
        cluster
    }
}

impl Cluster {
    /// The number of nodes (2 unless the [`ClusterSpec`] said otherwise). Nodes are numbered
    /// from 1.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// `extauth_pool_size` of every node: the extauth programs each one keeps running.
    pub fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// The loopback c2s port of node 1 or 2 (or any node `1..=node_count()`; panics on others,
    /// like every per-node accessor).
    pub fn c2s_port(&self, node: usize) -> u16 {
        self.node(node).c2s_port
    }

    /// The loopback port of node 1's or 2's HTTP API (`mod_http_api` at `/api`; loopback
    /// callers may run `kick_user` without credentials, see `api_permissions`).
    pub fn api_port(&self, node: usize) -> u16 {
        self.node(node).api_port
    }

    /// The argv and environment that run `ejabberdctl ARGS…` against node 1 or 2 from another
    /// process (e.g. a kick hook's command); run it with [`Cluster::dir`] as working directory.
    pub fn ctl_argv(&self, node: usize, args: &[&str]) -> (Vec<String>, Vec<(String, String)>) {
        let cmd = self.ctl_command(node, args);
        let argv = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let env = cmd
            .get_envs()
            .filter_map(|(k, v)| {
                Some((
                    k.to_string_lossy().into_owned(),
                    v?.to_string_lossy().into_owned(),
                ))
            })
            .collect();
        (argv, env)
    }

    /// Erlang node name of node 1 or 2 (e.g. `ejabberd1_4242_0@localhost`).
    pub fn node_name(&self, node: usize) -> &str {
        &self.node(node).name
    }

    /// The cluster's own epmd port on 127.0.0.1.
    pub fn epmd_port(&self) -> u16 {
        self.epmd_port
    }

    /// The PID of the cluster's own epmd (`None` once stopped or handed over).
    pub fn epmd_pid(&self) -> Option<u32> {
        self.epmd.as_ref().map(Child::id)
    }

    /// The PID of node 1's or 2's Erlang VM (`beam.smp`), as the node wrote it to its
    /// `EJABBERD_PID_PATH`. Known once the cluster is up.
    pub fn beam_pid(&self, node: usize) -> Option<u32> {
        self.node(node).pid
    }

    /// The directory of node 1 or 2: `conf/` (ejabberdctl.cfg, ejabberd.yml), `spool/`, `logs/`
    /// (ejabberd.log, error.log) and `extauth.stderr`, the extauth programs' stderr.
    pub fn node_dir(&self, node: usize) -> &Path {
        &self.node(node).dir
    }

    /// One shell command line that runs `ejabberdctl` against node 1 or 2 from any shell, the
    /// node's command and arguments to be appended: `env -C DIR -u ERL_FLAGS … ERL_EPMD_PORT=…
    /// /usr/sbin/ejabberdctl --config-dir … --spool … --logs …`, each word shell-quoted. E.g.
    /// `eval "$NODE1_CTL status"`. Unbounded, unlike [`Cluster::ctl`].
    pub fn ctl_shell(&self, node: usize) -> String {
        shell_line(&self.ctl_command(node, &[]))
    }

    /// Root-owned, world-readable (0755) scratch dir for files user `ejabberd` must read or run.
    /// Removed by Drop.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// Diagnostics of node 1 or 2: its ejabberd.log, error.log and the extauth programs' stderr.
    pub fn logs(&self, node: usize) -> String {
        let n = self.node(node);
        let mut s = String::new();
        for (title, file) in [
            ("ejabberd.log", n.dir.join("logs/ejabberd.log")),
            ("error.log", n.dir.join("logs/error.log")),
            ("extauth program stderr", n.dir.join("extauth.stderr")),
        ] {
            s.push_str(&format!(
                "----- {} {} ({}) -----\n",
                n.name,
                title,
                file.display()
            ));
            s.push_str(&read_lossy(&file));
            if !s.ends_with('\n') {
                s.push('\n');
            }
        }
        s
    }

    /// Runs `ejabberdctl COMMAND ARGS…` against node 1 or 2 (bounded). Ok(output) on exit code 0.
    /// E.g. `cluster.ctl(1, &["check_password", "alice", DOMAIN, "tok"])` (mod_admin_extra is loaded).
    pub fn ctl(&self, node: usize, args: &[&str]) -> Result<String, String> {
        let seq = self.ctl_seq.fetch_add(1, Ordering::SeqCst);
        let out = self.path.join(format!("ctl-{seq}.out"));
        let mut cmd = self.ctl_command(node, args);
        let child = spawn_logged(&mut cmd, &out).map_err(|e| format!("spawn ejabberdctl: {e}"))?;
        let res = wait_bounded(child, CTL_TIMEOUT);
        let text = read_lossy(&out);
        let _ = fs::remove_file(&out);
        match res {
            Ok(Some(0)) => Ok(text),
            Ok(code) => Err(format!(
                "ejabberdctl {} exited with {code:?}: {}",
                args.join(" "),
                text.trim()
            )),
            Err(e) => Err(format!(
                "ejabberdctl {}: {e}: {}",
                args.join(" "),
                text.trim()
            )),
        }
    }

    /// PIDs of the extauth programs node 1 or 2 currently runs (direct children of the node's
    /// `erl_child_setup`, without Erlang's own helpers such as inet_gethost and eimp).
    pub fn extauth_pids(&self, node: usize) -> Vec<u32> {
        match self.node(node).pid {
            Some(beam) => extauth_children(beam, &proc_table()),
            None => Vec::new(),
        }
    }

    // ----- internals -----

    fn node(&self, node: usize) -> &Node {
        assert!(
            (1..=self.nodes.len()).contains(&node),
            "node must be 1 to {}, got {node}",
            self.nodes.len()
        );
        &self.nodes[node - 1]
    }

    fn ctl_command(&self, node: usize, args: &[&str]) -> Command {
        let n = self.node(node);
        let mut cmd = Command::new(&self.ejabberdctl);
        // --config-dir, not --config (pitfall 1): ejabberdctl.cfg there sets EJABBERD_CONFIG_PATH.
        cmd.arg("--config-dir")
            .arg(n.dir.join("conf"))
            .arg("--spool")
            .arg(n.dir.join("spool"))
            .arg("--logs")
            .arg(n.dir.join("logs"))
            .args(args)
            .current_dir(&self.path)
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("EXTAUTH_NODE", &n.name)
            .env("EXTAUTH_TEST_NODE", &n.name)
            .env_remove("ERL_FLAGS")
            .env_remove("ERL_AFLAGS")
            .env_remove("ERL_ZFLAGS");
        cmd
    }

    fn spawn_reaper(&mut self) {
        // Runs in its own process group (so Ctrl-C on the test does not kill it too) and, once
        // the test process is gone, kills every PID listed in `reaper.pids` and removes the dir
        // when it is the cluster's own temp dir (a caller's dir stays, logs included).
        // "Alive" = /proc/PID exists, is no zombie and has the same start time (PID reuse).
        let script = r#"alive() {
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    set -- ${s##*) }
    case "$1" in Z|X) return 1 ;; esac
    [ "${20}" = "$START" ]
}
while alive "$PARENT"; do sleep 1; done
for p in $(cat "$DIR/reaper.pids" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
sleep 1
if [ "$REMOVE" = 1 ]; then case "$DIR" in */extauth-ejabberd-*) rm -rf "$DIR" ;; esac; fi"#;
        let me = std::process::id();
        let start_time = proc_table()
            .into_iter()
            .find(|p| p.pid == me)
            .map(|p| p.start_time)
            .unwrap_or(0);
        let child = Command::new("/bin/sh")
            .args(["-c", script, "extauth-ejabberd-reaper"])
            .env("PARENT", me.to_string())
            .env("START", start_time.to_string())
            .env("DIR", &self.path)
            .env("REMOVE", if self.tmp.is_some() { "1" } else { "0" })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn the reaper shell");
        self.reaper = Some(child);
    }

    fn update_reaper_pids(&self) {
        let mut pids: Vec<u32> = self.nodes.iter().filter_map(|n| n.pid).collect();
        if let Some(e) = &self.epmd {
            pids.push(e.id());
        }
        let list: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
        let _ = fs::write(self.path.join("reaper.pids"), list.join("\n"));
    }

    fn make_cert(&self, uid: u32, gid: u32) {
        let key = self.path.join("key.pem");
        let crt = self.path.join("crt.pem");
        let out = Command::new(find_program("openssl").expect("openssl not found"))
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .args([
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        if !out.status.success() {
            self.fail(&format!(
                "openssl req failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let pem = self.path.join("cert.pem");
        let mut both = fs::read(&key).expect("read key.pem");
        both.extend(fs::read(&crt).expect("read crt.pem"));
        fs::write(&pem, both).expect("write cert.pem");
        let _ = fs::remove_file(&key);
        let _ = fs::remove_file(&crt);
        chown(&pem, Some(uid), Some(gid)).expect("chown cert.pem");
        fs::set_permissions(&pem, fs::Permissions::from_mode(0o600)).expect("chmod cert.pem");
    }

    fn start_epmd(&mut self, epmd_bin: &Path) {
        let log = self.path.join("epmd.log");
        let mut cmd = Command::new(epmd_bin);
        cmd.args([
            "-address",
            "127.0.0.1",
            "-port",
            &self.epmd_port.to_string(),
        ])
        .env("ERL_EPMD_PORT", self.epmd_port.to_string())
        .process_group(0);
        let child = spawn_logged(&mut cmd, &log).unwrap_or_else(|e| panic!("spawn epmd: {e}"));
        self.epmd = Some(child);
        self.update_reaper_pids();
        let addr = SocketAddr::from(([127, 0, 0, 1], self.epmd_port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            let exited = self.epmd.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                self.fail(&format!(
                    "epmd on 127.0.0.1:{} did not come up (exit: {exited:?}): {}",
                    self.epmd_port,
                    read_lossy(&log)
                ));
            }
            sleep(Duration::from_millis(20));
        }
    }

    fn write_node_files(&self, i: usize, cookie: &str, extauth_program: &str, uid: u32, gid: u32) {
        let n = &self.nodes[i - 1];
        let conf = n.dir.join("conf");
        for d in [
            conf.clone(),
            n.dir.join("spool"),
            n.dir.join("logs"),
            n.dir.join("contrib"),
        ] {
            fs::create_dir_all(&d).expect("create node dir");
        }
        let cfg = format!(
            "# written by the extauth-broker test harness\n\
             ERLANG_NODE={name}\n\
             ERL_OPTIONS=\"-setcookie {cookie} -kernel inet_dist_use_interface {{127,0,0,1}} -start_epmd false -env ERL_CRASH_DUMP_BYTES 0\"\n\
             ERL_EPMD_ADDRESS=127.0.0.1\n\
             export ERL_EPMD_PORT={epmd}\n\
             EJABBERD_CONFIG_PATH={dir}/conf/ejabberd.yml\n\
             EJABBERD_PID_PATH={dir}/ejabberd.pid\n\
             EJABBERD_BYPASS_WARNINGS=true\n\
             CONTRIB_MODULES_PATH={dir}/contrib\n",
            name = n.name,
            epmd = self.epmd_port,
            dir = n.dir.display(),
        );
        fs::write(conf.join("ejabberdctl.cfg"), cfg).expect("write ejabberdctl.cfg");
        // ejabberdctl points ERL_INETRC at CONFIG_DIR/inetrc; an empty one avoids an error report
        // on every call.
        fs::write(conf.join("inetrc"), "").expect("write inetrc");
        let stderr_log = n.dir.join("extauth.stderr");
        // Erlang runs a spawn port as `/bin/sh -c "exec CMD"` (erl_child_setup), so CMD must not
        // start with `exec` itself; the inner `exec` keeps the program's semantics unchanged.
        let program = format!(
            "/bin/sh -c {} 2>>{}",
            sh_quote(&format!("exec {extauth_program}")),
            sh_quote(&stderr_log.to_string_lossy())
        );
        let yml = format!(
            r#"# written by the extauth-broker test harness (see docs/testing.md)
loglevel: info
# No rotation: deploy/tsung/run.sh counts every login of its storm in ejabberd.log.
log_rotate_size: infinity
hosts: ["localhost"]
certfiles: [{cert}]
listen:
  - port: {port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    max_stanza_size: 262144
    access: c2s
    shaper: c2s_shaper
    starttls: true
    starttls_required: false
    backlog: 1024
  - port: {api_port}
    ip: "127.0.0.1"
    module: ejabberd_http
    request_handlers:
      /api: mod_http_api
auth_method: external
extauth_program: {program}
extauth_pool_size: {pool}
auth_use_cache: false
# As docs/ejabberd.md recommends; checks that ejabberd 23.01 accepts both forms.
disable_sasl_mechanisms: ["X-OAUTH2"]
host_config:
  localhost:
    auth_use_cache: false
acl:
  local: {{user_regexp: ""}}
access_rules:
  local: {{allow: local}}
  c2s: {{allow: all}}
api_permissions:
  "console commands": {{from: [ejabberd_ctl], who: all, what: "*"}}
  "kick from loopback": {{from: [mod_http_api], who: {{ip: "127.0.0.1/8"}}, what: [kick_user]}}
shaper_rules:
  max_user_sessions: 10
  c2s_shaper: none
modules:
  mod_admin_extra: {{}}
  mod_disco: {{}}
  mod_ping: {{}}
  mod_roster: {{}}
  mod_stream_mgmt: {{}}
"#,
            cert = yaml_quote(&self.path.join("cert.pem").to_string_lossy()),
            port = n.c2s_port,
            api_port = n.api_port,
            program = yaml_quote(&program),
            pool = self.pool_size,
        );
        fs::write(conf.join("ejabberd.yml"), yml).expect("write ejabberd.yml");
        chown_recursive(&n.dir, uid, gid).expect("chown the node dir to ejabberd");
    }

    /// Polls `ejabberdctl status` until the node says it is started; records its PID.
    fn wait_started(&mut self, i: usize, since: Instant) {
        let deadline = since + WAIT;
        let mut last;
        loop {
            if self.nodes[i - 1].pid.is_none() {
                self.nodes[i - 1].pid = find_beam(&self.nodes[i - 1].name);
                self.update_reaper_pids();
            }
            match self.ctl(i, &["status"]) {
                Ok(_) => break,
                Err(e) => last = e,
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "node {i} did not start within {WAIT:?}; last status: {last}"
                ));
            }
            sleep(Duration::from_millis(200));
        }
        // ejabberd writes EJABBERD_PID_PATH when its application starts: that is the beam.smp.
        let pid_file = self.nodes[i - 1].dir.join("ejabberd.pid");
        let from_file = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        match from_file.or_else(|| find_beam(&self.nodes[i - 1].name)) {
            Some(pid) => self.nodes[i - 1].pid = Some(pid),
            None => self.fail(&format!(
                "node {i} is started but its PID is unknown ({})",
                pid_file.display()
            )),
        }
        self.update_reaper_pids();
    }

    fn wait_c2s(&self, i: usize) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.nodes[i - 1].c2s_port));
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err() {
            if Instant::now() > deadline {
                self.fail(&format!("node {i} does not accept connections on {addr}"));
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// On each node, at least `pool_size` extauth programs that stay alive across a 0.5 s
    /// window (a broken program is restarted in a loop by ejabberd's supervisor, pitfall 7).
    fn wait_extauth_programs(&self) {
        let beams: Vec<u32> = self
            .nodes
            .iter()
            .map(|n| n.pid.expect("beam pid known"))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20).min(WAIT);
        loop {
            let table = proc_table();
            let before: Vec<Vec<u32>> =
                beams.iter().map(|&b| extauth_children(b, &table)).collect();
            sleep(Duration::from_millis(500));
            let table = proc_table();
            let after: Vec<Vec<u32>> = beams.iter().map(|&b| extauth_children(b, &table)).collect();
            let stable: Vec<usize> = (0..beams.len())
                .map(|i| before[i].iter().filter(|p| after[i].contains(p)).count())
                .collect();
            if stable.iter().all(|&n| n >= self.pool_size) {
                return;
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "not every node has {} live extauth programs (stable per node: {stable:?}, \
                     now: {after:?}); is the program runnable by user ejabberd? See its stderr below.",
                    self.pool_size
                ));
            }
        }
    }

    /// Panics with `msg` and every node's logs. The panic unwinds through Drop, which cleans up.
    fn fail(&self, msg: &str) -> ! {
        let mut logs = String::new();
        for n in &self.nodes {
            if n.dir.exists() {
                for (title, file) in [
                    ("ejabberd.log", n.dir.join("logs/ejabberd.log")),
                    ("error.log", n.dir.join("logs/error.log")),
                    ("extauth program stderr", n.dir.join("extauth.stderr")),
                ] {
                    logs.push_str(&format!(
                        "----- {} {} (last lines of {}) -----\n",
                        n.name,
                        title,
                        file.display()
                    ));
                    logs.push_str(&tail(&read_lossy(&file), 60));
                }
                let start_out = read_lossy(&n.dir.join("start.out"));
                if !start_out.trim().is_empty() {
                    logs.push_str(&format!("----- {} start.out -----\n{start_out}\n", n.name));
                }
            }
        }
        panic!("[ejabberd harness] {msg}\n{logs}");
    }

    fn teardown(&mut self) {
        let t0 = Instant::now();
        let table = proc_table();
        // Everything the nodes started (extauth programs, erl_child_setup, …), so that nothing
        // outlives them: once a beam is gone its children are re-parented and cannot be found.
        let mut started: Vec<(u32, u64)> = Vec::new();
        for n in &mut self.nodes {
            if n.pid.is_none() {
                n.pid = find_beam(&n.name);
            }
            if let Some(pid) = n.pid {
                for d in descendants(pid, &table) {
                    if let Some(p) = table.iter().find(|p| p.pid == d) {
                        started.push((p.pid, p.start_time));
                    }
                }
            }
        }
        let alive: Vec<usize> = (1..=self.nodes.len())
            .filter(|&i| self.nodes[i - 1].pid.is_some_and(is_alive))
            .collect();

        // Graceful stop of both nodes in parallel.
        let mut stoppers = Vec::new();
        for &i in &alive {
            let out = self.path.join(format!("stop-node{i}.out"));
            let mut cmd = self.ctl_command(i, &["stop"]);
            if let Ok(child) = spawn_logged(&mut cmd, &out) {
                stoppers.push(child);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline
            && alive
                .iter()
                .any(|&i| self.nodes[i - 1].pid.is_some_and(is_alive))
        {
            sleep(Duration::from_millis(100));
        }
        for mut child in stoppers {
            if child.try_wait().ok().flatten().is_none() {
                kill_group(child.id());
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        for &i in &alive {
            if let Some(pid) = self.nodes[i - 1].pid.filter(|&p| is_alive(p)) {
                eprintln!("[ejabberd harness] node {i} (pid {pid}) still alive after ejabberdctl stop: SIGKILL");
                signal(pid, "KILL");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && alive
                .iter()
                .any(|&i| self.nodes[i - 1].pid.is_some_and(is_alive))
        {
            sleep(Duration::from_millis(50));
        }
        // Leftovers: children of the nodes that ignored EOF, stray ejabberdctl VMs of this cluster.
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for p in proc_table() {
            let ours = started.contains(&(p.pid, p.start_time))
                || (p.pid != std::process::id()
                    && names.iter().any(|n| p.cmdline.contains(n.as_str())));
            if ours && p.state != 'Z' {
                signal(p.pid, "KILL");
            }
        }
        if let Some(mut epmd) = self.epmd.take() {
            let _ = epmd.kill();
            let _ = epmd.wait();
        }
        if let Some(mut reaper) = self.reaper.take() {
            let _ = reaper.kill();
            let _ = reaper.wait();
        }
        eprintln!(
            "[ejabberd harness] cluster stopped in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
    }
}

impl Cluster {
    /// Leaves the cluster running (nodes, epmd, the directory) instead of stopping it, and
    /// returns how to reach and stop it by hand: for each node its name, beam PID, c2s port and
    /// an `ejabberdctl … status` command line, then a `kill …; rm -rf …` line. What
    /// `KEEP_ON_FAIL=1` does on a failed test; `extauth-lab` does it on a `keep` line.
    pub fn keep_running(mut self) -> String {
        self.leave_running()
    }

    /// Hands everything over to nobody: no reaper, no stop on drop, the temp dir kept.
    fn leave_running(&mut self) -> String {
        self.kept = true;
        if let Some(mut reaper) = self.reaper.take() {
            let _ = reaper.kill();
            let _ = reaper.wait();
        }
        // Forgetting the TempDir keeps the directory (works with every tempfile 3.x).
        std::mem::forget(self.tmp.take());
        let epmd = self.epmd.take().map(|c| {
            let id = c.id();
            std::mem::forget(c);
            id
        });
        let pids: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|n| n.pid)
            .map(|p| p.to_string())
            .collect();
        let mut msg = format!("cluster left running in {}\n", self.path.display());
        for (i, n) in self.nodes.iter().enumerate() {
            msg.push_str(&format!(
                "  node {}: {} pid {} c2s 127.0.0.1:{}\n    {} status\n",
                i + 1,
                n.name,
                n.pid.map_or("unknown".into(), |p| p.to_string()),
                n.c2s_port,
                self.ctl_shell(i + 1),
            ));
        }
        msg.push_str(&format!(
            "  epmd pid {} on 127.0.0.1:{}\n  clean up: kill {} {}; rm -rf {}\n",
            epmd.map_or("unknown".into(), |p| p.to_string()),
            self.epmd_port,
            pids.join(" "),
            epmd.map(|p| p.to_string()).unwrap_or_default(),
            self.path.display()
        ));
        msg
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if std::thread::panicking() && std::env::var("KEEP_ON_FAIL").as_deref() == Ok("1") {
            let msg = self.leave_running();
            eprintln!("\n[ejabberd harness] KEEP_ON_FAIL=1: {msg}");
            return;
        }
        self.teardown();
    }
}

/// What a real ejabberd cluster needs on this machine and is missing: ejabberdctl, epmd,
/// openssl, the system user `ejabberd`, and root (Debian's ejabberdctl runs nodes as user
/// ejabberd via su, pitfall 2). Each entry says how to get it.
pub fn missing_for_cluster() -> Vec<String> {
    let mut missing = Vec::new();
    if find_program("ejabberdctl").is_none() {
        missing.push("ejabberdctl (apt-get install ejabberd)".to_string());
    }
    if find_program("epmd").is_none() {
        missing.push("epmd (comes with ejabberd's erlang-base)".to_string());
    }
    if find_program("openssl").is_none() {
        missing.push("openssl".to_string());
    }
    if ejabberd_user().is_none() {
        missing.push("the system user `ejabberd`".to_string());
    }
    if !running_as_root() {
        missing.push("root (Debian's ejabberdctl runs nodes as user ejabberd via su)".to_string());
    }
    missing
}

/// True when nothing is `missing`. Otherwise prints a loud `SKIPPED` block naming `test` and
/// what is missing, and returns false, or panics if `EXTAUTH_REQUIRE_EJABBERD=1` (CI), so a
/// machine without ejabberd never passes these tests silently.
pub fn runnable(test: &str, missing: &[String]) -> bool {
    skip_or_require("EXTAUTH_REQUIRE_EJABBERD", test, missing)
}

/// Logs in once with SASL PLAIN over plain TCP using the real XMPP client
/// (`tests/xmpp_login.py`, slixmpp). Ok(true): session established; Ok(false): the server
/// rejected the credentials; Err: anything else (connection, protocol, timeout), with the
/// client's stderr. The password goes through a 0600 file in a private temp dir, never argv.
pub fn xmpp_login(port: u16, user: &str, domain: &str, password: &str) -> Result<bool, String> {
    let client = XmppClient::spawn(port, user, domain, password, &[])?;
    let res = wait_bounded(client.child, Duration::from_secs(30));
    let text = read_lossy(&client.out);
    // `client.private` (password file included) is removed when it goes out of scope.
    match res {
        Ok(Some(0)) => Ok(true),
        Ok(Some(1)) => Ok(false),
        Ok(code) => Err(format!("xmpp client exited with {code:?}: {}", text.trim())),
        Err(e) => Err(format!("xmpp client: {e}: {}", text.trim())),
    }
}

/// The SASL mechanisms node `port` offers a new client stream to `domain` (before STARTTLS),
/// e.g. `["PLAIN", "SCRAM-SHA-1"]`, read from its `<stream:features/>` over a raw socket.
pub fn sasl_mechanisms(port: u16, domain: &str) -> Result<Vec<String>, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "<?xml version='1.0'?><stream:stream to='{domain}' xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
    )
    .map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("</stream:features>") {
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 || seen.len() > 65536 {
            return Err(format!("no features: {}", String::from_utf8_lossy(&seen)));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    Ok(text
        .split("<mechanism>")
        .skip(1)
        .filter_map(|m| m.split_once("</mechanism>").map(|(m, _)| m.to_owned()))
        .collect())
}

/// The real XMPP client running (`tests/xmpp_login.py`), its output going to a file.
struct XmppClient {
    child: Child,
    out: PathBuf,
    /// Holds the password file and the output; removed on drop.
    private: tempfile::TempDir,
}

impl XmppClient {
    fn spawn(
        port: u16,
        user: &str,
        domain: &str,
        password: &str,
        extra: &[&str],
    ) -> Result<XmppClient, String> {
        let python = xmpp_python();
        let script = xmpp_script();
        let private = tempfile::Builder::new()
            .prefix("extauth-xmpp-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let pw_file = private.path().join("password");
        {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&pw_file)
                .map_err(|e| format!("password file: {e}"))?;
            f.write_all(password.as_bytes())
                .map_err(|e| format!("password file: {e}"))?;
        }
        let out = private.path().join("client.out");
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--jid")
            .arg(format!("{user}@{domain}"))
            .arg("--password-file")
            .arg(&pw_file)
            .args(["--timeout", "15"])
            .args(extra);
        let child = spawn_logged(&mut cmd, &out)
            .map_err(|e| format!("run {} {}: {e}", python.display(), script.display()))?;
        Ok(XmppClient {
            child,
            out,
            private,
        })
    }
}

/// A real XMPP client holding a session open (`tests/xmpp_login.py --hold`), so a test can see
/// the server end it. Killed on drop.
pub struct XmppSession {
    client: XmppClient,
}

impl XmppSession {
    /// Logs `user@domain` in and returns once the session is up; Err (with the client's output)
    /// if the login failed or took more than 30 s. The client keeps the session for at most
    /// `hold`.
    pub fn open(
        port: u16,
        user: &str,
        domain: &str,
        password: &str,
        hold: Duration,
    ) -> Result<XmppSession, String> {
        let hold = format!("{:.1}", hold.as_secs_f64());
        let mut client = XmppClient::spawn(port, user, domain, password, &["--hold", &hold])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = read_lossy(&client.out);
            if text.lines().any(|l| l == "session started") {
                return Ok(XmppSession { client });
            }
            let exited = client.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                return Err(format!(
                    "no session (client exit {exited:?}): {}",
                    text.trim()
                ));
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `within` for the session to end. None: still open; Some((exit code, client
    /// output)): it ended (exit 3 = ended by the server, see `tests/xmpp_login.py`).
    pub fn wait_end(&mut self, within: Duration) -> Option<(Option<i32>, String)> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.client.child.try_wait() {
                return Some((status.code(), read_lossy(&self.client.out)));
            }
            if Instant::now() > deadline {
                return None;
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// The client's output so far.
    pub fn output(&self) -> String {
        read_lossy(&self.client.out)
    }
}

impl Drop for XmppSession {
    fn drop(&mut self) {
        kill_group(self.client.child.id());
        let _ = self.client.child.kill();
        let _ = self.client.child.wait();
    }
}

// ----- helpers (std only) -----

fn xmpp_python() -> PathBuf {
    std::env::var_os("EXTAUTH_XMPP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/extauth-venv/bin/python"))
}

fn xmpp_script() -> PathBuf {
    std::env::var_os("EXTAUTH_XMPP_SCRIPT")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::services::repo_root().join("tests/xmpp_login.py"))
}

/// The executable `name` on PATH or in the usual sbin and bin directories.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// (uid, gid) of the `ejabberd` system user, from /etc/passwd.
fn ejabberd_user() -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 4 && f[0] == "ejabberd" {
            Some((f[2].parse::<u32>().ok()?, f[3].parse::<u32>().ok()?))
        } else {
            None
        }
    })
}

/// $TMPDIR if user ejabberd can traverse every ancestor, else /tmp.
fn scratch_base() -> PathBuf {
    let base = std::env::temp_dir();
    let traversable = base.ancestors().all(|a| {
        fs::metadata(a)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    });
    if traversable {
        base
    } else {
        PathBuf::from("/tmp")
    }
}

/// `count` distinct free 127.0.0.1 TCP ports (all bound at once, then released).
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `cmd` as one shell command line: `env [-C DIR] [-u NAME]… [NAME=VALUE]… PROGRAM ARGS…`,
/// every word quoted.
fn shell_line(cmd: &Command) -> String {
    let mut words = vec!["env".to_string()];
    if let Some(dir) = cmd.get_current_dir() {
        words.push("-C".into());
        words.push(sh_quote(&dir.to_string_lossy()));
    }
    let envs: Vec<_> = cmd.get_envs().collect();
    for (k, v) in &envs {
        if v.is_none() {
            words.push("-u".into());
            words.push(sh_quote(&k.to_string_lossy()));
        }
    }
    for (k, v) in &envs {
        if let Some(v) = v {
            words.push(sh_quote(&format!(
                "{}={}",
                k.to_string_lossy(),
                v.to_string_lossy()
            )));
        }
    }
    words.push(sh_quote(&cmd.get_program().to_string_lossy()));
    words.extend(cmd.get_args().map(|a| sh_quote(&a.to_string_lossy())));
    words.join(" ")
}

/// Whether something accepts connections on 127.0.0.1:`port` (a listener on 0.0.0.0 or `::`
/// included).
fn port_taken(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

fn yaml_quote(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' => q.push_str("\\\\"),
            '"' => q.push_str("\\\""),
            '\n' => q.push_str("\\n"),
            '\t' => q.push_str("\\t"),
            c if (c as u32) < 0x20 => q.push_str(&format!("\\x{:02x}", c as u32)),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn chown_recursive(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    chown(path, Some(uid), Some(gid))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_recursive(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    let skip = all.len().saturating_sub(lines);
    let mut t = String::new();
    if skip > 0 {
        t.push_str(&format!("[… {skip} earlier lines omitted]\n"));
    }
    for l in &all[skip..] {
        t.push_str(l);
        t.push('\n');
    }
    t
}

/// Spawns `cmd` in its own process group with stdin from /dev/null and stdout+stderr appended to
/// `out` (a file, never a pipe: a daemon that inherits a pipe keeps its reader waiting, pitfall 11).
fn spawn_logged(cmd: &mut Command, out: &Path) -> std::io::Result<Child> {
    let f = fs::OpenOptions::new().create(true).append(true).open(out)?;
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .process_group(0)
        .spawn()
}

/// Waits for `child` at most `timeout`; on timeout kills its process group. Ok(exit code).
fn wait_bounded(mut child: Child, timeout: Duration) -> Result<Option<i32>, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status.code()),
            Ok(None) if Instant::now() > deadline => {
                kill_group(child.id());
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {timeout:?}"));
            }
            Ok(None) => sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("wait: {e}")),
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

struct ProcInfo {
    pid: u32,
    ppid: u32,
    state: char,
    start_time: u64,
    comm: String,
    cmdline: String,
}

fn proc_table() -> Vec<ProcInfo> {
    let mut v = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid …": comm may contain spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if rest.len() < 20 {
            continue;
        }
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        v.push(ProcInfo {
            pid,
            state: rest[0].chars().next().unwrap_or('?'),
            ppid: rest[1].parse().unwrap_or(0),
            start_time: rest[19].parse().unwrap_or(0),
            comm,
            cmdline,
        });
    }
    v
}

/// Alive = exists and is not a zombie (PID 1 here reaps late, pitfall 12).
fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

/// The beam.smp running node `name` (its cmdline has `-sname NAME`).
fn find_beam(name: &str) -> Option<u32> {
    proc_table()
        .into_iter()
        .find(|p| {
            p.state != 'Z'
                && p.comm.starts_with("beam")
                && p.cmdline
                    .split(' ')
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w[0] == "-sname" && w[1] == name)
        })
        .map(|p| p.pid)
}

fn descendants(root: u32, table: &[ProcInfo]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for c in table.iter().filter(|c| c.ppid == p) {
            out.push(c.pid);
            frontier.push(c.pid);
        }
    }
    out
}

/// Live extauth programs of the node whose beam is `beam`: the port programs (children of the
/// node's erl_child_setup) that are not Erlang's own helpers.
fn extauth_children(beam: u32, table: &[ProcInfo]) -> Vec<u32> {
    let setups: Vec<u32> = table
        .iter()
        .filter(|p| p.ppid == beam && p.comm == "erl_child_setup")
        .map(|p| p.pid)
        .collect();
    let mut pids: Vec<u32> = table
        .iter()
        .filter(|p| {
            setups.contains(&p.ppid) && p.state != 'Z' && !ERLANG_HELPERS.contains(&p.comm.as_str())
        })
        .map(|p| p.pid)
        .collect();
    pids.sort_unstable();
    pids
}
