//! `kvmesh bench` against a real node, and against a node that lies.

use kvmesh::bench::{BenchOptions, Target, run};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::harness::*;

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
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_add_up_against_a_real_node() {
    let node = start_node(node_config("local")).await;
    let report = within("bench", run(options(node.local_addr())))
        .await
        .expect("bench runs");
    assert_eq!(report.ok, 2_000);
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    assert!(report.p50_us <= report.p99_us && report.p99_us <= report.max_us);
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
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let used = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = used.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let used = counted.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                let mut seen = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    let get = line.starts_with("GET");
                    if !seen && (get || line.starts_with("PUT")) {
                        seen = true;
                        used.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    let answer: &[u8] = if get { b"\r\nOK\r\n" } else { b"OK\r\n" };
                    if w.write_all(answer).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut opts = options(addr);
    opts.conns = 101;
    opts.pipeline = 1;
    opts.prefill = false;
    opts.requests = None;
    opts.duration = Some(std::time::Duration::from_secs(1));
    let report = within("bench", run(opts)).await.expect("bench runs");
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    assert!(report.ok > 101, "{} requests", report.ok);
    assert_eq!(used.load(std::sync::atomic::Ordering::Relaxed), 101);
}

#[tokio::test]
async fn bench_counts_wrong_answers_as_errors() {
    // A server that accepts everything but answers every GET with a wrong value.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let answer: &[u8] = if line.starts_with("GET") {
                        b"wrong\r\nOK\r\n"
                    } else {
                        b"OK\r\n"
                    };
                    if w.write_all(answer).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut opts = options(addr);
    opts.get_percent = 100;
    opts.requests = Some(500);
    let report = within("bench", run(opts)).await.expect("bench runs");
    assert_eq!(report.ok + report.errors, 500);
    assert_eq!(report.errors, 500);
    let first = report.first_error.expect("an error is shown");
    assert!(first.contains("\"wrong\""), "{first}");
}
