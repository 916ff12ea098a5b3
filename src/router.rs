//! Routing: which node owns a bucket, and where a command is executed.
//!
//! [`RoutingTable::owner_of`] is a pure lookup on the bucket name's first byte (a
//! 256-entry index built once from the ordered table, so the first matching entry
//! wins at O(1)). [`Router`] decides per command: run it on this node's registry,
//! or forward it to the owner through the [`Mesh`], counting hops.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::command::{Command, Reply, valid_node_name};
use crate::error::KvError;

use crate::mesh::{Answers, Coming, Handler, Mesh, Started, Via};
use crate::registry::Registry;
use crate::routes::{Routes, Serve};
use crate::store::Store;

/// An inclusive range of first bytes: `a-m`, `x`, or `*` (every byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    lo: u8,
    hi: u8,
}

impl ByteRange {
    /// Every byte, 0 to 255: the catch-all `*`.
    pub const ALL: ByteRange = ByteRange { lo: 0, hi: 255 };

    /// The bytes `lo` to `hi` (`lo <= hi`).
    pub fn new(lo: u8, hi: u8) -> Self {
        Self {
            lo: lo.min(hi),
            hi: hi.max(lo),
        }
    }

    /// The first and last byte.
    pub fn bounds(&self) -> (u8, u8) {
        (self.lo, self.hi)
    }

    /// Whether this is the catch-all `*`.
    pub fn is_catch_all(&self) -> bool {
        *self == Self::ALL
    }

    fn overlaps(&self, other: &ByteRange) -> bool {
        self.lo <= other.hi && other.lo <= self.hi
    }
}

impl FromStr for ByteRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let printable = |b: u8| (0x21..=0x7e).contains(&b);
        match s.as_bytes() {
            b"*" => Ok(Self::ALL),
            &[b] if printable(b) => Ok(ByteRange { lo: b, hi: b }),
            &[lo, b'-', hi] if printable(lo) && printable(hi) => {
                if lo <= hi {
                    Ok(ByteRange { lo, hi })
                } else {
                    Err(format!(
                        "range {s:?} runs backwards (write \"{}-{}\")",
                        hi as char, lo as char
                    ))
                }
            }
            _ => Err(format!(
                "bad range {s:?}: use \"*\", one printable ASCII character like \"x\", \
                 or two joined by a dash like \"a-m\""
            )),
        }
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_catch_all() {
            f.write_str("*")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo as char)
        } else {
            write!(f, "{}-{}", self.lo as char, self.hi as char)
        }
    }
}

/// Why a routing table was refused: which entry, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableError {
    /// The position of the offending entry.
    pub index: usize,
    /// What is wrong.
    pub message: String,
}

const NO_ENTRY: u16 = u16::MAX;

/// An ordered list of `(range, node)` entries; the first match wins.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    entries: Vec<(ByteRange, Arc<str>)>,
    index: [u16; 256],
}

impl RoutingTable {
    /// Builds a table, refusing overlapping ranges, bad node names and entries
    /// that a catch-all before them makes unreachable. A `*` may overlap
    /// earlier entries: it takes whatever bytes they leave.
    pub fn new(entries: Vec<(ByteRange, String)>) -> Result<Self, TableError> {
        let mut index = [NO_ENTRY; 256];
        for (i, (range, node)) in entries.iter().enumerate() {
            let fail = |message: String| TableError { index: i, message };
            if !valid_node_name(node) {
                return Err(fail(format!(
                    "bad node name {node:?}: use letters, digits, '_' and '-'"
                )));
            }
            if let Some(j) = entries[..i].iter().position(|(r, _)| r.is_catch_all()) {
                return Err(fail(format!(
                    "entry {range} is unreachable: the catch-all \"*\" of entry {j} comes first"
                )));
            }
            let overlapped = entries[..i].iter().position(|(r, _)| r.overlaps(range));
            if let Some(j) = overlapped.filter(|_| !range.is_catch_all()) {
                return Err(fail(format!(
                    "range {range} overlaps range {} of entry {j}",
                    entries[j].0
                )));
            }
            for byte in range.lo..=range.hi {
                if index[byte as usize] == NO_ENTRY {
                    index[byte as usize] = i as u16;
                }
            }
        }
        let entries = entries
            .into_iter()
            .map(|(range, node)| (range, Arc::from(node)))
            .collect();
        Ok(Self { entries, index })
    }

    /// The table of a node that owns every byte.
    pub fn catch_all(node: &str) -> Self {
        Self {
            entries: vec![(ByteRange::ALL, Arc::from(node))],
            index: [0; 256],
        }
    }

    /// The entries, in order.
    pub fn entries(&self) -> impl Iterator<Item = (ByteRange, &str)> {
        self.entries.iter().map(|(r, n)| (*r, &**n))
    }

    /// The node that owns `bucket`, if any entry covers its first byte.
    pub fn owner_of(&self, bucket: &str) -> Option<&str> {
        self.owner_of_byte(*bucket.as_bytes().first()?)
    }

    /// The node that owns the buckets starting with `first`, if any.
    pub fn owner_of_byte(&self, first: u8) -> Option<&str> {
        self.owner_arc(first).map(|n| &**n)
    }

    /// [`RoutingTable::owner_of_byte`], as the shared name.
    fn owner_arc(&self, first: u8) -> Option<&Arc<str>> {
        match self.index[first as usize] {
            NO_ENTRY => None,
            i => Some(&self.entries[i as usize].1),
        }
    }
}

impl fmt::Display for RoutingTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.entries.is_empty() {
            return f.write_str("(empty)");
        }
        for (i, (range, node)) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{range}→{node}")?;
        }
        Ok(())
    }
}

/// Where a command will run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// On this node's registry.
    Local,
    /// Here, once its bucket's byte range has moved in (see `routes`).
    Moving,
    /// On another node, reached through the mesh.
    Remote(Arc<str>),
}

/// Commands held until their buckets have moved in, in arrival order.
struct Gated {
    commands: Vec<Command>,
    via: Via,
    until: Instant,
    answers: oneshot::Sender<Answers>,
}

/// The queue of held commands. While commands for the buckets starting with
/// a byte wait in it, every later command for those buckets joins it, so
/// that none overtakes one sent before it; other buckets go on as usual.
struct Gate {
    tx: mpsc::UnboundedSender<Gated>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Gated>>>,
    /// Commands held, by their bucket's first byte.
    waiting: [AtomicUsize; 256],
    timeout: Duration,
}

impl Gate {
    fn slot(&self, bucket: &str) -> &AtomicUsize {
        &self.waiting[bucket.as_bytes().first().copied().unwrap_or(0) as usize]
    }

    /// Whether commands for `bucket` are held.
    #[inline]
    fn holds(&self, bucket: &str) -> bool {
        self.slot(bucket).load(Ordering::Acquire) > 0
    }
}

/// Decides where each command runs and runs it there.
pub struct Router {
    node: Arc<str>,
    routes: Arc<Routes>,
    registry: Registry,
    mesh: Option<Mesh>,
    /// A durable node's store; `None` in memory.
    store: Option<Store>,
    max_hops: u32,
    gate: Gate,
}

impl Router {
    /// A router for node `node`; `mesh` is `None` for a node that needs no NATS.
    pub fn new(
        node: &str,
        routes: Arc<Routes>,
        registry: Registry,
        mesh: Option<Mesh>,
        max_hops: u32,
        timeout: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            node: Arc::from(node),
            routes,
            registry,
            mesh,
            store: None,
            max_hops,
            gate: Gate {
                tx,
                rx: Mutex::new(Some(rx)),
                waiting: std::array::from_fn(|_| AtomicUsize::new(0)),
                timeout,
            },
        }
    }

    /// This router, with its node's buckets kept durable in `store`.
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    /// Whether a local command must go through the store rather than be
    /// answered from memory now: every write of a durable node, and a read
    /// that must not overtake a write on its way. `client_waits` tells, for a
    /// read on a durable node, whether the client that sent it has writes on
    /// their way (a TCP connection knows its own; a request over NATS, which
    /// cannot tell one client from another, asks whether any write is).
    /// A memory node answers `false` without asking.
    pub fn must_wait_for_store<S: AsRef<str>>(
        &self,
        command: &Command<S>,
        client_waits: impl FnOnce(&Store) -> bool,
    ) -> bool {
        if self.gate.holds(command.bucket()) {
            return true;
        }
        let Some(store) = &self.store else {
            return false;
        };
        match command {
            Command::Get { .. } => client_waits(store) || !store.lease_holds(),
            Command::Where { .. } => false,
            _ => true,
        }
    }

    /// Queues local commands in the store (a durable node's writes, and the
    /// reads that wait their turn behind them); their answers to come.
    pub async fn store_submit(&self, commands: Vec<Command>) -> Coming {
        if commands
            .iter()
            .any(|c| self.gate.holds(c.bucket()) || self.is_moving(c.bucket()))
        {
            return self.hold(commands, Via::default());
        }
        self.submit_now(commands).await
    }

    /// [`Router::store_submit`], not held.
    async fn submit_now(&self, commands: Vec<Command>) -> Coming {
        match &self.store {
            Some(store) => store.submit(commands).await,
            None => Coming::ready(
                commands
                    .iter()
                    .map(|c| self.execute_local(c.borrowed()))
                    .collect(),
            ),
        }
    }

    /// Where `command`, having already made `hops` hops, runs next.
    ///
    /// The hop limit exists because tables may differ from node to node: two
    /// nodes that each think the other owns a bucket would otherwise bounce a
    /// request between them forever.
    pub fn target<S: AsRef<str>>(
        &self,
        command: &Command<S>,
        hops: u32,
    ) -> Result<Target, KvError> {
        let bucket = command.bucket();
        let Some(&first) = bucket.as_bytes().first() else {
            return Err(KvError::no_route(bucket));
        };
        let routes = self.routes.load();
        match routes.serve(first) {
            serve @ (Serve::Local | Serve::Importing) => {
                // A WHERE is answered here: the owner is this node.
                if matches!(command, Command::Where { .. }) {
                    return Ok(Target::Local);
                }
                // A standby forwards its node's buckets to the active
                // process.
                if self.store.as_ref().is_some_and(|s| !s.is_active()) {
                    if hops >= self.max_hops {
                        return Err(KvError::routing_loop(bucket));
                    }
                    return Ok(Target::Remote(self.node.clone()));
                }
                Ok(if serve == Serve::Local {
                    Target::Local
                } else {
                    Target::Moving
                })
            }
            Serve::Remote if hops >= self.max_hops => Err(KvError::routing_loop(bucket)),
            Serve::Remote => match routes.table.owner_arc(first) {
                Some(owner) => Ok(Target::Remote(owner.clone())),
                None => Err(KvError::no_route(bucket)),
            },
            Serve::NoRoute => Err(KvError::no_route(bucket)),
        }
    }

    /// Whether `bucket`'s byte range is moving in.
    fn is_moving(&self, bucket: &str) -> bool {
        bucket
            .as_bytes()
            .first()
            .is_some_and(|b| self.routes.load().serve(*b) == Serve::Importing)
    }

    /// Runs a command that [`Router::target`] placed on this node.
    pub fn execute_local(&self, command: Command<&str>) -> Result<Reply, KvError> {
        match command {
            Command::Where { .. } => Ok(Reply::Node(self.node.to_string())),
            other => self.registry.apply(other),
        }
    }

    /// This node's buckets.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Routes a command that came `via` some hops: runs it here, or
    /// publishes it to its owner (arriving there with one hop more) without
    /// waiting for the answer. Commands started one after the other take
    /// effect in that order.
    pub async fn start(&self, command: Command, via: Via) -> Started {
        if self.gate.holds(command.bucket()) {
            return Started::Forwarded(self.hold(vec![command], via));
        }
        self.start_now(command, via).await
    }

    /// [`Router::start`], not held.
    async fn start_now(&self, command: Command, via: Via) -> Started {
        match self.target(&command, via.hops) {
            Ok(Target::Local) if self.must_wait_for_store(&command, |store| !store.is_idle()) => {
                Started::Forwarded(self.submit_now(vec![command]).await)
            }
            Ok(Target::Local) => Started::Done(self.execute_local(command.borrowed())),
            Ok(Target::Moving) => Started::Forwarded(self.hold(vec![command], via)),
            Ok(Target::Remote(owner)) => {
                Started::Forwarded(self.forward(&owner, vec![command], via).await)
            }
            Err(err) => Started::Done(Err(err)),
        }
    }

    /// Holds commands until their buckets have moved in (or the request
    /// timeout passes: `ERROR bucket <bucket> moving`), behind every command
    /// held before them.
    fn hold(&self, commands: Vec<Command>, via: Via) -> Coming {
        let (answers, rx) = oneshot::channel();
        let len = commands.len();
        for command in &commands {
            self.gate
                .slot(command.bucket())
                .fetch_add(1, Ordering::AcqRel);
        }
        let gated = Gated {
            commands,
            via,
            until: Instant::now() + self.gate.timeout,
            answers,
        };
        if let Err(mpsc::error::SendError(gated)) = self.gate.tx.send(gated) {
            for command in &gated.commands {
                self.gate
                    .slot(command.bucket())
                    .fetch_sub(1, Ordering::AcqRel);
            }
            let _ = gated
                .answers
                .send(vec![Err(KvError::internal("stopping")); len]);
        }
        Coming::new(rx, len)
    }

    /// Runs the held commands in order, each once its bucket has moved in
    /// or its time is up. Runs for the router's life.
    pub async fn run_gate(self: Arc<Self>) {
        let Some(mut rx) = self.gate.rx.lock().take() else {
            return;
        };
        let mut changes = self.routes.subscribe();
        while let Some(gated) = rx.recv().await {
            while tokio::time::Instant::now() < gated.until
                && gated.commands.iter().any(|c| self.is_moving(c.bucket()))
            {
                changes.mark_unchanged();
                let _ = tokio::time::timeout_at(gated.until, changes.changed()).await;
            }
            let mut parts = Vec::with_capacity(gated.commands.len());
            for command in gated.commands {
                // Counted until started, so that none overtakes it.
                let first = command.bucket().as_bytes().first().copied().unwrap_or(0);
                let part = if self.is_moving(command.bucket()) {
                    Started::Done(Err(KvError::moving(command.bucket())))
                } else {
                    self.start_now(command, gated.via).await
                };
                self.gate.waiting[first as usize].fetch_sub(1, Ordering::AcqRel);
                parts.push(part);
            }
            let answers = gated.answers;
            tokio::spawn(async move {
                let mut all = Vec::with_capacity(parts.len());
                for part in parts {
                    all.push(match part {
                        Started::Done(result) => result,
                        Started::Forwarded(coming) => coming.first().await,
                    });
                }
                let _ = answers.send(all);
            });
        }
    }

    /// Forwards commands to `owner` through the mesh's per-owner queue (see
    /// `Mesh::forward`): commands forwarded one after the other take effect in
    /// that order. Returns once the commands are queued, with their answers
    /// to come, one per command.
    pub async fn forward(&self, owner: &str, commands: Vec<Command>, via: Via) -> Coming {
        match &self.mesh {
            Some(mesh) => mesh.forward(owner, commands, via.next()).await,
            None => Coming::ready(vec![Err(KvError::mesh_unavailable()); commands.len()]),
        }
    }
}

impl Handler for Router {
    fn start(
        &self,
        command: Command,
        via: Via,
    ) -> impl std::future::Future<Output = Started> + Send {
        Router::start(self, command, via)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(s: &str) -> ByteRange {
        s.parse().unwrap()
    }

    fn table(entries: &[(&str, &str)]) -> Result<RoutingTable, TableError> {
        RoutingTable::new(
            entries
                .iter()
                .map(|(r, n)| (range(r), n.to_string()))
                .collect(),
        )
    }

    #[test]
    fn ranges_parse_and_print() {
        for (text, lo, hi) in [
            ("a-m", b'a', b'm'),
            ("x", b'x', b'x'),
            ("*", 0, 255),
            ("0-9", b'0', b'9'),
            ("-", b'-', b'-'),
            ("!-~", b'!', b'~'),
            ("a-a", b'a', b'a'),
        ] {
            let r = range(text);
            assert_eq!((r.lo, r.hi), (lo, hi), "{text}");
        }
        assert_eq!(range("a-m").to_string(), "a-m");
        assert_eq!(range("x").to_string(), "x");
        assert_eq!(range("*").to_string(), "*");
        for bad in [
            "", "m-a", "ab", "a-", "a-mm", " ", "a - m", "é", "\u{7f}", "a-\t", "**",
        ] {
            assert!(bad.parse::<ByteRange>().is_err(), "{bad:?} must be refused");
        }
        assert!(
            "m-a"
                .parse::<ByteRange>()
                .unwrap_err()
                .contains("backwards")
        );
    }

    #[test]
    fn first_byte_decides_the_owner() {
        let t = table(&[("a-m", "foo"), ("n-z", "bar")]).unwrap();
        let cases = [
            ("apple", Some("foo")),
            ("m", Some("foo")),
            ("mango", Some("foo")),
            ("nut", Some("bar")),
            ("zebra", Some("bar")),
            ("Apple", None),
            ("0day", None),
            ("{", None),
            ("\u{e9}t\u{e9}", None),
            ("", None),
        ];
        for (bucket, owner) in cases {
            assert_eq!(t.owner_of(bucket), owner, "{bucket}");
        }
    }

    #[test]
    fn first_match_wins_and_catch_all_takes_the_rest() {
        let t = table(&[("a", "one"), ("b-z", "two"), ("*", "rest")]).unwrap();
        assert_eq!(t.owner_of("abc"), Some("one"));
        assert_eq!(t.owner_of("bcd"), Some("two"));
        assert_eq!(t.owner_of("Zed"), Some("rest"));
        assert_eq!(t.owner_of("\u{e9}t\u{e9}"), Some("rest"));
        assert_eq!(t.owner_of("\u{1F600}"), Some("rest"));
        let all = RoutingTable::catch_all("local");
        for b in ["a", "Z", "~", "\u{e9}", "\u{0}"] {
            assert_eq!(all.owner_of(b), Some("local"));
        }
    }

    #[test]
    fn bad_tables_are_refused_with_the_entry() {
        let overlap = table(&[("a-m", "foo"), ("m-z", "bar")]).unwrap_err();
        assert_eq!(overlap.index, 1);
        assert!(
            overlap.message.contains("overlaps range a-m of entry 0"),
            "{}",
            overlap.message
        );
        let unreachable = table(&[("*", "foo"), ("a", "bar")]).unwrap_err();
        assert_eq!(unreachable.index, 1);
        assert!(unreachable.message.contains("unreachable"));
        let name = table(&[("a", "foo"), ("b", "bad name")]).unwrap_err();
        assert_eq!(name.index, 1);
        assert!(name.message.contains("bad node name"));
        assert!(table(&[("a", "")]).is_err());
        assert!(table(&[]).is_ok());
    }

    #[test]
    fn node_names() {
        for good in ["foo", "node-1", "A_b-9", "1"] {
            assert!(valid_node_name(good), "{good}");
        }
        for bad in ["", "a b", "a.b", "a*", "é", "a>"] {
            assert!(!valid_node_name(bad), "{bad}");
        }
    }

    fn router(table: RoutingTable) -> Router {
        let routes = Routes::new("foo", table);
        Router::new(
            "foo",
            routes,
            Registry::new(),
            None,
            2,
            Duration::from_secs(1),
        )
    }

    #[test]
    fn target_counts_hops() {
        let r = router(table(&[("a-m", "foo"), ("n-z", "bar")]).unwrap());
        let get = |b: &'static str| Command::Get {
            bucket: b,
            key: "k",
        };
        assert_eq!(r.target(&get("apple"), 0), Ok(Target::Local));
        assert_eq!(r.target(&get("apple"), 99), Ok(Target::Local));
        assert_eq!(r.target(&get("nut"), 0), Ok(Target::Remote("bar".into())));
        assert_eq!(r.target(&get("nut"), 1), Ok(Target::Remote("bar".into())));
        assert_eq!(r.target(&get("nut"), 2), Err(KvError::routing_loop("nut")));
        assert_eq!(r.target(&get("Nut"), 0), Err(KvError::no_route("Nut")));
    }

    #[tokio::test]
    async fn without_a_mesh_remote_buckets_are_unavailable() {
        let r = router(table(&[("a-m", "foo"), ("n-z", "bar")]).unwrap());
        let result = |started: Started| async move {
            match started {
                Started::Done(result) => result,
                Started::Forwarded(coming) => coming.first().await,
            }
        };
        let nut = Command::Where {
            bucket: "nut".into(),
        };
        let started = r.start(nut, Via::default()).await;
        assert!(matches!(started, Started::Forwarded(_)));
        assert_eq!(result(started).await, Err(KvError::mesh_unavailable()));
        let apple = Command::Where {
            bucket: "apple".into(),
        };
        let started = r.start(apple, Via::default()).await;
        assert_eq!(result(started).await, Ok(Reply::Node("foo".into())));
    }
}
