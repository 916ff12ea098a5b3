//! A model of what clients were told, to check a store against: each client
//! writes, deletes and reads keys of its own, and remembers for each key the
//! values it may hold now (one, after an `OK` or a read; several while a
//! write's outcome is unknown). Used wherever processes are killed, paused
//! or cut off under load.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::*;

/// The values a key may hold now.
pub type Possible = BTreeSet<Option<String>>;

/// A client's keys (bucket index, key number) and what each may hold.
pub type Model = BTreeMap<(usize, u64), Possible>;

/// Whether an error line says the request certainly did not happen (it never
/// reached its owner, or its store refused it).
pub fn refused(line: &str) -> bool {
    line == "ERROR mesh unavailable\r\n"
        || line == "ERROR store unavailable\r\n"
        || (line.starts_with("ERROR node ") && line.ends_with(" unavailable\r\n"))
        || (line.starts_with("ERROR bucket ") && line.ends_with(" moving\r\n"))
}

/// The longest any client waited for an answer, in milliseconds.
pub static SLOWEST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The last few things each client was told about each of its keys
/// (client, bucket index, key number), to show beside a wrong answer.
static HISTORY: Mutex<BTreeMap<(u64, usize, u64), VecDeque<String>>> = Mutex::new(BTreeMap::new());

/// Remembers what a client was told about one of its keys.
pub fn note(id: u64, b: usize, k: u64, what: String) {
    let mut h = HISTORY.lock().expect("history lock");
    let events = h.entry((id, b, k)).or_default();
    if events.len() == 8 {
        events.pop_front();
    }
    events.push_back(what);
}

/// What a client was last told about one of its keys, oldest first.
pub fn history(id: u64, b: usize, k: u64) -> String {
    let h = HISTORY.lock().expect("history lock");
    h.get(&(id, b, k))
        .map(|e| e.iter().cloned().collect::<Vec<_>>().join("; "))
        .unwrap_or_default()
}

/// The time of day (UTC) as the nodes' logs show it, to line a client's
/// history up with them.
pub fn clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ms = now.as_millis() % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// Folds a read's answer (`value\r\n`, `\r\n`) into the model, failing the
/// test when the model does not allow it: a value no write could have left
/// there, or one older than a write acknowledged since.
pub fn check_read(possible: &mut Possible, who: &str, answer_line: &str) {
    let v = answer_line.trim_end_matches("\r\n");
    let got = (!v.is_empty()).then(|| v.to_owned());
    assert!(
        possible.contains(&got),
        "{who} answered {got:?}, model {possible:?}"
    );
    *possible = BTreeSet::from([got]);
}

/// One client: PUTs (half the time), DELETEs and GETs of its own keys `c<id>k<0..keys>`
/// in `buckets`, through whichever address `addr` holds (it may move);
/// every read checked against the model. Returns the model and how many
/// writes were acknowledged.
pub async fn client(
    id: u64,
    seed: u64,
    buckets: &'static [&'static str],
    keys: u64,
    addr: Arc<Mutex<SocketAddr>>,
    stop: Arc<AtomicBool>,
) -> (Model, u64) {
    let mut model = Model::new();
    let mut rng = XorShift::stream(seed, id);
    let mut conn = None;
    let (mut n, mut acked) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let target = *addr.lock().expect("lock");
        let b = rng.below(buckets.len() as u64) as usize;
        let k = rng.below(keys);
        let bucket = buckets[b];
        let possible = model
            .entry((b, k))
            .or_insert_with(|| BTreeSet::from([None]));
        n += 1;
        let (line, value) = match rng.below(6) {
            0 => (format!("DELETE {bucket} c{id}k{k}"), None),
            1 | 2 => (format!("GET {bucket} c{id}k{k}"), None),
            _ => {
                let v = format!("v{id}-{n}");
                (format!("PUT {bucket} c{id}k{k} {v}"), Some(v))
            }
        };
        let asked = std::time::Instant::now();
        let answer = ask(&mut conn, target, &line).await.ok();
        SLOWEST.fetch_max(asked.elapsed().as_millis() as u64, Ordering::Relaxed);
        let told = answer
            .as_ref()
            .map_or("no answer".into(), |lines| lines.concat());
        note(
            id,
            b,
            k,
            format!("{line} to {target} at {}: {told:?}", clock()),
        );
        if line.starts_with("GET") {
            if let Some(lines) = answer
                && lines.len() == 2
            {
                let who = format!("client {id}: {line} (history: {})", history(id, b, k));
                check_read(possible, &who, &lines[0]);
            }
            continue;
        }
        match answer {
            Some(lines) if lines == ["OK\r\n"] => {
                *possible = BTreeSet::from([value]);
                acked += 1;
            }
            Some(lines) if lines.len() == 1 && refused(&lines[0]) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Some(lines) if lines.len() == 1 && lines[0].starts_with("ERROR ") => {
                possible.insert(value);
            }
            Some(lines) => panic!("client {id}: {line} answered {lines:?}"),
            None => {
                possible.insert(value);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    (model, acked)
}

/// Every key of every client's model, read through `addr` (retrying while
/// the mesh heals), holds a value its model allows; returns how many.
pub async fn verify(models: &[Model], buckets: &[&str], addr: SocketAddr) -> usize {
    let mut c = LineClient::connect(addr).await;
    let mut checked = 0;
    for (id, model) in models.iter().enumerate() {
        for ((b, k), possible) in model {
            let line = format!("GET {} c{id}k{k}", buckets[*b]);
            let answer = c.read_after(&line).await;
            let mut possible = possible.clone();
            let who = format!("{line} (history: {})", history(id as u64, *b, *k));
            check_read(&mut possible, &who, answer.trim_end_matches("OK\r\n"));
            checked += 1;
        }
    }
    checked
}

/// Waits for every client (each within [`STEP`]) and returns what each
/// returned; a client that found a wrong answer fails the test.
pub async fn finish<T>(clients: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut results = Vec::with_capacity(clients.len());
    for c in clients {
        results.push(
            within("client", c)
                .await
                .expect("a client found a wrong answer"),
        );
    }
    results
}
