//! The shared test harness: nodes started on port 0, a line client with a timeout
//! on every read, and the built binary for what only a process shows.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use kvmesh::{Config, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
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

/// Starts a node in this process; it is ready when this returns.
pub async fn start_node(config: Config) -> Node {
    within("node start", Node::start(config))
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
        let got = self.read_bytes(answer.len()).await;
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
