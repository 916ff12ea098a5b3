//! How buckets and keys become KV keys of the store (see the README,
//! "Durable nodes"):
//!
//! - `b.<bucket>`: a bucket exists; the value is its generation, a number
//!   chosen at its CREATE;
//! - `k.<generation>.<key>`: a key of the bucket of that generation;
//! - `active`: which process of the node writes the store, and `alive`, its
//!   heartbeat (see `role.rs`).
//!
//! Names are written with every byte outside `A-Z a-z 0-9 - _` as `=XX` (hex).

use std::collections::HashMap;

use crate::command::{MAX_BUCKET_BYTES, MAX_KEY_BYTES, is_word};

/// The key naming the process that writes the store, written when it takes
/// over (every write is fenced on it).
pub const ACTIVE_KEY: &str = "active";

/// The active process's heartbeat.
pub const ALIVE_KEY: &str = "alive";

/// The JetStream KV bucket of node `node`.
pub fn store_name(node: &str) -> String {
    format!("kvmesh_{node}")
}

/// A name as a KV key token: `A-Z a-z 0-9 - _` as they are, every other byte
/// as `=XX`, onto the end of `out`.
fn encode_into(out: &mut String, name: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            out.push(byte as char);
        } else {
            out.push('=');
            out.push(HEX[usize::from(byte >> 4)] as char);
            out.push(HEX[usize::from(byte & 15)] as char);
        }
    }
}

/// The name a key token stands for, if it is one [`encode_into`] makes.
pub fn decode(token: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(token.len());
    let mut rest = token.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'=' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(first);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

pub fn bucket_key(bucket: &str) -> String {
    let mut out = String::with_capacity(2 + bucket.len());
    out.push_str("b.");
    encode_into(&mut out, bucket);
    out
}

/// Built without the formatting machinery: this is on every write's path.
pub fn entry_key(generation: u64, key: &str) -> String {
    let mut digits = itoa::Buffer::new();
    let generation = digits.format(generation);
    let mut out = String::with_capacity(3 + generation.len() + key.len());
    out.push_str("k.");
    out.push_str(generation);
    out.push('.');
    encode_into(&mut out, key);
    out
}

/// What one stored KV key is, once read.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    /// `b.<bucket>`: the bucket and its generation.
    Bucket(String, u64),
    /// `k.<generation>.<key>` and its value.
    Entry(u64, String, String),
    /// `active`: the process named in it (empty: none).
    Active(String),
    /// `alive`: a heartbeat.
    Alive,
}

/// Reads a stored KV key (a put's value, or `None` for a delete). Anything
/// the protocol could not have stored (the store is a plain KV bucket that
/// others may write to) is `None`: a value with a line break must never
/// reach a client's screen.
pub fn read(key: &str, value: Option<&[u8]>) -> Option<Stored> {
    let bucket_name = |name: &str| is_word(name) && name.len() <= MAX_BUCKET_BYTES;
    if key == ACTIVE_KEY {
        let holder = value
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("");
        return Some(Stored::Active(holder.to_owned()));
    }
    if key == ALIVE_KEY {
        return Some(Stored::Alive);
    }
    if let Some(bucket) = key.strip_prefix("b.") {
        let bucket = decode(bucket).filter(|b| bucket_name(b))?;
        let generation = match value {
            Some(v) => std::str::from_utf8(v).ok()?.parse().ok()?,
            None => 0,
        };
        return Some(Stored::Bucket(bucket, generation));
    }
    let (generation, key) = key.strip_prefix("k.")?.split_once('.')?;
    let generation = generation.parse().ok()?;
    let key = decode(key).filter(|k| is_word(k) && k.len() <= MAX_KEY_BYTES)?;
    let value = match value {
        Some(v) => std::str::from_utf8(v)
            .ok()
            .filter(|v| is_word(v))?
            .to_owned(),
        None => String::new(),
    };
    Some(Stored::Entry(generation, key, value))
}

/// Sorts one stored key (a put) into buckets and entries at load; returns
/// whether it was taken.
pub fn take_entry(
    key: &str,
    value: &[u8],
    generations: &mut HashMap<u64, String>,
    entries: &mut Vec<(u64, String, String)>,
) -> bool {
    match read(key, Some(value)) {
        Some(Stored::Bucket(bucket, generation)) => {
            generations.insert(generation, bucket);
            true
        }
        Some(Stored::Entry(generation, key, value)) => {
            entries.push((generation, key, value));
            true
        }
        Some(Stored::Active(_) | Stored::Alive) => true,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_the_protocol_could_store_is_loaded() {
        let mut generations = HashMap::new();
        let mut entries = Vec::new();
        let mut take =
            |key: &str, value: &[u8]| take_entry(key, value, &mut generations, &mut entries);
        assert!(take("b.basket", b"7"));
        assert!(take("k.7.milk", b"1"));
        assert!(take("k.7.a=2Eb", b"x"));
        assert!(take("active", b"{}"));
        assert!(!take("k.7.milk", b"a\r\nOK"), "a line break");
        assert!(!take("k.7.milk", b""), "an empty value");
        assert!(!take("k.7.milk", &[0xff]), "not UTF-8");
        assert!(!take("k.7.a=20b", b"x"), "a space in a key");
        assert!(!take("b.two=20words", b"8"));
        assert!(!take("b.basket", b"seven"));
        assert!(!take("other", b"x"));
        assert_eq!(generations.get(&7).map(String::as_str), Some("basket"));
        assert_eq!(entries.len(), 2);
        assert_eq!(
            read("k.7.milk", None),
            Some(Stored::Entry(7, "milk".into(), String::new())),
            "a delete"
        );
        assert_eq!(
            read("b.basket", None),
            Some(Stored::Bucket("basket".into(), 0))
        );
    }

    #[test]
    fn names_become_key_tokens_and_back() {
        for (name, token) in [
            ("shopping", "shopping"),
            ("a.b", "a=2Eb"),
            ("*", "=2A"),
            (">", "=3E"),
            ("x=y/z", "x=3Dy=2Fz"),
            ("é", "=C3=A9"),
            ("\u{1}", "=01"),
            ("Milk_2-b", "Milk_2-b"),
        ] {
            let mut encoded = String::new();
            encode_into(&mut encoded, name);
            assert_eq!(encoded, token);
            assert_eq!(entry_key(17, name), format!("k.17.{token}"));
            assert_eq!(bucket_key(name), format!("b.{token}"));
            assert_eq!(decode(token).as_deref(), Some(name));
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
                "{token} is a valid KV key token"
            );
        }
        assert_eq!(decode("=4"), None);
        assert_eq!(decode("=ZZ"), None);
        assert_eq!(decode("=FF"), None, "not UTF-8");
    }
}
