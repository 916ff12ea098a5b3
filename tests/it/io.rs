//! The two ways a node serves TCP clients, each against the built binary:
//! io_uring loops (`io_uring = true`, the default on Linux where the kernel
//! allows it) and the async runtime (`io_uring = false`). Both give the same
//! bytes, hand over mid-read to the runtime when a line needs it, and drain
//! at shutdown.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::*;

/// The binary serving clients one way or the other; with io_uring asked
/// for, its log says whether the kernel allowed it.
fn spawn_serving(io_uring: bool) -> Process {
    let mut cmd = clean_command();
    cmd.env("KVMESH_IO_URING", if io_uring { "true" } else { "false" });
    let p = spawn_kvmesh_with(cmd, &[]);
    let started = Instant::now();
    let said = loop {
        let log = p.log().join("\n");
        if log.contains("serving connections from io_uring") {
            break Some(true);
        }
        if log.contains("io_uring is not available") {
            break Some(false);
        }
        if !io_uring && started.elapsed() > Duration::from_millis(300) {
            break None;
        }
        assert!(started.elapsed() < STEP, "no word on io_uring:\n{log}");
        std::thread::sleep(Duration::from_millis(10));
    };
    match (io_uring, said) {
        (false, None) => {}
        (true, Some(true)) => {}
        (true, Some(false)) => eprintln!("io_uring is not allowed here: the runtime serves"),
        _ => panic!("io_uring = {io_uring}, yet the log says {said:?}"),
    }
    p
}

/// Writes `input` in one go, half-closes, and reads everything until the
/// node closes.
fn one_shot(addr: std::net::SocketAddr, input: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(STEP)).expect("timeout");
    s.write_all(input).expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read to the close");
    all
}

async fn same_bytes_either_way(io_uring: bool) {
    let p = spawn_serving(io_uring);
    let mut c = LineClient::connect(p.addr).await;
    c.exchange("CREATE s", "OK\r\n").await;
    c.exchange("PUT s k v", "OK\r\n").await;
    // One read of many lines: answered in order, with an over-long line, a
    // bad line and a missing bucket among them.
    let long = "x".repeat(2 * 1024 * 1024);
    c.send(format!(
        "GET s k\r\nPING\r\n{long}\r\nFOO\r\nGET nope k\r\nPUT s k w\nGET s k\r\n"
    ))
    .await;
    c.expect(
        "v\r\nOK\r\nPONG\r\nERROR line too long\r\nUNKNOWN COMMAND\r\nNOT FOUND\r\nOK\r\nw\r\nOK\r\n",
    )
    .await;
    // QUIT in the middle of a read: what comes before it is answered, then
    // BYE, and nothing after it.
    c.send("GET s k\r\nQUIT\r\nGET s k\r\n").await;
    c.expect("w\r\nOK\r\nBYE\r\n").await;
    c.expect_eof().await;
    // The end of input answers an unterminated last line, then closes.
    let all = tokio::task::spawn_blocking({
        let addr = p.addr;
        move || one_shot(addr, b"GET s k\r\nDELETE s k\r\nGET s k")
    })
    .await
    .expect("join");
    assert_eq!(String::from_utf8_lossy(&all), "w\r\nOK\r\nOK\r\n\r\nOK\r\n");
    // Ten thousand pipelined lines in one write, answered in order.
    let mut input = String::new();
    let mut expected = String::new();
    for i in 0..10_000 {
        input.push_str(&format!("PUT s k{i} {i}\r\nGET s k{i}\r\n"));
        expected.push_str(&format!("OK\r\n{i}\r\nOK\r\n"));
    }
    let all = tokio::task::spawn_blocking({
        let addr = p.addr;
        move || one_shot(addr, input.as_bytes())
    })
    .await
    .expect("join");
    assert!(all == expected.as_bytes(), "pipelined answers differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_loops_answer_byte_for_byte() {
    same_bytes_either_way(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_answers_byte_for_byte() {
    same_bytes_either_way(false).await;
}

async fn shutdown_drains(io_uring: bool) {
    let _heavy = heavy().await;
    let mut p = spawn_serving(io_uring);
    let mut setup = LineClient::connect(p.addr).await;
    setup.exchange("CREATE b", "OK\r\n").await;
    let value = "v".repeat(1000);
    setup.exchange(&format!("PUT b k {value}"), "OK\r\n").await;
    // A client whose 2 MB of answers are still being written when the node
    // is told to stop (it reads only after that)...
    let mut slow = TcpStream::connect(p.addr).expect("connect");
    slow.set_read_timeout(Some(STEP)).expect("timeout");
    let count = 2000;
    slow.write_all("GET b k\r\n".repeat(count).as_bytes())
        .expect("write");
    // ...a client that never reads a large answer...
    setup
        .exchange(&format!("PUT b big {}", "x".repeat(400_000)), "OK\r\n")
        .await;
    let mut stuck = TcpStream::connect(p.addr).expect("connect");
    stuck
        .write_all("GET b big\r\n".repeat(40).as_bytes())
        .expect("write");
    // ...and an idle one.
    let mut idle = LineClient::connect(p.addr).await;
    idle.exchange("PING", "PONG\r\n").await;
    std::thread::sleep(Duration::from_millis(300));
    p.signal("-TERM");
    // The slow client gets every answer, in order, then the close.
    let mut all = Vec::new();
    slow.read_to_end(&mut all)
        .expect("the slow client's answers");
    assert!(
        all == format!("{value}\r\nOK\r\n").repeat(count).as_bytes(),
        "answers differ: {} bytes",
        all.len()
    );
    idle.expect_eof().await;
    // The stuck client does not hold the node past its grace period.
    let deadline = Instant::now() + 3 * STEP;
    let code = loop {
        if let Some(status) = p.child.try_wait().expect("try_wait") {
            break status.code();
        }
        assert!(Instant::now() < deadline, "kvmesh did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_loops_drain_at_shutdown() {
    shutdown_drains(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_drains_at_shutdown() {
    shutdown_drains(false).await;
}
