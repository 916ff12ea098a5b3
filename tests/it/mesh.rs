//! Several nodes and real NATS servers: routing, the wire format, and failures
//! (docs/protocol.md, sections 2 and 3).

use std::time::Duration;

use async_nats::HeaderMap;
use futures_util::StreamExt;
use kvmesh::{MeshError, StartError};

use crate::harness::*;
use crate::nats::{NatsCluster, NatsServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_works_on_remote_buckets_from_both_sides() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (foo, bar) = foo_and_bar(&nats.url()).await;
    let mut f = LineClient::connect(foo.local_addr()).await;
    let mut b = LineClient::connect(bar.local_addr()).await;

    // From foo, on bar's bucket, and from bar, on foo's.
    for (c, other, mine) in [(&mut f, "zebra", "apple"), (&mut b, "apple", "zebra")] {
        c.exchange(&format!("GET {other} k"), "NOT FOUND\r\n").await;
        c.exchange(&format!("CREATE {other}"), "OK\r\n").await;
        c.exchange(&format!("CREATE {other}"), "OK\r\n").await;
        c.exchange(&format!("PUT {other} k v1"), "OK\r\n").await;
        c.exchange(&format!("GET {other} k"), "v1\r\nOK\r\n").await;
        c.exchange(&format!("GET {other} missing"), "\r\nOK\r\n")
            .await;
        c.exchange(&format!("DELETE {other} k"), "OK\r\n").await;
        c.exchange(&format!("DELETE {other} k"), "OK\r\n").await;
        c.exchange(&format!("GET {other} k"), "\r\nOK\r\n").await;
        c.exchange(&format!("PUT {other} shared from-{other}"), "OK\r\n")
            .await;
        c.exchange(
            &format!("WHERE {other}"),
            &format!("{}\r\nOK\r\n", if other == "zebra" { "bar" } else { "foo" }),
        )
        .await;
        c.exchange(
            &format!("WHERE {mine}"),
            &format!("{}\r\nOK\r\n", if mine == "zebra" { "bar" } else { "foo" }),
        )
        .await;
        c.exchange("WHERE Zebra", "ERROR no route for bucket Zebra\r\n")
            .await;
        c.exchange("PUT 0day k v", "ERROR no route for bucket 0day\r\n")
            .await;
    }
    // The same data, seen from both nodes.
    for c in [&mut f, &mut b] {
        c.exchange("GET zebra shared", "from-zebra\r\nOK\r\n").await;
        c.exchange("GET apple shared", "from-apple\r\nOK\r\n").await;
    }
    // DROP, remotely, then NOT FOUND from both sides.
    f.exchange("DROP zebra", "OK\r\n").await;
    f.exchange("DROP zebra", "NOT FOUND\r\n").await;
    b.exchange("GET zebra shared", "NOT FOUND\r\n").await;
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_remote_requests_keep_their_order() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (foo, bar) = foo_and_bar(&nats.url()).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    // Create, write and read a remote bucket in one write: each request must
    // land after the one before it.
    c.send("CREATE zebra\r\nPUT zebra k v\r\nGET zebra k\r\nCREATE apple\r\nPUT apple k w\r\nGET apple k\r\nDROP zebra\r\nGET zebra k\r\n").await;
    c.expect("OK\r\nOK\r\nv\r\nOK\r\nOK\r\nOK\r\nw\r\nOK\r\nOK\r\nNOT FOUND\r\n")
        .await;
    // A burst mixing local and remote buckets, answered in order.
    c.exchange("CREATE zebra", "OK\r\n").await;
    let (mut request, mut answer) = (String::new(), String::new());
    for i in 0..2000 {
        let bucket = if i % 3 == 0 { "apple" } else { "zebra" };
        request.push_str(&format!("PUT {bucket} k{i} v{i}\r\nGET {bucket} k{i}\r\n"));
        answer.push_str(&format!("OK\r\nv{i}\r\nOK\r\n"));
    }
    c.send(request).await;
    c.expect(&answer).await;
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_can_take_two_hops_and_where_names_the_last() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let url = nats.url();
    // a sends everything to b, b sends everything to c, c owns everything.
    let a = start_node(mesh_config("a", &[("*", "b")], &url)).await;
    let b = start_node(mesh_config("b", &[("*", "c")], &url)).await;
    let c = start_node(mesh_config("c", &[("*", "c")], &url)).await;
    let mut client = LineClient::connect(a.local_addr()).await;
    client.exchange("WHERE anything", "c\r\nOK\r\n").await;
    client.exchange("CREATE far", "OK\r\n").await;
    client.exchange("PUT far k v", "OK\r\n").await;
    let mut at_c = LineClient::connect(c.local_addr()).await;
    at_c.exchange("GET far k", "v\r\nOK\r\n").await;
    at_c.exchange("GET gone k", "NOT FOUND\r\n").await;
    // A remote NOT FOUND is byte-identical to a local one, two hops away too.
    client.exchange("GET gone k", "NOT FOUND\r\n").await;

    // c goes away: a names c, not b.
    c.shutdown().await;
    client
        .exchange("GET far k", "ERROR node c unavailable\r\n")
        .await;
    client
        .exchange("WHERE far", "ERROR node c unavailable\r\n")
        .await;
    client.exchange("PING", "PONG\r\n").await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_that_point_at_each_other_end_in_a_routing_loop() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let url = nats.url();
    // Each table says the other node owns "x".
    let foo = start_node(mesh_config("foo", &[("a-m", "foo"), ("x", "bar")], &url)).await;
    let bar = start_node(mesh_config("bar", &[("n-w", "bar"), ("x", "foo")], &url)).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange(
        "GET xylophone k",
        "ERROR routing loop for bucket xylophone\r\n",
    )
    .await;
    c.exchange("WHERE x", "ERROR routing loop for bucket x\r\n")
        .await;
    let mut d = LineClient::connect(bar.local_addr()).await;
    d.exchange("CREATE xenon", "ERROR routing loop for bucket xenon\r\n")
        .await;
    // Both nodes are still healthy.
    c.exchange("CREATE apple", "OK\r\n").await;
    d.exchange("CREATE nut", "OK\r\n").await;
    c.exchange("PUT nut k v", "ERROR no route for bucket nut\r\n")
        .await;
    d.exchange("PUT apple k v", "ERROR no route for bucket apple\r\n")
        .await;
    d.exchange("WHERE nut", "bar\r\nOK\r\n").await;
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_nats_requests_without_headers_work_for_every_op() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (foo, bar) = foo_and_bar(&nats.url()).await;
    let client = nats_client(&nats.url()).await;
    let cases: &[(&str, &str, &str)] = &[
        (
            "kv.node.foo",
            r#"{"op":"get","bucket":"shopping","key":"milk"}"#,
            r#"{"ok":false,"error":"not_found","message":"bucket shopping not found"}"#,
        ),
        (
            "kv.node.foo",
            r#"{"op":"create","bucket":"shopping"}"#,
            r#"{"ok":true}"#,
        ),
        (
            "kv.node.foo",
            r#"{"op":"put","bucket":"shopping","key":"milk","value":"1"}"#,
            r#"{"ok":true}"#,
        ),
        (
            "kv.node.foo",
            r#"{"op":"get","bucket":"shopping","key":"milk"}"#,
            r#"{"ok":true,"value":"1"}"#,
        ),
        (
            "kv.node.foo",
            r#"{"op":"get","bucket":"shopping","key":"eggs"}"#,
            r#"{"ok":true,"value":null}"#,
        ),
        // "shopping" is bar's: asked of foo, answered through bar.
        (
            "kv.node.foo",
            r#"{"op":"where","bucket":"shopping"}"#,
            r#"{"ok":true,"node":"bar"}"#,
        ),
        (
            "kv.node.bar",
            r#"{"op":"where","bucket":"shopping"}"#,
            r#"{"ok":true,"node":"bar"}"#,
        ),
        (
            "kv.node.bar",
            r#"{"op":"where","bucket":"apple"}"#,
            r#"{"ok":true,"node":"foo"}"#,
        ),
        (
            "kv.node.foo",
            r#"{"op":"where","bucket":"zebra"}"#,
            r#"{"ok":true,"node":"bar"}"#,
        ),
        (
            "kv.node.foo",
            r#"{"op":"create","bucket":"zebra"}"#,
            r#"{"ok":true}"#,
        ),
        (
            "kv.node.bar",
            r#"{"op":"put","bucket":"zebra","key":"k","value":"v"}"#,
            r#"{"ok":true}"#,
        ),
        (
            "kv.node.foo",
            r#"{"op":"get","bucket":"zebra","key":"k"}"#,
            r#"{"ok":true,"value":"v"}"#,
        ),
        (
            "kv.node.bar",
            r#"{"op":"delete","bucket":"zebra","key":"k"}"#,
            r#"{"ok":true}"#,
        ),
        (
            "kv.node.bar",
            r#"{"op":"get","bucket":"zebra","key":"k"}"#,
            r#"{"ok":true,"value":null}"#,
        ),
        (
            "kv.node.foo",
            r#"{"op":"delete","bucket":"shopping","key":"milk"}"#,
            r#"{"ok":true}"#,
        ),
        (
            "kv.node.foo",
            r#"{"op":"drop","bucket":"shopping"}"#,
            r#"{"ok":true}"#,
        ),
        (
            "kv.node.foo",
            r#"{"op":"drop","bucket":"shopping"}"#,
            r#"{"ok":false,"error":"not_found","message":"bucket shopping not found"}"#,
        ),
        (
            "kv.node.bar",
            r#"{"op":"where","bucket":"Zed"}"#,
            r#"{"ok":false,"error":"no_route","message":"no route for bucket Zed"}"#,
        ),
        (
            "kv.node.foo",
            r#"{"op":"batch","requests":[{"op":"create","bucket":"apple"},{"op":"put","bucket":"apple","key":"a","value":"1"},{"op":"get","bucket":"apple","key":"a"},{"op":"get","bucket":"nope","key":"a"},{"op":"bogus"},{"op":"where","bucket":"zebra"}]}"#,
            r#"{"ok":true,"replies":[{"ok":true},{"ok":true},{"ok":true,"value":"1"},{"ok":false,"error":"not_found","message":"bucket nope not found"},{"ok":false,"error":"bad_request","message":"unknown op \"bogus\""},{"ok":true,"node":"bar"}]}"#,
        ),
    ];
    for (subject, body, want) in cases {
        assert_eq!(
            nats_req(&client, subject, body.as_bytes()).await,
            *want,
            "{subject} {body}"
        );
    }
    // What was written over NATS is what TCP reads.
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("GET apple a", "1\r\nOK\r\n").await;
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_nats_requests_get_bad_request_and_harm_nothing() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let foo = start_node(mesh_config("foo", FOO_BAR, &nats.url())).await;
    let client = nats_client(&nats.url()).await;
    assert_eq!(
        nats_req(
            &client,
            "kv.node.foo",
            br#"{"op":"create","bucket":"apple"}"#
        )
        .await,
        r#"{"ok":true}"#
    );
    let cases: &[(&[u8], &str)] = &[
        (b"", "malformed JSON"),
        (b"{", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"not json", "malformed JSON"),
        (b"[1,2]", "a request must be a JSON object"),
        (b"null", "a request must be a JSON object"),
        (br#"{"bucket":"apple"}"#, "missing field `op`"),
        (br#"{"op":1}"#, "field `op` must be a string"),
        (
            br#"{"op":"explode","bucket":"apple"}"#,
            "unknown op \"explode\"",
        ),
        (br#"{"op":"get","bucket":"apple"}"#, "missing field `key`"),
        (
            br#"{"op":"get","bucket":"apple","key":7}"#,
            "field `key` must be a string",
        ),
        (
            br#"{"op":"put","bucket":"apple","key":"k","value":["v"]}"#,
            "field `value` must be a string",
        ),
        // Strict: a key twice, or a key that is not part of the request.
        (
            br#"{"op":"get","bucket":"apple","key":"k","op":"put","value":"v"}"#,
            "duplicate field `op`",
        ),
        (
            br#"{"op":"get","bucket":"apple","key":"k","expire":"1s"}"#,
            "unknown field `expire`",
        ),
        (
            br#"{"op":"put","bucket":"apple","key":"k","value":"a\r\nOK"}"#,
            "invalid value",
        ),
        (
            br#"{"op":"put","bucket":"apple","key":"k","value":"two words"}"#,
            "invalid value",
        ),
        (
            br#"{"op":"put","bucket":"apple","key":"k\n","value":"v"}"#,
            "invalid key",
        ),
        (
            br#"{"op":"put","bucket":"apple","key":"","value":"v"}"#,
            "invalid key",
        ),
        (br#"{"op":"create","bucket":"a b"}"#, "invalid bucket name"),
        (
            br#"{"op":"batch","requests":"no"}"#,
            "a batch needs a \"requests\" array",
        ),
    ];
    for (body, needle) in cases {
        let reply = nats_req(&client, "kv.node.foo", body).await;
        let json: serde_json::Value = serde_json::from_str(&reply).expect("JSON reply");
        assert_eq!(json["ok"], false, "{reply}");
        assert_eq!(json["error"], "bad_request", "{reply}");
        assert!(
            json["message"]
                .as_str()
                .unwrap_or_default()
                .contains(needle),
            "{needle}: {reply}"
        );
    }
    // A too-long bucket name or key, and a too-large value, as over TCP.
    let long_bucket = format!(r#"{{"op":"create","bucket":"{}"}}"#, "b".repeat(256));
    assert!(
        nats_req(&client, "kv.node.foo", long_bucket.as_bytes())
            .await
            .contains("bucket name too long")
    );
    // Nothing bad was stored; the node carries on over TCP and NATS.
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("GET apple k", "\r\nOK\r\n").await;
    c.exchange("PING", "PONG\r\n").await;
    assert_eq!(
        nats_req(
            &client,
            "kv.node.foo",
            br#"{"op":"where","bucket":"apple"}"#
        )
        .await,
        r#"{"ok":true,"node":"foo"}"#
    );
    foo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hops_header_is_read_in_any_case() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let mut config = mesh_config("foo", FOO_BAR, &nats.url());
    config.max_hops = 3;
    let foo = start_node(config).await;
    let client = nats_client(&nats.url()).await;
    let ask = |name: &'static str, value: &'static str| {
        let client = client.clone();
        async move {
            let mut headers = HeaderMap::new();
            headers.insert(name, value);
            let reply = within(
                "request",
                client.request_with_headers(
                    "kv.node.foo",
                    headers,
                    br#"{"op":"where","bucket":"zebra"}"#.to_vec().into(),
                ),
            )
            .await
            .expect("reply");
            String::from_utf8(reply.payload.to_vec()).expect("utf-8")
        }
    };
    let looped = r#"{"ok":false,"error":"loop","message":"routing loop for bucket zebra"}"#;
    // With three hops made, foo may not forward to bar again.
    assert_eq!(ask("KV-Hops", "3").await, looped);
    assert_eq!(ask("kv-hops", "3").await, looped);
    assert_eq!(ask("KV-HOPS", "9").await, looped);
    // With fewer, foo forwards, and bar (not running) is unavailable.
    let unavailable = r#"{"ok":false,"error":"unavailable","message":"node bar unavailable"}"#;
    assert_eq!(ask("kv-HOPS", "2").await, unavailable);
    // Two headers with different counts: the largest counts.
    let mut headers = HeaderMap::new();
    headers.insert("KV-Hops", "1");
    headers.insert("kv-hops", "3");
    let reply = client
        .request_with_headers(
            "kv.node.foo",
            headers,
            br#"{"op":"where","bucket":"zebra"}"#.to_vec().into(),
        )
        .await
        .expect("reply");
    assert_eq!(std::str::from_utf8(&reply.payload), Ok(looped));
    let bad = ask("KV-Hops", "lots").await;
    assert!(
        bad.contains("bad_request") && bad.contains("KV-Hops"),
        "{bad}"
    );
    // A local bucket is served whatever the count.
    let mut headers = HeaderMap::new();
    headers.insert("Kv-Hops", "100");
    let reply = client
        .request_with_headers(
            "kv.node.foo",
            headers,
            br#"{"op":"where","bucket":"apple"}"#.to_vec().into(),
        )
        .await
        .expect("reply");
    assert_eq!(&reply.payload[..], br#"{"ok":true,"node":"foo"}"#);
    foo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_a_reply_subject_is_not_executed() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let foo = start_node(mesh_config("foo", FOO_BAR, &nats.url())).await;
    let client = nats_client(&nats.url()).await;
    client
        .publish(
            "kv.node.foo",
            br#"{"op":"create","bucket":"ghost"}"#.to_vec().into(),
        )
        .await
        .expect("publish");
    // The next request from the same client arrives after it.
    assert_eq!(
        nats_req(
            &client,
            "kv.node.foo",
            br#"{"op":"get","bucket":"ghost","key":"k"}"#
        )
        .await,
        r#"{"ok":false,"error":"not_found","message":"bucket ghost not found"}"#
    );
    foo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owner_is_unavailable_at_once_and_back_when_restarted() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    // A long timeout: an answer within the test's step proves nobody waited for it.
    let mut config = mesh_config("foo", FOO_BAR, &nats.url());
    config.request_timeout_ms = 60_000;
    let foo = start_node(config).await;
    let bar = start_node(mesh_config("bar", FOO_BAR, &nats.url())).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("CREATE zebra", "OK\r\n").await;
    bar.shutdown().await;
    for line in ["GET zebra k", "CREATE zebra", "WHERE zebra", "DROP zebra"] {
        c.exchange(line, "ERROR node bar unavailable\r\n").await;
    }
    c.exchange("CREATE apple", "OK\r\n").await;
    let bar = start_node(mesh_config("bar", FOO_BAR, &nats.url())).await;
    // A new bar has an empty registry.
    c.exchange("GET zebra k", "NOT FOUND\r\n").await;
    c.exchange("CREATE zebra", "OK\r\n").await;
    c.exchange("PUT zebra k v", "OK\r\n").await;
    c.exchange("GET zebra k", "v\r\nOK\r\n").await;
    foo.shutdown().await;
    bar.shutdown().await;
}

/// A NATS responder on `kv.node.<name>` that never answers.
async fn silent_node(url: &str, name: &str) -> (async_nats::Client, async_nats::Subscriber) {
    let client = nats_client(url).await;
    let sub = client
        .subscribe(format!("kv.node.{name}"))
        .await
        .expect("subscribe");
    nats_round_trip(&client).await;
    (client, sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_owner_times_out_without_blocking_anything_else() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let routes = &[("a-m", "foo"), ("n-r", "slow"), ("s-z", "bar")];
    let mut config = mesh_config("foo", routes, &nats.url());
    // Long enough that the other requests below never time out on a busy machine.
    config.request_timeout_ms = 2000;
    let foo = start_node(config).await;
    let bar = start_node(mesh_config("bar", routes, &nats.url())).await;
    let (_slow_client, _slow_sub) = silent_node(&nats.url(), "slow").await;
    let mut waiting = LineClient::connect(foo.local_addr()).await;
    waiting.send("GET nut k\r\nPING\r\n").await;
    // Meanwhile, other connections are served: local and other remote buckets.
    let mut other = LineClient::connect(foo.local_addr()).await;
    other.exchange("CREATE apple", "OK\r\n").await;
    other.exchange("CREATE zebra", "OK\r\n").await;
    other.exchange("WHERE zebra", "bar\r\nOK\r\n").await;
    // The waiting connection gets its timeout, then the answer queued behind it.
    waiting
        .expect("ERROR node slow timed out\r\nPONG\r\n")
        .await;
    waiting.exchange("WHERE apple", "foo\r\nOK\r\n").await;
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_the_requests_in_flight() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let foo = start_node(mesh_config("foo", FOO_BAR, &nats.url())).await;
    // bar answers, but only after 300 ms.
    let (bar_client, mut requests) = silent_node(&nats.url(), "bar").await;
    let responder = tokio::spawn(async move {
        if let Some(msg) = requests.next().await {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let reply = msg.reply.expect("reply subject");
            bar_client
                .publish(reply, br#"{"ok":true,"value":"late"}"#.to_vec().into())
                .await
                .expect("reply");
            bar_client.flush().await.expect("flush");
        }
    });
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.send("GET zebra k\r\n").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    within("shutdown", foo.shutdown()).await;
    c.expect("late\r\nOK\r\n").await;
    c.expect_eof().await;
    responder.await.expect("responder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_is_survived_without_restarting_nodes() {
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    let (foo, bar) = foo_and_bar(&nats.url()).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("CREATE apple", "OK\r\n").await;
    c.exchange("CREATE zebra", "OK\r\n").await;
    c.exchange("PUT zebra k before", "OK\r\n").await;

    nats.kill();
    // Local buckets are served throughout; remote ones fail clearly.
    c.eventually("GET zebra k", "ERROR mesh unavailable\r\n")
        .await;
    c.exchange("PUT apple k during", "OK\r\n").await;
    c.exchange("GET apple k", "during\r\nOK\r\n").await;

    nats.restart();
    c.eventually("GET zebra k", "before\r\nOK\r\n").await;
    let mut b = LineClient::connect(bar.local_addr()).await;
    b.eventually("GET apple k", "during\r\nOK\r\n").await;
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_when_nats_dies_fails_at_once() {
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    // A long timeout: an answer within the test's step proves nobody waited for it.
    let mut config = mesh_config("foo", FOO_BAR, &nats.url());
    config.request_timeout_ms = 60_000;
    let foo = start_node(config).await;
    let (_bar_client, mut requests) = silent_node(&nats.url(), "bar").await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    let mut w = LineClient::connect(foo.local_addr()).await;
    c.send("GET zebra k\r\nPING\r\n").await;
    within("request reaches bar", requests.next())
        .await
        .expect("a request");
    w.send("PUT zebra k v\r\n").await;
    within("request reaches bar", requests.next())
        .await
        .expect("a request");
    nats.kill();
    // A read changed nothing; a write that reached the owner may have been
    // stored, and says that its outcome is unknown rather than that it failed.
    c.expect("ERROR mesh unavailable\r\nPONG\r\n").await;
    w.expect("ERROR node bar outcome unknown\r\n").await;
    c.exchange("WHERE apple", "foo\r\nOK\r\n").await;
    foo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_nats_joins_when_it_comes_up() {
    let Some(_) = crate::nats::nats_server_bin() else {
        return;
    };
    // A port with nothing behind it (yet).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let foo = start_node(mesh_config("foo", FOO_BAR, &url)).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("CREATE apple", "OK\r\n").await;
    c.exchange("GET zebra k", "ERROR mesh unavailable\r\n")
        .await;
    let Some(_nats) = NatsServer::start_on(port) else {
        return;
    };
    let bar = start_node(mesh_config("bar", FOO_BAR, &url)).await;
    c.eventually("WHERE zebra", "bar\r\nOK\r\n").await;
    // And bar reaches foo, which subscribed once connected.
    let mut b = LineClient::connect(bar.local_addr()).await;
    b.eventually("WHERE apple", "foo\r\nOK\r\n").await;
    b.exchange("PUT apple k v", "OK\r\n").await;
    c.exchange("GET apple k", "v\r\nOK\r\n").await;
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_survives_losing_the_cluster_server_a_node_is_on() {
    let Some(mut cluster) = NatsCluster::start() else {
        return;
    };
    let urls = cluster.urls();
    // A request sent while the cluster still routes bar's subject to the
    // dead server gets no answer until the request timeout: keep that well
    // under the client's patience, so that such a request fails and is
    // asked again rather than outliving the test's wait for one answer.
    let config = |name| {
        let mut config = mesh_config(name, FOO_BAR, &urls);
        config.request_timeout_ms = 2000;
        config
    };
    let foo = start_node(config("foo")).await;
    let bar = start_node(config("bar")).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.eventually("CREATE zebra", "OK\r\n").await;
    c.exchange("PUT zebra k v", "OK\r\n").await;
    let mut b = LineClient::connect(bar.local_addr()).await;
    b.eventually("CREATE apple", "OK\r\n").await;
    // Kill whichever server bar is connected to (the client shuffles its list).
    let on = cluster
        .servers
        .iter()
        .position(|s| s.client_names().iter().any(|n| n == "kvmesh-bar"))
        .expect("bar is connected somewhere");
    cluster.servers[on].kill();
    c.eventually("GET zebra k", "v\r\nOK\r\n").await;
    b.eventually("WHERE apple", "foo\r\nOK\r\n").await;
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_with_the_same_name_refuses_to_start() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let foo = start_node(mesh_config("foo", FOO_BAR, &nats.url())).await;
    let second = within(
        "start",
        kvmesh::Node::start(
            mesh_config("foo", FOO_BAR, &nats.url())
                .check()
                .expect("valid"),
        ),
    )
    .await;
    match second {
        Err(StartError::Mesh(MeshError::DuplicateName(name))) => assert_eq!(name, "foo"),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a second foo started"),
    }
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("WHERE apple", "foo\r\nOK\r\n").await;
    foo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_that_cannot_travel_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("small.conf");
    std::fs::write(&conf, "max_payload: 4096\n").expect("write");
    let Some(nats) = NatsServer::start_with(&["-c", conf.to_str().expect("path")]) else {
        return;
    };
    let (foo, bar) = foo_and_bar(&nats.url()).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("CREATE zebra", "OK\r\n").await;
    c.exchange(
        &format!("PUT zebra k {}", "v".repeat(5000)),
        "ERROR value too large\r\n",
    )
    .await;
    c.exchange(&format!("PUT zebra k {}", "v".repeat(3000)), "OK\r\n")
        .await;
    c.exchange("GET zebra k", &format!("{}\r\nOK\r\n", "v".repeat(3000)))
        .await;
    // A local bucket is not limited by NATS.
    c.exchange("CREATE apple", "OK\r\n").await;
    c.exchange(&format!("PUT apple k {}", "v".repeat(5000)), "OK\r\n")
        .await;
    // But that value cannot be read from another node: a clear error, no hang.
    let mut b = LineClient::connect(bar.local_addr()).await;
    b.exchange("GET apple k", "ERROR reply too large for NATS\r\n")
        .await;
    foo.shutdown().await;
    bar.shutdown().await;
}

/// Sends `subject` to every responder and gathers the replies for a moment.
async fn gather(client: &async_nats::Client, subject: &str) -> Vec<serde_json::Value> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish_with_reply(subject.to_string(), inbox, "".into())
        .await
        .expect("publish");
    let mut replies = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        replies.push(serde_json::from_slice(&msg.payload).expect("json"));
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_api_lists_every_node_with_its_counts() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (foo, bar) = foo_and_bar(&nats.url()).await;
    let client = nats_client(&nats.url()).await;
    for _ in 0..3 {
        nats_req(
            &client,
            "kv.node.foo",
            br#"{"op":"where","bucket":"apple"}"#,
        )
        .await;
    }
    nats_req(
        &client,
        "kv.node.bar",
        br#"{"op":"where","bucket":"zebra"}"#,
    )
    .await;

    let nodes = |replies: &[serde_json::Value]| {
        let mut n: Vec<String> = replies
            .iter()
            .map(|r| {
                r["metadata"]["node"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        n.sort();
        n
    };
    let pings = gather(&client, "$SRV.PING.kvmesh").await;
    assert_eq!(nodes(&pings), ["bar", "foo"]);
    for p in &pings {
        assert_eq!(p["name"], "kvmesh");
        assert_eq!(p["type"], "io.nats.micro.v1.ping_response");
    }
    let infos = gather(&client, "$SRV.INFO.kvmesh").await;
    assert_eq!(nodes(&infos), ["bar", "foo"]);
    for info in &infos {
        let node = info["metadata"]["node"].as_str().expect("node");
        assert_eq!(
            info["endpoints"][0]["subject"],
            format!("kv.node.{node}"),
            "{info}"
        );
        assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    }
    // STATS replies carry the instance id, not the metadata: match them up.
    let node_of = |id: &serde_json::Value| {
        infos
            .iter()
            .find(|i| i["id"] == *id)
            .map(|i| i["metadata"]["node"].clone())
    };
    let stats = gather(&client, "$SRV.STATS.kvmesh").await;
    assert_eq!(stats.len(), 2);
    for s in &stats {
        let want = if node_of(&s["id"]) == Some("foo".into()) {
            3
        } else {
            1
        };
        assert_eq!(s["endpoints"][0]["num_requests"], want, "{s}");
    }
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owner_process_is_unavailable_at_once() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let mut config = mesh_config("foo", FOO_BAR, &nats.url());
    config.request_timeout_ms = 60_000;
    let foo = start_node(config).await;
    let routes = r#"[{range="a-m",node="foo"},{range="n-z",node="bar"}]"#;
    let spawn_bar = || {
        let mut cmd = clean_command();
        cmd.env("KVMESH_ROUTES", routes);
        spawn_kvmesh_with(cmd, &["--node", "bar", "--nats-url", &nats.url()])
    };
    let mut bar = spawn_bar();
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("CREATE zebra", "OK\r\n").await;
    bar.kill();
    // Once NATS has seen the connection close (at once, unless the machine is
    // very busy), nobody serves kv.node.bar.
    let deadline = std::time::Instant::now() + STEP;
    while nats.client_names().iter().any(|n| n == "kvmesh-bar") {
        assert!(std::time::Instant::now() < deadline, "NATS still lists bar");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // With a 60 s timeout configured, an answer within the test's step shows
    // that nobody waited for it.
    c.exchange("GET zebra k", "ERROR node bar unavailable\r\n")
        .await;
    let _bar = spawn_bar();
    c.exchange("CREATE zebra", "OK\r\n").await;
    c.exchange("PUT zebra k back", "OK\r\n").await;
    c.exchange("GET zebra k", "back\r\nOK\r\n").await;
    foo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_forwarding_to_one_owner_each_get_their_own_answers() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (foo, bar) = foo_and_bar(&nats.url()).await;
    let addr = foo.local_addr();
    let mut setup = LineClient::connect(addr).await;
    setup.exchange("CREATE zebra", "OK\r\n").await;
    let clients: Vec<_> = (0..30)
        .map(|id| {
            tokio::spawn(async move {
                let mut c = LineClient::connect(addr).await;
                for i in 0..50 {
                    // Pipelined pairs and single requests, mixed.
                    if i % 2 == 0 {
                        c.send(format!(
                            "PUT zebra c{id}-{i} v{id}-{i}\r\nGET zebra c{id}-{i}\r\n"
                        ))
                        .await;
                        c.expect(&format!("OK\r\nv{id}-{i}\r\nOK\r\n")).await;
                    } else {
                        c.exchange(&format!("PUT zebra c{id}-{i} w{id}"), "OK\r\n")
                            .await;
                        c.exchange(&format!("GET zebra c{id}-{i}"), &format!("w{id}\r\nOK\r\n"))
                            .await;
                    }
                }
            })
        })
        .collect();
    for c in clients {
        within("client", c).await.expect("client task");
    }
    let mut b = LineClient::connect(bar.local_addr()).await;
    b.exchange("GET zebra c29-48", "v29-48\r\nOK\r\n").await;
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_remote_requests_travel_in_batches() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (foo, bar) = foo_and_bar(&nats.url()).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("CREATE zebra", "OK\r\n").await;
    let (mut request, mut answer) = (String::new(), String::new());
    for i in 0..40 {
        request.push_str(&format!("PUT zebra k{i} v{i}\r\n"));
        answer.push_str("OK\r\n");
    }
    c.send(request).await;
    c.expect(&answer).await;
    // bar counts NATS requests: far fewer than the 41 commands it ran.
    let client = nats_client(&nats.url()).await;
    let stats = gather(&client, "$SRV.STATS.kvmesh").await;
    let infos = gather(&client, "$SRV.INFO.kvmesh").await;
    let bar_id = infos
        .iter()
        .find(|i| i["metadata"]["node"] == "bar")
        .map(|i| i["id"].clone())
        .expect("bar's id");
    let requests = stats
        .iter()
        .find(|s| s["id"] == bar_id)
        .and_then(|s| s["endpoints"][0]["num_requests"].as_u64())
        .expect("bar's count");
    assert!(requests < 20, "{requests} NATS requests for 41 commands");
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_allowed_value_travels_to_its_owner_and_back() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (foo, bar) = foo_and_bar(&nats.url()).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("CREATE zebra", "OK\r\n").await;
    // max_value_bytes is 512 KiB by default; the server's max_payload 1 MiB.
    let big = "v".repeat(512 * 1024);
    c.exchange(&format!("PUT zebra big {big}"), "OK\r\n").await;
    c.exchange(
        &format!("PUT zebra bigger {big}x"),
        "ERROR value too large\r\n",
    )
    .await;
    c.exchange("GET zebra big", &format!("{big}\r\nOK\r\n"))
        .await;
    // Pipelined with other requests, as one batch.
    c.send(
        "GET zebra big
PUT zebra small s
GET zebra small
",
    )
    .await;
    c.expect(&format!("{big}\r\nOK\r\nOK\r\ns\r\nOK\r\n")).await;
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_warns_at_start_when_its_largest_value_cannot_travel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("small.conf");
    std::fs::write(&conf, "max_payload: 65536\n").expect("write");
    let Some(nats) = NatsServer::start_with(&["-c", conf.to_str().expect("path")]) else {
        return;
    };
    let mut cmd = clean_command();
    cmd.env(
        "KVMESH_ROUTES",
        r#"[{range="a-m",node="foo"},{range="n-z",node="bar"}]"#,
    );
    let mut p = spawn_kvmesh_with(cmd, &["--node", "foo", "--nats-url", &nats.url()]);
    let warning = p.wait_for_log("do not fit one NATS message", 1);
    assert!(warning[0].contains("max_payload=65536"), "{warning:?}");
    assert_eq!(p.stop_with("-TERM"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passive_subscriber_does_not_block_a_start() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    // What the README suggests for watching the mesh: `nats sub 'kv.>'`.
    let watcher = nats_client(&nats.url()).await;
    let _sub = watcher.subscribe("kv.>").await.expect("subscribe");
    let _queue = watcher
        .queue_subscribe("kv.node.bar", "watchers".into())
        .await
        .expect("subscribe");
    nats_round_trip(&watcher).await;
    let (foo, bar) = foo_and_bar(&nats.url()).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("WHERE zebra", "bar\r\nOK\r\n").await;
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_that_started_while_nats_was_down_stops_serving() {
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    let url = nats.url();
    let (foo, bar) = foo_and_bar(&url).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("CREATE zebra", "OK\r\n").await;
    c.exchange("PUT zebra k v", "OK\r\n").await;
    nats.kill();
    // A second bar starts while NATS is down: nothing can refuse it yet.
    let second = start_node(mesh_config("bar", FOO_BAR, &url)).await;
    nats.restart();
    // Once both are back, the one that started later stops serving.
    within("the second bar stops serving", second.deposed()).await;
    // And every request reaches the first bar, which holds the data.
    for _ in 0..50 {
        c.eventually("GET zebra k", "v\r\nOK\r\n").await;
    }
    second.shutdown().await;
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_owner_leaves_no_forwarded_request_waiting() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    // The request timeout (15 s) is longer than a test step (10 s): a request
    // left waiting for it fails the test.
    let (foo, bar) = foo_and_bar(&nats.url()).await;
    let mut setup = LineClient::connect(foo.local_addr()).await;
    setup.exchange("CREATE zebra", "OK\r\n").await;
    // Sixteen clients pipeline WHEREs and PUTs through foo while bar stops.
    const CLIENTS: usize = 16;
    let mut clients = Vec::new();
    for id in 0..CLIENTS {
        let mut c = LineClient::connect(foo.local_addr()).await;
        clients.push(tokio::spawn(async move {
            let (mut answered, mut refused) = (0, 0);
            for round in 0..60 {
                let mut batch = String::new();
                for i in 0..50 {
                    batch.push_str(&format!("WHERE zebra\r\nPUT zebra c{id}k{i} r{round}\r\n"));
                }
                c.send(batch).await;
                for _ in 0..50 {
                    for want in ["bar\r\nOK\r\n", "OK\r\n"] {
                        match c.read_answer().await {
                            a if a == want => answered += 1,
                            a if a == "ERROR node bar unavailable\r\n" => refused += 1,
                            other => panic!("client {id}: {other:?}"),
                        }
                    }
                }
            }
            (answered, refused)
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    bar.shutdown().await;
    let (mut answered, mut refused) = (0, 0);
    for c in clients {
        let (a, r) = within("every request is answered at once", c)
            .await
            .expect("client");
        answered += a;
        refused += r;
    }
    assert_eq!(answered + refused, CLIENTS * 60 * 100);
    assert!(
        answered > 0 && refused > 0,
        "{answered} answered, {refused} refused"
    );
    foo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_comes_after_its_sender_gave_up_is_not_run() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let foo = start_node(mesh_config("foo", FOO_BAR, &nats.url())).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("CREATE apple", "OK\r\n").await;
    c.exchange("PUT apple k old", "OK\r\n").await;
    let client = nats_client(&nats.url()).await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_millis() as u64;
    let put = |name: &'static str, deadline: u64, value: &'static str| {
        let client = client.clone();
        async move {
            let mut headers = HeaderMap::new();
            headers.insert("KV-Hops", "1");
            headers.insert(name, deadline.to_string().as_str());
            let body = format!(r#"{{"op":"put","bucket":"apple","key":"k","value":"{value}"}}"#);
            let reply = within(
                "request",
                client.request_with_headers("kv.node.foo", headers, body.into()),
            )
            .await
            .expect("reply");
            String::from_utf8(reply.payload.to_vec()).expect("utf-8")
        }
    };
    // A write whose sender stopped waiting a moment ago (its client was told
    // it timed out) is not run, in whatever case the header is written.
    let late = r#"{"ok":false,"error":"timeout","message":"node foo timed out"}"#;
    assert_eq!(put("KV-Deadline", now_ms - 1, "late").await, late);
    assert_eq!(put("kv-deadline", now_ms - 1000, "later").await, late);
    c.exchange("GET apple k", "old\r\nOK\r\n").await;
    // In time, it runs.
    assert_eq!(
        put("KV-Deadline", now_ms + 60_000, "new").await,
        r#"{"ok":true}"#
    );
    c.exchange("GET apple k", "new\r\nOK\r\n").await;
    // A deadline that is not a number is refused, and nothing runs.
    let mut headers = HeaderMap::new();
    headers.insert("KV-Deadline", "soon");
    let reply = client
        .request_with_headers(
            "kv.node.foo",
            headers,
            br#"{"op":"put","bucket":"apple","key":"k","value":"bad"}"#
                .to_vec()
                .into(),
        )
        .await
        .expect("reply");
    let bad = String::from_utf8(reply.payload.to_vec()).expect("utf-8");
    assert!(
        bad.contains("bad_request") && bad.contains("KV-Deadline"),
        "{bad}"
    );
    c.exchange("GET apple k", "new\r\nOK\r\n").await;
    foo.shutdown().await;
}
