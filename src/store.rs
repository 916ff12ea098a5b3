//! A durable node's store: its buckets in the JetStream key-value bucket
//! `kvmesh_<node>`, with a full copy in memory (the registry) that reads are
//! answered from.
//!
//! A write is published to JetStream and applied to memory only once
//! JetStream has acknowledged it; then it is answered `OK`. Writes from every
//! connection go through one task that publishes them as they come, without
//! waiting, and takes their acknowledgements in order: many writes share
//! JetStream's round trips, memory changes in the same order as the store,
//! and a connection's pipelined writes take effect in order. A read is
//! answered from memory at once when no write is on its way; otherwise it
//! waits its turn behind the writes sent before it, so that it never misses
//! one of them.
//!
//! The KV keys (see the README, "Durable nodes"):
//! - `b.<bucket>`: a bucket exists; the value is its generation, a number
//!   chosen at its CREATE;
//! - `k.<generation>.<key>`: a key of the bucket of that generation.
//!
//! A DROP deletes the `b.` key, one write: the keys of that generation can no
//! longer be seen (a CREATE of the same name starts a new generation, empty),
//! and are purged afterwards, at once and again at the next start. Names are
//! written with every byte outside `A-Z a-z 0-9 - _` as `=XX` (hex).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::connection::State;
use async_nats::jetstream::{self, kv};
use async_nats::{Client, HeaderMap};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::command::{Command, MAX_BUCKET_BYTES, MAX_KEY_BYTES, Reply, is_word};
use crate::error::KvError;
use crate::mesh::{Answers, Coming};
use crate::registry::Registry;

/// Commands queued for the store before submitters wait.
const QUEUE: usize = 4096;

/// The JetStream KV bucket of node `node`.
pub fn store_name(node: &str) -> String {
    format!("kvmesh_{node}")
}

/// A name as a KV key token: `A-Z a-z 0-9 - _` as they are, every other byte
/// as `=XX`.
pub fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("={byte:02X}"));
        }
    }
    out
}

/// The name a key token stands for, if it is one [`encode`] makes.
pub fn decode(token: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(token.len());
    let mut rest = token.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'=' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(first);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

fn bucket_key(bucket: &str) -> String {
    format!("b.{}", encode(bucket))
}

fn entry_key(generation: u64, key: &str) -> String {
    format!("k.{generation}.{}", encode(key))
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

/// What one command comes to, in its turn.
enum Step {
    /// Answered already (refused, or nothing to store).
    Answer(Result<Reply, KvError>),
    /// Stored (or not): apply and answer `OK`, or answer `store unavailable`.
    Stored(Result<(), String>, Change),
    /// A read: answered from memory in its turn.
    Read(Command),
}

type StepFuture = Pin<Box<dyn Future<Output = (Slot, Step)> + Send>>;

/// Where a command's answer goes: job and position.
#[derive(Clone, Copy)]
struct Slot {
    job: u64,
    index: usize,
}

/// Commands submitted together, with the place their answers go.
struct Job {
    commands: Vec<Command>,
    answers: oneshot::Sender<Answers>,
}

/// A durable node's store: cheap to clone.
#[derive(Clone)]
pub struct Store {
    queue: mpsc::Sender<Job>,
    /// Commands submitted and not yet answered.
    busy: Arc<AtomicUsize>,
}

impl Store {
    /// Opens (creating it with `replicas` on first start) the store of `node`
    /// and loads it into `registry`. Retries while NATS or JetStream is
    /// unreachable, saying so; returns only once loaded.
    pub async fn open(
        client: Client,
        node: &str,
        replicas: usize,
        registry: Registry,
        timeout: Duration,
    ) -> Store {
        let name = store_name(node);
        let mut js = jetstream::new(client.clone());
        js.set_timeout(timeout);
        let mut attempt = 0u32;
        let highest = loop {
            match open_and_load(&js, &name, replicas, &registry).await {
                Ok(highest) => break highest,
                Err(error) => {
                    attempt += 1;
                    warn!(
                        store = %name,
                        %error,
                        attempt,
                        "cannot load the store from JetStream; retrying (nothing is answered until it is loaded)"
                    );
                    tokio::time::sleep(Duration::from_millis(500).min(timeout)).await;
                }
            }
        };
        let (queue, jobs) = mpsc::channel(QUEUE);
        let busy = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            js,
            client,
            prefix: format!("$KV.{name}."),
            stream: format!("KV_{name}"),
            registry,
            busy: busy.clone(),
            last_generation: AtomicU64::new(highest),
        };
        tokio::spawn(writer.run(jobs));
        Store { queue, busy }
    }

    /// Whether no command is on its way through the store: a read may then be
    /// answered from memory at once.
    pub fn is_idle(&self) -> bool {
        self.busy.load(Ordering::Acquire) == 0
    }

    /// Queues commands (writes, and reads that must wait their turn) and
    /// returns their answers to come, one per command, in order.
    pub async fn submit(&self, commands: Vec<Command>) -> Coming {
        let (answers, rx) = oneshot::channel();
        let len = commands.len();
        self.busy.fetch_add(len, Ordering::AcqRel);
        if let Err(mpsc::error::SendError(job)) = self.queue.send(Job { commands, answers }).await {
            self.busy.fetch_sub(len, Ordering::AcqRel);
            let _ = job
                .answers
                .send(vec![Err(KvError::store_unavailable()); len]);
        }
        Coming::new(rx, len)
    }
}

/// Creates the KV bucket if it is missing, and loads what it holds.
async fn open_and_load(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    registry: &Registry,
) -> Result<u64, String> {
    let kv = match js.get_key_value(name).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: name.to_owned(),
                description: "kvmesh node store".into(),
                history: 1,
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot create the store: {e}"))?,
    };
    let started = Instant::now();
    let stream = js
        .get_stream(format!("KV_{name}"))
        .await
        .map_err(|e| format!("cannot read the store: {e}"))?;
    let messages = stream.cached_info().state.messages;
    let mut generations: HashMap<u64, String> = HashMap::new();
    let mut entries: Vec<(u64, String, String)> = Vec::new();
    let mut skipped = 0u64;
    if messages > 0 {
        let mut watch = kv
            .watch_with_history(">")
            .await
            .map_err(|e| format!("cannot read the store: {e}"))?;
        while let Some(entry) = watch.next().await {
            let entry = entry.map_err(|e| format!("cannot read the store: {e}"))?;
            if entry.operation == kv::Operation::Put
                && !take_entry(&entry.key, &entry.value, &mut generations, &mut entries)
            {
                skipped += 1;
            }
            if entry.delta == 0 {
                break;
            }
        }
    }
    registry.clear();
    for (generation, bucket) in &generations {
        registry.create_with_generation(bucket, *generation);
    }
    let mut keys = 0u64;
    let mut orphans: Vec<u64> = Vec::new();
    for (generation, key, value) in entries {
        match generations.get(&generation) {
            Some(bucket) => {
                let put = Command::Put {
                    bucket: bucket.as_str(),
                    key: key.as_str(),
                    value: value.as_str(),
                };
                if registry.apply(put).is_ok() {
                    keys += 1;
                }
            }
            None => orphans.push(generation),
        }
    }
    info!(
        store = %name,
        buckets = generations.len(),
        keys,
        ms = started.elapsed().as_millis() as u64,
        "store loaded"
    );
    if skipped > 0 {
        warn!(
            store = %name,
            skipped,
            "left out stored keys that kvmesh could not have written (bad names or values)"
        );
    }
    // Keys of dropped buckets whose purge did not finish: purge them now.
    orphans.sort_unstable();
    orphans.dedup();
    // New CREATEs take generations above all of these, so that keys left
    // of a dropped bucket can never belong to a new one.
    let highest = generations
        .keys()
        .chain(&orphans)
        .copied()
        .max()
        .unwrap_or(0);
    for generation in orphans {
        let subject = format!("$KV.{name}.k.{generation}.>");
        if let Err(err) = stream.purge().filter(subject).await {
            debug!(error = %err, generation, "could not purge the keys of a dropped bucket");
        }
    }
    Ok(highest)
}

/// Sorts one stored key into buckets and entries. Anything the protocol
/// could not have stored (the store is a plain KV bucket that others may
/// write to) is left out and counted: a value with a line break must never
/// reach a client's screen. Returns whether the key was taken.
fn take_entry(
    key: &str,
    value: &[u8],
    generations: &mut HashMap<u64, String>,
    entries: &mut Vec<(u64, String, String)>,
) -> bool {
    let Ok(value) = std::str::from_utf8(value) else {
        return false;
    };
    let bucket_name = |name: &str| is_word(name) && name.len() <= MAX_BUCKET_BYTES;
    if let Some(bucket) = key.strip_prefix("b.") {
        if let (Some(bucket), Ok(generation)) = (decode(bucket), value.parse())
            && bucket_name(&bucket)
        {
            generations.insert(generation, bucket);
            return true;
        }
    } else if let Some(rest) = key.strip_prefix("k.")
        && let Some((generation, key)) = rest.split_once('.')
        && let (Ok(generation), Some(key)) = (generation.parse(), decode(key))
        && is_word(&key)
        && key.len() <= MAX_KEY_BYTES
        && is_word(value)
    {
        entries.push((generation, key, value.to_owned()));
        return true;
    }
    false
}

/// The task that publishes writes and applies them in order.
struct Writer {
    js: jetstream::Context,
    client: Client,
    /// `$KV.kvmesh_<node>.`
    prefix: String,
    /// `KV_kvmesh_<node>`, for purging a dropped bucket's keys.
    stream: String,
    registry: Registry,
    busy: Arc<AtomicUsize>,
    /// The last generation given to a CREATE (or seen in the store).
    last_generation: AtomicU64,
}

/// A job's answers as they come in.
struct Answering {
    answers: Vec<Option<Result<Reply, KvError>>>,
    left: usize,
    to: oneshot::Sender<Answers>,
}

impl Writer {
    async fn run(self, mut jobs: mpsc::Receiver<Job>) {
        let mut steps: FuturesOrdered<StepFuture> = FuturesOrdered::new();
        let mut answering: HashMap<u64, Answering> = HashMap::new();
        let mut next_job = 0u64;
        // CREATEs and DROPs stored but not yet applied: a write that follows
        // one waits for it, since whether its bucket exists depends on it.
        let mut structural = 0usize;
        let mut queued: VecDeque<(Slot, Command)> = VecDeque::new();
        loop {
            if queued.is_empty() {
                tokio::select! {
                    job = jobs.recv() => match job {
                        Some(job) => {
                            let id = next_job;
                            next_job += 1;
                            let len = job.commands.len();
                            answering.insert(id, Answering {
                                answers: (0..len).map(|_| None).collect(),
                                left: len,
                                to: job.answers,
                            });
                            queued.extend(job.commands.into_iter().enumerate().map(|(index, c)| (Slot { job: id, index }, c)));
                            if len == 0 {
                                self.finish(&mut answering, id);
                            }
                        }
                        None => break,
                    },
                    Some((slot, step)) = steps.next(), if !steps.is_empty() => {
                        structural -= self.take(slot, step, &mut answering);
                    }
                }
                continue;
            }
            // Send what is queued, in order.
            while let Some((slot, command)) = queued.pop_front() {
                let write = !matches!(command, Command::Get { .. } | Command::Where { .. });
                if write && structural > 0 {
                    // Wait for the CREATE or DROP before it to be applied.
                    queued.push_front((slot, command));
                    if let Some((slot, step)) = steps.next().await {
                        structural -= self.take(slot, step, &mut answering);
                    }
                    continue;
                }
                let (future, is_structural) = self.start(command).await;
                structural += usize::from(is_structural);
                steps.push_back(Box::pin(async move { (slot, future.await) }));
            }
        }
    }

    /// Publishes a command (or answers it at once), returning its step to
    /// come and whether it changes which buckets exist.
    async fn start(&self, command: Command) -> (Pin<Box<dyn Future<Output = Step> + Send>>, bool) {
        let ready = |step: Step| -> Pin<Box<dyn Future<Output = Step> + Send>> {
            Box::pin(std::future::ready(step))
        };
        let generation = |bucket: &str| self.registry.generation(bucket);
        let (key, value, delete, change) = match command {
            Command::Get { .. } | Command::Where { .. } => {
                return (ready(Step::Read(command)), false);
            }
            Command::Create { bucket } => {
                if generation(&bucket).is_some() {
                    return (ready(Step::Answer(Ok(Reply::Ok))), false);
                }
                if !self.registry.has_room() {
                    let full = KvError::internal("too many buckets");
                    return (ready(Step::Answer(Err(full))), false);
                }
                let generation = self.new_generation();
                (
                    bucket_key(&bucket),
                    generation.to_string(),
                    false,
                    Change::Create { bucket, generation },
                )
            }
            Command::Drop { bucket } => {
                let Some(generation) = generation(&bucket) else {
                    return (ready(Step::Answer(Err(KvError::not_found(&bucket)))), false);
                };
                (
                    bucket_key(&bucket),
                    String::new(),
                    true,
                    Change::Drop { bucket, generation },
                )
            }
            Command::Put { bucket, key, value } => {
                let Some(generation) = generation(&bucket) else {
                    return (ready(Step::Answer(Err(KvError::not_found(&bucket)))), false);
                };
                let subject = entry_key(generation, &key);
                (
                    subject,
                    value.clone(),
                    false,
                    Change::Put { bucket, key, value },
                )
            }
            Command::Delete { bucket, key } => {
                let Some(generation) = generation(&bucket) else {
                    return (ready(Step::Answer(Err(KvError::not_found(&bucket)))), false);
                };
                (
                    entry_key(generation, &key),
                    String::new(),
                    true,
                    Change::Delete { bucket, key },
                )
            }
        };
        let is_structural = matches!(change, Change::Create { .. } | Change::Drop { .. });
        // While disconnected the client would hold the publish until it
        // times out: refuse at once instead.
        if self.client.connection_state() != State::Connected {
            return (
                ready(Step::Stored(Err("not connected to NATS".into()), change)),
                is_structural,
            );
        }
        let subject = format!("{}{key}", self.prefix);
        let published = if delete {
            let mut headers = HeaderMap::new();
            headers.insert("KV-Operation", "DEL");
            self.js
                .publish_with_headers(subject, headers, value.into())
                .await
        } else {
            self.js.publish(subject, value.into()).await
        };
        match published {
            Ok(ack) => (
                Box::pin(async move {
                    let stored = ack.await.map(drop).map_err(|e| e.to_string());
                    Step::Stored(stored, change)
                }),
                is_structural,
            ),
            Err(err) => (
                ready(Step::Stored(Err(err.to_string()), change)),
                is_structural,
            ),
        }
    }

    /// A generation number no other CREATE of this store has used: the time
    /// in microseconds, or one more than the last one given or seen in the
    /// store, whichever is larger (the clock may go back; only this task
    /// gives generations).
    fn new_generation(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        let next = now.max(self.last_generation.load(Ordering::Relaxed) + 1);
        self.last_generation.store(next, Ordering::Relaxed);
        next
    }

    /// Applies a step in its turn and answers its command; returns 1 when it
    /// was a CREATE or DROP (stored or not).
    fn take(&self, slot: Slot, step: Step, answering: &mut HashMap<u64, Answering>) -> usize {
        let (answer, structural) = match step {
            Step::Answer(answer) => (answer, 0),
            Step::Read(command) => (
                match command {
                    Command::Where { .. } => Err(KvError::internal("WHERE reached the store")),
                    other => self.registry.apply(other.borrowed()),
                },
                0,
            ),
            Step::Stored(Err(error), change) => {
                debug!(%error, "JetStream did not store a write");
                let structural = matches!(change, Change::Create { .. } | Change::Drop { .. });
                (Err(KvError::store_unavailable()), usize::from(structural))
            }
            Step::Stored(Ok(()), change) => self.apply(change),
        };
        self.busy.fetch_sub(1, Ordering::AcqRel);
        if let Some(job) = answering.get_mut(&slot.job) {
            if let Some(place) = job.answers.get_mut(slot.index) {
                *place = Some(answer);
            }
            job.left -= 1;
            if job.left == 0 {
                self.finish(answering, slot.job);
            }
        }
        structural
    }

    /// Applies a stored change to memory.
    fn apply(&self, change: Change) -> (Result<Reply, KvError>, usize) {
        match change {
            Change::Create { bucket, generation } => {
                self.registry.create_with_generation(&bucket, generation);
                (Ok(Reply::Ok), 1)
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
                (answer, 1)
            }
            Change::Put { bucket, key, value } => (
                self.registry.apply(Command::Put {
                    bucket: &bucket,
                    key: &key,
                    value: &value,
                }),
                0,
            ),
            Change::Delete { bucket, key } => (
                self.registry.apply(Command::Delete {
                    bucket: &bucket,
                    key: &key,
                }),
                0,
            ),
        }
    }

    fn finish(&self, answering: &mut HashMap<u64, Answering>, job: u64) {
        if let Some(done) = answering.remove(&job) {
            let answers = done
                .answers
                .into_iter()
                .map(|a| a.unwrap_or_else(|| Err(KvError::internal("no answer"))))
                .collect();
            let _ = done.to.send(answers);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_the_protocol_could_store_is_loaded() {
        let mut generations = HashMap::new();
        let mut entries = Vec::new();
        let mut take =
            |key: &str, value: &[u8]| take_entry(key, value, &mut generations, &mut entries);
        assert!(take("b.basket", b"7"));
        assert!(take("k.7.milk", b"1"));
        assert!(take("k.7.a=2Eb", b"x"));
        assert!(!take("k.7.milk", b"a\r\nOK"), "a line break");
        assert!(!take("k.7.milk", b""), "an empty value");
        assert!(!take("k.7.milk", &[0xff]), "not UTF-8");
        assert!(!take("k.7.a=20b", b"x"), "a space in a key");
        assert!(!take("b.two=20words", b"8"));
        assert!(!take("b.basket", b"seven"));
        assert!(!take("other", b"x"));
        assert_eq!(generations.get(&7).map(String::as_str), Some("basket"));
        assert_eq!(entries.len(), 2);
    }

    #[test]
    fn names_become_key_tokens_and_back() {
        for (name, token) in [
            ("shopping", "shopping"),
            ("a.b", "a=2Eb"),
            ("*", "=2A"),
            (">", "=3E"),
            ("x=y/z", "x=3Dy=2Fz"),
            ("é", "=C3=A9"),
            ("\u{1}", "=01"),
            ("Milk_2-b", "Milk_2-b"),
        ] {
            assert_eq!(encode(name), token);
            assert_eq!(decode(token).as_deref(), Some(name));
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
                "{token} is a valid KV key token"
            );
        }
        assert_eq!(decode("=4"), None);
        assert_eq!(decode("=ZZ"), None);
        assert_eq!(decode("=FF"), None, "not UTF-8");
    }
}
