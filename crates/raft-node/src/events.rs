//! A bounded record of what this sidecar did and decided (role transitions, fences,
//! promotions, failover verdicts), served through the API so operators see why, not only what.
//! It is kept in the sidecar's sled store, so the events before a restart are still there to
//! investigate it; sled writes them out within its flush interval (half a second), and the
//! node flushes at a clean shutdown.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::proto;

/// How many events a sidecar keeps.
pub const CAPACITY: usize = 500;

#[derive(Default)]
struct Kept {
    events: VecDeque<proto::Event>,
    /// The sequence number of the next event (its key in the store).
    next: u64,
}

/// Recent events of one sidecar. Cheap to clone: clones share the record.
#[derive(Clone, Default)]
pub struct EventLog {
    node: u64,
    kept: Arc<Mutex<Kept>>,
    tree: Option<sled::Tree>,
}

impl EventLog {
    /// An empty record for node `node`, in memory only.
    pub fn new(node: u64) -> Self {
        Self {
            node,
            kept: Arc::default(),
            tree: None,
        }
    }

    /// The record of node `node` kept in `tree`, with the events stored there before.
    /// Entries that do not decode (a damaged store) are skipped, not fatal: events explain,
    /// they decide nothing.
    pub fn open(node: u64, tree: sled::Tree) -> Result<Self, sled::Error> {
        let mut kept = Kept::default();
        for entry in tree.iter().rev().take(CAPACITY) {
            let (key, value) = entry?;
            let seq = key.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            kept.next = kept.next.max(seq + 1);
            if let Ok(e) = proto::Event::decode(value.as_ref()) {
                kept.events.push_front(e);
            }
        }
        Ok(Self {
            node,
            kept: Arc::new(Mutex::new(kept)),
            tree: Some(tree),
        })
    }

    /// Records an event of `kind` ("transition", "failover", "raft") with its epoch and LSN.
    pub fn record(&self, kind: &str, message: impl Into<String>, epoch: u64, lsn: u64) {
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let event = proto::Event {
            at_unix_ms,
            node_id: self.node,
            kind: kind.to_string(),
            message: message.into(),
            epoch,
            lsn,
        };
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        let seq = kept.next;
        kept.next += 1;
        if let Some(tree) = &self.tree {
            let stored = tree
                .insert(seq.to_be_bytes(), event.encode_to_vec())
                .and_then(|_| match seq.checked_sub(CAPACITY as u64) {
                    Some(old) => tree.remove(old.to_be_bytes()).map(|_| ()),
                    None => Ok(()),
                });
            if let Err(e) = stored {
                tracing::warn!(error = %e, "cannot store an event; it is kept in memory only");
            }
        }
        kept.events.push_back(event);
        while kept.events.len() > CAPACITY {
            kept.events.pop_front();
        }
    }

    /// Every kept event, oldest first.
    pub fn snapshot(&self) -> Vec<proto::Event> {
        self.kept
            .lock()
            .map(|k| k.events.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_events_in_order() {
        let log = EventLog::new(7);
        for i in 0..(CAPACITY as u64 + 5) {
            log.record("transition", format!("e{i}"), i, 0);
        }
        let all = log.snapshot();
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].message, "e5");
        assert_eq!(all.last().map(|e| e.node_id), Some(7));
    }

    #[test]
    fn stored_events_survive_a_reopen_and_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = EventLog::open(3, db.open_tree("events").unwrap()).unwrap();
        for i in 0..(CAPACITY as u64 + 10) {
            log.record("failover", format!("e{i}"), i, 0);
        }
        db.flush().unwrap();
        drop(log);
        drop(db);
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("events").unwrap();
        assert_eq!(tree.len(), CAPACITY, "the store stays bounded");
        let log = EventLog::open(3, tree).unwrap();
        let all = log.snapshot();
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].message, "e10");
        assert_eq!(all.last().map(|e| e.message.as_str()), Some("e509"));
        // New events continue after the old ones.
        log.record("raft", "after", 0, 0);
        assert_eq!(
            log.snapshot().last().map(|e| e.message.as_str()),
            Some("after")
        );
        assert_eq!(log.snapshot().len(), CAPACITY);
    }
}
