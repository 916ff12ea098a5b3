//! The NATS message bodies of SPEC.md section 3: JSON requests and replies.
//!
//! A request is the serde form of [`Command`] (or a batch of them); a reply is
//! `{"ok":true,...}` or `{"ok":false,"error":CODE,"message":TEXT}`. Decoding is
//! strict in both directions: a request that is not exactly right becomes a
//! `bad_request`, and a reply that could put anything but one clean line on a
//! TCP client's screen is refused.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

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

/// Decodes a request body, applying the same limits as a TCP line.
pub fn decode_request(body: &[u8], limits: &Limits) -> Result<WireRequest, KvError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| KvError::bad_request(format!("malformed JSON: {e}")))?;
    if value.get("op").and_then(Value::as_str) == Some("batch") {
        let Some(Value::Array(items)) = value.get("requests") else {
            return Err(KvError::bad_request("a batch needs a \"requests\" array"));
        };
        if items.len() > MAX_BATCH_MEMBERS {
            return Err(KvError::bad_request(format!(
                "a batch holds at most {MAX_BATCH_MEMBERS} requests"
            )));
        }
        let members = items
            .iter()
            .map(|item| {
                if item.get("op").and_then(Value::as_str) == Some("batch") {
                    return Err(KvError::bad_request("a batch cannot hold a batch"));
                }
                decode_command(item.clone(), limits)
            })
            .collect();
        return Ok(WireRequest::Batch(members));
    }
    decode_command(value, limits).map(WireRequest::Single)
}

fn decode_command(value: Value, limits: &Limits) -> Result<Command, KvError> {
    let Value::Object(fields) = &value else {
        return Err(KvError::bad_request("a request must be a JSON object"));
    };
    match fields.get("op") {
        None => return Err(KvError::bad_request("missing field `op`")),
        Some(Value::String(op))
            if !["create", "put", "get", "delete", "drop", "where"].contains(&op.as_str()) =>
        {
            return Err(KvError::bad_request(format!("unknown op {op:?}")));
        }
        Some(Value::String(_)) => {}
        Some(_) => return Err(KvError::bad_request("field `op` must be a string")),
    }
    let command: Command =
        serde_json::from_value(value).map_err(|e| KvError::bad_request(e.to_string()))?;
    limits.validate(&command)?;
    Ok(command)
}

/// Encodes a request body.
pub fn encode_request<S: AsRef<str> + Serialize>(command: &Command<S>) -> Vec<u8> {
    // Serializing plain strings into JSON cannot fail.
    serde_json::to_vec(command).unwrap_or_default()
}

/// Encodes a batch of requests for one node.
pub fn encode_batch(commands: &[Command]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Batch<'a> {
        op: &'static str,
        requests: &'a [Command],
    }
    serde_json::to_vec(&Batch {
        op: "batch",
        requests: commands,
    })
    .unwrap_or_default()
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

/// Encodes the reply to a batch: one reply per member, in order.
pub fn encode_batch_reply(results: &[Result<Reply, KvError>]) -> Vec<u8> {
    let reply = WireReply {
        ok: true,
        replies: Some(results.iter().map(WireReply::from).collect()),
        ..Default::default()
    };
    serde_json::to_vec(&reply).unwrap_or_default()
}

/// Encodes a batch reply that fits in `max` bytes: while it does not, the
/// largest answer is replaced by a `reply too large for NATS` error, so each
/// other member still gets its own answer. Each member is encoded once.
pub fn encode_batch_reply_within(results: &[Result<Reply, KvError>], max: usize) -> Vec<u8> {
    let mut parts: Vec<Vec<u8>> = results.iter().map(encode_reply).collect();
    // `{"ok":true,"replies":[` + parts joined by commas + `]}`
    let frame = br#"{"ok":true,"replies":[]}"#.len();
    let mut total =
        frame + parts.iter().map(Vec::len).sum::<usize>() + parts.len().saturating_sub(1);
    let too_large = encode_reply(&Err(KvError::internal("reply too large for NATS")));
    while total > max {
        let Some((i, len)) = parts
            .iter()
            .enumerate()
            .map(|(i, p)| (i, p.len()))
            .filter(|(_, len)| *len > too_large.len())
            .max_by_key(|(_, len)| *len)
        else {
            // Every answer is already as small as an error: nothing left to shrink.
            break;
        };
        total = total - len + too_large.len();
        parts[i] = too_large.clone();
    }
    let mut body = Vec::with_capacity(total);
    body.extend_from_slice(br#"{"ok":true,"replies":["#);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(part);
    }
    body.extend_from_slice(b"]}");
    body
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

/// Decodes the reply to a batch of `commands`.
pub fn decode_batch_reply(
    commands: &[Command],
    body: &[u8],
) -> Result<Vec<Result<Reply, KvError>>, BadReply> {
    let reply: WireReply = serde_json::from_slice(body).map_err(|_| BadReply)?;
    if !reply.ok {
        // The whole batch failed before any member ran (say, a routing loop on
        // the way): every member gets that error.
        let first = commands.first().ok_or(BadReply)?;
        let err = check_reply(first, reply)?.err().ok_or(BadReply)?;
        return Ok(commands.iter().map(|_| Err(err.clone())).collect());
    }
    let replies = reply.replies.ok_or(BadReply)?;
    if replies.len() != commands.len() {
        return Err(BadReply);
    }
    commands
        .iter()
        .zip(replies)
        .map(|(c, r)| check_reply(c, r))
        .collect()
}

fn check_reply(command: &Command, reply: WireReply) -> Result<Result<Reply, KvError>, BadReply> {
    if !reply.ok {
        let code = reply.error.ok_or(BadReply)?;
        let message = reply.message.ok_or(BadReply)?;
        if message.is_empty()
            || message.len() > MAX_MESSAGE_BYTES
            || message.chars().any(char::is_control)
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
        assert!(bad(r#"{"op":"create","bucket":5}"#).contains("invalid type"));
        assert!(
            bad(r#"{"op":"put","bucket":"b","key":"k","value":null}"#).contains("invalid type")
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
            Ok(results)
        );
        let whole = encode_reply(&Err(KvError::routing_loop("b")));
        assert_eq!(
            decode_batch_reply(&commands, &whole),
            Ok(vec![
                Err(KvError::routing_loop("b")),
                Err(KvError::routing_loop("b"))
            ])
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
        let commands = vec![get.clone(), get.clone()];
        assert_eq!(
            decode_batch_reply(
                &commands,
                br#"{"ok":true,"replies":[{"ok":true,"value":null}]}"#
            ),
            Err(BadReply)
        );
    }

    #[test]
    fn a_batch_reply_is_kept_under_the_payload_limit() {
        let big = |n: usize| Ok(Reply::Value(Some("v".repeat(n))));
        let results = vec![
            big(300),
            Ok(Reply::Ok),
            big(500),
            big(100),
            Err(KvError::not_found("b")),
        ];
        let whole = encode_batch_reply(&results);
        assert_eq!(
            encode_batch_reply_within(&results, whole.len()),
            whole,
            "fits: unchanged"
        );
        let trimmed = encode_batch_reply_within(&results, whole.len() - 1);
        let (get, put, _) = get_put_where();
        let commands = vec![get.clone(), put, get.clone(), get.clone(), get.clone()];
        let decoded = decode_batch_reply(&commands, &trimmed).expect("valid reply");
        // The largest value gave way; the others are intact.
        assert_eq!(
            decoded[2],
            Err(KvError::internal("reply too large for NATS"))
        );
        assert_eq!(decoded[0], big(300));
        assert_eq!(decoded[3], big(100));
        assert_eq!(decoded[4], Err(KvError::not_found("b")));
        // Nothing fits: every value gave way, the small answers stay.
        let tiny = encode_batch_reply_within(&results, 10);
        let decoded = decode_batch_reply(&commands, &tiny).expect("valid reply");
        let too_large = Err(KvError::internal("reply too large for NATS"));
        assert_eq!(
            decoded,
            vec![
                too_large.clone(),
                Ok(Reply::Ok),
                too_large.clone(),
                too_large,
                Err(KvError::not_found("b"))
            ]
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
