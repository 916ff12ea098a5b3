//! The live routing table (`routes_from = "jetstream"`): changes reach every
//! node without a restart, `kvmesh routes` reads and changes the table with
//! compare-and-set, and a range that changes hands moves its buckets with it
//! without losing or undoing an acknowledged write, also when a node dies in
//! the middle of the move.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvmesh::config::RoutesFrom;

use crate::harness::*;
use crate::model;
use crate::nats::NatsServer;

const THREE: &[(&str, &str)] = &[("a-h", "foo"), ("i-q", "bar"), ("r-z", "baz")];

/// A memory node following the live table.
fn live_config(name: &str, url: &str) -> kvmesh::Config {
    let mut config = mesh_config(name, THREE, url);
    config.routes_from = RoutesFrom::Jetstream;
    config.request_timeout_ms = 5000;
    config
}

/// foo, bar and baz of [`THREE`], following the live table on `url`.
async fn three_live_nodes(url: &str) -> [kvmesh::Node; 3] {
    [
        start_node(live_config("foo", url)).await,
        start_node(live_config("bar", url)).await,
        start_node(live_config("baz", url)).await,
    ]
}

/// Runs `kvmesh routes ARGS` against `url`: exit code, stdout, stderr.
fn routes_cli(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(kvmesh_bin());
    cmd.arg("routes")
        .args(args)
        .args(["--nats-url", url])
        .env_remove("KVMESH_CONFIG")
        .env_remove("KVMESH_ROUTES")
        .env_remove("KVMESH_TEST_LOG_DIR")
        .env_remove("KVMESH_TEST_RUST_LOG");
    run(&mut cmd)
}

/// Waits until `WHERE bucket` answers `node` on every address; how long.
async fn wait_for_owner(addrs: &[SocketAddr], bucket: &str, node: &str) -> Duration {
    let started = Instant::now();
    for addr in addrs {
        let mut c = LineClient::connect(*addr).await;
        c.eventually(&format!("WHERE {bucket}"), &format!("{node}\r\nOK\r\n"))
            .await;
    }
    started.elapsed()
}

/// The table's JSON, written straight into the KV bucket.
async fn put_table(url: &str, json: &str) {
    let js = async_nats::jetstream::new(nats_client(url).await);
    let kv = js
        .get_key_value("kvmesh_routes")
        .await
        .expect("kvmesh_routes");
    kv.put("table", json.to_owned().into()).await.expect("put");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_changes_reach_every_node_and_bad_tables_are_ignored() {
    let Some(nats) = NatsServer::start_jetstream() else {
        return;
    };
    let url = nats.url();
    let [foo, bar, baz] = three_live_nodes(&url).await;
    let addrs = [foo.local_addr(), bar.local_addr(), baz.local_addr()];
    // The first node wrote its configured table; every node follows it.
    let (code, out, err) = routes_cli(&url, &["show"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("revision = 1\n"), "{out}");
    assert!(
        out.contains("[[routes]]\nrange = \"a-h\"\nnode = \"foo\"\n")
            && out.contains("[[routes]]\nrange = \"r-z\"\nnode = \"baz\"\n"),
        "{out}"
    );
    wait_for_owner(&addrs, "kiwi", "bar").await;

    // `move`: k-q goes to baz.
    let (code, out, err) = routes_cli(&url, &["move", "k-q", "baz"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("a-h→foo, i-j→bar, k-z→baz"), "{out}");
    let took = wait_for_owner(&addrs, "kiwi", "baz").await;
    eprintln!("routes: a move reached every node in {took:?}");
    wait_for_owner(&addrs, "ivy", "bar").await;

    // `set`: a file of [[routes]], at the revision in force.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("routes.toml");
    std::fs::write(
        &file,
        "[[routes]]\nrange = \"a-m\"\nnode = \"foo\"\n[[routes]]\nrange = \"n-z\"\nnode = \"bar\"\n",
    )
    .expect("write");
    let (code, _, err) = routes_cli(&url, &["set", file.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{err}");
    let took = wait_for_owner(&addrs, "kiwi", "foo").await;
    eprintln!("routes: a set reached every node in {took:?}");
    wait_for_owner(&addrs, "tulip", "bar").await;

    // The key written directly.
    put_table(&url, r#"[{"range":"*","node":"baz"}]"#).await;
    let took = wait_for_owner(&addrs, "kiwi", "baz").await;
    eprintln!("routes: a direct write reached every node in {took:?}");

    // A table that breaks the rules is ignored: the last good one stays.
    put_table(
        &url,
        r#"[{"range":"a-m","node":"foo"},{"range":"m-z","node":"bar"}]"#,
    )
    .await;
    put_table(&url, "not json").await;
    let (code, out, err) = routes_cli(&url, &["show"]);
    assert_ne!(code, Some(0), "a bad stored table is reported: {out}");
    assert!(err.contains("the stored table is bad"), "{err}");
    // The next good table proves the bad ones were read and passed over.
    put_table(&url, r#"[{"range":"*","node":"bar"}]"#).await;
    wait_for_owner(&addrs, "kiwi", "bar").await;
    for addr in addrs {
        let mut c = LineClient::connect(addr).await;
        c.exchange("WHERE mango", "bar\r\nOK\r\n").await;
    }

    // Bad commands: one clear line, a non-zero exit.
    let (code, _, err) = routes_cli("nats://127.0.0.1:1", &["show"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        err,
        "kvmesh routes: cannot reach NATS at nats://127.0.0.1:1\n"
    );
    for (args, says) in [
        (vec!["move", "m-a", "foo"], "backwards"),
        (vec!["move", "a-m", "no way"], "bad node name"),
    ] {
        let (code, _, err) = routes_cli(&url, &args);
        assert_eq!(code, Some(1), "{args:?}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    std::fs::write(
        &file,
        "[[routes]]\nrange = \"a-m\"\nnode = \"foo\"\n[[routes]]\nrange = \"m-z\"\nnode = \"bar\"\n",
    )
    .expect("write");
    let (code, _, err) = routes_cli(&url, &["set", file.to_str().expect("utf-8")]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("routes[1].range") && err.contains("overlaps"),
        "{err}"
    );

    // Two operators set tables read at the same revision: one wins, the
    // other is refused, and nothing is overwritten unseen.
    let (_, shown, _) = routes_cli(&url, &["show"]);
    let revision = shown
        .lines()
        .find_map(|l| l.strip_prefix("revision = "))
        .expect("a revision line")
        .to_owned();
    let one = dir.path().join("one.toml");
    let two = dir.path().join("two.toml");
    std::fs::write(
        &one,
        format!("revision = {revision}\n[[routes]]\nrange = \"*\"\nnode = \"foo\"\n"),
    )
    .expect("write");
    std::fs::write(
        &two,
        format!("revision = {revision}\n[[routes]]\nrange = \"*\"\nnode = \"baz\"\n"),
    )
    .expect("write");
    let (u1, u2) = (url.clone(), url.clone());
    let (p1, p2) = (one.clone(), two.clone());
    let a = std::thread::spawn(move || routes_cli(&u1, &["set", p1.to_str().expect("utf-8")]));
    let b = std::thread::spawn(move || routes_cli(&u2, &["set", p2.to_str().expect("utf-8")]));
    let (a, b) = (a.join().expect("set"), b.join().expect("set"));
    let codes = [a.0, b.0];
    assert!(
        codes.contains(&Some(0)) && codes.contains(&Some(1)),
        "one set wins, one is refused: {a:?} {b:?}"
    );
    let loser = if a.0 == Some(1) { &a.2 } else { &b.2 };
    assert!(
        loser.contains("refused: the table changed since revision"),
        "{loser}"
    );
    let winner = if a.0 == Some(0) { "foo" } else { "baz" };
    wait_for_owner(&addrs, "kiwi", winner).await;

    // check-config shows the table in force, with its revision.
    let mut cmd = Command::new(kvmesh_bin());
    cmd.args(["check-config", "--nats-url", &url])
        .env_remove("KVMESH_CONFIG")
        .env("KVMESH_ROUTES_FROM", "jetstream");
    let (code, out, err) = run(&mut cmd);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("routes_from = \"jetstream\""), "{out}");
    assert!(
        out.contains("# routes in force: kvmesh_routes revision "),
        "{out}"
    );
    // The service API shows the revision in force.
    let metadata = service_metadata(&url).await;
    assert_eq!(metadata.len(), 3);
    for m in &metadata {
        let shown: u64 = m["routes_revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .expect("routes_revision");
        assert!(shown > revision.parse::<u64>().expect("a number"), "{m}");
    }
    foo.shutdown().await;
    bar.shutdown().await;
    baz.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_move_between_memory_nodes_with_their_range() {
    let Some(nats) = NatsServer::start_jetstream() else {
        return;
    };
    let url = nats.url();
    let [foo, bar, baz] = three_live_nodes(&url).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("CREATE kiwi", "OK\r\n").await;
    c.exchange("CREATE lime", "OK\r\n").await;
    c.exchange("CREATE empty", "OK\r\n").await;
    let puts: String = (0..1000)
        .map(|i| format!("PUT kiwi k{i} v{i}\r\n"))
        .collect();
    c.send(&puts).await;
    c.expect(&"OK\r\n".repeat(1000)).await;
    c.exchange("PUT lime a b", "OK\r\n").await;
    c.exchange("DELETE kiwi k7", "OK\r\n").await;

    let (code, _, err) = routes_cli(&url, &["move", "k-l", "baz"]);
    assert_eq!(code, Some(0), "{err}");
    // Through every node, the buckets answer from baz with all their keys.
    for addr in [foo.local_addr(), bar.local_addr(), baz.local_addr()] {
        let mut c = LineClient::connect(addr).await;
        c.eventually("WHERE kiwi", "baz\r\nOK\r\n").await;
        c.exchange("GET kiwi k999", "v999\r\nOK\r\n").await;
        c.exchange("GET kiwi k7", "\r\nOK\r\n").await;
        c.exchange("GET lime a", "b\r\nOK\r\n").await;
    }
    let mut z = LineClient::connect(baz.local_addr()).await;
    let gets: String = (0..1000).map(|i| format!("GET kiwi k{i}\r\n")).collect();
    z.send(&gets).await;
    let want: String = (0..1000)
        .map(|i| {
            if i == 7 {
                "\r\nOK\r\n".to_string()
            } else {
                format!("v{i}\r\nOK\r\n")
            }
        })
        .collect();
    z.expect(&want).await;
    // An empty bucket in a range that did not move stays where it was.
    c.exchange("WHERE empty", "foo\r\nOK\r\n").await;
    c.exchange("GET empty x", "\r\nOK\r\n").await;

    // Moved back: foo holds them again, nothing lost, and writes made on
    // baz meanwhile are there.
    z.exchange("PUT kiwi new here", "OK\r\n").await;
    let (code, _, err) = routes_cli(&url, &["move", "k-l", "foo"]);
    assert_eq!(code, Some(0), "{err}");
    let mut b = LineClient::connect(bar.local_addr()).await;
    b.eventually("WHERE kiwi", "foo\r\nOK\r\n").await;
    b.exchange("GET kiwi new", "here\r\nOK\r\n").await;
    b.exchange("GET kiwi k999", "v999\r\nOK\r\n").await;
    foo.shutdown().await;
    bar.shutdown().await;
    baz.shutdown().await;
}

/// A durable process of `node` following the live table on `url`.
fn spawn_live_durable(url: &str, node: &str) -> Process {
    spawn_foo_bar_process(
        url,
        node,
        &[
            ("KVMESH_ROUTES_FROM", "jetstream"),
            ("KVMESH_REQUEST_TIMEOUT_MS", "5000"),
        ],
    )
}

/// Waits until `kvmesh routes show` reports no move under way.
async fn wait_until_moved(url: &str) -> Duration {
    let started = Instant::now();
    loop {
        let (code, out, err) = routes_cli(url, &["show"]);
        assert_eq!(code, Some(0), "{err}");
        if !out.contains("# moving:") {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the move never finished:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Buckets of the big range and of the clients: apple and avocado move
/// (a-m), nut stays (n-z).
const BUCKETS: [&str; 3] = ["apple", "avocado", "nut"];

/// Many clients under load through foo, bar and gw while a range holding
/// `keys` prefilled keys moves from foo to bar; `kill` picks a process to
/// kill -9 (and restart) in the middle of the move. Every answer is checked
/// against the model, every prefilled key is read back after.
async fn move_under_load(keys: usize, kill: Option<usize>) {
    let _heavy = heavy().await;
    let Some(nats) = NatsServer::start_jetstream() else {
        return;
    };
    let url = nats.url();
    let names = ["foo", "bar", "gw"];
    let mut procs: Vec<Process> = names.iter().map(|n| spawn_live_durable(&url, n)).collect();
    let mut setup = LineClient::connect(procs[2].addr).await;
    for b in BUCKETS {
        setup.eventually(&format!("CREATE {b}"), "OK\r\n").await;
    }
    setup.exchange("CREATE big", "OK\r\n").await;
    let mut sent = 0;
    while sent < keys {
        let n = (keys - sent).min(5000);
        let puts: String = (sent..sent + n)
            .map(|i| format!("PUT big k{i} v{i}\r\n"))
            .collect();
        setup.send(&puts).await;
        setup.expect(&"OK\r\n".repeat(n)).await;
        sent += n;
    }
    let addrs: Vec<Arc<Mutex<SocketAddr>>> =
        procs.iter().map(|p| Arc::new(Mutex::new(p.addr))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let seed = seed_from_env("MOVE_SEED");
    eprintln!("move: MOVE_SEED={seed}");
    let clients: Vec<_> = (0..9u64)
        .map(|id| {
            let addr = addrs[id as usize % 3].clone();
            tokio::spawn(model::client(id, seed, &BUCKETS, 10, addr, stop.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let started = Instant::now();
    let (code, _, err) = routes_cli(&url, &["move", "a-m", "bar"]);
    assert_eq!(code, Some(0), "{err}");
    if let Some(i) = kill {
        // Once bar has begun pulling the buckets.
        procs[1].wait_for_log("moving buckets in", 1);
        eprintln!("move: kill -9 {} in the middle of the move", names[i]);
        procs[i].kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        procs[i] = spawn_live_durable(&url, names[i]);
        *addrs[i].lock().expect("lock") = procs[i].addr;
    }
    wait_until_moved(&url).await;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let (models, acked): (Vec<model::Model>, Vec<u64>) =
        model::finish(clients).await.into_iter().unzip();
    let acked: u64 = acked.iter().sum();
    assert!(acked > 100, "{acked} writes acknowledged");
    let mut checked = 0;
    for p in &procs {
        checked += model::verify(&models, &BUCKETS, p.addr).await;
    }
    // Every prefilled key is on bar now, read through foo.
    let mut c = LineClient::connect(procs[0].addr).await;
    c.exchange("WHERE big", "bar\r\nOK\r\n").await;
    let mut read = 0;
    while read < keys {
        let n = (keys - read).min(5000);
        let gets: String = (read..read + n)
            .map(|i| format!("GET big k{i}\r\n"))
            .collect();
        c.send(&gets).await;
        let want: String = (read..read + n)
            .map(|i| format!("v{i}\r\nOK\r\n"))
            .collect();
        c.expect(&want).await;
        read += n;
    }
    let moved_in: Vec<String> = procs[1]
        .log()
        .into_iter()
        .filter(|l| l.contains("buckets moved in"))
        .collect();
    eprintln!(
        "move: {keys} keys moved in {took:?} under load ({acked} writes acknowledged, {checked} reads checked, longest wait for an answer {} ms); {moved_in:?}",
        model::SLOWEST.load(Ordering::Relaxed)
    );
    // foo keeps nothing of the range it gave away: restarted, it still
    // forwards, and its store holds none of it.
    procs[0].kill();
    procs[0] = spawn_live_durable(&url, "foo");
    let mut c = LineClient::connect(procs[0].addr).await;
    c.eventually("GET big k1", "v1\r\nOK\r\n").await;
    let js = async_nats::jetstream::new(nats_client(&url).await);
    let kv = js.get_key_value("kvmesh_foo").await.expect("foo's store");
    let mut left = kv.keys().await.expect("keys");
    use futures_util::StreamExt;
    let mut foo_keys = 0;
    while let Some(key) = left.next().await {
        let key = key.expect("a key");
        assert!(
            !key.starts_with("b.") && !key.starts_with("k."),
            "foo's store still holds {key}"
        );
        foo_keys += 1;
    }
    eprintln!("move: foo's store holds {foo_keys} keys of its own (active, alive)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_100000_keys_moves_under_load_without_losing_a_write() {
    move_under_load(100_000, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_owner_killed_mid_move_the_move_completes() {
    move_under_load(100_000, Some(0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_owner_killed_mid_move_the_move_completes() {
    move_under_load(100_000, Some(1)).await;
}
