//! Opening a store: creating its KV bucket on first start, and loading what
//! it holds into memory. The watch that loaded it goes on, for a standby, as
//! its live copy (see `role.rs`).

use std::collections::HashMap;
use std::time::Instant;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use tracing::{debug, info, warn};

use super::keys::{self, Stored};
use crate::command::Command;
use crate::registry::Registry;

/// A store loaded into memory.
pub(super) struct Loaded {
    /// The highest bucket generation seen: new CREATEs take higher ones.
    pub highest: u64,
    /// The stream sequence of the last change seen.
    pub seen: u64,
    /// The process named in the `active` key (empty: none).
    pub holder: String,
    /// The generation of each bucket loaded.
    pub generations: HashMap<u64, String>,
    /// Changes after the loaded state, as they happen.
    pub watch: kv::Watch,
}

/// How long reading a KV bucket whole waits for its watch's next entry
/// before it gives up (and is started again).
const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads a KV bucket's `watch` (with history) until it has delivered
/// every change up to `last`, the stream's last sequence when the watch was
/// made, handing each entry to `take`; returns the last sequence delivered.
///
/// A watch reads the copy of one server, and right after a restart (or a
/// new leader) that copy may be behind the stream: a watch that has run dry
/// early is asked, of the stream's leader, for the changes it still owes.
pub(crate) async fn read_whole(
    watch: &mut kv::Watch,
    stream: &jetstream::stream::Stream,
    bucket: &str,
    last: u64,
    mut take: impl FnMut(&kv::Entry),
) -> Result<u64, String> {
    let mut watched = 0u64;
    let mut owed = 0u64;
    loop {
        let entry = match tokio::time::timeout(CATCH_UP, watch.next()).await {
            Ok(Some(entry)) => entry.map_err(|e| e.to_string())?,
            Ok(None) => return Err("the watch ended".into()),
            Err(_) => {
                return Err(format!(
                    "nothing came from the watch for {} s (at sequence {watched} of {last})",
                    CATCH_UP.as_secs()
                ));
            }
        };
        watched = watched.max(entry.revision);
        take(&entry);
        if entry.delta == 0 && watched >= owed {
            // Asked at every load, not only when `watched < last`, so that a
            // leader that cannot be asked (permissions, say) shows at once.
            match first_change_after(stream, bucket, watched).await? {
                Some(sequence) if sequence <= last => {
                    if owed == 0 {
                        info!(
                            bucket,
                            read = watched,
                            stream = last,
                            "the copy of the KV bucket being read is behind the stream; waiting for it to catch up"
                        );
                    }
                    owed = sequence;
                }
                // Nothing the stream held when reading began is missing (a
                // later change comes through the watch, as it goes on).
                _ => return Ok(watched),
            }
        }
    }
}

/// The sequence of the bucket's first change after `after`, as the
/// stream's leader has it (not a copy that may lag); `None` when there is
/// none.
async fn first_change_after(
    stream: &jetstream::stream::Stream,
    bucket: &str,
    after: u64,
) -> Result<Option<u64>, String> {
    use jetstream::stream::RawMessageErrorKind;
    match stream
        .get_first_raw_message_by_subject(format!("$KV.{bucket}.>"), after + 1)
        .await
    {
        Ok(message) => Ok(Some(message.sequence)),
        Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(err) => Err(format!("cannot ask the stream's leader: {err}")),
    }
}

/// Creates the KV bucket if it is missing (with atomic batches allowed:
/// writes go in batches, see `writer.rs`), and loads what it holds into
/// `registry`, replacing what was there.
pub(super) async fn open_and_load(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    registry: &Registry,
) -> Result<Loaded, String> {
    let kv = match js.get_key_value(name).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: name.to_owned(),
                description: "kvmesh node store".into(),
                history: 1,
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot create the store: {e}"))?,
    };
    let started = Instant::now();
    let stream_name = format!("KV_{name}");
    let mut stream = js
        .get_stream(&stream_name)
        .await
        .map_err(|e| format!("cannot read the store: {e}"))?;
    if !stream.cached_info().config.allow_atomic_publish {
        let mut config = stream.cached_info().config.clone();
        config.allow_atomic_publish = true;
        js.update_stream(config).await.map_err(|e| {
            format!("cannot allow atomic batches on the store (nats-server 2.12 or newer is needed): {e}")
        })?;
        stream = js
            .get_stream(&stream_name)
            .await
            .map_err(|e| format!("cannot read the store: {e}"))?;
    }
    let state = &stream.cached_info().state;
    let (messages, last) = (state.messages, state.last_sequence);
    let mut generations: HashMap<u64, String> = HashMap::new();
    let mut entries: Vec<(u64, String, String)> = Vec::new();
    let mut skipped = 0u64;
    let mut holder = String::new();
    let mut watch = kv
        .watch_with_history(">")
        .await
        .map_err(|e| format!("cannot read the store: {e}"))?;
    let watched = if messages > 0 {
        read_whole(&mut watch, &stream, name, last, |entry| {
            if entry.operation == kv::Operation::Put {
                if entry.key == keys::ACTIVE_KEY {
                    holder = String::from_utf8_lossy(&entry.value).into_owned();
                } else if !keys::take_entry(
                    &entry.key,
                    &entry.value,
                    &mut generations,
                    &mut entries,
                ) {
                    skipped += 1;
                }
            }
        })
        .await
        .map_err(|e| format!("cannot read the store: {e}"))?
    } else {
        0
    };
    let seen = watched.max(last);
    registry.clear();
    for (generation, bucket) in &generations {
        registry.create_with_generation(bucket, *generation);
    }
    let mut loaded_keys = 0u64;
    let mut orphans: Vec<u64> = Vec::new();
    for (generation, key, value) in entries {
        match generations.get(&generation) {
            Some(bucket) => {
                let put = Command::Put {
                    bucket: bucket.as_str(),
                    key: key.as_str(),
                    value: value.as_str(),
                };
                if registry.apply(put).is_ok() {
                    loaded_keys += 1;
                }
            }
            None => orphans.push(generation),
        }
    }
    info!(
        store = %name,
        buckets = generations.len(),
        keys = loaded_keys,
        sequence = seen,
        ms = started.elapsed().as_millis() as u64,
        "store loaded"
    );
    if skipped > 0 {
        warn!(
            store = %name,
            skipped,
            "left out stored keys that kvmesh could not have written (bad names or values)"
        );
    }
    // Keys of dropped buckets whose purge did not finish: purge them now.
    orphans.sort_unstable();
    orphans.dedup();
    // New CREATEs take generations above all of these, so that keys left
    // of a dropped bucket can never belong to a new one.
    let highest = generations
        .keys()
        .chain(&orphans)
        .copied()
        .max()
        .unwrap_or(0);
    for generation in orphans {
        let subject = format!("$KV.{name}.k.{generation}.>");
        if let Err(err) = stream.purge().filter(subject).await {
            debug!(error = %err, generation, "could not purge the keys of a dropped bucket");
        }
    }
    Ok(Loaded {
        highest,
        seen,
        holder,
        generations,
        watch,
    })
}

/// Applies one change seen on the store's watch to a standby's memory,
/// keeping `generations` (generation to bucket) in step.
pub(super) fn follow_change(
    registry: &Registry,
    generations: &mut HashMap<u64, String>,
    entry: &kv::Entry,
) {
    let put = entry.operation == kv::Operation::Put;
    let value = put.then_some(&entry.value[..]);
    match keys::read(&entry.key, value) {
        Some(Stored::Bucket(bucket, generation)) if put => {
            if registry.generation(&bucket) != Some(generation) {
                let _ = registry.apply(Command::Drop { bucket: &bucket });
                generations.retain(|_, b| *b != bucket);
                registry.create_with_generation(&bucket, generation);
                generations.insert(generation, bucket);
            }
        }
        Some(Stored::Bucket(bucket, _)) => {
            let _ = registry.apply(Command::Drop { bucket: &bucket });
            generations.retain(|_, b| *b != bucket);
        }
        Some(Stored::Entry(generation, key, value)) => {
            if let Some(bucket) = generations.get(&generation) {
                let _ = if put {
                    registry.apply(Command::Put {
                        bucket,
                        key: &key,
                        value: &value,
                    })
                } else {
                    registry.apply(Command::Delete { bucket, key: &key })
                };
            }
        }
        Some(Stored::Active(_) | Stored::Alive) | None => {}
    }
}
