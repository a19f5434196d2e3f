//! Which KV blocks each worker holds, rebuilt from the KV-cache events it publishes, so that a
//! prompt's cached prefix can be counted per worker without asking the workers.
//!
//! Blocks are named by the contract's hash (`block_hash`), recomputed from each stored block's
//! tokens chained through its parent: engines that hash the contract's way (transformers,
//! synthetic) publish the same names, and TensorRT-LLM's own hashes then cost nothing but a
//! map from its name to ours (its name is what its later `removed` events use).

use std::collections::HashMap;

use super::block_hash::block_hash;
use super::WorkerId;
use crate::pb;
use crate::pb::kv_cache_event::Kind;

/// Blocks a worker may be recorded as holding before the index stops trusting it: a bound on
/// memory against an executor that stores without ever evicting (a cache cannot), ~100 bytes a
/// block. 2^20 blocks of 16 tokens is 16 M tokens of KV, more than any one GPU holds.
pub const DEFAULT_MAX_BLOCKS_PER_WORKER: usize = 1 << 20;

/// What one event did to a worker's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    Applied,
    /// The event's id was not one above the last: events were lost (the executor's buffer
    /// overflowed). The worker's blocks were dropped before the event was applied.
    Gap {
        expected: u64,
        got: u64,
    },
    /// The worker would hold more than the bound; its blocks were dropped.
    Overflow,
}

/// One worker's blocks. SipHash (std's default) and not an identity hasher on the already
/// random hashes: prompts are the client's, so it could grind blocks whose hashes collide in
/// the bucket bits and slow every lookup.
#[derive(Debug, Default)]
struct WorkerBlocks {
    /// The engine's name of a block → the contract's hash of it.
    names: HashMap<u64, u64>,
    /// Contract hash → how many engine blocks carry it (two engine names may hash the same
    /// tokens and prefix the contract's way, e.g. TensorRT-LLM's hash also covers LoRA ids).
    held: HashMap<u64, u32>,
    last_event_id: Option<u64>,
    stale: bool,
}

impl WorkerBlocks {
    fn drop_blocks(&mut self) {
        // Fresh maps, not clear(): give the memory of a large cache back.
        self.names = HashMap::new();
        self.held = HashMap::new();
    }

    fn store(&mut self, stored: &pb::KvBlocksStored) {
        // A parent the index never saw (stored before the stream started, or before a gap) is
        // taken as already being the contract's hash: right for engines that hash that way; for
        // others it only makes names no prompt matches, so it can miss but never claim a block.
        let mut parent = stored
            .parent_hash
            .map(|p| self.names.get(&p).copied().unwrap_or(p));
        for block in &stored.blocks {
            let name = if block.token_ids.is_empty() {
                block.block_hash
            } else {
                block_hash(parent, &block.token_ids)
            };
            match self.names.insert(block.block_hash, name) {
                Some(old) if old == name => {}
                Some(old) => {
                    self.release(old);
                    *self.held.entry(name).or_insert(0) += 1;
                }
                None => *self.held.entry(name).or_insert(0) += 1,
            }
            parent = Some(name);
        }
    }

    fn remove(&mut self, removed: &pb::KvBlocksRemoved) {
        for engine_hash in &removed.block_hashes {
            // Unknown names are blocks stored before the stream started: nothing to do.
            if let Some(name) = self.names.remove(engine_hash) {
                self.release(name);
            }
        }
    }

    fn release(&mut self, name: u64) {
        if let Some(count) = self.held.get_mut(&name) {
            *count -= 1;
            if *count == 0 {
                self.held.remove(&name);
            }
        }
    }
}

/// The blocks every worker holds, as far as its events tell.
///
/// After lost events (a gap in the ids) a worker's blocks are dropped and it is marked stale;
/// the events after the gap are still applied. Every block the index then holds was stored
/// after the gap, and its removal, being later still, cannot have been lost, so the index is a
/// subset of the worker's cache: it may miss blocks but never claims one the worker dropped.
/// `stale` stays set (the index is partial) until `all_cleared` or `reset`.
#[derive(Debug)]
pub struct KvIndex {
    workers: HashMap<WorkerId, WorkerBlocks>,
    max_blocks_per_worker: usize,
}

impl Default for KvIndex {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BLOCKS_PER_WORKER)
    }
}

impl KvIndex {
    pub fn new(max_blocks_per_worker: usize) -> Self {
        Self {
            workers: HashMap::new(),
            max_blocks_per_worker,
        }
    }

    /// Applies one event of `worker`'s stream. The first event seen sets the id baseline (a
    /// stream starts with whatever the executor still buffers, not necessarily id 1).
    pub fn apply(&mut self, worker: WorkerId, event: &pb::KvCacheEvent) -> EventOutcome {
        let blocks = self.workers.entry(worker).or_default();
        let mut outcome = EventOutcome::Applied;
        if let Some(last) = blocks.last_event_id {
            if last.checked_add(1) != Some(event.event_id) {
                blocks.drop_blocks();
                blocks.stale = true;
                outcome = EventOutcome::Gap {
                    expected: last.saturating_add(1),
                    got: event.event_id,
                };
            }
        }
        blocks.last_event_id = Some(event.event_id);
        match &event.kind {
            Some(Kind::Stored(stored)) => {
                blocks.store(stored);
                if blocks.names.len() > self.max_blocks_per_worker {
                    blocks.drop_blocks();
                    blocks.stale = true;
                    outcome = EventOutcome::Overflow;
                }
            }
            Some(Kind::Removed(removed)) => blocks.remove(removed),
            Some(Kind::AllCleared(true)) => {
                blocks.drop_blocks();
                blocks.stale = false;
            }
            // An unset kind (a newer executor's event) or `all_cleared: false`: nothing to
            // apply, but the id still counts.
            Some(Kind::AllCleared(false)) | None => {}
        }
        outcome
    }

    /// Applies a stream message in order; returns the outcomes that were not `Applied`, for
    /// the caller to log or count.
    pub fn apply_batch(
        &mut self,
        worker: WorkerId,
        batch: &pb::KvCacheEventBatch,
    ) -> Vec<EventOutcome> {
        batch
            .events
            .iter()
            .map(|event| self.apply(worker, event))
            .filter(|outcome| *outcome != EventOutcome::Applied)
            .collect()
    }

    /// Forgets what `worker` holds and its event ids, as for a new stream to a restarted
    /// executor (its ids start over).
    pub fn reset(&mut self, worker: WorkerId) {
        self.workers.remove(&worker);
    }

    /// Forgets a worker that left the pool.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.workers.remove(&worker);
    }

    /// How many of `hashes` (a prompt's chained block hashes, in order) `worker` holds from
    /// the first on. A worker the index has no events for holds nothing.
    pub fn matched_prefix_blocks(&self, worker: WorkerId, hashes: &[u64]) -> usize {
        match self.workers.get(&worker) {
            Some(blocks) => hashes
                .iter()
                .take_while(|hash| blocks.held.contains_key(hash))
                .count(),
            None => 0,
        }
    }

    /// Whether events of `worker` were lost since its last `all_cleared` or reset (the index of
    /// it is partial).
    pub fn is_stale(&self, worker: WorkerId) -> bool {
        self.workers.get(&worker).is_some_and(|blocks| blocks.stale)
    }

    /// Blocks recorded for `worker`, by the engine's names.
    pub fn block_count(&self, worker: WorkerId) -> usize {
        self.workers
            .get(&worker)
            .map_or(0, |blocks| blocks.names.len())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;
    use crate::executors::routing::block_hash::prompt_block_hashes;

    const W0: WorkerId = WorkerId(0);
    const W1: WorkerId = WorkerId(1);

    fn stored(id: u64, parent: Option<u64>, blocks: &[(u64, Vec<u32>)]) -> pb::KvCacheEvent {
        pb::KvCacheEvent {
            event_id: id,
            kind: Some(Kind::Stored(pb::KvBlocksStored {
                parent_hash: parent,
                blocks: blocks
                    .iter()
                    .map(|(hash, tokens)| pb::KvBlock {
                        block_hash: *hash,
                        token_ids: tokens.clone(),
                    })
                    .collect(),
            })),
        }
    }

    fn removed(id: u64, hashes: &[u64]) -> pb::KvCacheEvent {
        pb::KvCacheEvent {
            event_id: id,
            kind: Some(Kind::Removed(pb::KvBlocksRemoved {
                block_hashes: hashes.to_vec(),
            })),
        }
    }

    fn cleared(id: u64) -> pb::KvCacheEvent {
        pb::KvCacheEvent {
            event_id: id,
            kind: Some(Kind::AllCleared(true)),
        }
    }

    /// The blocks of `tokens` (B = 4) as an engine that hashes the contract's way names them.
    fn contract_blocks(tokens: &[u32]) -> Vec<(u64, Vec<u32>)> {
        let mut parent = None;
        tokens
            .chunks_exact(4)
            .map(|block| {
                let hash = block_hash(parent, block);
                parent = Some(hash);
                (hash, block.to_vec())
            })
            .collect()
    }

    #[test]
    fn counts_the_leading_blocks_a_worker_holds() {
        let prompt: Vec<u32> = (1..=17).collect(); // 4 usable blocks
        let hashes = prompt_block_hashes(&prompt, 4);
        let blocks = contract_blocks(&prompt);
        let mut index = KvIndex::default();
        // Two events: the first two blocks, then two continuing them.
        assert_eq!(
            index.apply(W0, &stored(1, None, &blocks[..2])),
            EventOutcome::Applied
        );
        assert_eq!(index.matched_prefix_blocks(W0, &hashes), 2);
        index.apply(W0, &stored(2, Some(blocks[1].0), &blocks[2..4]));
        assert_eq!(index.matched_prefix_blocks(W0, &hashes), 4);
        assert_eq!(index.matched_prefix_blocks(W1, &hashes), 0);
        // Evicting the second block cuts the prefix there, though 3 and 4 are still held.
        index.apply(W0, &removed(3, &[blocks[1].0]));
        assert_eq!(index.matched_prefix_blocks(W0, &hashes), 1);
        assert_eq!(index.block_count(W0), 3);
        assert!(!index.is_stale(W0));
    }

    #[test]
    fn engine_hashes_of_another_rule_are_renamed_by_the_contract() {
        // TensorRT-LLM names blocks its own way; the index hashes their tokens, chained
        // through the parent's contract name, and keeps the engine's name for `removed`.
        let prompt: Vec<u32> = (1..=9).collect();
        let hashes = prompt_block_hashes(&prompt, 4);
        let mut index = KvIndex::default();
        index.apply(W0, &stored(7, None, &[(111, vec![1, 2, 3, 4])]));
        index.apply(W0, &stored(8, Some(111), &[(222, vec![5, 6, 7, 8])]));
        assert_eq!(hashes, vec![0x9dfefa18f3387ac8, 0x1ea95d1403a2d75b]);
        assert_eq!(index.matched_prefix_blocks(W0, &hashes), 2);
        index.apply(W0, &removed(9, &[111]));
        assert_eq!(index.matched_prefix_blocks(W0, &hashes), 0);
        assert_eq!(index.block_count(W0), 1);
    }

    #[test]
    fn one_contract_block_under_two_engine_names_is_held_until_both_go() {
        let mut index = KvIndex::default();
        let tokens = vec![1, 2, 3, 4];
        index.apply(W0, &stored(1, None, &[(10, tokens.clone())]));
        index.apply(W0, &stored(2, None, &[(20, tokens.clone())]));
        let hashes = [block_hash(None, &tokens)];
        index.apply(W0, &removed(3, &[10]));
        assert_eq!(index.matched_prefix_blocks(W0, &hashes), 1);
        index.apply(W0, &removed(4, &[20]));
        assert_eq!(index.matched_prefix_blocks(W0, &hashes), 0);
    }

    #[test]
    fn a_gap_drops_the_workers_blocks_and_marks_it_stale_until_cleared() {
        let prompt: Vec<u32> = (1..=9).collect();
        let hashes = prompt_block_hashes(&prompt, 4);
        let blocks = contract_blocks(&prompt);
        let mut index = KvIndex::default();
        index.apply(W0, &stored(5, None, &blocks[..1]));
        index.apply(W1, &stored(1, None, &blocks[..1]));
        // Event 6 was lost; 7 removes something unrelated.
        assert_eq!(
            index.apply(W0, &removed(7, &[999])),
            EventOutcome::Gap {
                expected: 6,
                got: 7
            }
        );
        assert!(index.is_stale(W0));
        assert_eq!(index.matched_prefix_blocks(W0, &hashes), 0);
        // The other worker is untouched.
        assert_eq!(index.matched_prefix_blocks(W1, &hashes), 1);
        // Blocks stored after the gap count again; the worker stays flagged as partial.
        index.apply(W0, &stored(8, None, &blocks[..2]));
        assert_eq!(index.matched_prefix_blocks(W0, &hashes), 2);
        assert!(index.is_stale(W0));
        index.apply(W0, &cleared(9));
        assert!(!index.is_stale(W0));
        assert_eq!(index.matched_prefix_blocks(W0, &hashes), 0);
        // An id going backwards (an executor that restarted without a reset) is a gap too.
        assert!(matches!(
            index.apply(W0, &cleared(1)),
            EventOutcome::Gap {
                expected: 10,
                got: 1
            }
        ));
        index.reset(W0);
        assert!(!index.is_stale(W0));
        assert_eq!(index.apply(W0, &cleared(1)), EventOutcome::Applied);
    }

    #[test]
    fn a_worker_over_the_bound_is_dropped_and_stale() {
        let prompt: Vec<u32> = (1..=13).collect();
        let blocks = contract_blocks(&prompt);
        let mut index = KvIndex::new(2);
        assert_eq!(
            index.apply(W0, &stored(1, None, &blocks[..2])),
            EventOutcome::Applied
        );
        assert_eq!(
            index.apply(W0, &stored(2, Some(blocks[1].0), &blocks[2..3])),
            EventOutcome::Overflow
        );
        assert_eq!(index.block_count(W0), 0);
        assert!(index.is_stale(W0));
    }

    #[test]
    fn a_batch_reports_what_was_not_applied() {
        let mut index = KvIndex::default();
        let batch = pb::KvCacheEventBatch {
            events: vec![
                cleared(1),
                cleared(2),
                cleared(4),
                pb::KvCacheEvent {
                    event_id: 5,
                    kind: None,
                },
            ],
        };
        assert_eq!(
            index.apply_batch(W0, &batch),
            vec![EventOutcome::Gap {
                expected: 3,
                got: 4
            }]
        );
        index.remove_worker(W0);
        assert_eq!(index.block_count(W0), 0);
    }

    // The model: per worker a plain map from engine name to contract name, looked up by
    // scanning its values; the same event rules, none of the index's bookkeeping.
    #[derive(Default)]
    struct ModelWorker {
        names: HashMap<u64, u64>,
        last: Option<u64>,
        stale: bool,
    }

    impl ModelWorker {
        fn apply(&mut self, event: &pb::KvCacheEvent, max: usize) {
            if self.last.is_some_and(|last| last + 1 != event.event_id) {
                self.names.clear();
                self.stale = true;
            }
            self.last = Some(event.event_id);
            match &event.kind {
                Some(Kind::Stored(s)) => {
                    let mut parent = s.parent_hash.map(|p| *self.names.get(&p).unwrap_or(&p));
                    for b in &s.blocks {
                        let name = block_hash(parent, &b.token_ids);
                        self.names.insert(b.block_hash, name);
                        parent = Some(name);
                    }
                    if self.names.len() > max {
                        self.names.clear();
                        self.stale = true;
                    }
                }
                Some(Kind::Removed(r)) => {
                    for h in &r.block_hashes {
                        self.names.remove(h);
                    }
                }
                Some(Kind::AllCleared(true)) => {
                    self.names.clear();
                    self.stale = false;
                }
                Some(Kind::AllCleared(false)) | None => {}
            }
        }

        fn matched(&self, hashes: &[u64]) -> usize {
            let held: HashSet<u64> = self.names.values().copied().collect();
            hashes.iter().take_while(|h| held.contains(h)).count()
        }
    }

    /// A path in a small tree of blocks (B = 2, tokens 0..3), so that events and prompts share
    /// prefixes often.
    fn path() -> impl Strategy<Value = Vec<[u32; 2]>> {
        proptest::collection::vec([0u32..3, 0u32..3], 1..5)
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Store `path[start..]` continuing `path[..start]`.
        Store {
            worker: u8,
            path: Vec<[u32; 2]>,
            start: usize,
        },
        /// Remove the blocks of `path` at the positions `which` picks.
        Remove {
            worker: u8,
            path: Vec<[u32; 2]>,
            which: u8,
        },
        Clear {
            worker: u8,
        },
        /// The worker's next event id skips this many (events lost).
        Skip {
            worker: u8,
            by: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..2, path(), 0usize..4).prop_map(|(worker, path, start)| Op::Store { worker, start: start.min(path.len() - 1), path }),
            3 => (0u8..2, path(), any::<u8>()).prop_map(|(worker, path, which)| Op::Remove { worker, path, which }),
            1 => (0u8..2).prop_map(|worker| Op::Clear { worker }),
            1 => (0u8..2, 1u64..4).prop_map(|(worker, by)| Op::Skip { worker, by }),
        ]
    }

    /// Contract hashes of a path's blocks.
    fn contract_path(path: &[[u32; 2]]) -> Vec<u64> {
        let mut parent = None;
        path.iter()
            .map(|block| {
                let hash = block_hash(parent, block);
                parent = Some(hash);
                hash
            })
            .collect()
    }

    proptest! {
        /// After every event, each worker's prefix match for every queried path equals the
        /// model's, and so does its stale flag. Worker 1 names blocks its own way (a bijection
        /// of the contract's hash), as TensorRT-LLM does.
        #[test]
        fn index_equals_the_model(ops in proptest::collection::vec(op(), 1..60), queries in proptest::collection::vec(path(), 1..6), max in 3usize..24) {
            let engine_name = |worker: u8, hash: u64| if worker == 0 { hash } else { hash.rotate_left(17) ^ 0x5a5a };
            let mut index = KvIndex::new(max);
            let mut model: [ModelWorker; 2] = Default::default();
            let mut next_id = [1u64, 1];
            for op in ops {
                let (worker, event) = match op {
                    Op::Store { worker, path, start } => {
                        let hashes = contract_path(&path);
                        let parent = start.checked_sub(1).map(|i| engine_name(worker, hashes[i]));
                        let blocks: Vec<(u64, Vec<u32>)> = (start..path.len())
                            .map(|i| (engine_name(worker, hashes[i]), path[i].to_vec()))
                            .collect();
                        (worker, stored(next_id[worker as usize], parent, &blocks))
                    }
                    Op::Remove { worker, path, which } => {
                        let hashes: Vec<u64> = contract_path(&path)
                            .into_iter()
                            .enumerate()
                            .filter(|(i, _)| which & (1 << i) != 0)
                            .map(|(_, h)| engine_name(worker, h))
                            .collect();
                        (worker, removed(next_id[worker as usize], &hashes))
                    }
                    Op::Clear { worker } => (worker, cleared(next_id[worker as usize])),
                    Op::Skip { worker, by } => {
                        next_id[worker as usize] += by;
                        continue;
                    }
                };
                next_id[worker as usize] += 1;
                index.apply(WorkerId(worker.into()), &event);
                model[worker as usize].apply(&event, max);
                for w in 0..2u8 {
                    let id = WorkerId(w.into());
                    prop_assert_eq!(index.is_stale(id), model[w as usize].stale);
                    prop_assert_eq!(index.block_count(id), model[w as usize].names.len());
                    for query in &queries {
                        let hashes = contract_path(query);
                        prop_assert_eq!(index.matched_prefix_blocks(id, &hashes), model[w as usize].matched(&hashes));
                    }
                }
            }
        }

        /// Any gap leaves the worker stale and holding nothing, whatever it held.
        #[test]
        fn a_gap_marks_stale(paths in proptest::collection::vec(path(), 1..8), by in 2u64..1000) {
            let mut index = KvIndex::default();
            let mut id = 1;
            for path in &paths {
                let hashes = contract_path(path);
                let blocks: Vec<(u64, Vec<u32>)> = hashes.iter().zip(path).map(|(h, b)| (*h, b.to_vec())).collect();
                index.apply(W0, &stored(id, None, &blocks));
                id += 1;
            }
            prop_assert!(!index.is_stale(W0));
            let gap = index.apply(W0, &removed(id - 1 + by, &[]));
            prop_assert_eq!(gap, EventOutcome::Gap { expected: id, got: id - 1 + by });
            prop_assert!(index.is_stale(W0));
            prop_assert_eq!(index.block_count(W0), 0);
            for path in &paths {
                prop_assert_eq!(index.matched_prefix_blocks(W0, &contract_path(path)), 0);
            }
        }
    }
}
