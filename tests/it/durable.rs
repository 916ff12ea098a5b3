//! Durable nodes on JetStream: what a node acknowledged survives its death
//! (`kill -9`) and restart; while JetStream cannot store, writes are refused
//! with `ERROR store unavailable` and nothing changes; reads go on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvmesh::config::Durability;

use crate::harness::*;
use crate::model::{self, refused};
use crate::nats::{NatsCluster, NatsServer};

const ROUTES_ENV: &str = r#"[{range="a-m",node="foo"},{range="n-z",node="bar"}]"#;

/// foo as a durable process on `url`.
fn spawn_durable_foo(url: &str) -> Process {
    let mut cmd = clean_command();
    cmd.env("KVMESH_ROUTES", ROUTES_ENV)
        .env("KVMESH_DURABILITY", "jetstream")
        .env("KVMESH_REQUEST_TIMEOUT_MS", "2000");
    spawn_kvmesh_with(cmd, &["--node", "foo", "--nats-url", url])
}

/// foo as a durable node in this process, on NATS at `url`.
fn durable_foo(routes: &[(&str, &str)], url: &str) -> kvmesh::config::Config {
    let mut config = mesh_config("foo", routes, url);
    config.durability = Durability::Jetstream;
    config
}

/// foo alone on NATS at `url`, with a minute of failover time: no other
/// process can take its store over, so only its own quick retake (after it
/// loads the store again) lets writes work again soon.
fn lone_durable_foo(url: &str) -> kvmesh::config::Config {
    let mut config = durable_foo(FOO_BAR, url);
    config.failover_after_ms = 60_000;
    config
}

/// The revision of the `active` key of foo's store: it moves on with every
/// takeover.
async fn takeover_revision(kv: &async_nats::jetstream::kv::Store) -> u64 {
    within("the active key", kv.entry("active"))
        .await
        .expect("read the active key")
        .expect("an active key")
        .revision
}

/// The buckets the model clients write.
const BUCKETS: [&str; 2] = ["apple", "avocado"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_node_killed_under_load_keeps_every_acknowledged_write() {
    let _heavy = heavy().await;
    let Some(nats) = NatsServer::start_jetstream() else {
        return;
    };
    let url = nats.url();
    let mut foo = spawn_durable_foo(&url);
    let mut bar_config = mesh_config("bar", FOO_BAR, &url);
    bar_config.request_timeout_ms = 2000;
    let bar = start_node(bar_config).await;
    let mut setup = LineClient::connect(foo.addr).await;
    for b in ["apple", "avocado", "dropme"] {
        setup.exchange(&format!("CREATE {b}"), "OK\r\n").await;
    }
    // A dropped bucket with many keys stays dropped, and starts empty again.
    let puts: String = (0..2000)
        .map(|i| format!("PUT dropme k{i} v{i}\r\n"))
        .collect();
    setup.send(&puts).await;
    setup.expect(&"OK\r\n".repeat(2000)).await;
    setup.exchange("DROP dropme", "OK\r\n").await;

    // Clients write, delete and read their own keys, on foo and through bar.
    let foo_addr = Arc::new(Mutex::new(foo.addr));
    let stop = Arc::new(AtomicBool::new(false));
    let seed = seed_from_env("DURABLE_SEED");
    eprintln!("durable: DURABLE_SEED={seed}");
    let bar_addr = Arc::new(Mutex::new(bar.local_addr()));
    let clients: Vec<_> = (0..6u64)
        .map(|id| {
            let addr = if id % 2 == 0 { &foo_addr } else { &bar_addr };
            let (addr, stop) = (addr.clone(), stop.clone());
            tokio::spawn(model::client(id, seed, &BUCKETS, 10, addr, stop))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    eprintln!("durable: kill -9 foo");
    foo.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    foo = spawn_durable_foo(&url);
    *foo_addr.lock().expect("lock") = foo.addr;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let (models, acked): (Vec<model::Model>, Vec<u64>) =
        model::finish(clients).await.into_iter().unzip();
    let acked: u64 = acked.iter().sum();
    assert!(acked > 100, "{acked} writes acknowledged");

    // Kill once more, with no load: everything is read back from the store.
    foo.kill();
    let foo = spawn_durable_foo(&url);
    let checked = model::verify(&models, &BUCKETS, foo.addr).await;
    eprintln!("durable: {acked} writes acknowledged, {checked} keys checked after kill -9");
    let mut c = LineClient::connect(foo.addr).await;
    c.exchange("GET dropme k1", "NOT FOUND\r\n").await;
    c.exchange("CREATE dropme", "OK\r\n").await;
    c.exchange("GET dropme k1", "\r\nOK\r\n").await;
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_jetstream_is_down_writes_are_refused_and_reads_go_on() {
    let Some(mut nats) = NatsServer::start_jetstream() else {
        return;
    };
    let mut config = durable_foo(FOO_BAR, &nats.url());
    config.request_timeout_ms = 2000;
    let foo = start_node(config.clone()).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    // Pipelined: a read after a write on its way sees it, in order.
    c.send("CREATE apple\r\nPUT apple k a\r\nGET apple k\r\nPUT apple k b\r\nDELETE apple j\r\nGET apple k\r\nWHERE apple\r\n")
        .await;
    c.expect("OK\r\nOK\r\na\r\nOK\r\nOK\r\nOK\r\nb\r\nOK\r\nfoo\r\nOK\r\n")
        .await;
    c.exchange("PUT apple k v1", "OK\r\n").await;
    nats.kill();
    // The first write finds the node either knowing NATS is gone (refused at
    // once) or not yet: then it was sent on a dead connection, its outcome
    // is unknown, and the node loads its store again before it acts as the
    // owner, which it cannot do until NATS is back: meanwhile it has no
    // owner to pass requests to (`ERROR mesh unavailable`).
    c.send("PUT apple probe x\r\n").await;
    let first = c.read_line().await;
    let reloading = match first.as_str() {
        "ERROR store unavailable\r\n" => false,
        "ERROR node foo outcome unknown\r\n" => true,
        other => panic!("the first write after NATS died answered {other:?}"),
    };
    let refused = |answer: &str| {
        answer == "ERROR store unavailable\r\n"
            || (reloading && answer == "ERROR mesh unavailable\r\n")
    };
    for write in [
        "PUT apple k v2",
        "DELETE apple k",
        "CREATE avocado",
        "DROP apple",
    ] {
        c.send(format!("{write}\r\n")).await;
        let answer = c.read_line().await;
        assert!(refused(&answer), "{write} answered {answer:?}");
    }
    // Nothing changed in memory; reads go on (while reloading: refused).
    for (read, value) in [
        ("GET apple k", "v1\r\n"),
        ("GET avocado k", "NOT FOUND\r\n"),
    ] {
        c.send(format!("{read}\r\n")).await;
        let answer = c.read_line().await;
        if reloading && answer == "ERROR mesh unavailable\r\n" {
            continue;
        }
        assert_eq!(answer, value, "{read}");
        if answer == "v1\r\n" {
            c.expect("OK\r\n").await;
        }
    }
    c.exchange("WHERE apple", "foo\r\nOK\r\n").await;
    nats.restart();
    // Writes work again, without a restart of the node.
    c.eventually("PUT apple k v3", "OK\r\n").await;
    c.exchange("GET apple k", "v3\r\nOK\r\n").await;
    foo.shutdown().await;
    // And the store holds exactly what was acknowledged.
    let foo = start_node(config).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("GET apple k", "v3\r\nOK\r\n").await;
    c.exchange("GET avocado k", "NOT FOUND\r\n").await;
    foo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_any_bytes_are_stored_and_come_back() {
    let Some(nats) = NatsServer::start_jetstream() else {
        return;
    };
    let config = durable_foo(&[("*", "foo")], &nats.url());
    let foo = start_node(config.clone()).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    let names = ["a.b", "*", ">", "x=y/z", "\u{e9}t\u{e9}", "k\u{1}", "_-"];
    for b in names {
        c.exchange(&format!("CREATE {b}"), "OK\r\n").await;
        for k in names {
            c.exchange(&format!("PUT {b} {k} {k}{b}"), "OK\r\n").await;
        }
    }
    foo.shutdown().await;
    let foo = start_node(config).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    for b in names {
        for k in names {
            c.exchange(&format!("GET {b} {k}"), &format!("{k}{b}\r\nOK\r\n"))
                .await;
        }
    }
    foo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_three_replicas_a_nats_server_killed_under_load_loses_nothing() {
    let _heavy = heavy().await;
    let Some(mut cluster) = NatsCluster::start_jetstream() else {
        return;
    };
    let mut config = durable_foo(&[("*", "foo")], &cluster.urls());
    config.replicas = 3;
    config.request_timeout_ms = 3000;
    let foo = start_node(config.clone()).await;
    let mut setup = LineClient::connect(foo.local_addr()).await;
    setup.eventually("CREATE apple", "OK\r\n").await;

    let stop = Arc::new(AtomicBool::new(false));
    let addr = foo.local_addr();
    let mut clients = Vec::new();
    for id in 0..4u64 {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut model: BTreeMap<u64, BTreeSet<Option<String>>> = BTreeMap::new();
            let (mut conn, mut n, mut acked, mut refused_count) = (None, 0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let k = n % 16;
                let possible = model.entry(k).or_insert_with(|| BTreeSet::from([None]));
                let value = format!("v{id}-{n}");
                match ask(&mut conn, addr, &format!("PUT apple c{id}k{k} {value}"))
                    .await
                    .ok()
                {
                    Some(lines) if lines == ["OK\r\n"] => {
                        *possible = BTreeSet::from([Some(value)]);
                        acked += 1;
                    }
                    Some(lines) if lines.len() == 1 && refused(&lines[0]) => refused_count += 1,
                    Some(lines) if lines.len() == 1 && lines[0].starts_with("ERROR ") => {
                        possible.insert(Some(value));
                    }
                    Some(lines) => panic!("client {id}: PUT answered {lines:?}"),
                    None => {
                        possible.insert(Some(value));
                    }
                }
            }
            (model, acked, refused_count)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    eprintln!("durable: kill nats s1");
    cluster.servers[1].kill();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let during = {
        let mut c = LineClient::connect(addr).await;
        c.read_after("PUT apple during k").await
    };
    assert_eq!(during, "OK\r\n", "writes go on with two servers of three");
    cluster.servers[1].restart();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let results = model::finish(clients).await;
    let acked: u64 = results.iter().map(|r| r.1).sum();
    let refused_count: u64 = results.iter().map(|r| r.2).sum();
    assert!(acked > 100, "{acked} writes acknowledged");
    foo.shutdown().await;
    // Every acknowledged write, read back from the store by a new process.
    let foo = start_node(config).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.eventually("PUT apple after k", "OK\r\n").await;
    for (id, (model, _, _)) in results.iter().enumerate() {
        for (k, possible) in model {
            c.send(format!("GET apple c{id}k{k}\r\n")).await;
            let answer = c.read_answer().await;
            let v = answer.trim_end_matches("\r\nOK\r\n");
            let got = (!v.is_empty()).then(|| v.to_owned());
            assert!(
                possible.contains(&got),
                "c{id}k{k}: {got:?}, model {possible:?}"
            );
        }
    }
    eprintln!(
        "durable: {acked} writes acknowledged, {refused_count} refused, a server killed and back"
    );
    foo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_outcome_is_unknown_makes_the_node_reload_and_go_on() {
    let Some(nats) = NatsServer::start_jetstream() else {
        return;
    };
    let mut config = lone_durable_foo(&nats.url());
    config.request_timeout_ms = 1000;
    let foo = start_node(config).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    // On a busy machine the node's first takeover may not be answered in
    // time: it loads the store again and retries within a second.
    c.eventually("CREATE apple", "OK\r\n").await;
    c.exchange("PUT apple k before", "OK\r\n").await;
    // JetStream hangs with a write on its way: no acknowledgement comes.
    nats.signal("-STOP");
    c.exchange("PUT apple k lost", "ERROR node foo outcome unknown\r\n")
        .await;
    nats.signal("-CONT");
    // The node loads its store again (the write did land: JetStream had
    // it) and goes on as the active process.
    c.eventually("GET apple k", "lost\r\nOK\r\n").await;
    c.eventually("PUT apple k after", "OK\r\n").await;
    c.exchange("GET apple k", "after\r\nOK\r\n").await;
    foo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_jetstream_refuses_changes_nothing_and_the_writes_behind_it_go_on() {
    let Some(nats) = NatsServer::start_jetstream() else {
        return;
    };
    let config = lone_durable_foo(&nats.url());
    let foo = start_node(config.clone()).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.eventually("CREATE apple", "OK\r\n").await;
    c.exchange("PUT apple k before", "OK\r\n").await;
    // The store refuses messages over 300 bytes from now on.
    let js = async_nats::jetstream::new(nats_client(&nats.url()).await);
    let stream = within("get the store", js.get_stream("KV_kvmesh_foo"))
        .await
        .expect("the store");
    let mut limited = stream.cached_info().config.clone();
    limited.max_message_size = 300;
    within("limit the store", js.update_stream(limited))
        .await
        .expect("the store limited");
    let kv = within("the store as KV", js.get_key_value("kvmesh_foo"))
        .await
        .expect("the KV bucket");
    let takeover = takeover_revision(&kv).await;
    // One pipelined send: the big write and those behind it travel
    // together.
    let big = "x".repeat(400);
    let mut writes = format!("PUT apple big {big}\r\n");
    for i in 0..20 {
        writes.push_str(&format!("PUT apple k v{i}\r\n"));
    }
    c.send(writes).await;
    assert_eq!(c.read_line().await, "ERROR store unavailable\r\n");
    let mut acknowledged = "before".to_string();
    for i in 0..20 {
        match c.read_line().await.as_str() {
            "OK\r\n" => acknowledged = format!("v{i}"),
            "ERROR store unavailable\r\n" => {}
            other => panic!("PUT apple k v{i} answered {other:?}"),
        }
    }
    // Memory holds exactly what was acknowledged, and the next write is
    // stored at once: the process is still the active one, without having
    // loaded its store again and taken over anew (a refusal says nothing
    // about who owns the store).
    c.exchange("GET apple k", &format!("{acknowledged}\r\nOK\r\n"))
        .await;
    c.exchange("GET apple big", "\r\nOK\r\n").await;
    c.exchange("PUT apple k after", "OK\r\n").await;
    assert_eq!(
        takeover_revision(&kv).await,
        takeover,
        "the node took over its store again"
    );
    foo.shutdown().await;
    // The store holds what was acknowledged, and nothing refused.
    let foo = start_node(config).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("GET apple k", "after\r\nOK\r\n").await;
    c.exchange("GET apple big", "\r\nOK\r\n").await;
    foo.shutdown().await;
}
