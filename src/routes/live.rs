//! Following the table in `kvmesh_routes`: read before the node answers
//! anything, then watched; every change is put in force within moments. A
//! table that breaks the rules is refused with a logged error, and the last
//! good one stays.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use tracing::{error, info, warn};

use super::{HELD_KEY, ROUTES_BUCKET, Routes, TABLE_KEY, parse_table, table_json};
use crate::router::RoutingTable;

/// Opens `kvmesh_routes`, creating it (with `replicas`) when missing.
pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<kv::Store, String> {
    match js.get_key_value(ROUTES_BUCKET).await {
        Ok(kv) => Ok(kv),
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: ROUTES_BUCKET.to_owned(),
                description: "kvmesh routing table".into(),
                history: 16,
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot create {ROUTES_BUCKET}: {e}")),
    }
}

/// A JetStream context for the routes, with the node's request timeout.
pub fn context(client: &Client, timeout: Duration) -> jetstream::Context {
    let mut js = jetstream::new(client.clone());
    js.set_timeout(timeout);
    js
}

/// Reads the table (writing `configured` first when the key is missing)
/// and the holders (the table, when missing), puts them in force, and
/// follows their changes from then on. Retries, saying so, until NATS and
/// JetStream answer: a node must not serve from a table that may be stale.
pub async fn follow(
    client: Client,
    routes: Arc<Routes>,
    configured: RoutingTable,
    replicas: usize,
    timeout: Duration,
) -> kv::Store {
    let js = context(&client, timeout);
    let mut attempt = 0u32;
    loop {
        match start(&js, &routes, &configured, replicas).await {
            Ok((kv, watch)) => {
                tokio::spawn(keep_following(kv.clone(), routes, watch));
                return kv;
            }
            Err(err) => {
                attempt += 1;
                warn!(%err, attempt, "cannot read the routing table from JetStream; retrying (nothing is answered until it is read)");
                tokio::time::sleep(crate::mesh::retry_pause(timeout)).await;
            }
        }
    }
}

/// Makes sure both keys exist, and reads them through a watch that goes on.
async fn start(
    js: &jetstream::Context,
    routes: &Routes,
    configured: &RoutingTable,
    replicas: usize,
) -> Result<(kv::Store, kv::Watch), String> {
    let kv = open(js, replicas).await?;
    create_if_missing(&kv, TABLE_KEY, table_json(configured)).await?;
    let table = kv
        .get(TABLE_KEY)
        .await
        .map_err(|e| format!("cannot read {TABLE_KEY}: {e}"))?
        .ok_or_else(|| format!("{TABLE_KEY} vanished"))?;
    // Until a node records a move, every byte's buckets are where the
    // table first put them.
    create_if_missing(&kv, HELD_KEY, String::from_utf8_lossy(&table).into_owned()).await?;
    // The stream's last sequence, from its leader: the watch must reach it.
    let stream = js
        .get_stream(format!("KV_{ROUTES_BUCKET}"))
        .await
        .map_err(|e| format!("cannot read {ROUTES_BUCKET}: {e}"))?;
    let last = stream.cached_info().state.last_sequence;
    let mut watch = kv
        .watch_with_history(">")
        .await
        .map_err(|e| format!("cannot watch {ROUTES_BUCKET}: {e}"))?;
    let mut current = Current::from(routes);
    crate::store::read_whole(&mut watch, &stream, ROUTES_BUCKET, last, |entry| {
        current.take(entry);
    })
    .await
    .map_err(|e| format!("cannot read {ROUTES_BUCKET}: {e}"))?;
    current.put_in_force(routes);
    info!(
        revision = current.revision,
        routes = %current.table,
        "routing table read from JetStream"
    );
    Ok((kv, watch))
}

async fn create_if_missing(kv: &kv::Store, key: &str, value: String) -> Result<(), String> {
    match kv.create(key, value.into()).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("cannot write {key}: {e}")),
    }
}

/// The table and holders as last read, good ones only.
struct Current {
    revision: u64,
    table: RoutingTable,
    held: RoutingTable,
}

impl Current {
    fn from(routes: &Routes) -> Self {
        let state = routes.current();
        Self {
            revision: state.revision,
            table: state.table.clone(),
            held: state.held.clone(),
        }
    }

    /// Takes one change of `table` or `held`, if it is good.
    fn take(&mut self, entry: &kv::Entry) -> bool {
        if entry.operation != kv::Operation::Put {
            error!(key = %entry.key, "a routing key was deleted; keeping the last good value");
            return false;
        }
        let parsed = parse_table(&entry.value);
        match (entry.key.as_str(), parsed) {
            (TABLE_KEY, Ok(table)) => {
                self.revision = entry.revision;
                self.table = table;
                true
            }
            (HELD_KEY, Ok(held)) => {
                self.held = held;
                true
            }
            (TABLE_KEY | HELD_KEY, Err(err)) => {
                error!(
                    key = %entry.key,
                    revision = entry.revision,
                    %err,
                    "refused a routing table that breaks the rules; keeping the last good one"
                );
                false
            }
            _ => false,
        }
    }

    fn put_in_force(&self, routes: &Routes) {
        routes.set(self.revision, self.table.clone(), self.held.clone());
    }
}

/// Applies every change as it comes; when the watch ends (NATS went away),
/// starts a new one from the last revision seen.
async fn keep_following(kv: kv::Store, routes: Arc<Routes>, mut watch: kv::Watch) {
    let mut current = Current::from(&routes);
    let mut last_seen = 0u64;
    loop {
        while let Some(entry) = watch.next().await {
            let Ok(entry) = entry else { break };
            last_seen = last_seen.max(entry.revision);
            if current.take(&entry) {
                current.put_in_force(&routes);
                if entry.key == TABLE_KEY {
                    info!(
                        revision = current.revision,
                        routes = %current.table,
                        "routing table changed"
                    );
                }
            }
        }
        // Watch again, from the change after the last one seen.
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            match kv.watch_all_from_revision(last_seen + 1).await {
                Ok(w) => {
                    watch = w;
                    break;
                }
                Err(err) => warn!(%err, "cannot watch the routing table; retrying"),
            }
        }
    }
}
