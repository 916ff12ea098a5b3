//! The active process's writes: commands from every connection are planned
//! into one JetStream atomic batch at a time, sent without waiting between
//! messages, and applied to memory in order once JetStream stored the batch.
//! While a batch is on its way the next one gathers, so many writes share
//! each round trip, and a connection's pipelined writes take effect in
//! order. A read waits its turn only behind writes already on their way.
//!
//! Each batch's first message carries `Nats-Expected-Last-Sequence`: the
//! fencing described in `role.rs`. An atomic batch is stored whole or not at
//! all, so a refused batch leaves nothing behind.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::client::RequestErrorKind;
use async_nats::connection::State;
use async_nats::{HeaderMap, Request};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::keys::{self, bucket_key, entry_key};
use super::role::{Keeper, Phase};
use super::{Job, Shared};
use crate::command::{Command, Reply};
use crate::error::KvError;
use crate::mesh::Answers;

/// The most messages in one atomic batch (JetStream's limit).
const MAX_MESSAGES: usize = 1000;

/// The most payload bytes in one batch.
const MAX_BYTES: usize = 4 << 20;

/// The most commands planned into one batch (reads included).
const MAX_ITEMS: usize = 4096;

/// JetStream's error code for a failed `Nats-Expected-Last-Sequence`.
const WRONG_LAST_SEQUENCE: u64 = 10071;

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

/// What became of a batch.
pub(super) enum Sent {
    /// Stored, ending at this stream sequence.
    Stored(u64),
    /// Refused because something else was written to the store since this
    /// process's last batch: another process is active.
    Deposed,
    /// Certainly not stored (not connected, JetStream said no).
    Refused(String),
    /// Perhaps stored: the answer did not come.
    Unknown(String),
}

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
    /// Applied and answered `OK` once stored.
    Change(Change),
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

/// A batch being planned: its messages, and its commands in order.
#[derive(Default)]
struct Batch {
    messages: Vec<Outgoing>,
    items: Vec<(Slot, Planned)>,
    bytes: usize,
    /// Buckets created or dropped earlier in this batch: their generation,
    /// or `None` once dropped.
    buckets: HashMap<String, Option<u64>>,
}

impl Keeper {
    /// The active process's loop: batches until it stops or steps down.
    pub(super) async fn write(&mut self, mut seen: u64, jobs: &mut mpsc::Receiver<Job>) -> Phase {
        let heartbeat = self.options.failover_after / 4;
        let mut pending = Pending::default();
        let mut release: Option<oneshot::Sender<()>> = None;
        let mut last_sent = tokio::time::Instant::now();
        loop {
            if pending.queued.is_empty() {
                if let Some(done) = release.take() {
                    return self.release(seen, done).await;
                }
                tokio::select! {
                    job = jobs.recv() => match job {
                        Some(Job::Commands { commands, answers }) => pending.add(commands, answers),
                        Some(Job::Release(done)) => release = Some(done),
                        None => return Phase::Stopped,
                    },
                    () = tokio::time::sleep_until(last_sent + heartbeat) => {}
                }
            }
            // Everything else already queued joins this batch.
            while release.is_none() && pending.queued.len() < MAX_ITEMS {
                match jobs.try_recv() {
                    Ok(Job::Commands { commands, answers }) => pending.add(commands, answers),
                    Ok(Job::Release(done)) => release = Some(done),
                    Err(_) => break,
                }
            }
            let mut batch = self.plan(&mut pending);
            let reads_only = batch.messages.is_empty();
            if reads_only && !batch.items.is_empty() && self.shared.lease_holds() {
                // Nothing to store, and still surely the active process.
                self.apply(&mut pending, batch, true);
                continue;
            }
            if reads_only {
                // A heartbeat, or reads that need proof this process is
                // still the active one.
                batch.messages.push(self.active_message());
            }
            let sent_at = self.shared.now_ms();
            last_sent = tokio::time::Instant::now();
            match self.send(std::mem::take(&mut batch.messages), seen).await {
                Sent::Stored(sequence) => {
                    seen = sequence;
                    self.renew_lease(sent_at);
                    self.apply(&mut pending, batch, true);
                }
                Sent::Refused(error) => {
                    debug!(%error, "JetStream did not store a batch");
                    self.apply(&mut pending, batch, false);
                }
                Sent::Deposed => {
                    self.shared.active.store(false, Ordering::Release);
                    for (slot, _) in batch.items {
                        pending.answer(&self.shared, slot, Err(KvError::store_unavailable()));
                    }
                    pending.refuse_all(&self.shared);
                    warn!(node = %self.options.node, "another process has taken over this node's store; stepping down");
                    return self.step_down(
                        "another process took over while this one was silent or cut off",
                        release,
                    );
                }
                Sent::Unknown(error) => {
                    self.shared.active.store(false, Ordering::Release);
                    let unknown = KvError::outcome_unknown(&self.options.node);
                    for (slot, planned) in batch.items {
                        let answer = match planned {
                            Planned::Answer(answer) => answer,
                            Planned::Change(_) => Err(unknown.clone()),
                            Planned::Read(_) => Err(KvError::store_unavailable()),
                        };
                        pending.answer(&self.shared, slot, answer);
                    }
                    pending.refuse_all(&self.shared);
                    warn!(%error, "no answer from JetStream for a batch; loading the store again");
                    return self.step_down("a batch's outcome is unknown", release);
                }
            }
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
    async fn release(&mut self, seen: u64, done: oneshot::Sender<()>) -> Phase {
        self.shared.active.store(false, Ordering::Release);
        self.shared.lease_until.store(0, Ordering::Release);
        let empty = Outgoing::put(keys::ACTIVE_KEY.to_owned(), String::new());
        match self.send(vec![empty], seen).await {
            Sent::Stored(_) => debug!("handed the store over"),
            Sent::Deposed | Sent::Refused(_) | Sent::Unknown(_) => {
                debug!(
                    "could not hand the store over; a standby takes over once this one is silent"
                )
            }
        }
        let _ = done.send(());
        Phase::Stopped
    }

    /// Plans queued commands into one batch.
    fn plan(&mut self, pending: &mut Pending) -> Batch {
        let mut batch = Batch::default();
        while let Some((slot, command)) = pending.queued.pop_front() {
            let planned = self.plan_one(command, &mut batch);
            batch.items.push((slot, planned));
            if batch.messages.len() >= MAX_MESSAGES
                || batch.bytes >= MAX_BYTES
                || batch.items.len() >= MAX_ITEMS
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
        Planned::Change(change)
    }

    /// Answers a batch's commands in order: its changes applied when
    /// `stored`, refused otherwise; reads from memory.
    fn apply(&self, pending: &mut Pending, batch: Batch, stored: bool) {
        for (slot, planned) in batch.items {
            let answer = match planned {
                Planned::Answer(answer) => answer,
                Planned::Change(change) if stored => self.apply_change(change),
                Planned::Change(_) => Err(KvError::store_unavailable()),
                Planned::Read(Command::Where { .. }) => {
                    Err(KvError::internal("WHERE reached the store"))
                }
                Planned::Read(read) => self.registry.apply(read.borrowed()),
            };
            pending.answer(&self.shared, slot, answer);
        }
    }

    fn apply_change(&self, change: Change) -> Result<Reply, KvError> {
        match change {
            Change::Create { bucket, generation } => {
                self.registry.create_with_generation(&bucket, generation);
                Ok(Reply::Ok)
            }
            Change::Drop { bucket, generation } => {
                let answer = self.registry.apply(Command::Drop { bucket: &bucket });
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

    /// Sends one atomic batch, stored only if the store's last sequence is
    /// still `seen`.
    pub(super) async fn send(&mut self, messages: Vec<Outgoing>, seen: u64) -> Sent {
        // While disconnected the client would hold the messages until the
        // request times out: refuse at once instead.
        if self.client.connection_state() != State::Connected {
            return Sent::Refused("not connected to NATS".into());
        }
        self.batches += 1;
        let id = format!("{}-{}", self.options.process, self.batches);
        let count = messages.len();
        let mut last = None;
        for (i, message) in messages.into_iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Batch-Id", id.as_str());
            headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            if i == 0 {
                headers.insert("Nats-Expected-Last-Sequence", seen.to_string().as_str());
            }
            if message.delete {
                headers.insert("KV-Operation", "DEL");
            }
            let subject = format!("{}{}", self.prefix, message.key);
            if i + 1 == count {
                headers.insert("Nats-Batch-Commit", "1");
                last = Some((subject, headers, message.value));
            } else if let Err(err) = self
                .client
                .publish_with_headers(subject, headers, message.value)
                .await
            {
                return Sent::Refused(err.to_string());
            }
        }
        let Some((subject, headers, value)) = last else {
            return Sent::Stored(seen);
        };
        let request = Request::new()
            .headers(headers)
            .payload(value)
            .timeout(Some(self.options.timeout));
        match self.client.send_request(subject, request).await {
            Ok(reply) => read_ack(&reply.payload),
            Err(err) if err.kind() == RequestErrorKind::NoResponders => {
                Sent::Refused("JetStream is not answering for the store".into())
            }
            Err(err) => Sent::Unknown(err.to_string()),
        }
    }
}

/// Reads JetStream's answer to a batch's commit.
fn read_ack(payload: &[u8]) -> Sent {
    let Ok(ack) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return Sent::Unknown("JetStream's answer was not JSON".into());
    };
    if let Some(error) = ack.get("error") {
        let code = error.get("err_code").and_then(|c| c.as_u64());
        let text = error
            .get("description")
            .and_then(|d| d.as_str())
            .unwrap_or("refused");
        return match code {
            Some(WRONG_LAST_SEQUENCE) => Sent::Deposed,
            _ => Sent::Refused(text.to_owned()),
        };
    }
    match ack.get("seq").and_then(|s| s.as_u64()) {
        Some(sequence) => Sent::Stored(sequence),
        None => Sent::Unknown("JetStream's answer had no sequence".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_answers_are_read() {
        assert!(matches!(
            read_ack(br#"{"stream":"KV_kvmesh_t","seq":4,"batch":"b","count":3}"#),
            Sent::Stored(4)
        ));
        assert!(matches!(
            read_ack(br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 4"},"stream":"KV_kvmesh_t","seq":0}"#),
            Sent::Deposed
        ));
        assert!(matches!(
            read_ack(br#"{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#),
            Sent::Refused(text) if text.contains("temporarily")
        ));
        assert!(matches!(read_ack(b"nonsense"), Sent::Unknown(_)));
        assert!(matches!(read_ack(b"{}"), Sent::Unknown(_)));
    }
}
