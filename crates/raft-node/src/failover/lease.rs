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

/// The lease held once a grant of `epoch` for `lease_ms` answers a report sent at `sent_at`
/// (holder's clock): it extends a lease of the same epoch, replaces one of an older epoch, and
/// never shortens what is held.
pub fn renewed(held: Option<HeldLease>, epoch: u64, sent_at: Millis, lease_ms: u64) -> HeldLease {
    let new = HeldLease::from_grant(epoch, sent_at, lease_ms);
    held.map_or(new, |old| old.extend(new))
}

/// The lease a new sidecar holds after adopting the guard its predecessor left running: the
/// guard's deadline (on the same clock), for the epoch the data directory last served as primary
/// in. `None` when the guard holds no deadline (a replica) or the epoch is unknown: such a server
/// gets nothing from the past and is judged like any other.
///
/// This does not break S8 (fenced at birth): the lease was granted to this member by a leader
/// and the guard fences at its end whatever the new sidecar does, so the new sidecar believes
/// in nothing the cluster has not granted; taking it over only lets the sidecar renew it instead
/// of fencing a primary that is still entitled to write.
pub fn adopted_lease(
    guard_deadline: Option<Millis>,
    last_primary_epoch: Option<u64>,
) -> Option<HeldLease> {
    let epoch = last_primary_epoch.filter(|e| *e > 0)?;
    Some(HeldLease {
        epoch,
        expires_at: guard_deadline?,
    })
}

/// The length of a lease and the drift margin its grantor adds: every grant records the terms it
/// was given under, and is judged by them, never by the configuration of the moment (an operator
/// may shorten the lease while an old grant still runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTerms {
    /// Lease length, counted by the holder from when it sent the renewal.
    pub lease_ms: u64,
    /// What the grantor adds for clock-rate differences.
    pub drift_margin_ms: u64,
}

impl LeaseTerms {
    /// The terms a grant made now would carry.
    pub fn of(cfg: &DynamicConfig) -> Self {
        Self {
            lease_ms: cfg.lease_ms,
            drift_margin_ms: cfg.drift_margin_ms,
        }
    }

    /// Lease plus margin: how long after receipt the grantor must assume the lease runs.
    pub fn grantor_span(&self) -> u64 {
        self.lease_ms.saturating_add(self.drift_margin_ms)
    }

    /// The longer of two sets of terms (by grantor span).
    pub fn longest(self, other: LeaseTerms) -> LeaseTerms {
        if other.grantor_span() > self.grantor_span() {
            other
        } else {
            self
        }
    }

    /// The largest relative clock-rate error (e.g. 0.04 = 4 %) between two parties that the
    /// margin covers: the holder's lease, measured slow, must end before the grantor's, measured
    /// fast: `L / (1 - r) <= (L + m) / (1 + r)`, so `r <= m / (2L + m)`.
    pub fn max_clock_rate_error(&self) -> f64 {
        let l = self.lease_ms as f64;
        let m = self.drift_margin_ms as f64;
        m / (2.0 * l + m)
    }
}

/// The end of a granted lease as the grantor must assume it: receipt time plus the granted lease
/// plus its drift margin, on the grantor's clock. Before this instant nobody else may be made
/// primary.
pub fn grantor_safe_after(received_at: Millis, terms: LeaseTerms) -> Millis {
    received_at.saturating_add(terms.grantor_span())
}

/// A leader grants leases only while its last quorum confirmation is at most this many
/// heartbeats old.
pub const QUORUM_ACKS_PER_GRANT: u64 = 3;

/// The oldest quorum confirmation a leader running `heartbeat_ms` grants a lease on.
pub fn quorum_ack_max_ms(heartbeat_ms: u64) -> u64 {
    QUORUM_ACKS_PER_GRANT.saturating_mul(heartbeat_ms)
}

/// How long a newly elected Raft leader waits from taking office before it promotes anyone
/// (S2). It cannot know what its predecessor granted, but:
/// - the predecessor granted a lease only while its last quorum confirmation (counted from when
///   the heartbeats left) was at most `quorum_ack_max_ms` old;
/// - that confirmation was acknowledged by a majority in the old term, and one member of it also
///   voted for this leader, after acknowledging (a voter refuses the old term once it voted), so
///   the confirmation left before this leader took office.
///
/// So every lease the predecessor granted ends, by its grantor's bound, within
/// `quorum_ack_max + lease + margin` of this leader taking office, measured on the
/// predecessor's clock; scaled by `(1 + r) / (1 - r)` it holds on this leader's clock too. The
/// wait does not subtract the Raft leader lease: in openraft 0.9.25 a leader refreshes its own
/// vote time only on incoming RPCs, so it may itself vote for a successor, and the quorums of the
/// two terms need not share a member that refused votes.
pub fn new_leader_wait(terms: LeaseTerms, quorum_ack_max_ms: u64) -> u64 {
    let r = terms.max_clock_rate_error();
    let span = (quorum_ack_max_ms + terms.grantor_span()) as f64;
    (span * (1.0 + r) / (1.0 - r)).ceil() as u64
}

/// The clock-rate error the configured margin covers ([`LeaseTerms::max_clock_rate_error`]).
pub fn max_clock_rate_error(cfg: &DynamicConfig) -> f64 {
    LeaseTerms::of(cfg).max_clock_rate_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_extends_the_lease_of_its_epoch_and_never_shortens_it() {
        let held = renewed(None, 3, 1_000, 2_500);
        assert_eq!(held.expires_at, 3_500);
        assert_eq!(renewed(Some(held), 3, 1_500, 2_500).expires_at, 4_000);
        // An answer to an older report comes late: it shortens nothing.
        assert_eq!(renewed(Some(held), 3, 500, 2_500), held);
        // A grant of a later epoch replaces the lease, even when it ends sooner.
        assert_eq!(
            renewed(Some(held), 4, 600, 2_500),
            HeldLease {
                epoch: 4,
                expires_at: 3_100
            }
        );
        // A grant of an older epoch changes nothing.
        assert_eq!(renewed(Some(held), 2, 9_000, 2_500), held);
    }

    #[test]
    fn an_adopted_lease_is_the_guards_deadline_for_a_known_primary_epoch() {
        assert_eq!(
            adopted_lease(Some(900), Some(4)),
            Some(HeldLease {
                epoch: 4,
                expires_at: 900
            })
        );
        assert_eq!(adopted_lease(None, Some(4)), None, "a replica's guard");
        assert_eq!(adopted_lease(Some(900), None), None, "never a primary");
        assert_eq!(adopted_lease(Some(900), Some(0)), None, "epoch unknown");
    }

    #[test]
    fn holder_counts_from_send_grantor_from_receipt_plus_margin() {
        let cfg = DynamicConfig::default();
        let held = HeldLease::from_grant(3, 1_000, cfg.lease_ms);
        assert!(held.valid_at(1_000 + cfg.lease_ms - 1));
        assert!(!held.valid_at(1_000 + cfg.lease_ms));
        // Same clock, receipt later than send: the grantor's bound is strictly later.
        assert!(grantor_safe_after(1_005, LeaseTerms::of(&cfg)) > held.expires_at);
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

    #[test]
    fn a_grant_is_judged_by_the_terms_it_was_given_under() {
        // Granted under a 10 s lease; the operator then lowers it to 2 s. The grant still runs
        // 10 s plus its margin.
        let granted = LeaseTerms {
            lease_ms: 10_000,
            drift_margin_ms: 200,
        };
        let lowered = LeaseTerms {
            lease_ms: 2_000,
            drift_margin_ms: 100,
        };
        assert_eq!(grantor_safe_after(1_000, granted), 11_200);
        assert_eq!(granted.longest(lowered), granted);
        assert_eq!(lowered.longest(granted), granted);
    }

    #[test]
    fn new_leader_waits_at_least_ack_bound_plus_lease_plus_margin_with_drift() {
        let cfg = DynamicConfig::default();
        let terms = LeaseTerms::of(&cfg);
        let w = new_leader_wait(terms, 450);
        let floor = 450 + cfg.lease_ms + cfg.drift_margin_ms;
        assert!(w > floor, "{w} <= {floor}");
        // With clocks at the edge of the covered rate error, the predecessor's bound (measured
        // fast) still ends before this leader's wait (measured slow).
        let r = terms.max_clock_rate_error();
        assert!(w as f64 * (1.0 - r) >= floor as f64 * (1.0 + r) - 1e-6);
    }
}
