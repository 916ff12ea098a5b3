//! What `kvmesh check-config` prints: every key with its value and the layer
//! it came from; secrets as `(hidden)`.

use super::{Config, ConfigError, Overrides, layers};
use crate::secret::redact_url;

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
    "durability",
    "replicas",
    "failover_after_ms",
    "idle_timeout_secs",
    "io_uring",
    "routes_from",
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
    let config = Config::load(overrides)?.config;
    let figment = layers::figment(overrides)?;
    let mut values = serde_json::to_value(&config).unwrap_or_default();
    if let Some(urls) = &config.nats_url {
        let shown: Vec<String> = urls.split(',').map(|u| redact_url(u.trim())).collect();
        values["nats_url"] = serde_json::Value::String(shown.join(","));
    }
    let mut out = String::from("# effective kvmesh configuration\n");
    for key in KEYS {
        let source = layers::describe_source(figment.find_metadata(key), key);
        match values.get(*key) {
            Some(value) => out.push_str(&format!("{key} = {}  # {source}\n", toml_value(value))),
            None if *key == "routes" => out.push_str(&format!(
                "# routes: not set: one \"*\" entry for node {:?}\n",
                config.node
            )),
            None => out.push_str(&format!("# {key}: not set\n")),
        }
    }
    out.push_str(&role(&config));
    Ok(out)
}

/// The role a process with this configuration takes, and why.
fn role(config: &Config) -> String {
    let node = &config.node;
    match config.durability {
        super::Durability::Memory => format!(
            "# role: the only process of node {node} (memory: a second process \
             with this name is refused at start)\n"
        ),
        super::Durability::Jetstream => format!(
            "# role: active at once if node {node}'s store names no active process \
             (new, or handed over), else a standby that takes over after {} ms of \
             silence from the active one, or at once when it stops cleanly\n",
            config.failover_after_ms
        ),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RouteConfig, Secret};

    #[test]
    fn check_config_shows_every_key_of_the_configuration() {
        // Every optional key set, so that each one serializes.
        let config = Config {
            nats_url: Some("nats://h:4222".into()),
            idle_timeout_secs: Some(1),
            routes: Some(vec![RouteConfig {
                range: "*".into(),
                node: "n".into(),
            }]),
            nats_user: Some("u".into()),
            nats_password: Some(Secret::new("p")),
            nats_token: Some(Secret::new("t")),
            nats_creds: Some("c".into()),
            nats_nkey: Some("k".into()),
            nats_tls_ca: Some("ca".into()),
            nats_tls_cert: Some("cert".into()),
            nats_tls_key: Some("key".into()),
            ..Config::default()
        };
        let value = serde_json::to_value(&config).expect("serializes");
        let mut fields: Vec<&str> = value
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        let mut keys = KEYS.to_vec();
        fields.sort_unstable();
        keys.sort_unstable();
        assert_eq!(fields, keys, "KEYS must list every key, once");
    }
}
