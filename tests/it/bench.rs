//! `kvmesh bench` against a real node, and against a node that lies.

use kvmesh::bench::{BenchOptions, ClientIo, Target, run};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::harness::*;

/// Both ways of driving the connections; every test runs under each.
const CLIENTS: [ClientIo; 2] = [ClientIo::Uring, ClientIo::Runtime];

/// The report names the client that drove the connections: the runtime's
/// when asked for, the io_uring one when asked for and the kernel allows it.
fn check_client(io: ClientIo, client: &str) {
    match (io, client) {
        (ClientIo::Runtime, "runtime") | (ClientIo::Uring, "uring") => {}
        (ClientIo::Uring, "runtime") => {
            eprintln!("io_uring is not allowed here: the runtime drove")
        }
        _ => panic!("asked for {io:?}, driven by {client:?}"),
    }
}

/// A server that answers each line of a connection (the line, and how many
/// came before it on that connection) as `answer` says, and closes the
/// connection where it says `None`.
async fn fake_server(
    answer: impl Fn(&str, usize) -> Option<&'static [u8]> + Send + Sync + 'static,
) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                let mut n = 0;
                while let Ok(Some(line)) = lines.next_line().await {
                    let Some(bytes) = answer(&line, n) else {
                        return;
                    };
                    n += 1;
                    if w.write_all(bytes).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A right answer to a GET of a key not there, or to any other line.
fn empty_or_ok(line: &str) -> &'static [u8] {
    if line.starts_with("GET") {
        b"\r\nOK\r\n"
    } else {
        b"OK\r\n"
    }
}

fn options(addr: std::net::SocketAddr) -> BenchOptions {
    BenchOptions {
        target: Target::Kvmesh,
        addrs: vec![addr.to_string()],
        conns: 4,
        pipeline: 8,
        requests: Some(2_000),
        duration: None,
        get_percent: 50,
        buckets: vec!["b1".into(), "b2".into()],
        keys: 100,
        value_size: 16,
        prefill: true,
        subject: None,
        io: ClientIo::Uring,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_add_up_against_a_real_node() {
    let node = start_node(node_config("local")).await;
    for io in CLIENTS {
        let mut opts = options(node.local_addr());
        opts.io = io;
        let report = within("bench", run(opts)).await.expect("bench runs");
        assert_eq!(report.ok, 2_000, "{io:?}");
        assert_eq!(report.errors, 0, "{io:?}: {:?}", report.first_error);
        assert!(report.p50_us <= report.p99_us && report.p99_us <= report.max_us);
        check_client(io, report.client);
    }
    // The prefilled data is really there.
    let mut c = LineClient::connect(node.local_addr()).await;
    c.exchange("GET b1 k7", "k7.k7.k7.k7.k7.k\r\nOK\r\n").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_drives_every_connection_when_it_has_more_than_tasks() {
    // Connections are driven by a few tasks each. With more connections
    // than tasks, and a count that does not divide evenly, every connection
    // still makes requests: a server that counts the connections that sent
    // a GET or a PUT sees all of them.
    let used = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = used.clone();
    let addr = fake_server(move |line, n| {
        // A connection's first line is a GET or a PUT (the buckets are
        // created on a connection of their own).
        if n == 0 && (line.starts_with("GET") || line.starts_with("PUT")) {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Some(empty_or_ok(line))
    })
    .await;
    for io in CLIENTS {
        used.store(0, std::sync::atomic::Ordering::Relaxed);
        let mut opts = options(addr);
        opts.conns = 101;
        opts.pipeline = 1;
        opts.prefill = false;
        opts.requests = None;
        opts.duration = Some(std::time::Duration::from_secs(1));
        opts.io = io;
        let report = within("bench", run(opts)).await.expect("bench runs");
        assert_eq!(report.errors, 0, "{io:?}: {:?}", report.first_error);
        assert!(report.ok > 101, "{io:?}: {} requests", report.ok);
        assert_eq!(
            used.load(std::sync::atomic::Ordering::Relaxed),
            101,
            "{io:?}"
        );
        check_client(io, report.client);
    }
}

#[tokio::test]
async fn bench_counts_wrong_answers_as_errors() {
    // A server that accepts everything but answers every GET with a wrong value.
    let addr = fake_server(|line, _| {
        Some(if line.starts_with("GET") {
            b"wrong\r\nOK\r\n"
        } else {
            b"OK\r\n"
        })
    })
    .await;
    for io in CLIENTS {
        let mut opts = options(addr);
        opts.get_percent = 100;
        opts.requests = Some(500);
        opts.io = io;
        let report = within("bench", run(opts)).await.expect("bench runs");
        assert_eq!(report.ok + report.errors, 500, "{io:?}");
        assert_eq!(report.errors, 500, "{io:?}");
        let first = report.first_error.expect("an error is shown");
        assert!(first.contains("\"wrong\""), "{io:?}: {first}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reads_long_answers_that_arrive_in_pieces() {
    // Values longer than a read asks for, sent by a node whose answers
    // cross many reads: every one is still judged whole and right.
    let node = start_node(node_config("local")).await;
    for io in CLIENTS {
        let mut opts = options(node.local_addr());
        opts.value_size = 40_000;
        opts.keys = 20;
        opts.pipeline = 4;
        opts.requests = Some(400);
        opts.io = io;
        let report = within("bench", run(opts)).await.expect("bench runs");
        assert_eq!(report.ok, 400, "{io:?}");
        assert_eq!(report.errors, 0, "{io:?}: {:?}", report.first_error);
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_ends_with_an_error_when_the_server_goes_away() {
    // A server that answers a few requests on each connection and then
    // closes it: the run ends (it does not wait for answers that cannot
    // come) and says why, having counted only what was answered.
    let addr = fake_server(|line, n| (n < 10).then(|| empty_or_ok(line))).await;
    for io in CLIENTS {
        let mut opts = options(addr);
        opts.prefill = false;
        opts.pipeline = 1;
        opts.requests = None;
        opts.duration = Some(std::time::Duration::from_secs(3_600));
        opts.io = io;
        let report = within("bench", run(opts)).await.expect("bench runs");
        assert_eq!(report.ok, 4 * 10, "{io:?}");
        assert_eq!(report.errors, 0, "{io:?}");
        let first = report.first_error.expect("the failure is shown");
        // The close is seen as such, or, when a request crossed it, as a
        // reset.
        assert!(
            ["closed the connection", "reset by peer", "Broken pipe"]
                .iter()
                .any(|why| first.contains(why)),
            "{io:?}: {first}"
        );
    }
}
