//! Checking a configuration, once: what comes out is [`Settings`], with the
//! routing table built, the server addresses split and checked, and the NATS
//! security resolved, which the node takes as they are.

use std::fmt;

use super::{Config, DEFAULT_NATS_URL, Durability, RoutesFrom};
use crate::command::valid_node_name;
use crate::mesh::Security;
use crate::router::{ByteRange, RoutingTable};
use crate::secret::redact_url;

/// A configuration that passed every check, in the form the node uses.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The values as configured.
    pub config: Config,
    /// The routing table.
    pub table: RoutingTable,
    /// The NATS servers to connect to, or `None` when this node needs no
    /// NATS: `nats_url` when set, else the default URL when the table names
    /// other nodes.
    pub nats_servers: Option<Vec<String>>,
    /// How to authenticate to NATS and secure the connection.
    pub security: Security,
}

impl Config {
    /// Checks every value, once, and gives the settings the node runs with.
    pub fn check(self) -> Result<Settings, Invalid> {
        if !valid_node_name(&self.node) {
            return Err(Invalid::at(
                "node",
                format!(
                    "bad node name {:?}: use letters, digits, '_' and '-'",
                    self.node
                ),
            ));
        }
        check_listen(&self.listen).map_err(|m| Invalid::at("listen", m))?;
        // NATS is needed to reach other nodes, and for a durable store.
        let nats_servers = match &self.nats_url {
            Some(urls) => Some(nats_servers(urls).map_err(|m| Invalid::at("nats_url", m))?),
            None => (self.durability == Durability::Jetstream
                || self.routes_from == RoutesFrom::Jetstream
                || self
                    .routes
                    .iter()
                    .flatten()
                    .any(|route| route.node != self.node))
            .then(|| vec![DEFAULT_NATS_URL.to_string()]),
        };
        for &(key, value_of, min, max) in RANGES {
            let value = value_of(&self);
            if value < min {
                return Err(Invalid::at(
                    key,
                    format!("must be at least {min}, not {value}"),
                ));
            }
            if value > max {
                return Err(Invalid::at(
                    key,
                    format!("must be at most {max}, not {value}"),
                ));
            }
        }
        let table = self.routing_table()?;
        self.check_security()?;
        Ok(Settings {
            table,
            nats_servers,
            security: self.security(),
            config: self,
        })
    }

    /// The NATS security settings.
    fn security(&self) -> Security {
        Security {
            user_password: self.nats_user.clone().zip(self.nats_password.clone()),
            token: self.nats_token.clone(),
            creds_file: self.nats_creds.clone(),
            nkey_file: self.nats_nkey.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_client: self.nats_tls_cert.clone().zip(self.nats_tls_key.clone()),
        }
    }

    fn check_security(&self) -> Result<(), Invalid> {
        both(
            ("nats_user", self.nats_user.is_some()),
            ("nats_password", self.nats_password.is_some()),
        )?;
        let methods: Vec<&str> = [
            ("nats_user", self.nats_user.is_some()),
            ("nats_token", self.nats_token.is_some()),
            ("nats_creds", self.nats_creds.is_some()),
            ("nats_nkey", self.nats_nkey.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect();
        if methods.len() > 1 {
            return Err(Invalid::at(
                methods[1],
                format!(
                    "choose one way to authenticate, not {}",
                    methods.join(" and ")
                ),
            ));
        }
        both(
            ("nats_tls_cert", self.nats_tls_cert.is_some()),
            ("nats_tls_key", self.nats_tls_key.is_some()),
        )?;
        for (key, path) in [
            ("nats_creds", &self.nats_creds),
            ("nats_nkey", &self.nats_nkey),
            ("nats_tls_ca", &self.nats_tls_ca),
            ("nats_tls_cert", &self.nats_tls_cert),
            ("nats_tls_key", &self.nats_tls_key),
        ] {
            if let Some(path) = path {
                std::fs::metadata(path).map_err(|e| {
                    Invalid::at(key, format!("cannot read {}: {e}", path.display()))
                })?;
            }
        }
        Ok(())
    }

    /// The routing table: the configured one, or one catch-all entry for this node.
    fn routing_table(&self) -> Result<RoutingTable, Invalid> {
        match &self.routes {
            Some(routes) => routing_table(routes),
            None => Ok(RoutingTable::catch_all(&self.node)),
        }
    }
}

/// A table from `[[routes]]` entries, checked by the configuration's rules;
/// the error names the entry and field (`routes[1].range`).
pub fn routing_table(routes: &[super::RouteConfig]) -> Result<RoutingTable, Invalid> {
    {
        let mut entries = Vec::with_capacity(routes.len());
        for (i, route) in routes.iter().enumerate() {
            let range: ByteRange = route
                .range
                .parse()
                .map_err(|m| Invalid::route(i, "range", m))?;
            entries.push((range, route.node.clone()));
        }
        RoutingTable::new(entries).map_err(|e| {
            let field = if e.message.starts_with("bad node name") {
                "node"
            } else {
                "range"
            };
            Invalid::route(e.index, field, e.message)
        })
    }
}

/// Two keys that go together: both set or neither.
fn both((a, a_set): (&str, bool), (b, b_set): (&str, bool)) -> Result<(), Invalid> {
    match (a_set, b_set) {
        (true, false) => Err(Invalid::at(b, format!("{a} needs {b}"))),
        (false, true) => Err(Invalid::at(a, format!("{b} needs {a}"))),
        _ => Ok(()),
    }
}

/// Every numeric key with its smallest and largest allowed value. The upper
/// bounds keep each setting where the code that uses it stays correct (a
/// semaphore's permits, a deadline that must not overflow) and are far above
/// any sensible value.
/// (An unset optional key counts as its smallest allowed value.)
#[allow(clippy::type_complexity)]
const RANGES: &[(&str, fn(&Config) -> u64, u64, u64)] = &[
    (
        "request_timeout_ms",
        |c| c.request_timeout_ms,
        1,
        86_400_000,
    ),
    ("max_hops", |c| u64::from(c.max_hops), 1, 255),
    ("max_line_bytes", |c| c.max_line_bytes as u64, 64, 1 << 30),
    ("max_value_bytes", |c| c.max_value_bytes as u64, 1, 64 << 20),
    (
        "max_connections",
        |c| c.max_connections as u64,
        1,
        10_000_000,
    ),
    ("max_buckets", |c| c.max_buckets as u64, 1, 1 << 32),
    ("replicas", |c| u64::from(c.replicas), 1, 5),
    ("failover_after_ms", |c| c.failover_after_ms, 200, 3_600_000),
    (
        "idle_timeout_secs",
        |c| c.idle_timeout_secs.unwrap_or(1),
        1,
        31_536_000,
    ),
];

/// A failed check of an extracted configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The full key, e.g. `routes[1].range`.
    pub key: String,
    /// The top-level key, for finding the layer that set it.
    pub top_key: String,
    /// What is wrong.
    pub message: String,
}

impl Invalid {
    fn at(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            top_key: key.into(),
            message: message.into(),
        }
    }

    fn route(index: usize, field: &str, message: impl Into<String>) -> Self {
        Self {
            key: format!("routes[{index}].{field}"),
            top_key: "routes".into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}: {}", self.key, self.message)
    }
}

impl std::error::Error for Invalid {}

/// Splits a comma-separated `nats_url` into server addresses, checking each.
fn nats_servers(urls: &str) -> Result<Vec<String>, String> {
    let servers: Vec<String> = urls.split(',').map(str::trim).map(str::to_owned).collect();
    for server in &servers {
        if server.is_empty() {
            return Err(format!("empty server address in {urls:?}"));
        }
        // The NATS client would ignore them, and fail to authenticate forever.
        if server.contains('@') {
            return Err(format!(
                "credentials in a server address ({}) are not used: \
                 set nats_user and nats_password, or nats_token, instead",
                redact_url(server)
            ));
        }
        server
            .parse::<async_nats::ServerAddr>()
            .map_err(|e| format!("bad server address {:?}: {e}", redact_url(server)))?;
    }
    Ok(servers)
}

fn check_listen(listen: &str) -> Result<(), String> {
    if listen.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    match listen.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!(
            "bad address {listen:?}: use host:port, like 127.0.0.1:4040"
        )),
    }
}
