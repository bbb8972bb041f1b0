//! lockstep-agent: the source-side daemon. Sources capture changes into the journal; one
//! shipper per receiver streams the journal over gRPC + mutual TLS and tracks acknowledgements.

pub mod journal;
pub mod source;
