//! Chaos with a checker: a 3-server NATS cluster and three nodes under a mixed
//! workload, while NATS servers and the node that owns nothing are killed and
//! restarted at random (seeded; the seed is printed, `CHAOS_SEED` replays it).
//!
//! Invariants, checked against a model of what each client wrote:
//! - every answer is either correct or an explicit `ERROR ...` line;
//! - no node panics or exits (the owners are never touched);
//! - every write acknowledged with `OK` is readable afterwards with its latest
//!   value (a write that got an error may or may not have landed);
//! - the mesh is whole again within a few seconds after the last fault.
//!
//! CI runs `CHAOS_SECONDS` (default 20) of faults; set it higher for a long run.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::harness::*;
use crate::nats::NatsCluster;

const ROUTES: &[(&str, &str)] = &[("a-m", "foo"), ("n-z", "bar")];
const BUCKETS: [&str; 2] = ["apple", "nut"];

/// What a client knows of one of its keys: the values it may hold now.
type Possible = BTreeSet<Option<String>>;

/// One request and its answer, over a connection that may break.
async fn ask(
    conn: &mut Option<BufReader<TcpStream>>,
    addr: SocketAddr,
    line: &str,
) -> Result<Vec<String>, ()> {
    if conn.is_none() {
        *conn = TcpStream::connect(addr).await.ok().map(BufReader::new);
    }
    let Some(c) = conn.as_mut() else {
        return Err(());
    };
    let exchange = async {
        c.get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .ok()?;
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            if c.read_line(&mut l).await.ok()? == 0 {
                return None;
            }
            let done = !line.starts_with("GET")
                || l.starts_with("ERROR")
                || l == "NOT FOUND\r\n"
                || !lines.is_empty();
            lines.push(l);
            if done {
                return Some(lines);
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Some(lines)) => Ok(lines),
        _ => {
            *conn = None;
            Err(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_survives_chaos_without_losing_an_acknowledged_write() {
    let _heavy = heavy().await;
    let Some(mut cluster) = NatsCluster::start() else {
        return;
    };
    let seed = seed_from_env("CHAOS_SEED");
    let seconds: u64 = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    eprintln!("chaos: CHAOS_SEED={seed} CHAOS_SECONDS={seconds}");
    let urls = cluster.urls();
    let owner = |name: &str| {
        let mut c = mesh_config(name, ROUTES, &urls);
        c.request_timeout_ms = 1000;
        c
    };
    let foo = start_node(owner("foo")).await;
    let bar = start_node(owner("bar")).await;
    // gw owns nothing: every request through it is forwarded. It runs as a
    // process so that it can be killed for real.
    let routes_env = r#"[{range="a-m",node="foo"},{range="n-z",node="bar"}]"#;
    let spawn_gw = || {
        let mut cmd = clean_command();
        cmd.env("KVMESH_ROUTES", routes_env)
            .env("KVMESH_REQUEST_TIMEOUT_MS", "1000");
        spawn_kvmesh_with(cmd, &["--node", "gw", "--nats-url", &urls])
    };
    let mut gw = Some(spawn_gw());
    let gw_addr = Arc::new(Mutex::new(gw.as_ref().map(|g| g.addr).expect("gw")));

    let mut setup = LineClient::connect(foo.local_addr()).await;
    for b in BUCKETS {
        setup.eventually(&format!("CREATE {b}"), "OK\r\n").await;
    }

    // Clients: four per node, each with its own keys in both buckets.
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for id in 0..12u64 {
        let stop = stop.clone();
        let (answers, errors) = (answers.clone(), errors.clone());
        let gw_addr = gw_addr.clone();
        let fixed = match id % 3 {
            0 => Some(foo.local_addr()),
            1 => Some(bar.local_addr()),
            _ => None,
        };
        let mut rng = XorShift::stream(seed, id);
        clients.push(tokio::spawn(async move {
            let mut model: BTreeMap<(usize, u64), Possible> = BTreeMap::new();
            let mut conn = None;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let addr = fixed.unwrap_or_else(|| *gw_addr.lock().expect("lock"));
                let b = rng.below(2) as usize;
                let k = rng.below(20);
                let key = format!("c{id}k{k}");
                let possible = model
                    .entry((b, k))
                    .or_insert_with(|| BTreeSet::from([None]));
                if rng.below(3) == 0 {
                    n += 1;
                    let value = format!("v{id}-{n}");
                    match ask(
                        &mut conn,
                        addr,
                        &format!("PUT {} {key} {value}", BUCKETS[b]),
                    )
                    .await
                    {
                        Ok(lines) if lines == ["OK\r\n"] => {
                            *possible = BTreeSet::from([Some(value)])
                        }
                        Ok(lines) if lines.len() == 1 && lines[0].starts_with("ERROR ") => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            possible.insert(Some(value));
                        }
                        Ok(lines) => panic!("client {id}: PUT answered {lines:?}"),
                        Err(()) => {
                            possible.insert(Some(value));
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                } else {
                    match ask(&mut conn, addr, &format!("GET {} {key}", BUCKETS[b])).await {
                        Ok(lines) if lines.len() == 1 && lines[0].starts_with("ERROR ") => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(lines) if lines.len() == 2 && lines[1] == "OK\r\n" => {
                            let v = lines[0].trim_end_matches("\r\n");
                            let got = (!v.is_empty()).then(|| v.to_owned());
                            assert!(
                                possible.contains(&got),
                                "client {id}: GET {key} answered {got:?}, model {possible:?}"
                            );
                            // What was read is now the value.
                            *possible = BTreeSet::from([got]);
                        }
                        Ok(lines) => panic!("client {id}: GET answered {lines:?}"),
                        Err(()) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                answers.fetch_add(1, Ordering::Relaxed);
            }
            model
        }));
    }

    // Hostile clients beside them: control bytes in names, values too large,
    // pipelined GETs of a large value, and NATS batches of large GETs. Their
    // neighbours' answers must stay exact (the clients above check that).
    let big = "B".repeat(400_000);
    setup
        .eventually(&format!("PUT nut big {big}"), "OK\r\n")
        .await;
    let mut hostile = Vec::new();
    for id in 0..3u64 {
        let stop = stop.clone();
        let gw_addr = gw_addr.clone();
        let big = big.clone();
        let urls = urls.clone();
        hostile.push(tokio::spawn(async move {
            let nats = async_nats::connect(urls).await.ok();
            let mut conn = None;
            let too_large = format!("PUT nut k {}", "x".repeat(600_000));
            let batch = format!(
                r#"{{"op":"batch","requests":[{}]}}"#,
                vec![r#"{"op":"get","bucket":"nut","key":"big"}"#; 64].join(",")
            );
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let addr = *gw_addr.lock().expect("lock");
                let (line, ok): (&str, &[&str]) = match (id + n) % 4 {
                    0 => ("GET z\u{1} k", &["NOT FOUND\r\n"]),
                    1 => ("PUT n\u{2}x k v", &["NOT FOUND\r\n"]),
                    2 => (&too_large, &["ERROR value too large\r\n"]),
                    _ => ("GET nut big", &[]),
                };
                match ask(&mut conn, addr, line).await {
                    Ok(lines) if lines.len() == 1 && lines[0].starts_with("ERROR ") => {}
                    Ok(lines) if ok.is_empty() => {
                        assert_eq!(lines, [format!("{big}\r\n"), "OK\r\n".into()]);
                    }
                    Ok(lines) => {
                        assert_eq!(lines, ok, "hostile {id}: {}", &line[..line.len().min(20)])
                    }
                    Err(()) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
                if let Some(nats) = &nats {
                    let _ = nats
                        .publish_with_reply("kv.node.bar", "nobody.listens", batch.clone().into())
                        .await;
                }
                n += 1;
            }
            n
        }));
    }

    // Faults.
    let mut rng = XorShift::new(seed);
    let mut faults = 0;
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(700))).await;
        if rng.below(3) == 0 {
            eprintln!("chaos: kill gw");
            if let Some(mut g) = gw.take() {
                g.kill();
            }
            tokio::time::sleep(Duration::from_millis(500 + rng.below(1000))).await;
            // Blocks this (test) thread briefly; the clients run on the workers.
            let g = spawn_gw();
            *gw_addr.lock().expect("lock") = g.addr;
            gw = Some(g);
        } else {
            let i = rng.below(3) as usize;
            eprintln!("chaos: kill nats-{i}");
            cluster.servers[i].kill();
            tokio::time::sleep(Duration::from_millis(200 + rng.below(1500))).await;
            cluster.servers[i].restart();
        }
        faults += 1;
    }
    cluster.wait_for_routes();
    let last_fault = tokio::time::Instant::now();
    stop.store(true, Ordering::Relaxed);
    let mut hostile_requests = 0;
    for h in hostile {
        hostile_requests += within("hostile client", h)
            .await
            .expect("a hostile client got a wrong answer");
    }
    let mut models = Vec::new();
    for c in clients {
        models.push(
            within("client", c)
                .await
                .expect("a client found a wrong answer"),
        );
    }

    // The mesh is whole again within a few seconds: every node reaches both owners.
    let gw_now = *gw_addr.lock().expect("lock");
    for addr in [foo.local_addr(), bar.local_addr(), gw_now] {
        let mut c = LineClient::connect(addr).await;
        c.eventually("WHERE apple", "foo\r\nOK\r\n").await;
        c.eventually("WHERE nut", "bar\r\nOK\r\n").await;
    }
    let healed = last_fault.elapsed();
    assert!(
        healed < Duration::from_secs(10),
        "the mesh took {healed:?} to heal"
    );

    // Every acknowledged write is there, from every node.
    let mut checked = 0;
    for (id, model) in models.iter().enumerate() {
        for ((b, k), possible) in model {
            for addr in [foo.local_addr(), bar.local_addr(), gw_now] {
                let mut c = LineClient::connect(addr).await;
                let answer = c
                    .read_after(&format!("GET {} c{id}k{k}", BUCKETS[*b]))
                    .await;
                let v = answer.trim_end_matches("\r\nOK\r\n");
                let got = (!v.is_empty()).then(|| v.to_owned());
                assert!(
                    possible.contains(&got),
                    "c{id}k{k} in {}: {got:?}, model {possible:?}",
                    BUCKETS[*b]
                );
                checked += 1;
            }
        }
    }
    eprintln!(
        "chaos: {faults} faults survived, {} answers ({} explicit errors), {hostile_requests} hostile requests, {checked} reads checked, healed in {healed:?}",
        answers.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed)
    );
    assert!(faults > 0 && answers.load(Ordering::Relaxed) > 100 && hostile_requests > 10);
    foo.shutdown().await;
    bar.shutdown().await;
}
