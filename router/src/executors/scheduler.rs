//! Admission in the router: each request reserves prompt + max_new_tokens against the
//! executor's token budget (KV capacity) and batch-size limit; FIFO within a priority, higher
//! priorities first; everything admitted in one tick goes to the executor in one message. A
//! group (TGI's `best_of`: n sequences of one prompt) is admitted whole or not at all, its
//! reservation the sum of its sequences'.
//!
//! `AdmissionQueue` is the algorithm (pure, property-tested); `Scheduler` is the task that
//! owns it and talks to the executor.
//!
//! Rollout control orders itself against generation here: a hold stops admission (requests
//! queue, as when the budget is full), and while engine memory is released every queued and
//! new request is refused as sleeping.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::executors::client::{ExecutorEvent, RequestGuard};
use crate::executors::pool::ExecutorHandle;
use crate::metrics as m;
use crate::pb;

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdmissionError {
    #[error(
        "the request needs {needed} KV tokens (prompt + max_new_tokens) but the executor's \
         token budget is {budget} (--max-batch-total-tokens)"
    )]
    TooLarge { needed: u64, budget: u64 },
    #[error(
        "the request waited {waited_ms} ms in the admission queue, longer than \
         --max-queue-wait-ms {limit_ms}"
    )]
    QueueTimeout { waited_ms: u64, limit_ms: u64 },
    #[error("the scheduler has stopped (the router is shutting down)")]
    Stopped,
    #[error(
        "the request's {sequences} sequences (best_of) need {needed} KV tokens together \
         (prompt + max_new_tokens each) but the executor's token budget is {budget} \
         (--max-batch-total-tokens)"
    )]
    GroupTooLarge {
        sequences: usize,
        needed: u64,
        budget: u64,
    },
    #[error(
        "the request runs {sequences} sequences at once (best_of) but the executor runs at most \
         {max} requests at a time (--max-batch-size)"
    )]
    GroupTooWide { sequences: usize, max: usize },
    /// Engine memory is released; the message names the tags.
    #[error("{0}")]
    Sleeping(String),
}

struct Entry<T> {
    ticket: u64,
    reservation: u64,
    /// Requests it runs (batch slots taken): 1, or a group's size.
    slots: usize,
    enqueued: Instant,
    item: T,
}

/// The admission algorithm. `T` is what the caller keeps per queued request.
pub struct AdmissionQueue<T> {
    budget: u64,
    max_running: usize,
    used: u64,
    /// Ticket -> (reservation, slots) of what is admitted.
    running: HashMap<u64, (u64, usize)>,
    running_slots: usize,
    // Higher priority first (Reverse), then FIFO.
    queues: BTreeMap<Reverse<i32>, VecDeque<Entry<T>>>,
    queued: usize,
}

impl<T> AdmissionQueue<T> {
    /// `budget`: tokens all running requests may reserve together; `max_running`: most
    /// requests admitted at once. 0 means unlimited for either.
    pub fn new(budget: u64, max_running: usize) -> Self {
        Self {
            budget: if budget == 0 { u64::MAX } else { budget },
            max_running: if max_running == 0 {
                usize::MAX
            } else {
                max_running
            },
            used: 0,
            running: HashMap::new(),
            running_slots: 0,
            queues: BTreeMap::new(),
            queued: 0,
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// New limits (0: unlimited, as in `new`). What is admitted stays; a smaller budget only
    /// holds new admissions back until enough is released.
    pub fn set_limits(&mut self, budget: u64, max_running: usize) {
        let fresh = Self::new(budget, max_running);
        self.budget = fresh.budget;
        self.max_running = fresh.max_running;
    }
    pub fn used(&self) -> u64 {
        self.used
    }
    /// Requests admitted and not released (a group counts each of its sequences).
    pub fn running(&self) -> usize {
        self.running_slots
    }
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Queues a request. One that could never fit is refused at once.
    pub fn push(
        &mut self,
        ticket: u64,
        priority: i32,
        reservation: u64,
        now: Instant,
        item: T,
    ) -> Result<(), (AdmissionError, T)> {
        self.push_group(ticket, priority, reservation, 1, now, item)
    }

    /// Queues `slots` requests admitted together (`reservation` is their sum).
    pub fn push_group(
        &mut self,
        ticket: u64,
        priority: i32,
        reservation: u64,
        slots: usize,
        now: Instant,
        item: T,
    ) -> Result<(), (AdmissionError, T)> {
        let refusal = if slots > self.max_running {
            Some(AdmissionError::GroupTooWide {
                sequences: slots,
                max: self.max_running,
            })
        } else if reservation > self.budget && slots > 1 {
            Some(AdmissionError::GroupTooLarge {
                sequences: slots,
                needed: reservation,
                budget: self.budget,
            })
        } else if reservation > self.budget {
            Some(AdmissionError::TooLarge {
                needed: reservation,
                budget: self.budget,
            })
        } else {
            None
        };
        if let Some(e) = refusal {
            return Err((e, item));
        }
        self.queues
            .entry(Reverse(priority))
            .or_default()
            .push_back(Entry {
                ticket,
                reservation,
                slots,
                enqueued: now,
                item,
            });
        self.queued += 1;
        Ok(())
    }

    /// The next request to admit, if the head of the highest priority fits. Heads whose
    /// `alive` is false (client gone) are dropped on the way. A head that does not fit blocks
    /// everything behind it, so that a large request is never starved by small ones.
    pub fn pop_admissible(&mut self, mut alive: impl FnMut(&T) -> bool) -> Option<(u64, T)> {
        loop {
            let mut first = self.queues.first_entry()?;
            let queue = first.get_mut();
            let Some(head) = queue.front() else {
                first.remove();
                continue;
            };
            if !alive(&head.item) {
                queue.pop_front();
                self.queued -= 1;
                if queue.is_empty() {
                    first.remove();
                }
                continue;
            }
            if self.running_slots + head.slots > self.max_running
                || self.used.saturating_add(head.reservation) > self.budget
            {
                return None;
            }
            let entry = queue.pop_front()?;
            if queue.is_empty() {
                first.remove();
            }
            self.queued -= 1;
            self.used += entry.reservation;
            self.running_slots += entry.slots;
            self.running
                .insert(entry.ticket, (entry.reservation, entry.slots));
            return Some((entry.ticket, entry.item));
        }
    }

    /// Frees an admitted request's reservation (finished, cancelled or failed).
    pub fn release(&mut self, ticket: u64) -> bool {
        match self.running.remove(&ticket) {
            Some((r, slots)) => {
                self.used -= r;
                self.running_slots -= slots;
                true
            }
            None => false,
        }
    }

    /// Removes queued requests that are dead or have waited `max_wait` or longer.
    pub fn expire(
        &mut self,
        now: Instant,
        max_wait: Duration,
        mut alive: impl FnMut(&T) -> bool,
    ) -> Vec<(T, Duration)> {
        let mut expired = Vec::new();
        for queue in self.queues.values_mut() {
            let before = queue.len();
            let mut kept = VecDeque::with_capacity(queue.len());
            for e in queue.drain(..) {
                let waited = now.saturating_duration_since(e.enqueued);
                if waited >= max_wait {
                    expired.push((e.item, waited));
                } else if alive(&e.item) {
                    kept.push_back(e);
                }
            }
            self.queued -= before - kept.len();
            *queue = kept;
        }
        self.queues.retain(|_, q| !q.is_empty());
        expired
    }

    /// Moves each queued request's wait start later by the time it spent in a hold that ran
    /// from `since` to `now`: time held by rollout control does not count against
    /// --max-queue-wait-ms.
    pub fn forgive_hold(&mut self, since: Instant, now: Instant) {
        for e in self.queues.values_mut().flat_map(|q| q.iter_mut()) {
            e.enqueued += now.saturating_duration_since(e.enqueued.max(since));
        }
    }

    /// The earliest time a queued request reaches `max_wait`.
    pub fn next_deadline(&self, max_wait: Duration) -> Option<Instant> {
        self.queues
            .values()
            .filter_map(|q| q.front().map(|e| e.enqueued + max_wait))
            .min()
    }
}

/// A request admitted to the executor: its events, its cancel-on-drop guard, and its
/// reservation, freed when the last holder drops it (a group's sequences share one).
pub struct Admission {
    pub guard: RequestGuard,
    pub rx: mpsc::UnboundedReceiver<ExecutorEvent>,
    pub reservation: Arc<Reservation>,
    pub queue_time: Duration,
}

/// Frees its tokens in the scheduler when dropped.
pub struct Reservation {
    ticket: u64,
    tx: mpsc::UnboundedSender<Msg>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Release(self.ticket));
    }
}

type Reply = oneshot::Sender<Result<Vec<Admission>, AdmissionError>>;

struct Waiting {
    /// One request, or a group's, admitted together.
    requests: Vec<pb::GenerateRequest>,
    reply: Reply,
    enqueued: Instant,
}

enum Msg {
    Enqueue {
        requests: Vec<pb::GenerateRequest>,
        priority: i32,
        reply: Reply,
    },
    Release(u64),
    /// Refuse everything queued and everything that comes after (shutting down).
    Stop,
    /// Rollout control: stop admitting (nestable; admission resumes when every hold is
    /// gone). Acknowledged once in force: every admission before it has been sent to the
    /// executor by then.
    Hold(oneshot::Sender<()>),
    Unhold,
    /// Some(message): engine memory is released; refuse what is queued and what comes.
    Sleep(Option<String>),
    /// The pool's capacity changed (workers joined, left or failed): new token budget and
    /// batch-size limit.
    Capacity {
        budget: u64,
        max_batch_size: usize,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub token_budget: u64,
    pub max_batch_size: usize,
    pub max_queue_wait: Duration,
}

/// Cheap to clone; shared by all handlers.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Msg>,
    config: SchedulerConfig,
}

impl Scheduler {
    pub fn spawn(executor: ExecutorHandle, config: SchedulerConfig) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = AdmissionQueue::new(config.token_budget, config.max_batch_size);
        m::set_token_budget(queue.budget());
        tokio::spawn(run(queue, executor, config, rx, tx.clone()));
        Self { tx, config }
    }

    /// Refuses every queued request, and any later one, with `AdmissionError::Stopped`.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
    }

    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// Waits for admission. Dropping the future leaves the queue (client gone).
    pub async fn admit(
        &self,
        request: pb::GenerateRequest,
        priority: i32,
    ) -> Result<Admission, AdmissionError> {
        self.admit_group(vec![request], priority)
            .await?
            .pop()
            .ok_or(AdmissionError::Stopped)
    }

    /// Waits for the admission of all `requests` at once (their reservations summed), one
    /// admission each, in order.
    pub async fn admit_group(
        &self,
        requests: Vec<pb::GenerateRequest>,
        priority: i32,
    ) -> Result<Vec<Admission>, AdmissionError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Enqueue {
                requests,
                priority,
                reply,
            })
            .map_err(|_| AdmissionError::Stopped)?;
        rx.await.unwrap_or(Err(AdmissionError::Stopped))
    }

    /// Stops admission until the returned guard is dropped; returns once the hold is in
    /// force, when every earlier admission has already been sent to the executor. Requests
    /// keep queueing (held); clients that leave are dropped from the queue.
    pub async fn hold(&self) -> HoldGuard {
        let (ack, acked) = oneshot::channel();
        let guard = HoldGuard {
            tx: self.tx.clone(),
        };
        if self.tx.send(Msg::Hold(ack)).is_ok() {
            let _ = acked.await;
        }
        guard
    }

    /// Sizes admission by the pool: `per_worker_budget` and `per_worker_batch` times the
    /// healthy workers (at least one, so that requests queue rather than being refused as too
    /// large while the pool recovers).
    pub fn follow_pool(
        &self,
        mut healthy: tokio::sync::watch::Receiver<usize>,
        per_worker_budget: u64,
        per_worker_batch: usize,
    ) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            loop {
                let n = (*healthy.borrow_and_update()).max(1);
                let msg = Msg::Capacity {
                    budget: per_worker_budget.saturating_mul(n as u64),
                    max_batch_size: if per_worker_batch == 0 {
                        0
                    } else {
                        per_worker_batch.saturating_mul(n)
                    },
                };
                if tx.send(msg).is_err() || healthy.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// `Some(message)`: refuse every queued and every new request with
    /// `AdmissionError::Sleeping(message)`; `None`: admit again.
    pub fn set_sleeping(&self, message: Option<String>) {
        let _ = self.tx.send(Msg::Sleep(message));
    }
}

/// Admission stays stopped while any of these lives.
pub struct HoldGuard {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Unhold);
    }
}

/// While held, dead queue entries (clients gone) are swept this often: nothing else wakes
/// the scheduler then.
const HELD_SWEEP: Duration = Duration::from_secs(1);

fn reservation_of(requests: &[pb::GenerateRequest]) -> u64 {
    requests
        .iter()
        .map(|r| r.input_ids.len() as u64 + u64::from(r.max_new_tokens))
        .sum()
}

async fn run(
    mut queue: AdmissionQueue<Waiting>,
    executor: ExecutorHandle,
    config: SchedulerConfig,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    tx: mpsc::UnboundedSender<Msg>,
) {
    let mut next_ticket: u64 = 1;
    let mut stopped = false;
    let mut holds: usize = 0;
    // When the current hold began: its length is added to the queued requests' waits.
    let mut held_since: Option<Instant> = None;
    let mut sleeping: Option<String> = None;
    loop {
        let deadline = match held_since {
            Some(_) => Some(Instant::now() + HELD_SWEEP),
            None => queue.next_deadline(config.max_queue_wait),
        };
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let first = tokio::select! {
            msg = rx.recv() => match msg {
                Some(msg) => Some(msg),
                None => return,
            },
            _ = sleep => None,
        };
        // One tick: everything that arrived, then one admission pass.
        let mut msgs: Vec<Msg> = first.into_iter().collect();
        while let Ok(msg) = rx.try_recv() {
            msgs.push(msg);
        }
        let now = Instant::now();
        for msg in msgs {
            match msg {
                Msg::Release(ticket) => {
                    queue.release(ticket);
                }
                Msg::Stop => {
                    stopped = true;
                    for (w, _) in queue.expire(now, Duration::ZERO, |_| true) {
                        let _ = w.reply.send(Err(AdmissionError::Stopped));
                    }
                }
                Msg::Enqueue { reply, .. } if stopped => {
                    let _ = reply.send(Err(AdmissionError::Stopped));
                }
                Msg::Enqueue { reply, .. } if sleeping.is_some() => {
                    let message = sleeping.clone().unwrap_or_default();
                    let _ = reply.send(Err(AdmissionError::Sleeping(message)));
                }
                Msg::Enqueue {
                    requests,
                    priority,
                    reply,
                } => {
                    let ticket = next_ticket;
                    next_ticket += 1;
                    let reservation = reservation_of(&requests);
                    let slots = requests.len();
                    let waiting = Waiting {
                        requests,
                        reply,
                        enqueued: now,
                    };
                    if let Err((e, w)) =
                        queue.push_group(ticket, priority, reservation, slots, now, waiting)
                    {
                        let _ = w.reply.send(Err(e));
                    }
                }
                Msg::Hold(ack) => {
                    holds += 1;
                    held_since.get_or_insert(now);
                    let _ = ack.send(());
                }
                Msg::Unhold => {
                    holds = holds.saturating_sub(1);
                    if holds == 0 {
                        if let Some(since) = held_since.take() {
                            queue.forgive_hold(since, now);
                        }
                    }
                }
                Msg::Capacity {
                    budget,
                    max_batch_size,
                } => {
                    queue.set_limits(budget, max_batch_size);
                    m::set_token_budget(queue.budget());
                }
                Msg::Sleep(message) => {
                    if let Some(m) = &message {
                        for (w, _) in queue.expire(now, Duration::ZERO, |_| true) {
                            let _ = w.reply.send(Err(AdmissionError::Sleeping(m.clone())));
                        }
                    }
                    sleeping = message;
                }
            }
        }
        if held_since.is_some() {
            // Held: nothing is admitted and nothing times out; only the departed are dropped.
            queue.expire(now, Duration::MAX, |w| !w.reply.is_closed());
            m::set_scheduler_state(queue.queued(), queue.running(), queue.used());
            continue;
        }
        for (w, waited) in queue.expire(now, config.max_queue_wait, |w| !w.reply.is_closed()) {
            m::record_queue_timeout();
            let _ = w.reply.send(Err(AdmissionError::QueueTimeout {
                waited_ms: waited.as_millis() as u64,
                limit_ms: config.max_queue_wait.as_millis() as u64,
            }));
        }
        let mut admitted = Vec::new();
        while let Some((ticket, w)) = queue.pop_admissible(|w| !w.reply.is_closed()) {
            admitted.push((ticket, w));
        }
        if !admitted.is_empty() {
            let sizes: Vec<usize> = admitted.iter().map(|(_, w)| w.requests.len()).collect();
            let requests: Vec<pb::GenerateRequest> = admitted
                .iter_mut()
                .flat_map(|(_, w)| std::mem::take(&mut w.requests))
                .collect();
            m::record_admitted_batch(requests.len());
            let mut handles = executor.submit_batch(requests).into_iter();
            for ((ticket, w), size) in admitted.into_iter().zip(sizes) {
                let queue_time = now.saturating_duration_since(w.enqueued);
                m::record_queue_time(queue_time);
                let reservation = Arc::new(Reservation {
                    ticket,
                    tx: tx.clone(),
                });
                let admissions = handles
                    .by_ref()
                    .take(size)
                    .map(|(guard, events)| Admission {
                        guard,
                        rx: events,
                        reservation: reservation.clone(),
                        queue_time,
                    })
                    .collect();
                // A client that left just now: dropping the admissions cancels and releases.
                let _ = w.reply.send(Ok(admissions));
            }
        }
        m::set_scheduler_state(queue.queued(), queue.running(), queue.used());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn head_of_line_blocks_within_budget() {
        let now = Instant::now();
        let mut q = AdmissionQueue::new(100, 10);
        q.push(1, 0, 60, now, ()).unwrap();
        q.push(2, 0, 60, now, ()).unwrap();
        q.push(3, 0, 10, now, ()).unwrap();
        assert_eq!(q.pop_admissible(|_| true).map(|x| x.0), Some(1));
        // 2 does not fit, and 3 must not overtake it.
        assert_eq!(q.pop_admissible(|_| true), None);
        q.release(1);
        assert_eq!(q.pop_admissible(|_| true).map(|x| x.0), Some(2));
        assert_eq!(q.pop_admissible(|_| true).map(|x| x.0), Some(3));
    }

    #[test]
    fn too_large_is_refused_with_the_budget() {
        let mut q = AdmissionQueue::new(100, 10);
        let err = q.push(1, 0, 101, Instant::now(), ()).unwrap_err().0;
        assert_eq!(
            err,
            AdmissionError::TooLarge {
                needed: 101,
                budget: 100
            }
        );
        assert!(err.to_string().contains("--max-batch-total-tokens"));
    }

    #[test]
    fn higher_priority_first_and_dead_heads_skipped() {
        let now = Instant::now();
        let mut q = AdmissionQueue::new(0, 0);
        q.push(1, 0, 1, now, true).unwrap();
        q.push(2, 5, 1, now, false).unwrap();
        q.push(3, 5, 1, now, true).unwrap();
        let order: Vec<u64> = std::iter::from_fn(|| q.pop_admissible(|alive| *alive))
            .map(|x| x.0)
            .collect();
        assert_eq!(order, vec![3, 1]);
        assert_eq!(q.queued(), 0);
    }

    #[test]
    fn a_group_is_admitted_whole_and_counts_each_sequence() {
        let now = Instant::now();
        let mut q = AdmissionQueue::new(100, 4);
        q.push(1, 0, 10, now, "one").unwrap();
        q.push_group(2, 0, 60, 3, now, "group").unwrap();
        q.push(3, 0, 10, now, "after").unwrap();
        assert_eq!(q.pop_admissible(|_| true).map(|x| x.1), Some("one"));
        assert_eq!(q.pop_admissible(|_| true).map(|x| x.1), Some("group"));
        assert_eq!(q.running(), 4);
        assert_eq!(q.used(), 70);
        // Four slots taken (1 + 3): the next waits for the group, whole.
        assert_eq!(q.pop_admissible(|_| true), None);
        q.release(2);
        assert_eq!(q.running(), 1);
        assert_eq!(q.pop_admissible(|_| true).map(|x| x.1), Some("after"));
        // One that could never run whole is refused at once, naming the limit it breaks.
        let wide = q.push_group(4, 0, 5, 5, now, "wide").unwrap_err().0;
        assert_eq!(
            wide,
            AdmissionError::GroupTooWide {
                sequences: 5,
                max: 4
            }
        );
        assert!(wide.to_string().contains("--max-batch-size"));
        let large = q.push_group(5, 0, 101, 2, now, "large").unwrap_err().0;
        assert!(matches!(
            large,
            AdmissionError::GroupTooLarge {
                sequences: 2,
                needed: 101,
                budget: 100
            }
        ));
        assert!(large.to_string().contains("--max-batch-total-tokens"));
    }

    #[test]
    fn batch_size_limit() {
        let now = Instant::now();
        let mut q = AdmissionQueue::new(0, 2);
        for t in 1..=3 {
            q.push(t, 0, 1, now, ()).unwrap();
        }
        assert!(q.pop_admissible(|_| true).is_some());
        assert!(q.pop_admissible(|_| true).is_some());
        assert!(q.pop_admissible(|_| true).is_none());
        assert_eq!(q.running(), 2);
    }

    #[test]
    fn expiry_removes_only_the_old() {
        let t0 = Instant::now();
        let mut q = AdmissionQueue::new(10, 1);
        q.push(1, 0, 10, t0, "running").unwrap();
        assert!(q.pop_admissible(|_| true).is_some());
        q.push(2, 0, 10, t0, "old").unwrap();
        q.push(3, 0, 10, t0 + Duration::from_secs(5), "new")
            .unwrap();
        assert_eq!(
            q.next_deadline(Duration::from_secs(10)),
            Some(t0 + Duration::from_secs(10))
        );
        let gone = q.expire(
            t0 + Duration::from_secs(10),
            Duration::from_secs(10),
            |_| true,
        );
        assert_eq!(gone.iter().map(|g| g.0).collect::<Vec<_>>(), vec!["old"]);
        assert_eq!(q.queued(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push { priority: i32, reservation: u64 },
        Admit,
        Release(usize),
        Cancel(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0i32..3, 1u64..80).prop_map(|(priority, reservation)| Op::Push {
                priority,
                reservation
            }),
            Just(Op::Admit),
            (0usize..64).prop_map(Op::Release),
            (0usize..64).prop_map(Op::Cancel),
        ]
    }

    proptest! {
        /// Never over budget or batch size; FIFO kept within a priority; every request that
        /// was admitted ends, and every request ends exactly once (admitted then released,
        /// or cancelled while queued), so the queue drains to zero.
        #[test]
        fn admission_invariants(ops in proptest::collection::vec(op(), 1..200), budget in 50u64..300, max_running in 1usize..8) {
            let now = Instant::now();
            let mut q: AdmissionQueue<(u64, i32)> = AdmissionQueue::new(budget, max_running);
            let mut next = 1u64;
            let mut cancelled: std::collections::HashSet<u64> = Default::default();
            let mut admitted: Vec<u64> = Vec::new();
            let mut running: Vec<u64> = Vec::new();
            let mut pushed: Vec<(u64, i32)> = Vec::new();
            let mut last_admitted_per_priority: HashMap<i32, u64> = HashMap::new();
            let admit = |q: &mut AdmissionQueue<(u64, i32)>, cancelled: &std::collections::HashSet<u64>, admitted: &mut Vec<u64>, running: &mut Vec<u64>, last: &mut HashMap<i32, u64>| {
                while let Some((t, (_, p))) = q.pop_admissible(|(t, _)| !cancelled.contains(t)) {
                    prop_assert!(q.used() <= budget);
                    prop_assert!(q.running() <= max_running);
                    if let Some(prev) = last.insert(p, t) {
                        prop_assert!(prev < t, "FIFO broken within priority {}", p);
                    }
                    admitted.push(t);
                    running.push(t);
                }
                Ok(())
            };
            for op in ops {
                match op {
                    Op::Push { priority, reservation } => {
                        let t = next;
                        next += 1;
                        if q.push(t, priority, reservation, now, (t, priority)).is_ok() {
                            pushed.push((t, priority));
                        }
                    }
                    Op::Admit => admit(&mut q, &cancelled, &mut admitted, &mut running, &mut last_admitted_per_priority)?,
                    Op::Release(i) => {
                        if !running.is_empty() {
                            let t = running.remove(i % running.len());
                            prop_assert!(q.release(t));
                        }
                    }
                    Op::Cancel(i) => {
                        if !pushed.is_empty() {
                            cancelled.insert(pushed[i % pushed.len()].0);
                        }
                    }
                }
                prop_assert!(q.used() <= budget);
                prop_assert!(q.running() <= max_running);
            }
            // Drain: release everything running, admit, repeat; everything alive ends.
            loop {
                admit(&mut q, &cancelled, &mut admitted, &mut running, &mut last_admitted_per_priority)?;
                if running.is_empty() {
                    break;
                }
                for t in running.drain(..) {
                    prop_assert!(q.release(t));
                }
            }
            prop_assert_eq!(q.queued(), 0);
            prop_assert_eq!(q.used(), 0);
            prop_assert_eq!(q.running(), 0);
            for (t, _) in &pushed {
                prop_assert!(admitted.contains(t) || cancelled.contains(t), "request {} never ended", t);
            }
        }
    }
}
