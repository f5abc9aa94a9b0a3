//! Keeps the proxy's virtual keys in step with the store: re-reads them whenever the
//! router says they changed.

use std::collections::BTreeSet;
use std::sync::Arc;

use apikeyrouter::VirtualKeyChange;
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::state::AppState;

/// More changed keys than this waiting at once are read in one listing rather than
/// one by one.
const NAMED_READS: usize = 64;

/// Re-reads stored virtual keys whenever the router says they changed: the key named,
/// when it changed through this instance or another (by its change event); all of
/// them at the router's periodic reading (after the budgets), after a lost change
/// subscription, or when this follower lagged. Changes waiting together are read
/// together. A failed read is logged, and the next change reads all of them.
pub(super) fn follow_virtual_keys(state: &Arc<AppState>, mut changes: Receiver<VirtualKeyChange>) {
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut failed = false;
        while let Some(read) = next_read(&mut changes, failed).await {
            let Some(state) = weak.upgrade() else { return };
            let result = match read {
                Read::All => state.refresh_virtual_keys().await,
                Read::Named(names) => {
                    state
                        .refresh_named_virtual_keys(names.iter().map(String::as_str))
                        .await
                }
            };
            failed = result.is_err();
            if let Err(e) = result {
                tracing::warn!(error = %e, "stored virtual keys not re-read");
            }
        }
    });
}

/// What the follower reads next.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    All,
    Named(BTreeSet<String>),
}

/// Waits for the next change and gathers every change already waiting behind it into
/// one read: all keys when the last read failed, on `All`, on lag, or past
/// [`NAMED_READS`] names; else the keys named, each once. `None` once the router is gone.
async fn next_read(changes: &mut Receiver<VirtualKeyChange>, after_failure: bool) -> Option<Read> {
    let mut all = after_failure;
    let mut names = BTreeSet::new();
    let mut next = changes.recv().await;
    loop {
        match next {
            Ok(VirtualKeyChange::One(name)) => {
                names.insert(name);
            }
            Ok(VirtualKeyChange::All) | Err(RecvError::Lagged(_)) => all = true,
            Err(RecvError::Closed) => return None,
        }
        next = match changes.try_recv() {
            Ok(change) => Ok(change),
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
            Err(TryRecvError::Closed) => Err(RecvError::Closed),
        };
    }
    Some(if all || names.len() > NAMED_READS {
        Read::All
    } else {
        Read::Named(names)
    })
}

#[cfg(test)]
mod tests {
    use tokio::sync::broadcast;

    use super::*;

    fn one(name: &str) -> VirtualKeyChange {
        VirtualKeyChange::One(name.to_owned())
    }

    fn named(names: &[&str]) -> Option<Read> {
        Some(Read::Named(names.iter().map(|n| (*n).to_owned()).collect()))
    }

    #[tokio::test]
    async fn changes_waiting_together_are_one_read_of_the_keys_named_each_once() {
        let (tx, mut rx) = broadcast::channel(16);
        for name in ["b", "a", "b"] {
            tx.send(one(name)).unwrap();
        }
        assert_eq!(next_read(&mut rx, false).await, named(&["a", "b"]));
        // Gathering stopped at the empty channel: a later change is a read of its own.
        tx.send(one("c")).unwrap();
        assert_eq!(next_read(&mut rx, false).await, named(&["c"]));
    }

    #[tokio::test]
    async fn more_names_than_the_named_reads_are_one_listing() {
        let (tx, mut rx) = broadcast::channel(256);
        let names: Vec<String> = (0..=NAMED_READS).map(|i| format!("vk-{i:03}")).collect();
        for name in &names[..NAMED_READS] {
            tx.send(one(name)).unwrap();
        }
        let Some(Read::Named(read)) = next_read(&mut rx, false).await else {
            panic!("{NAMED_READS} names are read by name");
        };
        assert_eq!(read.len(), NAMED_READS);
        for name in &names {
            tx.send(one(name)).unwrap();
        }
        assert_eq!(next_read(&mut rx, false).await, Some(Read::All));
    }

    #[tokio::test]
    async fn a_periodic_reading_among_named_changes_reads_all() {
        let (tx, mut rx) = broadcast::channel(16);
        tx.send(one("a")).unwrap();
        tx.send(VirtualKeyChange::All).unwrap();
        tx.send(one("b")).unwrap();
        assert_eq!(next_read(&mut rx, false).await, Some(Read::All));
    }

    #[tokio::test]
    async fn a_follower_that_lagged_reads_all() {
        let (tx, mut rx) = broadcast::channel(2);
        for name in ["a", "b", "c", "d"] {
            tx.send(one(name)).unwrap();
        }
        // "a" and "b" were overwritten before they were received.
        assert_eq!(next_read(&mut rx, false).await, Some(Read::All));
        tx.send(one("e")).unwrap();
        assert_eq!(next_read(&mut rx, false).await, named(&["e"]));
    }

    #[tokio::test]
    async fn the_change_after_a_failed_read_reads_all() {
        let (tx, mut rx) = broadcast::channel(16);
        tx.send(one("a")).unwrap();
        assert_eq!(next_read(&mut rx, true).await, Some(Read::All));
    }

    #[tokio::test]
    async fn the_follower_stops_when_the_router_is_gone() {
        let (tx, mut rx) = broadcast::channel(16);
        tx.send(one("a")).unwrap();
        drop(tx);
        assert_eq!(next_read(&mut rx, false).await, None);
    }
}
