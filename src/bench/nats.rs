//! The raw NATS yardstick: a responder that answers like a node would, and
//! requesters that drive it with the same workload.

use std::sync::Arc;
use std::time::Instant;

use crate::rng::XorShift;

use super::conn::{SEED, pick};
use super::{BenchError, BenchOptions, ConnResult, Shared, Tally, new_histogram, value_for};

/// Starts an in-process responder on a fresh subject that answers like a node
/// would (a GET reply with the value), and returns the client and subject.
pub(super) async fn nats_responder(
    url: &str,
    opts: &BenchOptions,
) -> Result<(async_nats::Client, String), BenchError> {
    use futures_util::StreamExt;
    let setup = |e: String| BenchError::Setup(format!("NATS {url}: {e}"));
    let responder = async_nats::connect(url)
        .await
        .map_err(|e| setup(e.to_string()))?;
    let subject = format!(
        "kvmesh.bench.{}",
        responder.new_inbox().rsplit('.').next().unwrap_or("x")
    );
    let mut requests = responder
        .subscribe(subject.clone())
        .await
        .map_err(|e| setup(e.to_string()))?;
    let reply: bytes::Bytes = format!(
        r#"{{"ok":true,"value":"{}"}}"#,
        value_for("k0", opts.value_size)
    )
    .into();
    tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            if let Some(to) = msg.reply {
                let _ = responder.publish(to, reply.clone()).await;
            }
        }
    });
    let client = async_nats::connect(url)
        .await
        .map_err(|e| setup(e.to_string()))?;
    Ok((client, subject))
}

/// Keeps `pipeline` requests in flight on a shared NATS connection.
pub(super) async fn nats_requester(
    shared: Arc<Shared>,
    client: async_nats::Client,
    subject: String,
    id: u64,
) -> ConnResult {
    use futures_util::stream::{FuturesOrdered, StreamExt};
    let opts = &shared.opts;
    let work = &shared.work;
    let mut rng = XorShift::stream(SEED, id);
    let mut hist = new_histogram();
    let mut first_error = None;
    let mut tally = Tally::default();
    let mut in_flight = FuturesOrdered::new();
    loop {
        while in_flight.len() < opts.pipeline && shared.grant(1) == 1 {
            let (get, i) = pick(&mut rng, opts, work.values.len());
            let body =
                bytes::Bytes::copy_from_slice(if get { &work.gets[i] } else { &work.puts[i] });
            let client = client.clone();
            let subject = subject.clone();
            in_flight.push_back(async move {
                let start = Instant::now();
                let reply = client.request(subject, body).await;
                (start.elapsed(), reply)
            });
        }
        let Some((took, reply)) = in_flight.next().await else {
            break;
        };
        let _ = hist.record((took.as_micros() as u64).max(1));
        let verdict = match reply {
            Ok(msg) if msg.payload.starts_with(br#"{"ok":true"#) => Ok(()),
            Ok(msg) => Err(format!("reply {:?}", String::from_utf8_lossy(&msg.payload))),
            Err(e) => Err(e.to_string()),
        };
        tally.count(verdict, &mut first_error);
        shared.settle(&mut tally);
    }
    Ok((hist, first_error))
}
