//! The values that cross TCP and NATS alike: a [`Command`] on a bucket and its [`Reply`].
//!
//! The serde form of `Command` *is* the NATS request body (docs/protocol.md, section 3)
//! (`{"op":"put","bucket":B,"key":K,"value":V}`), so there is one shape, not two.
//! [`Limits::validate`] applies the same name rules to a command whether it was
//! parsed from a TCP line or decoded from JSON.

use serde::{Deserialize, Serialize};

use crate::error::KvError;

/// Longest bucket name, in bytes.
pub const MAX_BUCKET_BYTES: usize = 255;
/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// An operation on one bucket: what the router routes and the registry executes.
///
/// `Command<&str>` borrows its words from a request line, so a local command
/// costs no allocation; `Command<String>` (the default) owns them, to travel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Command<S = String> {
    /// Create a bucket (idempotent).
    Create { bucket: S },
    /// Store a value under a key.
    Put { bucket: S, key: S, value: S },
    /// Read the value under a key.
    Get { bucket: S, key: S },
    /// Remove a key (a missing key is fine).
    Delete { bucket: S, key: S },
    /// Remove a bucket and all its keys.
    Drop { bucket: S },
    /// Name the node that owns the bucket.
    Where { bucket: S },
}

impl<S: AsRef<str>> Command<S> {
    /// The bucket this command is about: what routing looks at.
    pub fn bucket(&self) -> &str {
        match self {
            Command::Create { bucket }
            | Command::Put { bucket, .. }
            | Command::Get { bucket, .. }
            | Command::Delete { bucket, .. }
            | Command::Drop { bucket }
            | Command::Where { bucket } => bucket.as_ref(),
        }
    }

    /// The same command, borrowing its words.
    pub fn borrowed(&self) -> Command<&str> {
        self.map(|s| s.as_ref())
    }

    /// The same command, owning its words.
    pub fn owned(&self) -> Command<String> {
        self.map(|s| s.as_ref().to_owned())
    }

    fn map<'a, T>(&'a self, f: impl Fn(&'a S) -> T) -> Command<T> {
        match self {
            Command::Create { bucket } => Command::Create { bucket: f(bucket) },
            Command::Put { bucket, key, value } => Command::Put {
                bucket: f(bucket),
                key: f(key),
                value: f(value),
            },
            Command::Get { bucket, key } => Command::Get {
                bucket: f(bucket),
                key: f(key),
            },
            Command::Delete { bucket, key } => Command::Delete {
                bucket: f(bucket),
                key: f(key),
            },
            Command::Drop { bucket } => Command::Drop { bucket: f(bucket) },
            Command::Where { bucket } => Command::Where { bucket: f(bucket) },
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `OK`
    Ok,
    /// The answer to GET: the value, or `None` for a missing key.
    Value(Option<String>),
    /// The answer to WHERE: the owning node.
    Node(String),
}

/// The size limits every command obeys, wherever it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest value, in bytes.
    pub max_value_bytes: usize,
}

impl Limits {
    /// Checks names and value against the rules of docs/protocol.md, section 1: non-empty,
    /// no ASCII whitespace (so nothing stored can break a TCP answer into lines),
    /// and the size limits. A TCP word already has no whitespace; a JSON string may.
    pub fn validate<S: AsRef<str>>(&self, command: &Command<S>) -> Result<(), KvError> {
        self.check(command, Words::Unchecked)
    }

    /// [`Limits::validate`] for words split from a TCP line on whitespace: they
    /// are never empty and hold none, so only their sizes are left to check.
    pub fn validate_split<S: AsRef<str>>(&self, command: &Command<S>) -> Result<(), KvError> {
        self.check(command, Words::Split)
    }

    fn check<S: AsRef<str>>(&self, command: &Command<S>, words: Words) -> Result<(), KvError> {
        check_word(
            "bucket name",
            command.bucket(),
            MAX_BUCKET_BYTES,
            "too long",
            words,
        )?;
        match command {
            Command::Put { key, value, .. } => {
                check_word("key", key.as_ref(), MAX_KEY_BYTES, "too long", words)?;
                check_word(
                    "value",
                    value.as_ref(),
                    self.max_value_bytes,
                    "too large",
                    words,
                )
            }
            Command::Get { key, .. } | Command::Delete { key, .. } => {
                check_word("key", key.as_ref(), MAX_KEY_BYTES, "too long", words)
            }
            Command::Create { .. } | Command::Drop { .. } | Command::Where { .. } => Ok(()),
        }
    }
}

/// Where the words of a command come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Words {
    /// Split from a line on whitespace: non-empty, with no whitespace.
    Split,
    /// From anywhere else (JSON): anything.
    Unchecked,
}

/// Whether `name` is a valid node name: `[A-Za-z0-9_-]+` (it becomes part of a
/// NATS subject, so nothing else is allowed).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `word` could have come from a TCP line: non-empty, no ASCII whitespace.
pub fn is_word(word: &str) -> bool {
    !word.is_empty() && !word.bytes().any(|b| b.is_ascii_whitespace())
}

fn check_word(
    what: &str,
    word: &str,
    max: usize,
    too_big: &str,
    words: Words,
) -> Result<(), KvError> {
    if word.len() > max {
        return Err(KvError::bad_request(format!("{what} {too_big}")));
    }
    if words == Words::Unchecked && !is_word(word) {
        return Err(KvError::bad_request(format!("invalid {what}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    const LIMITS: Limits = Limits { max_value_bytes: 8 };

    fn put(bucket: &str, key: &str, value: &str) -> Command {
        Command::Put {
            bucket: bucket.into(),
            key: key.into(),
            value: value.into(),
        }
    }

    #[test]
    fn json_form_is_the_wire_format() {
        let cmd = put("b", "k", "v");
        assert_eq!(
            serde_json::to_string(&cmd).unwrap(),
            r#"{"op":"put","bucket":"b","key":"k","value":"v"}"#
        );
        let back: Command = serde_json::from_str(r#"{"bucket":"s","op":"where"}"#).unwrap();
        assert_eq!(back, Command::Where { bucket: "s".into() });
    }

    #[test]
    fn validation_applies_the_name_rules() {
        let cases: &[(Command, Option<&str>)] = &[
            (put("b", "k", "12345678"), None),
            (put("b", "k", "123456789"), Some("value too large")),
            (put("b", "k", "a\r\nOK"), Some("invalid value")),
            (put("b", "k", ""), Some("invalid value")),
            (put("b", "", "v"), Some("invalid key")),
            (put("b", "k k", "v"), Some("invalid key")),
            (put(&"x".repeat(255), "k", "v"), None),
            (
                put(&"x".repeat(256), "k", "v"),
                Some("bucket name too long"),
            ),
            (put("b", &"k".repeat(1024), "v"), None),
            (put("b", &"k".repeat(1025), "v"), Some("key too long")),
            (
                Command::Create { bucket: "".into() },
                Some("invalid bucket name"),
            ),
            (
                Command::Drop {
                    bucket: "a\tb".into(),
                },
                Some("invalid bucket name"),
            ),
            (
                Command::Get {
                    bucket: "b".into(),
                    key: "\n".into(),
                },
                Some("invalid key"),
            ),
            (
                Command::Where {
                    bucket: "é".into()
                },
                None,
            ),
        ];
        for (cmd, want) in cases {
            let got = LIMITS.validate(cmd);
            match want {
                None => assert_eq!(got, Ok(()), "{cmd:?}"),
                Some(msg) => {
                    let err = got.expect_err("must be rejected");
                    assert_eq!(err.code(), ErrorCode::BadRequest);
                    assert_eq!(err.message(), *msg, "{cmd:?}");
                }
            }
        }
    }
}
