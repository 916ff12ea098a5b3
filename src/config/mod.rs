//! Configuration: defaults, then a TOML file, then `KVMESH_*` variables, then flags
//! (the README, Configuration), layered with figment and checked once, at
//! start, into [`Settings`] that the node takes as they are.
//!
//! - this file: the keys ([`Config`]) and loading;
//! - [`layers`]: the layers and which one set a key;
//! - [`validate`]: the checks, and the [`Settings`] they give;
//! - [`describe`]: what `kvmesh check-config` prints.
//!
//! Every rejection names the key and the layer it came from, so an operator can
//! tell a typo in a file from a stray environment variable. Most of this file
//! is the tests of loading (layers, sources, every refusal).

mod describe;
mod layers;
mod validate;

pub use describe::describe;
pub use validate::{Invalid, Settings, routing_table};

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::secret::Secret;
use crate::secret::{option_scalar_as_string, scalar_as_string};

/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "KVMESH_CONFIG";

/// The default NATS address, when the table names other nodes but no URL is set.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// A node's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name: it serves `kv.node.<node>`.
    #[serde(deserialize_with = "scalar_as_string")]
    pub node: String,
    /// The TCP address of the text front end.
    #[serde(deserialize_with = "scalar_as_string")]
    pub listen: String,
    /// One NATS URL or a comma-separated list; `None` when not configured.
    #[serde(
        default,
        deserialize_with = "option_scalar_as_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub nats_url: Option<String>,
    /// How long to wait for another node's answer.
    pub request_timeout_ms: u64,
    /// How many times a request may be forwarded.
    pub max_hops: u32,
    /// Longest request line, in bytes, without its terminator.
    pub max_line_bytes: usize,
    /// Largest value, in bytes.
    pub max_value_bytes: usize,
    /// Most TCP connections served at once.
    pub max_connections: usize,
    /// Most buckets this node holds; a CREATE past it is refused.
    pub max_buckets: usize,
    /// Where this node's buckets live: memory only, or JetStream too.
    pub durability: Durability,
    /// JetStream replicas of a durable node's store (1 to 5).
    pub replicas: u32,
    /// How long an active durable process may be silent before a standby
    /// of the same node takes over.
    pub failover_after_ms: u64,
    /// Close a TCP connection that sends nothing for this long; unset: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    /// Linux: serve TCP clients from io_uring loops where the kernel allows
    /// it (else, and when false, on the async runtime).
    pub io_uring: bool,
    /// Where the routing table comes from: this configuration's `routes`,
    /// or the JetStream KV bucket `kvmesh_routes`, followed live.
    pub routes_from: RoutesFrom,
    /// The routing table; `None` means one catch-all entry for this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<RouteConfig>>,
    /// NATS user name (with `nats_password`).
    #[serde(
        default,
        deserialize_with = "option_scalar_as_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub nats_user: Option<String>,
    /// NATS password (with `nats_user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_password: Option<Secret>,
    /// NATS authentication token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_token: Option<Secret>,
    /// A NATS credentials file (JWT and nkey seed), as `nsc` writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_creds: Option<PathBuf>,
    /// A file holding an nkey seed (`SU...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_nkey: Option<PathBuf>,
    /// CA certificate (PEM) to verify the NATS server with; turns TLS on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for NATS servers that verify clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_tls_key: Option<PathBuf>,
}

/// Where a node's buckets live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// In memory only: they live and die with the process.
    Memory,
    /// In the JetStream KV bucket `kvmesh_<node>`, with a copy in memory.
    Jetstream,
}

/// Where the routing table comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutesFrom {
    /// The `routes` key, fixed at start.
    Config,
    /// The key `table` of the JetStream KV bucket `kvmesh_routes`, followed
    /// live (`routes`, when set, is written there if the key is missing).
    Jetstream,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `a-m`, `x` or `*`.
    #[serde(deserialize_with = "scalar_as_string")]
    pub range: String,
    /// The owning node.
    #[serde(deserialize_with = "scalar_as_string")]
    pub node: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node: "local".into(),
            listen: "127.0.0.1:4040".into(),
            nats_url: None,
            request_timeout_ms: 5000,
            max_hops: 8,
            max_line_bytes: 1024 * 1024,
            max_value_bytes: 512 * 1024,
            max_connections: 10_000,
            max_buckets: 1_000_000,
            durability: Durability::Memory,
            replicas: 1,
            failover_after_ms: 3000,
            idle_timeout_secs: None,
            io_uring: true,
            routes_from: RoutesFrom::Config,
            routes: None,
            nats_user: None,
            nats_password: None,
            nats_token: None,
            nats_creds: None,
            nats_nkey: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
        }
    }
}

/// Values given on the command line: the last layer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    /// The configuration file (`--config`, else `KVMESH_CONFIG`).
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
    /// `--node`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `--listen`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// `--nats-url`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
}

/// A configuration that cannot be used: which key, from where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key, e.g. `routes[1].range`.
    pub key: String,
    /// The layer it came from, e.g. `environment variable KVMESH_NODE`.
    pub origin: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(
                f,
                "invalid configuration (from {}): {}",
                self.origin, self.message
            )
        } else {
            write!(
                f,
                "invalid configuration: {} (from {}): {}",
                self.key, self.origin, self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Loads the layers in order (defaults, file, `KVMESH_*`, flags) and
    /// checks the result.
    pub fn load(overrides: &Overrides) -> Result<Settings, ConfigError> {
        let figment = layers::figment(overrides)?;
        let config: Config = figment
            .extract()
            .map_err(|err| layers::from_figment(&figment, err))?;
        config.check().map_err(|invalid| ConfigError {
            origin: layers::describe_source(
                figment.find_metadata(&invalid.top_key),
                &invalid.top_key,
            ),
            key: invalid.key,
            message: invalid.message,
        })
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
mod tests {
    use super::*;
    use figment::Jail;

    fn load(file: Option<&str>, flags: Overrides) -> Result<Config, ConfigError> {
        Config::load(&Overrides {
            config_file: file.map(PathBuf::from),
            ..flags
        })
        .map(|settings| settings.config)
    }

    fn error(
        jail_setup: impl FnOnce(&mut Jail) -> figment::error::Result<Option<&'static str>>,
    ) -> ConfigError {
        let mut out = None;
        Jail::expect_with(|jail| {
            let file = jail_setup(jail)?;
            out = Some(load(file, Overrides::default()).expect_err("must be refused"));
            Ok(())
        });
        out.expect("jail ran")
    }

    #[test]
    fn defaults_need_nothing() {
        Jail::expect_with(|_| {
            let c = load(None, Overrides::default()).unwrap();
            assert_eq!(c, Config::default());
            assert_eq!(c.node, "local");
            assert_eq!(c.listen, "127.0.0.1:4040");
            assert_eq!(
                c.clone().check().expect("valid").table.owner_of("anything"),
                Some("local")
            );
            assert_eq!(c.clone().check().expect("valid").nats_servers, None);
            Ok(())
        });
    }

    #[test]
    fn layers_apply_in_order_file_env_flags() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "kv.toml",
                r#"
                node = "filenode"
                listen = "127.0.0.1:5000"
                max_hops = 3
                request_timeout_ms = 250
                [[routes]]
                range = "a-m"
                node = "filenode"
                [[routes]]
                range = "n-z"
                node = "other"
                "#,
            )?;
            let c = load(Some("kv.toml"), Overrides::default()).unwrap();
            assert_eq!(
                (c.node.as_str(), c.listen.as_str(), c.max_hops),
                ("filenode", "127.0.0.1:5000", 3)
            );
            assert_eq!(c.request_timeout_ms, 250);
            assert_eq!(
                c.max_line_bytes,
                1024 * 1024,
                "untouched keys keep their default"
            );
            assert_eq!(
                c.clone().check().expect("valid").nats_servers,
                Some(vec![DEFAULT_NATS_URL.to_string()])
            );

            jail.set_env("KVMESH_NODE", "envnode");
            jail.set_env("KVMESH_MAX_HOPS", "5");
            jail.set_env("KVMESH_ROUTES", r#"[{range="*",node="envnode"}]"#);
            let c = load(Some("kv.toml"), Overrides::default()).unwrap();
            assert_eq!(
                (c.node.as_str(), c.listen.as_str(), c.max_hops),
                ("envnode", "127.0.0.1:5000", 5)
            );
            assert_eq!(
                c.clone().check().expect("valid").table.owner_of("zebra"),
                Some("envnode")
            );
            assert_eq!(c.clone().check().expect("valid").nats_servers, None);

            let flags = Overrides {
                node: Some("flagnode".into()),
                listen: Some("127.0.0.1:6000".into()),
                nats_url: Some("nats://a:4222, nats://b:4223".into()),
                ..Overrides::default()
            };
            let c = load(Some("kv.toml"), flags).unwrap();
            assert_eq!(
                (c.node.as_str(), c.listen.as_str()),
                ("flagnode", "127.0.0.1:6000")
            );
            assert_eq!(
                c.clone().check().expect("valid").nats_servers,
                Some(vec![
                    "nats://a:4222".to_string(),
                    "nats://b:4223".to_string()
                ])
            );
            Ok(())
        });
    }

    #[test]
    fn the_file_can_come_from_kvmesh_config() {
        Jail::expect_with(|jail| {
            jail.create_file("other.toml", "node = \"fromenvfile\"")?;
            jail.set_env(CONFIG_ENV, "other.toml");
            assert_eq!(
                load(None, Overrides::default()).unwrap().node,
                "fromenvfile"
            );
            Ok(())
        });
    }

    #[test]
    fn numeric_looking_names_stay_names() {
        Jail::expect_with(|jail| {
            jail.set_env("KVMESH_NODE", "1");
            jail.set_env(
                "KVMESH_NATS_URL",
                "nats://127.0.0.1:4222,nats://127.0.0.1:4223",
            );
            let c = load(None, Overrides::default()).unwrap();
            assert_eq!(c.node, "1");
            assert_eq!(
                c.clone().check().expect("valid").table.owner_of("x"),
                Some("1")
            );
            assert_eq!(
                c.clone()
                    .check()
                    .expect("valid")
                    .nats_servers
                    .map(|s| s.len()),
                Some(2)
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused_with_their_source() {
        let e = error(|jail| {
            jail.create_file("kv.toml", "node = \"a\"\nlisten_addr = \"x\"")?;
            Ok(Some("kv.toml"))
        });
        assert_eq!(e.key, "listen_addr");
        assert_eq!(e.origin, "file kv.toml");
        assert!(e.to_string().contains("unknown key \"listen_addr\""), "{e}");

        let e = error(|jail| {
            jail.set_env("KVMESH_LISTN", "127.0.0.1:1");
            Ok(None)
        });
        assert_eq!(
            (e.key.as_str(), e.origin.as_str()),
            ("listn", "environment variable KVMESH_LISTN")
        );

        let e = error(|jail| {
            jail.create_file(
                "kv.toml",
                "[[routes]]\nrange = \"a\"\nnode = \"local\"\nowner = \"x\"",
            )?;
            Ok(Some("kv.toml"))
        });
        assert_eq!(e.key, "routes[0].owner");
    }

    #[test]
    fn every_bad_value_is_refused_naming_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("node = \"a b\"", "node", "bad node name"),
            ("node = \"\"", "node", "bad node name"),
            ("listen = \"nowhere\"", "listen", "bad address"),
            (
                "nats_url = \"nats://a:4222,,nats://b\"",
                "nats_url",
                "empty server address",
            ),
            ("max_hops = 0", "max_hops", "at least 1"),
            ("max_hops = -1", "max_hops", "invalid"),
            ("max_hops = \"many\"", "max_hops", "invalid type"),
            ("request_timeout_ms = 0", "request_timeout_ms", "at least 1"),
            ("max_connections = 0", "max_connections", "at least 1"),
            ("max_line_bytes = 10", "max_line_bytes", "at least 64"),
            (
                "[[routes]]\nrange = \"a-\"\nnode = \"x\"",
                "routes[0].range",
                "bad range",
            ),
            (
                "[[routes]]\nrange = \"z-a\"\nnode = \"x\"",
                "routes[0].range",
                "backwards",
            ),
            (
                "[[routes]]\nrange = \"a\"\nnode = \"x y\"",
                "routes[0].node",
                "bad node name",
            ),
            (
                "[[routes]]\nrange = \"a-m\"\nnode = \"x\"\n[[routes]]\nrange = \"m-z\"\nnode = \"y\"",
                "routes[1].range",
                "overlaps range a-m",
            ),
            (
                "[[routes]]\nrange = \"*\"\nnode = \"x\"\n[[routes]]\nrange = \"a\"\nnode = \"y\"",
                "routes[1].range",
                "unreachable",
            ),
            (
                "[[routes]]\nnode = \"x\"",
                "routes[0].range",
                "missing field",
            ),
        ];
        for (toml, key, needle) in cases {
            let e = error(|jail| {
                jail.create_file("kv.toml", toml)?;
                Ok(Some("kv.toml"))
            });
            assert_eq!(e.key, *key, "{toml}: {e}");
            assert_eq!(e.origin, "file kv.toml", "{toml}");
            assert!(e.message.contains(needle), "{toml}: {e}");
        }
    }

    #[test]
    fn bad_routes_from_the_environment_name_the_variable() {
        let e = error(|jail| {
            jail.set_env(
                "KVMESH_ROUTES",
                r#"[{range="a-m",node="foo"},{range="k-z",node="bar"}]"#,
            );
            Ok(None)
        });
        assert_eq!(e.key, "routes[1].range");
        assert_eq!(e.origin, "environment variable KVMESH_ROUTES");
    }

    #[test]
    fn an_unreadable_file_is_refused() {
        let e = error(|_| Ok(Some("missing.toml")));
        assert_eq!(e.key, "config");
        assert!(e.message.contains("cannot read"), "{e}");
        let e = error(|jail| {
            jail.create_file("broken.toml", "node = \"x")?;
            Ok(Some("broken.toml"))
        });
        assert!(e.to_string().contains("broken.toml"), "{e}");
    }

    #[test]
    fn flags_are_named_as_flags() {
        Jail::expect_with(|_| {
            let flags = Overrides {
                nats_url: Some("".into()),
                ..Overrides::default()
            };
            let e = load(None, flags).expect_err("empty url");
            assert_eq!(e.origin, "command-line flag --nats-url");
            Ok(())
        });
    }
}
