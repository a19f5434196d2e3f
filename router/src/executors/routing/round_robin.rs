//! Round robin over the healthy workers: no state but a counter, blind to load and cache.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::policy::{Prompt, RoutingPolicy, WorkerView};
use super::WorkerId;

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoutingPolicy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn pick(&self, workers: &[WorkerView], _prompt: &mut Prompt<'_>) -> Option<WorkerId> {
        let healthy = workers.iter().filter(|w| w.healthy).count();
        if healthy == 0 {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % healthy;
        workers.iter().filter(|w| w.healthy).nth(turn).map(|w| w.id)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::executors::routing::policy::tests::worker;

    #[test]
    fn cycles_through_the_healthy_workers() {
        let mut workers: Vec<WorkerView> = (0..3).map(worker).collect();
        workers[1].healthy = false;
        let rr = RoundRobin::default();
        let mut prompt = Prompt::new(&[]);
        let picks: Vec<Option<WorkerId>> = (0..4).map(|_| rr.pick(&workers, &mut prompt)).collect();
        let (w0, w2) = (Some(WorkerId(0)), Some(WorkerId(2)));
        assert_eq!(picks, [w0, w2, w0, w2]);
        workers[0].healthy = false;
        workers[2].healthy = false;
        assert_eq!(rr.pick(&workers, &mut prompt), None);
        assert_eq!(rr.pick(&[], &mut prompt), None);
    }

    proptest! {
        /// Over `rounds` times as many picks as healthy workers, each healthy worker is picked
        /// exactly `rounds` times, each window of that many picks visits every one, and no
        /// unhealthy worker is picked.
        #[test]
        fn fair_over_the_healthy(health in proptest::collection::vec(any::<bool>(), 0..8), rounds in 1usize..6, warmup in 0usize..10) {
            let workers: Vec<WorkerView> = health.iter().enumerate().map(|(i, h)| WorkerView { healthy: *h, ..worker(i as u32) }).collect();
            let healthy = health.iter().filter(|h| **h).count();
            let rr = RoundRobin::default();
            let mut prompt = Prompt::new(&[1, 2, 3]);
            for _ in 0..warmup {
                rr.pick(&workers, &mut prompt);
            }
            if healthy == 0 {
                prop_assert_eq!(rr.pick(&workers, &mut prompt), None);
                return Ok(());
            }
            let picks: Vec<WorkerId> = (0..healthy * rounds).map(|_| rr.pick(&workers, &mut prompt).unwrap()).collect();
            let mut counts: HashMap<WorkerId, usize> = HashMap::new();
            for id in &picks {
                prop_assert!(workers[id.0 as usize].healthy);
                *counts.entry(*id).or_default() += 1;
            }
            prop_assert_eq!(counts.len(), healthy);
            prop_assert!(counts.values().all(|c| *c == rounds));
            for window in picks.chunks(healthy) {
                let distinct: std::collections::HashSet<_> = window.iter().collect();
                prop_assert_eq!(distinct.len(), healthy);
            }
        }
    }
}
