//! A durable node's store: its buckets in the JetStream key-value bucket
//! `kvmesh_<node>`, with a full copy in memory (the registry) that reads are
//! answered from. One file per job:
//!
//! - [`keys`]: how bucket and key names become KV keys;
//! - [`load`]: creating the store, loading it, following its changes;
//! - [`writer`]: the active process's writes, in atomic batches;
//! - [`role`]: which process of a node writes the store: taking over,
//!   stepping down, and the fencing that keeps two from writing;
//! - this file: the [`Store`] handle connections and the mesh submit to.
//!
//! Several processes may run with the same node name: one is active, the
//! others are standbys that follow the store and take over when the active
//! one falls silent. A write is applied to memory and answered `OK` only
//! once JetStream stored it, and JetStream stores a batch only if nothing
//! was written to the store since the writer's previous batch: a process
//! that another has replaced can never store one more write.

mod acks;
mod keys;
mod load;
mod role;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::Client;
use tokio::sync::{mpsc, oneshot, watch};

use crate::command::Command;
use crate::error::KvError;
use crate::mesh::{Answers, Coming};
use crate::registry::Registry;

pub use keys::store_name;
pub(crate) use load::read_whole;
pub use role::Role;

/// Commands queued for the store before submitters wait.
const QUEUE: usize = 4096;

/// What a node needs to say to open its store.
pub struct StoreOptions {
    /// The node name: the store is `kvmesh_<node>`.
    pub node: String,
    /// This process, as the service API lists it (unique per process).
    pub process: String,
    /// Where this process listens for TCP clients (shown in the `active` key).
    pub listen: String,
    /// JetStream replicas, on first creation.
    pub replicas: usize,
    /// How long to wait for JetStream.
    pub timeout: Duration,
    /// How long an active process may be silent before a standby takes over.
    pub failover_after: Duration,
}

/// Work for the store task.
enum Job {
    /// Commands submitted together, with the place their answers go.
    Commands {
        commands: Vec<Command>,
        answers: oneshot::Sender<Answers>,
    },
    /// Stop: hand the store over (when active), then say done.
    Release(oneshot::Sender<()>),
    /// Once every write before it is stored and applied, seal (or unseal)
    /// the buckets starting with these bytes; says whether it was done (by
    /// the active process).
    Seal {
        bytes: Vec<u8>,
        seal: bool,
        done: oneshot::Sender<bool>,
    },
}

/// What the store task and the request path share.
struct Shared {
    /// Whether this process is the active one (answers for the node).
    active: AtomicBool,
    /// Until when (ms after `base`) the active process may answer reads
    /// from memory without asking JetStream whether it is still active.
    lease_until: AtomicU64,
    base: Instant,
    /// Commands submitted and not yet answered.
    busy: AtomicUsize,
    /// The role, for those who act on its changes (serving on NATS).
    role: watch::Sender<Role>,
    /// Whether the NATS client is connected.
    client: Client,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Whether the NATS client is connected right now.
    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Whether this process may answer reads from memory as the owner.
    fn lease_holds(&self) -> bool {
        self.now_ms() < self.lease_until.load(Ordering::Acquire) || !self.connected()
    }
}

/// A durable node's store: cheap to clone.
#[derive(Clone)]
pub struct Store {
    queue: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

impl Store {
    /// Opens (creating it with `replicas` on first start) the store of the
    /// node, loads it into `registry`, and becomes active when no other
    /// process of the node is (a standby otherwise). Retries while NATS or
    /// JetStream is unreachable, saying so; returns only once loaded.
    pub async fn open(client: Client, options: StoreOptions, registry: Registry) -> Store {
        let (role_tx, _) = watch::channel(Role::Standby("starting".into()));
        let shared = Arc::new(Shared {
            active: AtomicBool::new(false),
            lease_until: AtomicU64::new(0),
            base: Instant::now(),
            busy: AtomicUsize::new(0),
            role: role_tx,
            client: client.clone(),
        });
        let (queue, jobs) = mpsc::channel(QUEUE);
        let mut keeper = role::Keeper::new(client, options, registry, shared.clone());
        let phase = keeper.start().await;
        tokio::spawn(keeper.run(phase, jobs));
        Store { queue, shared }
    }

    /// Whether this process is the active one of its node: it answers for
    /// the node's buckets. A standby forwards them to the active one.
    pub fn is_active(&self) -> bool {
        self.shared.active.load(Ordering::Acquire)
    }

    /// The role now, and its changes.
    pub fn roles(&self) -> watch::Receiver<Role> {
        self.shared.role.subscribe()
    }

    /// Whether this process knows it is still the active one, so that a
    /// read may be answered from memory (or cannot ask: while NATS is away,
    /// reads go on).
    pub fn lease_holds(&self) -> bool {
        self.shared.lease_holds()
    }

    /// Whether no command is on its way through the store.
    pub fn is_idle(&self) -> bool {
        self.shared.busy.load(Ordering::Acquire) == 0
    }

    /// Queues commands (writes, and reads that must wait their turn) and
    /// returns their answers to come, one per command, in order.
    pub async fn submit(&self, commands: Vec<Command>) -> Coming {
        let (answers, rx) = oneshot::channel();
        let len = commands.len();
        self.shared.busy.fetch_add(len, Ordering::AcqRel);
        let job = Job::Commands { commands, answers };
        if let Err(mpsc::error::SendError(Job::Commands { answers, .. })) =
            self.queue.send(job).await
        {
            self.shared.busy.fetch_sub(len, Ordering::AcqRel);
            let _ = answers.send(vec![Err(KvError::store_unavailable()); len]);
        }
        Coming::new(rx, len)
    }

    /// Seals (`seal`) or unseals the buckets starting with `bytes` once
    /// every write queued before is stored and applied; whether it was done
    /// (only the active process does it).
    pub async fn seal(&self, bytes: Vec<u8>, seal: bool) -> bool {
        let (done, rx) = oneshot::channel();
        if self
            .queue
            .send(Job::Seal { bytes, seal, done })
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Finishes the writes queued, and when this process is the active one,
    /// hands the store over at once: a standby takes over without waiting
    /// for the active one to fall silent.
    pub async fn release(&self) {
        let (done, rx) = oneshot::channel();
        if self.queue.send(Job::Release(done)).await.is_ok() {
            let _ = rx.await;
        }
    }
}
