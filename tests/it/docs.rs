//! The reference documents are kept true by running their examples: the
//! README's netcat session, and the session and NATS examples of
//! `docs/protocol.md`, byte for byte against real nodes.

use async_nats::HeaderMap;

use crate::harness::*;
use crate::nats::NatsServer;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).expect(path)
}

/// The body of the first fenced block that starts with ```` ```tag ````,
/// or whose first line is `first`.
fn block(text: &str, opening: &str) -> String {
    let start = text
        .find(opening)
        .unwrap_or_else(|| panic!("no block {opening:?}"));
    let body = &text[start + opening.len()..];
    let body = &body[body.find('\n').expect("block line") + 1..];
    body[..body.find("```").expect("block end")].to_string()
}

/// A session block: requests (`> ` lines) each with the exact bytes of its
/// answer (the lines up to the next request).
fn exchanges(session: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in session.lines() {
        if let Some(request) = line.strip_prefix("> ").or((line == ">").then_some("")) {
            out.push((request.to_string(), String::new()));
        } else if let Some((_, answer)) = out.last_mut() {
            answer.push_str(line);
            answer.push_str("\r\n");
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_session_is_what_a_node_answers() {
    let readme = read("README.md");
    let session = block(&readme, "```\n$ nc 127.0.0.1 4040");
    let node = start_node(node_config("local")).await;
    let mut c = LineClient::connect(node.local_addr()).await;
    // The README shows the client's lines and the node's answers
    // interleaved, as a terminal does: a request starts with a command word
    // (in any case: the session shows that a lower-case one is refused).
    const VERBS: &[&str] = &[
        "CREATE", "PUT", "GET", "DELETE", "DROP", "WHERE", "PING", "QUIT",
    ];
    let mut requests = Vec::new();
    let mut answers = String::new();
    for line in session.lines() {
        let first = line
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        if VERBS.contains(&first.as_str()) {
            requests.push(line.to_string());
        } else {
            answers.push_str(line);
            answers.push_str("\r\n");
        }
    }
    let all: String = requests.iter().map(|r| format!("{r}\r\n")).collect();
    c.send(all).await;
    c.expect(&answers).await;
    c.expect_eof().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_reference_examples_are_what_a_node_answers() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let doc = read("docs/protocol.md");
    let mut config = mesh_config("foo", FOO_BAR, &nats.url());
    config.max_value_bytes = 16;
    config.max_line_bytes = 64;
    config.max_buckets = 3;
    let foo = start_node(config).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    let session = exchanges(&block(&doc, "```session"));
    assert!(session.len() > 20, "the session is there");
    for (request, answer) in &session {
        c.exchange(request, answer).await;
    }
    c.expect_eof().await;

    let client = nats_client(&nats.url()).await;
    let examples = block(&doc, "```nats");
    let mut lines = examples.lines();
    let mut count = 0;
    while let Some(command) = lines.next() {
        let command = command
            .strip_prefix("$ nats req ")
            .expect("a nats req line");
        let reply = lines.next().expect("a reply line");
        let (headers, rest) = match command.strip_prefix("-H ") {
            Some(rest) => {
                let (header, rest) = rest.split_once(' ').expect("header and subject");
                let (name, value) = header.split_once(':').expect("Name:value");
                let mut headers = HeaderMap::new();
                headers.insert(name, value);
                (headers, rest)
            }
            None => (HeaderMap::new(), command),
        };
        let (subject, body) = rest.split_once(' ').expect("subject and body");
        let body = body.trim_matches('\'');
        let got = within(
            "request",
            client.request_with_headers(subject.to_string(), headers, body.to_string().into()),
        )
        .await
        .expect("a reply");
        assert_eq!(
            std::str::from_utf8(&got.payload).expect("utf-8"),
            reply,
            "{command}"
        );
        count += 1;
    }
    assert!(count >= 8, "the examples are there");
    foo.shutdown().await;
}
