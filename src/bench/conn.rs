//! The TCP side of the load generator: a connection to a kvmesh node or to
//! Redis, driven with pipelined requests, every answer checked.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::rng::XorShift;

use super::{BenchError, BenchOptions, ConnResult, Shared, Tally, Target, new_histogram};

/// A client connection with its own line reader.
pub(super) struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    pub(super) async fn connect(addr: &str) -> Result<Self, BenchError> {
        let target: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| BenchError::Setup(format!("cannot resolve {addr}")))?;
        let stream = TcpStream::connect(target)
            .await
            .map_err(|e| BenchError::Setup(format!("cannot connect to {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        Ok(Self {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
        })
    }

    pub(super) async fn send(&mut self, bytes: &[u8]) -> Result<(), BenchError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| BenchError::Setup(format!("write: {e}")))
    }

    /// The next line, without its `\r\n`.
    pub(super) async fn line(&mut self) -> Result<BytesMut, BenchError> {
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf) {
                let mut line = self.buf.split_to(i + 1);
                line.truncate(i);
                if line.last() == Some(&b'\r') {
                    line.truncate(i - 1);
                }
                return Ok(line);
            }
            self.buf.reserve(64 * 1024);
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| BenchError::Setup(format!("read: {e}")))?;
            if n == 0 {
                return Err(BenchError::Setup("the server closed the connection".into()));
            }
        }
    }
}

/// The seed of every connection's request stream: runs are repeatable.
pub(super) const SEED: u64 = 0x2545_F491_4F6C_DD1D;

/// A request: (is it a GET, which bucket-and-key).
pub(super) fn pick(rng: &mut XorShift, opts: &BenchOptions, n: usize) -> (bool, usize) {
    let get = rng.below(100) < u64::from(opts.get_percent);
    (get, rng.below(n as u64) as usize)
}

pub(super) async fn connection(shared: Arc<Shared>, addr: String, id: u64) -> ConnResult {
    let opts = &shared.opts;
    let work = &shared.work;
    let mut conn = Conn::connect(&addr).await.map_err(|e| e.to_string())?;
    let mut rng = XorShift::stream(SEED, id);
    let mut hist = new_histogram();
    let mut first_error = None;
    let mut batch = Vec::new();
    let mut sent = Vec::with_capacity(opts.pipeline);
    let mut tally = Tally::default();
    let err = |e: BenchError| e.to_string();
    loop {
        let granted = shared.grant(opts.pipeline as u64);
        if granted == 0 {
            break;
        }
        batch.clear();
        sent.clear();
        for _ in 0..granted {
            let (get, i) = pick(&mut rng, opts, work.values.len());
            batch.extend_from_slice(if get { &work.gets[i] } else { &work.puts[i] });
            sent.push((get, i));
        }
        let start = Instant::now();
        conn.send(&batch).await.map_err(err)?;
        for &(get, i) in &sent {
            let verdict = match opts.target {
                Target::Redis => check_redis(&mut conn, get.then(|| &work.values[i][..])).await,
                _ => check_kvmesh(&mut conn, get.then(|| &work.values[i][..])).await,
            }
            .map_err(err)?;
            let _ = hist.record((start.elapsed().as_micros() as u64).max(1));
            tally.count(verdict, &mut first_error);
        }
        shared.settle(&mut tally);
    }
    Ok((hist, first_error))
}

/// An answer's bytes, readable in an error message.
fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Reads a kvmesh answer: `OK` for a PUT; the value (or nothing) then `OK` for a GET.
async fn check_kvmesh(
    conn: &mut Conn,
    get: Option<&[u8]>,
) -> Result<Result<(), String>, BenchError> {
    let first = conn.line().await?;
    Ok(match get {
        None if &first[..] == b"OK" => Ok(()),
        None => Err(format!("PUT answered {:?}", show(&first))),
        Some(_) if first.starts_with(b"ERROR") || &first[..] == b"NOT FOUND" => {
            Err(format!("GET answered {:?}", show(&first)))
        }
        Some(value) => {
            let second = conn.line().await?;
            if &second[..] == b"OK" && (first.is_empty() || &first[..] == value) {
                Ok(())
            } else {
                Err(format!(
                    "GET answered {:?} then {:?}, expected {:?}",
                    show(&first),
                    show(&second),
                    show(value)
                ))
            }
        }
    })
}

/// Reads a RESP answer: `+OK` for SET; a bulk string (or nil) for GET.
async fn check_redis(
    conn: &mut Conn,
    get: Option<&[u8]>,
) -> Result<Result<(), String>, BenchError> {
    let first = conn.line().await?;
    Ok(match get {
        None if &first[..] == b"+OK" => Ok(()),
        None => Err(format!("SET answered {:?}", show(&first))),
        Some(_) if &first[..] == b"$-1" => Ok(()),
        Some(value) if first.first() == Some(&b'$') => {
            let body = conn.line().await?;
            if &body[..] == value {
                Ok(())
            } else {
                Err(format!(
                    "GET answered {:?}, expected {:?}",
                    show(&body),
                    show(value)
                ))
            }
        }
        Some(_) => Err(format!("GET answered {:?}", show(&first))),
    })
}
