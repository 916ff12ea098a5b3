//! The buckets held in this node's memory.
//!
//! [`Registry`] is a cheap-to-clone handle over shared state. Locks here are
//! synchronous (`parking_lot`) and never held across an `.await`: every operation
//! is a short in-memory step, so an async lock would only add overhead. Two levels
//! of locking keep unrelated work apart: the bucket map is read-locked to find a
//! bucket (writers only for CREATE and DROP), and each bucket has its own
//! read-write lock, so reads of different buckets never wait on each other and
//! every operation on one bucket is atomic.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::command::{Command, Reply};
use crate::error::KvError;

type Bucket = RwLock<HashMap<Box<str>, Box<str>>>;

/// A handle to this node's buckets.
#[derive(Clone, Default)]
pub struct Registry {
    buckets: Arc<RwLock<HashMap<Box<str>, Bucket>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Executes a command on this node's buckets.
    ///
    /// `WHERE` is answered by the router, not here; it reports an internal error.
    pub fn apply(&self, command: Command) -> Result<Reply, KvError> {
        match command {
            Command::Create { bucket } => {
                if !self.buckets.read().contains_key(bucket.as_str()) {
                    self.buckets
                        .write()
                        .entry(bucket.into_boxed_str())
                        .or_default();
                }
                Ok(Reply::Ok)
            }
            Command::Put { bucket, key, value } => self.with_bucket(&bucket, |b| {
                b.write()
                    .insert(key.into_boxed_str(), value.into_boxed_str());
                Reply::Ok
            }),
            Command::Get { bucket, key } => self.with_bucket(&bucket, |b| {
                Reply::Value(b.read().get(key.as_str()).map(|v| v.to_string()))
            }),
            Command::Delete { bucket, key } => self.with_bucket(&bucket, |b| {
                b.write().remove(key.as_str());
                Reply::Ok
            }),
            Command::Drop { bucket } => match self.buckets.write().remove(bucket.as_str()) {
                Some(_) => Ok(Reply::Ok),
                None => Err(KvError::not_found(&bucket)),
            },
            Command::Where { .. } => Err(KvError::internal("WHERE reached the registry")),
        }
    }

    /// How many buckets this node holds.
    pub fn bucket_count(&self) -> usize {
        self.buckets.read().len()
    }

    fn with_bucket(&self, name: &str, op: impl FnOnce(&Bucket) -> Reply) -> Result<Reply, KvError> {
        match self.buckets.read().get(name) {
            Some(bucket) => Ok(op(bucket)),
            None => Err(KvError::not_found(name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn cmd(line: &str) -> Command {
        let words: Vec<String> = line.split(' ').map(str::to_owned).collect();
        let w = |i: usize| words[i].clone();
        match words[0].as_str() {
            "CREATE" => Command::Create { bucket: w(1) },
            "PUT" => Command::Put {
                bucket: w(1),
                key: w(2),
                value: w(3),
            },
            "GET" => Command::Get {
                bucket: w(1),
                key: w(2),
            },
            "DELETE" => Command::Delete {
                bucket: w(1),
                key: w(2),
            },
            "DROP" => Command::Drop { bucket: w(1) },
            other => panic!("{other}"),
        }
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
    fn concurrent_writers_lose_nothing() {
        let reg = Registry::new();
        reg.apply(cmd("CREATE shared")).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let reg = reg.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        reg.apply(cmd(&format!("PUT shared k{t}-{i} {i}"))).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for t in 0..8 {
            for i in (0..1000).step_by(97) {
                let got = reg.apply(cmd(&format!("GET shared k{t}-{i}"))).unwrap();
                assert_eq!(got, Reply::Value(Some(i.to_string())));
            }
        }
    }
}
