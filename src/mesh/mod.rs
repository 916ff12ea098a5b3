//! The NATS side of a node, one job per file:
//!
//! - [`connect`]: joining NATS (addresses, security, reconnects, events);
//! - [`forward`]: sending commands to their owner, one queue per owner, and
//!   collecting the answers;
//! - [`serve`]: answering `kv.node.<name>` for the other nodes;
//! - [`reply`]: a reply, in as many messages as it needs;
//! - [`names`]: making sure no other process serves the same name;
//! - [`service`]: the NATS service API entry (`nats micro ls|info|stats`);
//! - this file: the [`Mesh`] handle they share, and stopping.
//!
//! Foreign failures are converted in these files only: async-nats's
//! `NoResponders` becomes `node <owner> unavailable`, a timeout becomes
//! `node <owner> timed out`, and a client that is not connected answers
//! `mesh unavailable` at once instead of queueing the request until it times
//! out. The serve loop does not know the router: `node.rs` hands it a
//! [`Handler`]. The wire format is described in `docs/protocol.md`.

mod connect;
mod forward;
mod names;
mod reply;
mod serve;
mod service;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::connection::State;
use async_nats::{Client, Message};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use crate::command::{Command, Reply};
use crate::error::KvError;

pub use connect::Security;
pub use forward::{Answers, MAX_BATCH};
pub use serve::{Listing, Serving};

/// The NATS service name every node registers under.
pub const SERVICE_NAME: &str = "kvmesh";

/// How long to wait before trying JetStream again after a failed attempt
/// (loading a store, reading the routing table, taking over): half a
/// second, or the request timeout when that is shorter.
pub fn retry_pause(timeout: Duration) -> Duration {
    Duration::from_millis(500).min(timeout)
}

/// The subject node `node` serves.
pub fn node_subject(node: &str) -> String {
    format!("kv.node.{node}")
}

/// Answers still to come from another node: one per command forwarded
/// together, in order. The one shape of "an answer not here yet", wherever
/// it waits (a TCP connection's queue, a reply to another node).
pub struct Coming {
    rx: oneshot::Receiver<Answers>,
    len: usize,
}

impl Coming {
    /// Answers that are here already.
    pub fn ready(answers: Answers) -> Self {
        let (tx, rx) = oneshot::channel();
        let len = answers.len();
        let _ = tx.send(answers);
        Self { rx, len }
    }

    /// Answers that `rx` will bring, `len` of them.
    pub(crate) fn new(rx: oneshot::Receiver<Answers>, len: usize) -> Self {
        Self { rx, len }
    }

    /// The first answer (for a command forwarded alone).
    pub async fn first(self) -> Result<Reply, KvError> {
        self.await
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(KvError::internal("no answer")))
    }
}

impl Future for Coming {
    type Output = Answers;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answers> {
        let len = self.len;
        Pin::new(&mut self.rx).poll(cx).map(|answers| {
            // The forwarding task ended without answering (the node is
            // stopping): every command gets that.
            answers.unwrap_or_else(|_| vec![Err(KvError::internal("forwarding stopped")); len])
        })
    }
}

/// A command on its way: answered already, or forwarded with the answer to come.
pub enum Started {
    /// Run here (or refused): the result.
    Done(Result<Reply, KvError>),
    /// Queued for another node, alone: its answer to come.
    Forwarded(Coming),
}

/// How a command reached this node: the hops it has made, and, when it came
/// from another node, the time (Unix ms) that node stops waiting for its
/// answer. Forwarded on, it keeps that deadline: no later hop runs it after
/// the client was told it timed out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Via {
    pub hops: u32,
    pub deadline: Option<u64>,
}

impl Via {
    /// The next hop: one more, the same deadline.
    pub fn next(self) -> Via {
        Via {
            hops: self.hops + 1,
            ..self
        }
    }
}

/// What runs a command that arrived over NATS (the router, in a node).
pub trait Handler: Send + Sync + 'static {
    /// Routes `command`, which reached this node `via` some hops: runs it
    /// here or publishes it to its owner. Commands started one after the
    /// other take effect in that order.
    fn start(&self, command: Command, via: Via) -> impl Future<Output = Started> + Send;
}

/// Why the mesh could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The server list or connection options were refused.
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    /// Another process already serves this node's name.
    #[error(
        "another node named {0:?} is already serving kv.node.{0} on this NATS; \
         each node needs its own name"
    )]
    DuplicateName(String),
    /// The service API registration failed.
    #[error("cannot register the NATS service: {0}")]
    Service(String),
}

/// A node's connection to the mesh: cheap to clone.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    timeout: Duration,
    /// Replies come to `<inbox>.<id>`, one subscription for all requests.
    inbox: String,
    next_id: AtomicU64,
    /// Requests waiting for their reply.
    waiting: Arc<Waiting>,
    /// One queue per owner, drained by that owner's forwarding task.
    forwarders: Mutex<HashMap<String, mpsc::Sender<forward::Job>>>,
    /// Counts the connections made to a server: a change means the client
    /// has (re)connected.
    connections: watch::Receiver<u64>,
}

/// Requests waiting for their reply, by id: the owner asked, and where the
/// reply's messages go (a large batch reply comes as several). A lock held
/// for a map operation only, never across an `.await`.
type Waiting = Mutex<HashMap<u64, Waiter>>;

/// One request waiting for its reply.
struct Waiter {
    owner: Arc<str>,
    tx: mpsc::UnboundedSender<Delivery>,
}

/// What reaches a request waiting for its reply.
enum Delivery {
    /// A message of the reply.
    Reply(Message),
    /// The owner's process has stopped, after answering everything it was
    /// given: no reply is coming, and the request did not run.
    Left,
}

/// The last token of the subject a stopping node sends, in each forwarding
/// node's inbox, once it has answered all it was given (its name is the
/// body): `<inbox>.left`.
const LEFT: &str = "left";

impl Mesh {
    /// The NATS client, for the other users of the connection (the store).
    pub(crate) fn client(&self) -> Client {
        self.inner.client.clone()
    }

    /// Whether the client is connected to a NATS server right now.
    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
    }

    /// The largest message the connected server takes.
    fn max_payload(&self) -> usize {
        self.inner.client.max_payload()
    }

    /// Warns when the largest value allowed would not fit one NATS message of
    /// the server this node is connected to (its `max_payload`): such values
    /// are still refused, one by one, with `ERROR value too large`.
    pub fn check_value_limit(&self, max_value_bytes: usize) {
        // A PUT's JSON around its value: op, bucket (255), key (1 KiB), quotes.
        const ENVELOPE: usize = 1400;
        if !self.is_connected() {
            return;
        }
        let max_payload = self.max_payload();
        if max_value_bytes + ENVELOPE > max_payload {
            warn!(
                max_value_bytes,
                max_payload,
                "values near max_value_bytes do not fit one NATS message; \
                 PUTs of them for other nodes' buckets answer ERROR value too large"
            );
        }
    }

    /// Flushes what was sent and closes the connection. While disconnected there
    /// is nothing to drain (and the client would wait for a server forever).
    pub async fn drain(&self) {
        // Closing the queues ends the forwarding tasks.
        self.inner.forwarders.lock().clear();
        if !self.is_connected() {
            return;
        }
        // The client's drain closes the connection soon after it is asked,
        // without waiting for the server: make sure the last replies are out.
        confirm(&self.inner.client, self.inner.timeout, "the last replies").await;
        match tokio::time::timeout(self.inner.timeout, self.inner.client.drain()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => debug!(error = %err, "drain failed"),
            Err(_) => warn!("draining the NATS connection timed out"),
        }
    }
}

/// A round trip to the NATS server: once it succeeds, the server has processed
/// everything this client sent before (subscriptions, unsubscriptions, replies).
/// `Client::flush` is not one: it only writes the client's buffer to the socket.
///
/// It is a request to a fresh inbox nobody listens on; the server's "no
/// responders" status comes back after it has handled all that came first.
/// Anything else (a timeout, a closed connection) is the error.
pub async fn round_trip(client: &Client, timeout: Duration) -> Result<(), String> {
    let probe = async_nats::Request::new().timeout(Some(timeout));
    match client.send_request(client.new_inbox(), probe).await {
        Err(err) if err.kind() == RequestErrorKind::NoResponders => Ok(()),
        Ok(_) => Err("a fresh inbox was answered".to_string()),
        Err(err) => Err(err.to_string()),
    }
}

/// [`round_trip`] for the node's own steps: a failure is logged, not fatal
/// (the step it confirms has been sent; only its confirmation is missing).
async fn confirm(client: &Client, timeout: Duration, after: &str) {
    if let Err(error) = round_trip(client, timeout.min(Duration::from_secs(2))).await {
        warn!(%error, after, "no round trip to the NATS server");
    }
}
