//! kvmesh: a distributed, in-memory key-value store with a line-based text
//! protocol, whose nodes meet over NATS.
//!
//! One request takes one path, and every path ends in the same value:
//!
//! ```text
//! nc ─line─▶ server ─▶ protocol::parse ─▶ Command ─▶ router.target
//!                                          owner is me │ owner is another node
//!                                    registry.apply ◀──┴──▶ mesh.forward(owner) ── NATS kv.node.<owner>
//!                                                           (one queue per owner)   (owner: serve loop ─▶ router.start, hops+1)
//!                               Result<Reply, KvError> ◀─────────────┘
//!                                          │
//!                   protocol::write_result ─line─▶ nc      serde_json ─▶ NATS reply
//! ```
//!
//! Dependencies point one way: `node → server/config → router → mesh,
//! protocol, registry → wire, command, error`; the mesh's serve loop reaches the
//! router only through the `Handler` that `node.rs` gives it.

// Nothing that comes from outside the process may panic the node; an
// `unwrap` on it would. (Tests may unwrap.)
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod bench;
mod command;
pub mod config;
mod error;
#[cfg(test)]
mod fuzz;
mod mesh;
mod node;
pub mod ping;
mod protocol;
mod registry;
pub mod rng;
mod router;
pub mod routes;
mod secret;
mod server;
mod store;
mod wire;

pub use config::{Config, ConfigError, Overrides, Settings};
pub use mesh::{MeshError, round_trip};
pub use node::{Node, StartError};
pub use router::RoutingTable;
