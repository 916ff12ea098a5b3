//! Joining NATS: server addresses, authentication and TLS, reconnecting, and
//! the connection's events in the log.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use async_nats::{ConnectOptions, Event};
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Delivery, Inner, LEFT, Mesh, MeshError, Waiting};
use crate::secret::{Secret, redact_url};

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

/// The prefix of a node's reply subjects: `_INBOX.<node>`, so that NATS
/// permissions can give each node its own inbox (see the README, Security).
pub fn inbox_prefix(node: &str) -> String {
    format!("_INBOX.{node}")
}

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
        let (connected, connections) = watch::channel(0u64);
        let connected = Arc::new(connected);
        let slow = Arc::new(SlowConsumerLog::default());
        let options = || {
            let node = node.to_owned();
            let waiting = waiting.clone();
            let connected = connected.clone();
            let slow = slow.clone();
            ConnectOptions::new()
                .name(format!("kvmesh-{node}"))
                .custom_inbox_prefix(inbox_prefix(&node))
                .request_timeout(Some(timeout))
                .max_reconnects(None)
                // A quick first retry, then at most one attempt a second, so a
                // mesh heals soon after NATS comes back.
                .reconnect_delay_callback(|attempts| {
                    Duration::from_millis((attempts as u64).saturating_mul(100).min(1000))
                })
                .event_callback(move |event| {
                    match event {
                        // No reply can come through a connection that is gone:
                        // the requests waiting for one end now instead of at
                        // their timeout.
                        Event::Disconnected => waiting.lock().clear(),
                        Event::Connected => connected.send_modify(|n| *n += 1),
                        _ => {}
                    }
                    let node = node.clone();
                    let slow = slow.clone();
                    async move { log_event(&node, event, &slow) }
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
            connections,
        });
        // Hands each reply to the request waiting for it. Holds only a weak
        // reference, so the mesh can be dropped.
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(message) = replies.next().await {
                let Some(inner) = weak.upgrade() else { break };
                let last = message.subject.rsplit('.').next().unwrap_or_default();
                if last == LEFT {
                    // A node that stopped has answered everything it was
                    // given, and its replies came before this notice, on this
                    // same subscription: the requests to it still waiting
                    // were never run, and fail now instead of at their timeout.
                    let owner = String::from_utf8_lossy(&message.payload);
                    for waiter in inner.waiting.lock().values() {
                        if *waiter.owner == *owner {
                            let _ = waiter.tx.send(Delivery::Left);
                        }
                    }
                } else if let Ok(id) = last.parse::<u64>()
                    && let Some(waiter) = inner.waiting.lock().get(&id)
                {
                    let _ = waiter.tx.send(Delivery::Reply(message));
                }
            }
        });
        Ok(Mesh { inner })
    }
}

/// Messages NATS dropped because this node read too slowly, logged at most
/// once a second with the count since the last line: a flood of drops must
/// not become a flood of log lines.
#[derive(Default)]
struct SlowConsumerLog {
    state: Mutex<(Option<Instant>, u64)>,
}

impl SlowConsumerLog {
    /// Counts one event; returns the count to log now, if it is time.
    fn count(&self) -> Option<u64> {
        let mut state = self.state.lock();
        state.1 += 1;
        let due = state
            .0
            .is_none_or(|last| last.elapsed() >= Duration::from_secs(1));
        if due {
            let n = state.1;
            *state = (Some(Instant::now()), 0);
            Some(n)
        } else {
            None
        }
    }
}

fn log_event(node: &str, event: Event, slow: &SlowConsumerLog) {
    match event {
        Event::Connected => info!(node, "connected to NATS"),
        Event::Disconnected => warn!(node, "disconnected from NATS; reconnecting"),
        Event::SlowConsumer(sid) => {
            if let Some(events) = slow.count() {
                warn!(
                    node,
                    sid,
                    events,
                    "NATS dropped messages: slow consumer (logged at most once a second)"
                );
            }
        }
        Event::ClientError(err) => warn!(node, error = %err, "NATS connection failed; retrying"),
        Event::ServerError(err) => warn!(node, error = %err, "NATS server error"),
        other => info!(node, event = %other, "NATS event"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_consumer_events_are_summarised() {
        let log = SlowConsumerLog::default();
        assert_eq!(log.count(), Some(1), "the first is logged at once");
        for _ in 0..10_000 {
            assert_eq!(log.count(), None);
        }
        log.state.lock().0 = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(log.count(), Some(10_001), "then a count, a second later");
    }
}
