//! The text protocol, and only the text: one line in, one [`Request`] out; one
//! result in, the exact response bytes out (docs/protocol.md, section 1).
//!
//! Every answer a TCP client reads is written by the functions here, so an answer
//! relayed from another node is byte-identical to one made locally.

use bytes::{BufMut, BytesMut};

use crate::command::{Command, Limits, Reply};
use crate::error::{ErrorCode, KvError};

/// One parsed request line, borrowing its words from the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// `PING`
    Ping,
    /// `QUIT`
    Quit,
    /// A bucket operation, to be routed.
    Op(Command<&'a str>),
}

/// Why a line could not become a request; each has its own response line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineError {
    /// Wrong word count, unknown or lower-case command, empty line.
    UnknownCommand,
    /// The line is not UTF-8.
    InvalidUtf8,
    /// The line is longer than `max_line_bytes`.
    TooLong,
    /// The words break a name rule or a size limit.
    Invalid(KvError),
}

/// The answer to `PING`.
pub const PONG: &[u8] = b"PONG\r\n";
/// The answer to `QUIT`, after which the connection closes.
pub const BYE: &[u8] = b"BYE\r\n";
/// The last line of a connection closed for sending nothing for `idle_timeout_secs`.
pub const IDLE_TIMEOUT: &[u8] = b"ERROR idle timeout\r\n";
/// The one line a connection over `max_connections` reads before it is closed.
pub const TOO_MANY_CONNECTIONS: &[u8] = b"ERROR too many connections\r\n";

/// Parses one line (its terminator already removed; a trailing `\r` is whitespace).
pub fn parse<'a>(line: &'a [u8], limits: &Limits) -> Result<Request<'a>, LineError> {
    let text = std::str::from_utf8(line).map_err(|_| LineError::InvalidUtf8)?;
    let mut words = text.split_ascii_whitespace();
    let verb = words.next().ok_or(LineError::UnknownCommand)?;
    let mut args: [&str; 3] = [""; 3];
    let mut count = 0;
    for word in words {
        if count == args.len() {
            return Err(LineError::UnknownCommand);
        }
        args[count] = word;
        count += 1;
    }
    let [a, b, c] = args;
    // By length first: each arm then compares a few bytes of known length,
    // which compiles to a load and a compare instead of a call.
    let command = match (verb.len(), count) {
        (4, 0) if verb == "PING" => return Ok(Request::Ping),
        (4, 0) if verb == "QUIT" => return Ok(Request::Quit),
        (3, 2) if verb == "GET" => Command::Get { bucket: a, key: b },
        (3, 3) if verb == "PUT" => Command::Put {
            bucket: a,
            key: b,
            value: c,
        },
        (6, 1) if verb == "CREATE" => Command::Create { bucket: a },
        (6, 2) if verb == "DELETE" => Command::Delete { bucket: a, key: b },
        (4, 1) if verb == "DROP" => Command::Drop { bucket: a },
        (5, 1) if verb == "WHERE" => Command::Where { bucket: a },
        _ => return Err(LineError::UnknownCommand),
    };
    limits
        .validate_split(&command)
        .map_err(LineError::Invalid)?;
    Ok(Request::Op(command))
}

/// Appends a command as a request line (what a client sends).
pub fn write_request<S: AsRef<str>>(out: &mut Vec<u8>, command: &Command<S>) {
    let (verb, words): (&[u8], [Option<&S>; 3]) = match command {
        Command::Create { bucket } => (b"CREATE", [Some(bucket), None, None]),
        Command::Put { bucket, key, value } => (b"PUT", [Some(bucket), Some(key), Some(value)]),
        Command::Get { bucket, key } => (b"GET", [Some(bucket), Some(key), None]),
        Command::Delete { bucket, key } => (b"DELETE", [Some(bucket), Some(key), None]),
        Command::Drop { bucket } => (b"DROP", [Some(bucket), None, None]),
        Command::Where { bucket } => (b"WHERE", [Some(bucket), None, None]),
    };
    out.extend_from_slice(verb);
    for word in words.into_iter().flatten() {
        out.push(b' ');
        out.extend_from_slice(word.as_ref().as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends the answer to a GET: the value (or an empty line), then `OK`.
pub fn write_value(out: &mut BytesMut, value: Option<&[u8]>) {
    if let Some(value) = value {
        out.put_slice(value);
    }
    out.put_slice(b"\r\nOK\r\n");
}

/// Appends the response to a routed command's result.
pub fn write_result(out: &mut BytesMut, result: &Result<Reply, KvError>) {
    match result {
        Ok(Reply::Ok) => out.put_slice(b"OK\r\n"),
        Ok(Reply::Value(value)) => write_value(out, value.as_deref().map(str::as_bytes)),
        Ok(Reply::Node(node)) => {
            out.put_slice(node.as_bytes());
            out.put_slice(b"\r\nOK\r\n");
        }
        Err(err) => write_error(out, err),
    }
}

/// Appends the response to a line that could not be parsed.
pub fn write_line_error(out: &mut BytesMut, err: &LineError) {
    match err {
        LineError::UnknownCommand => out.put_slice(b"UNKNOWN COMMAND\r\n"),
        LineError::InvalidUtf8 => out.put_slice(b"ERROR invalid utf-8\r\n"),
        LineError::TooLong => out.put_slice(b"ERROR line too long\r\n"),
        LineError::Invalid(err) => write_error(out, err),
    }
}

fn write_error(out: &mut BytesMut, err: &KvError) {
    if err.code() == ErrorCode::NotFound {
        out.put_slice(b"NOT FOUND\r\n");
    } else {
        out.put_slice(b"ERROR ");
        out.put_slice(err.message().as_bytes());
        out.put_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_value_bytes: 16,
    };

    fn op(line: &str) -> Command {
        match parse(line.as_bytes(), &LIMITS) {
            Ok(Request::Op(cmd)) => cmd.owned(),
            other => panic!("{line:?} parsed as {other:?}"),
        }
    }

    fn s(v: &str) -> String {
        v.to_owned()
    }

    #[test]
    fn every_command_parses() {
        assert_eq!(
            op("CREATE shopping"),
            Command::Create {
                bucket: s("shopping")
            }
        );
        assert_eq!(
            op("PUT shopping milk 1"),
            Command::Put {
                bucket: s("shopping"),
                key: s("milk"),
                value: s("1")
            }
        );
        assert_eq!(
            op("GET shopping milk"),
            Command::Get {
                bucket: s("shopping"),
                key: s("milk")
            }
        );
        assert_eq!(
            op("DELETE shopping milk"),
            Command::Delete {
                bucket: s("shopping"),
                key: s("milk")
            }
        );
        assert_eq!(
            op("DROP shopping"),
            Command::Drop {
                bucket: s("shopping")
            }
        );
        assert_eq!(
            op("WHERE shopping"),
            Command::Where {
                bucket: s("shopping")
            }
        );
        assert_eq!(parse(b"PING", &LIMITS), Ok(Request::Ping));
        assert_eq!(parse(b"QUIT", &LIMITS), Ok(Request::Quit));
    }

    #[test]
    fn whitespace_runs_and_edges_are_ignored() {
        let want = Command::Put {
            bucket: s("b"),
            key: s("k"),
            value: s("v"),
        };
        for line in [
            "PUT b k v",
            "  PUT\tb  k \t v  ",
            "PUT b k v\r",
            "\tPUT b\x0ck v",
        ] {
            assert_eq!(op(line), want, "{line:?}");
        }
        assert_eq!(parse(b" PING \r", &LIMITS), Ok(Request::Ping));
    }

    #[test]
    fn unknown_commands_and_wrong_arity_are_rejected() {
        for line in [
            "",
            "   ",
            "\r",
            "get shopping milk",
            "Get shopping milk",
            "PINGX",
            "FLUSH",
            "CREATE",
            "CREATE a b",
            "PUT b k",
            "PUT b k v extra",
            "GET b",
            "GET b k v",
            "DELETE b",
            "DELETE b k v",
            "DROP",
            "DROP a b",
            "WHERE",
            "WHERE a b",
            "PING x",
            "QUIT now",
        ] {
            assert_eq!(
                parse(line.as_bytes(), &LIMITS),
                Err(LineError::UnknownCommand),
                "{line:?}"
            );
        }
    }

    #[test]
    fn invalid_utf8_is_its_own_error() {
        assert_eq!(
            parse(b"GET b \xff\xfe", &LIMITS),
            Err(LineError::InvalidUtf8)
        );
        assert_eq!(
            op("GET b \u{e9}t\u{e9}"),
            Command::Get {
                bucket: s("b"),
                key: s("\u{e9}t\u{e9}")
            }
        );
    }

    #[test]
    fn limits_are_enforced_at_parse() {
        let too_big = format!("PUT b k {}", "v".repeat(17));
        match parse(too_big.as_bytes(), &LIMITS) {
            Err(LineError::Invalid(err)) => assert_eq!(err.message(), "value too large"),
            other => panic!("{other:?}"),
        }
        let long_bucket = format!("CREATE {}", "b".repeat(256));
        match parse(long_bucket.as_bytes(), &LIMITS) {
            Err(LineError::Invalid(err)) => assert_eq!(err.message(), "bucket name too long"),
            other => panic!("{other:?}"),
        }
    }

    fn result_bytes(result: Result<Reply, KvError>) -> Vec<u8> {
        let mut out = BytesMut::new();
        write_result(&mut out, &result);
        out.to_vec()
    }

    fn line_error_bytes(err: LineError) -> Vec<u8> {
        let mut out = BytesMut::new();
        write_line_error(&mut out, &err);
        out.to_vec()
    }

    #[test]
    fn results_format_byte_for_byte() {
        let cases: Vec<(Result<Reply, KvError>, &[u8])> = vec![
            (Ok(Reply::Ok), b"OK\r\n"),
            (Ok(Reply::Value(Some(s("1")))), b"1\r\nOK\r\n"),
            (Ok(Reply::Value(None)), b"\r\nOK\r\n"),
            (Ok(Reply::Node(s("foo"))), b"foo\r\nOK\r\n"),
            (Err(KvError::not_found("b")), b"NOT FOUND\r\n"),
            (
                Err(KvError::no_route("~x")),
                b"ERROR no route for bucket ~x\r\n",
            ),
            (
                Err(KvError::node_unavailable("c")),
                b"ERROR node c unavailable\r\n",
            ),
            (
                Err(KvError::timed_out("bar")),
                b"ERROR node bar timed out\r\n",
            ),
            (
                Err(KvError::routing_loop("x")),
                b"ERROR routing loop for bucket x\r\n",
            ),
            (
                Err(KvError::mesh_unavailable()),
                b"ERROR mesh unavailable\r\n",
            ),
            (
                Err(KvError::bad_request("value too large")),
                b"ERROR value too large\r\n",
            ),
        ];
        for (result, want) in cases {
            assert_eq!(result_bytes(result.clone()), want, "{result:?}");
        }
    }

    #[test]
    fn line_errors_format_byte_for_byte() {
        assert_eq!(
            line_error_bytes(LineError::UnknownCommand),
            b"UNKNOWN COMMAND\r\n"
        );
        assert_eq!(
            line_error_bytes(LineError::InvalidUtf8),
            b"ERROR invalid utf-8\r\n"
        );
        assert_eq!(
            line_error_bytes(LineError::TooLong),
            b"ERROR line too long\r\n"
        );
        assert_eq!(
            line_error_bytes(LineError::Invalid(KvError::bad_request("key too long"))),
            b"ERROR key too long\r\n"
        );
    }
}
