//! Settings read as text whatever they look like, and secrets that never show.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// What a secret shows instead of itself.
pub const HIDDEN: &str = "(hidden)";

/// A secret setting: never shown by `Debug`, in logs or by `check-config`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct Secret(#[serde(deserialize_with = "scalar_as_string")] String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(HIDDEN)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(HIDDEN)
    }
}

/// A server address with its whole user information (user, password or
/// token) replaced, for logs: `nats://kv:pw@host` shows as
/// `nats://(hidden)@host`, and so do a token, a password holding a raw `@`,
/// and an address without a scheme.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (&url[..scheme.len() + 3], rest),
        None => ("", url),
    };
    // The authority ends at the first '/', '?' or '#'; the user information
    // ends at its last '@' (a password may hold an unescaped one).
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}{HIDDEN}@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Reads a scalar as text: `KVMESH_NODE=1` names node "1", it is not a number.
pub(crate) fn scalar_as_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_any(ScalarVisitor)
}

pub(crate) fn option_scalar_as_string<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    d.deserialize_any(ScalarVisitor).map(Some)
}

struct ScalarVisitor;

impl serde::de::Visitor<'_> for ScalarVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_user_information_is_hidden() {
        for (url, shown) in [
            ("nats://kv:pw@host:4222", "nats://(hidden)@host:4222"),
            ("nats://TOKEN@host", "nats://(hidden)@host"),
            ("nats://kv:p@ss@host:4222", "nats://(hidden)@host:4222"),
            ("kv:pw@host:4222", "(hidden)@host:4222"),
            ("tls://u:x@y@h/path@z", "tls://(hidden)@h/path@z"),
            ("nats://host:4222", "nats://host:4222"),
            ("host:4222", "host:4222"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
