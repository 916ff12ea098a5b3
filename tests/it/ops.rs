//! The operator's commands of the one binary: `ping`, `check-config`,
//! `--log-format json`, and stopping a node whose NATS is out of reach.

use std::io::{Read, Write};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_succeeds_on_a_node() {
    let node = start_node(node_config("local")).await;
    let addr = node.local_addr().to_string();
    let (code, stdout, stderr) =
        tokio::task::spawn_blocking(move || run(clean_command().args(["ping", "--addr", &addr])))
            .await
            .expect("ping");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("PONG from 127.0.0.1:"), "{stdout}");
    node.shutdown().await;
}

#[test]
fn ping_fails_when_nothing_listens() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let (code, _, stderr) =
        run(clean_command().args(["ping", "--addr", &format!("127.0.0.1:{port}")]));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

#[test]
fn ping_fails_on_a_port_that_speaks_another_protocol() {
    // Something that answers like a web server.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let server = std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let mut buf = [0u8; 64];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let (code, _, stderr) = run(clean_command().args(["ping", "--addr", &addr]));
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("not PONG") && stderr.contains("HTTP/1.1 400"),
        "{stderr}"
    );
    server.join().expect("server");

    // And something that accepts but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr").to_string();
    let (code, _, stderr) =
        run(clean_command().args(["ping", "--addr", &addr, "--timeout-ms", "200"]));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("did not answer"), "{stderr}");
}

#[test]
fn check_config_shows_each_value_and_its_source_and_hides_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("kv.toml");
    std::fs::write(
        &file,
        "node = \"foo\"\nmax_hops = 3\nnats_token = \"tok-from-file-123\"\n[[routes]]\nrange = \"a-m\"\nnode = \"foo\"\n",
    )
    .expect("write");
    let (code, stdout, stderr) = run(clean_command()
        .args([
            "check-config",
            "--config",
            file.to_str().expect("path"),
            "--listen",
            "127.0.0.1:5999",
        ])
        .env("KVMESH_REQUEST_TIMEOUT_MS", "750")
        .env("KVMESH_NATS_URL", "nats://127.0.0.1:4222"));
    assert_eq!(code, Some(0), "{stderr}");
    let file = file.display().to_string();
    for line in [
        format!("node = \"foo\"  # file {file}"),
        format!("max_hops = 3  # file {file}"),
        "listen = \"127.0.0.1:5999\"  # command-line flag --listen".to_string(),
        "request_timeout_ms = 750  # environment variable KVMESH_REQUEST_TIMEOUT_MS".to_string(),
        "max_connections = 10000  # built-in default".to_string(),
        format!("nats_token = \"(hidden)\"  # file {file}"),
        "nats_url = \"nats://127.0.0.1:4222\"  # environment variable KVMESH_NATS_URL".to_string(),
        "max_buckets = 1000000  # built-in default".to_string(),
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing {line:?} in:\n{stdout}"
        );
    }
    assert!(!stdout.contains("tok-from-file-123"), "{stdout}");
}

#[test]
fn credentials_in_a_nats_url_are_refused_without_showing_them() {
    for url in [
        "nats://kv:pa55word@127.0.0.1:4222",
        "nats://pa55word@127.0.0.1:4222",
        "nats://kv:pa55@word@127.0.0.1:4222",
        "kv:pa55word@127.0.0.1:4222",
        "nats://127.0.0.1:4223,nats://pa55word@127.0.0.1:4222",
    ] {
        for args in [&["check-config"][..], &[][..]] {
            let (code, stdout, stderr) =
                run(clean_command()
                    .args(args)
                    .args(["--nats-url", url, "--node", "foo"]));
            assert_eq!(code, Some(2), "{url}: {stderr}");
            assert!(stdout.is_empty(), "{stdout}");
            assert!(
                stderr.contains("invalid configuration: nats_url")
                    && stderr.contains("(hidden)@127.0.0.1:4222")
                    && stderr.contains("set nats_user and nats_password, or nats_token"),
                "{url}: {stderr}"
            );
            assert!(!stderr.contains("pa55"), "{url}: {stderr}");
        }
    }
}

#[test]
fn out_of_range_numbers_are_refused_naming_the_key() {
    for (key, value) in [
        ("max_connections", "2305843009213693952"),
        ("idle_timeout_secs", "9223372036854775807"),
        ("request_timeout_ms", "9223372036854775807"),
        ("max_hops", "4294967295"),
        ("max_line_bytes", "9223372036854775807"),
        ("max_value_bytes", "9223372036854775807"),
        ("max_buckets", "0"),
    ] {
        let stderr = check_config_refuses(&format!("{key} = {value}\n"));
        assert!(
            stderr.contains(&format!("invalid configuration: {key}")),
            "{key}: {stderr}"
        );
        // The node itself refuses it the same way, before it starts.
        let (code, _, stderr) =
            run(clean_command().env(format!("KVMESH_{}", key.to_uppercase()), value));
        assert_eq!(code, Some(2), "{key}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid configuration: {key}")),
            "{key}: {stderr}"
        );
    }
}

/// Runs `check-config` on a file holding `toml`; asserts it is refused with
/// exit status 2 and nothing on stdout, and returns what it said on stderr.
fn check_config_refuses(toml: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, toml).expect("write");
    let (code, stdout, stderr) =
        run(clean_command().args(["check-config", "--config", file.to_str().expect("path")]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    stderr
}

#[test]
fn check_config_rejects_a_bad_file_naming_the_key() {
    let stderr = check_config_refuses("node = \"foo\"\nnats_user = \"kv\"\n");
    assert!(
        stderr.contains("invalid configuration: nats_password"),
        "{stderr}"
    );

    let stderr = check_config_refuses("node = \"foo\"\nnats_tls_ca = \"/nonexistent/ca.pem\"\n");
    assert!(
        stderr.contains("invalid configuration: nats_tls_ca")
            && stderr.contains("/nonexistent/ca.pem"),
        "{stderr}"
    );

    let stderr =
        check_config_refuses("nats_token = \"t\"\nnats_user = \"u\"\nnats_password = \"p\"\n");
    assert!(
        stderr.contains("choose one way to authenticate"),
        "{stderr}"
    );
    assert!(!stderr.contains("\"p\""), "{stderr}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let mut p = spawn_kvmesh(&["--log-format", "json"]);
    assert_eq!(p.stop_with("-TERM"), Some(0));
    p.wait_for_log("stopped", 1);
    let lines = p.log();
    assert!(lines.len() >= 4, "{lines:?}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{l}"
        );
    }
}

#[test]
fn a_node_stops_promptly_while_nats_is_unreachable() {
    // Nothing listens on this port: the node retries in the background.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut cmd = clean_command();
    cmd.env(
        "KVMESH_ROUTES",
        r#"[{range="a-m",node="foo"},{range="n-z",node="bar"}]"#,
    );
    let mut p = spawn_kvmesh_with(
        cmd,
        &[
            "--node",
            "foo",
            "--nats-url",
            &format!("nats://127.0.0.1:{port}"),
        ],
    );
    p.wait_for_log("retrying", 1);
    assert_eq!(p.stop_with("-TERM"), Some(0));
}
