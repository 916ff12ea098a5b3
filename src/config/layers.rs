//! The layers of a configuration (built-in defaults, a TOML file, `KVMESH_*`
//! variables, flags) and, for every key, the layer that set it.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::Serialize;

use super::{CONFIG_ENV, Config, ConfigError, Overrides};

/// The layered sources, before extraction.
pub(super) fn figment(overrides: &Overrides) -> Result<Figment, ConfigError> {
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
    let flags = Metadata::named("command-line flag").interpolater(|_: &Profile, keys: &[&str]| {
        format!("--{}", keys.join(".").replace('_', "-"))
    });
    Ok(figment.merge(Layer::new(flags, Serialized::defaults(overrides))))
}

fn check_readable(path: &Path) -> Result<(), ConfigError> {
    std::fs::read(path).map(drop).map_err(|e| ConfigError {
        key: "config".into(),
        origin: format!("file {}", path.display()),
        message: format!("cannot read the configuration file: {e}"),
    })
}

/// Turns figment's error into ours, naming the key and the layer that set it.
pub(super) fn from_figment(figment: &Figment, err: figment::Error) -> ConfigError {
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

pub(super) fn describe_source(metadata: Option<&Metadata>, top_key: &str) -> String {
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
