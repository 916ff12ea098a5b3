//! End-to-end tests: real sockets, real processes. One binary, one harness.

mod harness;
mod hostile;
mod model;
mod nats;

mod batching;
mod bench;
mod chaos;
mod docs;
mod durable;
mod failover;
mod io;
mod mesh;
mod node;
mod ops;
mod process;
mod routes;
mod security;
mod soak;
mod topology;
