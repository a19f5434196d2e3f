//! KV-aware routing: the healthy worker where the request costs least, counting the prompt
//! tokens it would have to prefill again and the work already waiting on it:
//!
//! ```text
//! cost(w) = prompt_tokens - matched_blocks(w) * block_size(w)          prefill recomputed
//!         + load_weight * (queued_tokens(w) + running_tokens(w))      load
//! ```
//!
//! `matched_blocks(w)` is the count of the prompt's leading usable blocks (at most
//! `(prompt_tokens - 1) / block_size`) that the index says `w` holds. Both terms are tokens;
//! `load_weight` (default 1) says how much a token of load weighs against a token of prefill,
//! as Dynamo's router weighs prefill blocks against active decode blocks. The pool fills the
//! load from its own counts: the prompt tokens of the requests sent to `w` that have not had
//! their first token (prefill ahead of this one) and one token per sequence `w` is decoding
//! (what each step of `w` processes for them). Ties go round.

use std::sync::PoisonError;

use super::policy::{
    InvalidLoadWeight, Prompt, RoutingPolicy, SharedKvIndex, TieBreak, WorkerView,
};
use super::WorkerId;

#[derive(Debug)]
pub struct KvAware {
    index: SharedKvIndex,
    load_weight: f64,
    ties: TieBreak,
}

impl KvAware {
    pub const DEFAULT_LOAD_WEIGHT: f64 = 1.0;

    pub fn new(index: SharedKvIndex, load_weight: f64) -> Result<Self, InvalidLoadWeight> {
        if !load_weight.is_finite() || load_weight < 0.0 {
            return Err(InvalidLoadWeight(load_weight));
        }
        Ok(Self {
            index,
            load_weight,
            ties: TieBreak::default(),
        })
    }

    /// The cost above, for a prompt of `prompt_tokens` of which `matched_blocks` are cached.
    pub fn cost(&self, worker: &WorkerView, prompt_tokens: usize, matched_blocks: usize) -> f64 {
        let cached = matched_blocks.saturating_mul(worker.block_size as usize);
        let recomputed = prompt_tokens.saturating_sub(cached);
        recomputed as f64 + self.load_weight * worker.load_tokens() as f64
    }
}

impl RoutingPolicy for KvAware {
    fn name(&self) -> &'static str {
        "kv-aware"
    }

    fn pick(&self, workers: &[WorkerView], prompt: &mut Prompt<'_>) -> Option<WorkerId> {
        let mut scored: Vec<(WorkerId, f64)> = Vec::with_capacity(workers.len());
        // Hash before taking the lock, so that event writers never wait on it.
        for worker in workers.iter().filter(|w| w.healthy && w.block_size > 0) {
            prompt.block_hashes(worker.block_size);
        }
        {
            // A writer that panicked left a usable index (each event is applied whole or the
            // worker is dropped), so a poisoned lock is read through.
            let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
            for worker in workers.iter().filter(|w| w.healthy) {
                let matched = if worker.block_size == 0 {
                    0
                } else {
                    index.matched_prefix_blocks(worker.id, prompt.block_hashes(worker.block_size))
                };
                scored.push((worker.id, self.cost(worker, prompt.len(), matched)));
            }
        }
        self.ties.best(&scored, f64::total_cmp)
    }

    fn expected_cached_tokens(&self, worker: &WorkerView, prompt: &mut Prompt<'_>) -> usize {
        if worker.block_size == 0 {
            return 0;
        }
        let hashes = prompt.block_hashes(worker.block_size);
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        index.matched_prefix_blocks(worker.id, hashes) * worker.block_size as usize
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;
    use crate::executors::routing::block_hash::prompt_block_hashes;
    use crate::executors::routing::policy::tests::worker;
    use crate::pb;
    use crate::pb::kv_cache_event::Kind;

    /// Stores the first `blocks` full blocks of `tokens` (block size `size`) on `worker`, as an
    /// engine hashing the contract's way publishes them, under event id `id`.
    fn store(
        index: &SharedKvIndex,
        worker: WorkerId,
        id: u64,
        tokens: &[u32],
        size: u32,
        blocks: usize,
    ) {
        // The hashes of the first `blocks` blocks, whichever block holds the last token.
        let mut with_one_more = tokens[..(blocks * size as usize).min(tokens.len())].to_vec();
        with_one_more.push(0);
        let hashes = prompt_block_hashes(&with_one_more, size as usize);
        let event = pb::KvCacheEvent {
            event_id: id,
            kind: Some(Kind::Stored(pb::KvBlocksStored {
                parent_hash: None,
                blocks: hashes
                    .iter()
                    .zip(tokens.chunks_exact(size as usize))
                    .map(|(hash, chunk)| pb::KvBlock {
                        block_hash: *hash,
                        token_ids: chunk.to_vec(),
                    })
                    .collect(),
            })),
        };
        index.write().unwrap().apply(worker, &event);
    }

    #[test]
    fn the_cached_prefix_wins_until_load_outweighs_it() {
        let index = SharedKvIndex::default();
        let tokens: Vec<u32> = (0..41).collect(); // 10 usable blocks of 4
        store(&index, WorkerId(1), 1, &tokens, 4, 10);
        let kv = KvAware::new(index.clone(), KvAware::DEFAULT_LOAD_WEIGHT).unwrap();
        let mut workers = vec![worker(0), worker(1)];
        let mut prompt = Prompt::new(&tokens);
        // Worker 1 recomputes 1 token, worker 0 all 41.
        assert_eq!(kv.cost(&workers[1], 41, 10), 1.0);
        assert_eq!(kv.pick(&workers, &mut prompt), Some(WorkerId(1)));
        // 39 tokens of load on worker 1: 40 against 41, it still wins...
        workers[1].running_tokens = 39;
        assert_eq!(kv.pick(&workers, &mut prompt), Some(WorkerId(1)));
        // ...41 against 41 ties (they take turns)...
        workers[1].queued_tokens = 1;
        workers[1].running_tokens = 39;
        let picks: HashSet<_> = (0..2).map(|_| kv.pick(&workers, &mut prompt)).collect();
        assert_eq!(picks, HashSet::from([Some(WorkerId(0)), Some(WorkerId(1))]));
        // ...and with more, the idle worker wins.
        workers[1].queued_tokens = 10;
        assert_eq!(kv.pick(&workers, &mut prompt), Some(WorkerId(0)));
        // With no weight on load, the cache decides alone.
        let cache_only = KvAware::new(index.clone(), 0.0).unwrap();
        assert_eq!(cache_only.pick(&workers, &mut prompt), Some(WorkerId(1)));
        // An unhealthy holder is never picked, however cheap.
        workers[1].healthy = false;
        assert_eq!(cache_only.pick(&workers, &mut prompt), Some(WorkerId(0)));
        workers[0].healthy = false;
        assert_eq!(cache_only.pick(&workers, &mut prompt), None);
        assert_eq!(cache_only.pick(&[], &mut prompt), None);
    }

    #[test]
    fn a_stale_worker_or_one_without_prefix_reuse_matches_nothing() {
        let index = SharedKvIndex::default();
        let tokens: Vec<u32> = (0..41).collect();
        store(&index, WorkerId(0), 1, &tokens, 4, 10);
        let kv = KvAware::new(index.clone(), 0.0).unwrap();
        let mut prompt = Prompt::new(&tokens);
        let workers = [
            worker(0),
            WorkerView {
                block_size: 0,
                ..worker(1)
            },
        ];
        assert_eq!(kv.pick(&workers, &mut prompt), Some(WorkerId(0)));
        // Events 2.. were lost: worker 0 holds nothing now, so the two tie.
        store(&index, WorkerId(0), 5, &tokens[..4], 4, 0);
        assert!(index.read().unwrap().is_stale(WorkerId(0)));
        let picks: HashSet<_> = (0..2).map(|_| kv.pick(&workers, &mut prompt)).collect();
        assert_eq!(picks.len(), 2);
    }

    #[test]
    fn workers_with_different_block_sizes_are_matched_by_their_own() {
        let index = SharedKvIndex::default();
        let tokens: Vec<u32> = (0..17).collect();
        store(&index, WorkerId(0), 1, &tokens, 4, 2); // 8 tokens cached
        store(&index, WorkerId(1), 1, &tokens, 2, 6); // 12 tokens cached
        let kv = KvAware::new(index, 0.0).unwrap();
        let workers = [
            worker(0),
            WorkerView {
                block_size: 2,
                ..worker(1)
            },
        ];
        assert_eq!(
            kv.pick(&workers, &mut Prompt::new(&tokens)),
            Some(WorkerId(1))
        );
    }

    proptest! {
        /// The pick is healthy and of minimal cost, where the cost is computed here from a
        /// plain set of the hashes each worker was given; None only when none is healthy.
        #[test]
        fn picks_a_healthy_worker_of_minimal_cost(
            docs in proptest::collection::vec(proptest::collection::vec(0u32..3, 1..24), 1..4),
            workers in proptest::collection::vec((any::<bool>(), prop_oneof![Just(0u32), Just(2u32), Just(4u32)], 0u64..20, 0u64..20, proptest::collection::vec((0usize..4, 0usize..8), 0..4)), 0..6),
            (prompt_doc, prompt_len, tail) in (0usize..4, 0usize..24, proptest::collection::vec(0u32..3, 0..6)),
            load_weight in prop_oneof![Just(0.0), Just(0.5), Just(1.0), Just(2.0)],
        ) {
            let index = SharedKvIndex::default();
            let mut held: Vec<HashSet<u64>> = Vec::new();
            let mut views = Vec::new();
            for (i, (healthy, block_size, queued, running, stores)) in workers.iter().enumerate() {
                let id = WorkerId(i as u32);
                let mut set = HashSet::new();
                if *block_size > 0 {
                    for (n, (doc, blocks)) in stores.iter().enumerate() {
                        let doc = &docs[doc % docs.len()];
                        store(&index, id, n as u64 + 1, doc, *block_size, *blocks);
                        let mut covered = doc[..(blocks * *block_size as usize).min(doc.len())].to_vec();
                        covered.push(0);
                        set.extend(prompt_block_hashes(&covered, *block_size as usize));
                    }
                }
                held.push(set);
                views.push(WorkerView { healthy: *healthy, block_size: *block_size, queued_tokens: *queued, running_tokens: *running, ..worker(i as u32) });
            }
            let doc = &docs[prompt_doc % docs.len()];
            let mut tokens = doc[..prompt_len.min(doc.len())].to_vec();
            tokens.extend(&tail);
            let expected_cost = |w: &WorkerView| {
                let hashes = prompt_block_hashes(&tokens, w.block_size as usize);
                let matched = hashes.iter().take_while(|h| held[w.id.0 as usize].contains(h)).count();
                (tokens.len() - matched * w.block_size as usize) as f64 + load_weight * (w.queued_tokens + w.running_tokens) as f64
            };
            let least = views.iter().filter(|w| w.healthy).map(expected_cost).min_by(f64::total_cmp);
            let kv = KvAware::new(index, load_weight).unwrap();
            let mut prompt = Prompt::new(&tokens);
            for _ in 0..3 {
                match (kv.pick(&views, &mut prompt), least) {
                    (None, None) => {}
                    (Some(id), Some(least)) => {
                        let picked = &views[id.0 as usize];
                        prop_assert!(picked.healthy);
                        prop_assert_eq!(expected_cost(picked), least);
                    }
                    (picked, least) => prop_assert!(false, "picked {:?} with least cost {:?}", picked, least),
                }
            }
        }
    }
}
