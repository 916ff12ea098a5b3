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
