//! Property tests and a time-bounded fuzzer for the two parsers that take bytes
//! from outside: line framing with the text protocol, and the NATS JSON decoder.
//!
//! `cargo test --lib fuzz` runs the properties (256 cases each; set
//! `PROPTEST_CASES` for more). For a long run,
//! `FUZZ_SECONDS=600 cargo test --release --lib fuzz_for_a_while -- --ignored --nocapture`
//! feeds random and mutated input to both parsers for ten minutes and reports
//! how many inputs it tried.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use proptest::prelude::*;

use crate::command::{Command, Limits, Reply};
use crate::error::KvError;
use crate::protocol::{self, Request};
use crate::registry::{BucketCache, Registry};
use crate::router::{Router, RoutingTable};
use crate::server::{Frame, Framer, Gathered, Owed, Step, answer_frame};
use crate::wire::{self, WireRequest};

const LIMITS: Limits = Limits {
    max_value_bytes: 64,
};

/// Characters a word may hold: anything but ASCII whitespace, including NUL,
/// DEL, vertical tab and multi-byte UTF-8.
const WORD_CHARS: &[char] = &[
    'a',
    'z',
    'A',
    'Z',
    '0',
    '9',
    '_',
    '-',
    '.',
    ':',
    '"',
    '\\',
    '{',
    '}',
    '[',
    ']',
    '%',
    '\u{0}',
    '\u{b}',
    '\u{7f}',
    '\u{e9}',
    '\u{2603}',
    '\u{1F600}',
    '\u{85}',
    '\u{2028}',
];

fn word() -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(WORD_CHARS), 1..16)
        .prop_map(|chars| chars.into_iter().collect())
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        word().prop_map(|bucket| Command::Create { bucket }),
        (word(), word(), word()).prop_map(|(bucket, key, value)| Command::Put {
            bucket,
            key,
            value
        }),
        (word(), word()).prop_map(|(bucket, key)| Command::Get { bucket, key }),
        (word(), word()).prop_map(|(bucket, key)| Command::Delete { bucket, key }),
        word().prop_map(|bucket| Command::Drop { bucket }),
        word().prop_map(|bucket| Command::Where { bucket }),
    ]
}

fn reply() -> impl Strategy<Value = Result<Reply, KvError>> {
    prop_oneof![
        Just(Ok(Reply::Ok)),
        word().prop_map(|v| Ok(Reply::Value(Some(v)))),
        Just(Ok(Reply::Value(None))),
        "[a-zA-Z0-9_-]{1,12}".prop_map(|n| Ok(Reply::Node(n))),
        word().prop_map(|b| Err(KvError::not_found(&b))),
        word().prop_map(|b| Err(KvError::no_route(&b))),
        "[a-z]{1,8}".prop_map(|n| Err(KvError::node_unavailable(&n))),
        "[a-z]{1,8}".prop_map(|n| Err(KvError::timed_out(&n))),
        word().prop_map(|b| Err(KvError::routing_loop(&b))),
    ]
}

/// Frames `input` in the given chunk sizes and answers every frame with the
/// connection's own per-line step, on a node with an empty routing table (so
/// every bucket operation answers one `no route` line); returns the answers
/// and the largest the buffer grew.
fn frame_and_answer(input: &[u8], chunks: &[usize], max_line: usize) -> (BytesMut, usize) {
    let mut framer = Framer::new(max_line);
    let mut buf = BytesMut::new();
    let mut biggest = 0;
    let mut rest = input;
    let mut sizes = chunks.iter().cycle();
    let table = RoutingTable::new(Vec::new()).expect("an empty table is valid");
    let routes = crate::routes::Routes::new("local", table);
    let timeout = std::time::Duration::from_secs(1);
    let router = Router::new("local", routes, Registry::new(), None, 8, timeout);
    let mut cache = BucketCache::default();
    let mut gathered = Gathered::new();
    let owed = Owed::default();
    let mut answer = |frame: Frame, gathered: &mut Gathered| {
        if answer_frame(frame, &router, &LIMITS, &mut cache, gathered, &owed) == Step::Quit {
            gathered.out.extend_from_slice(protocol::BYE);
        }
    };
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        biggest = biggest.max(buf.len());
        while let Some(frame) = framer.next(&buf) {
            answer(frame, &mut gathered);
        }
        framer.consume(&mut buf);
    }
    while let Some(frame) = framer.next(&buf).or_else(|| framer.rest(&buf)) {
        answer(frame, &mut gathered);
    }
    framer.consume(&mut buf);
    (gathered.out, biggest)
}

proptest! {
    #[test]
    fn fuzz_a_command_survives_format_then_parse(cmd in command()) {
        let mut line = Vec::new();
        protocol::write_request(&mut line, &cmd);
        let content = &line[..line.len() - 2];
        match protocol::parse(content, &LIMITS) {
            Ok(Request::Op(parsed)) => prop_assert_eq!(parsed.owned(), cmd),
            other => prop_assert!(false, "{:?} parsed as {:?}", String::from_utf8_lossy(&line), other),
        }
    }

    #[test]
    fn fuzz_an_answer_is_whole_lines(result in reply()) {
        let mut out = BytesMut::new();
        protocol::write_result(&mut out, &result);
        prop_assert!(out.ends_with(b"\r\n"));
        // Every \n is the end of a \r\n, and no stray \r.
        let lines = out[..].split(|b| *b == b'\n').filter(|l| !l.is_empty()).count();
        let want = match &result { Ok(Reply::Value(_)) | Ok(Reply::Node(_)) => 2, _ => 1 };
        prop_assert_eq!(lines, want);
        prop_assert_eq!(out.iter().filter(|b| **b == b'\r').count(), want);
    }

    #[test]
    fn fuzz_any_bytes_get_one_answer_per_line_in_bounded_memory(
        input in proptest::collection::vec(
            prop_oneof![Just(b'\n'), Just(b'\r'), Just(b' '), Just(0u8), any::<u8>(), Just(b'P'), Just(b'G')],
            0..2048,
        ),
        chunks in proptest::collection::vec(1usize..300, 1..8),
        max_line in 64usize..512,
    ) {
        let (out, biggest) = frame_and_answer(&input, &chunks, max_line);
        // Bounded: never more than one line's worth plus one read.
        prop_assert!(biggest <= max_line + 2 + 300, "buffer grew to {}", biggest);
        // Every answer is one line here, and there is at most one per input line.
        prop_assert!(out.is_empty() || out.ends_with(b"\r\n"));
        let answers = out[..].split(|b| *b == b'\n').filter(|l| !l.is_empty()).count();
        let lines = input.split(|b| *b == b'\n').count();
        prop_assert!(answers <= lines, "{} answers for {} lines", answers, lines);
    }

    #[test]
    fn fuzz_a_command_survives_json(cmd in command()) {
        let body = wire::encode_request(&cmd);
        prop_assert_eq!(wire::decode_request(&body, &LIMITS), Ok(WireRequest::Single(cmd)));
    }

    #[test]
    fn fuzz_any_json_bytes_decode_or_are_a_bad_request(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = wire::decode_request(&body, &LIMITS) {
            prop_assert_eq!(e.code(), crate::error::ErrorCode::BadRequest);
        }
    }

    #[test]
    fn fuzz_json_shaped_input_never_stores_a_line_break(
        op in prop_oneof![Just("create"), Just("put"), Just("get"), Just("batch"), Just("x")],
        bucket in any::<String>(), key in any::<String>(), value in any::<String>(),
    ) {
        let body = serde_json::json!({"op": op, "bucket": bucket, "key": key, "value": value,
            "requests": [{"op": "put", "bucket": bucket, "key": key, "value": value}]});
        let decoded = wire::decode_request(body.to_string().as_bytes(), &LIMITS);
        let commands: Vec<Command> = match decoded {
            Ok(WireRequest::Single(c)) => vec![c],
            Ok(WireRequest::Batch(members)) => members.into_iter().filter_map(Result::ok).collect(),
            Err(_) => vec![],
        };
        for c in commands {
            let mut line = Vec::new();
            protocol::write_request(&mut line, &c);
            // One line, and it parses back to the same command.
            prop_assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
            prop_assert!(matches!(protocol::parse(&line[..line.len() - 2], &LIMITS), Ok(Request::Op(p)) if p.owned() == c));
        }
    }
}

/// Random input for a while, without shrinking: the long run.
#[test]
#[ignore = "a long fuzzing run: FUZZ_SECONDS=600 cargo test --release --lib fuzz_for_a_while -- --ignored"]
fn fuzz_for_a_while() {
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed = crate::rng::seed_from_env("FUZZ_SEED");
    println!("fuzzing for {seconds} s with FUZZ_SEED={seed}");
    let mut rng = crate::rng::XorShift::new(seed);
    let mut next = move || rng.next_u64();
    // Mutate known-good inputs as well as pure noise.
    let seeds: &[&[u8]] = &[
        b"PUT shopping milk 1\r\nGET shopping milk\r\n",
        b"CREATE a\nDROP a\nWHERE a\nPING\nQUIT\n",
        br#"{"op":"put","bucket":"b","key":"k","value":"v"}"#,
        br#"{"op":"batch","requests":[{"op":"get","bucket":"b","key":"k"},{"op":"where","bucket":"x"}]}"#,
    ];
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tried: u64 = 0;
    while Instant::now() < deadline {
        for _ in 0..1000 {
            let mut input: Vec<u8> = seeds[(next() % seeds.len() as u64) as usize].to_vec();
            for _ in 0..(next() % 8) {
                let at = (next() as usize) % (input.len() + 1);
                match next() % 4 {
                    0 => input.insert(at, next() as u8),
                    1 if at < input.len() => {
                        input.remove(at);
                    }
                    2 if at < input.len() => input[at] = next() as u8,
                    _ => input.extend((0..next() % 64).map(|_| next() as u8)),
                }
            }
            let chunks = [1 + (next() % 97) as usize, 1 + (next() % 13) as usize];
            let (out, biggest) = frame_and_answer(&input, &chunks, 128);
            assert!(biggest <= 128 + 2 + 97);
            assert!(out.is_empty() || out.ends_with(b"\r\n"));
            if let Err(e) = wire::decode_request(&input, &LIMITS) {
                assert_eq!(e.code(), crate::error::ErrorCode::BadRequest);
            }
            tried += 1;
        }
    }
    println!("fuzzed {tried} inputs through both parsers");
}
