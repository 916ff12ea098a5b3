//! Which process of a node writes its store.
//!
//! Every process with the same node name and `durability = "jetstream"`
//! keeps the whole store in memory. The active one writes it; the others,
//! standbys, follow its changes on a KV watch and forward their clients'
//! requests to the active one.
//!
//! The fencing is JetStream's own. A process becomes active by writing the
//! `active` key with `Nats-Expected-Last-Sequence` set to the sequence of
//! the last change it has applied: JetStream stores it only if nothing else
//! was written since, so the new active process holds every change in the
//! store, and with them every write the old one acknowledged. Every write
//! the active process makes carries `Nats-Expected-Last-Subject-Sequence`
//! for the `active` key: the sequence of its own takeover. Once another
//! process has taken over, that key has moved on, and JetStream refuses
//! every write of the old one. So at most one process can store writes.
//!
//! Timing only decides *when* to try. The active process writes the `alive`
//! key at least every `failover_after / 4` (a heartbeat, when there is
//! nothing else to write); a standby (and a process that has just started,
//! or has just stepped down) tries to take over once it has seen nothing for
//! `failover_after`, or at once when the active one released the store on a
//! clean stop (or the store is new). The active process answers reads from memory for
//! `failover_after / 2` after it sent a write that was stored: no standby
//! can have taken over before then. After that, a read waits for the next
//! write (a heartbeat if need be), which proves the process is still the
//! active one, or fails.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use async_nats::Client;
use async_nats::jetstream;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::acks::Acks;
use super::keys::{self, Stored};
use super::load::{self, Loaded};
use super::writer::{Outgoing, Sent};
use super::{Job, Shared, StoreOptions};
use crate::error::KvError;
use crate::registry::Registry;

/// A process's role, with why it has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Writes the store and answers for the node.
    Active(String),
    /// Follows the store and forwards to the active process.
    Standby(String),
}

impl Role {
    /// `active` or `standby`, as the service API shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Active(_) => "active",
            Role::Standby(_) => "standby",
        }
    }
}

/// What the store task does next.
pub(super) enum Phase {
    /// Write the store.
    Active { why: String },
    /// Follow the store, loaded.
    Standby { loaded: Box<Loaded>, why: String },
    /// Load the store again (after stepping down), then decide.
    Reload(String),
    /// Stopped.
    Stopped,
}

/// The store task: the node's store, in memory and in JetStream.
pub(super) struct Keeper {
    pub js: jetstream::Context,
    pub client: Client,
    pub options: StoreOptions,
    /// `kvmesh_<node>`
    pub name: String,
    /// `$KV.kvmesh_<node>.`
    pub prefix: String,
    /// `KV_kvmesh_<node>`
    pub stream: String,
    pub registry: Registry,
    pub shared: Arc<Shared>,
    /// The last generation given to a CREATE (or seen in the store).
    pub last_generation: u64,
    /// Batches sent, for their ids.
    pub batches: u64,
    /// The fence every write carries (see `writer.rs`): made once per
    /// takeover, not once per write.
    pub fence: async_nats::HeaderMap,
    /// The subscription the writes' acknowledgements come on.
    pub acks: Option<Acks>,
}

impl Keeper {
    pub fn new(
        client: Client,
        options: StoreOptions,
        registry: Registry,
        shared: Arc<Shared>,
    ) -> Self {
        let name = keys::store_name(&options.node);
        let mut js = jetstream::new(client.clone());
        js.set_timeout(options.timeout);
        Self {
            js,
            client,
            prefix: format!("$KV.{name}."),
            stream: format!("KV_{name}"),
            name,
            options,
            registry,
            shared,
            last_generation: 0,
            batches: 0,
            fence: async_nats::HeaderMap::new(),
            acks: None,
        }
    }

    /// Loads the store and decides the first role.
    pub async fn start(&mut self) -> Phase {
        let loaded = self.load().await;
        self.decide(loaded).await
    }

    /// Runs the store task until the node stops.
    pub async fn run(mut self, mut phase: Phase, mut jobs: mpsc::Receiver<Job>) {
        loop {
            phase = match phase {
                Phase::Active { why } => {
                    self.set_role(Role::Active(why));
                    self.write(&mut jobs).await
                }
                Phase::Standby { loaded, why } => {
                    self.set_role(Role::Standby(why));
                    self.follow(*loaded, &mut jobs).await
                }
                Phase::Reload(why) => {
                    self.set_role(Role::Standby(why));
                    let shared = self.shared.clone();
                    tokio::select! {
                        loaded = self.load() => self.decide(loaded).await,
                        stopped = refuse_until_stopped(&shared, &mut jobs) => stopped,
                    }
                }
                Phase::Stopped => return,
            };
        }
    }

    fn set_role(&self, role: Role) {
        let active = matches!(role, Role::Active(_));
        if !active {
            self.shared.lease_until.store(0, Ordering::Release);
        }
        self.shared.active.store(active, Ordering::Release);
        let node = &self.options.node;
        match &role {
            Role::Active(why) => info!(
                node,
                role = "active",
                why,
                "this process is the active one of node {node}"
            ),
            Role::Standby(why) => info!(
                node,
                role = "standby",
                why,
                "this process is a standby of node {node}"
            ),
        }
        self.shared.role.send_replace(role);
    }

    /// Loads the store, retrying while NATS or JetStream is unreachable.
    async fn load(&mut self) -> Loaded {
        let mut attempt = 0u32;
        loop {
            let replicas = self.options.replicas;
            match load::open_and_load(&self.js, &self.name, replicas, &self.registry).await {
                Ok(loaded) => {
                    self.last_generation = self.last_generation.max(loaded.highest);
                    return loaded;
                }
                Err(error) => {
                    attempt += 1;
                    warn!(
                        store = %self.name,
                        %error,
                        attempt,
                        "cannot load the store from JetStream; retrying (nothing is answered until it is loaded)"
                    );
                    tokio::time::sleep(crate::mesh::retry_pause(self.options.timeout)).await;
                }
            }
        }
    }

    /// After a load: take over at once when the store names no active
    /// process (it is new, or was handed over on a clean stop) or names this
    /// one; otherwise
    /// follow, and take over only after `failover_after` of silence, like
    /// any standby. Never sooner: the active process may be answering reads
    /// from memory under its lease (a paused process, or one slow to answer,
    /// is not a dead one).
    async fn decide(&mut self, loaded: Loaded) -> Phase {
        // This very process, stepping down after a write whose outcome it
        // could not learn: nobody else has taken over since (the key would
        // name them), and it answers nothing from memory meanwhile.
        let mine = self.names_this_process(&loaded.holder);
        if !loaded.holder.is_empty() && !mine {
            let why = format!(
                "the store names an active process ({}); this one takes over only after {} ms of silence",
                loaded.holder,
                self.options.failover_after.as_millis()
            );
            return Phase::Standby {
                loaded: Box::new(loaded),
                why,
            };
        }
        match self.take_over(loaded.seen).await {
            Sent::Stored(_) if mine => Phase::Active {
                why: "no other process took over while this one reloaded the store".into(),
            },
            Sent::Stored(_) => Phase::Active {
                why: "the store was free (new, or handed over)".into(),
            },
            Sent::Deposed => Phase::Standby {
                loaded: Box::new(loaded),
                why: "another process took over first".into(),
            },
            // Nobody else need have taken over: load again and retry soon
            // (a takeover that did land names this process in the store).
            Sent::Refused(error) | Sent::Unknown(error) => {
                tokio::time::sleep(crate::mesh::retry_pause(self.options.timeout)).await;
                Phase::Reload(format!(
                    "could not take over the store ({error}); loading it again"
                ))
            }
        }
    }

    /// Whether the `active` key's value names this very process.
    fn names_this_process(&self, holder: &str) -> bool {
        serde_json::from_str::<serde_json::Value>(holder)
            .is_ok_and(|h| h["process"] == self.options.process.as_str())
    }

    /// Writes the `active` key naming this process, if `seen` is still the
    /// last change in the store.
    async fn take_over(&mut self, seen: u64) -> Sent {
        if !self.shared.connected() {
            return Sent::Refused("not connected to NATS".into());
        }
        let sent_at = self.shared.now_ms();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Expected-Last-Sequence", seen.to_string().as_str());
        let subject = format!("{}{}", self.prefix, keys::ACTIVE_KEY);
        let sent = match self
            .js
            .publish_with_headers(subject, headers, self.holder().into())
            .await
        {
            Ok(ack) => Sent::of(ack.await, self.replicated()),
            Err(err) => Sent::Refused(err.to_string()),
        };
        if let Sent::Stored(sequence) = sent {
            debug!(sequence, "took over the store");
            self.fence = self.fence_at(sequence);
            self.renew_lease(sent_at);
        }
        sent
    }

    /// Whether the store has several replicas (its writes go in atomic
    /// batches, and a JetStream error may follow a proposal).
    pub fn replicated(&self) -> bool {
        self.options.replicas > 1
    }

    /// This process, as the `active` and `alive` keys name it.
    fn holder(&self) -> String {
        serde_json::json!({
            "process": self.options.process,
            "listen": self.options.listen,
        })
        .to_string()
    }

    /// The `alive` key: a heartbeat.
    pub fn alive_message(&self) -> Outgoing {
        Outgoing::put(keys::ALIVE_KEY.to_owned(), self.holder())
    }

    /// Reads from memory are safe for half the failover time after a batch
    /// sent at `sent_at` (ms) was stored.
    pub fn renew_lease(&self, sent_at: u64) {
        let until = sent_at + self.options.failover_after.as_millis() as u64 / 2;
        self.shared.lease_until.fetch_max(until, Ordering::AcqRel);
    }

    /// A standby: applies the store's changes as they come, and takes over
    /// once the active process has been silent for `failover_after` or has
    /// released the store.
    async fn follow(&mut self, loaded: Loaded, jobs: &mut mpsc::Receiver<Job>) -> Phase {
        let Loaded {
            mut seen,
            holder,
            mut generations,
            mut watch,
            ..
        } = loaded;
        let failover_after = self.options.failover_after;
        let mut quiet_since = Instant::now();
        // Free to take: nobody named, or this very process (a takeover of
        // its own whose answer did not come).
        let mut released = holder.is_empty() || self.names_this_process(&holder);
        let mut tick = tokio::time::interval(failover_after / 10);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                entry = watch.next() => match entry {
                    Some(Ok(entry)) => {
                        seen = seen.max(entry.revision);
                        quiet_since = Instant::now();
                        let put = entry.operation == async_nats::jetstream::kv::Operation::Put;
                        match keys::read(&entry.key, put.then_some(&entry.value[..])) {
                            Some(Stored::Active(holder)) => {
                                released = holder.is_empty() || self.names_this_process(&holder);
                            }
                            Some(Stored::Bucket(_, generation)) => {
                                self.last_generation = self.last_generation.max(generation);
                                load::follow_change(&self.registry, &mut generations, &entry);
                            }
                            _ => load::follow_change(&self.registry, &mut generations, &entry),
                        }
                    }
                    Some(Err(error)) => {
                        return Phase::Reload(format!("the store's watch failed ({error}); loading again"));
                    }
                    None => return Phase::Reload("the store's watch ended; loading again".into()),
                },
                job = jobs.recv() => match job {
                    Some(Job::Commands { commands, answers }) => refuse(&self.shared, commands.len(), answers),
                    Some(Job::Seal { done, .. }) => {
                        let _ = done.send(false);
                    }
                    Some(Job::Release(done)) => {
                        let _ = done.send(());
                        return Phase::Stopped;
                    }
                    None => return Phase::Stopped,
                },
                _ = tick.tick() => {}
            }
            if !released && quiet_since.elapsed() < failover_after {
                continue;
            }
            let why = if released {
                "the active process handed over".to_string()
            } else {
                format!(
                    "the active process was silent for {} ms",
                    failover_after.as_millis()
                )
            };
            match self.take_over(seen).await {
                Sent::Stored(_) => return Phase::Active { why },
                Sent::Deposed => {
                    // Changes this process has not seen yet: someone wrote.
                    released = false;
                    quiet_since = Instant::now();
                }
                Sent::Refused(error) | Sent::Unknown(error) => {
                    warn!(%error, "could not take over the store; trying again");
                    released = false;
                    // Try again a quarter of the failover time from now.
                    quiet_since = Instant::now()
                        .checked_sub(failover_after * 3 / 4)
                        .unwrap_or_else(Instant::now);
                }
            }
        }
    }
}

/// Answers commands that reached a process which is not (or no longer) the
/// active one: nothing was stored.
pub(super) fn refuse(
    shared: &Shared,
    len: usize,
    answers: tokio::sync::oneshot::Sender<crate::mesh::Answers>,
) {
    shared.busy.fetch_sub(len, Ordering::AcqRel);
    let _ = answers.send(vec![Err(KvError::store_unavailable()); len]);
}

/// Refuses commands until asked to stop.
async fn refuse_until_stopped(shared: &Shared, jobs: &mut mpsc::Receiver<Job>) -> Phase {
    loop {
        match jobs.recv().await {
            Some(Job::Commands { commands, answers }) => refuse(shared, commands.len(), answers),
            Some(Job::Seal { done, .. }) => {
                let _ = done.send(false);
            }
            Some(Job::Release(done)) => {
                let _ = done.send(());
                return Phase::Stopped;
            }
            None => return Phase::Stopped,
        }
    }
}
