//! Generated `lockstep.v1` protobuf messages and gRPC stubs. Convert to domain types (see
//! `event`) with `TryFrom` at the boundary; nothing outside this module should hand-build
//! wire bytes.
#![allow(missing_docs, clippy::all, unreachable_pub)]

tonic::include_proto!("lockstep.v1");
