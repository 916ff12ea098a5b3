//! Serving `kv.node.<name>`: the serve loop that answers the other nodes (and
//! `nats req`), and stopping it without leaving a delivered request unanswered.
//!
//! A batch's answers go out as they are made (see [`super::reply`]), so a
//! batch costs the owner at most about one message of memory however large
//! its values, and no member fails because of its neighbours.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap, Message, Subscriber};
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::names::{Instance, Tokens, instances_named, watch_for_duplicates};
use super::reply::Reply;
use super::service::{QUEUE_GROUP, Registration};
use super::{Coming, Handler, LEFT, Mesh, MeshError, Started, Via, confirm, node_subject};
use crate::command::Limits;
use crate::error::KvError;
use crate::wire::{self, DEADLINE_HEADER, HOPS_HEADER, WireRequest};

impl Mesh {
    /// Registers this process in the `kvmesh` service (`nats micro ls`).
    /// With `exclusive` (a memory node), refuses when another process
    /// already serves that name; durable processes share a name, one active.
    pub async fn register(&self, node: &str, exclusive: bool) -> Result<Listing, MeshError> {
        let client = self.inner.client.clone();
        if exclusive && self.is_connected() && !instances_named(&client, node).await.is_empty() {
            return Err(MeshError::DuplicateName(node.to_owned()));
        }
        let registration = Registration::new(&client, node, HashMap::new());
        let started = registration.started_ms();
        registration.set_metadata("node", node);
        registration.set_metadata("started", &started.to_string());
        let listed = CancellationToken::new();
        registration
            .clone()
            .answer(client, listed.clone())
            .await
            .map_err(MeshError::Service)?;
        Ok(Listing {
            me: Instance {
                id: registration.id().to_owned(),
                started,
            },
            registration,
            listed,
            exclusive,
        })
    }

    /// Serves `kv.node.<node>` with `handler`, as the process `listing`
    /// registered. When connected, returns only once the subscription has
    /// reached the server.
    pub async fn serve<H: Handler>(
        &self,
        listing: &Listing,
        handler: Arc<H>,
        limits: Limits,
        tracker: TaskTracker,
    ) -> Result<Serving, MeshError> {
        let client = self.inner.client.clone();
        let connected = self.is_connected();
        let node = listing.registration.node();
        let requests = client
            .queue_subscribe(node_subject(node), QUEUE_GROUP.into())
            .await
            .map_err(|e| MeshError::Service(e.to_string()))?;
        if connected {
            // Ready only once the server has the subscription: a request sent
            // the moment this returns reaches this node.
            confirm(&client, self.inner.timeout, "subscribing").await;
        }
        info!(subject = %node_subject(node), connected, "serving on NATS");
        let stop = CancellationToken::new();
        let deposed = CancellationToken::new();
        let forwarders = Forwarders::default();
        let serve = ServeLoop {
            forwarders: forwarders.clone(),
            client: client.clone(),
            handler,
            limits,
            tracker,
            registration: listing.registration.clone(),
        };
        let finished = CancellationToken::new();
        let task = tokio::spawn(serve.run(requests, stop.clone(), finished.clone()));
        if listing.exclusive {
            tokio::spawn(watch_for_duplicates(
                self.clone(),
                node.to_owned(),
                listing.me.clone(),
                Tokens {
                    stop: stop.clone(),
                    finished,
                    deposed: deposed.clone(),
                },
            ));
        }
        Ok(Serving {
            announce_stop: listing.exclusive,
            node: node.to_owned(),
            forwarders,
            stop,
            deposed,
            task,
            client,
            timeout: self.inner.timeout,
        })
    }
}

/// This process's entry in the service API; [`Listing::leave`] removes it.
pub struct Listing {
    registration: Registration,
    me: Instance,
    listed: CancellationToken,
    exclusive: bool,
}

impl Listing {
    /// The instance id (unique to this process).
    pub fn id(&self) -> &str {
        self.registration.id()
    }

    /// Shows `role` (`active` or `standby`) in the service API metadata.
    pub fn set_role(&self, role: &str) {
        self.registration.set_metadata("role", role);
    }

    /// Shows the revision of the routing table in force (0: the
    /// configuration's) in the service API metadata.
    pub fn set_routes_revision(&self, revision: u64) {
        self.registration
            .set_metadata("routes_revision", &revision.to_string());
    }

    /// Leaves the service API.
    pub fn leave(&self) {
        self.listed.cancel();
    }
}

/// The inboxes (reply subjects without their last token) of the nodes that
/// forwarded requests here, to tell when this node stops. A handful in
/// practice; bounded against a flood of made-up ones.
#[derive(Clone, Default)]
struct Forwarders(Arc<Mutex<Vec<String>>>);

/// The most forwarding inboxes remembered.
const MAX_FORWARDERS: usize = 1024;

impl Forwarders {
    fn note(&self, reply: &str) {
        let Some((inbox, _)) = reply.rsplit_once('.') else {
            return;
        };
        let mut inboxes = self.0.lock();
        if !inboxes.iter().any(|known| known == inbox) && inboxes.len() < MAX_FORWARDERS {
            inboxes.push(inbox.to_owned());
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Vec<String>> {
        self.0.lock()
    }
}

/// A running serve loop; stop it before draining the client.
pub struct Serving {
    /// Whether this is the only process serving its name, so that it may
    /// tell the forwarding nodes when it stops.
    announce_stop: bool,
    node: String,
    /// The inboxes of the nodes that forwarded to this one.
    forwarders: Forwarders,
    stop: CancellationToken,
    deposed: CancellationToken,
    task: JoinHandle<()>,
    client: Client,
    timeout: Duration,
}

impl Serving {
    /// Cancelled when this process found another serving its name first and
    /// stopped serving.
    pub fn deposed(&self) -> CancellationToken {
        self.deposed.clone()
    }

    /// Unsubscribes, answers what was delivered before the unsubscription,
    /// and waits for the serve loop to end (handlers already started keep
    /// running on the tracker).
    pub async fn stop(mut self) {
        self.stop.cancel();
        // The loop ends once the requests already delivered are answered; a
        // full queue while NATS is unreachable could hold it, so do not wait
        // past the request timeout.
        if tokio::time::timeout(self.timeout, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
        // Once the round trip is back, the server has seen the unsubscription,
        // so from then on a request for this node gets "no responders" at once
        // instead of reaching a node that will not answer.
        if self.client.connection_state() == async_nats::connection::State::Connected {
            confirm(&self.client, self.timeout, "unsubscribing").await;
            // Everything this node was given is answered: tell every node
            // that forwarded to it, in the inbox its replies went to, so that
            // a request the server delivered while the unsubscription was on
            // its way (and that this node never saw) fails at once. Not when
            // other processes serve the same name (a durable node's
            // standbys): the notice would fail requests that another process
            // of the node is running.
            if !self.announce_stop {
                return;
            }
            let inboxes = std::mem::take(&mut *self.forwarders.lock());
            for inbox in inboxes {
                let notice = format!("{inbox}.{LEFT}");
                if let Err(err) = self.client.publish(notice, self.node.clone().into()).await {
                    debug!(error = %err, "could not announce the stop");
                }
            }
            confirm(&self.client, self.timeout, "announcing the stop").await;
        }
    }
}

/// What the serve loop needs to answer a request.
struct ServeLoop<H> {
    forwarders: Forwarders,
    client: Client,
    handler: Arc<H>,
    limits: Limits,
    tracker: TaskTracker,
    registration: Registration,
}

impl<H: Handler> ServeLoop<H> {
    /// Answers requests in arrival order until stopped; then answers what was
    /// delivered before the unsubscription, so that callers never wait for
    /// their timeout.
    async fn run(
        self,
        mut requests: Subscriber,
        stop: CancellationToken,
        finished: CancellationToken,
    ) {
        let _finished = finished.drop_guard();
        let mut stopping = false;
        let mut after_stop = 0u64;
        loop {
            let request = if stopping {
                match requests.next().await {
                    Some(request) => {
                        after_stop += 1;
                        request
                    }
                    None => break,
                }
            } else {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => {
                        // Drain: the server stops delivering, and everything
                        // it delivered before is still read and answered; the
                        // stream ends once the server has confirmed.
                        if let Err(err) = requests.drain().await {
                            debug!(error = %err, "unsubscribing failed");
                            break;
                        }
                        stopping = true;
                        continue;
                    }
                    request = requests.next() => match request {
                        Some(request) => request,
                        None => break,
                    },
                }
            };
            self.answer(request).await;
        }
        debug!(answered_while_stopping = after_stop, "stopped serving");
    }

    /// Decodes one request and starts what it asks for, in arrival order, so
    /// that requests take effect in the order they were sent; only waiting
    /// for forwarded answers happens in a task of its own.
    async fn answer(&self, message: Message) {
        let Some(to) = message.reply.clone() else {
            // Nobody could learn the outcome, so the command is not run.
            debug!(subject = %message.subject, "ignored a message without a reply subject");
            return;
        };
        if message.headers.is_some() {
            // Forwarded by a node (a person's request has no KV-Hops header).
            self.forwarders.note(&to);
        }
        let mut reply = Reply::new(&self.client, to, self.registration.clone());
        let via = match via_headers(message.headers.as_ref()) {
            Ok(via) => via,
            Err(err) => return reply.single(wire::encode_reply(&Err(err))).await,
        };
        if via
            .deadline
            .is_some_and(|deadline| wire::now_ms() > deadline)
        {
            // Its sender has given up on it and told its client so; run
            // now, a write could overwrite what that client wrote since.
            debug!(
                deadline = via.deadline,
                "dropped a request that came after its sender gave up"
            );
            let late = KvError::timed_out(self.registration.node());
            return reply.single(wire::encode_reply(&Err(late))).await;
        }
        let decoded = wire::decode_request(&message.payload, &self.limits);
        match decoded {
            Err(err) => reply.single(wire::encode_reply(&Err(err))).await,
            Ok(WireRequest::Single(command)) => match self.handler.start(command, via).await {
                Started::Done(result) => reply.single(wire::encode_reply(&result)).await,
                Started::Forwarded(answer) => {
                    self.tracker.spawn(async move {
                        let body = wire::encode_reply(&answer.first().await);
                        reply.single(body).await;
                    });
                }
            },
            Ok(WireRequest::Batch(members)) => {
                // Members start in order, like a connection's pipelined
                // requests; answers go out as soon as all before them are out.
                let mut later: Vec<Part> = Vec::new();
                for member in members {
                    let started = match member {
                        Ok(command) => self.handler.start(command, via).await,
                        Err(err) => Started::Done(Err(err)),
                    };
                    match started {
                        Started::Done(result) if later.is_empty() => {
                            reply.push(wire::encode_reply(&result)).await;
                        }
                        Started::Done(result) => {
                            later.push(Part::Ready(wire::encode_reply(&result)))
                        }
                        Started::Forwarded(answer) => later.push(Part::Later(answer)),
                    }
                }
                if later.is_empty() {
                    reply.finish().await;
                } else {
                    self.tracker.spawn(async move {
                        for part in later {
                            let body = match part {
                                Part::Ready(body) => body,
                                Part::Later(answer) => wire::encode_reply(&answer.first().await),
                            };
                            reply.push(body).await;
                        }
                        reply.finish().await;
                    });
                }
            }
        }
    }
}

/// A batch member's answer: encoded, or forwarded with the answer to come.
enum Part {
    Ready(Vec<u8>),
    Later(Coming),
}

/// How a request came, from its headers (names matched without regard to
/// case): the hop count from every `KV-Hops` value, the largest, so that a
/// request cannot shed hops by carrying two (absent is 0); the deadline from
/// every `KV-Deadline` value, the soonest (absent is none). A value that is
/// not a number is refused.
fn via_headers(headers: Option<&HeaderMap>) -> Result<Via, KvError> {
    let mut via = Via::default();
    let Some(headers) = headers else {
        return Ok(via);
    };
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if name.eq_ignore_ascii_case(HOPS_HEADER) {
            for value in values {
                via.hops = via.hops.max(wire::parse_hops(Some(value.as_str()))?);
            }
        } else if name.eq_ignore_ascii_case(DEADLINE_HEADER) {
            for value in values {
                let deadline = wire::parse_deadline(value.as_str())?;
                via.deadline = Some(via.deadline.map_or(deadline, |d| d.min(deadline)));
            }
        }
    }
    Ok(via)
}
