//! The NATS side of a node: sending a command to its owner, and serving
//! `kv.node.<name>` for the others (SPEC.md section 3).
//!
//! Foreign failures are converted here and only here: async-nats's
//! `NoResponders` becomes `node <owner> unavailable`, `TimedOut` becomes
//! `node <owner> timed out`, and a client that is not connected answers
//! `mesh unavailable` at once instead of queueing the request until it times out.
//! The serve loop does not know the router: `node.rs` hands it a [`Handler`].

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::client::{PublishErrorKind, RequestErrorKind};
use async_nats::connection::State;
use async_nats::service::{Service, ServiceExt};
use async_nats::{Client, ConnectOptions, Event, HeaderMap, Message, StatusCode};
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::command::{Command, Limits, Reply};
use crate::error::KvError;
use crate::secret::{Secret, redact_url};
use crate::wire::{self, BadReply, HOPS_HEADER, WireRequest};

/// The NATS service name every node registers under.
pub const SERVICE_NAME: &str = "kvmesh";

/// The subject node `node` serves.
pub fn node_subject(node: &str) -> String {
    format!("kv.node.{node}")
}

/// A command on its way: answered already, or forwarded with the answer to come.
pub enum Started {
    /// Run here (or refused): the result.
    Done(Result<Reply, KvError>),
    /// Queued for another node: its answer to come.
    Forwarded(Pin<Box<dyn Future<Output = Result<Reply, KvError>> + Send>>),
}

impl Started {
    /// The result, waiting for it if it comes from another node.
    pub async fn finish(self) -> Result<Reply, KvError> {
        match self {
            Started::Done(result) => result,
            Started::Forwarded(answer) => answer.await,
        }
    }
}

/// What runs a command that arrived over NATS (the router, in a node).
pub trait Handler: Send + Sync + 'static {
    /// Routes `command`, which has made `hops` hops so far: runs it here or
    /// publishes it to its owner. Commands started one after the other take
    /// effect in that order.
    fn start(&self, command: Command, hops: u32) -> impl Future<Output = Started> + Send;
}

/// Why the mesh could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The server list or connection options were refused.
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    /// Another node already serves this node's subject.
    #[error(
        "another node named {0:?} is already serving kv.node.{0} on this NATS; \
         each node needs its own name"
    )]
    DuplicateName(String),
    /// The service API registration failed.
    #[error("cannot register the NATS service: {0}")]
    Service(String),
}

/// How to authenticate to NATS and secure the connection.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// User name and password.
    pub user_password: Option<(String, Secret)>,
    /// Token.
    pub token: Option<Secret>,
    /// Credentials file (JWT and seed).
    pub creds_file: Option<PathBuf>,
    /// File holding an nkey seed.
    pub nkey_file: Option<PathBuf>,
    /// CA certificate to verify the server with.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key.
    pub tls_client: Option<(PathBuf, PathBuf)>,
}

impl Security {
    async fn apply(&self, mut options: ConnectOptions) -> Result<ConnectOptions, MeshError> {
        if let Some((user, password)) = &self.user_password {
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        }
        if let Some(token) = &self.token {
            options = options.token(token.expose().to_owned());
        }
        if let Some(path) = &self.creds_file {
            options = options.credentials_file(path).await.map_err(|e| {
                MeshError::Connect(format!(
                    "cannot use credentials file {}: {e}",
                    path.display()
                ))
            })?;
        }
        if let Some(path) = &self.nkey_file {
            let seed = std::fs::read_to_string(path).map_err(|e| {
                MeshError::Connect(format!(
                    "cannot read nkey seed file {}: {e}",
                    path.display()
                ))
            })?;
            options = options.nkey(seed.trim().to_owned());
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &self.tls_client {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        Ok(options)
    }
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
    forwarders: Mutex<HashMap<String, mpsc::Sender<Job>>>,
}

/// Requests waiting for their reply, by id. A std-style lock held for a map
/// operation only, never across an `.await`.
type Waiting = Mutex<HashMap<u64, oneshot::Sender<Message>>>;

/// The answers to a group of commands, in order.
pub type Answers = Vec<Result<Reply, KvError>>;

/// Commands queued for one owner, with the place their answers go.
struct Job {
    commands: Vec<Command>,
    hops: u32,
    answers: oneshot::Sender<Answers>,
}

/// Jobs queued per owner before senders wait: the bound on forwarded work.
const FORWARD_QUEUE: usize = 4096;

/// Most commands in one forwarded message.
pub const MAX_BATCH: usize = 64;

impl Mesh {
    /// Connects to the given NATS servers. If none answers now, the node still
    /// starts: the client keeps retrying in the background, and requests for
    /// other nodes answer `mesh unavailable` until it is connected.
    pub async fn connect(
        servers: &[String],
        node: &str,
        timeout: Duration,
        security: &Security,
    ) -> Result<Mesh, MeshError> {
        let addrs: Vec<async_nats::ServerAddr> = servers
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| MeshError::Connect(format!("bad server address: {e}")))?;
        let waiting: Arc<Waiting> = Arc::default();
        let options = || {
            let node = node.to_owned();
            let waiting = waiting.clone();
            ConnectOptions::new()
                .name(format!("kvmesh-{node}"))
                .request_timeout(Some(timeout))
                .max_reconnects(None)
                // A quick first retry, then at most one attempt a second, so a
                // mesh heals soon after NATS comes back.
                .reconnect_delay_callback(|attempts| {
                    Duration::from_millis((attempts as u64).saturating_mul(100).min(1000))
                })
                .event_callback(move |event| {
                    if matches!(event, Event::Disconnected) {
                        // No reply can come through a connection that is gone:
                        // the requests waiting for one fail now (as "mesh
                        // unavailable") instead of at their timeout.
                        waiting.lock().clear();
                    }
                    let node = node.clone();
                    async move { log_event(&node, event) }
                })
        };
        let shown: Vec<String> = servers.iter().map(|s| redact_url(s)).collect();
        let client = match security
            .apply(options())
            .await?
            .connect(addrs.clone())
            .await
        {
            Ok(client) => client,
            Err(err) => {
                warn!(
                    error = %err,
                    servers = %shown.join(","),
                    "cannot connect to NATS; serving this node's buckets and retrying in the background"
                );
                security
                    .apply(options())
                    .await?
                    .retry_on_initial_connect()
                    .connect(addrs)
                    .await
                    .map_err(|e| MeshError::Connect(e.to_string()))?
            }
        };
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| MeshError::Connect(e.to_string()))?;
        let inner = Arc::new(Inner {
            client,
            timeout,
            inbox,
            next_id: AtomicU64::new(0),
            waiting,
            forwarders: Mutex::new(HashMap::new()),
        });
        // Hands each reply to the request waiting for it. Holds only a weak
        // reference, so the mesh can be dropped.
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(message) = replies.next().await {
                let Some(inner) = weak.upgrade() else { break };
                let id = message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|id| id.parse().ok());
                let waiter = id.and_then(|id| inner.waiting.lock().remove(&id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(message);
                }
            }
        });
        Ok(Mesh { inner })
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
        let max_payload = self.inner.client.max_payload();
        if max_value_bytes + ENVELOPE > max_payload {
            warn!(
                max_value_bytes,
                max_payload,
                "values near max_value_bytes do not fit one NATS message; \
                 PUTs of them for other nodes' buckets answer ERROR value too large"
            );
        }
    }

    /// Whether the client is connected to a NATS server right now.
    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
    }

    /// Publishes `command` to `owner` and returns the answer to wait for. Calls
    /// made one after the other reach the owner in that order, which keeps a
    /// connection's pipelined requests in order; the waiting can overlap.
    async fn send(&self, owner: &str, command: Command, hops: u32) -> Result<RemoteReply, KvError> {
        let span = debug_span!("forward", node = owner, bucket = command.bucket(), hops);
        let body = wire::encode_request(&command);
        let pending = self.publish(owner, body, hops).instrument(span).await?;
        Ok(RemoteReply { pending, command })
    }

    /// Forwards commands to `owner` through its queue, and returns their answers
    /// to come. Commands queued one after the other take effect in that order.
    ///
    /// One task per owner drains the queue: whatever has gathered while it was
    /// busy leaves as one message (a batch of up to [`MAX_BATCH`]), so many
    /// connections talking to one owner share round trips instead of each
    /// paying for its own; a lone command still leaves at once, as a plain
    /// request.
    pub async fn forward(
        &self,
        owner: &str,
        commands: Vec<Command>,
        hops: u32,
    ) -> oneshot::Receiver<Answers> {
        let (answers, rx) = oneshot::channel();
        if !self.is_connected() {
            let _ = answers.send(
                commands
                    .iter()
                    .map(|_| Err(KvError::mesh_unavailable()))
                    .collect(),
            );
            return rx;
        }
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
            hops,
            answers,
        };
        if let Err(mpsc::error::SendError(job)) = queue.send(job).await {
            let _ = job.answers.send(
                job.commands
                    .iter()
                    .map(|_| Err(KvError::mesh_unavailable()))
                    .collect(),
            );
        }
        rx
    }

    /// Publishes several commands to `owner` in one message; see [`Mesh::send`].
    async fn send_batch(
        &self,
        owner: &str,
        commands: Vec<Command>,
        hops: u32,
    ) -> Result<RemoteBatch, KvError> {
        let span = debug_span!("forward_batch", node = owner, size = commands.len(), hops);
        let body = wire::encode_batch(&commands);
        let pending = self.publish(owner, body, hops).instrument(span).await?;
        Ok(RemoteBatch { pending, commands })
    }

    async fn publish(
        &self,
        owner: &str,
        body: Vec<u8>,
        hops: u32,
    ) -> Result<PendingReply, KvError> {
        // While disconnected the client would queue the request until it times
        // out; say at once that the mesh is down instead.
        if !self.is_connected() {
            return Err(KvError::mesh_unavailable());
        }
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        inner.waiting.lock().insert(id, tx);
        let pending = PendingReply {
            inner: self.inner.clone(),
            id,
            rx,
            deadline: Instant::now() + inner.timeout,
            owner: owner.to_owned(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(HOPS_HEADER, hops.to_string().as_str());
        inner
            .client
            .publish_with_reply_and_headers(
                node_subject(owner),
                format!("{}.{id}", inner.inbox),
                headers,
                body.into(),
            )
            .await
            .map_err(|err| match err.kind() {
                PublishErrorKind::MaxPayloadExceeded => KvError::bad_request("value too large"),
                _ => {
                    debug!(error = %err, node = owner, "publish failed");
                    KvError::mesh_unavailable()
                }
            })?;
        Ok(pending)
    }

    /// Registers the `kvmesh` service and serves `kv.node.<node>` with `handler`.
    /// Refuses to start when another node already answers on that subject.
    /// When connected, returns only once the subscription has reached the server.
    pub async fn serve<H: Handler>(
        &self,
        node: &str,
        handler: Arc<H>,
        limits: Limits,
        tracker: TaskTracker,
    ) -> Result<Serving, MeshError> {
        let connected = self.is_connected();
        if connected {
            self.check_name_is_free(node).await?;
        }
        let service = self
            .inner
            .client
            .service_builder()
            .description("kvmesh node: a partition of a distributed key-value store")
            .metadata(HashMap::from([("node".to_string(), node.to_string())]))
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| MeshError::Service(e.to_string()))?;
        let mut endpoint = service
            .group("kv.node")
            .endpoint(node)
            .await
            .map_err(|e| MeshError::Service(e.to_string()))?;
        if connected {
            // Ready only once the server has the subscription: a request sent
            // the moment this returns reaches this node.
            confirm(&self.inner.client, self.inner.timeout, "subscribing").await;
        }
        info!(subject = %node_subject(node), connected, "serving on NATS");
        let client = self.inner.client.clone();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                let request = tokio::select! {
                    biased;
                    _ = stopped.cancelled() => {
                        // Unsubscribe through the client's queue (waiting for room
                        // in it), not in a drop that might come too late.
                        if let Err(err) = endpoint.stop().await {
                            debug!(error = %err, "unsubscribing failed");
                        }
                        break;
                    }
                    request = endpoint.next() => match request {
                        Some(request) => request,
                        None => break,
                    },
                };
                if request.message.reply.is_none() {
                    // Nobody could learn the outcome, so the command is not run.
                    debug!(subject = %request.message.subject, "ignored a message without a reply subject");
                    continue;
                }
                // Started here, in arrival order, so that requests take effect in
                // the order they were sent; only waiting for a forwarded answer
                // happens in a task of its own.
                let max_payload = client.max_payload();
                match start(&request.message, &*handler, &limits, max_payload).await {
                    Answer::Ready(body) => respond(&client, &request, body).await,
                    Answer::Later(answer) => {
                        let client = client.clone();
                        tracker.spawn(async move {
                            let body = answer.await;
                            respond(&client, &request, body).await;
                        });
                    }
                }
            }
            debug!("stopped serving");
        });
        Ok(Serving {
            service,
            stop,
            task,
            client: self.inner.client.clone(),
            timeout: self.inner.timeout,
        })
    }

    /// Asks our own subject before subscribing: any answer means the name is taken.
    async fn check_name_is_free(&self, node: &str) -> Result<(), MeshError> {
        let probe = async_nats::Request::new()
            .payload(wire::encode_request(&Command::Where { bucket: "-" }).into())
            .timeout(Some(self.inner.timeout.min(Duration::from_secs(2))));
        match self
            .inner
            .client
            .send_request(node_subject(node), probe)
            .await
        {
            Err(err) if err.kind() == RequestErrorKind::NoResponders => Ok(()),
            Ok(_) => Err(MeshError::DuplicateName(node.to_owned())),
            Err(err) if err.kind() == RequestErrorKind::TimedOut => {
                Err(MeshError::DuplicateName(node.to_owned()))
            }
            Err(err) => {
                warn!(error = %err, "could not check whether the node name is free");
                Ok(())
            }
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

/// Drains one owner's queue: publishes what has gathered (in order, grouped by
/// hop count), and hands each reply's answers back without waiting for them
/// before publishing more.
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
        while !gathered.is_empty() {
            // One message holds jobs of one hop count, in queue order.
            let hops = gathered[0].hops;
            let same = gathered.iter().take_while(|j| j.hops == hops).count();
            let group: Vec<Job> = gathered.drain(..same).collect();
            let mut commands: Vec<Command> = Vec::new();
            let mut shares = Vec::with_capacity(group.len());
            for job in group {
                shares.push((job.commands.len(), job.answers));
                commands.extend(job.commands);
            }
            let n = commands.len();
            let sent = if n == 1 {
                let command = commands.pop();
                match command {
                    Some(c) => mesh.send(&owner, c, hops).await.map(Remote::One),
                    None => continue,
                }
            } else {
                mesh.send_batch(&owner, commands, hops)
                    .await
                    .map(Remote::Many)
            };
            match sent {
                Ok(remote) => {
                    tokio::spawn(async move {
                        let answers = match remote {
                            Remote::One(r) => vec![r.wait().await],
                            Remote::Many(r) => r.wait().await,
                        };
                        share_out(answers, shares);
                    });
                }
                Err(err) => share_out(vec![Err(err); n], shares),
            }
        }
    }
}

enum Remote {
    One(RemoteReply),
    Many(RemoteBatch),
}

/// Gives each job its slice of a message's answers, in order.
fn share_out(answers: Answers, shares: Vec<(usize, oneshot::Sender<Answers>)>) {
    let mut answers = answers.into_iter();
    for (len, to) in shares {
        let mine: Vec<_> = answers.by_ref().take(len).collect();
        let _ = to.send(mine);
    }
}

/// A request on its way: the answer to wait for.
struct RemoteReply {
    pending: PendingReply,
    command: Command,
}

impl RemoteReply {
    /// Waits (until the request timeout, counted from sending) for the answer.
    async fn wait(self) -> Result<Reply, KvError> {
        let owner = self.pending.owner.clone();
        let message = self.pending.wait().await?;
        wire::decode_reply(&self.command, &message.payload)
            .unwrap_or_else(|BadReply| Err(bad_reply(&owner)))
    }
}

/// A batch on its way: the answers to wait for, one per command.
struct RemoteBatch {
    pending: PendingReply,
    commands: Vec<Command>,
}

impl RemoteBatch {
    /// Waits for the answers; a failure of the whole exchange is every
    /// command's answer.
    async fn wait(self) -> Vec<Result<Reply, KvError>> {
        let owner = self.pending.owner.clone();
        match self.pending.wait().await {
            Ok(message) => wire::decode_batch_reply(&self.commands, &message.payload)
                .unwrap_or_else(|BadReply| {
                    self.commands
                        .iter()
                        .map(|_| Err(bad_reply(&owner)))
                        .collect()
                }),
            Err(err) => self.commands.iter().map(|_| Err(err.clone())).collect(),
        }
    }
}

/// A published request's reply slot; dropping it forgets the request.
struct PendingReply {
    inner: Arc<Inner>,
    id: u64,
    rx: oneshot::Receiver<Message>,
    deadline: Instant,
    owner: String,
}

impl PendingReply {
    async fn wait(mut self) -> Result<Message, KvError> {
        match tokio::time::timeout_at(self.deadline, &mut self.rx).await {
            Err(_) => Err(KvError::timed_out(&self.owner)),
            Ok(Err(_)) => Err(KvError::mesh_unavailable()),
            // The server answers for an owner with no subscriber at once.
            Ok(Ok(message)) if message.status == Some(StatusCode::NO_RESPONDERS) => {
                Err(KvError::node_unavailable(&self.owner))
            }
            Ok(Ok(message)) => Ok(message),
        }
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        self.inner.waiting.lock().remove(&self.id);
    }
}

/// A running serve loop; stop it before draining the client.
pub struct Serving {
    service: Service,
    stop: CancellationToken,
    task: JoinHandle<()>,
    client: Client,
    timeout: Duration,
}

impl Serving {
    /// Unsubscribes and waits for the serve loop to end (handlers already
    /// started keep running on the tracker).
    pub async fn stop(mut self) {
        self.stop.cancel();
        // The loop ends once the unsubscription is queued; a full queue while
        // NATS is unreachable could hold it, so do not wait for long.
        if tokio::time::timeout(Duration::from_secs(1), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
        // Once the round trip is back, the server has seen the unsubscription,
        // so from then on a request for this node gets "no responders" at once
        // instead of reaching a node that will not answer.
        if self.client.connection_state() == State::Connected {
            confirm(&self.client, self.timeout, "unsubscribing").await;
        }
        if let Err(err) = self.service.stop().await {
            debug!(error = %err, "stopping the service failed");
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

/// A reply body, ready now or once forwarded answers are in.
enum Answer {
    Ready(Vec<u8>),
    Later(Pin<Box<dyn Future<Output = Vec<u8>> + Send>>),
}

/// Decodes one NATS message and starts what it asks for.
async fn start<H: Handler>(
    message: &Message,
    handler: &H,
    limits: &Limits,
    max_payload: usize,
) -> Answer {
    let hops = match wire::parse_hops(hops_header(message.headers.as_ref())) {
        Ok(hops) => hops,
        Err(err) => return Answer::Ready(wire::encode_reply(&Err(err))),
    };
    match wire::decode_request(&message.payload, limits) {
        Ok(WireRequest::Single(command)) => match handler.start(command, hops).await {
            Started::Done(result) => Answer::Ready(wire::encode_reply(&result)),
            Started::Forwarded(remote) => {
                Answer::Later(Box::pin(async move { wire::encode_reply(&remote.await) }))
            }
        },
        Ok(WireRequest::Batch(members)) => {
            // Members start in order, like a connection's pipelined requests.
            let mut started = Vec::with_capacity(members.len());
            for member in members {
                started.push(match member {
                    Ok(command) => handler.start(command, hops).await,
                    Err(err) => Started::Done(Err(err)),
                });
            }
            Answer::Later(Box::pin(async move {
                let mut results = Vec::with_capacity(started.len());
                for s in started {
                    results.push(s.finish().await);
                }
                wire::encode_batch_reply_within(&results, max_payload)
            }))
        }
        Err(err) => Answer::Ready(wire::encode_reply(&Err(err))),
    }
}

/// Sends a reply body, or an error if it would not fit one NATS message.
async fn respond(client: &Client, request: &async_nats::service::Request, mut body: Vec<u8>) {
    if body.len() > client.max_payload() {
        body = wire::encode_reply(&Err(KvError::internal("reply too large for NATS")));
    }
    if let Err(err) = request.respond(Ok(body.into())).await {
        debug!(error = %err, "could not send a reply");
    }
}

/// The `KV-Hops` header's value, its name matched without regard to case.
fn hops_header(headers: Option<&HeaderMap>) -> Option<&str> {
    headers?
        .iter()
        .find(|(name, _)| AsRef::<str>::as_ref(name).eq_ignore_ascii_case(HOPS_HEADER))
        .and_then(|(_, values)| values.first())
        .map(|v| v.as_str())
}

fn bad_reply(owner: &str) -> KvError {
    KvError::internal(format!("bad reply from node {owner}"))
}

fn log_event(node: &str, event: Event) {
    match event {
        Event::Connected => info!(node, "connected to NATS"),
        Event::Disconnected => warn!(node, "disconnected from NATS; reconnecting"),
        Event::SlowConsumer(sid) => warn!(node, sid, "NATS dropped messages: slow consumer"),
        Event::ClientError(err) => warn!(node, error = %err, "NATS connection failed; retrying"),
        Event::ServerError(err) => warn!(node, error = %err, "NATS server error"),
        other => info!(node, event = %other, "NATS event"),
    }
}
