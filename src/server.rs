//! The TCP side: the accept loop, the connection limit, line framing, and
//! pipelined answers written back in request order.
//!
//! A connection is one loop that takes input, answers it and writes. Local
//! commands are answered at once, into the bytes of their read; commands for
//! other nodes are gathered per owner and published at the end of the read,
//! several in one NATS message when a client pipelines, so that pipelined
//! remote requests travel side by side and cost one round trip. Answers go
//! out in request order, one write for all that a read made ready. A bound on
//! what is owed and unwritten is the backpressure: a client that never reads
//! stops being read.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use futures_util::FutureExt;
use futures_util::future::Shared;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, warn};

use crate::command::{Command, Limits, Reply};
use crate::error::KvError;

use crate::mesh::MAX_BATCH;
use crate::protocol::{self, LineError, Request};
use crate::registry::BucketCache;
use crate::router::{Router, Target};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;
/// A chunk of ready answers joins the connection's queue once it grows past this.
const CHUNK_BYTES: usize = 16 * 1024;
/// Answers are written into blocks of this size, a read's worth at a time...
const OUT_BLOCK: usize = 4096;
/// ...and a new block starts when less than this is left of the last one.
const OUT_MIN_ROOM: usize = 512;
/// Answers (chunks or remote requests) owed per connection before it stops
/// taking input: the bound on a connection's pipelined work.
const QUEUE_DEPTH: usize = 64;
/// Bytes of answers owed (formatted, not yet written) before a connection
/// stops taking input. One answer may take it past the bound (a value is at
/// most `max_value_bytes`), so a connection holds at most this plus one value.
const OUT_LIMIT: usize = 256 * 1024;

/// Input read after a shutdown began, to answer what clients sent before it.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

/// What the TCP front end needs to know besides the router.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Longest line, without its terminator.
    pub max_line_bytes: usize,
    /// Most connections served at once.
    pub max_connections: usize,
    /// How long a connection may send nothing before it is closed.
    pub idle_timeout: Option<Duration>,
    /// Name and value limits.
    pub limits: Limits,
}

/// Accepts connections until `shutdown` is cancelled; each connection is a task
/// on `tracker`, so the caller can wait for the requests in flight.
pub async fn run(
    listener: TcpListener,
    router: Arc<Router>,
    limits: ServerLimits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(err) => {
                // Usually out of file descriptors: back off instead of spinning.
                warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let router = router.clone();
                let shutdown = shutdown.clone();
                // A debug span: at the default level it is off, and entering
                // it on every poll costs nothing.
                let span = debug_span!("conn", %peer);
                tracker.spawn(
                    async move {
                        serve(stream, peer, &router, limits, shutdown).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(_) => {
                debug!(%peer, "refused: too many connections");
                tracker.spawn(refuse(stream));
            }
        }
    }
    debug!("stopped accepting");
}

/// Tells a connection over the limit why it is closed.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(protocol::TOO_MANY_CONNECTIONS).await?;
        stream.shutdown().await
    })
    .await;
}

/// The answers of a batch of commands forwarded together, shared by the
/// queue items that read them.
type BatchAnswers = Shared<Pin<Box<dyn Future<Output = Arc<Vec<Result<Reply, KvError>>>> + Send>>>;

/// One item of a connection's answer queue, in request order.
enum Pending {
    /// Answers already formatted.
    Ready(BytesMut),
    /// The answer of a command forwarded to another node: item `index` of a batch.
    Remote(BatchAnswers, usize),
}

/// What one read's worth of requests produced, before it joins the connection's queue:
/// local answers, and remote commands grouped by owner. Requests for one owner
/// keep their order inside its batch, and batches are published in the order
/// they began, so every request still takes effect after the one before it on
/// the same node.
struct Chunk {
    out: BytesMut,
    items: Vec<ChunkItem>,
    /// Bytes of the `Ready` items.
    held: usize,
    batches: Vec<(String, Vec<Command>)>,
}

enum ChunkItem {
    Ready(BytesMut),
    Remote { batch: usize, index: usize },
}

impl Chunk {
    fn new() -> Self {
        Self {
            out: BytesMut::new(),
            items: Vec::new(),
            held: 0,
            batches: Vec::new(),
        }
    }

    /// The answers written so far. The rest of the buffer stays for the next
    /// ones (both share one allocation), so answering a read costs no
    /// allocation of its own: a new block comes only every few kilobytes.
    fn take_out(&mut self) -> BytesMut {
        let ready = self.out.split();
        if self.out.capacity() < OUT_MIN_ROOM {
            self.out.reserve(OUT_BLOCK);
        }
        ready
    }

    /// Adds a command for another node; true when its batch is full.
    fn forward(&mut self, owner: &str, command: Command) -> bool {
        if !self.out.is_empty() {
            let ready = self.take_out();
            self.held += ready.len();
            self.items.push(ChunkItem::Ready(ready));
        }
        let batch = match self.batches.iter().position(|(o, _)| o == owner) {
            Some(b) => b,
            None => {
                self.batches.push((owner.to_owned(), Vec::new()));
                self.batches.len() - 1
            }
        };
        let commands = &mut self.batches[batch].1;
        commands.push(command);
        self.items.push(ChunkItem::Remote {
            batch,
            index: commands.len() - 1,
        });
        commands.len() >= MAX_BATCH
    }

    /// Bytes of answers formatted here.
    fn bytes(&self) -> usize {
        self.held + self.out.len()
    }

    /// Publishes the batches and adds everything to the connection's queue,
    /// in order.
    async fn flush(&mut self, router: &Router, queue: &mut Answers) {
        let mut answers = Vec::with_capacity(self.batches.len());
        for (owner, commands) in self.batches.drain(..) {
            answers.push(forward(router, &owner, commands).await);
        }
        self.held = 0;
        for item in self.items.drain(..) {
            queue.push(match item {
                ChunkItem::Ready(bytes) => Pending::Ready(bytes),
                ChunkItem::Remote { batch, index } => {
                    Pending::Remote(answers[batch].clone(), index)
                }
            });
        }
        if !self.out.is_empty() {
            let ready = self.take_out();
            queue.push(Pending::Ready(ready));
        }
    }
}

/// The answers a connection owes, in request order, and how many bytes of
/// them are formatted already.
#[derive(Default)]
struct Answers {
    items: VecDeque<Pending>,
    bytes: usize,
}

impl Answers {
    fn push(&mut self, item: Pending) {
        if let Pending::Ready(bytes) = &item {
            self.bytes += bytes.len();
        }
        self.items.push_back(item);
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Queues one owner's commands for forwarding (in order) and returns their
/// answers to come.
async fn forward(router: &Router, owner: &str, commands: Vec<Command>) -> BatchAnswers {
    let answers = router.forward(owner, commands, 0).await;
    let answers: Pin<Box<dyn Future<Output = _> + Send>> =
        Box::pin(async move { Arc::new(answers.await) });
    answers.shared()
}

async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    router: &Arc<Router>,
    limits: ServerLimits,
    shutdown: CancellationToken,
) {
    debug!("connected");
    if let Err(err) = stream.set_nodelay(true) {
        debug!(error = %err, "set_nodelay failed");
    }
    let (mut rd, mut wr) = stream.split();
    let mut conn = Connection::new(router, limits);
    match conn.run(&mut rd, &mut wr, &shutdown).await {
        Ok(()) => debug!(%peer, "closed"),
        Err(err) => debug!(%peer, error = %err, "closed on error"),
    }
}

/// Why a connection stops reading.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Still reading.
    Open,
    /// Shutting down: answer what has been read and what the socket holds
    /// already, without waiting for more.
    Draining,
    /// End of input, shutdown or idle timeout: finish the answers, then close.
    Done,
    /// `QUIT`: finish the answers, say goodbye, close.
    Quit,
}

/// One connection: its input, the answers owed in request order, and the
/// bytes ready to go out.
///
/// One loop does everything, so a local answer is written in the same turn
/// that read its request, with no queue or wake-up between reading and
/// writing. Input is taken a read at a time and answered line by line; when
/// more than [`QUEUE_DEPTH`] answers are owed or [`OUT_LIMIT`] bytes wait to
/// be written, the connection stops taking input (the rest stays in the
/// buffer) until the client reads: that is the backpressure.
struct Connection<'r> {
    router: &'r Arc<Router>,
    limits: ServerLimits,
    buf: BytesMut,
    framer: Framer,
    cache: BucketCache,
    /// Answers of the input taken but not yet in `queue`.
    chunk: Chunk,
    /// Answers owed, in request order; the first may wait for another node.
    queue: Answers,
    /// Bytes whose turn has come, to be written.
    out: BytesMut,
    /// Whether `buf` may hold lines not yet framed.
    unframed: bool,
    at_eof: bool,
    /// Bytes read since the shutdown began.
    drained: usize,
    reading: Reading,
}

impl<'r> Connection<'r> {
    fn new(router: &'r Arc<Router>, limits: ServerLimits) -> Self {
        Self {
            router,
            limits,
            buf: BytesMut::with_capacity(READ_CHUNK),
            framer: Framer::new(limits.max_line_bytes),
            cache: BucketCache::default(),
            chunk: Chunk::new(),
            queue: Answers::default(),
            out: BytesMut::new(),
            unframed: false,
            at_eof: false,
            drained: 0,
            reading: Reading::Open,
        }
    }

    async fn run(
        &mut self,
        rd: &mut (impl tokio::io::AsyncRead + Unpin),
        wr: &mut (impl tokio::io::AsyncWrite + Unpin),
        shutdown: &CancellationToken,
    ) -> io::Result<()> {
        // Polled whenever the socket has nothing to read, so once per request
        // without pipelining: a token of this connection's own keeps that poll
        // off the lock that every connection's wait on the node's token shares.
        let shutdown = shutdown.child_token();
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let idle = self.limits.idle_timeout;
        let idle_timer = tokio::time::sleep(idle.unwrap_or(Duration::MAX));
        tokio::pin!(idle_timer);
        loop {
            let taking = matches!(self.reading, Reading::Open | Reading::Draining);
            if self.unframed && taking && !self.backlogged() {
                self.take_input().await;
                continue;
            }
            if self.reading == Reading::Draining && !self.backlogged() {
                // What the client sent before the shutdown is answered too:
                // read what has arrived (up to a bound, against a client that
                // never stops), but never wait for more.
                let before = self.buf.len();
                let read = if self.drained < DRAIN_LIMIT {
                    rd.read_buf(&mut self.buf).now_or_never()
                } else {
                    None
                };
                match read {
                    Some(Ok(n)) if n > 0 => {
                        self.drained += self.buf.len() - before;
                        self.unframed = true;
                    }
                    Some(Ok(_)) => {
                        self.at_eof = true;
                        self.unframed = true;
                    }
                    Some(Err(err)) => return Err(err),
                    None => self.reading = Reading::Done,
                }
                continue;
            }
            self.move_ready();
            if self.reading != Reading::Open && self.queue.is_empty() && self.out.is_empty() {
                if self.reading == Reading::Quit {
                    wr.write_all(protocol::BYE).await?;
                    wr.shutdown().await?;
                }
                return Ok(());
            }
            let head_waits = matches!(self.queue.items.front(), Some(Pending::Remote(..)));
            let may_read = self.reading == Reading::Open && !self.backlogged();
            tokio::select! {
                biased;
                written = wr.write(&self.out), if !self.out.is_empty() => {
                    match written? {
                        0 => return Err(io::ErrorKind::WriteZero.into()),
                        n => self.out.advance(n),
                    }
                }
                () = wait_head(&mut self.queue), if head_waits => {}
                read = rd.read_buf(&mut self.buf), if may_read => {
                    let n = read?;
                    self.unframed = true;
                    self.at_eof = n == 0;
                    if let Some(idle) = idle {
                        idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                    }
                    if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                        self.buf.reserve(READ_CHUNK);
                    }
                }
                () = &mut cancelled, if self.reading == Reading::Open => {
                    self.reading = Reading::Draining;
                }
                () = &mut idle_timer, if idle.is_some() && self.reading == Reading::Open => {
                    // Idle too long: say so, and close once earlier answers are out.
                    self.queue.push(Pending::Ready(BytesMut::from(protocol::IDLE_TIMEOUT)));
                    self.reading = Reading::Done;
                }
            }
        }
    }

    /// Too much owed or waiting to be written to take more input: counted in
    /// answers, and in bytes of the answers already formatted.
    fn backlogged(&self) -> bool {
        self.queue.len() >= QUEUE_DEPTH
            || self.out.len() + self.queue.bytes + self.chunk.bytes() >= OUT_LIMIT
    }

    /// Answers the complete lines in the buffer, until the backlog is full.
    async fn take_input(&mut self) {
        loop {
            if self.backlogged() {
                break;
            }
            let frame = if self.at_eof {
                self.framer
                    .next(&self.buf)
                    .or_else(|| self.framer.rest(&self.buf))
            } else {
                self.framer.next(&self.buf)
            };
            let Some(frame) = frame else {
                self.unframed = false;
                if self.at_eof {
                    self.reading = Reading::Done;
                }
                break;
            };
            let out = &mut self.chunk.out;
            let mut full = false;
            match frame {
                Frame::TooLong => protocol::write_line_error(out, &LineError::TooLong),
                Frame::Line(line) => match protocol::parse(line, &self.limits.limits) {
                    Ok(Request::Ping) => out.put_slice(protocol::PONG),
                    Ok(Request::Quit) => {
                        self.reading = Reading::Quit;
                        self.unframed = false;
                        break;
                    }
                    Ok(Request::Op(command)) => match self.router.target(&command, 0) {
                        Ok(Target::Local) => {
                            self.router.answer_local(command, out, &mut self.cache)
                        }
                        Ok(Target::Remote(owner)) => {
                            full = self.chunk.forward(owner, command.owned())
                        }
                        Err(err) => protocol::write_result(out, &Err(err)),
                    },
                    Err(err) => protocol::write_line_error(out, &err),
                },
            }
            if full || self.chunk.out.len() >= CHUNK_BYTES {
                self.chunk.flush(self.router, &mut self.queue).await;
            }
        }
        self.framer.consume(&mut self.buf);
        self.chunk.flush(self.router, &mut self.queue).await;
    }

    /// Moves the answers whose turn has come from the queue to `out`.
    fn move_ready(&mut self) {
        while let Some(front) = self.queue.items.front_mut() {
            match front {
                Pending::Ready(bytes) => {
                    self.queue.bytes -= bytes.len();
                    if self.out.is_empty() {
                        std::mem::swap(&mut self.out, bytes);
                    } else {
                        self.out.extend_from_slice(bytes);
                    }
                }
                // A clone: a finished shared future must not be polled again.
                Pending::Remote(answers, index) => match answers.clone().now_or_never() {
                    Some(answers) => {
                        let missing = Err(KvError::internal("no answer in batch"));
                        protocol::write_result(
                            &mut self.out,
                            answers.get(*index).unwrap_or(&missing),
                        );
                    }
                    None => return,
                },
            }
            self.queue.items.pop_front();
        }
    }
}

/// Waits until the answers the queue's first item needs are in.
async fn wait_head(queue: &mut Answers) {
    if let Some(Pending::Remote(answers, _)) = queue.items.front_mut() {
        // A clone polls the same shared result; the item keeps its own.
        answers.clone().await;
    }
}

/// One framed piece of input.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame<'b> {
    /// A complete line, without `\n` (a trailing `\r` is left for the parser,
    /// which treats it as whitespace), borrowed from the read buffer.
    Line(&'b [u8]),
    /// A line longer than the limit; its bytes are discarded up to the next `\n`.
    TooLong,
}

/// Splits a byte stream into lines of bounded length. Memory stays bounded by the
/// limit even for an endless line: once a line is known to be too long, its bytes
/// are dropped as they arrive.
///
/// Lines are lent out of the buffer in place; [`Framer::consume`] then drops
/// all that has been framed at once, so a read's worth of lines costs no copy
/// and no bookkeeping per line.
pub(crate) struct Framer {
    max_line: usize,
    /// Where the next line starts in the buffer: everything before is framed.
    start: usize,
    /// How far past `start` the buffer has been searched for `\n` without finding one.
    scanned: usize,
    /// Inside a too-long line: drop bytes until its end.
    discarding: bool,
}

impl Framer {
    pub(crate) fn new(max_line: usize) -> Self {
        Self {
            max_line,
            start: 0,
            scanned: 0,
            discarding: false,
        }
    }

    /// The next complete frame in `buf`, if any.
    pub(crate) fn next<'b>(&mut self, buf: &'b [u8]) -> Option<Frame<'b>> {
        if self.discarding {
            match memchr::memchr(b'\n', &buf[self.start..]) {
                Some(i) => {
                    self.start += i + 1;
                    self.discarding = false;
                }
                None => {
                    self.start = buf.len();
                    return None;
                }
            }
        }
        let rest = &buf[self.start..];
        match memchr::memchr(b'\n', &rest[self.scanned..]) {
            Some(i) => {
                let end = self.scanned + i;
                self.start += end + 1;
                self.scanned = 0;
                Some(self.check(&rest[..end]))
            }
            None => {
                self.scanned = rest.len();
                // One byte of slack: the line's `\r` may be all that is missing.
                if rest.len() > self.max_line + 1 {
                    self.start = buf.len();
                    self.scanned = 0;
                    self.discarding = true;
                    Some(Frame::TooLong)
                } else {
                    None
                }
            }
        }
    }

    /// At end of input: the unterminated last line, if any.
    pub(crate) fn rest<'b>(&mut self, buf: &'b [u8]) -> Option<Frame<'b>> {
        let rest = &buf[self.start..];
        self.start = buf.len();
        self.scanned = 0;
        if self.discarding || rest.is_empty() {
            return None;
        }
        Some(self.check(rest))
    }

    /// Drops what has been framed from the front of `buf`; the lines lent out
    /// must be done with.
    pub(crate) fn consume(&mut self, buf: &mut BytesMut) {
        buf.advance(self.start);
        self.start = 0;
    }

    fn check<'b>(&self, line: &'b [u8]) -> Frame<'b> {
        let len = line.len() - usize::from(line.last() == Some(&b'\r'));
        if len > self.max_line {
            Frame::TooLong
        } else {
            Frame::Line(line)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends `input`, frames what it can, and drops the framed bytes.
    fn frames(framer: &mut Framer, buf: &mut BytesMut, input: &[u8]) -> Vec<String> {
        buf.extend_from_slice(input);
        let framed = std::iter::from_fn(|| framer.next(buf).map(show)).collect();
        framer.consume(buf);
        framed
    }

    fn show(frame: Frame) -> String {
        match frame {
            Frame::Line(line) => String::from_utf8_lossy(line).into_owned(),
            Frame::TooLong => "(too long)".to_string(),
        }
    }

    fn line(s: &str) -> String {
        s.to_string()
    }

    #[test]
    fn lines_split_on_newline_across_reads() {
        let mut f = Framer::new(16);
        let mut buf = BytesMut::new();
        assert_eq!(
            frames(&mut f, &mut buf, b"PING\r\nGET a"),
            vec![line("PING\r")]
        );
        assert_eq!(frames(&mut f, &mut buf, b" b\nPI"), vec![line("GET a b")]);
        assert_eq!(
            frames(&mut f, &mut buf, b"NG\n\n"),
            vec![line("PING"), line("")]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn a_line_at_the_limit_passes_and_one_byte_more_does_not() {
        let mut f = Framer::new(4);
        let mut buf = BytesMut::new();
        assert_eq!(frames(&mut f, &mut buf, b"abcd\r\n"), vec![line("abcd\r")]);
        assert_eq!(frames(&mut f, &mut buf, b"abcd\n"), vec![line("abcd")]);
        assert_eq!(
            frames(&mut f, &mut buf, b"abcde\n"),
            vec![show(Frame::TooLong)]
        );
        assert_eq!(
            frames(&mut f, &mut buf, b"abcde\r\nPING\n"),
            vec![show(Frame::TooLong), line("PING")]
        );
    }

    #[test]
    fn an_endless_line_is_dropped_as_it_arrives() {
        let mut f = Framer::new(8);
        let mut buf = BytesMut::new();
        assert_eq!(
            frames(&mut f, &mut buf, b"0123456789"),
            vec![show(Frame::TooLong)]
        );
        for _ in 0..1000 {
            assert!(frames(&mut f, &mut buf, &[b'x'; 100]).is_empty());
            assert!(buf.len() <= 100);
        }
        assert_eq!(frames(&mut f, &mut buf, b"xx\nPING\n"), vec![line("PING")]);
    }

    #[test]
    fn the_unterminated_last_line_is_still_a_line() {
        let mut f = Framer::new(8);
        let mut buf = BytesMut::new();
        assert_eq!(frames(&mut f, &mut buf, b"PING\nQUIT"), vec![line("PING")]);
        assert_eq!(f.rest(&buf).map(show), Some(line("QUIT")));
        f.consume(&mut buf);
        assert_eq!(f.rest(&buf), None);
    }
}
