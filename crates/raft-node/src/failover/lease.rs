//! Primary lease arithmetic (safety rule S2), on monotonic milliseconds of each party's own
//! clock. The holder starts its lease when it *sends* the renewal; the grantor counts from when it
//! *receives* it and adds a drift margin, so the holder's lease always ends first in real time
//! while clock rates differ by less than [`max_clock_rate_error`].

use serde::{Deserialize, Serialize};

use crate::dynamic_config::DynamicConfig;

/// Monotonic milliseconds on one party's own clock.
pub type Millis = u64;

/// A lease as its holder keeps it: writable strictly before `expires_at` on the holder's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLease {
    /// The epoch the lease is for.
    pub epoch: u64,
    /// Holder's clock: send time of the renewal that was granted, plus the lease length.
    pub expires_at: Millis,
}

impl HeldLease {
    /// The lease for a renewal the holder sent at `sent_at` and the grantor granted for
    /// `lease_ms`.
    pub fn from_grant(epoch: u64, sent_at: Millis, lease_ms: u64) -> Self {
        Self {
            epoch,
            expires_at: sent_at.saturating_add(lease_ms),
        }
    }

    /// Whether the holder may still write at `now` (holder's clock).
    pub fn valid_at(&self, now: Millis) -> bool {
        now < self.expires_at
    }

    /// Keeps the later of two leases of the same epoch (a late reply must not shorten it).
    pub fn extend(self, other: HeldLease) -> HeldLease {
        let later_same_epoch = other.epoch == self.epoch && other.expires_at > self.expires_at;
        if later_same_epoch || other.epoch > self.epoch {
            other
        } else {
            self
        }
    }
}

/// The end of a granted lease as the grantor must assume it: receipt time plus lease plus drift
/// margin, on the grantor's clock. Before this instant nobody else may be made primary.
pub fn grantor_safe_after(received_at: Millis, cfg: &DynamicConfig) -> Millis {
    received_at
        .saturating_add(cfg.lease_ms)
        .saturating_add(cfg.drift_margin_ms)
}

/// How long a newly elected Raft leader waits from taking office before it promotes anyone
/// (S2, with the refinement of the design brief). It cannot know what its predecessor granted,
/// but:
/// - the predecessor granted a lease only while its last quorum confirmation (counted from when
///   the heartbeats left) was at most `quorum_ack_max_ms` old;
/// - every member of that quorum refreshed its Raft leader lease when the heartbeat arrived,
///   and refuses to vote for anyone for `raft_leader_lease_ms` after (openraft 0.9.25);
/// - this leader's voters intersect that quorum.
///
/// So every lease the predecessor granted ends (grantor's bound) no later than
/// `election + lease + margin + quorum_ack_max - raft_leader_lease`; the drift term covers clock
/// rates differing by up to [`max_clock_rate_error`] on the two intervals measured on other
/// members' clocks.
pub fn new_leader_wait(
    cfg: &DynamicConfig,
    quorum_ack_max_ms: u64,
    raft_leader_lease_ms: u64,
) -> u64 {
    let drift = (2.0
        * max_clock_rate_error(cfg)
        * (quorum_ack_max_ms + raft_leader_lease_ms) as f64)
        .ceil() as u64;
    (cfg.lease_ms + cfg.drift_margin_ms + quorum_ack_max_ms + drift)
        .saturating_sub(raft_leader_lease_ms)
}

/// The largest relative clock-rate error (e.g. 0.04 = 4 %) between holder and grantor that the
/// margin covers: the holder's lease, measured slow, must end before the grantor's, measured
/// fast: `L / (1 - r) <= (L + m) / (1 + r)`, so `r <= m / (2L + m)`.
pub fn max_clock_rate_error(cfg: &DynamicConfig) -> f64 {
    let l = cfg.lease_ms as f64;
    let m = cfg.drift_margin_ms as f64;
    m / (2.0 * l + m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_counts_from_send_grantor_from_receipt_plus_margin() {
        let cfg = DynamicConfig::default();
        let held = HeldLease::from_grant(3, 1_000, cfg.lease_ms);
        assert!(held.valid_at(1_000 + cfg.lease_ms - 1));
        assert!(!held.valid_at(1_000 + cfg.lease_ms));
        // Same clock, receipt later than send: the grantor's bound is strictly later.
        assert!(grantor_safe_after(1_005, &cfg) > held.expires_at);
    }

    #[test]
    fn later_grants_extend_never_shorten() {
        let a = HeldLease::from_grant(1, 100, 2_000);
        let b = HeldLease::from_grant(1, 50, 2_000);
        assert_eq!(a.extend(b), a);
        assert_eq!(b.extend(a), a);
        let newer_epoch = HeldLease::from_grant(2, 10, 2_000);
        assert_eq!(a.extend(newer_epoch), newer_epoch);
    }

    #[test]
    fn margin_covers_the_advertised_rate_error() {
        let cfg = DynamicConfig::default();
        let r = max_clock_rate_error(&cfg);
        // Far above real clock-rate differences (parts per million).
        assert!(r > 0.02 && r < 0.1, "{r}");
        let l = cfg.lease_ms as f64;
        let m = cfg.drift_margin_ms as f64;
        assert!(l / (1.0 - r) <= (l + m) / (1.0 + r) + 1e-9);
    }
}
