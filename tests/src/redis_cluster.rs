//! A private three-node Redis Cluster for the tests of this process: started once,
//! on first use, on fresh free ports, and shared (each test keeps to its own
//! namespace).
//!
//! Statics are never dropped, so the servers cannot be stopped from a `Drop`;
//! instead each `redis-server` runs under a small shell watchdog that stops it
//! within a second of this test process exiting, however it exits (even killed).
//! Ports are picked free on every run and the data directory is fresh, so servers
//! left by an earlier run (or still shutting down) never get in the way.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The running cluster: its nodes' ports.
pub struct TestCluster {
    ports: Vec<u16>,
    /// The watchdog shells; they end with their servers, after this process.
    _watchdogs: Vec<Child>,
}

impl TestCluster {
    /// The cluster, started on first call (blocking, a few seconds).
    ///
    /// # Panics
    /// When `redis-server` or `redis-cli` is missing or the cluster does not form.
    pub fn shared() -> &'static Self {
        static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
        CLUSTER.get_or_init(Self::start)
    }

    /// Every node's port.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// Seed URLs of every node, comma-separated (what `connect_cluster` takes).
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("akr-redis-cluster-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cluster data dir");
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < 3 {
            let port = free_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let watchdogs = ports.iter().map(|port| spawn_node(*port, &dir)).collect();
        for port in &ports {
            wait_until(Duration::from_secs(10), || {
                cli(*port, &["PING"]).is_some_and(|out| out.trim() == "PONG")
            })
            .unwrap_or_else(|| panic!("redis-server on port {port} did not start"));
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli not found: install redis-tools");
        assert!(status.success(), "redis-cli --cluster create failed");
        for port in &ports {
            wait_until(Duration::from_secs(20), || {
                cli(*port, &["CLUSTER", "INFO"]).is_some_and(|out| out.contains("cluster_state:ok"))
            })
            .unwrap_or_else(|| {
                panic!("cluster node on port {port} never reached cluster_state:ok")
            });
        }
        Self {
            ports,
            _watchdogs: watchdogs,
        }
    }
}

/// A port free now whose cluster bus port (port + 10000) is free too.
fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Starts a cluster-enabled `redis-server` on `port` under a watchdog shell that
/// stops it once this process is gone, then removes its cluster config, and the data
/// directory with the last node out (it fails while other nodes' files remain). The
/// shell ignores the interrupt and termination signals that end the test process's
/// group (Ctrl-C, a harness's kill), so that it lives on to clean up.
fn spawn_node(port: u16, dir: &std::path::Path) -> Child {
    let port_text = port.to_string();
    let config: PathBuf = dir.join(format!("nodes-{port}.conf"));
    Command::new("sh")
        .arg("-c")
        .arg(
            r#"trap '' INT TERM
redis-server "$@" & srv=$!
while kill -0 "$WATCH_PID" 2>/dev/null && kill -0 "$srv" 2>/dev/null; do sleep 1; done
kill "$srv" 2>/dev/null
wait "$srv"
rm -f "$NODE_CONFIG"
rmdir "$NODE_DIR" 2>/dev/null || true"#,
        )
        .arg("sh")
        .args(["--bind", "127.0.0.1", "--port", &port_text])
        .args(["--cluster-enabled", "yes", "--cluster-config-file"])
        .arg(&config)
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .env("WATCH_PID", std::process::id().to_string())
        .env("NODE_CONFIG", &config)
        .env("NODE_DIR", dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sh not found")
}

/// `redis-cli -p port args...`'s output, `None` when it fails.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_until(within: Duration, mut ready: impl FnMut() -> bool) -> Option<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ready() {
            return Some(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}
