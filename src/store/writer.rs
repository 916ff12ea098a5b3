//! The active process's writes. Commands from every connection are planned
//! into batches, in order, and a batch's changes are applied to memory, and
//! answered, once JetStream has stored them; reads in a batch are answered
//! from memory in their turn. Every message carries the fence described in
//! `role.rs` (`Nats-Expected-Last-Subject-Sequence` on the `active` key).
//!
//! How a batch travels depends on the store's replicas:
//! - one replica: its messages are published one by one, and many batches
//!   are on their way at once, their acknowledgements taken in order (a
//!   message is stored or not on its own);
//! - several replicas: one JetStream atomic batch at a time (stored whole or
//!   not at all), while the next one gathers. A replicated stream refuses a
//!   second fenced message while one is still being agreed on, so these
//!   batches cannot overlap; many writes share each round trip instead.
//!
//! A CREATE or DROP ends its batch, and the next batch waits until it is
//! applied: whether a bucket exists decides what the writes after it do.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use hashbrown::HashMap;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::acks::Acks;
use super::keys::{self, bucket_key, entry_key};
use super::role::{Keeper, Phase};
use super::{Job, Shared};
use crate::command::{Command, Reply};
use crate::error::KvError;
use crate::mesh::Answers;

/// The most messages in one batch (JetStream's limit for an atomic batch).
const MAX_MESSAGES: usize = 1000;

/// The most payload bytes in one batch.
const MAX_BYTES: usize = 4 << 20;

/// The most commands planned into one batch (reads included).
const MAX_ITEMS: usize = 4096;

/// With one replica, the most batches on their way at once.
const MAX_IN_FLIGHT: usize = 64;

/// With batches on their way, how many turns the writer gives the tasks
/// that are ready before it sends a batch of fewer than [`GATHER_ENOUGH`]
/// commands. Three turns cut the node's CPU a write by about a sixth under
/// 50 connections writing, and a write alone waits a few microseconds more.
const GATHER_TURNS: usize = 3;

/// Commands enough for a batch without waiting for more.
const GATHER_ENOUGH: usize = 32;

/// One message of a batch.
pub(super) struct Outgoing {
    /// The KV key.
    key: String,
    value: Bytes,
    delete: bool,
}

impl Outgoing {
    pub fn put(key: String, value: String) -> Self {
        Self {
            key,
            value: Bytes::from(value),
            delete: false,
        }
    }

    fn delete(key: String) -> Self {
        Self {
            key,
            value: Bytes::new(),
            delete: true,
        }
    }
}

/// What became of a message.
#[derive(Debug, Clone)]
pub(super) enum Sent {
    /// Stored at this stream sequence.
    Stored(u64),
    /// Refused by the fence: another process has taken over.
    Deposed,
    /// Certainly not stored (not connected, JetStream said no).
    Refused(String),
    /// Perhaps stored: the answer did not come.
    Unknown(String),
}

impl Sent {
    /// What JetStream's answer to a publish means. On a replicated store
    /// an error other than a failed expectation may come after the write
    /// was proposed to the replicas (a leader that lost its place, say), and
    /// the write may still be stored: its outcome is unknown.
    pub fn of(result: Result<PublishAck, PublishError>, replicated: bool) -> Sent {
        match result {
            Ok(ack) => Sent::Stored(ack.sequence),
            Err(err) => match err.kind() {
                PublishErrorKind::WrongLastSequence => Sent::Deposed,
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                    Sent::Unknown(err.to_string())
                }
                PublishErrorKind::Other => {
                    Sent::of_error(api_code(&err), replicated, err.to_string())
                }
                _ => Sent::Refused(err.to_string()),
            },
        }
    }

    /// What JetStream's error code for a write means (`None`: an error
    /// without one, such as an answer that does not parse): the fence's
    /// refusal deposes this process; a refusal made before anything was
    /// proposed, or any error on a one-replica store, leaves it unstored;
    /// on a replicated store any other error may follow a proposal.
    pub(super) fn of_error(code: Option<u64>, replicated: bool, why: String) -> Sent {
        match code {
            Some(WRONG_LAST_SEQUENCE) => Sent::Deposed,
            Some(FENCE_IN_PROCESS) => Sent::Refused(why),
            _ if replicated => Sent::Unknown(why),
            _ => Sent::Refused(why),
        }
    }

    /// Whether this process may no longer trust its memory as the owner.
    fn poisons(&self) -> bool {
        matches!(self, Sent::Deposed | Sent::Unknown(_))
    }
}

/// JetStream's error code when an expected last sequence did not match:
/// the fence refused the write.
const WRONG_LAST_SEQUENCE: u64 = 10071;

/// JetStream's error code when a replicated stream refuses a fenced
/// message because another one is still being agreed on: checked before
/// anything is proposed, so certainly not stored.
const FENCE_IN_PROCESS: u64 = 10164;

/// The JetStream error code behind a publish error, if it has one.
fn api_code(err: &PublishError) -> Option<u64> {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
        .map(|api| api.error_code().0)
}

type Outcomes = Pin<Box<dyn Future<Output = Vec<Sent>> + Send>>;

/// A batch on its way, and what JetStream said of each message.
type Landing = Pin<Box<dyn Future<Output = (Flight, Vec<Sent>)> + Send>>;

/// A change to apply to memory once JetStream has it.
enum Change {
    Create {
        bucket: String,
        generation: u64,
    },
    Put {
        bucket: String,
        key: String,
        value: String,
    },
    Delete {
        bucket: String,
        key: String,
    },
    Drop {
        bucket: String,
        generation: u64,
    },
}

/// One command of a batch, planned.
enum Planned {
    /// Answered already (refused, or nothing to store).
    Answer(Result<Reply, KvError>),
    /// Applied and answered `OK` once its message (by index) is stored.
    Change(Change, usize),
    /// Answered from memory in its turn.
    Read(Command),
}

/// Where a command's answer goes: job and position.
#[derive(Clone, Copy)]
struct Slot {
    job: u64,
    index: usize,
}

/// A job's answers as they come in.
struct Answering {
    answers: Vec<Option<Result<Reply, KvError>>>,
    left: usize,
    to: oneshot::Sender<Answers>,
}

/// Commands waiting for their answers, by job.
#[derive(Default)]
struct Pending {
    queued: VecDeque<(Slot, Command)>,
    answering: HashMap<u64, Answering>,
    next_job: u64,
}

impl Pending {
    fn add(&mut self, commands: Vec<Command>, to: oneshot::Sender<Answers>) {
        let id = self.next_job;
        self.next_job += 1;
        let len = commands.len();
        if len == 0 {
            let _ = to.send(Vec::new());
            return;
        }
        self.answering.insert(
            id,
            Answering {
                answers: (0..len).map(|_| None).collect(),
                left: len,
                to,
            },
        );
        self.queued.extend(
            commands
                .into_iter()
                .enumerate()
                .map(|(index, c)| (Slot { job: id, index }, c)),
        );
    }

    fn answer(&mut self, shared: &Shared, slot: Slot, answer: Result<Reply, KvError>) {
        shared.busy.fetch_sub(1, Ordering::AcqRel);
        let Some(job) = self.answering.get_mut(&slot.job) else {
            return;
        };
        if let Some(place) = job.answers.get_mut(slot.index) {
            *place = Some(answer);
        }
        job.left -= 1;
        if job.left == 0
            && let Some(done) = self.answering.remove(&slot.job)
        {
            let answers = done
                .answers
                .into_iter()
                .map(|a| a.unwrap_or_else(|| Err(KvError::internal("no answer"))))
                .collect();
            let _ = done.to.send(answers);
        }
    }

    /// Refuses everything still queued.
    fn refuse_all(&mut self, shared: &Shared) {
        while let Some((slot, _)) = self.queued.pop_front() {
            self.answer(shared, slot, Err(KvError::store_unavailable()));
        }
    }
}

/// A batch: its messages, and its commands in order.
#[derive(Default)]
struct Batch {
    messages: Vec<Outgoing>,
    items: Vec<(Slot, Planned)>,
    bytes: usize,
    /// Buckets created or dropped earlier in this batch: their generation,
    /// or `None` once dropped.
    buckets: HashMap<String, Option<u64>>,
    /// Whether it creates or drops a bucket.
    structural: bool,
}

/// A batch on its way: what JetStream will say of each message.
struct Flight {
    batch: Batch,
    sent_at: u64,
}

/// Takes the jobs already queued, up to [`MAX_ITEMS`] commands; none after
/// a release or a seal, which wait for what came before them.
fn take_queued(
    jobs: &mut mpsc::Receiver<Job>,
    pending: &mut Pending,
    release: &mut Option<oneshot::Sender<()>>,
    sealing: &mut Option<Sealing>,
) {
    while release.is_none() && sealing.is_none() && pending.queued.len() < MAX_ITEMS {
        match jobs.try_recv() {
            Ok(Job::Commands { commands, answers }) => pending.add(commands, answers),
            Ok(Job::Release(done)) => *release = Some(done),
            Ok(Job::Seal { bytes, seal, done }) => *sealing = Some((bytes, seal, done)),
            Err(_) => break,
        }
    }
}

/// A seal waiting for the writes before it: the bytes, seal or unseal, and
/// where to say it was done.
type Sealing = (Vec<u8>, bool, oneshot::Sender<bool>);

impl Keeper {
    /// The active process's loop: batches until it stops or steps down.
    pub(super) async fn write(&mut self, jobs: &mut mpsc::Receiver<Job>) -> Phase {
        let heartbeat = self.options.failover_after / 4;
        let atomic = self.replicated();
        let max_in_flight = if atomic { 1 } else { MAX_IN_FLIGHT };
        let mut pending = Pending::default();
        let mut release: Option<oneshot::Sender<()>> = None;
        // A seal waiting for the writes before it: no job is taken meanwhile.
        let mut sealing: Option<Sealing> = None;
        let mut last_sent = tokio::time::Instant::now();
        let mut flights: FuturesOrdered<Landing> = FuturesOrdered::new();
        // A CREATE or DROP on its way: nothing starts after it until applied.
        let mut structural = false;
        loop {
            // Everything already queued joins the batches.
            take_queued(jobs, &mut pending, &mut release, &mut sealing);
            // Batches are on their way and only a few commands wait: let the
            // connections that are ready run first, so that their writes
            // join the same batch rather than one batch each.
            if !flights.is_empty() && !pending.queued.is_empty() {
                for _ in 0..GATHER_TURNS {
                    if pending.queued.len() >= GATHER_ENOUGH {
                        break;
                    }
                    tokio::task::yield_now().await;
                    take_queued(jobs, &mut pending, &mut release, &mut sealing);
                }
            }
            while !pending.queued.is_empty() && flights.len() < max_in_flight && !structural {
                let mut batch = self.plan(&mut pending, atomic);
                if batch.messages.is_empty() && !self.shared.lease_holds() {
                    // Reads that need proof this process is still active.
                    batch.messages.push(self.alive_message());
                }
                structural = batch.structural;
                last_sent = tokio::time::Instant::now();
                flights.push_back(self.dispatch(batch, atomic).await);
            }
            if flights.is_empty()
                && pending.queued.is_empty()
                && let Some((bytes, seal, done)) = sealing.take()
            {
                if seal {
                    self.registry.seal(&bytes);
                } else {
                    self.registry.unseal(&bytes);
                }
                let _ = done.send(true);
                continue;
            }
            if flights.is_empty()
                && pending.queued.is_empty()
                && let Some(done) = release.take()
            {
                return self.release(done).await;
            }
            let idle = flights.is_empty() && pending.queued.is_empty();
            tokio::select! {
                job = jobs.recv(), if release.is_none() && sealing.is_none() => match job {
                    Some(Job::Commands { commands, answers }) => pending.add(commands, answers),
                    Some(Job::Release(done)) => release = Some(done),
                    Some(Job::Seal { bytes, seal, done }) => sealing = Some((bytes, seal, done)),
                    None => return Phase::Stopped,
                },
                Some((flight, outcomes)) = flights.next(), if !flights.is_empty() => {
                    structural &= !flight.batch.structural;
                    if outcomes.iter().any(Sent::poisons) {
                        self.shared.active.store(false, Ordering::Release);
                        let deposed = outcomes.iter().any(|o| matches!(o, Sent::Deposed));
                        self.answer_batch(&mut pending, flight, &outcomes);
                        // The batches after it meet the same fate; answer them.
                        while let Some((flight, outcomes)) = flights.next().await {
                            self.answer_batch(&mut pending, flight, &outcomes);
                        }
                        pending.refuse_all(&self.shared);
                        let why = if deposed {
                            warn!(node = %self.options.node, "another process has taken over this node's store; stepping down");
                            "another process took over while this one was silent or cut off"
                        } else {
                            warn!(node = %self.options.node, "no answer from JetStream for a write; loading the store again");
                            "a write's outcome is unknown"
                        };
                        return self.step_down(why, release);
                    }
                    self.answer_batch(&mut pending, flight, &outcomes);
                },
                () = tokio::time::sleep_until(last_sent + heartbeat), if idle => {
                    let mut batch = Batch::default();
                    batch.messages.push(self.alive_message());
                    last_sent = tokio::time::Instant::now();
                    flights.push_back(self.dispatch(batch, atomic).await);
                }
            }
        }
    }

    /// Sends a batch's messages now, in order, and returns what JetStream
    /// will say of each.
    async fn dispatch(&mut self, mut batch: Batch, atomic: bool) -> Landing {
        let sent_at = self.shared.now_ms();
        let messages = std::mem::take(&mut batch.messages);
        let outcomes = self.send(messages, atomic).await;
        let flight = Flight { batch, sent_at };
        Box::pin(async move { (flight, outcomes.await) })
    }

    /// Answers a batch's commands in order: each change applied if its
    /// message was stored; reads from memory unless this process may no
    /// longer trust it.
    fn answer_batch(&mut self, pending: &mut Pending, flight: Flight, outcomes: &[Sent]) {
        if outcomes.iter().any(|o| matches!(o, Sent::Stored(_))) {
            self.renew_lease(flight.sent_at);
        }
        if let Some(Sent::Stored(sequence)) = outcomes.last() {
            debug!(sequence, messages = outcomes.len(), "batch stored");
        }
        let poisoned = outcomes.iter().any(Sent::poisons);
        for (slot, planned) in flight.batch.items {
            let answer = match planned {
                Planned::Answer(answer) => answer,
                Planned::Change(change, i) => match outcomes.get(i) {
                    Some(Sent::Stored(_)) => self.apply_change(change),
                    Some(Sent::Unknown(_)) => Err(KvError::outcome_unknown(&self.options.node)),
                    Some(Sent::Refused(error)) => {
                        debug!(%error, "JetStream did not store a write");
                        Err(KvError::store_unavailable())
                    }
                    _ => Err(KvError::store_unavailable()),
                },
                Planned::Read(_) if poisoned => Err(KvError::store_unavailable()),
                Planned::Read(Command::Where { .. }) => {
                    Err(KvError::internal("WHERE reached the store"))
                }
                Planned::Read(read) => self.registry.apply(read.borrowed()),
            };
            pending.answer(&self.shared, slot, answer);
        }
    }

    /// Leaves the active role: stop at once when asked to, else load again.
    fn step_down(&self, why: &str, release: Option<oneshot::Sender<()>>) -> Phase {
        match release {
            Some(done) => {
                let _ = done.send(());
                Phase::Stopped
            }
            None => Phase::Reload(why.to_owned()),
        }
    }

    /// Hands the store over on a clean stop: the `active` key emptied, so
    /// that a standby takes over at once.
    async fn release(&mut self, done: oneshot::Sender<()>) -> Phase {
        self.shared.active.store(false, Ordering::Release);
        self.shared.lease_until.store(0, Ordering::Release);
        let empty = Outgoing::put(keys::ACTIVE_KEY.to_owned(), String::new());
        let outcomes = self.send(vec![empty], false).await.await;
        match outcomes.first() {
            Some(Sent::Stored(_)) => debug!("handed the store over"),
            _ => debug!(
                "could not hand the store over; a standby takes over once this one is silent"
            ),
        }
        let _ = done.send(());
        Phase::Stopped
    }

    /// Plans queued commands into one batch; in one-by-one mode a CREATE or
    /// DROP ends it (a later message may be stored when it was not).
    fn plan(&mut self, pending: &mut Pending, atomic: bool) -> Batch {
        let mut batch = Batch::default();
        while let Some((slot, command)) = pending.queued.pop_front() {
            let planned = self.plan_one(command, &mut batch);
            batch.items.push((slot, planned));
            if batch.messages.len() >= MAX_MESSAGES
                || batch.bytes >= MAX_BYTES
                || batch.items.len() >= MAX_ITEMS
                || (batch.structural && !atomic)
            {
                break;
            }
        }
        batch
    }

    fn plan_one(&mut self, command: Command, batch: &mut Batch) -> Planned {
        let generation = |bucket: &str, batch: &Batch| match batch.buckets.get(bucket) {
            Some(planned) => *planned,
            None => self.registry.generation(bucket),
        };
        if command
            .bucket()
            .as_bytes()
            .first()
            .is_some_and(|b| self.registry.is_sealed(*b))
            && !matches!(command, Command::Get { .. } | Command::Where { .. })
        {
            return Planned::Answer(Err(KvError::moving(command.bucket())));
        }
        let (message, change) = match command {
            Command::Get { .. } | Command::Where { .. } => return Planned::Read(command),
            Command::Create { bucket } => {
                if generation(&bucket, batch).is_some() {
                    return Planned::Answer(Ok(Reply::Ok));
                }
                if !self.registry.has_room() {
                    return Planned::Answer(Err(KvError::internal("too many buckets")));
                }
                let generation = self.new_generation();
                batch.buckets.insert(bucket.clone(), Some(generation));
                batch.structural = true;
                (
                    Outgoing::put(bucket_key(&bucket), generation.to_string()),
                    Change::Create { bucket, generation },
                )
            }
            Command::Drop { bucket } => {
                let Some(generation) = generation(&bucket, batch) else {
                    return Planned::Answer(Err(KvError::not_found(&bucket)));
                };
                batch.buckets.insert(bucket.clone(), None);
                batch.structural = true;
                (
                    Outgoing::delete(bucket_key(&bucket)),
                    Change::Drop { bucket, generation },
                )
            }
            Command::Put { bucket, key, value } => {
                let Some(generation) = generation(&bucket, batch) else {
                    return Planned::Answer(Err(KvError::not_found(&bucket)));
                };
                (
                    Outgoing::put(entry_key(generation, &key), value.clone()),
                    Change::Put { bucket, key, value },
                )
            }
            Command::Delete { bucket, key } => {
                let Some(generation) = generation(&bucket, batch) else {
                    return Planned::Answer(Err(KvError::not_found(&bucket)));
                };
                (
                    Outgoing::delete(entry_key(generation, &key)),
                    Change::Delete { bucket, key },
                )
            }
        };
        batch.bytes += message.value.len() + message.key.len();
        batch.messages.push(message);
        Planned::Change(change, batch.messages.len() - 1)
    }

    fn apply_change(&self, change: Change) -> Result<Reply, KvError> {
        match change {
            Change::Create { bucket, generation } => {
                self.registry.create_with_generation(&bucket, generation);
                Ok(Reply::Ok)
            }
            Change::Drop { bucket, generation } => {
                let answer = if self.registry.remove(&bucket) {
                    Ok(Reply::Ok)
                } else {
                    Err(KvError::not_found(&bucket))
                };
                // The keys can no longer be seen; purge them.
                let js = self.js.clone();
                let stream = self.stream.clone();
                let subject = format!("{}k.{generation}.>", self.prefix);
                tokio::spawn(async move {
                    match js.get_stream(&stream).await {
                        Ok(stream) => {
                            if let Err(err) = stream.purge().filter(subject).await {
                                debug!(error = %err, "could not purge a dropped bucket's keys");
                            }
                        }
                        Err(err) => debug!(error = %err, "could not purge a dropped bucket's keys"),
                    }
                });
                answer
            }
            Change::Put { bucket, key, value } => self.registry.apply(Command::Put {
                bucket: &bucket,
                key: &key,
                value: &value,
            }),
            Change::Delete { bucket, key } => self.registry.apply(Command::Delete {
                bucket: &bucket,
                key: &key,
            }),
        }
    }

    /// A generation number no other CREATE of this store has used: the time
    /// in microseconds, or one more than the last one given or seen in the
    /// store, whichever is larger (the clock may go back).
    fn new_generation(&mut self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        self.last_generation = now.max(self.last_generation + 1);
        self.last_generation
    }

    /// Publishes messages now, in order, each fenced (see `role.rs`): one
    /// by one, or as one atomic batch; returns what JetStream will say of
    /// each message.
    pub(super) async fn send(&mut self, messages: Vec<Outgoing>, atomic: bool) -> Outcomes {
        let count = messages.len();
        let refused = |why: String| -> Outcomes {
            Box::pin(std::future::ready(vec![Sent::Refused(why); count]))
        };
        // While disconnected the client would hold the messages until they
        // time out: refuse at once instead.
        if !self.shared.connected() {
            return refused("not connected to NATS".into());
        }
        let acks = match self.acks.take().filter(Acks::is_open) {
            Some(acks) => acks,
            None => match Acks::subscribe(&self.client, self.replicated()).await {
                Ok(acks) => acks,
                Err(err) => return refused(err),
            },
        };
        let acks = self.acks.insert(acks);
        // Before publishing: no acknowledgement can come first.
        let expected = acks.expect(count, atomic);
        self.batches += 1;
        let id = format!("{}-{}", self.options.process, self.batches);
        for (i, message) in messages.into_iter().enumerate() {
            let mut headers = self.fence.clone();
            if message.delete {
                headers.insert("KV-Operation", "DEL");
            }
            let last = i + 1 == count;
            if atomic {
                headers.insert("Nats-Batch-Id", id.as_str());
                headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
                if last {
                    headers.insert("Nats-Batch-Commit", "1");
                }
            }
            let mut subject = String::with_capacity(self.prefix.len() + message.key.len());
            subject.push_str(&self.prefix);
            subject.push_str(&message.key);
            let published = if atomic && !last {
                // Stored with the commit, or not at all.
                self.client
                    .publish_with_headers(subject, headers, message.value)
                    .await
            } else {
                self.client
                    .publish_with_reply_and_headers(
                        subject,
                        expected.reply(i),
                        headers,
                        message.value,
                    )
                    .await
            };
            match published {
                Ok(()) => {}
                Err(err) if atomic => return refused(err.to_string()),
                Err(err) => {
                    debug!(error = %err, "could not publish a write");
                    expected.not_published(i, &err.to_string());
                }
            }
        }
        Box::pin(expected.outcomes(self.options.timeout))
    }

    /// The fence every write carries once this process has taken over at
    /// stream sequence `takeover`: stored only while the `active` key is
    /// still the one this process wrote then.
    pub(super) fn fence_at(&self, takeover: u64) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            takeover.to_string().as_str(),
        );
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence-Subject",
            format!("{}{}", self.prefix, keys::ACTIVE_KEY).as_str(),
        );
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_jetstream_said_decides_the_answer() {
        let ack: PublishAck =
            serde_json::from_str(r#"{"stream":"KV_kvmesh_foo","seq":7}"#).expect("an ack");
        assert!(matches!(Sent::of(Ok(ack), false), Sent::Stored(7)));
        let error = |kind| Sent::of(Err(PublishError::new(kind)), false);
        // The fence refused it: another process took over.
        assert!(matches!(
            error(PublishErrorKind::WrongLastSequence),
            Sent::Deposed
        ));
        // No answer: perhaps stored; memory can no longer be trusted.
        assert!(matches!(
            error(PublishErrorKind::TimedOut),
            Sent::Unknown(_)
        ));
        assert!(matches!(
            error(PublishErrorKind::BrokenPipe),
            Sent::Unknown(_)
        ));
        assert!(error(PublishErrorKind::TimedOut).poisons());
        // JetStream said no, or nobody answers for the stream: not stored.
        assert!(matches!(
            error(PublishErrorKind::StreamNotFound),
            Sent::Refused(_)
        ));
        assert!(matches!(error(PublishErrorKind::Other), Sent::Refused(_)));
        assert!(!error(PublishErrorKind::Other).poisons());
        // On a replicated store, JetStream's other errors may come after the
        // write was proposed: unknown.
        let replicated = |kind| Sent::of(Err(PublishError::new(kind)), true);
        assert!(matches!(
            replicated(PublishErrorKind::Other),
            Sent::Unknown(_)
        ));
        assert!(matches!(
            replicated(PublishErrorKind::WrongLastSequence),
            Sent::Deposed
        ));
        assert!(matches!(
            replicated(PublishErrorKind::StreamNotFound),
            Sent::Refused(_)
        ));
    }
}
