//! The NATS message bodies (docs/protocol.md, section 3): JSON requests and replies.
//!
//! A request is the serde form of [`Command`] (or a batch of them); a reply is
//! `{"ok":true,...}` or `{"ok":false,"error":CODE,"message":TEXT}`. Decoding is
//! strict in both directions: a request that is not exactly right becomes a
//! `bad_request`, and a reply that could put anything but one clean line on a
//! TCP client's screen is refused.
//!
//! Half of this file is its unit tests (every op, every malformed body, every
//! reply shape), kept beside the code they hold to the wire format.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::command::{Command, Limits, Reply, is_word, valid_node_name};
use crate::error::{ErrorCode, KvError};

/// The header carrying the number of hops a request has made (absent means 0).
pub const HOPS_HEADER: &str = "KV-Hops";

/// Longest error text accepted from another node.
const MAX_MESSAGE_BYTES: usize = 1024;

/// A decoded request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireRequest {
    /// One operation.
    Single(Command),
    /// Several operations for the same node, each decoded on its own: one bad
    /// member fails alone.
    Batch(Vec<Result<Command, KvError>>),
}

/// Decodes a request body, applying the same limits as a TCP line. The JSON is
/// strict: a field given twice, a field that is not part of the request, or a
/// field of the wrong type is a `bad_request`.
pub fn decode_request(body: &[u8], limits: &Limits) -> Result<WireRequest, KvError> {
    let fields = fields_of(body)?;
    if fields.op.as_ref().and_then(Value::as_str) == Some("batch") {
        if let Some(name) = fields.single_only() {
            return Err(unexpected(name, "batch"));
        }
        let items: Vec<&RawValue> = fields
            .requests
            .as_deref()
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .ok_or_else(|| KvError::bad_request("a batch needs a \"requests\" array"))?;
        if items.len() > MAX_BATCH_MEMBERS {
            return Err(KvError::bad_request(format!(
                "a batch holds at most {MAX_BATCH_MEMBERS} requests"
            )));
        }
        let members = items
            .iter()
            .map(|item| {
                let fields = fields_of(item.get().as_bytes())?;
                if fields.op.as_ref().and_then(Value::as_str) == Some("batch") {
                    return Err(KvError::bad_request("a batch cannot hold a batch"));
                }
                command_of(fields, limits)
            })
            .collect();
        return Ok(WireRequest::Batch(members));
    }
    command_of(fields, limits).map(WireRequest::Single)
}

/// Every field a request may have. Decoding into it (not into a JSON value,
/// which would keep the last of two equal keys) refuses duplicates and
/// unknown fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    #[serde(default, deserialize_with = "given")]
    op: Option<Value>,
    #[serde(default, deserialize_with = "given")]
    bucket: Option<Value>,
    #[serde(default, deserialize_with = "given")]
    key: Option<Value>,
    #[serde(default, deserialize_with = "given")]
    value: Option<Value>,
    requests: Option<Box<RawValue>>,
}

/// A field that is given, even as `null`, is `Some` (and then has the wrong type).
fn given<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl Fields {
    /// The first field given that only a single request may have.
    fn single_only(&self) -> Option<&'static str> {
        [
            ("bucket", self.bucket.is_some()),
            ("key", self.key.is_some()),
            ("value", self.value.is_some()),
        ]
        .into_iter()
        .find_map(|(name, set)| set.then_some(name))
    }
}

fn fields_of(body: &[u8]) -> Result<Fields, KvError> {
    // A body that is valid JSON but not an object gets its own message.
    let trimmed = body.trim_ascii_start();
    if !trimmed.is_empty() && trimmed[0] != b'{' && serde_json::from_slice::<Value>(body).is_ok() {
        return Err(KvError::bad_request("a request must be a JSON object"));
    }
    serde_json::from_slice(body).map_err(|e| {
        let text = e.to_string();
        if e.is_syntax() || e.is_eof() {
            KvError::bad_request(format!("malformed JSON: {text}"))
        } else {
            KvError::bad_request(text)
        }
    })
}

fn command_of(fields: Fields, limits: &Limits) -> Result<Command, KvError> {
    let op = match fields.op {
        None => return Err(KvError::bad_request("missing field `op`")),
        Some(Value::String(op)) => op,
        Some(_) => return Err(KvError::bad_request("field `op` must be a string")),
    };
    if fields.requests.is_some() {
        return Err(unexpected("requests", &op));
    }
    let mut bucket = Field::new("bucket", fields.bucket);
    let mut key = Field::new("key", fields.key);
    let mut value = Field::new("value", fields.value);
    let command = match op.as_str() {
        "create" => Command::Create {
            bucket: bucket.take()?,
        },
        "put" => Command::Put {
            bucket: bucket.take()?,
            key: key.take()?,
            value: value.take()?,
        },
        "get" => Command::Get {
            bucket: bucket.take()?,
            key: key.take()?,
        },
        "delete" => Command::Delete {
            bucket: bucket.take()?,
            key: key.take()?,
        },
        "drop" => Command::Drop {
            bucket: bucket.take()?,
        },
        "where" => Command::Where {
            bucket: bucket.take()?,
        },
        _ => return Err(KvError::bad_request(format!("unknown op {op:?}"))),
    };
    for field in [bucket, key, value] {
        if field.value.is_some() {
            return Err(unexpected(field.name, &op));
        }
    }
    limits.validate(&command)?;
    Ok(command)
}

/// One string field of a request, taken once by the op that needs it.
struct Field {
    name: &'static str,
    value: Option<Value>,
}

impl Field {
    fn new(name: &'static str, value: Option<Value>) -> Self {
        Self { name, value }
    }

    fn take(&mut self) -> Result<String, KvError> {
        match self.value.take() {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(KvError::bad_request(format!(
                "field `{}` must be a string",
                self.name
            ))),
            None => Err(KvError::bad_request(format!(
                "missing field `{}`",
                self.name
            ))),
        }
    }
}

fn unexpected(field: &str, op: &str) -> KvError {
    KvError::bad_request(format!("unexpected field `{field}` for op {op:?}"))
}

/// Encodes a request body.
pub fn encode_request<S: AsRef<str> + Serialize>(command: &Command<S>) -> Vec<u8> {
    // Serializing plain strings into JSON cannot fail.
    serde_json::to_vec(command).unwrap_or_default()
}

/// Joins encoded requests into one batch body.
pub fn join_batch(parts: &[Vec<u8>]) -> Vec<u8> {
    const OPEN: &[u8] = br#"{"op":"batch","requests":["#;
    let len = parts.iter().map(|p| p.len() + 1).sum::<usize>();
    let mut body = Vec::with_capacity(OPEN.len() + len + 2);
    body.extend_from_slice(OPEN);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(part);
    }
    body.extend_from_slice(b"]}");
    body
}

/// The reply object, both ways. `value` distinguishes absent (not a GET) from
/// `null` (a GET of a missing key).
#[derive(Debug, Default, Serialize, Deserialize)]
struct WireReply {
    ok: bool,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    value: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ErrorCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replies: Option<Vec<WireReply>>,
}

/// A field that is present, even as `null`, is `Some`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

impl From<&Result<Reply, KvError>> for WireReply {
    fn from(result: &Result<Reply, KvError>) -> Self {
        match result {
            Ok(Reply::Ok) => WireReply {
                ok: true,
                ..Default::default()
            },
            Ok(Reply::Value(v)) => WireReply {
                ok: true,
                value: Some(v.clone()),
                ..Default::default()
            },
            Ok(Reply::Node(n)) => WireReply {
                ok: true,
                node: Some(n.clone()),
                ..Default::default()
            },
            Err(e) => WireReply {
                ok: false,
                error: Some(e.code()),
                message: Some(e.message().to_owned()),
                ..Default::default()
            },
        }
    }
}

/// Encodes the reply to one request.
pub fn encode_reply(result: &Result<Reply, KvError>) -> Vec<u8> {
    serde_json::to_vec(&WireReply::from(result)).unwrap_or_default()
}

/// Encodes the reply to a batch: one reply per member, in order (the node
/// sends its batch replies as they are made; this is the tests' yardstick).
#[cfg(test)]
pub fn encode_batch_reply(results: &[Result<Reply, KvError>]) -> Vec<u8> {
    let reply = WireReply {
        ok: true,
        replies: Some(results.iter().map(WireReply::from).collect()),
        ..Default::default()
    };
    serde_json::to_vec(&reply).unwrap_or_default()
}

/// The most requests one batch may hold.
pub const MAX_BATCH_MEMBERS: usize = 1024;

/// A reply that does not fit its request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadReply;

/// Decodes the reply to `command`. A well-formed failure reply is the error it
/// carries; anything malformed or unsafe to show is a [`BadReply`].
pub fn decode_reply(command: &Command, body: &[u8]) -> Result<Result<Reply, KvError>, BadReply> {
    let reply: WireReply = serde_json::from_slice(body).map_err(|_| BadReply)?;
    check_reply(command, reply)
}

/// One message of the reply to a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchReply {
    /// The whole batch failed before any member ran (say, a routing loop on
    /// the way): every member still waiting gets this error.
    Failed(KvError),
    /// The answers to the next members, in order: all of them, or the first
    /// few when the reply comes in several messages. A member's answer that
    /// is malformed or unsafe to show is a [`BadReply`] of its own.
    Replies(Vec<Result<Result<Reply, KvError>, BadReply>>),
}

/// Decodes one message of the reply to a batch whose members still waiting
/// for an answer are `commands`.
pub fn decode_batch_reply(commands: &[Command], body: &[u8]) -> Result<BatchReply, BadReply> {
    let reply: WireReply = serde_json::from_slice(body).map_err(|_| BadReply)?;
    if !reply.ok {
        let first = commands.first().ok_or(BadReply)?;
        let err = check_reply(first, reply)?.err().ok_or(BadReply)?;
        return Ok(BatchReply::Failed(err));
    }
    let replies = reply.replies.ok_or(BadReply)?;
    if replies.is_empty() || replies.len() > commands.len() {
        return Err(BadReply);
    }
    Ok(BatchReply::Replies(
        commands
            .iter()
            .zip(replies)
            .map(|(c, r)| check_reply(c, r))
            .collect(),
    ))
}

fn check_reply(command: &Command, reply: WireReply) -> Result<Result<Reply, KvError>, BadReply> {
    if !reply.ok {
        let code = reply.error.ok_or(BadReply)?;
        let message = reply.message.ok_or(BadReply)?;
        // An error names what the client sent (a bucket may hold control
        // characters), so only a line break could harm the client's screen.
        if message.is_empty() || message.len() > MAX_MESSAGE_BYTES || message.contains(['\r', '\n'])
        {
            return Err(BadReply);
        }
        return Ok(Err(KvError::new(code, message)));
    }
    match command {
        Command::Get { .. } => match reply.value {
            Some(Some(v)) if is_word(&v) => Ok(Ok(Reply::Value(Some(v)))),
            Some(None) => Ok(Ok(Reply::Value(None))),
            _ => Err(BadReply),
        },
        Command::Where { .. } => match reply.node {
            Some(n) if valid_node_name(&n) => Ok(Ok(Reply::Node(n))),
            _ => Err(BadReply),
        },
        _ => Ok(Ok(Reply::Ok)),
    }
}

/// When the node that forwarded a request stops waiting for its answer, in
/// milliseconds since the Unix epoch. A node that receives a request past it
/// does not run it: its sender has already told its client the request timed
/// out, and a write that ran later could land after writes the client made
/// since (and overwrite them).
pub const DEADLINE_HEADER: &str = "KV-Deadline";

/// The wall clock in milliseconds since the Unix epoch, as [`DEADLINE_HEADER`]
/// counts.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads a [`DEADLINE_HEADER`] value.
pub fn parse_deadline(value: &str) -> Result<u64, KvError> {
    value
        .trim()
        .parse()
        .map_err(|_| KvError::bad_request(format!("bad {DEADLINE_HEADER} header {value:?}")))
}

/// Reads the hop count from the headers' values for [`HOPS_HEADER`] (matched
/// without regard to case by the caller): absent is 0.
pub fn parse_hops(value: Option<&str>) -> Result<u32, KvError> {
    match value {
        None => Ok(0),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| KvError::bad_request(format!("bad {HOPS_HEADER} header {v:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_value_bytes: 16,
    };

    /// `GET b k`, `PUT b k v` and `WHERE b`.
    fn get_put_where() -> (Command, Command, Command) {
        let get = Command::Get {
            bucket: "b".into(),
            key: "k".into(),
        };
        let put = Command::Put {
            bucket: "b".into(),
            key: "k".into(),
            value: "v".into(),
        };
        (get, put, Command::Where { bucket: "b".into() })
    }

    fn bad(body: &str) -> String {
        match decode_request(body.as_bytes(), &LIMITS) {
            Err(e) => {
                assert_eq!(e.code(), ErrorCode::BadRequest, "{body}");
                e.message().to_owned()
            }
            Ok(ok) => panic!("{body} decoded as {ok:?}"),
        }
    }

    #[test]
    fn every_op_decodes() {
        let cases = [
            (
                r#"{"op":"create","bucket":"b"}"#,
                Command::Create { bucket: "b".into() },
            ),
            (
                r#"{"op":"put","bucket":"b","key":"k","value":"v"}"#,
                Command::Put {
                    bucket: "b".into(),
                    key: "k".into(),
                    value: "v".into(),
                },
            ),
            (
                r#"{"op":"get","bucket":"b","key":"k"}"#,
                Command::Get {
                    bucket: "b".into(),
                    key: "k".into(),
                },
            ),
            (
                r#"{"op":"delete","bucket":"b","key":"k"}"#,
                Command::Delete {
                    bucket: "b".into(),
                    key: "k".into(),
                },
            ),
            (
                r#"{"op":"drop","bucket":"b"}"#,
                Command::Drop { bucket: "b".into() },
            ),
            (
                r#" {"bucket":"b","op":"where"} "#,
                Command::Where { bucket: "b".into() },
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                decode_request(body.as_bytes(), &LIMITS),
                Ok(WireRequest::Single(want))
            );
        }
    }

    #[test]
    fn malformed_requests_are_bad_requests() {
        assert!(bad("").starts_with("malformed JSON"));
        assert!(bad("{").starts_with("malformed JSON"));
        assert!(bad("\u{ff}").starts_with("malformed JSON"));
        assert_eq!(bad("[]"), "a request must be a JSON object");
        assert_eq!(bad("42"), "a request must be a JSON object");
        assert_eq!(bad(r#"{"bucket":"b"}"#), "missing field `op`");
        assert_eq!(
            bad(r#"{"op":7,"bucket":"b"}"#),
            "field `op` must be a string"
        );
        assert_eq!(
            bad(r#"{"op":"flush","bucket":"b"}"#),
            "unknown op \"flush\""
        );
        assert_eq!(
            bad(r#"{"op":"GET","bucket":"b","key":"k"}"#),
            "unknown op \"GET\""
        );
        assert!(bad(r#"{"op":"get","bucket":"b"}"#).contains("missing field `key`"));
        assert_eq!(
            bad(r#"{"op":"create","bucket":5}"#),
            "field `bucket` must be a string"
        );
        assert_eq!(
            bad(r#"{"op":"put","bucket":"b","key":"k","value":null}"#),
            "field `value` must be a string"
        );
        assert_eq!(
            bad(r#"{"op":"put","bucket":"b","key":"k","value":"a\r\nOK"}"#),
            "invalid value"
        );
        assert_eq!(
            bad(r#"{"op":"put","bucket":"b","key":"k","value":""}"#),
            "invalid value"
        );
        assert_eq!(
            bad(r#"{"op":"put","bucket":"b","key":"k k","value":"v"}"#),
            "invalid key"
        );
        assert_eq!(bad(r#"{"op":"create","bucket":""}"#), "invalid bucket name");
        assert_eq!(
            bad(r#"{"op":"put","bucket":"b","key":"k","value":"01234567890123456"}"#),
            "value too large"
        );
        assert_eq!(
            bad(r#"{"op":"batch"}"#),
            "a batch needs a \"requests\" array"
        );
    }

    #[test]
    fn a_batch_fails_member_by_member() {
        let body = r#"{"op":"batch","requests":[
            {"op":"get","bucket":"b","key":"k"},
            {"op":"nope"},
            {"op":"batch","requests":[]},
            {"op":"put","bucket":"b","key":"k","value":"v\n"}
        ]}"#;
        let Ok(WireRequest::Batch(members)) = decode_request(body.as_bytes(), &LIMITS) else {
            panic!("a batch");
        };
        assert_eq!(members.len(), 4);
        assert_eq!(
            members[0],
            Ok(Command::Get {
                bucket: "b".into(),
                key: "k".into()
            })
        );
        assert_eq!(
            members[1].as_ref().unwrap_err().message(),
            "unknown op \"nope\""
        );
        assert_eq!(
            members[2].as_ref().unwrap_err().message(),
            "a batch cannot hold a batch"
        );
        assert_eq!(members[3].as_ref().unwrap_err().message(), "invalid value");
    }

    #[test]
    fn replies_encode_as_the_spec_shows() {
        let cases: Vec<(Result<Reply, KvError>, &str)> = vec![
            (Ok(Reply::Ok), r#"{"ok":true}"#),
            (
                Ok(Reply::Value(Some("1".into()))),
                r#"{"ok":true,"value":"1"}"#,
            ),
            (Ok(Reply::Value(None)), r#"{"ok":true,"value":null}"#),
            (Ok(Reply::Node("foo".into())), r#"{"ok":true,"node":"foo"}"#),
            (
                Err(KvError::not_found("b")),
                r#"{"ok":false,"error":"not_found","message":"bucket b not found"}"#,
            ),
            (
                Err(KvError::node_unavailable("c")),
                r#"{"ok":false,"error":"unavailable","message":"node c unavailable"}"#,
            ),
            (
                Err(KvError::routing_loop("x")),
                r#"{"ok":false,"error":"loop","message":"routing loop for bucket x"}"#,
            ),
        ];
        for (result, json) in &cases {
            assert_eq!(String::from_utf8(encode_reply(result)).unwrap(), *json);
        }
        let batch = encode_batch_reply(&[Ok(Reply::Ok), Err(KvError::no_route("Z"))]);
        assert_eq!(
            String::from_utf8(batch).unwrap(),
            r#"{"ok":true,"replies":[{"ok":true},{"ok":false,"error":"no_route","message":"no route for bucket Z"}]}"#
        );
    }

    #[test]
    fn replies_round_trip_through_decode() {
        let (get, put, where_) = get_put_where();
        let cases = [
            (&get, Ok(Reply::Value(Some("v".into())))),
            (&get, Ok(Reply::Value(None))),
            (&where_, Ok(Reply::Node("bar".into()))),
            (&put, Ok(Reply::Ok)),
            (&put, Err(KvError::timed_out("c"))),
            (&get, Err(KvError::mesh_unavailable())),
        ];
        for (command, result) in cases {
            assert_eq!(decode_reply(command, &encode_reply(&result)), Ok(result));
        }
        let commands = vec![get.clone(), put.clone()];
        let results = vec![Ok(Reply::Value(None)), Err(KvError::not_found("b"))];
        assert_eq!(
            decode_batch_reply(&commands, &encode_batch_reply(&results)),
            Ok(BatchReply::Replies(results.into_iter().map(Ok).collect()))
        );
        // The first part of a reply in several messages.
        assert_eq!(
            decode_batch_reply(&commands, &encode_batch_reply(&[Ok(Reply::Value(None))])),
            Ok(BatchReply::Replies(vec![Ok(Ok(Reply::Value(None)))]))
        );
        let whole = encode_reply(&Err(KvError::routing_loop("b")));
        assert_eq!(
            decode_batch_reply(&commands, &whole),
            Ok(BatchReply::Failed(KvError::routing_loop("b")))
        );
    }

    #[test]
    fn unsafe_or_malformed_replies_are_refused() {
        let (get, _, where_) = get_put_where();
        for (command, body) in [
            (&get, r#"{"ok":true,"value":"a\r\nOK"}"#),
            (&get, r#"{"ok":true,"value":""}"#),
            (&get, r#"{"ok":true}"#),
            (&get, r#"{"ok":true,"value":5}"#),
            (&where_, r#"{"ok":true,"node":"a b"}"#),
            (&where_, r#"{"ok":true}"#),
            (
                &get,
                r#"{"ok":false,"error":"timeout","message":"x\r\nOK"}"#,
            ),
            (&get, r#"{"ok":false,"error":"nonsense","message":"x"}"#),
            (&get, r#"{"ok":false,"message":"x"}"#),
            (&get, r#"{"ok":false,"error":"internal"}"#),
            (&get, "not json"),
        ] {
            assert_eq!(
                decode_reply(command, body.as_bytes()),
                Err(BadReply),
                "{body}"
            );
        }
        let commands = vec![get.clone()];
        for body in [
            r#"{"ok":true,"replies":[{"ok":true,"value":null},{"ok":true,"value":null}]}"#,
            r#"{"ok":true,"replies":[]}"#,
            r#"{"ok":true}"#,
        ] {
            assert_eq!(
                decode_batch_reply(&commands, body.as_bytes()),
                Err(BadReply),
                "{body}"
            );
        }
        // One bad member fails alone.
        let commands = vec![get.clone(), get.clone(), get.clone()];
        assert_eq!(
            decode_batch_reply(
                &commands,
                br#"{"ok":true,"replies":[{"ok":true,"value":"a"},{"ok":true,"value":"a\r\nOK"},{"ok":false,"error":"not_found","message":"bucket z\u0001 not found"}]}"#
            ),
            Ok(BatchReply::Replies(vec![
                Ok(Ok(Reply::Value(Some("a".into())))),
                Err(BadReply),
                Ok(Err(KvError::not_found("z\u{1}")))
            ]))
        );
    }

    #[test]
    fn strict_json_refuses_duplicates_unknown_and_misplaced_fields() {
        for (body, want) in [
            (
                r#"{"op":"get","bucket":"b","key":"k","op":"put","value":"v"}"#,
                "duplicate field `op`",
            ),
            (
                r#"{"op":"get","bucket":"b","key":"k","key":"j"}"#,
                "duplicate field `key`",
            ),
            (
                r#"{"op":"get","bucket":"b","key":"k","ttl":5}"#,
                "unknown field `ttl`",
            ),
            (
                r#"{"op":"create","bucket":"b","key":"k"}"#,
                "unexpected field `key` for op \"create\"",
            ),
            (
                r#"{"op":"get","bucket":"b","key":"k","requests":[]}"#,
                "unexpected field `requests` for op \"get\"",
            ),
            (
                r#"{"op":"batch","bucket":"b","requests":[]}"#,
                "unexpected field `bucket` for op \"batch\"",
            ),
            (
                r#"{"op":"get","bucket":5,"key":"k"}"#,
                "field `bucket` must be a string",
            ),
        ] {
            let got = bad(body);
            assert!(got.contains(want), "{body}: {got}");
        }
        // Inside a batch, each member is held to the same rules, alone.
        let body = r#"{"op":"batch","requests":[{"op":"where","bucket":"b","bucket":"c"},{"op":"where","bucket":"b"}]}"#;
        let Ok(WireRequest::Batch(members)) = decode_request(body.as_bytes(), &LIMITS) else {
            panic!("a batch");
        };
        assert!(
            members[0]
                .as_ref()
                .unwrap_err()
                .message()
                .contains("duplicate field")
        );
        assert_eq!(members[1], Ok(Command::Where { bucket: "b".into() }));
    }

    #[test]
    fn a_batch_body_joins_its_requests() {
        let (get, put, _) = get_put_where();
        let parts = vec![encode_request(&get), encode_request(&put)];
        let body = join_batch(&parts);
        assert_eq!(
            decode_request(&body, &LIMITS),
            Ok(WireRequest::Batch(vec![Ok(get), Ok(put)]))
        );
    }

    #[test]
    fn a_batch_has_a_size_limit() {
        let member = r#"{"op":"where","bucket":"b"}"#;
        let body = format!(
            r#"{{"op":"batch","requests":[{}]}}"#,
            vec![member; MAX_BATCH_MEMBERS + 1].join(",")
        );
        assert_eq!(
            decode_request(body.as_bytes(), &LIMITS).map_err(|e| e.message().to_owned()),
            Err(format!(
                "a batch holds at most {MAX_BATCH_MEMBERS} requests"
            ))
        );
    }

    #[test]
    fn hops_parse() {
        assert_eq!(parse_hops(None), Ok(0));
        assert_eq!(parse_hops(Some("3")), Ok(3));
        assert_eq!(parse_hops(Some(" 7 ")), Ok(7));
        assert!(parse_hops(Some("-1")).is_err());
        assert!(parse_hops(Some("many")).is_err());
    }
}
