//! Forwarding: commands for another node travel through one queue per owner,
//! leave in messages of up to [`MAX_BATCH`] commands that fit the server's
//! `max_payload`, and come back as one answer per command.
//!
//! Batching is invisible to clients: each command's answer is the one it
//! would get alone. A reply that is malformed for one member fails that
//! member only, and a write whose outcome cannot be known (the reply is
//! unreadable, or the connection went away after it was sent) says so —
//! `node <owner> outcome unknown` — instead of claiming it failed.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_nats::client::PublishErrorKind;
use async_nats::{HeaderMap, StatusCode};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span};

use super::{Coming, Delivery, Inner, Mesh, Via, Waiter, node_subject};
use crate::command::{Command, Reply};
use crate::error::KvError;
use crate::wire::{self, BadReply, DEADLINE_HEADER, HOPS_HEADER};

/// The answers to a group of commands, in order.
pub type Answers = Vec<Result<Reply, KvError>>;

/// Commands queued for one owner, with the place their answers go.
pub(super) struct Job {
    commands: Vec<Command>,
    via: Via,
    answers: oneshot::Sender<Answers>,
}

/// Jobs queued per owner before senders wait: the bound on forwarded work.
const FORWARD_QUEUE: usize = 4096;

/// Most commands in one forwarded message (a message also stays within the
/// server's `max_payload`).
pub const MAX_BATCH: usize = 64;

/// Room left in a message for its headers and the batch's own JSON.
const MESSAGE_SLACK: usize = 512;

impl Mesh {
    /// Forwards commands to `owner` through its queue, and returns their answers
    /// to come. Commands queued one after the other take effect in that order.
    ///
    /// One task per owner drains the queue: whatever has gathered while it was
    /// busy leaves together (in messages of up to [`MAX_BATCH`] commands), so
    /// many connections talking to one owner share round trips instead of each
    /// paying for its own; a lone command still leaves at once, as a plain
    /// request.
    pub async fn forward(&self, owner: &str, commands: Vec<Command>, via: Via) -> Coming {
        if !self.is_connected() {
            return Coming::ready(vec![Err(KvError::mesh_unavailable()); commands.len()]);
        }
        let (answers, rx) = oneshot::channel();
        let coming = Coming::new(rx, commands.len());
        let queue = {
            let mut forwarders = self.inner.forwarders.lock();
            match forwarders.get(owner) {
                Some(queue) if !queue.is_closed() => queue.clone(),
                _ => {
                    let (queue, jobs) = mpsc::channel(FORWARD_QUEUE);
                    forwarders.insert(owner.to_owned(), queue.clone());
                    tokio::spawn(forward_loop(self.clone(), owner.to_owned(), jobs));
                    queue
                }
            }
        };
        let job = Job {
            commands,
            via,
            answers,
        };
        if let Err(mpsc::error::SendError(job)) = queue.send(job).await {
            let _ = job
                .answers
                .send(vec![Err(KvError::mesh_unavailable()); job.commands.len()]);
        }
        coming
    }

    /// Publishes `commands` (with their encoded forms) to `owner` as one
    /// message, and returns the answers to wait for. Messages published one
    /// after the other reach the owner in that order. The message says when
    /// this node stops waiting (or the node before it, if sooner).
    async fn send(&self, owner: &str, commands: Vec<(Command, Vec<u8>)>, via: Via) -> InFlight {
        let hops = via.hops;
        let span = debug_span!("forward", node = owner, size = commands.len(), hops);
        let batch = commands.len() != 1;
        let (commands, parts): (Vec<Command>, Vec<Vec<u8>>) = commands.into_iter().unzip();
        let body = if batch {
            wire::join_batch(&parts)
        } else {
            parts.into_iter().next().unwrap_or_default()
        };
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut flight = InFlight {
            inner: inner.clone(),
            id,
            rx,
            deadline: Instant::now() + inner.timeout,
            owner: owner.to_owned(),
            commands,
            batch,
            answers: Vec::new(),
        };
        // While disconnected the client would queue the request until it
        // times out; say at once that the mesh is down instead.
        if !self.is_connected() {
            flight.fail_rest(KvError::mesh_unavailable());
            return flight;
        }
        inner.waiting.lock().insert(
            id,
            Waiter {
                owner: Arc::from(owner),
                tx,
            },
        );
        let mut headers = HeaderMap::new();
        headers.insert(HOPS_HEADER, hops.to_string().as_str());
        let gives_up = wire::now_ms() + inner.timeout.as_millis() as u64;
        let deadline = via.deadline.map_or(gives_up, |d| d.min(gives_up));
        headers.insert(DEADLINE_HEADER, deadline.to_string().as_str());
        let published = inner
            .client
            .publish_with_reply_and_headers(
                node_subject(owner),
                format!("{}.{id}", inner.inbox),
                headers,
                body.into(),
            )
            .instrument(span)
            .await;
        if let Err(err) = published {
            // Not sent: nothing can have happened on the owner.
            flight.fail_rest(match err.kind() {
                PublishErrorKind::MaxPayloadExceeded => KvError::bad_request("value too large"),
                _ => {
                    debug!(error = %err, node = owner, "publish failed");
                    KvError::mesh_unavailable()
                }
            });
        }
        flight
    }
}

/// Drains one owner's queue: publishes what has gathered (in order, grouped by
/// how they came (hops, deadline), cut into messages that fit), and hands each job its answers
/// without waiting for them before publishing more.
async fn forward_loop(mesh: Mesh, owner: String, mut jobs: mpsc::Receiver<Job>) {
    let mut gathered: Vec<Job> = Vec::new();
    while let Some(first) = jobs.recv().await {
        gathered.push(first);
        // Let the connections that are ready to run add their commands first:
        // under load this gathers a bigger message for the same round trip.
        tokio::task::yield_now().await;
        let mut count = gathered[0].commands.len();
        while count < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => {
                    count += job.commands.len();
                    gathered.push(job);
                }
                Err(_) => break,
            }
        }
        let limit = mesh.max_payload().saturating_sub(MESSAGE_SLACK);
        let mut flights = Vec::new();
        let mut shares = Vec::with_capacity(gathered.len());
        while !gathered.is_empty() {
            // One message holds jobs that came the same way, in queue order.
            let via = gathered[0].via;
            let same = gathered.iter().take_while(|j| j.via == via).count();
            let mut message: Vec<(Command, Vec<u8>)> = Vec::new();
            let mut bytes = 0;
            for job in gathered.drain(..same) {
                shares.push((job.commands.len(), job.answers));
                for command in job.commands {
                    let part = wire::encode_request(&command);
                    if !message.is_empty()
                        && (message.len() >= MAX_BATCH || bytes + part.len() + 1 > limit)
                    {
                        let full = std::mem::take(&mut message);
                        flights.push(mesh.send(&owner, full, via).await);
                        bytes = 0;
                    }
                    bytes += part.len() + 1;
                    message.push((command, part));
                }
            }
            if !message.is_empty() {
                flights.push(mesh.send(&owner, message, via).await);
            }
        }
        tokio::spawn(share_out(flights, shares));
    }
}

/// Gives each job its slice of the messages' answers, in order, as soon as
/// the messages holding them are answered.
async fn share_out(flights: Vec<InFlight>, shares: Vec<(usize, oneshot::Sender<Answers>)>) {
    let mut flights = flights.into_iter();
    let mut ready = std::collections::VecDeque::new();
    for (len, to) in shares {
        while ready.len() < len {
            match flights.next() {
                Some(flight) => ready.extend(flight.wait().await),
                None => break,
            }
        }
        let mine: Answers = ready.drain(..len.min(ready.len())).collect();
        let _ = to.send(mine);
    }
}

/// A message on its way: the commands it carries and their answers so far.
/// Dropping it forgets the request.
struct InFlight {
    inner: Arc<Inner>,
    id: u64,
    rx: mpsc::UnboundedReceiver<Delivery>,
    deadline: Instant,
    owner: String,
    commands: Vec<Command>,
    /// Sent as a batch (the reply is `{"ok":true,"replies":[..]}`, possibly
    /// over several messages), or as a plain request.
    batch: bool,
    answers: Answers,
}

impl InFlight {
    /// Waits (until the request timeout, counted from sending) for an answer
    /// to every command.
    async fn wait(mut self) -> Answers {
        while self.answers.len() < self.commands.len() {
            let message = match tokio::time::timeout_at(self.deadline, self.rx.recv()).await {
                Err(_) => {
                    self.fail_rest(KvError::timed_out(&self.owner));
                    break;
                }
                // The connection went away after the request was sent.
                Ok(None) => {
                    self.lose_rest(KvError::mesh_unavailable());
                    break;
                }
                Ok(Some(Delivery::Reply(message))) => message,
                Ok(Some(Delivery::Left)) => {
                    self.fail_rest(KvError::node_unavailable(&self.owner));
                    break;
                }
            };
            // The server answers for an owner with no subscriber at once:
            // nothing ran.
            if message.status == Some(StatusCode::NO_RESPONDERS) {
                self.fail_rest(KvError::node_unavailable(&self.owner));
                break;
            }
            self.take(&message.payload);
        }
        std::mem::take(&mut self.answers)
    }

    /// Takes the answers in one reply message.
    fn take(&mut self, body: &[u8]) {
        let at = self.answers.len();
        if !self.batch {
            let answer = wire::decode_reply(&self.commands[at], body);
            self.answers.push(answer.unwrap_or_else(|BadReply| {
                Err(unknown(
                    &self.commands[at],
                    bad_reply(&self.owner),
                    &self.owner,
                ))
            }));
            return;
        }
        match wire::decode_batch_reply(&self.commands[at..], body) {
            Ok(wire::BatchReply::Failed(err)) => self.fail_rest(err),
            Ok(wire::BatchReply::Replies(replies)) => {
                for (command, reply) in self.commands[at..].iter().zip(replies) {
                    self.answers.push(reply.unwrap_or_else(|BadReply| {
                        Err(unknown(command, bad_reply(&self.owner), &self.owner))
                    }));
                }
            }
            Err(BadReply) => self.lose_rest(bad_reply(&self.owner)),
        }
    }

    /// Every command still without an answer gets `err`: nothing of them ran.
    fn fail_rest(&mut self, err: KvError) {
        let missing = self.commands.len() - self.answers.len();
        self.answers.extend(std::iter::repeat_n(Err(err), missing));
    }

    /// Every command still without an answer may or may not have run: a
    /// write says its outcome is unknown, a read gets `err`.
    fn lose_rest(&mut self, err: KvError) {
        let at = self.answers.len();
        for command in &self.commands[at..] {
            self.answers
                .push(Err(unknown(command, err.clone(), &self.owner)));
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.inner.waiting.lock().remove(&self.id);
    }
}

/// The error for a command whose answer was lost: `err` for a read, which
/// changed nothing; for a write, which may have been stored, that its outcome
/// is unknown.
fn unknown(command: &Command, err: KvError, owner: &str) -> KvError {
    match command {
        Command::Get { .. } | Command::Where { .. } => err,
        _ => KvError::outcome_unknown(owner),
    }
}

fn bad_reply(owner: &str) -> KvError {
    KvError::internal(format!("bad reply from node {owner}"))
}
