//! `kvmesh routes show | set FILE | move RANGE NODE`: the live table, read
//! and changed in `kvmesh_routes`. Every change is a compare-and-set on the
//! revision read, so two operators cannot overwrite each other unseen.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::kv;
use figment::Figment;
use figment::providers::{Format, Toml};
use serde::Deserialize;

use super::moves::{from_bytes, ranges};
use super::{HELD_KEY, TABLE_KEY, live, parse_table, table_json};
use crate::config::{DEFAULT_NATS_URL, RouteConfig, Settings, routing_table};
use crate::mesh::Mesh;
use crate::router::{ByteRange, RoutingTable};

/// What `kvmesh routes` is asked to do.
#[derive(Debug, Clone)]
pub enum RoutesCommand {
    /// Print the table in force, with its revision.
    Show,
    /// Replace the table with the `[[routes]]` of a TOML file.
    Set(std::path::PathBuf),
    /// Give a range to a node.
    Move { range: String, node: String },
}

/// A file for `kvmesh routes set`: the entries, and optionally the revision
/// they were read at (as `kvmesh routes show` prints it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    revision: Option<u64>,
    routes: Vec<RouteConfig>,
}

/// Runs a `kvmesh routes` command against the NATS of `settings`; what to
/// print, or the one line saying why it was refused.
pub async fn run(command: RoutesCommand, settings: &Settings) -> Result<String, String> {
    let timeout = Duration::from_millis(settings.config.request_timeout_ms);
    let kv = open_table(settings, timeout).await?;
    match command {
        RoutesCommand::Show => show(&kv).await,
        RoutesCommand::Set(file) => {
            let (table, revision) = read_file(&file)?;
            let revision = match revision {
                Some(r) => r,
                None => current(&kv).await?.1,
            };
            write(&kv, &table, revision).await
        }
        RoutesCommand::Move { range, node } => {
            let range: ByteRange = range.parse().map_err(|e: String| e)?;
            let (table, revision) = current(&kv).await?;
            let moved = give(&table, range, &node)?;
            write(&kv, &moved, revision).await
        }
    }
}

/// For `check-config`: the table in force in JetStream, with its revision,
/// as one comment line (or why it cannot be read now).
pub async fn in_force_line(settings: &Settings) -> String {
    let read = async {
        let kv = open_table(settings, Duration::from_secs(2)).await?;
        current(&kv).await
    };
    match tokio::time::timeout(Duration::from_secs(3), read).await {
        Ok(Ok((table, revision))) => {
            format!("# routes in force: kvmesh_routes revision {revision}: {table}\n")
        }
        Ok(Err(err)) => {
            format!("# routes in force: from kvmesh_routes, not readable now ({err})\n")
        }
        Err(_) => {
            "# routes in force: from kvmesh_routes, not readable now (NATS did not answer)\n".into()
        }
    }
}

/// `kvmesh_routes`, over the NATS of `settings` (the default URL when none
/// is configured).
async fn open_table(settings: &Settings, timeout: Duration) -> Result<kv::Store, String> {
    let servers = settings
        .nats_servers
        .clone()
        .unwrap_or_else(|| vec![DEFAULT_NATS_URL.to_string()]);
    let mesh = Mesh::connect(&servers, &settings.config.node, timeout, &settings.security)
        .await
        .map_err(|e| e.to_string())?;
    if !mesh.is_connected() {
        return Err(format!("cannot reach NATS at {}", servers.join(",")));
    }
    live::context(&mesh.client(), timeout)
        .get_key_value(super::ROUTES_BUCKET)
        .await
        .map_err(|e| format!("cannot open {}: {e}", super::ROUTES_BUCKET))
}

/// The table in force and its revision.
async fn current(kv: &kv::Store) -> Result<(RoutingTable, u64), String> {
    let entry = kv
        .entry(TABLE_KEY)
        .await
        .map_err(|e| format!("cannot read the table: {e}"))?
        .ok_or("no table in kvmesh_routes yet (start a node with routes_from = \"jetstream\")")?;
    let table = parse_table(&entry.value).map_err(|e| format!("the stored table is bad: {e}"))?;
    Ok((table, entry.revision))
}

async fn show(kv: &kv::Store) -> Result<String, String> {
    let (table, revision) = current(kv).await?;
    let mut out = format!(
        "# kvmesh routing table in force (kvmesh_routes, key table)\nrevision = {revision}\n"
    );
    for (range, node) in table.entries() {
        out.push_str(&format!(
            "\n[[routes]]\nrange = \"{range}\"\nnode = \"{node}\"\n"
        ));
    }
    if let Ok(Some(held)) = kv.get(HELD_KEY).await
        && let Ok(held) = parse_table(&held)
    {
        for line in moving(&table, &held) {
            out.push_str(&format!("# moving: {line}\n"));
        }
    }
    Ok(out)
}

/// The moves under way: `g-m from foo to bar`.
fn moving(table: &RoutingTable, held: &RoutingTable) -> Vec<String> {
    let mut runs: Vec<(Vec<u8>, Option<String>, Option<String>)> = Vec::new();
    for b in 0..=255u8 {
        let (owner, holder) = (table.owner_of_byte(b), held.owner_of_byte(b));
        if owner.is_none() || owner == holder {
            continue;
        }
        let (owner, holder) = (owner.map(str::to_owned), holder.map(str::to_owned));
        match runs.last_mut() {
            Some((bytes, h, o)) if *h == holder && *o == owner => bytes.push(b),
            _ => runs.push((vec![b], holder, owner)),
        }
    }
    runs.into_iter()
        .map(|(bytes, holder, owner)| {
            format!(
                "{} from {} to {}",
                ranges(&bytes),
                holder.as_deref().unwrap_or("nobody"),
                owner.as_deref().unwrap_or("nobody")
            )
        })
        .collect()
}

fn read_file(path: &Path) -> Result<(RoutingTable, Option<u64>), String> {
    let file: RoutesFile = Figment::from(Toml::file_exact(path))
        .extract()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let table = routing_table(&file.routes)
        .map_err(|e| format!("{}: {}: {}", path.display(), e.key, e.message))?;
    Ok((table, file.revision))
}

/// `table` with `range` given to `node`, as short as it can be written.
pub fn give(table: &RoutingTable, range: ByteRange, node: &str) -> Result<RoutingTable, String> {
    if !crate::command::valid_node_name(node) {
        return Err(format!(
            "bad node name {node:?}: use letters, digits, '_' and '-'"
        ));
    }
    let (lo, hi) = range.bounds();
    from_bytes(|b| {
        if (lo..=hi).contains(&b) {
            Some(node)
        } else {
            table.owner_of_byte(b)
        }
    })
}

async fn write(kv: &kv::Store, table: &RoutingTable, revision: u64) -> Result<String, String> {
    match kv
        .update(TABLE_KEY, table_json(table).into(), revision)
        .await
    {
        Ok(new) => Ok(format!("routing table revision {new}: {table}\n")),
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
            let now = current(kv)
                .await
                .map(|(_, r)| r.to_string())
                .unwrap_or_else(|_| "unknown".into());
            Err(format!(
                "refused: the table changed since revision {revision} was read (it is at revision {now}); read it again with `kvmesh routes show`"
            ))
        }
        Err(e) => Err(format!("cannot write the table: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_carves_the_range_out_of_its_old_entries() {
        let t = parse_table(br#"[{"range":"a-m","node":"foo"},{"range":"n-z","node":"bar"}]"#)
            .expect("a table");
        let moved = give(&t, "g-p".parse().expect("a range"), "baz").expect("a table");
        assert_eq!(
            table_json(&moved),
            r#"[{"range":"a-f","node":"foo"},{"range":"g-p","node":"baz"},{"range":"q-z","node":"bar"}]"#
        );
        let all = give(&t, ByteRange::ALL, "foo").expect("a table");
        assert_eq!(table_json(&all), r#"[{"range":"*","node":"foo"}]"#);
        assert!(give(&t, "a".parse().expect("a range"), "no way").is_err());
        let held = parse_table(br#"[{"range":"a-z","node":"foo"}]"#).expect("a table");
        assert_eq!(
            moving(&moved, &held),
            ["g-p from foo to baz", "q-z from foo to bar"]
        );
    }
}
