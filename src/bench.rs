//! `kvmesh bench`: a load generator that drives one or more nodes over the text
//! protocol and checks every answer.
//!
//! Every PUT of a key writes the same value (derived from the key), so a GET must
//! answer either that value or, before the key was ever written, an empty line;
//! anything else counts as a wrong answer. A benchmark that accepted wrong
//! answers would measure nothing.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Nodes to connect to; connections are spread over them in turn.
    pub addrs: Vec<SocketAddr>,
    /// Connections.
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
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Requests answered correctly.
    pub ok: u64,
    /// Requests answered with an `ERROR` line or a wrong value.
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
    /// The first wrong answer seen, if any.
    pub first_error: Option<String>,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} requests in {:.2} s: {:.0} requests/s, {} errors",
            self.ok, self.seconds, self.requests_per_sec, self.errors
        )?;
        write!(
            f,
            "latency us: p50 {} p90 {} p99 {} p99.9 {} max {}",
            self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us
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

struct Shared {
    opts: BenchOptions,
    budget: AtomicU64,
    done: AtomicBool,
    ok: AtomicU64,
    errors: AtomicU64,
}

/// Runs the benchmark and reports.
pub async fn run(opts: BenchOptions) -> Result<BenchReport, BenchError> {
    if opts.addrs.is_empty() || opts.buckets.is_empty() || opts.conns == 0 || opts.keys == 0 {
        return Err(BenchError::Setup(
            "need an address, a bucket, a connection and a key".into(),
        ));
    }
    setup(&opts).await?;
    let shared = Arc::new(Shared {
        budget: AtomicU64::new(opts.requests.unwrap_or(u64::MAX)),
        opts: opts.clone(),
        done: AtomicBool::new(false),
        ok: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(opts.conns);
    for i in 0..opts.conns {
        let shared = shared.clone();
        let addr = opts.addrs[i % opts.addrs.len()];
        tasks.push(tokio::spawn(connection(shared, addr, i as u64)));
    }
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
        match task.await {
            Ok(Ok((h, err))) => {
                let _ = hist.add(&h);
                first_error = first_error.or(err);
            }
            Ok(Err(e)) => first_error = first_error.or(Some(e)),
            Err(e) => first_error = first_error.or(Some(format!("connection task failed: {e}"))),
        }
    }
    if let Some(p) = progress {
        p.abort();
    }
    let seconds = started.elapsed().as_secs_f64();
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
        first_error,
    })
}

fn new_histogram() -> Histogram<u64> {
    // 1 us to 100 s at 3 significant digits (values past the top are clamped).
    let mut h = Histogram::new_with_bounds(1, 100_000_000, 3).expect("constant bounds are valid");
    h.auto(true);
    h
}

/// The value every PUT of `key` writes.
fn value_for(key: &str, size: usize) -> String {
    let mut v = String::with_capacity(size);
    while v.len() < size {
        v.push_str(key);
        v.push('.');
    }
    v.truncate(size.max(1));
    v
}

/// Creates the buckets and, with `prefill`, writes every key once.
async fn setup(opts: &BenchOptions) -> Result<(), BenchError> {
    let mut conn = Conn::connect(opts.addrs[0]).await?;
    for bucket in &opts.buckets {
        conn.send(format!("CREATE {bucket}\r\n").as_bytes()).await?;
        conn.expect_line("OK").await?;
    }
    if opts.prefill {
        for bucket in &opts.buckets {
            for chunk in (0..opts.keys).collect::<Vec<_>>().chunks(256) {
                let mut batch = String::new();
                for k in chunk {
                    let key = format!("k{k}");
                    batch.push_str(&format!(
                        "PUT {bucket} {key} {}\r\n",
                        value_for(&key, opts.value_size)
                    ));
                }
                conn.send(batch.as_bytes()).await?;
                for _ in chunk {
                    conn.expect_line("OK").await?;
                }
            }
        }
    }
    Ok(())
}

struct Conn {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    line: String,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Result<Self, BenchError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| BenchError::Setup(format!("cannot connect to {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        Ok(Self {
            reader: BufReader::with_capacity(64 * 1024, r),
            writer: w,
            line: String::new(),
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), BenchError> {
        self.writer
            .write_all(bytes)
            .await
            .map_err(|e| BenchError::Setup(format!("write: {e}")))
    }

    /// The next line, without its `\r\n`.
    async fn read_line(&mut self) -> Result<&str, BenchError> {
        self.line.clear();
        let n = self
            .reader
            .read_line(&mut self.line)
            .await
            .map_err(|e| BenchError::Setup(format!("read: {e}")))?;
        if n == 0 {
            return Err(BenchError::Setup("the node closed the connection".into()));
        }
        Ok(self.line.trim_end_matches(['\r', '\n']))
    }

    async fn expect_line(&mut self, want: &str) -> Result<(), BenchError> {
        let got = self.read_line().await?;
        if got == want {
            Ok(())
        } else {
            Err(BenchError::Setup(format!("expected {want:?}, got {got:?}")))
        }
    }
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

/// A small, fast, seedable generator; statistical quality is not needed here.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

enum Sent {
    Get(String),
    Put,
}

async fn connection(
    shared: Arc<Shared>,
    addr: SocketAddr,
    id: u64,
) -> Result<(Histogram<u64>, Option<String>), String> {
    let opts = &shared.opts;
    let mut conn = Conn::connect(addr).await.map_err(|e| e.to_string())?;
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (id + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut hist = new_histogram();
    let mut first_error = None;
    let mut batch = String::new();
    let mut sent = Vec::with_capacity(opts.pipeline);
    loop {
        if shared.done.load(Ordering::Relaxed) {
            break;
        }
        let want = opts.pipeline as u64;
        let granted = shared
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(want))
            })
            .unwrap_or(0)
            .min(want);
        if granted == 0 {
            break;
        }
        batch.clear();
        sent.clear();
        for _ in 0..granted {
            let bucket = &opts.buckets[(rng.next() % opts.buckets.len() as u64) as usize];
            let key = format!("k{}", rng.next() % opts.keys);
            let value = value_for(&key, opts.value_size);
            if (rng.next() % 100) < u64::from(opts.get_percent) {
                batch.push_str(&format!("GET {bucket} {key}\r\n"));
                sent.push(Sent::Get(value));
            } else {
                batch.push_str(&format!("PUT {bucket} {key} {value}\r\n"));
                sent.push(Sent::Put);
            }
        }
        let start = Instant::now();
        conn.send(batch.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        for request in &sent {
            let first = conn
                .read_line()
                .await
                .map_err(|e| e.to_string())?
                .to_owned();
            let verdict = match request {
                Sent::Put if first == "OK" => Ok(()),
                Sent::Put => Err(first),
                Sent::Get(_) if first.starts_with("ERROR") || first == "NOT FOUND" => Err(first),
                Sent::Get(value) => {
                    let second = conn.read_line().await.map_err(|e| e.to_string())?;
                    if second == "OK" && (first.is_empty() || first == *value) {
                        Ok(())
                    } else {
                        Err(format!(
                            "GET answered {first:?} then {second:?}, expected {value:?}"
                        ))
                    }
                }
            };
            let micros = start.elapsed().as_micros() as u64;
            let _ = hist.record(micros.max(1));
            match verdict {
                Ok(()) => shared.ok.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    first_error.get_or_insert(e);
                    shared.errors.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    }
    Ok((hist, first_error))
}
