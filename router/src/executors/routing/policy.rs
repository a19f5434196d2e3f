//! The routing policy trait, what a policy sees of the workers and of the request, and the
//! factory from `--routing`. Each policy is a small type in its own file.

use std::cmp::Ordering;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, RwLock};

use super::block_hash::prompt_block_hashes;
use super::kv_aware::KvAware;
use super::kv_index::KvIndex;
use super::least_load::LeastLoad;
use super::round_robin::RoundRobin;
use super::WorkerId;

/// The index the pool's event streams write and the KV-aware policy reads.
pub type SharedKvIndex = Arc<RwLock<KvIndex>>;

/// One worker as the pool sees it when a request arrives (filled from its health, its `Stats`
/// and the pool's own count of what it sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    pub id: WorkerId,
    /// Healthy workers only are ever picked.
    pub healthy: bool,
    /// Requests sent to the worker and not yet finished.
    pub in_flight: u32,
    /// Prompt tokens of requests waiting for their prefill (sent, no token back yet).
    pub queued_tokens: u64,
    /// Tokens the worker processes per step for the requests it is decoding: one each. A
    /// decoding sequence slows every step a little; a prompt ahead delays a new request's
    /// first token by its whole prefill.
    pub running_tokens: u64,
    /// `Stats.kv_block_size`; 0 for a worker that reuses no prefix.
    pub block_size: u32,
}

impl WorkerView {
    /// The tokens the worker has yet to prefill or is decoding over.
    pub fn load_tokens(&self) -> u64 {
        self.queued_tokens.saturating_add(self.running_tokens)
    }
}

/// A request's prompt as a policy sees it: its tokens, and their chained block hashes,
/// computed on first use per block size (once per request when every worker has the same).
#[derive(Debug)]
pub struct Prompt<'a> {
    tokens: &'a [u32],
    hashes: Vec<(u32, Vec<u64>)>,
}

impl<'a> Prompt<'a> {
    pub fn new(tokens: &'a [u32]) -> Self {
        Self {
            tokens,
            hashes: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The hashes of the prompt's usable full blocks (`prompt_block_hashes`).
    pub fn block_hashes(&mut self, block_size: u32) -> &[u64] {
        let at = match self.hashes.iter().position(|(size, _)| *size == block_size) {
            Some(at) => at,
            None => {
                let hashes = prompt_block_hashes(self.tokens, block_size as usize);
                self.hashes.push((block_size, hashes));
                self.hashes.len() - 1
            }
        };
        &self.hashes[at].1
    }
}

/// Picks the worker for a request. `&self`: the pool shares one policy among its request
/// tasks (state such as a rotation is atomic).
pub trait RoutingPolicy: Send + Sync {
    /// The `--routing` name, for logs and `/info`.
    fn name(&self) -> &'static str;

    /// A healthy worker among `workers` for a request with this prompt; `None` when none is
    /// healthy.
    fn pick(&self, workers: &[WorkerView], prompt: &mut Prompt<'_>) -> Option<WorkerId>;

    /// The prompt tokens `worker` is expected to take from its prefix cache, as far as the
    /// policy knows (the pool counts only the rest as prefill work waiting on the worker).
    fn expected_cached_tokens(&self, _worker: &WorkerView, _prompt: &mut Prompt<'_>) -> usize {
        0
    }
}

/// A rotating start among equally good workers: each pick that ties begins one further along,
/// so that idle, equal workers share a burst instead of the first taking it all while their
/// stats catch up. Deterministic for a given sequence of picks.
#[derive(Debug, Default)]
pub struct TieBreak(AtomicUsize);

impl TieBreak {
    /// The best of `scored` by `cmp` (smallest first), rotating among ties.
    pub fn best<K>(
        &self,
        scored: &[(WorkerId, K)],
        cmp: impl Fn(&K, &K) -> Ordering,
    ) -> Option<WorkerId> {
        let (_, best) = scored.iter().min_by(|(_, a), (_, b)| cmp(a, b))?;
        let ties = scored
            .iter()
            .filter(|(_, key)| cmp(key, best) == Ordering::Equal)
            .count();
        let turn = if ties == 1 {
            0
        } else {
            self.0.fetch_add(1, AtomicOrdering::Relaxed) % ties
        };
        scored
            .iter()
            .filter(|(_, key)| cmp(key, best) == Ordering::Equal)
            .nth(turn)
            .map(|(id, _)| *id)
    }
}

/// `--routing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RoutingKind {
    RoundRobin,
    LeastLoad,
    #[default]
    KvAware,
}

/// The policy for `kind`; `index` and `load_weight` serve the KV-aware one.
pub fn build_policy(
    kind: RoutingKind,
    index: SharedKvIndex,
    load_weight: f64,
) -> Result<Box<dyn RoutingPolicy>, InvalidLoadWeight> {
    Ok(match kind {
        RoutingKind::RoundRobin => Box::new(RoundRobin::default()),
        RoutingKind::LeastLoad => Box::new(LeastLoad::default()),
        RoutingKind::KvAware => Box::new(KvAware::new(index, load_weight)?),
    })
}

/// A KV-aware load weight that is negative or not a number.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("the KV-aware routing load weight must be a finite number >= 0, got {0}")]
pub struct InvalidLoadWeight(pub f64);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A healthy, idle worker with block size 4.
    pub(crate) fn worker(id: u32) -> WorkerView {
        WorkerView {
            id: WorkerId(id),
            healthy: true,
            in_flight: 0,
            queued_tokens: 0,
            running_tokens: 0,
            block_size: 4,
        }
    }

    #[test]
    fn a_prompt_hashes_once_per_block_size() {
        let tokens: Vec<u32> = (1..=9).collect();
        let mut prompt = Prompt::new(&tokens);
        assert_eq!(prompt.len(), 9);
        assert_eq!(prompt.block_hashes(4), prompt_block_hashes(&tokens, 4));
        assert_eq!(prompt.block_hashes(2), prompt_block_hashes(&tokens, 2));
        assert_eq!(prompt.block_hashes(4).len(), 2);
        assert_eq!(prompt.hashes.len(), 2);
        assert!(prompt.block_hashes(0).is_empty());
    }

    #[test]
    fn ties_rotate_and_the_best_wins() {
        let ties = TieBreak::default();
        let scored = [(WorkerId(0), 1), (WorkerId(1), 0), (WorkerId(2), 0)];
        let picks: Vec<WorkerId> = (0..4)
            .map(|_| ties.best(&scored, Ord::cmp).unwrap())
            .collect();
        assert_eq!(picks, [WorkerId(1), WorkerId(2), WorkerId(1), WorkerId(2)]);
        assert_eq!(ties.best::<u32>(&[], Ord::cmp), None);
    }

    #[test]
    fn the_factory_builds_each_kind_and_refuses_a_bad_weight() {
        let index = SharedKvIndex::default();
        for (kind, name) in [
            (RoutingKind::RoundRobin, "round-robin"),
            (RoutingKind::LeastLoad, "least-load"),
            (RoutingKind::KvAware, "kv-aware"),
        ] {
            let policy = build_policy(kind, index.clone(), 1.0).unwrap();
            assert_eq!(policy.name(), name);
            assert_eq!(
                <RoutingKind as clap::ValueEnum>::from_str(name, false),
                Ok(kind)
            );
        }
        assert_eq!(RoutingKind::default(), RoutingKind::KvAware);
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let err = build_policy(RoutingKind::KvAware, index.clone(), bad).err();
            assert!(err.is_some_and(|e| e.to_string().contains("load weight")));
        }
    }
}
