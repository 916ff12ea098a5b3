//! The NATS service API (`$SRV.PING|INFO|STATS`), answered by the node itself:
//! `nats micro ls`, `nats micro info kvmesh` and `nats micro stats kvmesh`
//! list every node, its `kv.node.<name>` endpoint and its request counts.
//!
//! The replies have the shape of the `io.nats.micro.v1` schemas. The node
//! serves its endpoint through its own queue subscription rather than the
//! client library's service endpoint, so that stopping can *drain* it: every
//! request the server delivered before the unsubscription is still answered.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::{Client, Subscriber};
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{SERVICE_NAME, node_subject};

/// The queue group of every node's endpoint.
pub const QUEUE_GROUP: &str = "q";

/// This process's entry in the service API: who it is and what it has served.
#[derive(Clone)]
pub struct Registration {
    shared: Arc<Shared>,
}

struct Shared {
    id: String,
    node: String,
    started: SystemTime,
    metadata: Mutex<HashMap<String, String>>,
    stats: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    requests: u64,
    processing: Duration,
}

impl Registration {
    /// A new instance for `node`, with a fresh id, started now.
    pub fn new(client: &Client, node: &str, metadata: HashMap<String, String>) -> Self {
        // The last token of a fresh inbox is a unique id (a NUID).
        let inbox = client.new_inbox();
        let id = inbox.rsplit('.').next().unwrap_or(&inbox).to_owned();
        Self {
            shared: Arc::new(Shared {
                id,
                node: node.to_owned(),
                started: SystemTime::now(),
                metadata: Mutex::new(metadata),
                stats: Mutex::new(Counts::default()),
            }),
        }
    }

    /// The instance id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The node this instance serves.
    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// When this instance started, in milliseconds since the epoch.
    pub fn started_ms(&self) -> u64 {
        self.shared
            .started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    /// Sets one metadata entry (shown from the next INFO or PING on).
    pub fn set_metadata(&self, key: &str, value: &str) {
        self.shared
            .metadata
            .lock()
            .insert(key.to_owned(), value.to_owned());
    }

    /// Counts one request answered after `took`.
    pub fn count(&self, took: Duration) {
        let mut stats = self.shared.stats.lock();
        stats.requests += 1;
        stats.processing += took;
    }

    fn endpoint(&self) -> serde_json::Value {
        json!({
            "name": self.shared.node,
            "subject": node_subject(&self.shared.node),
            "queue_group": QUEUE_GROUP,
            "metadata": {},
        })
    }

    /// The reply to a PING, INFO or STATS request.
    fn reply(&self, verb: &str) -> serde_json::Value {
        let metadata = self.shared.metadata.lock().clone();
        let version = env!("CARGO_PKG_VERSION");
        let id = &self.shared.id;
        match verb {
            "PING" => json!({
                "type": "io.nats.micro.v1.ping_response",
                "name": SERVICE_NAME, "id": id, "version": version, "metadata": metadata,
            }),
            "INFO" => json!({
                "type": "io.nats.micro.v1.info_response",
                "name": SERVICE_NAME, "id": id, "version": version, "metadata": metadata,
                "description": "kvmesh node: a partition of a distributed key-value store",
                "endpoints": [self.endpoint()],
            }),
            _ => {
                let (requests, processing) = {
                    let stats = self.shared.stats.lock();
                    (stats.requests, stats.processing)
                };
                let average = processing
                    .checked_div(requests.max(1).min(u64::from(u32::MAX)) as u32)
                    .unwrap_or_default();
                let mut endpoint = self.endpoint();
                endpoint["num_requests"] = requests.into();
                endpoint["num_errors"] = 0.into();
                endpoint["processing_time"] = (processing.as_nanos() as u64).into();
                endpoint["average_processing_time"] = (average.as_nanos() as u64).into();
                endpoint["last_error"] = "".into();
                json!({
                    "type": "io.nats.micro.v1.stats_response",
                    "name": SERVICE_NAME, "id": id, "version": version, "metadata": metadata,
                    "started": rfc3339(self.shared.started),
                    "endpoints": [endpoint],
                })
            }
        }
    }

    /// Answers the service API's requests until `stop` is cancelled.
    pub async fn answer(self, client: Client, stop: CancellationToken) -> Result<(), String> {
        let mut subscriptions: Vec<Subscriber> = Vec::new();
        for verb in ["PING", "INFO", "STATS"] {
            for subject in [
                format!("$SRV.{verb}"),
                format!("$SRV.{verb}.{SERVICE_NAME}"),
                format!("$SRV.{verb}.{SERVICE_NAME}.{}", self.shared.id),
            ] {
                subscriptions.push(client.subscribe(subject).await.map_err(|e| e.to_string())?);
            }
        }
        let mut requests = futures_util::stream::select_all(subscriptions);
        tokio::spawn(async move {
            loop {
                let request = tokio::select! {
                    _ = stop.cancelled() => break,
                    request = requests.next() => match request {
                        Some(request) => request,
                        None => break,
                    },
                };
                let Some(reply) = request.reply else { continue };
                let verb = request.subject.split('.').nth(1).unwrap_or_default();
                let body = serde_json::to_vec(&self.reply(verb)).unwrap_or_default();
                if let Err(err) = client.publish(reply, body.into()).await {
                    debug!(error = %err, "could not answer the service API");
                }
            }
        });
        Ok(())
    }
}

/// `2026-11-30T06:30:18.429341000Z`: a time in RFC 3339, in UTC.
fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since the epoch to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_rfc3339() {
        for (secs, nanos, text) in [
            (0, 0, "1970-01-01T00:00:00.000000000Z"),
            (951_782_400, 5, "2000-02-29T00:00:00.000000005Z"),
            (1_796_020_218, 429_341_000, "2026-11-30T06:30:18.429341000Z"),
        ] {
            let t = UNIX_EPOCH + Duration::new(secs, nanos);
            assert_eq!(rfc3339(t), text);
        }
    }
}
