//! The generations now in the router (queued, held or running) by request id, so that the
//! control plane can abort them: one id's (/abort_request {"rid"}) or every one.
//!
//! A generation waiting for admission is woken by its abort signal; one admitted to the
//! executor is aborted there (the caller sends the returned executor ids to
//! `ExecutorHandle::abort`), so that its stream ends at once even if nobody polls it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// A request's id: the client's `x-request-id`, or one the router made.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(pub Arc<str>);

impl RequestId {
    /// A fresh id: 32 hex digits.
    pub fn generate() -> Self {
        Self(Arc::from(format!("{:032x}", rand::random::<u128>())))
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

enum Stage {
    /// Queued or held: the abort wakes the admission wait.
    Waiting(oneshot::Sender<String>),
    /// In the executor under this id.
    Admitted(u64),
}

struct Entry {
    key: u64,
    stage: Stage,
}

/// Every live generation, by request id. One id may name several generations (the `n`
/// choices of an OpenAI request, or a client that reuses an id): an abort reaches them all.
#[derive(Default)]
pub struct RequestRegistry {
    live: Mutex<HashMap<RequestId, Vec<Entry>>>,
    next_key: AtomicU64,
}

/// What an abort reached.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Aborted {
    /// Generations ended (waiting and admitted).
    pub count: usize,
    /// The admitted ones' executor ids: abort them in the executor.
    pub executor_ids: Vec<u64>,
}

impl RequestRegistry {
    fn live(&self) -> MutexGuard<'_, HashMap<RequestId, Vec<Entry>>> {
        // Every change under this lock is one insert or remove, so a panic elsewhere while it
        // was held leaves the map consistent: a poisoned lock is still usable.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a generation under `id`, waiting for admission; listed until the
    /// registration is dropped.
    pub fn register(self: &Arc<Self>, id: RequestId) -> (AbortSignal, Registration) {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.live().entry(id.clone()).or_default().push(Entry {
            key,
            stage: Stage::Waiting(tx),
        });
        let registration = Registration {
            registry: self.clone(),
            id,
            key,
        };
        (AbortSignal { rx: Some(rx) }, registration)
    }

    /// Aborts every generation under `id`.
    pub fn abort_id(&self, id: &RequestId, reason: &str) -> Aborted {
        let entries = self.live().remove(id).unwrap_or_default();
        end(entries, reason)
    }

    /// Aborts every generation.
    pub fn abort_all(&self, reason: &str) -> Aborted {
        let entries: Vec<Entry> = self.live().drain().flat_map(|(_, v)| v).collect();
        end(entries, reason)
    }

    /// Generations listed now.
    pub fn len(&self) -> usize {
        self.live().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn unregister(&self, id: &RequestId, key: u64) {
        let mut live = self.live();
        if let Some(entries) = live.get_mut(id) {
            entries.retain(|e| e.key != key);
            if entries.is_empty() {
                live.remove(id);
            }
        }
    }

    /// Records the admission; false if the generation was aborted first (it is unlisted
    /// then, and its signal has fired).
    fn admit(&self, id: &RequestId, key: u64, executor_id: u64) -> bool {
        let mut live = self.live();
        let entry = live
            .get_mut(id)
            .and_then(|entries| entries.iter_mut().find(|e| e.key == key));
        match entry {
            Some(e) => {
                e.stage = Stage::Admitted(executor_id);
                true
            }
            None => false,
        }
    }
}

fn end(entries: Vec<Entry>, reason: &str) -> Aborted {
    let mut aborted = Aborted {
        count: entries.len(),
        executor_ids: Vec::new(),
    };
    for e in entries {
        match e.stage {
            Stage::Waiting(tx) => {
                let _ = tx.send(reason.to_string());
            }
            Stage::Admitted(id) => aborted.executor_ids.push(id),
        }
    }
    aborted
}

/// Lists its generation until dropped.
pub struct Registration {
    registry: Arc<RequestRegistry>,
    id: RequestId,
    key: u64,
}

impl Registration {
    /// The generation is in the executor as `executor_id` now. False when an abort came
    /// first: the caller must abort it.
    pub fn admitted(&self, executor_id: u64) -> bool {
        self.registry.admit(&self.id, self.key, executor_id)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.unregister(&self.id, self.key);
    }
}

/// Resolves with the reason when the waiting generation is aborted; never otherwise.
pub struct AbortSignal {
    rx: Option<oneshot::Receiver<String>>,
}

impl AbortSignal {
    /// Cancel-safe: may be polled in a `select!` again and again.
    pub async fn aborted(&mut self) -> String {
        if let Some(rx) = self.rx.as_mut() {
            let fired = rx.await;
            self.rx = None;
            if let Ok(reason) = fired {
                return reason;
            }
            // Admitted or unlisted without an abort: nothing can fire any more.
        }
        std::future::pending().await
    }

    /// The reason, if the abort has already come.
    pub fn try_aborted(&mut self) -> Option<String> {
        self.rx.as_mut().and_then(|rx| rx.try_recv().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(s: &str) -> RequestId {
        RequestId(Arc::from(s))
    }

    async fn fired(signal: &mut AbortSignal) -> Option<String> {
        tokio::time::timeout(Duration::from_millis(50), signal.aborted())
            .await
            .ok()
    }

    #[tokio::test]
    async fn abort_by_id_reaches_every_generation_of_the_id() {
        let registry = Arc::new(RequestRegistry::default());
        let (mut a, _ra) = registry.register(id("r1"));
        let (mut b, rb) = registry.register(id("r1"));
        let (mut c, _rc) = registry.register(id("r2"));
        assert!(rb.admitted(42));
        let aborted = registry.abort_id(&id("r1"), "stop");
        assert_eq!(aborted.count, 2);
        assert_eq!(
            aborted.executor_ids,
            vec![42],
            "the admitted one, by executor id"
        );
        assert_eq!(fired(&mut a).await.as_deref(), Some("stop"));
        assert_eq!(
            fired(&mut b).await,
            None,
            "admitted: ended in the executor instead"
        );
        assert_eq!(fired(&mut c).await, None);
        assert_eq!(registry.abort_id(&id("r1"), "again"), Aborted::default());
        assert_eq!(registry.len(), 1);
    }

    #[tokio::test]
    async fn a_finished_generation_is_unlisted_and_its_signal_stays_quiet() {
        let registry = Arc::new(RequestRegistry::default());
        let (mut signal, registration) = registry.register(id("r1"));
        drop(registration);
        assert!(registry.is_empty());
        assert_eq!(registry.abort_id(&id("r1"), "x").count, 0);
        assert_eq!(fired(&mut signal).await, None);
        assert_eq!(
            fired(&mut signal).await,
            None,
            "polled again: still pending"
        );
    }

    #[tokio::test]
    async fn an_abort_before_the_admission_is_recorded_wins() {
        let registry = Arc::new(RequestRegistry::default());
        let (mut signal, registration) = registry.register(id("r"));
        assert_eq!(registry.abort_all("update").count, 1);
        // The scheduler admitted it meanwhile: the admission must not stick.
        assert!(!registration.admitted(7));
        assert_eq!(signal.try_aborted().as_deref(), Some("update"));
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn abort_all_ends_waiting_and_admitted() {
        let registry = Arc::new(RequestRegistry::default());
        let (mut waiting, _w) = registry.register(id("a"));
        let (_running, r) = registry.register(id("b"));
        assert!(r.admitted(9));
        let aborted = registry.abort_all("all");
        assert_eq!(aborted.count, 2);
        assert_eq!(aborted.executor_ids, vec![9]);
        assert_eq!(fired(&mut waiting).await.as_deref(), Some("all"));
        assert!(registry.is_empty());
    }
}
