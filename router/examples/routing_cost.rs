//! The router's cost of picking a worker for one request, per policy: hashing the prompt's
//! blocks and reading the KV index (kv-aware), or the load counts (least-load, round-robin).
//!
//!     cargo run --release --example routing_cost -- [prompt_tokens] [workers] [blocks_per_worker]
//!
//! Each worker's index holds `blocks_per_worker` blocks (of 16 tokens) from other prompts plus
//! a random share of the measured prompt's leading blocks, as a warm fleet would.

use std::time::Instant;

use tensorgate_router::executors::routing::block_hash::prompt_block_hashes;
use tensorgate_router::executors::routing::kv_index::KvIndex;
use tensorgate_router::executors::routing::policy::{
    build_policy, Prompt, RoutingKind, SharedKvIndex, WorkerView,
};
use tensorgate_router::executors::routing::WorkerId;
use tensorgate_router::pb;

const BLOCK: u32 = 16;

fn stored(id: u64, tokens: &[u32]) -> pb::KvCacheEvent {
    let mut with_last = tokens.to_vec();
    with_last.push(0);
    let hashes = prompt_block_hashes(&with_last, BLOCK as usize);
    pb::KvCacheEvent {
        event_id: id,
        kind: Some(pb::kv_cache_event::Kind::Stored(pb::KvBlocksStored {
            parent_hash: None,
            blocks: hashes
                .iter()
                .zip(tokens.chunks_exact(BLOCK as usize))
                .map(|(h, c)| pb::KvBlock {
                    block_hash: *h,
                    token_ids: c.to_vec(),
                })
                .collect(),
        })),
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let prompt_tokens = args.first().copied().unwrap_or(2048);
    let workers = args.get(1).copied().unwrap_or(4);
    let blocks_per_worker = args.get(2).copied().unwrap_or(50_000);

    let mut index = KvIndex::default();
    let mut seed = 1u64;
    let mut next = || {
        // xorshift: reproducible token ids without a dependency.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % 50_000) as u32
    };
    let prompts: Vec<Vec<u32>> = (0..64)
        .map(|_| (0..prompt_tokens).map(|_| next()).collect())
        .collect();
    for w in 0..workers {
        let mut id = 1;
        // Unrelated conversations of 1,024 tokens fill the worker's index.
        for _ in 0..blocks_per_worker / 64 {
            let other: Vec<u32> = (0..1024).map(|_| next()).collect();
            index.apply(WorkerId(w as u32), &stored(id, &other));
            id += 1;
        }
        for p in &prompts {
            let share = (next() as usize) % (prompt_tokens / BLOCK as usize);
            index.apply(
                WorkerId(w as u32),
                &stored(id, &p[..share * BLOCK as usize]),
            );
            id += 1;
        }
    }
    let index = SharedKvIndex::new(std::sync::RwLock::new(index));
    let views: Vec<WorkerView> = (0..workers)
        .map(|w| WorkerView {
            id: WorkerId(w as u32),
            healthy: true,
            in_flight: w as u32,
            queued_tokens: 100 * w as u64,
            running_tokens: 3,
            block_size: BLOCK,
        })
        .collect();
    println!(
        "prompt {prompt_tokens} tokens, {workers} workers, ~{blocks_per_worker} indexed blocks each"
    );
    for kind in [
        RoutingKind::RoundRobin,
        RoutingKind::LeastLoad,
        RoutingKind::KvAware,
    ] {
        let policy = build_policy(kind, index.clone(), 1.0).expect("policy");
        let rounds = 20_000;
        let start = Instant::now();
        let mut picked = 0u64;
        for i in 0..rounds {
            let mut prompt = Prompt::new(&prompts[i % prompts.len()]);
            picked += u64::from(policy.pick(&views, &mut prompt).map_or(0, |w| w.0));
        }
        let per = start.elapsed().as_secs_f64() / rounds as f64;
        println!(
            "{:<12} {:>8.2} µs per request (checksum {picked})",
            policy.name(),
            per * 1e6
        );
    }
}
