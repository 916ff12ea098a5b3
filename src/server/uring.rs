//! TCP clients served from io_uring loops (Linux, feature `uring`, on by
//! default).
//!
//! Without pipelining, a request costs the node one `recv` and one `send`,
//! and the kernel's side of those is most of a request's cost. Here each
//! loop thread (one per two cores) keeps a ring: it accepts, receives and sends by queueing
//! operations and learns of all that finished in one system call, so that
//! one entry into the kernel serves many connections.
//!
//! A loop answers what can be answered at once: local buckets, `PING`,
//! errors; a client that closes with nothing left to answer is closed here.
//! The first line that needs more (another node, the durable store, `QUIT`,
//! the end of input after an unterminated line) hands the connection over to
//! the async runtime, where [`Connection::run`] takes over from that line
//! with everything read and answered so far; it stays there. So does every connection when the
//! node shuts down (the runtime's loop drains it), and every connection of a
//! node with `idle_timeout_secs` set (the runtime keeps its timers).
//!
//! Where the kernel refuses io_uring (containers often do), the node serves
//! every connection on the async runtime, as it does without the feature.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::TcpStream as StdStream;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;

use bytes::BytesMut;
use io_uring::{IoUring, opcode, squeue, types};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, error, info, warn};

use super::ServerLimits;
use super::connection::Connection;
use crate::router::Router;

/// Submission queue entries per ring (completions: twice as many).
const ENTRIES: u32 = 1024;
/// Tags of the operations that belong to no connection.
const ACCEPT: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;
const CANCEL: u64 = u64::MAX - 2;
const RETRY_ACCEPT: u64 = u64::MAX - 3;
/// A connection's operations are tagged `slot << 1 | SEND`.
const SEND: u64 = 1;
/// After running out of file descriptors, accept again after this long.
const RETRY_AFTER: types::Timespec = types::Timespec::new().nsec(50_000_000);

/// What every loop shares with the accept side of the node.
struct Shared {
    router: Arc<Router>,
    limits: ServerLimits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    handle: Handle,
    permits: Arc<Semaphore>,
}

/// Starts the loops on `listener`, one per two cores: the kernel does most
/// of a request's work, partly on other threads' time, and the runtime needs
/// room too. (On two cores, two loops cost two fifths more CPU a request than
/// one, with a p99 six times as high: README, Performance.) Returns the
/// listener untouched when io_uring cannot be used here; otherwise a future
/// that ends when every loop has stopped (after `shutdown`, with its
/// connections handed over).
pub(super) fn serve(
    listener: TcpListener,
    router: &Arc<Router>,
    limits: ServerLimits,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    permits: &Arc<Semaphore>,
) -> Result<impl Future<Output = ()> + use<>, (TcpListener, io::Error)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1));
    // A ring belongs to the thread that submits to it, so each loop makes
    // its own; one made here first tells whether this kernel allows it.
    if let Err(err) = new_ring() {
        return Err((listener, err));
    }
    let listener = match listener.into_std() {
        Ok(listener) => listener,
        Err(err) => {
            // Not expected; the listener is gone, so serve nothing rather
            // than guess.
            error!(error = %err, "could not take the listener from the runtime");
            return Ok(futures_util::future::Either::Left(std::future::ready(())));
        }
    };
    let shared = Arc::new(Shared {
        router: router.clone(),
        limits,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        handle: Handle::current(),
        permits: permits.clone(),
    });
    let mut stopped = Vec::with_capacity(threads);
    let mut wakers = Vec::with_capacity(threads);
    for i in 0..threads {
        let (wake_rx, wake_tx) = match io::pipe() {
            Ok(pipe) => pipe,
            Err(err) => {
                error!(error = %err, "could not make a pipe for an io_uring loop");
                break;
            }
        };
        let listener = match listener.try_clone() {
            Ok(listener) => listener,
            Err(err) => {
                error!(error = %err, "could not share the listener with an io_uring loop");
                break;
            }
        };
        let shared = shared.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name(format!("kvmesh-uring-{i}"))
            .spawn(move || {
                match new_ring() {
                    Ok(ring) => {
                        Loop::new(ring, shared).run(listener.as_raw_fd(), wake_rx.as_raw_fd())
                    }
                    Err(err) => error!(error = %err, "could not make an io_uring loop's ring"),
                }
                drop(listener);
                drop(wake_rx);
                let _ = done_tx.send(());
            });
        match spawned {
            Ok(_) => {
                stopped.push(done_rx);
                wakers.push(wake_tx);
            }
            Err(err) => {
                error!(error = %err, "could not start an io_uring loop");
                break;
            }
        }
    }
    drop(listener);
    info!(loops = stopped.len(), "serving connections from io_uring");
    let shutdown = shutdown.clone();
    Ok(futures_util::future::Either::Right(async move {
        shutdown.cancelled().await;
        for mut waker in wakers {
            // One byte ends the loop's wait; a loop already gone cannot read it.
            let _ = waker.write_all(&[1]);
        }
        for done in stopped {
            let _ = done.await;
        }
        debug!("io_uring loops stopped");
    }))
}

/// An error that ends nothing: an interrupted or cancelled operation (at
/// shutdown, or one whose buffer is still in use).
fn ignorable(errno: i32, stopping: bool) -> bool {
    matches!(errno, libc::EINTR | libc::EAGAIN) || (errno == libc::ECANCELED && stopping)
}

/// A ring of the kind the loop needs: one thread submits, and completions
/// are delivered when it asks for them (Linux 6.1 on; an older kernel, or
/// one that forbids io_uring, says no and the runtime serves instead).
fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(ENTRIES)
}

/// One connection of a loop.
struct Slot {
    conn: Connection,
    stream: StdStream,
    permit: OwnedSemaphorePermit,
    /// Answers being written, and how much of them is written.
    sending: BytesMut,
    sent: usize,
    /// Operations whose completion is awaited: a receive, a send, or both.
    /// (A send linked to the receive after it is not counted: it completes
    /// silently, or fails and says so before the receive does.)
    in_flight: u8,
    /// The send in flight is linked to a receive...
    linked: bool,
    /// ...and it failed (its completion came).
    send_told: bool,
    /// Reset, broken pipe: closed once nothing is in flight.
    failed: bool,
}

struct Loop {
    ring: IoUring,
    shared: Arc<Shared>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    live: usize,
    /// An accept (or the timer before the next one) is armed.
    accepting: bool,
    stopping: bool,
    /// Operations not yet in the submission queue, in order, each with
    /// whether it is linked to the next.
    queued: VecDeque<(squeue::Entry, bool)>,
    /// The read of the wake-up pipe is armed.
    waiting_for_wake: bool,
    wake_buf: [u8; 8],
}

impl Loop {
    fn new(ring: IoUring, shared: Arc<Shared>) -> Self {
        Self {
            ring,
            shared,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            accepting: false,
            stopping: false,
            queued: VecDeque::new(),
            waiting_for_wake: false,
            wake_buf: [0; 8],
        }
    }

    /// Queues an operation; it is submitted with the next wait.
    fn push(&mut self, entry: squeue::Entry) {
        self.queued.push_back((entry, false));
    }

    /// Queues an operation linked to the next one queued.
    fn push_linked(&mut self, entry: squeue::Entry) {
        self.queued.push_back((entry, true));
    }

    /// Moves the queued operations to the submission queue, submitting
    /// whenever it is full. A linked pair goes in one submission, or it
    /// would not be linked. Stops early if the kernel takes no more for now
    /// (its completion queue is full): the rest waits for the next turn,
    /// once completions have been taken.
    fn submit_queued(&mut self) {
        while let Some(&(_, linked)) = self.queued.front() {
            let need = if linked { 2 } else { 1 };
            if self.room() < need {
                if let Err(err) = self.ring.submit() {
                    debug!(error = %err, "io_uring submit");
                }
                if self.room() < need {
                    return;
                }
            }
            for _ in 0..need {
                let Some((entry, _)) = self.queued.pop_front() else {
                    return;
                };
                // SAFETY: every buffer an entry points to lives in a slot
                // (or in the loop) and is neither touched nor freed until
                // the entry's completion has been taken. There is room.
                let _ = unsafe { self.ring.submission().push(&entry) };
            }
        }
    }

    /// Free entries in the submission queue.
    fn room(&mut self) -> usize {
        let queue = self.ring.submission();
        queue.capacity() - queue.len()
    }

    /// One connection per accept, so that the loops take turns: the kernel
    /// gives a multishot accept's connections to one loop alone.
    fn arm_accept(&mut self, listener: RawFd) {
        let accept = opcode::Accept::new(
            types::Fd(listener),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
        .build()
        .user_data(ACCEPT);
        self.push(accept);
        self.accepting = true;
    }

    fn run(&mut self, listener: RawFd, wake: RawFd) {
        self.arm_accept(listener);
        let wake_read = opcode::Read::new(types::Fd(wake), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE);
        self.push(wake_read);
        let mut done: Vec<(u64, i32)> = Vec::with_capacity(256);
        self.waiting_for_wake = true;
        while !self.finished() {
            self.submit_queued();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(err)
                    if matches!(
                        err.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) => {}
                Err(err) => {
                    error!(error = %err, "io_uring loop failed; its connections are closed");
                    self.abandon();
                    return;
                }
            }
            done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for (tag, result) in done.drain(..) {
                match tag {
                    ACCEPT => self.accepted(listener, result),
                    RETRY_ACCEPT => {
                        self.accepting = false;
                        if !self.stopping {
                            self.arm_accept(listener);
                        }
                    }
                    WAKE => {
                        self.waiting_for_wake = false;
                        self.stop();
                    }
                    CANCEL => {}
                    tag => {
                        let slot = (tag >> 1) as usize;
                        if tag & SEND == SEND {
                            self.sent(slot, result);
                        } else {
                            self.received(slot, result);
                        }
                    }
                }
            }
        }
    }

    /// Stopped, with every connection handed over and nothing in flight.
    fn finished(&self) -> bool {
        self.stopping && self.live == 0 && !self.accepting && !self.waiting_for_wake
    }

    /// An accept finished: arms the next one (after a pause when out of
    /// descriptors or memory) and takes the connection.
    fn accepted(&mut self, listener: RawFd, result: i32) {
        self.accepting = false;
        let out_of_room = matches!(
            -result,
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
        );
        if result < 0 && result != -libc::ECANCELED {
            let err = io::Error::from_raw_os_error(-result);
            if out_of_room {
                warn!(error = %err, "accept failed");
            } else {
                debug!(error = %err, "accept failed");
            }
        }
        if !self.stopping {
            if out_of_room {
                let wait = opcode::Timeout::new(&RETRY_AFTER)
                    .build()
                    .user_data(RETRY_ACCEPT);
                self.push(wait);
                self.accepting = true;
            } else {
                self.arm_accept(listener);
            }
        }
        if result < 0 {
            return;
        }
        // SAFETY: a new descriptor, owned by nothing else.
        let stream = unsafe { StdStream::from_raw_fd(result) };
        if self.stopping {
            return;
        }
        if let Err(err) = stream.set_nodelay(true) {
            debug!(error = %err, "set_nodelay failed");
        }
        let permit = match self.shared.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                debug!("refused: too many connections");
                let tracker = &self.shared.tracker;
                tracker.spawn_on(
                    async move {
                        if let Ok(stream) = TcpStream::from_std(stream) {
                            super::refuse(stream).await;
                        }
                    },
                    &self.shared.handle,
                );
                return;
            }
        };
        let slot = Slot {
            conn: Connection::new(self.shared.router.clone(), self.shared.limits),
            stream,
            permit,
            sending: BytesMut::new(),
            sent: 0,
            in_flight: 0,
            linked: false,
            send_told: false,
            failed: false,
        };
        let at = match self.free.pop() {
            Some(at) => {
                self.slots[at] = Some(slot);
                at
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.live += 1;
        self.receive(at);
    }

    fn receive(&mut self, at: usize) {
        let Some(slot) = self.slots[at].as_mut() else {
            return;
        };
        let room = slot.conn.read_room();
        let len = room.len().min(u32::MAX as usize) as u32;
        let recv = opcode::Recv::new(
            types::Fd(slot.stream.as_raw_fd()),
            room.as_mut_ptr().cast(),
            len,
        )
        .build()
        .user_data((at as u64) << 1);
        slot.in_flight += 1;
        self.push(recv);
    }

    /// Writes what is left of the slot's answers. (A send on a stream
    /// socket finishes only when all is written, or fails.)
    fn send(&mut self, at: usize) {
        if let Some(send) = self.send_entry(at, false) {
            self.push(send);
        }
    }

    /// Writes the slot's answers, then reads on: the receive is linked to
    /// the send, and a send that succeeds says nothing, so one completion
    /// (the receive's) tells of both; a send that fails says so first.
    fn send_then_receive(&mut self, at: usize) {
        let Some(send) = self.send_entry(at, true) else {
            return;
        };
        self.push_linked(send);
        self.receive(at);
    }

    fn send_entry(&mut self, at: usize, linked: bool) -> Option<squeue::Entry> {
        let slot = self.slots[at].as_mut()?;
        let rest = &slot.sending[slot.sent..];
        let send = opcode::Send::new(
            types::Fd(slot.stream.as_raw_fd()),
            rest.as_ptr(),
            rest.len().min(u32::MAX as usize) as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(((at as u64) << 1) | SEND);
        slot.linked = linked;
        slot.send_told = false;
        Some(if linked {
            send.flags(squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS)
        } else {
            slot.in_flight += 1;
            send
        })
    }

    fn received(&mut self, at: usize, result: i32) {
        let stopping = self.stopping;
        let Some(slot) = self.slots[at].as_mut() else {
            return;
        };
        slot.in_flight -= 1;
        if std::mem::take(&mut slot.linked) && !slot.send_told {
            // The send linked before it succeeded, saying nothing.
            slot.sent = slot.sending.len();
        }
        if result >= 0 {
            // SAFETY: the kernel wrote `result` bytes into the room that
            // `receive` lent it, and nothing touched the buffer meanwhile.
            unsafe { slot.conn.did_read(result as usize) };
        } else if !ignorable(-result, stopping) {
            debug!(error = %io::Error::from_raw_os_error(-result), "closed on error");
            slot.failed = true;
        }
        if slot.in_flight == 0 {
            self.settle(at);
        }
    }

    fn sent(&mut self, at: usize, result: i32) {
        let stopping = self.stopping;
        let Some(slot) = self.slots[at].as_mut() else {
            return;
        };
        // A linked send tells only of a failure, before its receive does.
        let linked = slot.linked;
        if linked {
            slot.send_told = true;
        } else {
            slot.in_flight -= 1;
        }
        if result > 0 {
            slot.sent += result as usize;
        } else if result == 0 {
            // Nothing written of a non-empty write: the peer is gone.
            slot.failed = !stopping;
        } else if !ignorable(-result, stopping) {
            debug!(error = %io::Error::from_raw_os_error(-result), "closed on error");
            slot.failed = true;
        }
        if !linked && slot.in_flight == 0 {
            self.settle(at);
        }
    }

    /// Nothing is in flight for the connection: closes it, hands it over,
    /// writes the rest of its answers, or answers what it sent.
    fn settle(&mut self, at: usize) {
        let Some(slot) = self.slots[at].as_mut() else {
            return;
        };
        if slot.failed {
            self.close(at);
        } else if self.stopping {
            self.hand_over(at);
        } else if slot.sent < slot.sending.len() {
            self.send(at);
        } else {
            slot.sending = BytesMut::new();
            slot.sent = 0;
            self.answer(at);
        }
    }

    /// Answers what was read: writes the answers and reads on, or hands the
    /// connection over when a line needs more than this loop does.
    fn answer(&mut self, at: usize) {
        let Some(slot) = self.slots[at].as_mut() else {
            return;
        };
        if slot.conn.ended() {
            self.close(at);
            return;
        }
        if !slot.conn.answer_here() {
            self.hand_over(at);
            return;
        }
        let answers = slot.conn.take_answers();
        // With lines left unanswered (the backlog was full), nothing more is
        // read until they are.
        if answers.is_empty() {
            self.receive(at);
            return;
        }
        slot.sending = answers;
        slot.sent = 0;
        if slot.conn.has_unframed() {
            self.send(at);
        } else {
            self.send_then_receive(at);
        }
    }

    /// Cancels the accept and every connection's receive or send: each
    /// connection is then handed over to the runtime, which drains it (and
    /// closes, after the node's grace period, one whose client does not read).
    fn stop(&mut self) {
        self.stopping = true;
        if self.accepting {
            for target in [ACCEPT, RETRY_ACCEPT] {
                let cancel = opcode::AsyncCancel::new(target).build().user_data(CANCEL);
                self.push(cancel);
            }
        }
        for at in 0..self.slots.len() {
            if self.slots[at].is_some() {
                for op in [0, SEND] {
                    let cancel = opcode::AsyncCancel::new(((at as u64) << 1) | op)
                        .build()
                        .user_data(CANCEL);
                    self.push(cancel);
                }
            }
        }
    }

    /// After the ring failed: operations may still be in flight on the
    /// slots' buffers, so the buffers are never freed; the connections are
    /// shut down so that their clients learn of it.
    fn abandon(&mut self) {
        for slot in self.slots.drain(..).flatten() {
            let _ = slot.stream.shutdown(std::net::Shutdown::Both);
            std::mem::forget(slot);
        }
    }

    fn take(&mut self, at: usize) -> Option<Slot> {
        let slot = self.slots.get_mut(at)?.take()?;
        self.free.push(at);
        self.live -= 1;
        Some(slot)
    }

    fn close(&mut self, at: usize) {
        drop(self.take(at));
    }

    /// The connection goes on in the runtime, from where this loop left it.
    fn hand_over(&mut self, at: usize) {
        let Some(Slot {
            mut conn,
            stream,
            permit,
            mut sending,
            sent,
            ..
        }) = self.take(at)
        else {
            return;
        };
        if sent < sending.len() {
            conn.write_first(sending.split_off(sent));
        }
        // The peer is looked up only when the span is on (debug logs).
        let span = debug_span!("conn", peer = %PeerOf(&stream));
        if let Err(err) = stream.set_nonblocking(true) {
            debug!(error = %err, "set_nonblocking failed");
        }
        let shutdown = self.shared.shutdown.clone();
        self.shared.tracker.spawn_on(
            async move {
                let stream = match TcpStream::from_std(stream) {
                    Ok(stream) => stream,
                    Err(err) => {
                        debug!(error = %err, "could not hand the connection over");
                        return;
                    }
                };
                super::serve_connection(stream, &mut conn, shutdown).await;
                drop(permit);
            }
            .instrument(span),
            &self.shared.handle,
        );
    }
}

/// A socket's peer, for a log line.
struct PeerOf<'s>(&'s StdStream);

impl std::fmt::Display for PeerOf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.peer_addr() {
            Ok(peer) => peer.fmt(f),
            Err(_) => f.write_str("unknown"),
        }
    }
}
