//! Batching is invisible: requests that travel together in one NATS message
//! are answered exactly as if each had travelled alone, whatever their
//! neighbours ask, and a batch costs the owner bounded memory.

use std::time::Duration;

use futures_util::StreamExt;

use crate::harness::*;
use crate::nats::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_request_in_a_batch_fails_no_other_clients_request() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (foo, bar) = foo_and_bar(&nats.url()).await;
    // The same request answers the same line forwarded as on the owner.
    let mut on_bar = LineClient::connect(bar.local_addr()).await;
    on_bar.exchange("GET z\u{1} k", "NOT FOUND\r\n").await;
    let mut probe = LineClient::connect(foo.local_addr()).await;
    probe.exchange("GET z\u{1} k", "NOT FOUND\r\n").await;
    probe.exchange("CREATE zoo", "OK\r\n").await;

    // Three clients loop on the bad GET while an innocent one writes and
    // reads; all of them go through foo's one queue for bar.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut hostile = Vec::new();
    for _ in 0..3 {
        let mut c = LineClient::connect(foo.local_addr()).await;
        let stop = stop.clone();
        hostile.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                c.send("GET z\u{1} k\r\nGET z\u{1} k\r\nGET z\u{1} k\r\n")
                    .await;
                for _ in 0..3 {
                    assert_eq!(c.read_answer().await, "NOT FOUND\r\n");
                }
                n += 3;
            }
            n
        }));
    }
    let mut innocent = LineClient::connect(foo.local_addr()).await;
    for i in 0..500 {
        innocent
            .exchange(&format!("PUT zoo k{i} v{i}"), "OK\r\n")
            .await;
        innocent
            .exchange(&format!("GET zoo k{i}"), &format!("v{i}\r\nOK\r\n"))
            .await;
    }
    stop.cancel();
    let mut bad = 0;
    for h in hostile {
        bad += h.await.expect("hostile client");
    }
    assert!(bad > 0);
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_large_remote_values_each_get_their_answer() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (foo, bar) = foo_and_bar(&nats.url()).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("CREATE zoo", "OK\r\n").await;
    // Three 400 KB values: each fits one NATS message (1 MiB), two do not.
    let values: Vec<String> = (0..3)
        .map(|i| char::from(b'a' + i).to_string().repeat(400_000))
        .collect();
    let puts: String = values
        .iter()
        .enumerate()
        .map(|(i, v)| format!("PUT zoo k{i} {v}\r\n"))
        .collect();
    c.send(&puts).await;
    c.expect("OK\r\nOK\r\nOK\r\n").await;
    c.send("GET zoo k0\r\nGET zoo k1\r\nGET zoo k2\r\nGET zoo k0\r\n")
        .await;
    for v in values.iter().chain(&values[..1]) {
        c.expect(&format!("{v}\r\nOK\r\n")).await;
    }
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reply_too_large_for_one_message_comes_in_several() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (foo, bar) = foo_and_bar(&nats.url()).await;
    let mut c = LineClient::connect(bar.local_addr()).await;
    c.exchange("CREATE zoo", "OK\r\n").await;
    let value = "x".repeat(300_000);
    c.exchange(&format!("PUT zoo k {value}"), "OK\r\n").await;
    // Ten GETs of 300 KB: 3 MB of answers, so at least three messages, each
    // a complete reply object holding the next answers in order.
    let client = nats_client(&nats.url()).await;
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.expect("subscribe");
    let members: Vec<String> = (0..10)
        .map(|i| {
            let key = if i == 4 { "missing" } else { "k" };
            format!(r#"{{"op":"get","bucket":"zoo","key":"{key}"}}"#)
        })
        .collect();
    let body = format!(r#"{{"op":"batch","requests":[{}]}}"#, members.join(","));
    client
        .publish_with_reply("kv.node.bar", inbox, body.into())
        .await
        .expect("publish");
    let mut answers = Vec::new();
    let mut messages = 0;
    while answers.len() < 10 {
        let message = within("reply", replies.next()).await.expect("a reply");
        assert!(message.payload.len() <= client.max_payload());
        let json: serde_json::Value =
            serde_json::from_slice(&message.payload).expect("each message is JSON");
        assert_eq!(json["ok"], true);
        answers.extend(json["replies"].as_array().expect("replies").clone());
        messages += 1;
    }
    assert!(messages >= 3, "{messages} messages");
    assert_eq!(answers.len(), 10);
    for (i, answer) in answers.iter().enumerate() {
        if i == 4 {
            assert_eq!(answer, &serde_json::json!({"ok": true, "value": null}));
        } else {
            assert_eq!(answer["value"].as_str(), Some(value.as_str()), "answer {i}");
        }
    }
    foo.shutdown().await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_large_gets_cost_the_owner_bounded_memory() {
    let _heavy = heavy().await;
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let mut cmd = clean_command();
    cmd.env("KVMESH_NATS_URL", nats.url())
        .env("KVMESH_NODE", "bar")
        .env(
            "KVMESH_ROUTES",
            r#"[{range="a-m",node="foo"},{range="n-z",node="bar"}]"#,
        );
    let bar = spawn_kvmesh_with(cmd, &[]);
    let mut c = LineClient::connect(bar.addr).await;
    c.exchange("CREATE zoo", "OK\r\n").await;
    let value = "x".repeat(512 * 1024);
    c.exchange(&format!("PUT zoo k {value}"), "OK\r\n").await;
    let before = rss_kib(bar.child.id());

    // Four batches of 1,024 GETs of the 512 KiB value at once (each asks
    // for 512 MiB of answers); nobody reads the replies.
    let client = nats_client(&nats.url()).await;
    let member = r#"{"op":"get","bucket":"zoo","key":"k"}"#;
    let body = format!(
        r#"{{"op":"batch","requests":[{}]}}"#,
        vec![member; 1024].join(",")
    );
    for _ in 0..4 {
        client
            .publish_with_reply("kv.node.bar", "nobody.listens", body.clone().into())
            .await
            .expect("publish");
    }
    client.flush().await.expect("flush");
    let pid = bar.child.id();
    let mut peak = before;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // Until the node has answered them all (it answers TCP meanwhile).
    loop {
        peak = peak.max(rss_kib(pid));
        c.exchange("PING", "PONG\r\n").await;
        let stats = nats.monitor("/connz?subs=1");
        let out_msgs: u64 = stats["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"] == "kvmesh-bar")
            .filter_map(|c| c["in_msgs"].as_u64())
            .sum();
        if out_msgs >= 4 * 1024 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    peak = peak.max(rss_kib(pid));
    assert!(
        peak < before + 256 * 1024,
        "four batches of large GETs took the owner from {before} KiB to {peak} KiB"
    );
    c.exchange("GET zoo k", &format!("{value}\r\nOK\r\n")).await;
}
