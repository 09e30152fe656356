//! A bounded, in-memory record of what this sidecar did and decided (role transitions, fences,
//! promotions, failover verdicts), served through the API so operators see why, not only what.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::proto;

/// How many events a sidecar keeps.
pub const CAPACITY: usize = 500;

/// Recent events of one sidecar. Cheap to clone: clones share the record.
#[derive(Clone, Default)]
pub struct EventLog {
    node: u64,
    events: Arc<Mutex<VecDeque<proto::Event>>>,
}

impl EventLog {
    /// An empty record for node `node`.
    pub fn new(node: u64) -> Self {
        Self {
            node,
            events: Arc::default(),
        }
    }

    /// Records an event of `kind` ("transition", "failover", "raft") with its epoch and LSN.
    pub fn record(&self, kind: &str, message: impl Into<String>, epoch: u64, lsn: u64) {
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if let Ok(mut events) = self.events.lock() {
            events.push_back(proto::Event {
                at_unix_ms,
                node_id: self.node,
                kind: kind.to_string(),
                message: message.into(),
                epoch,
                lsn,
            });
            while events.len() > CAPACITY {
                events.pop_front();
            }
        }
    }

    /// Every kept event, oldest first.
    pub fn snapshot(&self) -> Vec<proto::Event> {
        self.events
            .lock()
            .map(|e| e.iter().cloned().collect())
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
}
