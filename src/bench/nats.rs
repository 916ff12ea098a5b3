//! The NATS yardsticks: raw request/reply (a responder that answers like a
//! node would, and requesters that drive it), and a JetStream KV client
//! doing the same GET/PUT mix on a KV bucket.

use std::sync::Arc;
use std::time::Instant;

use crate::rng::XorShift;

use super::conn::{SEED, pick};
use super::{
    BenchError, BenchOptions, ConnResult, Shared, Tally, Workload, new_histogram, value_for,
};

/// A NATS connection for the benchmark.
pub(super) async fn connect(url: &str) -> Result<async_nats::Client, BenchError> {
    async_nats::connect(url)
        .await
        .map_err(|e| BenchError::Setup(format!("NATS {url}: {e}")))
}

/// Answers requests on `subject` like a node would (a GET reply with a
/// value of `value_size` bytes), until the connection ends: the raw NATS
/// yardstick's responder, run in a process of its own
/// (`kvmesh bench --target nats --respond`) so that it does not share the
/// client's CPU.
pub async fn respond(url: &str, subject: &str, value_size: usize) -> Result<(), BenchError> {
    let responder = connect(url).await?;
    let requests = subscribe(&responder, subject).await?;
    answer(responder, requests, value_size).await;
    Ok(())
}

async fn subscribe(
    client: &async_nats::Client,
    subject: &str,
) -> Result<async_nats::Subscriber, BenchError> {
    client
        .subscribe(subject.to_owned())
        .await
        .map_err(|e| BenchError::Setup(format!("NATS subscribe {subject}: {e}")))
}

/// Answers every request like a node answers a GET.
async fn answer(
    responder: async_nats::Client,
    mut requests: async_nats::Subscriber,
    value_size: usize,
) {
    use futures_util::StreamExt;
    let reply: bytes::Bytes =
        format!(r#"{{"ok":true,"value":"{}"}}"#, value_for("k0", value_size)).into();
    while let Some(msg) = requests.next().await {
        if let Some(to) = msg.reply {
            let _ = responder.publish(to, reply.clone()).await;
        }
    }
}

/// Starts an in-process responder on a fresh subject (see [`respond`]), and
/// returns the client to request with and the subject.
pub(super) async fn nats_responder(
    url: &str,
    opts: &BenchOptions,
) -> Result<(async_nats::Client, String), BenchError> {
    let responder = connect(url).await?;
    let subject = format!(
        "kvmesh.bench.{}",
        responder.new_inbox().rsplit('.').next().unwrap_or("x")
    );
    let requests = subscribe(&responder, &subject).await?;
    tokio::spawn(answer(responder, requests, opts.value_size));
    Ok((connect(url).await?, subject))
}

/// Keeps `pipeline` requests in flight on a shared NATS connection.
pub(super) async fn nats_requester(
    shared: Arc<Shared>,
    client: async_nats::Client,
    subject: String,
    id: u64,
) -> ConnResult {
    let work = shared.clone();
    drive(shared, id, move |get, i| {
        let body = bytes::Bytes::copy_from_slice(if get {
            &work.work.gets[i]
        } else {
            &work.work.puts[i]
        });
        let (client, subject) = (client.clone(), subject.clone());
        async move {
            match client.request(subject, body).await {
                Ok(msg) if msg.payload.starts_with(br#"{"ok":true"#) => Ok(()),
                Ok(msg) => Err(format!("reply {:?}", String::from_utf8_lossy(&msg.payload))),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
}

/// Keeps `pipeline` requests in flight, each made by `request(get, i)` for
/// a request picked from the workload, timing and checking every one.
async fn drive<F, Fut>(shared: Arc<Shared>, id: u64, request: F) -> ConnResult
where
    F: Fn(bool, usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    use futures_util::stream::{FuturesOrdered, StreamExt};
    let opts = &shared.opts;
    let mut rng = XorShift::stream(SEED, id);
    let mut hist = new_histogram();
    let mut first_error = None;
    let mut tally = Tally::default();
    let mut in_flight = FuturesOrdered::new();
    loop {
        while in_flight.len() < opts.pipeline && shared.grant(1) == 1 {
            let (get, i) = pick(&mut rng, opts, shared.work.values.len());
            let made = request(get, i);
            in_flight.push_back(async move {
                let start = Instant::now();
                let verdict = made.await;
                (start.elapsed(), verdict)
            });
        }
        let Some((took, verdict)) = in_flight.next().await else {
            break;
        };
        let _ = hist.record((took.as_micros() as u64).max(1));
        tally.count(verdict, &mut first_error);
        shared.settle(&mut tally);
    }
    Ok((hist, first_error))
}

/// The KV bucket the JetStream yardstick uses.
const BENCH_KV: &str = "kvmesh_bench";

/// Makes the KV bucket `kvmesh_bench` afresh (one replica) and, with
/// `prefill`, writes every key once (publishes in flight together).
pub(super) async fn jetstream_setup(
    url: &str,
    opts: &BenchOptions,
    work: &Workload,
) -> Result<async_nats::jetstream::kv::Store, BenchError> {
    use async_nats::jetstream::{self, kv};
    let setup = |e: String| BenchError::Setup(format!("JetStream {url}: {e}"));
    let client = async_nats::connect(url)
        .await
        .map_err(|e| setup(e.to_string()))?;
    let js = jetstream::new(client);
    let _ = js.delete_key_value(BENCH_KV).await;
    let store = js
        .create_key_value(kv::Config {
            bucket: BENCH_KV.into(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| setup(e.to_string()))?;
    if opts.prefill {
        for chunk in work.gets.chunks(512).zip(work.puts.chunks(512)) {
            let mut acks = Vec::with_capacity(chunk.0.len());
            for (key, value) in chunk.0.iter().zip(chunk.1) {
                let subject = format!("$KV.{BENCH_KV}.{}", String::from_utf8_lossy(key));
                let ack = js
                    .publish(subject, bytes::Bytes::copy_from_slice(value))
                    .await
                    .map_err(|e| setup(e.to_string()))?;
                acks.push(ack);
            }
            for ack in acks {
                ack.await.map_err(|e| setup(e.to_string()))?;
            }
        }
    }
    Ok(store)
}

/// Keeps `pipeline` KV requests in flight (a GET is `kv.get`, a PUT
/// Keeps `pipeline` KV requests in flight (a GET is `kv.get`, a PUT
/// `kv.put`, each a JetStream round trip), checking every answer.
pub(super) async fn jetstream_requester(
    shared: Arc<Shared>,
    kv: async_nats::jetstream::kv::Store,
    id: u64,
) -> ConnResult {
    let work = shared.clone();
    drive(shared, id, move |get, i| {
        let key = String::from_utf8_lossy(&work.work.gets[i]).into_owned();
        let value = bytes::Bytes::copy_from_slice(&work.work.puts[i]);
        let kv = kv.clone();
        async move {
            if get {
                match kv.get(&key).await {
                    Ok(None) => Ok(()),
                    Ok(Some(found)) if found == value => Ok(()),
                    Ok(Some(found)) => Err(format!("GET {key} found {found:?}")),
                    Err(e) => Err(e.to_string()),
                }
            } else {
                kv.put(&key, value)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        }
    })
    .await
}
