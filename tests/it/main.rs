//! End-to-end tests: real sockets, real processes. One binary, one harness.

mod harness;

mod bench;
mod node;
mod process;
