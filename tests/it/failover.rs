//! Failover: several processes share a durable node's name; one is active,
//! the others are standbys that take over when it dies, hangs, is cut off
//! from NATS, or stops. A process that another has replaced never
//! acknowledges a write as the owner again. Every test checks what clients
//! were told against what the store holds afterwards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::model::{self, refused};
use crate::nats::{NatsCluster, NatsServer};

const ROUTES_ENV: &str = r#"[{range="a-m",node="foo"},{range="n-z",node="bar"}]"#;

/// A durable process of node foo on `url`, taking over after `failover_ms`.
fn spawn_foo(url: &str, failover_ms: u64) -> Process {
    spawn_foo_with(url, failover_ms, 1)
}

/// [`spawn_foo`] with a store of `replicas` replicas.
fn spawn_foo_with(url: &str, failover_ms: u64, replicas: u32) -> Process {
    let mut cmd = clean_command();
    cmd.env("KVMESH_REPLICAS", replicas.to_string());
    cmd.env("KVMESH_ROUTES", ROUTES_ENV)
        .env("KVMESH_DURABILITY", "jetstream")
        .env("KVMESH_FAILOVER_AFTER_MS", failover_ms.to_string())
        .env("KVMESH_REQUEST_TIMEOUT_MS", "2000");
    spawn_kvmesh_with(cmd, &["--node", "foo", "--nats-url", url])
}

/// Node foo as two processes: the first active, the second (on
/// `standby_url`) a standby once this returns.
fn active_and_standby(
    url: &str,
    standby_url: &str,
    failover_ms: u64,
    replicas: u32,
) -> (Process, Process) {
    let active = spawn_foo_with(url, failover_ms, replicas);
    let standby = spawn_foo_with(standby_url, failover_ms, replicas);
    standby.wait_for_log("standby", 1);
    (active, standby)
}

/// The name of the server leading `stream` (`s0`, `s1`, `s2`), asked of
/// server 0.
async fn stream_leader(cluster: &NatsCluster, stream: &str) -> String {
    let js = async_nats::jetstream::new(nats_client(&cluster.servers[0].url()).await);
    let mut stream = within("get the stream", js.get_stream(stream))
        .await
        .expect("the stream");
    let info = within("stream info", stream.info())
        .await
        .expect("stream info");
    info.cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a stream leader")
}

/// Node bar (memory, owns n-z), in this process.
async fn start_bar(url: &str) -> kvmesh::Node {
    start_bar_with_timeout(url, 2000).await
}

/// [`start_bar`], giving up on foo's answers after `timeout_ms`.
async fn start_bar_with_timeout(url: &str, timeout_ms: u64) -> kvmesh::Node {
    let mut config = mesh_config("bar", FOO_BAR, url);
    config.request_timeout_ms = timeout_ms;
    start_node(config).await
}

/// The roles the service API shows for node foo's processes.
async fn roles(url: &str) -> Vec<String> {
    let mut roles: Vec<String> = service_metadata(url)
        .await
        .into_iter()
        .filter(|m| m["node"] == "foo")
        .map(|m| m["role"].as_str().unwrap_or("none").to_owned())
        .collect();
    roles.sort();
    roles
}

/// Writes to `key` through `addr` until one is acknowledged; returns how
/// long that took, failing with the log of `standby` after `bound`.
async fn until_a_write_lands(
    addr: SocketAddr,
    key: &str,
    bound: Duration,
    standby: &Process,
) -> Duration {
    let started = Instant::now();
    let mut conn = None;
    let mut n = 0;
    loop {
        n += 1;
        if let Ok(lines) = ask(&mut conn, addr, &format!("PUT apple {key} w{n}")).await
            && lines == ["OK\r\n"]
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < bound,
            "no write on foo's buckets landed within {bound:?}; the standby's log:\n{}",
            standby.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_process_is_killed() {
    let _heavy = heavy().await;
    let Some(nats) = NatsServer::start_jetstream() else {
        return;
    };
    let url = nats.url();
    let failover = Duration::from_millis(1000);
    let kills: usize = std::env::var("FAILOVER_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let (active, standby) = active_and_standby(&url, &url, 1000, 1);
    let mut procs = [active, standby];
    assert_eq!(roles(&url).await, ["active", "standby"]);
    let bar = start_bar(&url).await;
    let mut setup = LineClient::connect(bar.local_addr()).await;
    setup.eventually("CREATE apple", "OK\r\n").await;

    // Clients through bar, and straight to foo's standby (which forwards,
    // and answers for itself once it takes over).
    let via_bar = Arc::new(Mutex::new(bar.local_addr()));
    let direct = Arc::new(Mutex::new(procs[1].addr));
    let stop = Arc::new(AtomicBool::new(false));
    let seed = seed_from_env("FAILOVER_SEED");
    eprintln!("failover: FAILOVER_SEED={seed}");
    let clients: Vec<_> = (0..4u64)
        .map(|id| {
            let addr = if id % 2 == 0 {
                via_bar.clone()
            } else {
                direct.clone()
            };
            tokio::spawn(model::client(id, seed, &["apple"], 8, addr, stop.clone()))
        })
        .collect();
    let mut active = 0;
    let mut takeovers = Vec::new();
    for round in 0..kills {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let standby = 1 - active;
        *direct.lock().expect("lock") = procs[standby].addr;
        procs[active].kill();
        let bound = failover + Duration::from_secs(2);
        let took = until_a_write_lands(bar.local_addr(), "probe", bound, &procs[standby]).await;
        eprintln!(
            "failover: round {round}: writes land again {} ms after kill -9",
            took.as_millis()
        );
        takeovers.push(took);
        procs[standby].wait_for_log("the active process was silent", 1);
        procs[active] = spawn_foo(&url, 1000);
        procs[active].wait_for_log("standby", 1);
        active = standby;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let models: Vec<model::Model> = model::finish(clients)
        .await
        .into_iter()
        .map(|r| r.0)
        .collect();
    takeovers.sort();
    eprintln!(
        "failover: {} kills, takeover median {} ms, worst {} ms",
        takeovers.len(),
        takeovers[takeovers.len() / 2].as_millis(),
        takeovers[takeovers.len() - 1].as_millis()
    );
    let checked = model::verify(&models, &["apple"], bar.local_addr()).await;
    // And once more from the store alone: both processes killed, one back.
    for p in &mut procs {
        p.kill();
    }
    let alone = spawn_foo(&url, 1000);
    let again = model::verify(&models, &["apple"], alone.addr).await;
    eprintln!("failover: {checked} + {again} keys checked");
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_active_process_comes_back_as_a_standby_and_acknowledges_nothing() {
    let _heavy = heavy().await;
    let Some(nats) = NatsServer::start_jetstream() else {
        return;
    };
    let url = nats.url();
    let (old, new) = active_and_standby(&url, &url, 1000, 1);
    // NATS goes on handing a share of foo's requests to the paused process
    // (it is still subscribed): through bar, those time out quickly.
    let bar = start_bar_with_timeout(&url, 300).await;
    let mut c = LineClient::connect(bar.local_addr()).await;
    c.eventually("CREATE apple", "OK\r\n").await;
    c.exchange("PUT apple shared old", "OK\r\n").await;
    let mut direct = LineClient::connect(old.addr).await;
    direct.exchange("GET apple shared", "old\r\nOK\r\n").await;

    old.signal("-STOP");
    // NATS still hands some requests for foo to the paused process (it is
    // still subscribed); those time out, the others reach the new one.
    until_a_write_lands(bar.local_addr(), "probe", Duration::from_secs(10), &new).await;
    new.wait_for_log("the active process was silent", 1);
    c.eventually("PUT apple shared new", "OK\r\n").await;
    // Requests that reach the old process while it is paused, answered
    // once it runs again.
    let writes: String = (0..20)
        .map(|i| format!("PUT apple paused{i} p{i}\r\n"))
        .collect();
    direct.send(format!("{writes}GET apple shared\r\n")).await;
    old.signal("-CONT");
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let answer = direct.read_line().await;
        match answer.as_str() {
            "OK\r\n" => acknowledged.push(i),
            other => assert!(refused(other), "PUT paused{i} answered {other:?}"),
        }
    }
    let read = direct.read_answer().await;
    assert!(
        read == "new\r\nOK\r\n" || refused(&read),
        "the old process answered a read with what is no longer true: {read:?}"
    );
    old.wait_for_log("stepping down", 1);
    old.wait_for_log("this process is a standby", 2);
    // Whatever it acknowledged, the active process has.
    for i in &acknowledged {
        c.exchange(&format!("GET apple paused{i}"), &format!("p{i}\r\nOK\r\n"))
            .await;
    }
    // From now on it forwards: its writes land on the new active process.
    direct.eventually("PUT apple after x", "OK\r\n").await;
    c.exchange("GET apple after", "x\r\nOK\r\n").await;
    direct.exchange("GET apple shared", "new\r\nOK\r\n").await;
    assert_eq!(roles(&url).await, ["active", "standby"]);
    eprintln!(
        "failover: the paused process acknowledged {} of 20 writes, all kept",
        acknowledged.len()
    );
    bar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_cut_off_from_nats_is_replaced_and_comes_back_as_a_standby() {
    let _heavy = heavy().await;
    let Some(mut cluster) = NatsCluster::start_jetstream() else {
        return;
    };
    let (a, b) = (cluster.servers[0].url(), cluster.servers[1].url());
    let (old, new) = active_and_standby(&a, &b, 1000, 3);
    let bar = start_bar(&cluster.servers[2].url()).await;
    let mut c = LineClient::connect(bar.local_addr()).await;
    c.eventually("CREATE apple", "OK\r\n").await;
    c.eventually("PUT apple before 1", "OK\r\n").await;

    cluster.servers[0].kill();
    // The store's stream may have had its leader on the killed server:
    // JetStream elects another before anything is stored.
    let took = until_a_write_lands(bar.local_addr(), "probe", Duration::from_secs(10), &new).await;
    eprintln!(
        "failover: writes land again {} ms after the active process lost NATS",
        took.as_millis()
    );
    new.wait_for_log("the active process was silent", 1);
    c.exchange("PUT apple during 2", "OK\r\n").await;
    cluster.servers[0].restart();
    old.wait_for_log("this process is a standby", 2);
    let mut direct = LineClient::connect(old.addr).await;
    direct.eventually("PUT apple after 3", "OK\r\n").await;
    for (key, value) in [("before", "1"), ("during", "2"), ("after", "3")] {
        c.exchange(&format!("GET apple {key}"), &format!("{value}\r\nOK\r\n"))
            .await;
        direct
            .exchange(&format!("GET apple {key}"), &format!("{value}\r\nOK\r\n"))
            .await;
    }
    bar.shutdown().await;
}

/// A process loads the store through a consumer that reads one server's
/// copy of the stream, and right after a restart that copy lags behind. The
/// process taking over must still hold every acknowledged write: each round
/// a server is killed, every key is rewritten, the active process hands
/// over (SIGTERM), the server comes back, and a new process, given only
/// that server, loads the store and takes over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_loads_from_a_lagging_server_holds_every_acknowledged_write() {
    let _heavy = heavy().await;
    let Some(mut cluster) = NatsCluster::start_jetstream() else {
        return;
    };
    let rounds: usize = std::env::var("FAILOVER_LAG_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    // Each round rewrites every key: the restarted server has a store's
    // worth of changes to catch up on.
    const KEYS: usize = 20_000;
    const WRITES: usize = 20_000;
    let urls: Vec<String> = cluster.servers.iter().map(|s| s.url()).collect();
    let mut active = spawn_foo_with(&urls[0], 1000, 3);
    let mut c = LineClient::connect(active.addr).await;
    c.eventually("CREATE apple", "OK\r\n").await;
    let padding = "p".repeat(1000);
    let mut last = vec![String::new(); KEYS];
    // The server the active process is given.
    let (mut lagged, mut used) = (0, 0);
    for round in 0..rounds {
        // A server neither the stream's leader (writes go on without a
        // pause) nor the one the active process uses.
        let leader = stream_leader(&cluster, "KV_kvmesh_foo").await;
        let lagging = (0..3)
            .find(|&i| i != used && format!("s{i}") != leader)
            .expect("a server to kill");
        cluster.servers[lagging].kill();
        for chunk in (0..WRITES).collect::<Vec<_>>().chunks(500) {
            let mut batch = String::new();
            for &i in chunk {
                let value = format!("r{round}-{i}-{padding}");
                batch.push_str(&format!("PUT apple k{} {value}\r\n", i % KEYS));
                last[i % KEYS] = value;
            }
            c.send(batch).await;
            for _ in chunk {
                c.expect("OK\r\n").await;
            }
        }
        assert_eq!(active.stop_with("-TERM"), Some(0));
        cluster.servers[lagging].restart();
        active = spawn_foo_with(&urls[lagging], 1000, 3);
        active.wait_for_log("this process is the active one", 1);
        used = lagging;
        c = LineClient::connect(active.addr).await;
        for chunk in last.iter().enumerate().collect::<Vec<_>>().chunks(500) {
            let gets: String = chunk
                .iter()
                .map(|(key, _)| format!("GET apple k{key}\r\n"))
                .collect();
            c.send(gets).await;
            for (_, value) in chunk {
                c.expect(&format!("{value}\r\nOK\r\n")).await;
            }
        }
        let behind = active.log().iter().any(|l| l.contains("behind the stream"));
        lagged += usize::from(behind);
        eprintln!(
            "failover: round {round}: loaded after s{lagging} missed {WRITES} writes{}",
            if behind {
                ", from a copy that had to catch up"
            } else {
                ""
            }
        );
    }
    eprintln!("failover: {lagged} of {rounds} loads read a copy that lagged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_node_over_at_once() {
    let _heavy = heavy().await;
    let Some(nats) = NatsServer::start_jetstream() else {
        return;
    };
    let url = nats.url();
    // A standby would wait a minute for silence: only a hand-over is quick.
    let (mut old, new) = active_and_standby(&url, &url, 60_000, 1);
    let bar = start_bar(&url).await;
    let mut c = LineClient::connect(bar.local_addr()).await;
    c.eventually("CREATE apple", "OK\r\n").await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, addr) = (stop.clone(), bar.local_addr());
        tokio::spawn(async move {
            // The longest time between two acknowledged writes.
            let mut conn = None;
            let (mut last_ok, mut longest, mut n) = (Instant::now(), Duration::ZERO, 0);
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match ask(&mut conn, addr, &format!("PUT apple k v{n}")).await {
                    Ok(lines) if lines == ["OK\r\n"] => {
                        longest = longest.max(last_ok.elapsed());
                        last_ok = Instant::now();
                    }
                    Ok(lines) => assert!(lines.len() == 1 && refused(&lines[0]), "{lines:?}"),
                    Err(()) => {}
                }
            }
            (longest, n)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(old.stop_with("-TERM"), Some(0));
    new.wait_for_log("the active process handed over", 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (longest, n) = within("writer", writer).await.expect("writer");
    eprintln!(
        "failover: SIGTERM hand-over: longest gap between acknowledged writes {} ms ({n} writes)",
        longest.as_millis()
    );
    assert!(
        longest < Duration::from_secs(1),
        "writes stopped for {longest:?}"
    );
    // The new active process holds the last acknowledged value.
    c.send("GET apple k\r\n").await;
    let through_bar = c.read_answer().await;
    let mut direct = LineClient::connect(new.addr).await;
    direct.exchange("GET apple k", &through_bar).await;
    assert!(through_bar.starts_with('v'), "{through_bar:?}");
    bar.shutdown().await;
}

#[test]
fn check_config_says_which_role_a_process_takes() {
    let mut durable = clean_command();
    durable
        .args(["check-config"])
        .env("KVMESH_NODE", "foo")
        .env("KVMESH_DURABILITY", "jetstream")
        .env("KVMESH_FAILOVER_AFTER_MS", "1500");
    let (code, out, err) = run(&mut durable);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("failover_after_ms = 1500  # environment"),
        "{out}"
    );
    assert!(
        out.contains(
            "# role: active at once if node foo's store names no active process (new, or \
             handed over), else a standby that takes over after 1500 ms of silence from the \
             active one, or at once when it stops cleanly\n"
        ),
        "{out}"
    );
    let mut memory = clean_command();
    memory.args(["check-config"]).env("KVMESH_NODE", "foo");
    let (_, out, _) = run(&mut memory);
    assert!(
        out.contains("# role: the only process of node foo (memory"),
        "{out}"
    );
}
