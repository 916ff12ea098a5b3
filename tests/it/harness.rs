//! The shared test harness: nodes started on port 0, a line client with a timeout
//! on every read, and the built binary for what only a process shows.

#![allow(dead_code)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvmesh::{Config, Node};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The most any single step of a test may take before it counts as hung.
pub const STEP: Duration = Duration::from_secs(10);

/// Runs `fut`, failing the test if it takes longer than [`STEP`].
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {STEP:?}: {what}"),
    }
}

/// A node configuration listening on a free port, with no routes beyond itself.
pub fn node_config(name: &str) -> Config {
    Config {
        node: name.into(),
        listen: "127.0.0.1:0".into(),
        ..Config::default()
    }
}

/// Logs of the nodes a test runs in its own process, shown with the test's
/// output when `TEST_LOG` is set (`TEST_LOG=kvmesh=debug`, say).
pub fn init_test_log() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("TEST_LOG"))
            .with_test_writer()
            .try_init();
    }
}

/// Starts a node in this process; it is ready when this returns.
pub async fn start_node(config: Config) -> Node {
    init_test_log();
    let settings = config.check().expect("a valid configuration");
    within("node start", Node::start(settings))
        .await
        .expect("node starts")
}

/// A test client speaking the line protocol.
pub struct LineClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl LineClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = within("connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        let (r, w) = stream.into_split();
        Self {
            reader: BufReader::with_capacity(64 * 1024, r),
            writer: w,
        }
    }

    /// Sends raw bytes as they are.
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        within("write", self.writer.write_all(bytes.as_ref()))
            .await
            .expect("write");
    }

    /// Reads exactly `n` bytes.
    pub async fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        within("read", self.reader.read_exact(&mut buf))
            .await
            .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
        buf
    }

    /// Sends one request line (adding `\r\n`) and asserts the exact answer bytes.
    pub async fn exchange(&mut self, request: &str, answer: &str) {
        self.send(format!("{request}\r\n")).await;
        self.expect(answer).await;
    }

    /// Asserts the next bytes read are exactly `answer`.
    pub async fn expect(&mut self, answer: &str) {
        let mut got = self.read_bytes(answer.len()).await;
        if got != answer.as_bytes() && !got.ends_with(b"\n") {
            // Show the whole line that came instead.
            use tokio::io::AsyncBufReadExt;
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                self.reader.read_until(b'\n', &mut got),
            )
            .await;
        }
        assert_eq!(String::from_utf8_lossy(&got), answer, "answer bytes differ");
    }

    /// Asserts the server closed the connection with nothing more to say.
    pub async fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        within("eof", self.reader.read_to_end(&mut rest))
            .await
            .expect("read to end");
        assert!(
            rest.is_empty(),
            "unexpected bytes before close: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }

    /// Half-closes the sending side, as `nc -N` does at the end of its input.
    pub async fn finish_sending(&mut self) {
        within("shutdown", self.writer.shutdown())
            .await
            .expect("shutdown");
    }
}

/// The built `kvmesh` binary.
pub fn kvmesh_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kvmesh")
}

/// A node configuration for a mesh: a name, a routing table, NATS servers.
/// The request timeout is generous, so that a machine busy with other tests
/// never turns a slow answer into a timeout; tests of timeouts set their own.
pub fn mesh_config(name: &str, routes: &[(&str, &str)], nats_url: &str) -> Config {
    Config {
        request_timeout_ms: 15_000,
        node: name.into(),
        listen: "127.0.0.1:0".into(),
        nats_url: Some(nats_url.into()),
        routes: Some(
            routes
                .iter()
                .map(|(range, node)| kvmesh::config::RouteConfig {
                    range: range.to_string(),
                    node: node.to_string(),
                })
                .collect(),
        ),
        ..Config::default()
    }
}

/// The two-node table of the docs: a-m on foo, n-z on bar.
pub const FOO_BAR: &[(&str, &str)] = &[("a-m", "foo"), ("n-z", "bar")];

/// Nodes foo and bar of [`FOO_BAR`] on the NATS at `url`.
pub async fn foo_and_bar(url: &str) -> (Node, Node) {
    let foo = start_node(mesh_config("foo", FOO_BAR, url)).await;
    let bar = start_node(mesh_config("bar", FOO_BAR, url)).await;
    (foo, bar)
}

impl LineClient {
    /// Sends `request` until the answer is `answer` (for the moments when the
    /// mesh is still settling: NATS interest takes a few milliseconds to cross
    /// a cluster, and a client reconnects after a restart). Fails after [`STEP`].
    pub async fn eventually(&mut self, request: &str, answer: &str) {
        let deadline = tokio::time::Instant::now() + STEP;
        let mut last;
        loop {
            self.send(format!("{request}\r\n")).await;
            last = self.read_answer().await;
            if last == answer {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{request:?} never answered {answer:?}; last answer {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reads one whole answer: one line, or two when the first is a value.
    pub async fn read_answer(&mut self) -> String {
        let first = self.read_line().await;
        let one_line = [
            "OK\r\n",
            "PONG\r\n",
            "BYE\r\n",
            "NOT FOUND\r\n",
            "UNKNOWN COMMAND\r\n",
        ];
        if one_line.contains(&first.as_str()) || first.starts_with("ERROR ") {
            first
        } else {
            first + &self.read_line().await
        }
    }

    /// Reads one line, with its `\r\n`.
    pub async fn read_line(&mut self) -> String {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        within("read line", self.reader.read_line(&mut line))
            .await
            .expect("read line");
        line
    }
}

/// A NATS client for talking to nodes as `nats req` would.
pub async fn nats_client(url: &str) -> async_nats::Client {
    within("nats connect", async_nats::connect(url))
        .await
        .expect("nats connect")
}

/// Waits until the server has processed everything `client` sent before
/// (its subscriptions, say): `flush` only writes the client's buffer.
pub async fn nats_round_trip(client: &async_nats::Client) {
    kvmesh::round_trip(client, STEP)
        .await
        .expect("round trip to the NATS server");
}

/// Sends a raw request body, without headers, and returns the reply body.
pub async fn nats_req(client: &async_nats::Client, subject: &str, body: &[u8]) -> String {
    let reply = within(
        "nats request",
        client.request(subject.to_string(), body.to_vec().into()),
    )
    .await
    .unwrap_or_else(|e| panic!("request to {subject}: {e}"));
    String::from_utf8(reply.payload.to_vec()).expect("utf-8 reply")
}

/// A `kvmesh` process, killed on drop if a test fails midway.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// The log lines so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// Waits for `count` log lines containing `needle`.
    pub fn wait_for_log(&self, needle: &str, count: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + STEP;
        loop {
            let found: Vec<String> = self
                .log()
                .into_iter()
                .filter(|l| l.contains(needle))
                .collect();
            if found.len() >= count {
                return found;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {count} log lines with {needle:?}:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal (`-TERM`, `-INT`) and waits for the exit status.
    pub fn stop_with(&mut self, signal: &str) -> Option<i32> {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = std::time::Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(std::time::Instant::now() < deadline, "kvmesh did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal (`-STOP`, `-CONT`, ...) without waiting for anything.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {sig}");
    }

    /// SIGKILL: the process dies without any goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary with no `KVMESH_*` variables from the test's environment.
pub fn clean_command() -> Command {
    let mut cmd = Command::new(kvmesh_bin());
    for (key, _) in std::env::vars() {
        if key.starts_with("KVMESH_") {
            cmd.env_remove(key);
        }
    }
    // KVMESH_TEST_RUST_LOG=<filter> sets the processes' log filter
    // (`kvmesh::store=debug`, say), for a run whose logs are kept.
    let filter = std::env::var("KVMESH_TEST_RUST_LOG").unwrap_or_else(|_| "info".into());
    cmd.env("RUST_LOG", filter);
    cmd
}

/// Starts the binary on a free port and reads the address from its log.
pub fn spawn_kvmesh(args: &[&str]) -> Process {
    spawn_kvmesh_with(clean_command(), args)
}

/// Starts `cmd` (the binary, with its environment) on a free port and reads
/// the address from its log.
pub fn spawn_kvmesh_with(mut cmd: Command, args: &[&str]) -> Process {
    let mut child = cmd
        .args(args)
        .env("KVMESH_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kvmesh");
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = log.clone();
    // KVMESH_TEST_LOG_DIR=<dir> keeps every process's log in <dir>/<pid>.log,
    // for reading a long chaos run after it failed.
    let mut keep = std::env::var_os("KVMESH_TEST_LOG_DIR").and_then(|dir| {
        std::fs::File::create(std::path::Path::new(&dir).join(format!("{}.log", child.id()))).ok()
    });
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(f) = keep.as_mut() {
                use std::io::Write;
                let _ = writeln!(f, "{line}");
            }
            // The address of the "ready" line, in text or JSON form.
            if line.contains("node ready") {
                let addr = line
                    .split("addr")
                    .nth(1)
                    .map(|rest| rest.trim_start_matches(['=', '"', ':']))
                    .and_then(|rest| rest.split(['"', ' ']).next())
                    .unwrap_or_default()
                    .to_string();
                let _ = tx.send(addr);
            }
            lines.lock().expect("log lock").push(line);
        }
    });
    let addr = rx
        .recv_timeout(STEP)
        .expect("kvmesh logs its address")
        .parse()
        .expect("an address");
    Process { child, addr, log }
}

/// A process of the [`FOO_BAR`] mesh on `urls`: foo and bar durable (a
/// standby takes over after 1 s of silence), any other name (`gw`) a memory
/// node owning nothing; with `env` on top.
pub fn spawn_foo_bar_process(urls: &str, node: &str, env: &[(&str, &str)]) -> Process {
    let mut cmd = clean_command();
    cmd.env(
        "KVMESH_ROUTES",
        r#"[{range="a-m",node="foo"},{range="n-z",node="bar"}]"#,
    );
    if node == "foo" || node == "bar" {
        cmd.env("KVMESH_DURABILITY", "jetstream")
            .env("KVMESH_FAILOVER_AFTER_MS", "1000");
    }
    cmd.envs(env.iter().copied());
    spawn_kvmesh_with(cmd, &["--node", node, "--nats-url", urls])
}

/// Runs the binary to its end: exit code, stdout, stderr.
pub fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out = cmd.stdin(Stdio::null()).output().expect("run kvmesh");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl LineClient {
    /// Sends `request` until the answer is not an `ERROR` line, and returns it
    /// (for reads made while the mesh is still healing). Fails after [`STEP`].
    pub async fn read_after(&mut self, request: &str) -> String {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            self.send(format!("{request}\r\n")).await;
            let answer = self.read_answer().await;
            if !answer.starts_with("ERROR ") {
                return answer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{request:?} kept failing: {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Resident memory of a process, in KiB. Fails the test when it cannot be
/// read: a memory check that reads 0 would pass without checking anything.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or_else(|| panic!("cannot read the resident memory of process {pid}"))
}

pub use kvmesh::rng::{XorShift, seed_from_env};

/// Taken by the tests that load the whole machine (chaos, soak, thousands of
/// connections), so that they run one at a time.
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// One request and its answer lines, over a connection that may break (it
/// is made again on the next call): `Err` when no whole answer came within
/// five seconds.
pub async fn ask(
    conn: &mut Option<BufReader<TcpStream>>,
    addr: SocketAddr,
    line: &str,
) -> Result<Vec<String>, ()> {
    if conn.is_none() {
        *conn = TcpStream::connect(addr).await.ok().map(BufReader::new);
    }
    let Some(c) = conn.as_mut() else {
        return Err(());
    };
    let exchange = async {
        c.get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .ok()?;
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            if c.read_line(&mut l).await.ok()? == 0 {
                return None;
            }
            let done = !line.starts_with("GET")
                || l.starts_with("ERROR")
                || l == "NOT FOUND\r\n"
                || !lines.is_empty();
            lines.push(l);
            if done {
                return Some(lines);
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Some(lines)) => Ok(lines),
        _ => {
            *conn = None;
            Err(())
        }
    }
}

/// The metadata of every `kvmesh` instance in the service API, asked through
/// the NATS server at `url` (`$SRV.INFO.kvmesh`).
pub async fn service_metadata(url: &str) -> Vec<serde_json::Value> {
    let client = nats_client(url).await;
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish_with_reply("$SRV.INFO.kvmesh", inbox, "".into())
        .await
        .expect("ask");
    let mut found = Vec::new();
    while let Ok(Some(reply)) = tokio::time::timeout(
        Duration::from_millis(300),
        futures_util::StreamExt::next(&mut replies),
    )
    .await
    {
        let info: serde_json::Value = serde_json::from_slice(&reply.payload).expect("json");
        found.push(info["metadata"].clone());
    }
    found
}
