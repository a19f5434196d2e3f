//! Choosing a worker for a request among a pool of executors: the contract's block hash, a
//! per-worker index of cached blocks fed by KV-cache events, and the routing policies.
//!
//! Not yet wired into the request path: the pool that owns the workers' `Stats` and event
//! streams fills `WorkerView`s, feeds `KvIndex` and asks a `RoutingPolicy`.

use std::fmt;

pub mod block_hash;
pub mod kv_aware;
pub mod kv_index;
pub mod least_load;
pub mod policy;
pub mod round_robin;

/// A worker of the pool, named by a small number the pool hands out (stable while the worker
/// is a member; a worker that rejoins may get a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u32);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {}", self.0)
    }
}
