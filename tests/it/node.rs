//! One node over a real TCP socket: the text protocol of docs/protocol.md section 1, byte
//! for byte, with its limits.

use kvmesh::Config;

use crate::harness::*;

#[tokio::test]
async fn the_spec_example_session_is_answered_byte_for_byte() {
    let node = start_node(node_config("local")).await;
    let mut c = LineClient::connect(node.local_addr()).await;
    c.exchange("CREATE shopping", "OK\r\n").await;
    c.exchange("PUT shopping milk 1", "OK\r\n").await;
    c.exchange("GET shopping milk", "1\r\nOK\r\n").await;
    c.exchange("GET shopping eggs", "\r\nOK\r\n").await;
    c.exchange("DELETE shopping milk", "OK\r\n").await;
    c.exchange("GET nothing milk", "NOT FOUND\r\n").await;
    c.exchange("get shopping milk", "UNKNOWN COMMAND\r\n").await;
    c.exchange("GET shopping milk", "\r\nOK\r\n").await;
    c.exchange("WHERE shopping", "local\r\nOK\r\n").await;
    c.exchange("PING", "PONG\r\n").await;
    c.exchange("QUIT", "BYE\r\n").await;
    c.expect_eof().await;
    node.shutdown().await;
}

#[tokio::test]
async fn buckets_live_from_create_to_drop() {
    let node = start_node(node_config("local")).await;
    let mut c = LineClient::connect(node.local_addr()).await;
    c.exchange("CREATE b", "OK\r\n").await;
    c.exchange("PUT b k v1", "OK\r\n").await;
    c.exchange("CREATE b", "OK\r\n").await;
    c.exchange("GET b k", "v1\r\nOK\r\n").await;
    c.exchange("PUT b k v2", "OK\r\n").await;
    c.exchange("GET b k", "v2\r\nOK\r\n").await;
    c.exchange("DELETE b missing", "OK\r\n").await;
    c.exchange("DROP b", "OK\r\n").await;
    c.exchange("GET b k", "NOT FOUND\r\n").await;
    c.exchange("CREATE b", "OK\r\n").await;
    c.exchange("GET b k", "\r\nOK\r\n").await;
    // UTF-8 names and values travel unchanged.
    c.exchange("CREATE \u{e9}t\u{e9}", "OK\r\n").await;
    c.exchange("PUT \u{e9}t\u{e9} cl\u{e9} \u{2603}", "OK\r\n")
        .await;
    c.exchange("GET \u{e9}t\u{e9} cl\u{e9}", "\u{2603}\r\nOK\r\n")
        .await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_missing_bucket_is_not_found_for_every_command() {
    let node = start_node(node_config("local")).await;
    let mut c = LineClient::connect(node.local_addr()).await;
    for line in ["PUT nope k v", "GET nope k", "DELETE nope k", "DROP nope"] {
        c.exchange(line, "NOT FOUND\r\n").await;
    }
    c.exchange("PING", "PONG\r\n").await;
    node.shutdown().await;
}

#[tokio::test]
async fn malformed_lines_get_unknown_command_and_the_connection_stays_open() {
    let node = start_node(node_config("local")).await;
    let mut c = LineClient::connect(node.local_addr()).await;
    c.exchange("CREATE b", "OK\r\n").await;
    for line in [
        "",
        "   ",
        "get b k",
        "Put b k v",
        "FLUSHALL",
        "CREATE",
        "CREATE a b",
        "PUT b k",
        "PUT b k v w",
        "GET b",
        "GET b k x",
        "DELETE b",
        "DROP",
        "WHERE",
        "PING now",
        "QUIT now",
    ] {
        c.exchange(line, "UNKNOWN COMMAND\r\n").await;
    }
    c.exchange("PING", "PONG\r\n").await;
    node.shutdown().await;
}

#[tokio::test]
async fn line_endings_and_whitespace_are_forgiving() {
    let node = start_node(node_config("local")).await;
    let mut c = LineClient::connect(node.local_addr()).await;
    c.send("CREATE b\n").await;
    c.expect("OK\r\n").await;
    c.send("  PUT \t b   k\t\tv  \r\n").await;
    c.expect("OK\r\n").await;
    c.send("GET b k\n").await;
    c.expect("v\r\nOK\r\n").await;
    // A line split across writes is one line.
    c.send("GE").await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    c.send("T b k\r").await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    c.send("\n").await;
    c.expect("v\r\nOK\r\n").await;
    node.shutdown().await;
}

#[tokio::test]
async fn name_and_value_limits_are_enforced() {
    let mut config = node_config("local");
    config.max_value_bytes = 10;
    let node = start_node(config).await;
    let mut c = LineClient::connect(node.local_addr()).await;
    c.exchange("CREATE b", "OK\r\n").await;
    c.exchange("PUT b k 0123456789", "OK\r\n").await;
    c.exchange("PUT b k 0123456789x", "ERROR value too large\r\n")
        .await;
    c.exchange("GET b k", "0123456789\r\nOK\r\n").await;
    let key = "k".repeat(1025);
    c.exchange(&format!("GET b {key}"), "ERROR key too long\r\n")
        .await;
    c.exchange(&format!("GET b {}", &key[1..]), "\r\nOK\r\n")
        .await;
    let bucket = "b".repeat(256);
    c.exchange(
        &format!("CREATE {bucket}"),
        "ERROR bucket name too long\r\n",
    )
    .await;
    c.exchange(&format!("CREATE {}", &bucket[1..]), "OK\r\n")
        .await;
    node.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_is_reported_and_the_connection_stays_open() {
    let node = start_node(node_config("local")).await;
    let mut c = LineClient::connect(node.local_addr()).await;
    c.send(b"CREATE \xff\xfe\r\n").await;
    c.expect("ERROR invalid utf-8\r\n").await;
    c.send(b"\x00\x01\x02\r\n").await;
    c.expect("UNKNOWN COMMAND\r\n").await;
    c.exchange("PING", "PONG\r\n").await;
    node.shutdown().await;
}

#[tokio::test]
async fn an_over_long_line_is_refused_and_the_next_command_works() {
    let mut config = node_config("local");
    config.max_line_bytes = 1024;
    let node = start_node(config).await;
    let mut c = LineClient::connect(node.local_addr()).await;
    // Exactly at the limit is fine (the value is too large, but the line is read).
    let at_limit = format!("PUT b k {}", "v".repeat(1024 - 8));
    assert_eq!(at_limit.len(), 1024);
    c.exchange(&at_limit, "NOT FOUND\r\n").await;
    let over = format!("PUT b k {}", "v".repeat(1024 - 7));
    c.exchange(&over, "ERROR line too long\r\n").await;
    c.exchange("PING", "PONG\r\n").await;
    // Pipelined: the long line's answer sits in order between its neighbours.
    c.send(format!("PING\r\n{}\r\nPING\r\n", "x".repeat(5000)))
        .await;
    c.expect("PONG\r\nERROR line too long\r\nPONG\r\n").await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_100_mib_line_without_newline_is_discarded_as_it_streams() {
    let node = start_node(node_config("local")).await;
    let mut c = LineClient::connect(node.local_addr()).await;
    // 100 MiB with no newline, against the default 1 MiB limit: the answer comes
    // while the line is still arriving, and the node keeps nothing of it.
    let chunk = vec![b'x'; 1024 * 1024];
    c.send(&chunk).await;
    c.send(&chunk).await;
    c.expect("ERROR line too long\r\n").await;
    for _ in 0..98 {
        c.send(&chunk).await;
    }
    c.send("\r\nPING\r\n").await;
    c.expect("PONG\r\n").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_pipelined_lines_are_answered_in_order() {
    let node = start_node(node_config("local")).await;
    let mut c = LineClient::connect(node.local_addr()).await;
    c.exchange("CREATE burst", "OK\r\n").await;
    let mut request = String::new();
    let mut answer = String::new();
    for i in 0..10_000 {
        match i % 4 {
            0 => {
                request.push_str(&format!("PUT burst k{i} v{i}\r\n"));
                answer.push_str("OK\r\n");
            }
            1 => {
                request.push_str(&format!("GET burst k{}\r\n", i - 1));
                answer.push_str(&format!("v{}\r\nOK\r\n", i - 1));
            }
            2 => {
                request.push_str(&format!("GET burst none{i}\n"));
                answer.push_str("\r\nOK\r\n");
            }
            _ => {
                request.push_str("bad\r\n");
                answer.push_str("UNKNOWN COMMAND\r\n");
            }
        }
    }
    // One write of all 10,000 lines (about 190 KB), then every answer in order.
    c.send(request.as_bytes()).await;
    c.expect(&answer).await;
    c.exchange("PING", "PONG\r\n").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_clients_lose_nothing_in_one_bucket() {
    let node = start_node(node_config("local")).await;
    let addr = node.local_addr();
    let mut setup = LineClient::connect(addr).await;
    setup.exchange("CREATE shared", "OK\r\n").await;
    let clients: Vec<_> = (0..50)
        .map(|id| {
            tokio::spawn(async move {
                let mut c = LineClient::connect(addr).await;
                for i in 0..200 {
                    c.exchange(&format!("PUT shared c{id}-k{i} {id}:{i}"), "OK\r\n")
                        .await;
                    c.exchange(
                        &format!("GET shared c{id}-k{i}"),
                        &format!("{id}:{i}\r\nOK\r\n"),
                    )
                    .await;
                }
                // Overwrite half, delete a quarter, then check every key.
                for i in (0..200).step_by(2) {
                    c.exchange(&format!("PUT shared c{id}-k{i} new{id}"), "OK\r\n")
                        .await;
                }
                for i in (0..200).step_by(4) {
                    c.exchange(&format!("DELETE shared c{id}-k{i}"), "OK\r\n")
                        .await;
                }
                for i in 0..200 {
                    let want = if i % 4 == 0 {
                        String::new()
                    } else if i % 2 == 0 {
                        format!("new{id}")
                    } else {
                        format!("{id}:{i}")
                    };
                    c.exchange(
                        &format!("GET shared c{id}-k{i}"),
                        &format!("{want}\r\nOK\r\n"),
                    )
                    .await;
                }
            })
        })
        .collect();
    for client in clients {
        within("client", client).await.expect("client task");
    }
    // Seen from a fresh connection, every client's last writes are there.
    for id in [0, 17, 49] {
        setup
            .exchange(
                &format!("GET shared c{id}-k1"),
                &format!("{id}:1\r\nOK\r\n"),
            )
            .await;
        setup
            .exchange(
                &format!("GET shared c{id}-k2"),
                &format!("new{id}\r\nOK\r\n"),
            )
            .await;
        setup
            .exchange(&format!("GET shared c{id}-k4"), "\r\nOK\r\n")
            .await;
    }
    node.shutdown().await;
}

#[tokio::test]
async fn connections_over_the_limit_are_told_and_closed() {
    let mut config = node_config("local");
    config.max_connections = 2;
    let node = start_node(config).await;
    let addr = node.local_addr();
    let mut a = LineClient::connect(addr).await;
    let mut b = LineClient::connect(addr).await;
    a.exchange("PING", "PONG\r\n").await;
    b.exchange("PING", "PONG\r\n").await;
    let mut refused = LineClient::connect(addr).await;
    refused.expect("ERROR too many connections\r\n").await;
    refused.expect_eof().await;
    // The served connections are unaffected.
    a.exchange("CREATE x", "OK\r\n").await;
    b.exchange("PUT x k v", "OK\r\n").await;
    // Closing one frees its place.
    a.exchange("QUIT", "BYE\r\n").await;
    a.expect_eof().await;
    let mut next = None;
    for _ in 0..100 {
        let mut c = LineClient::connect(addr).await;
        c.send("PING\r\n").await;
        let first = c.read_bytes(4).await;
        if first == b"PONG" {
            c.expect("\r\n").await;
            next = Some(c);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let mut next = next.expect("a place frees up after a client quits");
    next.exchange("GET x k", "v\r\nOK\r\n").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_a_thousand_connects_is_accepted() {
    // The test process holds both ends of every connection.
    let _ = rlimit::increase_nofile_limit(4096);
    let node = start_node(node_config("local")).await;
    let addr = node.local_addr();
    let mut clients = Vec::with_capacity(1000);
    for _ in 0..1000 {
        clients.push(LineClient::connect(addr).await);
    }
    for c in &mut clients {
        c.send("PING\r\n").await;
    }
    for c in &mut clients {
        c.expect("PONG\r\n").await;
    }
    node.shutdown().await;
}

#[tokio::test]
async fn quit_says_bye_and_closes_after_earlier_answers() {
    let node = start_node(node_config("local")).await;
    let mut c = LineClient::connect(node.local_addr()).await;
    c.send("PING\r\nCREATE q\r\nQUIT\r\nPING\r\n").await;
    c.expect("PONG\r\nOK\r\nBYE\r\n").await;
    c.expect_eof().await;
    node.shutdown().await;
}

#[tokio::test]
async fn an_unterminated_last_line_is_answered_at_end_of_input() {
    let node = start_node(node_config("local")).await;
    let mut c = LineClient::connect(node.local_addr()).await;
    c.send("PING\r\nPING").await;
    c.finish_sending().await;
    c.expect("PONG\r\nPONG\r\n").await;
    c.expect_eof().await;
    node.shutdown().await;
}

#[tokio::test]
async fn where_and_no_route_follow_the_table() {
    let mut config: Config = node_config("foo");
    config.routes = Some(vec![
        kvmesh::config::RouteConfig {
            range: "a-m".into(),
            node: "foo".into(),
        },
        kvmesh::config::RouteConfig {
            range: "0-9".into(),
            node: "foo".into(),
        },
    ]);
    let node = start_node(config).await;
    let mut c = LineClient::connect(node.local_addr()).await;
    c.exchange("WHERE apple", "foo\r\nOK\r\n").await;
    c.exchange("WHERE 7up", "foo\r\nOK\r\n").await;
    c.exchange("WHERE zebra", "ERROR no route for bucket zebra\r\n")
        .await;
    c.exchange("CREATE Apple", "ERROR no route for bucket Apple\r\n")
        .await;
    c.exchange(
        "GET \u{e9}t\u{e9} k",
        "ERROR no route for bucket \u{e9}t\u{e9}\r\n",
    )
    .await;
    c.exchange("PING", "PONG\r\n").await;
    node.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_connections_and_stops_listening() {
    let node = start_node(node_config("local")).await;
    let addr = node.local_addr();
    let mut c = LineClient::connect(addr).await;
    c.exchange("CREATE s", "OK\r\n").await;
    within("shutdown", node.shutdown()).await;
    // After shutdown the connection is closed and nothing listens.
    c.expect_eof().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
