//! The routing table in force, and how it changes.
//!
//! With `routes_from = "config"` the table is the configuration's, fixed at
//! start. With `routes_from = "jetstream"` it is the JSON under the key
//! `table` of the JetStream KV bucket `kvmesh_routes`, followed live
//! (`live.rs`); when a change gives a byte range to another node, that
//! range's buckets move to it (`moves.rs`). The same bucket keeps, under the
//! key `held`, which node holds each byte's buckets now: a byte whose owner
//! in `table` is not its holder in `held` is moving. `kvmesh routes`
//! (`cli.rs`) reads and changes the table.
//!
//! How a node serves the buckets of one byte follows from both:
//!
//! | owner (table) | holder (held) | this node                                   |
//! |---------------|---------------|---------------------------------------------|
//! | this node     | this node     | serves them                                 |
//! | this node     | another       | imports them; requests wait for the move     |
//! | another       | this node     | exports them, sealed; forwards requests     |
//! | another       | another       | forwards requests; keeps none of them       |

pub mod cli;
mod json;
pub(crate) mod live;
pub(crate) mod moves;

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use tokio::sync::watch;

use crate::router::RoutingTable;

pub use json::{TableJson, parse_table, table_json};

/// The KV bucket holding the live table.
pub const ROUTES_BUCKET: &str = "kvmesh_routes";

/// The key of the table in force.
pub const TABLE_KEY: &str = "table";

/// The key saying which node holds each byte's buckets.
pub const HELD_KEY: &str = "held";

/// How this node serves the buckets starting with one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// Here.
    Local,
    /// Here once they have moved in; until then requests wait.
    Importing,
    /// On the owner, through the mesh.
    Remote,
    /// Nowhere: no entry covers the byte.
    NoRoute,
}

/// One version of the routing state.
#[derive(Debug)]
pub struct RouteState {
    /// The KV revision of the table (0: the configuration's).
    pub revision: u64,
    /// Who owns each byte.
    pub table: RoutingTable,
    /// Who holds each byte's buckets now.
    pub held: RoutingTable,
    serve: [Serve; 256],
}

impl RouteState {
    /// The state of node `me` under `table`, with the buckets held as `held`.
    pub fn new(me: &str, revision: u64, table: RoutingTable, held: RoutingTable) -> Self {
        let serve = std::array::from_fn(|b| {
            let b = b as u8;
            match table.owner_of_byte(b) {
                None => Serve::NoRoute,
                Some(owner) if owner == me => {
                    if held.owner_of_byte(b) == Some(me) {
                        Serve::Local
                    } else {
                        Serve::Importing
                    }
                }
                Some(_) => Serve::Remote,
            }
        });
        Self {
            revision,
            table,
            held,
            serve,
        }
    }

    /// How the buckets starting with `first` are served.
    #[inline]
    pub fn serve(&self, first: u8) -> Serve {
        self.serve[first as usize]
    }

    /// The bytes this node is importing, if any.
    pub fn importing(&self) -> Vec<u8> {
        (0..=255u8)
            .filter(|b| self.serve(*b) == Serve::Importing)
            .collect()
    }
}

/// The routing state in force, swapped whole when the table or the holders
/// change; readers never wait.
pub struct Routes {
    me: Arc<str>,
    state: ArcSwap<RouteState>,
    changed: watch::Sender<u64>,
}

impl Routes {
    /// Routes starting from `table`, every byte held by its owner: fixed
    /// for good, or until the live table is read (`live.rs`).
    pub fn new(me: &str, table: RoutingTable) -> Arc<Self> {
        let state = RouteState::new(me, 0, table.clone(), table);
        Arc::new(Self {
            me: Arc::from(me),
            state: ArcSwap::from_pointee(state),
            changed: watch::Sender::new(0),
        })
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The state in force now.
    #[inline]
    pub fn load(&self) -> Guard<Arc<RouteState>> {
        self.state.load()
    }

    /// The state in force now, to keep.
    pub fn current(&self) -> Arc<RouteState> {
        self.state.load_full()
    }

    /// Puts a new table and holders in force.
    pub fn set(&self, revision: u64, table: RoutingTable, held: RoutingTable) {
        self.state
            .store(Arc::new(RouteState::new(&self.me, revision, table, held)));
        self.changed.send_modify(|n| *n += 1);
    }

    /// A receiver told of every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(json: &str) -> RoutingTable {
        parse_table(json.as_bytes()).expect("a table")
    }

    #[test]
    fn owner_and_holder_decide_how_a_byte_is_served() {
        let t = table(r#"[{"range":"a-m","node":"foo"},{"range":"n-z","node":"bar"}]"#);
        let h = table(r#"[{"range":"a-f","node":"foo"},{"range":"g-z","node":"bar"}]"#);
        let foo = RouteState::new("foo", 3, t.clone(), h.clone());
        assert_eq!(foo.serve(b'a'), Serve::Local);
        assert_eq!(foo.serve(b'g'), Serve::Importing);
        assert_eq!(foo.serve(b'n'), Serve::Remote);
        assert_eq!(foo.serve(b'A'), Serve::NoRoute);
        assert_eq!(foo.importing(), (b'g'..=b'm').collect::<Vec<_>>());
        let bar = RouteState::new("bar", 3, t, h);
        assert_eq!(bar.serve(b'g'), Serve::Remote);
        assert_eq!(bar.serve(b'n'), Serve::Local);
    }
}
