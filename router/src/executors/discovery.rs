//! Discovery of the workers behind an https name: the name is resolved again every
//! `--discovery-interval-s`, each address it returns is a worker (a Kubernetes headless
//! Service returns one per ready pod), new addresses join the pool and vanished ones drain.

use std::collections::HashSet;
use std::time::Duration;

use crate::executors::endpoint::{ExecutorAddress, Target};

/// What discovery changes: the workers of one `--executor` (the pool implements it).
pub trait Membership {
    /// The targets of `source` that are members now (not draining).
    fn targets_of(&self, source: &ExecutorAddress) -> Vec<Target>;
    fn join(&self, source: ExecutorAddress, target: Target);
    fn leave(&self, target: &Target);
}

/// What changes between the targets in the pool and those the name resolves to now.
#[derive(Debug, PartialEq, Eq)]
pub struct Change {
    pub join: Vec<Target>,
    pub leave: Vec<Target>,
}

pub fn diff(current: &[Target], resolved: &[Target]) -> Change {
    let now: HashSet<&Target> = resolved.iter().collect();
    let had: HashSet<&Target> = current.iter().collect();
    let mut join: Vec<Target> = resolved
        .iter()
        .filter(|t| !had.contains(t))
        .cloned()
        .collect();
    join.dedup();
    Change {
        join,
        leave: current
            .iter()
            .filter(|t| !now.contains(t))
            .cloned()
            .collect(),
    }
}

async fn resolve(host: &str, port: u16) -> std::io::Result<Vec<Target>> {
    let mut targets: Vec<Target> = tokio::net::lookup_host((host, port))
        .await?
        .map(|addr| Target::Tcp {
            addr,
            host: host.to_string(),
        })
        .collect();
    targets.sort_by_key(|t| t.to_string());
    targets.dedup();
    Ok(targets)
}

/// Keeps the workers of `address` equal to what its name resolves to, for as long as `pool`
/// gives a member set (None: the pool is gone). A failed lookup changes nothing (a DNS outage
/// must not empty the pool).
pub(crate) async fn follow<M: Membership>(
    pool: impl Fn() -> Option<M>,
    address: ExecutorAddress,
    every: Duration,
) {
    let ExecutorAddress::Https { host, port } = &address else {
        return;
    };
    loop {
        match resolve(host, *port).await {
            Ok(resolved) => {
                let Some(pool) = pool() else {
                    return;
                };
                let change = diff(&pool.targets_of(&address), &resolved);
                for target in change.join {
                    pool.join(address.clone(), target);
                }
                for target in change.leave {
                    pool.leave(&target);
                }
            }
            Err(e) => {
                tracing::warn!(executor = %address, error = %e, "cannot resolve the executor's name; keeping its workers");
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(last: u8) -> Target {
        Target::Tcp {
            addr: ([10, 0, 0, last], 50051).into(),
            host: "executors".into(),
        }
    }

    #[test]
    fn new_addresses_join_and_vanished_ones_leave() {
        let change = diff(&[tcp(1), tcp(2)], &[tcp(2), tcp(3)]);
        assert_eq!(change.join, vec![tcp(3)]);
        assert_eq!(change.leave, vec![tcp(1)]);
        let same = diff(&[tcp(1)], &[tcp(1)]);
        assert!(same.join.is_empty() && same.leave.is_empty());
    }

    #[tokio::test]
    async fn a_name_resolves_to_one_target_per_address() {
        let targets = resolve("localhost", 50051)
            .await
            .expect("localhost resolves");
        assert!(!targets.is_empty());
        for t in &targets {
            assert!(
                matches!(t, Target::Tcp { addr, host } if addr.ip().is_loopback() && host == "localhost")
            );
        }
    }
}
