//! A table as JSON: `[{"range":"a-m","node":"foo"},...]`, the form kept in
//! `kvmesh_routes` (both `table` and `held`).

use serde::{Deserialize, Serialize};

use crate::router::{ByteRange, RoutingTable};

/// One entry, as JSON holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableJson {
    pub range: String,
    pub node: String,
}

/// Reads and checks a table (the rules of the configuration's `routes`);
/// the error names the entry at fault.
pub fn parse_table(json: &[u8]) -> Result<RoutingTable, String> {
    let entries: Vec<TableJson> =
        serde_json::from_slice(json).map_err(|e| format!("not a table: {e}"))?;
    let mut parsed = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let range: ByteRange = entry
            .range
            .parse()
            .map_err(|e: String| format!("entry {i}: {e}"))?;
        parsed.push((range, entry.node));
    }
    RoutingTable::new(parsed).map_err(|e| format!("entry {}: {}", e.index, e.message))
}

/// A table as JSON.
pub fn table_json(table: &RoutingTable) -> String {
    let entries: Vec<TableJson> = table
        .entries()
        .map(|(range, node)| TableJson {
            range: range.to_string(),
            node: node.to_owned(),
        })
        .collect();
    serde_json::to_string(&entries).unwrap_or_else(|_| "[]".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_read_and_write_as_json() {
        let json = r#"[{"range":"a-m","node":"foo"},{"range":"n-z","node":"bar"},{"range":"*","node":"baz"}]"#;
        let table = parse_table(json.as_bytes()).expect("a table");
        assert_eq!(table.owner_of("apple"), Some("foo"));
        assert_eq!(table.owner_of("Zed"), Some("baz"));
        assert_eq!(table_json(&table), json);
        for (bad, why) in [
            ("{}", "not a table"),
            ("[{\"range\":\"a-m\"}]", "not a table"),
            (
                "[{\"range\":\"a-m\",\"node\":\"foo\",\"x\":1}]",
                "not a table",
            ),
            ("[{\"range\":\"m-a\",\"node\":\"foo\"}]", "entry 0: range"),
            (
                "[{\"range\":\"a-m\",\"node\":\"foo\"},{\"range\":\"m\",\"node\":\"bar\"}]",
                "entry 1: range m overlaps",
            ),
            (
                "[{\"range\":\"a\",\"node\":\"a b\"}]",
                "entry 0: bad node name",
            ),
        ] {
            let err = parse_table(bad.as_bytes()).expect_err(bad);
            assert!(err.starts_with(why), "{bad}: {err}");
        }
    }
}
