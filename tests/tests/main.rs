//! End-to-end tests: real agent and receiver processes, real certificates, TLS and gRPC on
//! loopback, real files. One integration binary keeps link time down.

mod failures;
mod fs_crash;
mod fs_e2e;
mod fs_meta;
mod pg_e2e;
mod pg_harness;
mod security;
mod sqlite_e2e;
