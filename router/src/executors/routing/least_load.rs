//! Least load: the healthy worker with the fewest requests in flight, then the fewest queued
//! and running tokens; equal workers take turns.

use super::policy::{Prompt, RoutingPolicy, TieBreak, WorkerView};
use super::WorkerId;

#[derive(Debug, Default)]
pub struct LeastLoad {
    ties: TieBreak,
}

impl LeastLoad {
    /// What the policy minimises, compared in order.
    pub fn load(worker: &WorkerView) -> (u32, u64) {
        (worker.in_flight, worker.load_tokens())
    }
}

impl RoutingPolicy for LeastLoad {
    fn name(&self) -> &'static str {
        "least-load"
    }

    fn pick(&self, workers: &[WorkerView], _prompt: &mut Prompt<'_>) -> Option<WorkerId> {
        let scored: Vec<(WorkerId, (u32, u64))> = workers
            .iter()
            .filter(|w| w.healthy)
            .map(|w| (w.id, Self::load(w)))
            .collect();
        self.ties.best(&scored, Ord::cmp)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::executors::routing::policy::tests::worker;

    #[test]
    fn fewest_in_flight_then_fewest_tokens() {
        let mut workers: Vec<WorkerView> = (0..4).map(worker).collect();
        workers[0].in_flight = 2;
        workers[1].in_flight = 1;
        workers[1].running_tokens = 500;
        workers[2].in_flight = 1;
        workers[2].queued_tokens = 100;
        workers[3].healthy = false; // idle, but out
        let ll = LeastLoad::default();
        let mut prompt = Prompt::new(&[1]);
        assert_eq!(ll.pick(&workers, &mut prompt), Some(WorkerId(2)));
        workers[2].queued_tokens = 500;
        // 1 and 2 tie: they take turns.
        let a = ll.pick(&workers, &mut prompt);
        let b = ll.pick(&workers, &mut prompt);
        assert_eq!([a, b], [Some(WorkerId(1)), Some(WorkerId(2))]);
        for w in &mut workers {
            w.healthy = false;
        }
        assert_eq!(ll.pick(&workers, &mut prompt), None);
    }

    proptest! {
        /// The pick is healthy and no healthy worker has a smaller load; None only when none
        /// is healthy.
        #[test]
        fn picks_a_least_loaded_healthy_worker(loads in proptest::collection::vec((any::<bool>(), 0u32..4, 0u64..300, 0u64..300), 0..8), picks in 1usize..5) {
            let workers: Vec<WorkerView> = loads.iter().enumerate().map(|(i, (healthy, in_flight, queued, running))| WorkerView {
                healthy: *healthy, in_flight: *in_flight, queued_tokens: *queued, running_tokens: *running, ..worker(i as u32)
            }).collect();
            let ll = LeastLoad::default();
            let mut prompt = Prompt::new(&[]);
            let least = workers.iter().filter(|w| w.healthy).map(|w| (w.in_flight, w.queued_tokens + w.running_tokens)).min();
            for _ in 0..picks {
                match (ll.pick(&workers, &mut prompt), least) {
                    (None, None) => {}
                    (Some(id), Some(least)) => {
                        let picked = &workers[id.0 as usize];
                        prop_assert!(picked.healthy);
                        prop_assert_eq!((picked.in_flight, picked.queued_tokens + picked.running_tokens), least);
                    }
                    (picked, least) => prop_assert!(false, "picked {:?} with least {:?}", picked, least),
                }
            }
        }
    }
}
