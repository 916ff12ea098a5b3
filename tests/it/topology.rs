//! The shipped topology: docker-compose.yml and config/mesh/*.toml describe a
//! whole cluster, and scripts/mesh-up starts the same mesh without docker.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use kvmesh::Overrides;
use kvmesh::RoutingTable;
use yaml_rust2::{Yaml, YamlLoader};

use crate::harness::*;
use crate::nats::nats_server_bin;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A service with YAML merge keys (`<<: *node`) applied.
fn merged(service: &Yaml) -> BTreeMap<String, Yaml> {
    let mut out = BTreeMap::new();
    if let Some(hash) = service.as_hash() {
        if let Some(base) = hash.get(&Yaml::String("<<".into())) {
            out = merged(base);
        }
        for (k, v) in hash {
            if let Some(k) = k.as_str().filter(|k| *k != "<<") {
                out.insert(k.to_string(), v.clone());
            }
        }
    }
    out
}

/// A compose value with its `${NAME:-default}` variables at their defaults.
fn defaults(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closing brace") + start;
        let var = &rest[start + 2..end];
        let (_, default) = var.split_once(":-").expect("every variable has a default");
        out.push_str(default);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_compose_file_and_configs_describe_a_whole_cluster() {
    let text =
        std::fs::read_to_string(repo().join("docker-compose.yml")).expect("docker-compose.yml");
    let doc = YamlLoader::load_from_str(&text)
        .expect("valid YAML")
        .remove(0);
    let services: BTreeMap<String, BTreeMap<String, Yaml>> = doc["services"]
        .as_hash()
        .expect("services")
        .iter()
        .map(|(k, v)| (k.as_str().expect("name").to_owned(), merged(v)))
        .collect();
    let nats: Vec<&String> = services
        .iter()
        .filter(|(_, s)| {
            s.get("image")
                .and_then(Yaml::as_str)
                .is_some_and(|i| i.starts_with("nats:"))
        })
        .map(|(n, _)| n)
        .collect();
    assert_eq!(nats.len(), 3, "a 3-server NATS cluster");
    let mut host_ports = Vec::new();
    let mut tables: BTreeMap<String, (RoutingTable, u32)> = BTreeMap::new();
    let mut used_files = BTreeSet::new();
    for (name, s) in &services {
        assert!(
            s.get("healthcheck")
                .is_some_and(|h| !strings(&h["test"]).is_empty()),
            "{name}: health check"
        );
        for p in s.get("ports").map(strings).unwrap_or_default() {
            assert!(p.contains("${KVMESH_"), "{name}: {p} can be moved");
            let p = defaults(&p);
            let parts: Vec<&str> = p.split(':').collect();
            assert_eq!(parts.len(), 3, "{name}: {p}");
            assert_eq!(
                parts[0], "127.0.0.1",
                "{name}: published on loopback by default"
            );
            host_ports.push(parts[1].to_owned());
        }
        assert_eq!(
            s.get("restart").and_then(Yaml::as_str),
            Some("unless-stopped"),
            "{name}: restarted"
        );
        let command = s.get("command").map(strings).unwrap_or_default();
        if nats.contains(&name) {
            assert!(
                s["image"].as_str().expect("image").contains("alpine"),
                "{name}: the alpine variant has wget"
            );
            let arg = |flag: &str| {
                command
                    .iter()
                    .position(|a| a == flag)
                    .and_then(|i| command.get(i + 1))
                    .unwrap_or_else(|| panic!("{name}: {flag}"))
                    .clone()
            };
            assert_eq!(arg("--http_port"), "8222");
            assert_eq!(
                arg("-c"),
                "/etc/nats/kvmesh-auth.conf",
                "{name}: permissions"
            );
            assert_eq!(arg("--cluster_name"), "kvmesh");
            arg("--cluster");
            let routes: BTreeSet<String> = arg("--routes").split(',').map(str::to_owned).collect();
            let want: BTreeSet<String> = nats.iter().map(|n| format!("nats://{n}:6222")).collect();
            assert_eq!(routes, want, "{name}: routes to every server");
            continue;
        }
        // A kvmesh node.
        assert!(s.contains_key("build"), "{name}: built from the Dockerfile");
        assert_eq!(
            command.first().map(String::as_str),
            Some("--config"),
            "{name}"
        );
        let in_container = &command[1];
        let volume = s["volumes"]
            .as_vec()
            .and_then(|v| v[0].as_str())
            .expect("config volume");
        let mut parts = volume.split(':');
        let (host_dir, container_dir) = (
            parts.next().expect("host"),
            parts.next().expect("container"),
        );
        let file = repo().join(host_dir).join(
            Path::new(in_container)
                .strip_prefix(container_dir)
                .expect("config inside the mounted folder"),
        );
        used_files.insert(file.clone());
        let env = merged(&s["environment"]);
        let env = |key: &str| env.get(key).and_then(Yaml::as_str).map(defaults);
        // `<node>-standby` is a second process of a durable node.
        let node = name.strip_suffix("-standby").unwrap_or(name);
        if node != name {
            assert_eq!(
                env("KVMESH_DURABILITY").as_deref(),
                Some("jetstream"),
                "{name}: only a durable node has standbys"
            );
        }
        assert_eq!(
            env("KVMESH_NATS_USER").as_deref(),
            Some(node),
            "{name}: its node's own NATS user"
        );
        assert!(
            env("KVMESH_NATS_PASSWORD").is_some(),
            "{name}: NATS password"
        );
        let settings = kvmesh::Config::load(&Overrides {
            config_file: Some(file.clone()),
            listen: env("KVMESH_LISTEN"),
            nats_url: env("KVMESH_NATS_URL"),
            ..Overrides::default()
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let config = &settings.config;
        assert_eq!(config.node, node, "{name}: service and node names match");
        assert_eq!(
            config.listen, "0.0.0.0:4040",
            "{name}: reachable inside the container network"
        );
        let servers: BTreeSet<String> = settings
            .nats_servers
            .clone()
            .expect("NATS")
            .into_iter()
            .collect();
        let want: BTreeSet<String> = nats.iter().map(|n| format!("nats://{n}:4222")).collect();
        assert_eq!(servers, want, "{name}: pointed at every NATS server");
        let depends = &s["depends_on"];
        for n in &nats {
            assert_eq!(
                depends[n.as_str()]["condition"].as_str(),
                Some("service_healthy"),
                "{name} waits for {n}"
            );
        }
        let check = strings(&s["healthcheck"]["test"]).join(" ");
        assert!(check.contains("kvmesh ping"), "{name}: {check}");
        assert!(
            s["ports"].as_vec().is_some_and(|p| p
                .iter()
                .any(|p| p.as_str().is_some_and(|p| p.ends_with(":4040")))),
            "{name}: TCP port published"
        );
        tables.insert(node.to_owned(), (settings.table.clone(), config.max_hops));
    }
    let distinct: BTreeSet<&String> = host_ports.iter().collect();
    assert_eq!(
        distinct.len(),
        host_ports.len(),
        "host ports are distinct: {host_ports:?}"
    );
    assert_eq!(tables.len(), 3, "three nodes");

    // Every mesh config file is used, and no two nodes share a name.
    let files: BTreeSet<PathBuf> = std::fs::read_dir(repo().join("config/mesh"))
        .expect("config/mesh")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files, used_files);

    // Every letter has exactly one owner, and every node reaches it.
    let mut longest = 0;
    for byte in b'a'..=b'z' {
        let bucket = (byte as char).to_string();
        let owners: Vec<&String> = tables
            .iter()
            .filter(|(n, (t, _))| t.owner_of(&bucket) == Some(n.as_str()))
            .map(|(n, _)| n)
            .collect();
        assert_eq!(owners.len(), 1, "{bucket}: owned by {owners:?}");
        for start in tables.keys() {
            let (mut at, mut hops) = (start.clone(), 0);
            loop {
                let (table, max_hops) = &tables[&at];
                let next = table
                    .owner_of(&bucket)
                    .unwrap_or_else(|| panic!("{at}: no route for {bucket}"));
                if next == at {
                    break;
                }
                assert!(hops < *max_hops, "{bucket} from {start}: routing loop");
                assert!(
                    tables.contains_key(next),
                    "{bucket}: {at} names unknown node {next}"
                );
                at = next.to_owned();
                hops += 1;
            }
            assert_eq!(&at, owners[0], "{bucket} from {start}");
            longest = longest.max(hops);
        }
    }
    assert!(
        longest >= 2,
        "some request takes two hops, to show multi-hop routing"
    );

    // The image: built in one stage, run as a non-root user in another.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    assert_eq!(
        dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count(),
        2
    );
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("USER ") && !l.contains("root"))
    );
}

/// A free port whose neighbours 2000 and 4000 above are free too (the script
/// puts cluster and monitoring ports there).
fn free_port_triple(taken: &mut Vec<std::net::TcpListener>) -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = l.local_addr().expect("addr").port();
        let others = [p.checked_add(2000), p.checked_add(4000)];
        if others
            .iter()
            .all(|o| o.is_some_and(|o| std::net::TcpListener::bind(("127.0.0.1", o)).is_ok()))
        {
            taken.push(l);
            return p;
        }
    }
}

struct MeshDown(PathBuf);

impl Drop for MeshDown {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/mesh-down"))
            .env("MESH_DIR", &self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_script_starts_the_topology_and_stops_it() {
    let Some(nats_bin) = nats_server_bin() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut held = Vec::new();
    let nats_ports: Vec<u16> = (0..3).map(|_| free_port_triple(&mut held)).collect();
    let tcp_ports: Vec<u16> = (0..3).map(|_| free_port_triple(&mut held)).collect();
    drop(held);
    let join = |ports: &[u16]| {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let up = Command::new(repo().join("scripts/mesh-up"))
        .env("MESH_DIR", dir.path())
        .env("MESH_NATS_PORTS", join(&nats_ports))
        .env("MESH_TCP_PORTS", join(&tcp_ports))
        .env("NATS_SERVER_BIN", &nats_bin)
        .env("MESH_KVMESH_BIN", kvmesh_bin())
        .output()
        .expect("mesh-up");
    let _down = MeshDown(dir.path().to_owned());
    assert!(
        up.status.success(),
        "mesh-up failed: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let addr = |i: usize| format!("127.0.0.1:{}", tcp_ports[i]).parse().expect("addr");
    let (mut foo, mut bar, mut baz) = (
        LineClient::connect(addr(0)).await,
        LineClient::connect(addr(1)).await,
        LineClient::connect(addr(2)).await,
    );
    // Local at foo, remote from foo to bar, and two hops from baz (baz, foo, bar).
    foo.eventually("CREATE apple", "OK\r\n").await;
    foo.exchange("PUT apple k a", "OK\r\n").await;
    foo.eventually("CREATE igloo", "OK\r\n").await;
    foo.exchange("PUT igloo k i", "OK\r\n").await;
    bar.exchange("GET igloo k", "i\r\nOK\r\n").await;
    baz.eventually("WHERE igloo", "bar\r\nOK\r\n").await;
    baz.exchange("GET igloo k", "i\r\nOK\r\n").await;
    baz.exchange("GET apple k", "a\r\nOK\r\n").await;
    baz.exchange("CREATE sun", "OK\r\n").await;
    bar.eventually("WHERE sun", "baz\r\nOK\r\n").await;
    bar.exchange("PUT sun k s", "OK\r\n").await;
    foo.eventually("GET sun k", "s\r\nOK\r\n").await;

    let down = Command::new(repo().join("scripts/mesh-down"))
        .env("MESH_DIR", dir.path())
        .output()
        .expect("mesh-down");
    assert!(down.status.success());
    for c in [&mut foo, &mut bar, &mut baz] {
        c.expect_eof().await;
    }
    for port in tcp_ports.iter().chain(&nats_ports) {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", *port)).is_err(),
            "port {port} still open"
        );
    }
    let pids: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .collect();
    assert!(pids.is_empty(), "pid files left: {pids:?}");
}
