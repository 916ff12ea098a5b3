//! `kvmesh bench`: a load generator that drives kvmesh nodes (or, for
//! comparison, Redis over RESP or a bare NATS request/reply responder) and
//! checks every answer.
//!
//! Every PUT of a key writes the same value (derived from the key), so a GET must
//! answer either that value or, before the key was ever written, nothing; any
//! other answer counts as an error. A benchmark that accepted wrong answers would
//! measure nothing. Requests are prepared before the run, so the client spends
//! its time on sockets, not on formatting.
//!
//! This file is the run itself, read top to bottom: the options, the
//! workload prepared from them, the run and its report (a little over 400
//! lines, kept together because they are one flow). The connections that
//! drive a target are in [`conn`] (kvmesh, Redis) and [`nats`] (the raw NATS
//! yardstick).

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::command::Command;
use crate::{protocol, wire};

mod conn;
mod nats;
#[cfg(all(target_os = "linux", feature = "uring"))]
mod uring;

use conn::{Conn, connection};
pub use nats::respond;
use nats::{jetstream_requester, jetstream_setup, nats_requester, nats_responder};

/// What is being measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// kvmesh nodes over the text protocol.
    Kvmesh,
    /// Redis over RESP; bucket `b` and key `k` become the Redis key `b:k`.
    Redis,
    /// Raw NATS request/reply against a responder the benchmark runs itself:
    /// the floor of one routed request.
    Nats,
    /// A JetStream key-value client on the KV bucket `kvmesh_bench` (made
    /// afresh; bucket `b` and key `k` become the KV key `b.k`): what a user
    /// would pick instead of a durable kvmesh node.
    Jetstream,
}

/// How the TCP connections (kvmesh, Redis) are driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientIo {
    /// From io_uring rings, one thread per two cores (Linux, feature
    /// `uring`); the runtime drives them where io_uring is refused.
    Uring,
    /// By the async runtime, a task per group of connections.
    Runtime,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// What to drive.
    pub target: Target,
    /// Addresses (`host:port`; a NATS URL for [`Target::Nats`]); connections are
    /// spread over them in turn.
    pub addrs: Vec<String>,
    /// Connections (for NATS: concurrent requesters on one connection).
    pub conns: usize,
    /// Requests in flight per connection.
    pub pipeline: usize,
    /// Stop after this many requests in all ...
    pub requests: Option<u64>,
    /// ... or after this long.
    pub duration: Option<Duration>,
    /// Share of GETs in percent; the rest are PUTs.
    pub get_percent: u32,
    /// Buckets to spread keys over (created before the run).
    pub buckets: Vec<String>,
    /// Distinct keys per bucket.
    pub keys: u64,
    /// Bytes per value.
    pub value_size: usize,
    /// Write every key once before measuring.
    pub prefill: bool,
    /// For [`Target::Nats`]: the subject of a responder running in its own
    /// process (`kvmesh bench --target nats --respond`); without it the
    /// benchmark answers in-process.
    pub subject: Option<String>,
    /// How TCP connections are driven.
    pub io: ClientIo,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Requests answered correctly.
    pub ok: u64,
    /// Requests answered with an error or a wrong value.
    pub errors: u64,
    /// Seconds from the first request to the last answer.
    pub seconds: f64,
    /// Correct answers per second.
    pub requests_per_sec: f64,
    /// Latency percentiles, microseconds.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest request.
    pub max_us: u64,
    /// CPU the benchmark itself used, in percent of one core, by the
    /// scheduler's count (`/proc/self/stat`). Beside a server that wakes it
    /// from inside one long system call (an io_uring loop's batch of sends)
    /// that count also holds some of the server's time; `perf stat -e
    /// task-clock` counts exactly (`scripts/bench` uses it where it can).
    pub client_cpu_percent: f64,
    /// The first wrong answer seen, if any.
    pub first_error: Option<String>,
    /// What drove the connections: `uring`, `runtime` (TCP targets), or
    /// `nats` (the NATS targets' requesters on the runtime).
    pub client: &'static str,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} requests in {:.2} s: {:.0} requests/s, {} errors",
            self.ok, self.seconds, self.requests_per_sec, self.errors
        )?;
        writeln!(
            f,
            "latency us: p50 {} p90 {} p99 {} p99.9 {} max {}",
            self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us
        )?;
        write!(
            f,
            "client CPU: {:.0}% of one core ({} client)",
            self.client_cpu_percent, self.client
        )?;
        if let Some(e) = &self.first_error {
            write!(f, "\nfirst error: {e}")?;
        }
        Ok(())
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A node could not be reached or answered setup wrongly.
    #[error("{0}")]
    Setup(String),
}

/// The requests of a run, prepared once: for every bucket and key, the bytes of
/// a GET and a PUT and the value a GET must find.
struct Workload {
    gets: Vec<Vec<u8>>,
    puts: Vec<Vec<u8>>,
    values: Vec<Vec<u8>>,
}

impl Workload {
    fn new(opts: &BenchOptions) -> Self {
        let n = opts.buckets.len() * opts.keys as usize;
        let mut w = Workload {
            gets: Vec::with_capacity(n),
            puts: Vec::with_capacity(n),
            values: Vec::with_capacity(n),
        };
        for bucket in &opts.buckets {
            for k in 0..opts.keys {
                let key = format!("k{k}");
                let value = value_for(&key, opts.value_size);
                match opts.target {
                    Target::Kvmesh => {
                        let get = Command::Get { bucket, key: &key };
                        let put = Command::Put {
                            bucket,
                            key: &key,
                            value: &value,
                        };
                        let (mut g, mut p) = (Vec::new(), Vec::new());
                        protocol::write_request(&mut g, &get);
                        protocol::write_request(&mut p, &put);
                        w.gets.push(g);
                        w.puts.push(p);
                    }
                    Target::Redis => {
                        let rkey = format!("{bucket}:{key}");
                        w.gets.push(resp(&["GET", &rkey]));
                        w.puts.push(resp(&["SET", &rkey, &value]));
                    }
                    Target::Jetstream => {
                        // The KV key, and the value to put.
                        w.gets.push(format!("{bucket}.{key}").into_bytes());
                        w.puts.push(value.clone().into_bytes());
                    }
                    Target::Nats => {
                        w.gets
                            .push(wire::encode_request(&Command::Get { bucket, key: &key }));
                        let put = Command::Put {
                            bucket,
                            key: &key,
                            value: &value,
                        };
                        w.puts.push(wire::encode_request(&put));
                    }
                }
                w.values.push(value.into_bytes());
            }
        }
        w
    }
}

/// A RESP array of bulk strings.
fn resp(words: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", words.len()).into_bytes();
    for w in words {
        out.extend_from_slice(format!("${}\r\n{w}\r\n", w.len()).as_bytes());
    }
    out
}

/// The value every PUT of `key` writes.
fn value_for(key: &str, size: usize) -> String {
    let mut v = String::with_capacity(size + key.len());
    while v.len() < size {
        v.push_str(key);
        v.push('.');
    }
    v.truncate(size.max(1));
    v
}

struct Shared {
    opts: BenchOptions,
    work: Workload,
    budget: AtomicU64,
    done: AtomicBool,
    ok: AtomicU64,
    errors: AtomicU64,
}

impl Shared {
    /// Takes up to `want` requests from the budget (no shared write when the
    /// run is timed rather than counted).
    fn grant(&self, want: u64) -> u64 {
        if self.done.load(Ordering::Relaxed) {
            return 0;
        }
        if self.opts.requests.is_none() {
            return want;
        }
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(want))
            })
            .unwrap_or(0)
            .min(want)
    }

    /// Adds a connection's counts since the last call to the totals: once per
    /// batch, not per request, so that connections on different threads do not
    /// take the counters' cache line from each other at every answer.
    fn settle(&self, tally: &mut Tally) {
        if tally.ok > 0 {
            self.ok.fetch_add(tally.ok, Ordering::Relaxed);
        }
        if tally.errors > 0 {
            self.errors.fetch_add(tally.errors, Ordering::Relaxed);
        }
        tally.ok = 0;
        tally.errors = 0;
    }
}

/// One connection's counts, not yet added to the totals.
#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
}

impl Tally {
    fn count(&mut self, verdict: Result<(), String>, first_error: &mut Option<String>) {
        match verdict {
            Ok(()) => self.ok += 1,
            Err(e) => {
                first_error.get_or_insert(e);
                self.errors += 1;
            }
        }
    }
}

type ConnResult = Result<(Histogram<u64>, Option<String>), String>;

/// Runs the benchmark and reports.
pub async fn run(opts: BenchOptions) -> Result<BenchReport, BenchError> {
    if opts.addrs.is_empty() || opts.buckets.is_empty() || opts.conns == 0 || opts.keys == 0 {
        return Err(BenchError::Setup(
            "need an address, a bucket, a connection and a key".into(),
        ));
    }
    let work = Workload::new(&opts);
    let mut kv = None;
    let nats = match opts.target {
        Target::Nats => Some(match &opts.subject {
            Some(subject) => (nats::connect(&opts.addrs[0]).await?, subject.clone()),
            None => nats_responder(&opts.addrs[0], &opts).await?,
        }),
        Target::Jetstream => {
            kv = Some(jetstream_setup(&opts.addrs[0], &opts, &work).await?);
            None
        }
        _ => {
            setup(&opts, &work).await?;
            None
        }
    };
    let shared = Arc::new(Shared {
        budget: AtomicU64::new(opts.requests.unwrap_or(u64::MAX)),
        opts: opts.clone(),
        work,
        done: AtomicBool::new(false),
        ok: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    // Each task drives one or more connections and gives back their results.
    let mut client = match opts.target {
        Target::Nats | Target::Jetstream => "nats",
        Target::Kvmesh | Target::Redis => "uring",
    };
    let tasks = match (&nats, &kv) {
        (Some((client, subject)), _) => one_task_each(opts.conns, |id| {
            nats_requester(shared.clone(), client.clone(), subject.clone(), id)
        }),
        (None, Some(kv)) => one_task_each(opts.conns, |id| {
            jetstream_requester(shared.clone(), kv.clone(), id)
        }),
        (None, None) => match opts.io {
            ClientIo::Uring => uring_threads(&shared).unwrap_or_else(|| {
                client = "runtime";
                connection_groups(&shared)
            }),
            ClientIo::Runtime => {
                client = "runtime";
                connection_groups(&shared)
            }
        },
    };
    let progress = std::io::stderr().is_terminal().then(|| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = shared.ok.load(Ordering::Relaxed);
                eprintln!(
                    "{} requests/s, {} errors",
                    now - last,
                    shared.errors.load(Ordering::Relaxed)
                );
                last = now;
            }
        })
    });
    if let Some(d) = opts.duration {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            shared.done.store(true, Ordering::Relaxed);
        });
    }
    let mut hist = new_histogram();
    let mut first_error = None;
    for task in tasks {
        let results = task
            .await
            .unwrap_or_else(|e| vec![Err(format!("connection task failed: {e}"))]);
        for result in results {
            match result {
                Ok((h, err)) => {
                    let _ = hist.add(&h);
                    first_error = first_error.or(err);
                }
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
    }
    if let Some(p) = progress {
        p.abort();
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds().zip(cpu_before).map(|(a, b)| a - b);
    let ok = shared.ok.load(Ordering::Relaxed);
    Ok(BenchReport {
        ok,
        errors: shared.errors.load(Ordering::Relaxed),
        seconds,
        requests_per_sec: ok as f64 / seconds,
        p50_us: hist.value_at_quantile(0.5),
        p90_us: hist.value_at_quantile(0.9),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
        client_cpu_percent: cpu.map(|c| 100.0 * c / seconds).unwrap_or(0.0),
        first_error,
        client,
    })
}

/// Starts `count` requesters (NATS, JetStream), a task each.
fn one_task_each<F>(
    count: usize,
    requester: impl Fn(u64) -> F,
) -> Vec<tokio::task::JoinHandle<Vec<ConnResult>>>
where
    F: Future<Output = ConnResult> + Send + 'static,
{
    (0..count as u64)
        .map(|id| {
            let running = requester(id);
            tokio::spawn(async move { vec![running.await] })
        })
        .collect()
}

/// Starts the TCP connections in groups: a few tasks, each driving its
/// share of the connections and running each one as its answer comes.
/// With one task per connection, 1,000 connections woken at once overflow
/// the runtime's per-thread queues, and those that spill into its global
/// queue wait there behind newer ones: that, not the server, set the p99.
/// With a handful of tasks nothing spills, and a thread the OS puts aside
/// still has its tasks taken over by the other threads. No task drives more
/// than [`CONNS_PER_GROUP`] connections, though (see there).
fn connection_groups(shared: &Arc<Shared>) -> Vec<tokio::task::JoinHandle<Vec<ConnResult>>> {
    let opts = &shared.opts;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let count = group_count(cores, opts.conns);
    (0..count)
        .map(|g| {
            let shared = shared.clone();
            tokio::spawn(async move {
                let opts = &shared.opts;
                let mut running: FuturesUnordered<_> = (g..opts.conns)
                    .step_by(count)
                    .map(|i| {
                        let addr = opts.addrs[i % opts.addrs.len()].clone();
                        connection(shared.clone(), addr, i as u64)
                    })
                    .collect();
                let mut finished = Vec::with_capacity(running.len());
                while let Some(result) = running.next().await {
                    finished.push(result);
                }
                finished
            })
        })
        .collect()
}

/// Starts the io_uring client's threads, one per two cores (and no more
/// than there are connections), each driving every so-many-th connection;
/// `None` where io_uring is refused.
#[cfg(all(target_os = "linux", feature = "uring"))]
fn uring_threads(shared: &Arc<Shared>) -> Option<Vec<tokio::task::JoinHandle<Vec<ConnResult>>>> {
    let conns = shared.opts.conns;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = (cores / 2).clamp(1, conns);
    // A ring belongs to the thread that submits to it; one made here tells
    // whether this kernel allows it.
    if let Err(e) = uring::ring(1) {
        eprintln!("kvmesh bench: io_uring refused ({e}); the async runtime drives the connections");
        return None;
    }
    let handles = (0..threads)
        .map(|t| {
            let shared = shared.clone();
            let ids: Vec<usize> = (t..conns).step_by(threads).collect();
            tokio::task::spawn_blocking(move || match uring::ring(ids.len()) {
                Ok(ring) => uring::drive(&shared, ring, ids),
                Err(e) => vec![Err(format!("io_uring: {e}"))],
            })
        })
        .collect();
    Some(handles)
}

#[cfg(not(all(target_os = "linux", feature = "uring")))]
fn uring_threads(_: &Arc<Shared>) -> Option<Vec<tokio::task::JoinHandle<Vec<ConnResult>>>> {
    None
}

/// How many tasks drive `conns` TCP connections on `cores` cores: a few
/// per core, more when they would drive more than [`CONNS_PER_GROUP`] each,
/// and never more than there are connections.
fn group_count(cores: usize, conns: usize) -> usize {
    (cores * GROUPS_PER_CORE)
        .max(conns.div_ceil(CONNS_PER_GROUP))
        .min(conns)
}

/// Tasks per core that drive TCP connections (see [`connection_groups`]).
const GROUPS_PER_CORE: usize = 4;

/// The most connections one task drives. Each time the runtime runs a task
/// it lets it make 128 socket operations (its cooperative budget); a request
/// takes two, its write and its read. A task with more connections ready
/// than that allows stops partway, and the rest of its answers wait, already
/// arrived, until every other task has had its turn, which inflates the p99
/// of a server that answers many connections at once (README, Performance).
/// 32 leaves room for answers read in parts.
const CONNS_PER_GROUP: usize = 32;

fn new_histogram() -> Histogram<u64> {
    // 1 us to 100 s at 3 significant digits (larger values are clamped).
    // Constant bounds that hdrhistogram accepts: this cannot fail.
    #[allow(clippy::expect_used)]
    let mut h = Histogram::new_with_bounds(1, 100_000_000, 3).expect("constant bounds are valid");
    h.auto(true);
    h
}

/// User plus system CPU time of this process, from `/proc/self/stat`.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // Linux reports in USER_HZ, 100 per second on every common build.
    Some(ticks / 100.0)
}

/// Creates the buckets and, with `prefill`, writes every key once.
async fn setup(opts: &BenchOptions, work: &Workload) -> Result<(), BenchError> {
    let mut conn = Conn::connect(&opts.addrs[0]).await?;
    if opts.target == Target::Kvmesh {
        for bucket in &opts.buckets {
            conn.send(format!("CREATE {bucket}\r\n").as_bytes()).await?;
            let line = conn.line().await?;
            if &line[..] != b"OK" {
                return Err(BenchError::Setup(format!(
                    "CREATE {bucket} answered {:?}",
                    String::from_utf8_lossy(&line)
                )));
            }
        }
    }
    if opts.prefill {
        for chunk in work.puts.chunks(512) {
            conn.send(&chunk.concat()).await?;
            for _ in chunk {
                let line = conn.line().await?;
                if &line[..] != b"OK" && &line[..] != b"+OK" {
                    return Err(BenchError::Setup(format!(
                        "prefill PUT answered {:?}",
                        String::from_utf8_lossy(&line)
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Parses `get=80,put=20` into the share of GETs.
pub fn parse_mix(mix: &str) -> Result<u32, String> {
    let (mut get, mut put) = (None, None);
    for part in mix.split(',') {
        let (op, share) = part
            .split_once('=')
            .ok_or_else(|| format!("bad mix part {part:?}: use op=percent"))?;
        let share: u32 = share
            .trim()
            .parse()
            .map_err(|_| format!("bad percentage in {part:?}"))?;
        match op.trim() {
            "get" => get = Some(share),
            "put" => put = Some(share),
            other => {
                return Err(format!(
                    "unknown operation {other:?} in mix: use get and put"
                ));
            }
        }
    }
    let (get, put) = match (get, put) {
        (Some(g), Some(p)) => (g, p),
        (Some(g), None) => (g, 100u32.saturating_sub(g)),
        (None, Some(p)) => (100u32.saturating_sub(p), p),
        (None, None) => return Err("empty mix".into()),
    };
    if get + put != 100 {
        return Err(format!("mix shares add up to {}, not 100", get + put));
    }
    Ok(get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_task_drives_more_connections_than_its_budget_allows() {
        for cores in [1, 2, 8] {
            for conns in [1, 3, 50, 100, 101, 257, 1_000, 10_000] {
                let tasks = group_count(cores, conns);
                assert!((1..=conns).contains(&tasks), "{tasks} tasks for {conns}");
                // Connections are dealt round-robin: the largest share.
                let most = conns.div_ceil(tasks);
                assert!(most <= CONNS_PER_GROUP, "{most} connections in one task");
            }
        }
        // A few tasks per core while they stay small; more when they would not.
        assert_eq!(group_count(2, 50), 8);
        assert_eq!(group_count(2, 1_000), 32);
    }
}
