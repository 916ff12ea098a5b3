//! Moving buckets when their byte range changes hands.
//!
//! A change of `table` that gives bytes to another node starts a move; the
//! new owner drives it, so a move resumes whenever that node (re)starts:
//!
//! 1. The old owner (the bytes' holder in `held`) seals them at once: its
//!    requests for them go to the new owner, and a write that was already on
//!    its way there is refused (`ERROR bucket <bucket> moving`), after every
//!    write let in before (a durable node's writer first stores what it has).
//! 2. The new owner pulls the buckets from the holder over NATS
//!    (`kv.move.<holder>`, page by page), stores them (in its own store when
//!    durable: nothing is acknowledged as moved before JetStream has it),
//!    and then records itself as the holder in `held` (compare-and-set).
//!    Until then its requests for those bytes wait (see the router's gate).
//! 3. Once `held` names another node, the old owner drops its copy.
//!
//! The old owner's copy stays sealed and whole until step 2 ends, so when
//! either side dies mid-move nothing is lost: the new owner pulls again when
//! it comes back (a durable holder reloads its copy from its store).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::kv;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{HELD_KEY, RouteState, Routes, Serve, parse_table, table_json};
use crate::command::{Command, Limits};
use crate::error::KvError;
use crate::registry::Registry;
use crate::router::{ByteRange, RoutingTable};
use crate::store::Store;

/// The subject a node answers move requests on.
pub fn move_subject(node: &str) -> String {
    format!("kv.move.{node}")
}

/// A page of buckets asked of their holder.
#[derive(Debug, Serialize, Deserialize)]
struct PageRequest {
    /// The bytes moving, first to last.
    bytes: Vec<u8>,
    /// The table revision the asker follows (the holder must have it too).
    revision: u64,
    /// Where the page starts: bucket index, key index.
    from: (usize, usize),
}

/// One bucket of a page: its name and some (or all) of its keys.
#[derive(Debug, Serialize, Deserialize)]
struct PageBucket {
    bucket: String,
    keys: Vec<(String, String)>,
}

/// A page: buckets in order, and where the next page starts (none: done).
#[derive(Debug, Serialize, Deserialize)]
struct Page {
    /// Which copy the page is cut from: a page of another copy (the holder
    /// restarted, or another of its processes took over) does not go on
    /// from where the last one stopped, so the asker starts again.
    copy: String,
    buckets: Vec<PageBucket>,
    next: Option<(usize, usize)>,
}

/// The answer to a page request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum PageReply {
    Page(Page),
    Refused { refused: String },
}

/// What a node sends per page, at most.
const PAGE_BYTES: usize = 256 * 1024;

/// A sealed copy being sent: its name, the buckets and their keys, sorted.
type Dump = Arc<(String, Vec<(String, Vec<(String, String)>)>)>;

/// This node's side of every move.
pub struct Mover {
    client: Client,
    kv: kv::Store,
    routes: Arc<Routes>,
    registry: Registry,
    store: Option<Store>,
    limits: Limits,
    timeout: Duration,
    /// Bytes this node has sealed (it holds them, another owns them).
    sealed: Mutex<BTreeSet<u8>>,
    /// Copies being sent, by the bytes they hold.
    dumps: Mutex<HashMap<Vec<u8>, Dump>>,
    /// Imports under way, by their bytes.
    importing: Mutex<BTreeSet<Vec<u8>>>,
    /// Names the copies this process makes: unique to the process.
    copies: (u64, std::sync::atomic::AtomicU64),
}

impl Mover {
    /// Starts serving move requests and following the routing state.
    pub fn start(
        client: Client,
        kv: kv::Store,
        routes: Arc<Routes>,
        registry: Registry,
        store: Option<Store>,
        limits: Limits,
        timeout: Duration,
    ) -> Arc<Mover> {
        let mover = Arc::new(Mover {
            client,
            kv,
            routes,
            registry,
            store,
            limits,
            timeout,
            sealed: Mutex::default(),
            dumps: Mutex::default(),
            importing: Mutex::default(),
            copies: (process_tag(), Default::default()),
        });
        tokio::spawn(mover.clone().serve());
        tokio::spawn(mover.clone().reconcile_loop());
        mover
    }

    /// Whether this process acts for its node (a durable standby does not).
    fn acting(&self) -> bool {
        self.store.as_ref().is_none_or(|s| s.is_active())
    }

    /// Answers `kv.move.<node>`.
    async fn serve(self: Arc<Self>) {
        let subject = move_subject(self.routes.me());
        let mut requests = loop {
            match self
                .client
                .queue_subscribe(subject.clone(), "kvmesh".into())
                .await
            {
                Ok(s) => break s,
                Err(err) => {
                    warn!(%err, "cannot serve {subject}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        while let Some(message) = requests.next().await {
            let Some(reply) = message.reply.clone() else {
                continue;
            };
            let answer = match serde_json::from_slice::<PageRequest>(&message.payload) {
                Ok(request) => self.page(request).await,
                Err(err) => PageReply::Refused {
                    refused: format!("bad request: {err}"),
                },
            };
            let body = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(err) = self.client.publish(reply, body.into()).await {
                debug!(%err, "could not answer a move request");
            }
        }
    }

    /// One page of the sealed copy of `request.bytes`.
    async fn page(&self, request: PageRequest) -> PageReply {
        let refuse = |why: &str| PageReply::Refused {
            refused: why.to_owned(),
        };
        if !self.acting() {
            return refuse("not the active process");
        }
        let state = self.routes.current();
        if state.revision < request.revision {
            return refuse("this node has not seen that table yet");
        }
        let me = self.routes.me();
        if request.bytes.is_empty()
            || request.bytes.iter().any(|b| {
                state.held.owner_of_byte(*b) != Some(me)
                    || state.table.owner_of_byte(*b) == Some(me)
            })
        {
            return refuse("those bytes are not moving away from this node");
        }
        if !self.seal(&request.bytes).await {
            return refuse("could not seal the buckets");
        }
        let dump = {
            let mut dumps = self.dumps.lock();
            dumps
                .entry(request.bytes.clone())
                .or_insert_with(|| {
                    let n = self
                        .copies
                        .1
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let name = format!("{:x}-{n}", self.copies.0);
                    Arc::new((name, self.registry.dump(&request.bytes)))
                })
                .clone()
        };
        let mut page = cut_page(&dump.1, request.from);
        page.copy = dump.0.clone();
        PageReply::Page(page)
    }

    /// Seals `bytes` (once every write let in before is applied).
    async fn seal(&self, bytes: &[u8]) -> bool {
        let missing: Vec<u8> = {
            let sealed = self.sealed.lock();
            bytes
                .iter()
                .copied()
                .filter(|b| !sealed.contains(b))
                .collect()
        };
        if missing.is_empty() {
            return true;
        }
        let done = self.set_sealed(&missing, true).await;
        if done {
            self.sealed.lock().extend(missing);
        }
        done
    }

    /// Follows the routing state: seals what moves away, drops what has
    /// moved, starts imports; again on every change and every second (an
    /// import that failed is tried again).
    async fn reconcile_loop(self: Arc<Self>) {
        let mut changes = self.routes.subscribe();
        loop {
            if self.acting() {
                self.reconcile().await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
        }
    }

    async fn reconcile(self: &Arc<Self>) {
        let state = self.routes.current();
        let me = self.routes.me();
        let holds = |b: u8| state.held.owner_of_byte(b) == Some(me);
        let owns = |b: u8| state.table.owner_of_byte(b) == Some(me);
        // Held here, owned elsewhere: seal now, so that no write lands here
        // once requests go to the new owner.
        let away: Vec<u8> = (0..=255u8).filter(|b| holds(*b) && !owns(*b)).collect();
        if !away.is_empty() {
            self.seal(&away).await;
        }
        // Sealed here, but no longer moving away: moved (drop the copy) or
        // given back before the move (unseal).
        let done: Vec<u8> = {
            let sealed = self.sealed.lock();
            sealed
                .iter()
                .copied()
                .filter(|b| !away.contains(b))
                .collect()
        };
        if !done.is_empty() {
            let back: Vec<u8> = done.iter().copied().filter(|b| holds(*b)).collect();
            let gone: Vec<u8> = done.iter().copied().filter(|b| !holds(*b)).collect();
            if !back.is_empty() && self.unseal(&back).await {
                info!(bytes = %ranges(&back), "a move away was called off; serving those buckets again");
            }
            if !gone.is_empty() && self.unseal(&gone).await {
                self.dumps
                    .lock()
                    .retain(|bytes, _| !bytes.iter().any(|b| gone.contains(b)));
            }
        }
        // Buckets of bytes this node neither holds nor owns: left from a
        // move that finished while it was away. Dropped.
        let leftover: Vec<u8> = (0..=255u8).filter(|b| !holds(*b) && !owns(*b)).collect();
        let stale = self.registry.buckets_in(&leftover);
        if !stale.is_empty() {
            let names: Vec<String> = stale.into_iter().map(|(name, _)| name).collect();
            match self.drop_buckets(&names).await {
                Ok(()) => info!(
                    buckets = names.len(),
                    "dropped the buckets of ranges that moved to other nodes"
                ),
                Err(err) => {
                    warn!(%err, "could not drop the buckets of ranges that moved away; trying again")
                }
            }
        }
        // Owned here, held elsewhere: import, one task per holder and run.
        for (holder, bytes) in groups(&state) {
            let started = self.importing.lock().insert(bytes.clone());
            if started {
                let mover = self.clone();
                tokio::spawn(async move {
                    let result = mover.import(holder.as_deref(), &bytes).await;
                    mover.importing.lock().remove(&bytes);
                    if let Err(err) = result {
                        warn!(bytes = %ranges(&bytes), %err, "a move in did not finish; trying again");
                    }
                });
            }
        }
    }

    async fn unseal(&self, bytes: &[u8]) -> bool {
        let done = self.set_sealed(bytes, false).await;
        if done {
            let mut sealed = self.sealed.lock();
            for b in bytes {
                sealed.remove(b);
            }
        }
        done
    }

    /// Seals or unseals `bytes` in memory (through the store's writer when
    /// durable, after the writes it let in); whether it was done.
    async fn set_sealed(&self, bytes: &[u8], seal: bool) -> bool {
        match &self.store {
            Some(store) => store.seal(bytes.to_vec(), seal).await,
            None if seal => {
                self.registry.seal(bytes);
                true
            }
            None => {
                self.registry.unseal(bytes);
                true
            }
        }
    }

    /// Drops buckets of this node (through the store when durable).
    async fn drop_buckets(&self, names: &[String]) -> Result<(), String> {
        match &self.store {
            None => {
                for name in names {
                    self.registry.remove(name);
                }
                Ok(())
            }
            Some(store) => {
                let commands = names
                    .iter()
                    .map(|name| Command::Drop {
                        bucket: name.clone(),
                    })
                    .collect();
                for answer in store.submit(commands).await.await {
                    match answer {
                        Ok(_) => {}
                        Err(err) if err.code() == crate::error::ErrorCode::NotFound => {}
                        Err(err) => return Err(err.to_string()),
                    }
                }
                Ok(())
            }
        }
    }

    /// Pulls `bytes` from `holder`, stores them here, and records this node
    /// as their holder.
    async fn import(&self, holder: Option<&str>, bytes: &[u8]) -> Result<(), String> {
        let started = std::time::Instant::now();
        let still = |state: &RouteState| {
            bytes.iter().all(|b| {
                state.serve(*b) == Serve::Importing && state.held.owner_of_byte(*b) == holder
            })
        };
        let mut buckets: Vec<(String, Vec<(String, String)>)> = Vec::new();
        info!(bytes = %ranges(bytes), from = holder.unwrap_or("nobody"), "moving buckets in");
        if let Some(holder) = holder {
            let mut from = (0, 0);
            let mut copy: Option<String> = None;
            loop {
                let state = self.routes.current();
                if !still(&state) {
                    return Ok(());
                }
                let request = PageRequest {
                    bytes: bytes.to_vec(),
                    revision: state.revision,
                    from,
                };
                let body = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
                let asked = tokio::time::timeout(
                    self.timeout,
                    self.client.request(move_subject(holder), body.into()),
                )
                .await;
                let reply = match asked {
                    Ok(Ok(reply)) => reply,
                    Ok(Err(err)) => {
                        debug!(%err, holder, "move request failed; asking again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    Err(_) => {
                        debug!(holder, "move request timed out; asking again");
                        continue;
                    }
                };
                match serde_json::from_slice::<PageReply>(&reply.payload) {
                    Ok(PageReply::Page(page)) => {
                        self.check_page(&page, bytes)?;
                        if copy.as_ref().is_some_and(|c| *c != page.copy) {
                            // Another copy: start again from its first page.
                            debug!(holder, "the holder's copy changed; pulling again");
                            buckets.clear();
                            copy = None;
                            from = (0, 0);
                            continue;
                        }
                        copy = Some(page.copy.clone());
                        for part in page.buckets {
                            match buckets.last_mut() {
                                Some((name, keys)) if *name == part.bucket => {
                                    keys.extend(part.keys)
                                }
                                _ => buckets.push((part.bucket, part.keys)),
                            }
                        }
                        match page.next {
                            Some(next) => from = next,
                            None => break,
                        }
                    }
                    Ok(PageReply::Refused { refused }) => {
                        debug!(holder, refused, "move request refused; asking again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(err) => return Err(format!("bad page from {holder}: {err}")),
                }
            }
        }
        let keys: usize = buckets.iter().map(|(_, k)| k.len()).sum();
        self.install(bytes, buckets).await?;
        // Recorded only once stored: until then the holder keeps its copy.
        loop {
            let state = self.routes.current();
            if !still(&state) {
                return Ok(());
            }
            match self.record_holder(bytes, holder).await {
                Ok(true) => break,
                Ok(false) => return Ok(()),
                Err(err) => {
                    debug!(%err, "could not record the move; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        info!(
            bytes = %ranges(bytes),
            from = holder.unwrap_or("nobody"),
            keys,
            ms = started.elapsed().as_millis() as u64,
            "buckets moved in"
        );
        Ok(())
    }

    /// Refuses a page holding what cannot be a bucket of `bytes`.
    fn check_page(&self, page: &Page, bytes: &[u8]) -> Result<(), String> {
        for part in &page.buckets {
            if !part
                .bucket
                .as_bytes()
                .first()
                .is_some_and(|b| bytes.contains(b))
            {
                return Err(format!(
                    "a page held bucket {:?} of another range",
                    part.bucket
                ));
            }
            for (key, value) in &part.keys {
                let put = Command::Put {
                    bucket: part.bucket.as_str(),
                    key: key.as_str(),
                    value: value.as_str(),
                };
                self.limits
                    .validate(&put)
                    .map_err(|e| format!("a page held a bad entry: {}", e.message()))?;
            }
        }
        Ok(())
    }

    /// Replaces this node's buckets of `bytes` with `buckets`.
    async fn install(
        &self,
        bytes: &[u8],
        buckets: Vec<(String, Vec<(String, String)>)>,
    ) -> Result<(), String> {
        let old: Vec<String> = self
            .registry
            .buckets_in(bytes)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        match &self.store {
            None => {
                for name in &old {
                    self.registry.remove(name);
                }
                for (bucket, keys) in buckets {
                    apply(&self.registry, Command::Create { bucket: &bucket })?;
                    for (key, value) in keys {
                        let put = Command::Put {
                            bucket: bucket.as_str(),
                            key: key.as_str(),
                            value: value.as_str(),
                        };
                        apply(&self.registry, put)?;
                    }
                }
                Ok(())
            }
            Some(store) => {
                self.drop_buckets(&old).await?;
                let mut commands: Vec<Command> = Vec::new();
                for (bucket, keys) in buckets {
                    commands.push(Command::Create {
                        bucket: bucket.clone(),
                    });
                    for (key, value) in keys {
                        commands.push(Command::Put {
                            bucket: bucket.clone(),
                            key,
                            value,
                        });
                    }
                }
                for chunk in chunks(commands, 4096) {
                    for answer in store.submit(chunk).await.await {
                        answer.map_err(|e| format!("could not store a moved key: {e}"))?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Records this node as the holder of `bytes` in `held`, if `holder`
    /// still is; `false` when someone else changed them.
    async fn record_holder(&self, bytes: &[u8], holder: Option<&str>) -> Result<bool, String> {
        let entry = self
            .kv
            .entry(HELD_KEY)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no held key")?;
        let held = parse_table(&entry.value)?;
        if bytes.iter().any(|b| held.owner_of_byte(*b) != holder) {
            return Ok(false);
        }
        let me = self.routes.me();
        let next = with_holder(&held, bytes, me)?;
        self.kv
            .update(HELD_KEY, table_json(&next).into(), entry.revision)
            .await
            .map_err(|e| e.to_string())?;
        Ok(true)
    }
}

/// A number no other process is likely to have: its start time and pid.
fn process_tag() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 40)
}

fn apply(registry: &Registry, command: Command<&str>) -> Result<(), String> {
    registry
        .apply(command)
        .map(|_| ())
        .map_err(|e: KvError| e.to_string())
}

fn chunks(mut commands: Vec<Command>, size: usize) -> Vec<Vec<Command>> {
    let mut out = Vec::new();
    while commands.len() > size {
        let rest = commands.split_off(size);
        out.push(std::mem::replace(&mut commands, rest));
    }
    if !commands.is_empty() {
        out.push(commands);
    }
    out
}

/// The page of `dump` that starts at `from`.
fn cut_page(dump: &[(String, Vec<(String, String)>)], from: (usize, usize)) -> Page {
    let (mut b, mut k) = from;
    let mut buckets = Vec::new();
    let mut size = 0;
    while b < dump.len() {
        let (name, keys) = &dump[b];
        let mut part = PageBucket {
            bucket: name.clone(),
            keys: Vec::new(),
        };
        while k < keys.len() && size < PAGE_BYTES {
            let (key, value) = &keys[k];
            size += key.len() + value.len() + 8;
            part.keys.push((key.clone(), value.clone()));
            k += 1;
        }
        buckets.push(part);
        if k < keys.len() {
            return Page {
                copy: String::new(),
                buckets,
                next: Some((b, k)),
            };
        }
        b += 1;
        k = 0;
        size += name.len() + 16;
        if size >= PAGE_BYTES && b < dump.len() {
            return Page {
                copy: String::new(),
                buckets,
                next: Some((b, 0)),
            };
        }
    }
    Page {
        copy: String::new(),
        buckets,
        next: None,
    }
}

/// The bytes this node imports, grouped by holder into runs of neighbours.
fn groups(state: &RouteState) -> Vec<(Option<String>, Vec<u8>)> {
    let mut out: Vec<(Option<String>, Vec<u8>)> = Vec::new();
    for b in state.importing() {
        let holder = state.held.owner_of_byte(b).map(str::to_owned);
        match out.last_mut() {
            Some((h, bytes)) if *h == holder && bytes.last() == Some(&(b.wrapping_sub(1))) => {
                bytes.push(b)
            }
            _ => out.push((holder, vec![b])),
        }
    }
    out
}

/// `held` with `bytes` held by `node`.
pub fn with_holder(held: &RoutingTable, bytes: &[u8], node: &str) -> Result<RoutingTable, String> {
    let holder = |b: u8| -> Option<&str> {
        if bytes.contains(&b) {
            Some(node)
        } else {
            held.owner_of_byte(b)
        }
    };
    from_bytes(holder)
}

/// The shortest table giving each byte the node `of` names: printable
/// bytes as ranges, and the rest (which only `*` can cover) as a final `*`.
pub fn from_bytes<'a>(of: impl Fn(u8) -> Option<&'a str>) -> Result<RoutingTable, String> {
    let printable = 0x21u8..=0x7e;
    // The bytes no range can name all share the holder of byte 0.
    let rest = of(0);
    let mut entries: Vec<(ByteRange, String)> = Vec::new();
    let mut run: Option<(u8, u8, &str)> = None;
    for b in printable {
        let node = of(b).filter(|n| Some(*n) != rest);
        match (run, node) {
            (Some((lo, hi, n)), Some(m)) if n == m && hi + 1 == b => run = Some((lo, b, n)),
            (_, node) => {
                if let Some((lo, hi, n)) = run.take() {
                    entries.push((ByteRange::new(lo, hi), n.to_owned()));
                }
                run = node.map(|n| (b, b, n));
            }
        }
    }
    if let Some((lo, hi, n)) = run {
        entries.push((ByteRange::new(lo, hi), n.to_owned()));
    }
    // Printable bytes with no holder while the rest has one cannot be
    // said with `*`; the table refuses nothing else.
    if let Some(rest) = rest {
        if (0x21u8..=0x7e).any(|b| of(b).is_none()) {
            return Err("a table cannot leave printable bytes out of a \"*\"".into());
        }
        entries.push((ByteRange::ALL, rest.to_owned()));
    }
    RoutingTable::new(entries).map_err(|e| e.message)
}

/// Bytes as ranges, for logs: `a-m,x`.
pub fn ranges(bytes: &[u8]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let lo = bytes[i];
        let mut hi = lo;
        while i + 1 < bytes.len() && bytes[i + 1] == hi.wrapping_add(1) {
            i += 1;
            hi = bytes[i];
        }
        let show = |b: u8| {
            if (0x21..=0x7e).contains(&b) {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        };
        out.push(if lo == hi {
            show(lo)
        } else {
            format!("{}-{}", show(lo), show(hi))
        });
        i += 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_written_as_the_shortest_table() {
        let held = parse_table(br#"[{"range":"a-m","node":"foo"},{"range":"*","node":"bar"}]"#)
            .expect("a table");
        let bytes: Vec<u8> = (b'g'..=b'm').collect();
        let next = with_holder(&held, &bytes, "baz").expect("a table");
        assert_eq!(
            table_json(&next),
            r#"[{"range":"a-f","node":"foo"},{"range":"g-m","node":"baz"},{"range":"*","node":"bar"}]"#
        );
        let all: Vec<u8> = (0..=255).collect();
        let one = with_holder(&held, &all, "foo").expect("a table");
        assert_eq!(table_json(&one), r#"[{"range":"*","node":"foo"}]"#);
        assert_eq!(ranges(&bytes), "g-m");
        assert_eq!(ranges(&[b'a', b'c', b'd', 0]), "a,c-d,\\x00");
    }

    #[test]
    fn pages_cut_a_dump_and_go_on_where_they_stopped() {
        let big = "v".repeat(100_000);
        let dump: Vec<(String, Vec<(String, String)>)> = vec![
            ("a".into(), vec![]),
            (
                "b".into(),
                (0..5).map(|i| (format!("k{i}"), big.clone())).collect(),
            ),
            ("c".into(), vec![("k".into(), "v".into())]),
        ];
        let mut from = (0, 0);
        let mut got: Vec<(String, usize)> = Vec::new();
        let mut pages = 0;
        loop {
            let page = cut_page(&dump, from);
            pages += 1;
            for part in page.buckets {
                match got.last_mut() {
                    Some((name, n)) if *name == part.bucket => *n += part.keys.len(),
                    _ => got.push((part.bucket, part.keys.len())),
                }
            }
            match page.next {
                Some(next) => from = next,
                None => break,
            }
        }
        assert!(pages > 1);
        assert_eq!(got, vec![("a".into(), 0), ("b".into(), 5), ("c".into(), 1)]);
    }
}
