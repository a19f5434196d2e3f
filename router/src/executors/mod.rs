//! The executor side: the pool of executors (routing, health, migration, discovery), the
//! gRPC client of one executor (its generation stream and its rollout-control RPCs) and the
//! admission scheduler that decides what enters the pool.

pub mod client;
pub mod control;
pub mod discovery;
pub mod endpoint;
pub mod migration;
pub mod pool;
pub mod routing;
pub mod scheduler;
#[cfg(test)]
pub mod testing;
