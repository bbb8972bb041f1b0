//! lockstep-receiver: the standby-side daemon. A gRPC server with mutual TLS authenticates
//! agents, maps (agent, source) to configured targets and applies their changes in order.

pub mod applier;
