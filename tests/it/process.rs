//! The built binary: what only a process shows (signals, exit codes, config errors).

use std::process::Command;
use std::time::Duration;

use crate::harness::*;

#[tokio::test]
async fn sigterm_stops_the_node_with_exit_status_zero() {
    let mut p = spawn_kvmesh(&[]);
    let mut c = LineClient::connect(p.addr).await;
    c.exchange("CREATE x", "OK\r\n").await;
    assert_eq!(p.stop_with("-TERM"), Some(0));
    c.expect_eof().await;
}

#[tokio::test]
async fn sighup_is_ignored_with_a_log_line() {
    let mut p = spawn_kvmesh(&[]);
    let mut c = LineClient::connect(p.addr).await;
    c.exchange("CREATE x", "OK\r\n").await;
    let status = Command::new("kill")
        .args(["-HUP", &p.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    p.wait_for_log("SIGHUP received and ignored", 1);
    assert!(
        p.child.try_wait().expect("try_wait").is_none(),
        "still running"
    );
    c.exchange("GET x k", "\r\nOK\r\n").await;
    assert_eq!(p.stop_with("-TERM"), Some(0));
}

#[test]
fn sigterm_answers_every_pipelined_request_already_sent() {
    use std::io::{Read, Write};
    let mut p = spawn_kvmesh(&[]);
    let mut stream = std::net::TcpStream::connect(p.addr).expect("connect");
    stream.set_read_timeout(Some(STEP)).expect("timeout");
    let value = "v".repeat(100_000);
    stream
        .write_all(format!("CREATE x\r\nPUT x k {value}\r\n").as_bytes())
        .expect("write");
    let mut ok = [0u8; 8];
    stream.read_exact(&mut ok).expect("read");
    assert_eq!(&ok, b"OK\r\nOK\r\n");
    // 200 GETs (20 MB of answers) sent and not read: the node answers until
    // its bound on owed bytes, and holds the rest of the requests unanswered
    // when the signal comes.
    const N: usize = 200;
    stream
        .write_all("GET x k\r\n".repeat(N).as_bytes())
        .expect("write");
    std::thread::sleep(Duration::from_millis(300));
    let status = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut answers = Vec::new();
    stream.read_to_end(&mut answers).expect("read to the end");
    let answer = format!("{value}\r\nOK\r\n");
    assert_eq!(
        answers.len() / answer.len(),
        N,
        "every request sent before the signal is answered"
    );
    assert_eq!(answers, answer.repeat(N).into_bytes());
    assert_eq!(p.child.wait().expect("wait").code(), Some(0));
}

#[tokio::test]
async fn sigint_stops_the_node_with_exit_status_zero() {
    let mut p = spawn_kvmesh(&["--node", "n1"]);
    let mut c = LineClient::connect(p.addr).await;
    c.exchange("WHERE x", "n1\r\nOK\r\n").await;
    assert_eq!(p.stop_with("-INT"), Some(0));
}

#[test]
fn a_bad_configuration_exits_non_zero_naming_the_key_and_its_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("kv.toml");
    std::fs::write(&file, "node = \"foo\"\n[[routes]]\nrange = \"a-m\"\nnode = \"foo\"\n[[routes]]\nrange = \"k-z\"\nnode = \"bar\"\n").unwrap();
    let file = file.to_str().expect("utf-8 path");

    /// How each case sets the bad value.
    enum Setup<'a> {
        Env(&'a str, &'a str),
        Args(&'a [&'a str]),
    }
    let config_flag = ["--config", file];
    let cases: Vec<(Setup, &str, &str)> = vec![
        (Setup::Args(&config_flag), "routes[1].range", file),
        (Setup::Env("KVMESH_CONFIG", file), "routes[1].range", file),
        (Setup::Env("KVMESH_NODE", "no good"), "node", "KVMESH_NODE"),
        (Setup::Env("KVMESH_LISTNE", "x"), "listne", "KVMESH_LISTNE"),
        (Setup::Args(&["--node", "a.b"]), "node", "--node"),
        (
            Setup::Args(&["--config", "/nonexistent/kv.toml"]),
            "config",
            "/nonexistent/kv.toml",
        ),
        (
            Setup::Env("KVMESH_MAX_HOPS", "many"),
            "max_hops",
            "KVMESH_MAX_HOPS",
        ),
    ];
    for (setup, key, source) in cases {
        let mut cmd = clean_command();
        match setup {
            Setup::Env(name, value) => cmd.env(name, value),
            Setup::Args(args) => cmd.args(args),
        };
        let (code, _, stderr) = run(&mut cmd);
        assert_eq!(code, Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains(&format!("invalid configuration: {key} ")),
            "key {key}: {stderr}"
        );
        assert!(stderr.contains(source), "source {source}: {stderr}");
    }
}

#[test]
fn an_address_in_use_exits_non_zero() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, stderr) = run(clean_command().args(["--listen", &addr]));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}

#[test]
fn version_and_help_work() {
    let (code, _, _) = run(clean_command().arg("--version"));
    assert_eq!(code, Some(0));
    let out = clean_command().arg("--help").output().expect("help");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--node",
        "--listen",
        "--nats-url",
        "--log-format",
    ] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
}

#[test]
fn the_shipped_configuration_files_load() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    for name in ["kvmesh.toml", "foo.toml", "bar.toml"] {
        let overrides = kvmesh::Overrides {
            config_file: Some(format!("{dir}/{name}").into()),
            ..Default::default()
        };
        let settings = kvmesh::Config::load(&overrides).unwrap_or_else(|e| panic!("{name}: {e}"));
        if name == "kvmesh.toml" {
            assert_eq!(
                settings.config,
                kvmesh::Config::default(),
                "kvmesh.toml shows the defaults"
            );
        } else {
            let table = settings.table;
            assert_eq!(table.owner_of("apple"), Some("foo"));
            assert_eq!(table.owner_of("zebra"), Some("bar"));
        }
    }
}
