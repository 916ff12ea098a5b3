//! Configuration: defaults, then a TOML file, then `KVMESH_*` variables, then flags
//! (the README, Configuration), layered with figment and validated once at start.
//!
//! Every rejection names the key and the layer it came from, so an operator can
//! tell a typo in a file from a stray environment variable.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::{Deserialize, Serialize};

use crate::command::valid_node_name;
use crate::router::{ByteRange, RoutingTable};
pub use crate::secret::Secret;
use crate::secret::{option_scalar_as_string, redact_url, scalar_as_string};

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
    /// Close a TCP connection that sends nothing for this long; unset: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
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
            idle_timeout_secs: None,
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
    /// Loads the layers in order (defaults, file, `KVMESH_*`, flags) and validates.
    pub fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
        let figment = Self::figment(overrides)?;
        let config: Config = figment
            .extract()
            .map_err(|err| from_figment(&figment, err))?;
        config.validate().map_err(|invalid| ConfigError {
            origin: describe_source(figment.find_metadata(&invalid.top_key), &invalid.top_key),
            key: invalid.key,
            message: invalid.message,
        })?;
        Ok(config)
    }

    /// The layered sources, before extraction.
    pub fn figment(overrides: &Overrides) -> Result<Figment, ConfigError> {
        let mut figment = Figment::from(Layer::new(
            Metadata::named("built-in default"),
            Serialized::defaults(Config::default()),
        ));
        let file = overrides
            .config_file
            .clone()
            .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from));
        if let Some(path) = file {
            check_readable(&path)?;
            figment = figment.merge(Toml::file_exact(path));
        }
        let env = Env::prefixed("KVMESH_").ignore(&["config", "log_format"]);
        figment = figment.merge(env);
        let flags =
            Metadata::named("command-line flag").interpolater(|_: &Profile, keys: &[&str]| {
                format!("--{}", keys.join(".").replace('_', "-"))
            });
        Ok(figment.merge(Layer::new(flags, Serialized::defaults(overrides))))
    }

    /// Checks every value, and returns the routing table it describes.
    pub fn validate(&self) -> Result<RoutingTable, Invalid> {
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
        if let Some(urls) = &self.nats_url {
            nats_servers(urls).map_err(|m| Invalid::at("nats_url", m))?;
        }
        for &(key, min, max) in RANGES {
            let value = self.numeric(key);
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
        Ok(table)
    }

    /// The value of a numeric key of [`RANGES`] (an unset optional key counts
    /// as its smallest allowed value).
    fn numeric(&self, key: &str) -> u64 {
        match key {
            "request_timeout_ms" => self.request_timeout_ms,
            "max_hops" => u64::from(self.max_hops),
            "max_line_bytes" => self.max_line_bytes as u64,
            "max_value_bytes" => self.max_value_bytes as u64,
            "max_connections" => self.max_connections as u64,
            "max_buckets" => self.max_buckets as u64,
            "idle_timeout_secs" => self.idle_timeout_secs.unwrap_or(1),
            _ => 0,
        }
    }

    fn check_security(&self) -> Result<(), Invalid> {
        match (&self.nats_user, &self.nats_password) {
            (Some(_), None) => {
                return Err(Invalid::at(
                    "nats_password",
                    "nats_user needs nats_password",
                ));
            }
            (None, Some(_)) => {
                return Err(Invalid::at("nats_user", "nats_password needs nats_user"));
            }
            _ => {}
        }
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
        match (&self.nats_tls_cert, &self.nats_tls_key) {
            (Some(_), None) => {
                return Err(Invalid::at(
                    "nats_tls_key",
                    "nats_tls_cert needs nats_tls_key",
                ));
            }
            (None, Some(_)) => {
                return Err(Invalid::at(
                    "nats_tls_cert",
                    "nats_tls_key needs nats_tls_cert",
                ));
            }
            _ => {}
        }
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
    pub fn routing_table(&self) -> Result<RoutingTable, Invalid> {
        let Some(routes) = &self.routes else {
            return Ok(RoutingTable::catch_all(&self.node));
        };
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

    /// The NATS servers to connect to, or `None` when this node needs no NATS:
    /// `nats_url` when set, else the default URL when the table names other nodes.
    pub fn nats_servers(&self) -> Option<Vec<String>> {
        match &self.nats_url {
            Some(urls) => nats_servers(urls).ok(),
            None => self
                .routes
                .iter()
                .flatten()
                .any(|route| route.node != self.node)
                .then(|| vec![DEFAULT_NATS_URL.to_string()]),
        }
    }
}

/// Every numeric key with its smallest and largest allowed value. The upper
/// bounds keep each setting where the code that uses it stays correct (a
/// semaphore's permits, a deadline that must not overflow) and are far above
/// any sensible value.
const RANGES: &[(&str, u64, u64)] = &[
    ("request_timeout_ms", 1, 86_400_000),
    ("max_hops", 1, 255),
    ("max_line_bytes", 64, 1 << 30),
    ("max_value_bytes", 1, 64 << 20),
    ("max_connections", 1, 10_000_000),
    ("max_buckets", 1, 1 << 32),
    ("idle_timeout_secs", 1, 31_536_000),
];

/// Every key, in the order `check-config` shows them.
const KEYS: &[&str] = &[
    "node",
    "listen",
    "nats_url",
    "request_timeout_ms",
    "max_hops",
    "max_line_bytes",
    "max_value_bytes",
    "max_connections",
    "max_buckets",
    "idle_timeout_secs",
    "nats_user",
    "nats_password",
    "nats_token",
    "nats_creds",
    "nats_nkey",
    "nats_tls_ca",
    "nats_tls_cert",
    "nats_tls_key",
    "routes",
];

/// The effective configuration as TOML, each key followed by the layer it came
/// from; secrets show as `(hidden)`. Fails like [`Config::load`].
pub fn describe(overrides: &Overrides) -> Result<String, ConfigError> {
    let config = Config::load(overrides)?;
    let figment = Config::figment(overrides)?;
    let mut values = serde_json::to_value(&config).unwrap_or_default();
    if let Some(urls) = &config.nats_url {
        let shown: Vec<String> = urls.split(',').map(|u| redact_url(u.trim())).collect();
        values["nats_url"] = serde_json::Value::String(shown.join(","));
    }
    let mut out = String::from("# effective kvmesh configuration\n");
    for key in KEYS {
        let source = describe_source(figment.find_metadata(key), key);
        match values.get(*key) {
            Some(value) => out.push_str(&format!("{key} = {}  # {source}\n", toml_value(value))),
            None if *key == "routes" => out.push_str(&format!(
                "# routes: not set: one \"*\" entry for node {:?}\n",
                config.node
            )),
            None => out.push_str(&format!("# {key}: not set\n")),
        }
    }
    Ok(out)
}

/// Writes a JSON value as an inline TOML value.
fn toml_value(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(toml_value).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(fields) => {
            let fields: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{k} = {}", toml_value(v)))
                .collect();
            format!("{{ {} }}", fields.join(", "))
        }
        other => other.to_string(),
    }
}

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
pub fn nats_servers(urls: &str) -> Result<Vec<String>, String> {
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

fn check_readable(path: &Path) -> Result<(), ConfigError> {
    std::fs::read(path).map(drop).map_err(|e| ConfigError {
        key: "config".into(),
        origin: format!("file {}", path.display()),
        message: format!("cannot read the configuration file: {e}"),
    })
}

/// Turns figment's error into ours, naming the key and the layer that set it.
fn from_figment(figment: &Figment, err: figment::Error) -> ConfigError {
    let mut path = err.path.clone();
    let field = match &err.kind {
        figment::error::Kind::UnknownField(field, _) => Some(field.to_string()),
        figment::error::Kind::MissingField(field) => Some(field.to_string()),
        _ => None,
    };
    if let Some(field) = field
        && path.last() != Some(&field)
    {
        path.push(field);
    }
    let key = display_key(&path);
    let top = path.first().cloned().unwrap_or_default();
    let metadata = figment.find_metadata(&top).or(err.metadata.as_ref());
    let message = match &err.kind {
        figment::error::Kind::UnknownField(field, _) => format!("unknown key {field:?}"),
        other => other.to_string(),
    };
    ConfigError {
        origin: describe_source(metadata, &top),
        key,
        message,
    }
}

/// `["routes", "1", "range"]` → `routes[1].range`.
fn display_key(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if part.parse::<usize>().is_ok() {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}

fn describe_source(metadata: Option<&Metadata>, top_key: &str) -> String {
    let Some(md) = metadata else {
        return "unknown source".into();
    };
    match &md.source {
        Some(Source::File(path)) => format!("file {}", path.display()),
        _ if md.name.contains("environment") => {
            format!(
                "environment variable KVMESH_{}",
                top_key.to_ascii_uppercase()
            )
        }
        _ if md.name == "command-line flag" => {
            format!(
                "command-line flag {}",
                md.interpolate(&Profile::Default, &[top_key])
            )
        }
        _ => md.name.to_string(),
    }
}

/// A provider with our own metadata around serialized values, so that errors name
/// the layer the way an operator would ("command-line flag --node").
struct Layer {
    metadata: Metadata,
    inner: Serialized<Dict>,
}

impl Layer {
    fn new<T: Serialize>(metadata: Metadata, values: Serialized<T>) -> Self {
        let dict = values
            .data()
            .ok()
            .and_then(|mut m| m.remove(&Profile::Default))
            .unwrap_or_default();
        Self {
            metadata,
            inner: Serialized::defaults(dict),
        }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.inner.data()
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
                c.routing_table().unwrap().owner_of("anything"),
                Some("local")
            );
            assert_eq!(c.nats_servers(), None);
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
            assert_eq!(c.nats_servers(), Some(vec![DEFAULT_NATS_URL.to_string()]));

            jail.set_env("KVMESH_NODE", "envnode");
            jail.set_env("KVMESH_MAX_HOPS", "5");
            jail.set_env("KVMESH_ROUTES", r#"[{range="*",node="envnode"}]"#);
            let c = load(Some("kv.toml"), Overrides::default()).unwrap();
            assert_eq!(
                (c.node.as_str(), c.listen.as_str(), c.max_hops),
                ("envnode", "127.0.0.1:5000", 5)
            );
            assert_eq!(
                c.routing_table().unwrap().owner_of("zebra"),
                Some("envnode")
            );
            assert_eq!(c.nats_servers(), None);

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
                c.nats_servers(),
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
            assert_eq!(c.routing_table().unwrap().owner_of("x"), Some("1"));
            assert_eq!(c.nats_servers().map(|s| s.len()), Some(2));
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
