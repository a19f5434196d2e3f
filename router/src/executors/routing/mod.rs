//! Choosing a worker for a request among a pool of executors: the contract's block hash, a
//! per-worker index of cached blocks fed by KV-cache events, and the routing policies.
//!
//! Not yet wired into the request path: the pool that owns the workers' `Stats` and event
//! streams fills `WorkerView`s, feeds `KvIndex` and asks a `RoutingPolicy`.

pub mod block_hash;
