//! The load generator's io_uring client (Linux, feature `uring`): one
//! thread per two cores drives its share of the TCP connections from a ring
//! of its own, queueing every connection's send and receive and learning of
//! all that finished in one system call.
//!
//! On two shared cores the client's cost decides much of the throughput it
//! can show: the runtime's client makes a `sendto` and a `recvfrom` a
//! request, plus its wake-ups, and its two threads share the cores with the
//! server's. This one costs less a request and keeps to one thread, so the
//! server it drives has a core to itself, as a server on its own machine
//! would (README, Performance). The runtime's client stays (`--io runtime`)
//! and is what runs where io_uring is refused.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

use hdrhistogram::Histogram;
use io_uring::{IoUring, opcode, squeue, types};

use super::conn::{SEED, answer, pick};
use super::{ConnResult, Shared, Tally, new_histogram};
use crate::rng::XorShift;

/// A connection's operations are tagged `index << 1 | SEND`.
const SEND: u64 = 1;
/// Bytes a receive asks for at least; the buffer grows when an answer is
/// longer.
const READ_ROOM: usize = 16 * 1024;

/// A ring for a thread driving `conns` connections, made on that thread:
/// with room to submit a send and a receive for each at once, and so never
/// more completions waiting than its completion queue holds (twice that).
pub(super) fn ring(conns: usize) -> io::Result<IoUring> {
    let entries = (2 * conns).next_power_of_two().clamp(64, 32_768);
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries as u32)
}

/// One connection and the batch of requests it has in flight.
struct Client {
    stream: TcpStream,
    rng: XorShift,
    /// The batch's requests in order (is it a GET, which key), and how many
    /// of them are answered.
    asked: Vec<(bool, usize)>,
    answered: usize,
    /// The batch's bytes, and how many the kernel has taken.
    batch: Vec<u8>,
    written: usize,
    /// Received bytes not yet judged are `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    began: Instant,
    sending: bool,
    receiving: bool,
    /// Failed, or out of requests: takes no new batch.
    over: bool,
}

/// A thread's connections, their ring, and what they measured.
struct Driver<'a> {
    shared: &'a Shared,
    ring: IoUring,
    clients: Vec<Client>,
    hist: Histogram<u64>,
    first_error: Option<String>,
    tally: Tally,
    /// Connections that could not connect, or broke.
    failures: Vec<String>,
    in_flight: usize,
}

/// Connects connections `ids` and drives them until the run ends; one
/// result for all that worked and one for each that failed. Runs on the
/// thread that made `ring`.
pub(super) fn drive(shared: &Shared, ring: IoUring, ids: Vec<usize>) -> Vec<ConnResult> {
    let opts = &shared.opts;
    let mut driver = Driver {
        shared,
        ring,
        clients: Vec::with_capacity(ids.len()),
        hist: new_histogram(),
        first_error: None,
        tally: Tally::default(),
        failures: Vec::new(),
        in_flight: 0,
    };
    for id in ids {
        let addr = &opts.addrs[id % opts.addrs.len()];
        match TcpStream::connect(addr) {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                driver.clients.push(Client {
                    stream,
                    rng: XorShift::stream(SEED, id as u64),
                    asked: Vec::with_capacity(opts.pipeline),
                    answered: 0,
                    batch: Vec::new(),
                    written: 0,
                    buf: vec![0; READ_ROOM],
                    start: 0,
                    end: 0,
                    began: Instant::now(),
                    sending: false,
                    receiving: false,
                    over: false,
                });
            }
            Err(e) => driver
                .failures
                .push(format!("cannot connect to {addr}: {e}")),
        }
    }
    driver.run();
    let Driver {
        hist,
        first_error,
        failures,
        ..
    } = driver;
    let mut results = vec![Ok((hist, first_error))];
    results.extend(failures.into_iter().map(Err));
    results
}

impl Driver<'_> {
    fn run(&mut self) {
        for i in 0..self.clients.len() {
            self.begin(i);
        }
        let mut done: Vec<(u64, i32)> = Vec::with_capacity(256);
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => {
                    // Nothing can be waited for any more, so nothing may be
                    // freed either: the buffers the kernel may still use are
                    // leaked rather than handed back.
                    self.failures.push(format!("io_uring: {e}"));
                    std::mem::forget(std::mem::take(&mut self.clients));
                    return;
                }
            }
            done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for (tag, result) in done.drain(..) {
                self.in_flight -= 1;
                let i = (tag >> 1) as usize;
                if tag & SEND == SEND {
                    self.sent(i, result);
                } else {
                    self.received(i, result);
                }
            }
        }
        self.shared.settle(&mut self.tally);
    }

    /// Starts connection `i`'s next batch, if the run has requests left.
    fn begin(&mut self, i: usize) {
        let (shared, c) = (self.shared, &mut self.clients[i]);
        let granted = shared.grant(shared.opts.pipeline as u64);
        if granted == 0 {
            c.over = true;
            return;
        }
        let work = &shared.work;
        c.batch.clear();
        c.asked.clear();
        c.answered = 0;
        c.written = 0;
        for _ in 0..granted {
            let (get, k) = pick(&mut c.rng, &shared.opts, work.values.len());
            c.batch
                .extend_from_slice(if get { &work.gets[k] } else { &work.puts[k] });
            c.asked.push((get, k));
        }
        c.began = Instant::now();
        self.send(i);
        self.receive(i);
    }

    fn send(&mut self, i: usize) {
        let c = &mut self.clients[i];
        let rest = &c.batch[c.written..];
        let entry = opcode::Send::new(
            types::Fd(c.stream.as_raw_fd()),
            rest.as_ptr(),
            rest.len() as u32,
        )
        .build()
        .user_data((i as u64) << 1 | SEND);
        c.sending = true;
        self.push(&entry);
    }

    fn receive(&mut self, i: usize) {
        let c = &mut self.clients[i];
        if c.start == c.end {
            (c.start, c.end) = (0, 0);
        }
        if c.buf.len() - c.end < READ_ROOM / 4 {
            c.buf.copy_within(c.start..c.end, 0);
            (c.start, c.end) = (0, c.end - c.start);
            if c.buf.len() - c.end < READ_ROOM / 4 {
                c.buf.resize(c.buf.len() * 2, 0);
            }
        }
        let room = &mut c.buf[c.end..];
        let entry = opcode::Recv::new(
            types::Fd(c.stream.as_raw_fd()),
            room.as_mut_ptr(),
            room.len() as u32,
        )
        .build()
        .user_data((i as u64) << 1);
        c.receiving = true;
        self.push(&entry);
    }

    /// Queues an operation; the next wait submits it.
    fn push(&mut self, entry: &squeue::Entry) {
        // SAFETY: an entry's buffer lives in its client, which is neither
        // changed there nor dropped until the entry's completion is taken
        // (the run ends only with nothing in flight). The queue has room for
        // two entries a connection, and a connection has at most two in
        // flight; should it be full all the same, it is submitted first.
        let pushed = unsafe { self.ring.submission().push(entry) }.is_ok()
            || (self.ring.submit().is_ok()
                && unsafe { self.ring.submission().push(entry) }.is_ok());
        if pushed {
            self.in_flight += 1;
        } else {
            self.fail(
                entry.get_user_data() as usize >> 1,
                "io_uring: no room to submit".into(),
            );
        }
    }

    fn sent(&mut self, i: usize, result: i32) {
        let c = &mut self.clients[i];
        c.sending = false;
        if c.over {
            return;
        }
        if result < 0 {
            let e = io::Error::from_raw_os_error(-result);
            return self.fail(i, format!("write: {e}"));
        }
        c.written += result as usize;
        if c.written < c.batch.len() {
            self.send(i);
        } else {
            self.next_if_answered(i);
        }
    }

    fn received(&mut self, i: usize, result: i32) {
        let (shared, c) = (self.shared, &mut self.clients[i]);
        c.receiving = false;
        if c.over {
            return;
        }
        if result <= 0 {
            let why = match result {
                0 => "the server closed the connection".to_string(),
                _ => format!("read: {}", io::Error::from_raw_os_error(-result)),
            };
            return self.fail(i, why);
        }
        c.end += result as usize;
        let values = &shared.work.values;
        while let Some(&(get, k)) = c.asked.get(c.answered) {
            let buf = &c.buf[c.start..c.end];
            let Some((used, verdict)) =
                answer(shared.opts.target, buf, get.then(|| &values[k][..]))
            else {
                break;
            };
            c.start += used;
            c.answered += 1;
            let _ = self
                .hist
                .record((c.began.elapsed().as_micros() as u64).max(1));
            self.tally.count(verdict, &mut self.first_error);
        }
        if c.answered < c.asked.len() {
            self.receive(i);
        } else {
            self.shared.settle(&mut self.tally);
            self.next_if_answered(i);
        }
    }

    /// Once the batch is answered and its send has finished (its completion
    /// can come after the answers'), starts the next one.
    fn next_if_answered(&mut self, i: usize) {
        let c = &self.clients[i];
        if !c.sending && !c.receiving && c.answered == c.asked.len() {
            self.begin(i);
        }
    }

    /// Ends connection `i`: no new batch, and its operations in flight end
    /// at once (the socket is shut down under them).
    fn fail(&mut self, i: usize, why: String) {
        let c = &mut self.clients[i];
        if !c.over {
            c.over = true;
            let _ = c.stream.shutdown(Shutdown::Both);
            self.failures.push(why);
        }
    }
}
