//! Secured NATS: user/password, token and TLS against a real `nats-server`. The
//! right credentials join the mesh; wrong ones are reported in the log while
//! the node serves its own buckets and keeps retrying; secrets never show.

use std::path::{Path, PathBuf};

use kvmesh::config::Secret;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::harness::*;
use crate::nats::NatsServer;

const ROUTES: &str = r#"[{range="a-m",node="foo"},{range="n-z",node="bar"}]"#;

/// Starts bar as a process with `env`, against `url`.
fn spawn_bar(url: &str, env: &[(&str, &str)]) -> Process {
    let mut cmd = clean_command();
    cmd.env("KVMESH_ROUTES", ROUTES);
    for (k, v) in env {
        cmd.env(k, v);
    }
    spawn_kvmesh_with(cmd, &["--node", "bar", "--nats-url", url])
}

/// foo in this process with `config`'s credentials, bar as a process with
/// `env`: the mesh works end to end.
async fn mesh_works(url: &str, secure: impl Fn(&mut kvmesh::Config), bar_env: &[(&str, &str)]) {
    let mut config = mesh_config("foo", FOO_BAR, url);
    secure(&mut config);
    let foo = start_node(config).await;
    let bar = spawn_bar(url, bar_env);
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.eventually("CREATE zebra", "OK\r\n").await;
    c.exchange("PUT zebra k v", "OK\r\n").await;
    let mut b = LineClient::connect(bar.addr).await;
    b.exchange("GET zebra k", "v\r\nOK\r\n").await;
    b.eventually("WHERE apple", "foo\r\nOK\r\n").await;
    foo.shutdown().await;
}

/// A node with wrong credentials: it says why in its log, serves its own
/// buckets, answers `mesh unavailable` for the others, and keeps trying.
async fn wrong_credentials_are_reported(
    url: &str,
    bar_env: &[(&str, &str)],
    secret: &str,
    needle: &str,
) {
    let mut bar = spawn_bar(url, bar_env);
    bar.wait_for_log(needle, 1);
    let mut b = LineClient::connect(bar.addr).await;
    b.exchange("CREATE zebra", "OK\r\n").await;
    b.exchange("PUT zebra k v", "OK\r\n").await;
    b.exchange("GET apple k", "ERROR mesh unavailable\r\n")
        .await;
    // Still retrying: more failures keep coming.
    bar.wait_for_log("retrying", 3);
    assert_eq!(bar.stop_with("-TERM"), Some(0));
    let log = bar.log().join("\n");
    assert!(
        !log.contains(secret),
        "the secret leaked into the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_join_the_mesh() {
    let Some(nats) = NatsServer::start_with(&["--user", "kv", "--pass", "s3cret-pw"]) else {
        return;
    };
    mesh_works(
        &nats.url(),
        |c| {
            c.nats_user = Some("kv".into());
            c.nats_password = Some(Secret::new("s3cret-pw"));
        },
        &[
            ("KVMESH_NATS_USER", "kv"),
            ("KVMESH_NATS_PASSWORD", "s3cret-pw"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_reported_and_retried() {
    let Some(nats) = NatsServer::start_with(&["--user", "kv", "--pass", "s3cret-pw"]) else {
        return;
    };
    wrong_credentials_are_reported(
        &nats.url(),
        &[
            ("KVMESH_NATS_USER", "kv"),
            ("KVMESH_NATS_PASSWORD", "wrong-pw-123"),
        ],
        "wrong-pw-123",
        "authorization violation",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_joins_the_mesh_and_a_wrong_one_is_reported() {
    let Some(nats) = NatsServer::start_with(&["--auth", "t0ken-abc"]) else {
        return;
    };
    mesh_works(
        &nats.url(),
        |c| c.nats_token = Some(Secret::new("t0ken-abc")),
        &[("KVMESH_NATS_TOKEN", "t0ken-abc")],
    )
    .await;
    wrong_credentials_are_reported(
        &nats.url(),
        &[("KVMESH_NATS_TOKEN", "t0ken-wrong")],
        "t0ken-wrong",
        "authorization violation",
    )
    .await;
}

/// A CA, a server certificate for 127.0.0.1, and a client certificate, as PEM
/// files in `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write pem");
        path
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let leaf = |usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("params");
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf(ExtendedKeyUsagePurpose::ClientAuth);
    Pki {
        ca: write("ca.pem", ca.pem()),
        server_cert: write("server.pem", server_cert),
        server_key: write("server-key.pem", server_key),
        client_cert: write("client.pem", client_cert),
        client_key: write("client-key.pem", client_key),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_joins_the_mesh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path());
    let s = |p: &PathBuf| p.to_str().expect("utf-8 path").to_owned();
    let Some(nats) = NatsServer::start_with(&[
        "--tls",
        "--tlscert",
        &s(&pki.server_cert),
        "--tlskey",
        &s(&pki.server_key),
        "--tlscacert",
        &s(&pki.ca),
        "--tlsverify",
    ]) else {
        return;
    };
    let (ca, cert, key) = (s(&pki.ca), s(&pki.client_cert), s(&pki.client_key));
    mesh_works(
        &nats.url(),
        |c| {
            c.nats_tls_ca = Some(pki.ca.clone());
            c.nats_tls_cert = Some(pki.client_cert.clone());
            c.nats_tls_key = Some(pki.client_key.clone());
        },
        &[
            ("KVMESH_NATS_TLS_CA", &ca),
            ("KVMESH_NATS_TLS_CERT", &cert),
            ("KVMESH_NATS_TLS_KEY", &key),
        ],
    )
    .await;
    // Without a client certificate the server refuses the node.
    let mut bar = spawn_bar(&nats.url(), &[("KVMESH_NATS_TLS_CA", &ca)]);
    bar.wait_for_log("retrying", 2);
    let mut b = LineClient::connect(bar.addr).await;
    b.exchange("CREATE zebra", "OK\r\n").await;
    b.exchange("GET apple k", "ERROR mesh unavailable\r\n")
        .await;
    assert_eq!(bar.stop_with("-TERM"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nkey_seed_file_joins_the_mesh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let conf = dir.path().join("nkey.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    )
    .expect("write conf");
    let seed_file = dir.path().join("kv.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).expect("write seed");
    let Some(nats) = NatsServer::start_with(&["-c", conf.to_str().expect("path")]) else {
        return;
    };
    let seed_path = seed_file.to_str().expect("path").to_owned();
    mesh_works(
        &nats.url(),
        |c| c.nats_nkey = Some(seed_file.clone()),
        &[("KVMESH_NATS_NKEY", &seed_path)],
    )
    .await;
    // Another user's seed is refused.
    let other = dir.path().join("other.nk");
    std::fs::write(&other, nkeys::KeyPair::new_user().seed().expect("seed")).expect("write");
    let other = other.to_str().expect("path").to_owned();
    let mut bar = spawn_bar(&nats.url(), &[("KVMESH_NATS_NKEY", &other)]);
    bar.wait_for_log("authorization violation", 1);
    let log = bar.log().join("\n");
    assert!(!log.contains(&seed), "{log}");
    assert_eq!(bar.stop_with("-TERM"), Some(0));
}

/// `config/nats-auth.conf` with the given passwords written in.
fn auth_conf(dir: &Path) -> PathBuf {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/nats-auth.conf"
    ))
    .expect("config/nats-auth.conf");
    let mut conf = shipped;
    for user in ["foo", "bar", "baz", "ops"] {
        conf = conf.replace(
            &format!("$KVMESH_{}_PASSWORD", user.to_uppercase()),
            &format!("\"{user}-pw\""),
        );
    }
    let path = dir.join("nats-auth.conf");
    std::fs::write(&path, conf).expect("write");
    path
}

/// A NATS client as `user`, and the server errors it is told about.
async fn client_as(
    url: &str,
    user: &str,
    inbox: &str,
) -> (
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = within(
        "connect",
        async_nats::ConnectOptions::with_user_and_password(user.into(), format!("{user}-pw"))
            .custom_inbox_prefix(inbox)
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(err) = event {
                        let _ = tx.send(err.to_string());
                    }
                }
            })
            .connect(url),
    )
    .await
    .expect("connect");
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_shipped_permissions_nobody_can_answer_for_a_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = auth_conf(dir.path());
    let Some(nats) = NatsServer::start_with(&["-c", conf.to_str().expect("path")]) else {
        return;
    };
    let url = nats.url();
    let as_user = |name: &str| {
        let mut config = mesh_config(name, FOO_BAR, &url);
        config.nats_user = Some(name.into());
        config.nats_password = Some(Secret::new(format!("{name}-pw")));
        config
    };
    let foo = start_node(as_user("foo")).await;
    let bar = start_node(as_user("bar")).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("CREATE zebra", "OK\r\n").await;
    c.exchange("PUT zebra k real", "OK\r\n").await;

    // A stranger (the ops user) tries to join bar's queue group, and to
    // answer into foo's inbox; foo's own user tries to serve bar's subject.
    let (ops, mut ops_errors) = client_as(&url, "ops", "_INBOX.ops").await;
    let _forger = ops
        .queue_subscribe("kv.node.bar", "q".into())
        .await
        .expect("subscribe is sent");
    ops.publish(
        "_INBOX.foo.x.1",
        "{\"ok\":true,\"value\":\"forged\"}".into(),
    )
    .await
    .expect("publish is sent");
    let (foo_user, mut foo_errors) = client_as(&url, "foo", "_INBOX.foo").await;
    let _impostor = foo_user
        .subscribe("kv.node.bar")
        .await
        .expect("subscribe is sent");
    // ops may not publish to its own inbox either: a request is its barrier.
    nats_req(&ops, "kv.node.foo", br#"{"op":"where","bucket":"a"}"#).await;
    nats_round_trip(&foo_user).await;
    let refused = |e: &str, what: &str| e.contains("Permissions Violation") && e.contains(what);
    let mut seen = (false, false);
    while !(seen.0 && seen.1) {
        let e = within("ops is refused", ops_errors.recv())
            .await
            .expect("an error");
        seen.0 |= refused(&e, "Subscription to \"kv.node.bar\"");
        seen.1 |= refused(&e, "Publish to \"_INBOX.foo.x.1\"");
    }
    let e = within("foo's user is refused", foo_errors.recv())
        .await
        .expect("an error");
    assert!(refused(&e, "Subscription to \"kv.node.bar\""), "{e}");

    // Every answer still comes from bar.
    for _ in 0..50 {
        c.exchange("GET zebra k", "real\r\nOK\r\n").await;
    }
    // A reply in several messages is allowed too (two 400 KB answers do not
    // fit one message).
    let big = "b".repeat(400_000);
    c.exchange(&format!("PUT zebra big {big}"), "OK\r\n").await;
    c.send("GET zebra big\r\nGET zebra big\r\nGET zebra big\r\n")
        .await;
    for _ in 0..3 {
        c.expect(&format!("{big}\r\nOK\r\n")).await;
    }
    // ops can still use the mesh and the service API, as a person would.
    assert_eq!(
        nats_req(
            &ops,
            "kv.node.bar",
            br#"{"op":"get","bucket":"zebra","key":"k"}"#
        )
        .await,
        r#"{"ok":true,"value":"real"}"#
    );
    foo.shutdown().await;
    bar.shutdown().await;
}

/// A JetStream server (its store in `dir`) under `config/nats-auth.conf`;
/// `None` (the test skips) without a server that has JetStream KV.
fn jetstream_under_the_shipped_permissions(dir: &Path) -> Option<NatsServer> {
    crate::nats::jetstream_server_bin()?;
    let conf = auth_conf(dir);
    let store = dir.join("js");
    let args = [
        "-c",
        conf.to_str().expect("path"),
        "-js",
        "-sd",
        store.to_str().expect("path"),
    ];
    NatsServer::start_with(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_node_works_under_the_shipped_permissions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(nats) = jetstream_under_the_shipped_permissions(dir.path()) else {
        return;
    };
    let mut config = mesh_config("foo", FOO_BAR, &nats.url());
    config.durability = kvmesh::config::Durability::Jetstream;
    config.nats_user = Some("foo".into());
    config.nats_password = Some(Secret::new("foo-pw"));
    let foo = start_node(config.clone()).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("CREATE apple", "OK\r\n").await;
    c.exchange("PUT apple k v", "OK\r\n").await;
    c.exchange("DROP apple", "OK\r\n").await;
    c.exchange("CREATE apple", "OK\r\n").await;
    c.exchange("PUT apple k w", "OK\r\n").await;
    foo.shutdown().await;
    let foo = start_node(config).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("GET apple k", "w\r\nOK\r\n").await;
    // bar's user may not touch foo's store.
    let (bar_user, mut errors) = client_as(&nats.url(), "bar", "_INBOX.bar").await;
    bar_user
        .publish("$KV.kvmesh_foo.k.1.x", "forged".into())
        .await
        .expect("publish is sent");
    nats_round_trip(&bar_user).await;
    let e = within("bar's user is refused", errors.recv())
        .await
        .expect("an error");
    assert!(
        e.contains("Permissions Violation") && e.contains("kvmesh_foo"),
        "{e}"
    );
    foo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_table_and_its_moves_work_under_the_shipped_permissions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(nats) = jetstream_under_the_shipped_permissions(dir.path()) else {
        return;
    };
    let node = |name: &str, durable: bool| {
        let mut config = mesh_config(name, FOO_BAR, &nats.url());
        config.routes_from = kvmesh::config::RoutesFrom::Jetstream;
        if durable {
            config.durability = kvmesh::config::Durability::Jetstream;
        }
        config.nats_user = Some(name.into());
        config.nats_password = Some(Secret::new(format!("{name}-pw")));
        config
    };
    let foo = start_node(node("foo", true)).await;
    let bar = start_node(node("bar", false)).await;
    let mut c = LineClient::connect(foo.local_addr()).await;
    c.exchange("CREATE kiwi", "OK\r\n").await;
    c.exchange("PUT kiwi k v", "OK\r\n").await;
    // The ops user moves k-m to bar with the CLI; kiwi moves with it.
    let mut cmd = std::process::Command::new(kvmesh_bin());
    cmd.args([
        "routes",
        "move",
        "k-m",
        "bar",
        "--node",
        "ops",
        "--nats-url",
        &nats.url(),
    ])
    .env_remove("KVMESH_CONFIG")
    .env("KVMESH_NATS_USER", "ops")
    .env("KVMESH_NATS_PASSWORD", "ops-pw");
    let (code, out, err) = run(&mut cmd);
    assert_eq!(code, Some(0), "{out}{err}");
    c.eventually("WHERE kiwi", "bar\r\nOK\r\n").await;
    c.exchange("GET kiwi k", "v\r\nOK\r\n").await;
    let mut b = LineClient::connect(bar.local_addr()).await;
    b.exchange("GET kiwi k", "v\r\nOK\r\n").await;
    // Nobody but foo may serve foo's move subject.
    let (bar_user, mut errors) = client_as(&nats.url(), "bar", "_INBOX.bar").await;
    let _sub = bar_user
        .subscribe("kv.move.foo")
        .await
        .expect("subscribe is sent");
    nats_round_trip(&bar_user).await;
    let e = within("bar's user is refused", errors.recv())
        .await
        .expect("an error");
    assert!(
        e.contains("Permissions Violation") && e.contains("kv.move.foo"),
        "{e}"
    );
    foo.shutdown().await;
    bar.shutdown().await;
}
