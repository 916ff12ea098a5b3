//! One process per node name: whether another process serves the same
//! name, asked through the service API, at start and after every reconnect.

use std::time::Duration;

use async_nats::{Client, Message};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{Mesh, SERVICE_NAME, confirm};

/// How long a node listens for other instances' answers to `$SRV.INFO.kvmesh`.
const INSTANCE_WAIT: Duration = Duration::from_millis(250);

/// When, after a reconnect, to ask whether another process serves this name.
const RECHECK_AFTER: [Duration; 2] = [Duration::from_millis(500), Duration::from_millis(2000)];

/// One running instance of the `kvmesh` service, as the service API shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Instance {
    /// When it started (ms since the epoch); earlier wins a name.
    pub(super) started: u64,
    /// Its service id, to tell instances apart.
    pub(super) id: String,
}

/// The instances of the `kvmesh` service that carry `node` in their metadata,
/// asked through the service API (`$SRV.INFO.kvmesh`). Only a registered
/// kvmesh node counts: a passive `nats sub 'kv.>'` does not.
pub(super) async fn instances_named(client: &Client, node: &str) -> Vec<Instance> {
    let inbox = client.new_inbox();
    let mut replies = match client.subscribe(inbox.clone()).await {
        Ok(replies) => replies,
        Err(err) => {
            warn!(error = %err, "could not ask for other instances of this node");
            return Vec::new();
        }
    };
    let asked = client
        .publish_with_reply(format!("$SRV.INFO.{SERVICE_NAME}"), inbox, "".into())
        .await;
    if let Err(err) = asked {
        warn!(error = %err, "could not ask for other instances of this node");
        return Vec::new();
    }
    let mut found = Vec::new();
    let deadline = tokio::time::sleep(INSTANCE_WAIT);
    tokio::pin!(deadline);
    loop {
        let reply = tokio::select! {
            _ = &mut deadline => break,
            reply = replies.next() => match reply {
                Some(reply) => reply,
                None => break,
            },
        };
        if let Some(instance) = instance_of(&reply, node) {
            found.push(instance);
        }
    }
    found
}

/// The instance an INFO reply describes, if it serves `node`.
fn instance_of(reply: &Message, node: &str) -> Option<Instance> {
    let info: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
    let metadata = info.get("metadata")?;
    if metadata.get("node")?.as_str()? != node {
        return None;
    }
    Some(Instance {
        id: info.get("id")?.as_str()?.to_owned(),
        started: metadata
            .get("started")
            .and_then(|s| s.as_str())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
    })
}

/// After every reconnect, asks again whether another process serves this
/// node's name (two processes may both have started while NATS was away).
/// The one that started later stops serving, and says why.
pub(super) async fn watch_for_duplicates(mesh: Mesh, node: String, me: Instance, tokens: Tokens) {
    let Tokens {
        stop,
        finished,
        deposed,
    } = tokens;
    let mut connections = mesh.inner.connections.clone();
    connections.mark_unchanged();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = connections.changed() => if changed.is_err() { return },
        }
        // Every process re-subscribes as it reconnects: ask once the others
        // have had time to, and once more later.
        let mut others = Vec::new();
        for wait in RECHECK_AFTER {
            tokio::select! {
                _ = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            others = instances_named(&mesh.inner.client, &node)
                .await
                .into_iter()
                .filter(|other| other.id != me.id)
                .collect();
            if !others.is_empty() {
                break;
            }
        }
        if let Some(first) = others.iter().min() {
            if *first < me {
                error!(
                    node,
                    other = %first.id,
                    "another process named {node} has been serving kv.node.{node} since before \
                     this one started; this one stops serving (each node needs its own name)"
                );
                stop.cancel();
                // Deposed once the server knows: from then on every request
                // for this name reaches the other process.
                finished.cancelled().await;
                confirm(&mesh.inner.client, mesh.inner.timeout, "unsubscribing").await;
                deposed.cancel();
                return;
            }
            warn!(
                node,
                other = %first.id,
                "another process named {node} appeared on NATS; it started later and stops serving"
            );
        }
    }
}

/// How the serve loop and the duplicate watch tell each other what happened.
pub(super) struct Tokens {
    /// Stop serving.
    pub(super) stop: CancellationToken,
    /// The serve loop has ended.
    pub(super) finished: CancellationToken,
    /// This process stopped serving because another serves its name.
    pub(super) deposed: CancellationToken,
}
