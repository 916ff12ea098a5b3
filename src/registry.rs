//! The buckets held in this node's memory.
//!
//! [`Registry`] is a cheap-to-clone handle over shared state. Locks here are
//! synchronous (`parking_lot`) and never held across an `.await`: every operation
//! is a short in-memory step, so an async lock would only add overhead.
//!
//! Layout, chosen for memory and for cores that do not wait on each other:
//! - the bucket map is read-locked to find a bucket (written only by CREATE and
//!   DROP);
//! - a bucket is split into [`SHARDS`] shards by key hash, each with its own
//!   read-write lock, so operations on different keys rarely meet, reads never
//!   block reads, and every operation on one key is atomic;
//! - an entry is one heap block, `key ␠ value`: a key never holds whitespace, so
//!   the first space splits it, and a small entry costs one allocation of its
//!   own size (a million 7-byte keys with 16-byte values fit in 32-byte blocks)
//!   plus a 16-byte slot in an open-addressing table (`hashbrown`, `foldhash`).
//!
//! The second half of this file is its unit tests.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use hashbrown::{DefaultHashBuilder, HashTable};
use parking_lot::RwLock;
use thin_slice::ThinBoxedSlice;

use crate::command::{Command, Reply};
use crate::error::KvError;

/// Shards per bucket: a power of two.
pub const SHARDS: usize = 16;

/// One stored pair, `key ␠ value`, in a single allocation, behind a one-word
/// pointer (the length rides in its unused top bits).
struct Entry(ThinBoxedSlice<u8>);

impl Entry {
    fn new(key: &str, value: &str) -> Self {
        let mut bytes = Vec::with_capacity(key.len() + 1 + value.len());
        bytes.extend_from_slice(key.as_bytes());
        bytes.push(b' ');
        bytes.extend_from_slice(value.as_bytes());
        Entry(ThinBoxedSlice::from(bytes.into_boxed_slice()))
    }

    /// The key: everything before the first space.
    fn key(&self) -> &[u8] {
        let at = memchr::memchr(b' ', &self.0).unwrap_or(self.0.len());
        &self.0[..at]
    }

    /// Whether this entry's key is `key`: it starts with `key` and a space
    /// (a key holds no space), so no search is needed.
    fn is(&self, key: &[u8]) -> bool {
        self.0.len() > key.len() && self.0[key.len()] == b' ' && self.0.starts_with(key)
    }

    /// The value of an entry whose key is `key`.
    fn value_after(&self, key: &[u8]) -> &[u8] {
        self.0.get(key.len() + 1..).unwrap_or_default()
    }
}

/// A bucket: its keys spread over shards. The shards (2 KiB) come with the
/// first key, so an empty bucket costs little more than its name.
struct Bucket {
    /// Which CREATE made it (a durable store's key prefix; 0 in memory).
    generation: u64,
    /// Set while its byte range moves to another node: writes are refused
    /// (checked under the shard's lock, so a copy taken after sealing holds
    /// every write that was let in).
    sealed: AtomicBool,
    hasher: DefaultHashBuilder,
    shards: OnceLock<Box<[Shard; SHARDS]>>,
}

/// One shard, alone on its cache lines: every read takes its lock, which
/// writes the lock word, and two cores working on neighbouring shards must not
/// invalidate each other's lines (128 bytes: x86 fetches lines in pairs).
#[repr(align(128))]
struct Shard(RwLock<HashTable<Entry>>);

impl std::ops::Deref for Shard {
    type Target = RwLock<HashTable<Entry>>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Bucket {
    fn new(generation: u64) -> Self {
        Self {
            generation,
            sealed: AtomicBool::new(false),
            hasher: DefaultHashBuilder::default(),
            shards: OnceLock::new(),
        }
    }

    /// The key's hash and its shard (from the hash's top bits; the table uses
    /// the low ones), if the bucket has shards yet.
    fn locate(&self, key: &[u8]) -> Option<(u64, &RwLock<HashTable<Entry>>)> {
        let shards = self.shards.get()?;
        Some(self.locate_in(shards, key))
    }

    fn locate_in<'s>(
        &self,
        shards: &'s [Shard; SHARDS],
        key: &[u8],
    ) -> (u64, &'s RwLock<HashTable<Entry>>) {
        let hash = self.hasher.hash_one(key);
        let shard = (hash >> (64 - SHARDS.trailing_zeros())) as usize;
        (hash, &shards[shard])
    }

    fn get<R>(&self, key: &str, f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        let key = key.as_bytes();
        let Some((hash, shard)) = self.locate(key) else {
            return f(None);
        };
        let table = shard.read();
        f(table.find(hash, |e| e.is(key)).map(|e| e.value_after(key)))
    }

    /// Stores `value` under `key`; `false` (nothing stored) when sealed.
    fn put(&self, key: &str, value: &str) -> bool {
        let shards = self.shards.get_or_init(|| {
            Box::new(std::array::from_fn(|_| {
                Shard(RwLock::new(HashTable::new()))
            }))
        });
        let (hash, shard) = self.locate_in(shards, key.as_bytes());
        let entry = Entry::new(key, value);
        let hasher = &self.hasher;
        let mut table = shard.write();
        if self.sealed.load(Ordering::Acquire) {
            return false;
        }
        match table.entry(hash, |e| e.is(key.as_bytes()), |e| hasher.hash_one(e.key())) {
            hashbrown::hash_table::Entry::Occupied(mut old) => *old.get_mut() = entry,
            hashbrown::hash_table::Entry::Vacant(slot) => {
                slot.insert(entry);
            }
        }
        true
    }

    /// Removes `key`; `false` (nothing removed) when sealed.
    fn delete(&self, key: &str) -> bool {
        let key = key.as_bytes();
        let Some((hash, shard)) = self.locate(key) else {
            return !self.sealed.load(Ordering::Acquire);
        };
        let mut table = shard.write();
        if self.sealed.load(Ordering::Acquire) {
            return false;
        }
        if let Ok(found) = table.find_entry(hash, |e| e.is(key)) {
            found.remove();
        }
        true
    }

    /// Every key and value, each shard read under its lock.
    fn dump(&self) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        if let Some(shards) = self.shards.get() {
            for shard in shards.iter() {
                for entry in shard.read().iter() {
                    let key = entry.key();
                    let value = entry.value_after(key);
                    pairs.push((
                        String::from_utf8_lossy(key).into_owned(),
                        String::from_utf8_lossy(value).into_owned(),
                    ));
                }
            }
        }
        pairs
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .get()
            .map_or(0, |shards| shards.iter().map(|s| s.read().len()).sum())
    }

    /// Frees every key, for a dropped bucket that a connection's cache may
    /// still hold on to.
    fn clear(&self) {
        if let Some(shards) = self.shards.get() {
            for shard in shards.iter() {
                *shard.write() = HashTable::new();
            }
        }
    }
}

/// A handle to this node's buckets.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

struct Shared {
    buckets: RwLock<HashMap<Box<str>, Arc<Bucket>, DefaultHashBuilder>>,
    /// First bytes whose buckets are sealed (moving away): no CREATE or DROP
    /// there, checked under the bucket map's lock.
    sealed: [AtomicBool; 256],
    /// Counts DROPs, so a [`BucketCache`] knows when its bucket may be gone.
    drops: AtomicU64,
    /// The most buckets held at once.
    max_buckets: usize,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// A connection's memory of the bucket it used last, so that a run of
/// commands on one bucket does not take the registry's lock each time (that
/// lock's cache line would otherwise bounce between cores on every request).
/// Any DROP makes every cache look the bucket up again.
#[derive(Default)]
pub struct BucketCache(Option<(Box<str>, Arc<Bucket>, u64)>);

impl Registry {
    /// An empty registry without a limit on buckets.
    pub fn new() -> Self {
        Self::with_max_buckets(usize::MAX)
    }

    /// An empty registry holding at most `max_buckets` buckets.
    pub fn with_max_buckets(max_buckets: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                buckets: RwLock::default(),
                sealed: std::array::from_fn(|_| AtomicBool::new(false)),
                drops: AtomicU64::new(0),
                max_buckets,
            }),
        }
    }

    /// Executes a command on this node's buckets.
    ///
    /// `WHERE` is answered by the router, not here; it reports an internal error.
    pub fn apply(&self, command: Command<&str>) -> Result<Reply, KvError> {
        self.apply_cached(command, &mut BucketCache::default())
    }

    /// [`Registry::apply`], remembering the bucket in `cache`.
    pub fn apply_cached(
        &self,
        command: Command<&str>,
        cache: &mut BucketCache,
    ) -> Result<Reply, KvError> {
        match command {
            Command::Create { bucket } => {
                if !self.shared.buckets.read().contains_key(bucket) {
                    let mut buckets = self.shared.buckets.write();
                    if self.sealed(bucket) {
                        return Err(KvError::moving(bucket));
                    }
                    if !buckets.contains_key(bucket) {
                        if buckets.len() >= self.shared.max_buckets {
                            return Err(KvError::internal("too many buckets"));
                        }
                        buckets.insert(bucket.into(), Arc::new(Bucket::new(0)));
                    }
                }
                Ok(Reply::Ok)
            }
            Command::Put { bucket, key, value } => self
                .with_bucket(bucket, cache, |b| b.put(key, value))?
                .then_some(Reply::Ok)
                .ok_or_else(|| KvError::moving(bucket)),
            Command::Get { bucket, key } => self.get(bucket, key, cache, |v| {
                // Values are stored from valid UTF-8 words, so this never replaces.
                Reply::Value(v.map(|v| String::from_utf8_lossy(v).into_owned()))
            }),
            Command::Delete { bucket, key } => self
                .with_bucket(bucket, cache, |b| b.delete(key))?
                .then_some(Reply::Ok)
                .ok_or_else(|| KvError::moving(bucket)),
            Command::Drop { bucket } => {
                let removed = {
                    let mut buckets = self.shared.buckets.write();
                    if self.sealed(bucket) {
                        return Err(KvError::moving(bucket));
                    }
                    buckets.remove(bucket)
                };
                self.shared.drops.fetch_add(1, Ordering::Release);
                match removed {
                    Some(dropped) => {
                        // Its memory goes now, not when the last connection
                        // that used it looks elsewhere.
                        dropped.clear();
                        Ok(Reply::Ok)
                    }
                    None => Err(KvError::not_found(bucket)),
                }
            }
            Command::Where { .. } => Err(KvError::internal("WHERE reached the registry")),
        }
    }

    /// Whether `bucket`'s first byte is sealed.
    fn sealed(&self, bucket: &str) -> bool {
        bucket
            .as_bytes()
            .first()
            .is_some_and(|b| self.shared.sealed[*b as usize].load(Ordering::Acquire))
    }

    /// Whether the buckets starting with `first` are sealed.
    pub fn is_sealed(&self, first: u8) -> bool {
        self.shared.sealed[first as usize].load(Ordering::Acquire)
    }

    /// Seals the buckets starting with any of `bytes` (they are moving to
    /// another node): from now on no write, CREATE or DROP there takes
    /// effect (each answers `ERROR bucket <bucket> moving`), and every write
    /// that did is in what [`Registry::dump`] gives.
    pub fn seal(&self, bytes: &[u8]) {
        self.set_sealed(bytes, true);
    }

    /// Undoes [`Registry::seal`] (a move given up, or done).
    pub fn unseal(&self, bytes: &[u8]) {
        self.set_sealed(bytes, false);
    }

    fn set_sealed(&self, bytes: &[u8], sealed: bool) {
        let buckets = self.shared.buckets.write();
        for b in bytes {
            self.shared.sealed[*b as usize].store(sealed, Ordering::Release);
        }
        for (name, bucket) in buckets.iter() {
            if name.as_bytes().first().is_some_and(|b| bytes.contains(b)) {
                bucket.sealed.store(sealed, Ordering::Release);
            }
        }
    }

    /// The buckets starting with any of `bytes`: name and generation.
    pub fn buckets_in(&self, bytes: &[u8]) -> Vec<(String, u64)> {
        let mut found: Vec<(String, u64)> = self
            .shared
            .buckets
            .read()
            .iter()
            .filter(|(name, _)| name.as_bytes().first().is_some_and(|b| bytes.contains(b)))
            .map(|(name, bucket)| (name.to_string(), bucket.generation))
            .collect();
        found.sort();
        found
    }

    /// Every bucket starting with any of `bytes`, with all its keys and
    /// values, sorted by bucket name.
    pub fn dump(&self, bytes: &[u8]) -> Vec<(String, Vec<(String, String)>)> {
        let buckets: Vec<(String, Arc<Bucket>)> = self
            .shared
            .buckets
            .read()
            .iter()
            .filter(|(name, _)| name.as_bytes().first().is_some_and(|b| bytes.contains(b)))
            .map(|(name, bucket)| (name.to_string(), bucket.clone()))
            .collect();
        let mut dumped: Vec<(String, Vec<(String, String)>)> = buckets
            .into_iter()
            .map(|(name, bucket)| {
                let mut pairs = bucket.dump();
                pairs.sort_unstable();
                (name, pairs)
            })
            .collect();
        dumped.sort_by(|a, b| a.0.cmp(&b.0));
        dumped
    }

    /// Removes `bucket`, sealed or not (a bucket that has moved away, or a
    /// durable store's DROP, decided before any seal); whether it was there.
    pub fn remove(&self, bucket: &str) -> bool {
        let removed = self.shared.buckets.write().remove(bucket);
        self.shared.drops.fetch_add(1, Ordering::Release);
        removed.inspect(|b| b.clear()).is_some()
    }

    /// Creates `bucket` as a durable store's CREATE of `generation` made it
    /// (replacing a bucket of that name, which cannot exist then).
    pub fn create_with_generation(&self, bucket: &str, generation: u64) {
        self.shared
            .buckets
            .write()
            .insert(bucket.into(), Arc::new(Bucket::new(generation)));
    }

    /// The generation of `bucket`, if it exists.
    pub fn generation(&self, bucket: &str) -> Option<u64> {
        self.shared.buckets.read().get(bucket).map(|b| b.generation)
    }

    /// Whether one more bucket fits under `max_buckets`.
    pub fn has_room(&self) -> bool {
        self.shared.buckets.read().len() < self.shared.max_buckets
    }

    /// Forgets every bucket (before loading a store).
    pub fn clear(&self) {
        self.shared.buckets.write().clear();
        self.shared.drops.fetch_add(1, Ordering::Release);
    }

    /// Reads a value in place: `f` sees it (or `None` for a missing key) under
    /// the shard's read lock, so answering a GET copies it only once, into the
    /// answer.
    pub fn get<R>(
        &self,
        bucket: &str,
        key: &str,
        cache: &mut BucketCache,
        f: impl FnOnce(Option<&[u8]>) -> R,
    ) -> Result<R, KvError> {
        self.with_bucket(bucket, cache, |b| b.get(key, f))
    }

    /// How many buckets this node holds.
    #[cfg(test)]
    pub fn bucket_count(&self) -> usize {
        self.shared.buckets.read().len()
    }

    /// How many keys a bucket holds.
    #[cfg(test)]
    pub fn key_count(&self, bucket: &str) -> Result<usize, KvError> {
        self.with_bucket(bucket, &mut BucketCache::default(), |b| b.len())
    }

    fn with_bucket<R>(
        &self,
        name: &str,
        cache: &mut BucketCache,
        op: impl FnOnce(&Bucket) -> R,
    ) -> Result<R, KvError> {
        // Read before the lookup: a DROP after this point makes the next use
        // look again. An operation that overlaps a DROP may land in the
        // dropped bucket, as if it had run just before it.
        let drops = self.shared.drops.load(Ordering::Acquire);
        if let Some((cached, bucket, seen)) = &cache.0
            && **cached == *name
            && *seen == drops
        {
            return Ok(op(bucket));
        }
        let found = self.shared.buckets.read().get(name).cloned();
        match found {
            Some(bucket) => {
                let result = op(&bucket);
                cache.0 = Some((name.into(), bucket, drops));
                Ok(result)
            }
            None => Err(KvError::not_found(name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn cmd(line: &str) -> Command<&str> {
        let w: Vec<&str> = line.split(' ').collect();
        match w[0] {
            "CREATE" => Command::Create { bucket: w[1] },
            "PUT" => Command::Put {
                bucket: w[1],
                key: w[2],
                value: w[3],
            },
            "GET" => Command::Get {
                bucket: w[1],
                key: w[2],
            },
            "DELETE" => Command::Delete {
                bucket: w[1],
                key: w[2],
            },
            "DROP" => Command::Drop { bucket: w[1] },
            other => panic!("{other}"),
        }
    }

    #[test]
    fn buckets_are_bounded_and_a_drop_frees_its_keys_at_once() {
        let reg = Registry::with_max_buckets(2);
        reg.apply(cmd("CREATE a")).unwrap();
        reg.apply(cmd("CREATE b")).unwrap();
        let err = reg.apply(cmd("CREATE c")).unwrap_err();
        assert_eq!(err.message(), "too many buckets");
        // An existing bucket can still be "created"; a dropped one makes room.
        assert_eq!(reg.apply(cmd("CREATE a")), Ok(Reply::Ok));
        let mut cache = BucketCache::default();
        reg.apply_cached(cmd("PUT b k v"), &mut cache).unwrap();
        assert_eq!(reg.key_count("b"), Ok(1));
        let held = cache.0.as_ref().map(|(_, b, _)| b.clone()).unwrap();
        reg.apply(cmd("DROP b")).unwrap();
        assert_eq!(
            held.len(),
            0,
            "the keys of a cached, dropped bucket are freed"
        );
        assert_eq!(reg.apply(cmd("CREATE c")), Ok(Reply::Ok));
        assert_eq!(
            reg.apply_cached(cmd("GET b k"), &mut cache)
                .map_err(|e| e.code()),
            Err(ErrorCode::NotFound)
        );
    }

    #[test]
    fn a_bucket_lives_from_create_to_drop() {
        let reg = Registry::new();
        let steps: &[(&str, Result<Reply, ErrorCode>)] = &[
            ("GET b k", Err(ErrorCode::NotFound)),
            ("PUT b k v", Err(ErrorCode::NotFound)),
            ("DELETE b k", Err(ErrorCode::NotFound)),
            ("DROP b", Err(ErrorCode::NotFound)),
            ("CREATE b", Ok(Reply::Ok)),
            ("GET b k", Ok(Reply::Value(None))),
            ("PUT b k v1", Ok(Reply::Ok)),
            ("CREATE b", Ok(Reply::Ok)),
            ("GET b k", Ok(Reply::Value(Some("v1".into())))),
            ("PUT b k v2", Ok(Reply::Ok)),
            ("GET b k", Ok(Reply::Value(Some("v2".into())))),
            ("DELETE b k", Ok(Reply::Ok)),
            ("DELETE b k", Ok(Reply::Ok)),
            ("GET b k", Ok(Reply::Value(None))),
            ("PUT b k v3", Ok(Reply::Ok)),
            ("DROP b", Ok(Reply::Ok)),
            ("GET b k", Err(ErrorCode::NotFound)),
            ("CREATE b", Ok(Reply::Ok)),
            ("GET b k", Ok(Reply::Value(None))),
        ];
        for (line, want) in steps {
            let got = reg.apply(cmd(line)).map_err(|e| e.code());
            assert_eq!(&got, want, "{line}");
        }
        assert_eq!(reg.bucket_count(), 1);
    }

    #[test]
    fn keys_that_share_prefixes_stay_apart() {
        let reg = Registry::new();
        reg.apply(cmd("CREATE b")).unwrap();
        let pairs = [
            ("k", "1"),
            ("k1", "2"),
            ("k10", "3"),
            ("é", "ü"),
            ("a\u{0}b", "x"),
        ];
        for (k, v) in pairs {
            reg.apply(Command::Put {
                bucket: "b",
                key: k,
                value: v,
            })
            .unwrap();
        }
        for (k, v) in pairs {
            assert_eq!(
                reg.apply(Command::Get {
                    bucket: "b",
                    key: k
                }),
                Ok(Reply::Value(Some(v.into())))
            );
        }
        assert_eq!(reg.key_count("b"), Ok(5));
        reg.apply(cmd("DELETE b k1")).unwrap();
        assert_eq!(reg.apply(cmd("GET b k1")), Ok(Reply::Value(None)));
        assert_eq!(
            reg.apply(cmd("GET b k10")),
            Ok(Reply::Value(Some("3".into())))
        );
        assert_eq!(reg.key_count("b"), Ok(4));
    }

    #[test]
    fn many_keys_grow_and_shrink_every_shard() {
        let reg = Registry::new();
        reg.apply(cmd("CREATE big")).unwrap();
        let keys: Vec<String> = (0..20_000).map(|i| format!("key{i}")).collect();
        for (i, k) in keys.iter().enumerate() {
            let v = format!("v{i}");
            reg.apply(Command::Put {
                bucket: "big",
                key: k,
                value: &v,
            })
            .unwrap();
        }
        assert_eq!(reg.key_count("big"), Ok(20_000));
        for (i, k) in keys.iter().enumerate().step_by(7) {
            let got = reg
                .get("big", k, &mut BucketCache::default(), |v| {
                    v.map(<[u8]>::to_vec)
                })
                .unwrap();
            assert_eq!(got, Some(format!("v{i}").into_bytes()));
        }
        for k in keys.iter().step_by(2) {
            reg.apply(Command::Delete {
                bucket: "big",
                key: k,
            })
            .unwrap();
        }
        assert_eq!(reg.key_count("big"), Ok(10_000));
        let mut cache = BucketCache::default();
        assert_eq!(
            reg.get("big", "key1", &mut cache, |v| v.is_some()),
            Ok(true)
        );
        assert_eq!(
            reg.get("big", "key2", &mut cache, |v| v.is_some()),
            Ok(false)
        );
    }

    #[test]
    fn a_cached_bucket_is_forgotten_when_it_is_dropped() {
        let reg = Registry::new();
        let mut cache = BucketCache::default();
        reg.apply(cmd("CREATE b")).unwrap();
        reg.apply_cached(cmd("PUT b k v"), &mut cache).unwrap();
        assert_eq!(
            reg.apply_cached(cmd("GET b k"), &mut cache),
            Ok(Reply::Value(Some("v".into())))
        );
        // Another connection drops and recreates the bucket.
        reg.apply(cmd("DROP b")).unwrap();
        assert_eq!(
            reg.apply_cached(cmd("GET b k"), &mut cache)
                .map_err(|e| e.code()),
            Err(ErrorCode::NotFound)
        );
        reg.apply(cmd("CREATE b")).unwrap();
        assert_eq!(
            reg.apply_cached(cmd("GET b k"), &mut cache),
            Ok(Reply::Value(None))
        );
        reg.apply_cached(cmd("PUT b k w"), &mut cache).unwrap();
        assert_eq!(
            reg.apply(cmd("GET b k")),
            Ok(Reply::Value(Some("w".into())))
        );
        // A cache follows a switch of bucket.
        reg.apply(cmd("CREATE c")).unwrap();
        assert_eq!(
            reg.apply_cached(cmd("GET c k"), &mut cache),
            Ok(Reply::Value(None))
        );
        assert_eq!(
            reg.apply_cached(cmd("GET b k"), &mut cache),
            Ok(Reply::Value(Some("w".into())))
        );
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let reg = Registry::new();
        reg.apply(cmd("CREATE shared")).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let reg = reg.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        let (k, v) = (format!("k{t}-{i}"), i.to_string());
                        reg.apply(Command::Put {
                            bucket: "shared",
                            key: &k,
                            value: &v,
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for t in 0..8 {
            for i in (0..1000).step_by(97) {
                let k = format!("k{t}-{i}");
                let got = reg
                    .apply(Command::Get {
                        bucket: "shared",
                        key: &k,
                    })
                    .unwrap();
                assert_eq!(got, Reply::Value(Some(i.to_string())));
            }
        }
        assert_eq!(reg.key_count("shared"), Ok(8000));
    }
}
