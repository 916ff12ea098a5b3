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

use crate::harness::*;
use crate::model::{self, Model, check_read, refused};
use crate::nats::NatsCluster;

const ROUTES: &[(&str, &str)] = &[("a-m", "foo"), ("n-z", "bar")];
const BUCKETS: [&str; 2] = ["apple", "nut"];

/// The seed (`CHAOS_SEED`, printed for a replay) and the seconds of faults
/// (`CHAOS_SECONDS`, 20 by default).
fn chaos_settings(name: &str) -> (u64, u64) {
    let seed = seed_from_env("CHAOS_SEED");
    let seconds: u64 = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    eprintln!("{name}: CHAOS_SEED={seed} CHAOS_SECONDS={seconds}");
    (seed, seconds)
}

/// Kills one NATS server of the cluster at random, and restarts it a moment
/// later.
async fn kill_a_nats_server(cluster: &mut NatsCluster, rng: &mut XorShift, name: &str) {
    let i = rng.below(3) as usize;
    eprintln!("{name}: kill nats-{i}");
    cluster.servers[i].kill();
    tokio::time::sleep(Duration::from_millis(200 + rng.below(1500))).await;
    cluster.servers[i].restart();
}

/// How many answers the clients got, and how many were explicit errors.
#[derive(Clone)]
struct Counts {
    answers: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

/// One client: PUTs and GETs of its own keys (in both buckets) against the
/// node at `addr` (which may move), checking every GET against a model of
/// what it wrote; returns the model.
async fn client(
    id: u64,
    mut rng: XorShift,
    addr: Arc<Mutex<SocketAddr>>,
    stop: Arc<AtomicBool>,
    counts: Counts,
    pause_on_error: bool,
) -> Model {
    let mut model = Model::new();
    let mut conn = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let addr = *addr.lock().expect("lock");
        let b = rng.below(2) as usize;
        let k = rng.below(20);
        let key = format!("c{id}k{k}");
        let possible = model
            .entry((b, k))
            .or_insert_with(|| BTreeSet::from([None]));
        if rng.below(3) == 0 {
            n += 1;
            let value = format!("v{id}-{n}");
            let answer = ask(
                &mut conn,
                addr,
                &format!("PUT {} {key} {value}", BUCKETS[b]),
            )
            .await;
            let told = match &answer {
                Ok(lines) => lines.concat(),
                Err(()) => "no answer".into(),
            };
            model::note(
                id,
                b,
                k,
                format!("PUT {value} to {addr} at {}: {told:?}", model::clock()),
            );
            match answer {
                Ok(lines) if lines == ["OK\r\n"] => *possible = BTreeSet::from([Some(value)]),
                Ok(lines) if lines.len() == 1 && refused(&lines[0]) => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                    if pause_on_error {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Ok(lines) if lines.len() == 1 && lines[0].starts_with("ERROR ") => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
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
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
                Ok(lines) if lines.len() == 2 && lines[1] == "OK\r\n" => {
                    let who = format!(
                        "client {id}: GET {key} (history: {})",
                        model::history(id, b, k)
                    );
                    check_read(possible, &who, &lines[0]);
                }
                Ok(lines) => panic!("client {id}: GET answered {lines:?}"),
                Err(()) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        counts.answers.fetch_add(1, Ordering::Relaxed);
    }
    model
}

/// Every key of every client's model, read through each of `addrs`, holds a
/// value the model allows; returns how many reads were checked.
async fn verify(models: &[Model], addrs: &[SocketAddr]) -> usize {
    let mut checked = 0;
    for addr in addrs {
        checked += model::verify(models, &BUCKETS, *addr).await;
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_survives_chaos_without_losing_an_acknowledged_write() {
    let _heavy = heavy().await;
    let Some(mut cluster) = NatsCluster::start() else {
        return;
    };
    let (seed, seconds) = chaos_settings("chaos");
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
        let addr = match id % 3 {
            0 => Arc::new(Mutex::new(foo.local_addr())),
            1 => Arc::new(Mutex::new(bar.local_addr())),
            _ => gw_addr.clone(),
        };
        let counts = Counts {
            answers: answers.clone(),
            errors: errors.clone(),
        };
        let rng = XorShift::stream(seed, id);
        clients.push(tokio::spawn(client(
            id,
            rng,
            addr,
            stop.clone(),
            counts,
            false,
        )));
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
            kill_a_nats_server(&mut cluster, &mut rng, "chaos").await;
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
    let models = model::finish(clients).await;

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
    let checked = verify(&models, &[foo.local_addr(), bar.local_addr(), gw_now]).await;
    eprintln!(
        "chaos: {faults} faults survived, {} answers ({} explicit errors), {hostile_requests} hostile requests, {checked} reads checked, healed in {healed:?}",
        answers.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed)
    );
    assert!(faults > 0 && answers.load(Ordering::Relaxed) > 100 && hostile_requests > 10);
    foo.shutdown().await;
    bar.shutdown().await;
}

/// A process of the durable chaos meshes (foo owns a-m, bar n-z): `gw` in
/// memory, owning nothing; foo and bar durable with `replicas`, taking over
/// after one second of silence when they run as several processes.
fn spawn_durable_mesh_process(urls: &str, node: &str, replicas: u32) -> Process {
    spawn_foo_bar_process(
        urls,
        node,
        &[
            ("KVMESH_REQUEST_TIMEOUT_MS", "1500"),
            ("KVMESH_REPLICAS", &replicas.to_string()),
        ],
    )
}

/// Starts a process for each of `names` (the last one `gw`) and creates the
/// buckets through it; the processes and their addresses.
async fn start_durable_mesh(
    urls: &str,
    names: &[&str],
    replicas: u32,
) -> (Vec<Process>, Vec<Arc<Mutex<SocketAddr>>>) {
    let procs: Vec<Process> = names
        .iter()
        .map(|n| spawn_durable_mesh_process(urls, n, replicas))
        .collect();
    let addrs = procs.iter().map(|p| Arc::new(Mutex::new(p.addr))).collect();
    let gw = procs.last().expect("gw").addr;
    let mut setup = LineClient::connect(gw).await;
    for b in BUCKETS {
        setup.eventually(&format!("CREATE {b}"), "OK\r\n").await;
    }
    (procs, addrs)
}

/// Starts `n` checked clients, client `id` on `addrs[id % addrs.len()]`,
/// pausing briefly after an error.
fn start_clients(
    seed: u64,
    addrs: &[Arc<Mutex<SocketAddr>>],
    n: u64,
    stop: &Arc<AtomicBool>,
    counts: &Counts,
) -> Vec<tokio::task::JoinHandle<Model>> {
    (0..n)
        .map(|id| {
            let rng = XorShift::stream(seed, id);
            let addr = addrs[id as usize % addrs.len()].clone();
            tokio::spawn(client(id, rng, addr, stop.clone(), counts.clone(), true))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_mesh_survives_chaos_without_losing_an_acknowledged_write() {
    let _heavy = heavy().await;
    let Some(mut cluster) = NatsCluster::start_jetstream() else {
        return;
    };
    let (seed, seconds) = chaos_settings("durable chaos");
    let urls = cluster.urls();
    // foo and bar own a-m and n-z, durable with three replicas; gw owns
    // nothing. All three are processes, killed (-9) and restarted at random.
    let spawn = |node: &str| spawn_durable_mesh_process(&urls, node, 3);
    let names = ["foo", "bar", "gw"];
    let (mut procs, addrs) = start_durable_mesh(&urls, &names, 3).await;
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Counts {
        answers: Arc::new(AtomicU64::new(0)),
        errors: Arc::new(AtomicU64::new(0)),
    };
    let clients = start_clients(seed, &addrs, 9, &stop, &counts);

    let mut rng = XorShift::new(seed);
    let mut faults = 0;
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(1000))).await;
        if rng.below(2) == 0 {
            let i = rng.below(3) as usize;
            eprintln!("durable chaos: kill -9 {}", names[i]);
            procs[i].kill();
            tokio::time::sleep(Duration::from_millis(200 + rng.below(800))).await;
            // Blocks this (test) thread while the node loads its store; the
            // clients run on the workers.
            procs[i] = spawn(names[i]);
            *addrs[i].lock().expect("lock") = procs[i].addr;
        } else {
            kill_a_nats_server(&mut cluster, &mut rng, "durable chaos").await;
        }
        faults += 1;
    }
    cluster.wait_for_routes();
    stop.store(true, Ordering::Relaxed);
    let models = model::finish(clients).await;
    // Kill both owners once more, with no load: everything acknowledged is
    // read back from JetStream, through every node.
    for i in 0..2 {
        procs[i].kill();
        procs[i] = spawn(names[i]);
    }
    let now: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
    let checked = verify(&models, &now).await;
    eprintln!(
        "durable chaos: {faults} faults survived, {} answers ({} explicit errors), {checked} reads checked",
        counts.answers.load(Ordering::Relaxed),
        counts.errors.load(Ordering::Relaxed)
    );
    assert!(faults > 0 && counts.answers.load(Ordering::Relaxed) > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_nodes_with_standbys_survive_chaos_without_split_brain() {
    failover_chaos("failover chaos", 3).await;
}

/// The same on stores of one replica, whose writes travel one by one, many
/// on their way at once, rather than in atomic batches; a NATS server killed
/// takes the stores it holds away until it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_nodes_with_standbys_on_one_replica_survive_chaos_without_split_brain() {
    failover_chaos("one-replica failover chaos", 1).await;
}

async fn failover_chaos(name: &str, replicas: u32) {
    let _heavy = heavy().await;
    let Some(mut cluster) = NatsCluster::start_jetstream() else {
        return;
    };
    let (seed, seconds) = chaos_settings(name);
    let urls = cluster.urls();
    // foo and bar own a-m and n-z, each as two durable processes (one
    // active, one standby) with `replicas`; gw owns nothing. The durable
    // processes are killed (-9), paused past the failover time and resumed,
    // and restarted at random, and NATS servers are killed too.
    let spawn = |node: &str| spawn_durable_mesh_process(&urls, node, replicas);
    let names = ["foo", "foo", "bar", "bar", "gw"];
    let (mut procs, addrs) = start_durable_mesh(&urls, &names, replicas).await;
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Counts {
        answers: Arc::new(AtomicU64::new(0)),
        errors: Arc::new(AtomicU64::new(0)),
    };
    let clients = start_clients(seed, &addrs, 10, &stop, &counts);

    let mut rng = XorShift::new(seed);
    let (mut kills, mut pauses, mut nats_kills) = (0, 0, 0);
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(1000))).await;
        let i = rng.below(4) as usize;
        match rng.below(5) {
            0 | 1 => {
                eprintln!("{name}: kill -9 {} (process {i})", names[i]);
                procs[i].kill();
                tokio::time::sleep(Duration::from_millis(200 + rng.below(1500))).await;
                procs[i] = spawn(names[i]);
                *addrs[i].lock().expect("lock") = procs[i].addr;
                kills += 1;
            }
            2 | 3 => {
                let pause = 500 + rng.below(2500);
                eprintln!("{name}: SIGSTOP {} (process {i}) for {pause} ms", names[i]);
                procs[i].signal("-STOP");
                tokio::time::sleep(Duration::from_millis(pause)).await;
                procs[i].signal("-CONT");
                pauses += 1;
            }
            _ => {
                kill_a_nats_server(&mut cluster, &mut rng, name).await;
                nats_kills += 1;
            }
        }
    }
    cluster.wait_for_routes();
    // Whole again: each durable node has exactly one active process.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let roles = active_processes(&cluster.servers[0].url()).await;
        if roles == [("bar".to_string(), 1), ("foo".to_string(), 1)] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "active processes per node after the chaos: {roles:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let models = model::finish(clients).await;
    let now: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
    let checked = verify(&models, &now).await;
    eprintln!(
        "{name}: {kills} kills, {pauses} pauses, {nats_kills} NATS servers killed; {} answers ({} explicit errors), {checked} reads checked",
        counts.answers.load(Ordering::Relaxed),
        counts.errors.load(Ordering::Relaxed)
    );
    assert!(counts.answers.load(Ordering::Relaxed) > 100);
}

/// How many processes of each durable node say they are active.
async fn active_processes(url: &str) -> Vec<(String, usize)> {
    let mut active: BTreeMap<String, usize> = BTreeMap::new();
    for metadata in service_metadata(url).await {
        if metadata["role"] == "active" {
            let node = metadata["node"].as_str().unwrap_or("?").to_owned();
            *active.entry(node).or_default() += 1;
        }
    }
    active.into_iter().collect()
}
