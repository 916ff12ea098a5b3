//! One TCP connection: a single loop that takes input, answers it and writes.
//!
//! A local answer is written in the same turn that read its request, with no
//! queue or wake-up between reading and writing. Input is taken a read at a
//! time and answered line by line; when more than [`QUEUE_DEPTH`] answers or
//! [`OUT_LIMIT`] bytes of formatted answers are owed, the connection stops
//! taking input (the rest stays in the buffer) until the client reads: that
//! is the backpressure.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::ServerLimits;
use super::dispatch::{Step, answer_frame};
use super::framer::Framer;
use super::owed::{Gathered, Owed};
use crate::protocol;
use crate::registry::BucketCache;
use crate::router::Router;

/// Bytes asked of the socket per read.
const READ_BYTES: usize = 16 * 1024;
/// The answers gathered from one read join the queue once they grow past this.
const GATHER_BYTES: usize = 16 * 1024;
/// Answers owed per connection before it stops taking input: the bound on a
/// connection's pipelined work.
const QUEUE_DEPTH: usize = 64;
/// Bytes of answers owed (formatted, not yet written) before a connection
/// stops taking input. One answer may take it past the bound (a value is at
/// most `max_value_bytes`), so a connection holds at most this plus one value.
const OUT_LIMIT: usize = 256 * 1024;
/// Input read after a shutdown began, to answer what clients sent before it.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

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
pub(super) struct Connection {
    router: Arc<Router>,
    limits: ServerLimits,
    buf: BytesMut,
    framer: Framer,
    cache: BucketCache,
    /// Answers of the input taken but not yet in `owed`.
    gathered: Gathered,
    /// Answers owed, in request order; the first may wait for another node.
    owed: Owed,
    /// Bytes whose turn has come, to be written.
    out: BytesMut,
    /// Whether `buf` may hold lines not yet framed.
    unframed: bool,
    at_eof: bool,
    /// Bytes read since the shutdown began.
    drained: usize,
    reading: Reading,
}

impl Connection {
    pub(super) fn new(router: Arc<Router>, limits: ServerLimits) -> Self {
        Self {
            router,
            limits,
            buf: BytesMut::with_capacity(READ_BYTES),
            framer: Framer::new(limits.max_line_bytes),
            cache: BucketCache::default(),
            gathered: Gathered::new(),
            owed: Owed::default(),
            out: BytesMut::new(),
            unframed: false,
            at_eof: false,
            drained: 0,
            reading: Reading::Open,
        }
    }

    /// The connection's loop: read, answer, write, until the client leaves,
    /// says `QUIT`, idles too long, or the node shuts down.
    pub(super) async fn run(
        &mut self,
        rd: &mut (impl AsyncRead + Unpin),
        wr: &mut (impl AsyncWrite + Unpin),
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
        // A connection answered elsewhere until now may bring answers and
        // commands of its last read.
        self.gathered.flush(&self.router, &mut self.owed).await;
        loop {
            let taking = matches!(self.reading, Reading::Open | Reading::Draining);
            if self.unframed && taking && !self.backlogged() {
                self.take_input().await;
                continue;
            }
            if self.reading == Reading::Draining && !self.backlogged() {
                self.read_what_has_arrived(rd)?;
                continue;
            }
            self.owed.move_ready(&mut self.out);
            if self.reading != Reading::Open && self.owed.is_empty() && self.out.is_empty() {
                if self.reading == Reading::Quit {
                    wr.write_all(protocol::BYE).await?;
                    wr.shutdown().await?;
                }
                return Ok(());
            }
            let head_waits = self.owed.head_waits();
            let may_read = self.reading == Reading::Open && !self.backlogged();
            tokio::select! {
                biased;
                written = wr.write(&self.out), if !self.out.is_empty() => {
                    match written? {
                        0 => return Err(io::ErrorKind::WriteZero.into()),
                        n => self.out.advance(n),
                    }
                }
                () = self.owed.wait_head(), if head_waits => {}
                read = rd.read_buf(&mut self.buf), if may_read => {
                    let n = read?;
                    self.unframed = true;
                    self.at_eof = n == 0;
                    if let Some(idle) = idle {
                        idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                    }
                    if self.buf.capacity() - self.buf.len() < READ_BYTES / 4 {
                        self.buf.reserve(READ_BYTES);
                    }
                }
                () = &mut cancelled, if self.reading == Reading::Open => {
                    self.reading = Reading::Draining;
                }
                () = &mut idle_timer, if idle.is_some() && self.reading == Reading::Open => {
                    // Idle too long: say so, and close once earlier answers are out.
                    self.owed.push_ready(BytesMut::from(protocol::IDLE_TIMEOUT));
                    self.reading = Reading::Done;
                }
            }
        }
    }

    /// While draining: what the client sent before the shutdown is answered
    /// too, so read what has arrived (up to a bound, against a client that
    /// never stops), but never wait for more.
    fn read_what_has_arrived(&mut self, rd: &mut (impl AsyncRead + Unpin)) -> io::Result<()> {
        let before = self.buf.len();
        let read = if self.drained < DRAIN_LIMIT {
            rd.read_buf(&mut self.buf).now_or_never()
        } else {
            None
        };
        match read {
            Some(Ok(n)) => {
                self.drained += self.buf.len() - before;
                self.at_eof = n == 0;
                self.unframed = true;
            }
            Some(Err(err)) => return Err(err),
            None => self.reading = Reading::Done,
        }
        Ok(())
    }

    /// Too much owed to take more input: counted in answers, and in bytes of
    /// the answers already formatted.
    fn backlogged(&self) -> bool {
        self.owed.len() >= QUEUE_DEPTH
            || self.out.len() + self.owed.bytes() + self.gathered.bytes() >= OUT_LIMIT
    }

    /// Answers the complete lines in the buffer, until the backlog is full.
    async fn take_input(&mut self) {
        while !self.backlogged() {
            match self.answer_next() {
                None => break,
                Some(Step::Quit) => break,
                Some(Step::Forward) => self.gathered.flush(&self.router, &mut self.owed).await,
                Some(Step::Next) if self.gathered.out.len() >= GATHER_BYTES => {
                    self.gathered.flush(&self.router, &mut self.owed).await
                }
                Some(Step::Next) => {}
            }
        }
        self.framer.consume(&mut self.buf);
        self.gathered.flush(&self.router, &mut self.owed).await;
    }

    /// Answers the next complete line of the buffer, if there is one; at
    /// the end of the lines, notes that nothing is left to frame.
    fn answer_next(&mut self) -> Option<Step> {
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
            return None;
        };
        let step = answer_frame(
            frame,
            &self.router,
            &self.limits.sizes,
            &mut self.cache,
            &mut self.gathered,
            &self.owed,
        );
        if step == Step::Quit {
            self.reading = Reading::Quit;
            self.unframed = false;
        }
        Some(step)
    }
}

/// What an io_uring loop (`uring`) needs of a connection it serves until it
/// hands it over to [`Connection::run`].
#[cfg(all(target_os = "linux", feature = "uring"))]
impl Connection {
    /// For a loop that answers connections without the async runtime
    /// (`uring`): answers the buffer's lines as long as each is answered
    /// here and now, until the backlog is full. False when a line needs
    /// more (another node, the store, `QUIT`, the end of input): the
    /// connection must then go on in [`Connection::run`], which takes over
    /// from that line.
    pub(super) fn answer_here(&mut self) -> bool {
        if self.at_eof {
            return false;
        }
        while !self.backlogged() {
            match self.answer_next() {
                None => break,
                Some(Step::Next) if !self.gathered.holds_work() => {}
                Some(_) => {
                    self.framer.consume(&mut self.buf);
                    return false;
                }
            }
        }
        self.framer.consume(&mut self.buf);
        true
    }

    /// Whether the buffer may hold lines not answered yet (the backlog was
    /// full when they were reached).
    pub(super) fn has_unframed(&self) -> bool {
        self.unframed
    }

    /// The client closed its side and left nothing to answer: the
    /// connection can simply close.
    pub(super) fn ended(&self) -> bool {
        self.at_eof && self.buf.is_empty()
    }

    /// The answers made so far, to be written.
    pub(super) fn take_answers(&mut self) -> BytesMut {
        self.gathered.take_out()
    }

    /// Answers already due (part of a write that another loop began), to be
    /// written before any other.
    pub(super) fn write_first(&mut self, bytes: BytesMut) {
        debug_assert!(self.out.is_empty());
        self.out = bytes;
    }

    /// Room for the next read, at the end of the input buffer (grown as a
    /// read of the async loop grows it).
    pub(super) fn read_room(&mut self) -> &mut [std::mem::MaybeUninit<u8>] {
        if self.buf.capacity() - self.buf.len() < READ_BYTES / 4 {
            self.buf.reserve(READ_BYTES);
        }
        self.buf.spare_capacity_mut()
    }

    /// Takes `n` bytes read into the room given by [`Connection::read_room`]
    /// (0: the end of input).
    ///
    /// # Safety
    /// The first `n` bytes of that room must have been written, and the
    /// buffer not touched since.
    pub(super) unsafe fn did_read(&mut self, n: usize) {
        // SAFETY: the caller wrote `n` bytes of the spare capacity.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        self.unframed = true;
        self.at_eof = n == 0;
    }
}
