//! The TCP side of the load generator: a connection to a kvmesh node or to
//! Redis, driven with pipelined requests, every answer checked.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
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
            if let Some((line, used)) = line_at(&self.buf) {
                let len = line.len();
                let mut line = self.buf.split_to(used);
                line.truncate(len);
                return Ok(line);
            }
            self.fill().await?;
        }
    }

    /// The verdict on the next answer (see [`answer`]).
    async fn answer(
        &mut self,
        target: Target,
        get: Option<&[u8]>,
    ) -> Result<Result<(), String>, BenchError> {
        loop {
            if let Some((used, verdict)) = answer(target, &self.buf, get) {
                self.buf.advance(used);
                return Ok(verdict);
            }
            self.fill().await?;
        }
    }

    /// Reads what has arrived (waiting for something).
    async fn fill(&mut self) -> Result<(), BenchError> {
        self.buf.reserve(64 * 1024);
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| BenchError::Setup(format!("read: {e}")))?;
        if n == 0 {
            return Err(BenchError::Setup("the server closed the connection".into()));
        }
        Ok(())
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
            let verdict = conn
                .answer(opts.target, get.then(|| &work.values[i][..]))
                .await
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

/// The line at the start of `buf`: its text without `\r\n`, and the bytes
/// it takes with its end; `None` until its `\n` has arrived.
fn line_at(buf: &[u8]) -> Option<(&[u8], usize)> {
    let i = memchr::memchr(b'\n', buf)?;
    let line = &buf[..i];
    Some((line.strip_suffix(b"\r").unwrap_or(line), i + 1))
}

/// The verdict on the answer at the start of `buf` to a GET (`get` holds the
/// value it may answer) or a PUT, and the bytes the answer takes; `None`
/// while it is incomplete. Both clients, the runtime's and the io_uring
/// one, read answers with this.
pub(super) fn answer(
    target: Target,
    buf: &[u8],
    get: Option<&[u8]>,
) -> Option<(usize, Result<(), String>)> {
    let (first, used) = line_at(buf)?;
    let second = || line_at(&buf[used..]).map(|(line, more)| (line, used + more));
    Some(match target {
        Target::Redis => match get {
            None if first == b"+OK" => (used, Ok(())),
            None => (used, Err(format!("SET answered {:?}", show(first)))),
            Some(_) if first == b"$-1" => (used, Ok(())),
            Some(value) if first.first() == Some(&b'$') => {
                let (body, used) = second()?;
                let verdict = if body == value {
                    Ok(())
                } else {
                    Err(format!(
                        "GET answered {:?}, expected {:?}",
                        show(body),
                        show(value)
                    ))
                };
                (used, verdict)
            }
            Some(_) => (used, Err(format!("GET answered {:?}", show(first)))),
        },
        _ => match get {
            None if first == b"OK" => (used, Ok(())),
            None => (used, Err(format!("PUT answered {:?}", show(first)))),
            Some(_) if first.starts_with(b"ERROR") || first == b"NOT FOUND" => {
                (used, Err(format!("GET answered {:?}", show(first))))
            }
            Some(value) => {
                let (ok, used) = second()?;
                let verdict = if ok == b"OK" && (first.is_empty() || first == value) {
                    Ok(())
                } else {
                    Err(format!(
                        "GET answered {:?} then {:?}, expected {:?}",
                        show(first),
                        show(ok),
                        show(value)
                    ))
                };
                (used, verdict)
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_judged_once_whole() {
        let kv = |buf: &[u8], get: Option<&[u8]>| answer(Target::Kvmesh, buf, get);
        assert_eq!(kv(b"OK\r\nOK\r\n", None), Some((4, Ok(()))));
        assert_eq!(kv(b"OK\r", None), None);
        assert_eq!(kv(b"v1\r\n", Some(b"v1")), None);
        assert_eq!(kv(b"v1\r\nOK\r\n", Some(b"v1")), Some((8, Ok(()))));
        assert_eq!(kv(b"\r\nOK\r\n", Some(b"v1")), Some((6, Ok(()))));
        assert_eq!(
            kv(b"v2\r\nOK\r\n", Some(b"v1")),
            Some((
                8,
                Err(r#"GET answered "v2" then "OK", expected "v1""#.into())
            ))
        );
        assert_eq!(
            kv(b"ERROR unknown bucket\r\n", Some(b"v1")),
            Some((22, Err(r#"GET answered "ERROR unknown bucket""#.into())))
        );
        assert_eq!(
            kv(b"NOT FOUND\r\n", None),
            Some((11, Err(r#"PUT answered "NOT FOUND""#.into())))
        );
        let redis = |buf: &[u8], get: Option<&[u8]>| answer(Target::Redis, buf, get);
        assert_eq!(redis(b"+OK\r\n", None), Some((5, Ok(()))));
        assert_eq!(redis(b"$-1\r\n", Some(b"v1")), Some((5, Ok(()))));
        assert_eq!(redis(b"$2\r\nv1", Some(b"v1")), None);
        assert_eq!(redis(b"$2\r\nv1\r\n+OK", Some(b"v1")), Some((8, Ok(()))));
        assert_eq!(
            redis(b"-ERR wrong\r\n", Some(b"v1")),
            Some((12, Err(r#"GET answered "-ERR wrong""#.into())))
        );
    }
}
