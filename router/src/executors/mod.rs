//! The executor side: the gRPC client of one executor (its generation stream and its
//! rollout-control RPCs) and the admission scheduler that decides what enters it.

pub mod client;
pub mod control;
pub mod routing;
pub mod scheduler;
#[cfg(test)]
pub mod testing;
