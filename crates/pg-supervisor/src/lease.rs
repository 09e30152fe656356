//! Lease deadlines shared between the sidecar and the guard.
//!
//! Deadlines are absolute readings of `CLOCK_BOOTTIME`, a host-wide clock
//! both processes read identically, so a message delayed in the pipe can
//! never extend a lease. BOOTTIME (unlike MONOTONIC) keeps counting while the
//! host is suspended, so a resumed host fences instead of trusting a lease
//! the rest of the cluster has long given up on.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Nanoseconds of `CLOCK_BOOTTIME` now.
pub fn clock_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_BOOTTIME exists on Linux >= 2.6.39.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How long the guard lets PostgreSQL run without hearing from the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lease {
    /// Fence once `CLOCK_BOOTTIME` passes this many nanoseconds: a primary.
    Until(u64),
    /// No deadline: a replica, which cannot accept writes. The guard still
    /// fences if the sidecar dies (its stdin closes).
    NotRequired,
}

impl Lease {
    /// A deadline `d` from now.
    pub fn expires_in(d: Duration) -> Lease {
        Lease::Until(clock_now_ns().saturating_add(d.as_nanos() as u64))
    }

    /// The deadline at `instant` (a `std`/`tokio` instant held by the
    /// sidecar's Raft lease), converted to the guard's clock.
    pub fn expires_at(instant: Instant) -> Lease {
        Lease::expires_in(instant.saturating_duration_since(Instant::now()))
    }

    /// Time left, `None` for no deadline.
    pub fn remaining(&self) -> Option<Duration> {
        match self {
            Lease::Until(ns) => Some(Duration::from_nanos(ns.saturating_sub(clock_now_ns()))),
            Lease::NotRequired => None,
        }
    }

    /// True once the deadline has passed.
    pub fn is_expired(&self) -> bool {
        match self {
            Lease::Until(ns) => clock_now_ns() >= *ns,
            Lease::NotRequired => false,
        }
    }

    /// Wire form used on the guard's stdin and command line.
    pub fn encode(&self) -> String {
        match self {
            Lease::Until(ns) => format!("until:{ns}"),
            Lease::NotRequired => "none".to_string(),
        }
    }

    /// Parses [`Lease::encode`] output.
    pub fn decode(text: &str) -> Option<Lease> {
        match text.trim() {
            "none" => Some(Lease::NotRequired),
            t => t.strip_prefix("until:")?.parse().ok().map(Lease::Until),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for l in [Lease::Until(42), Lease::NotRequired] {
            assert_eq!(Lease::decode(&l.encode()), Some(l));
        }
        assert_eq!(Lease::decode("until:x"), None);
        assert_eq!(Lease::decode("forever"), None);
    }

    #[test]
    fn expiry() {
        assert!(Lease::Until(0).is_expired());
        assert!(!Lease::NotRequired.is_expired());
        let l = Lease::expires_in(Duration::from_secs(60));
        assert!(!l.is_expired());
        assert!(l.remaining().unwrap() > Duration::from_secs(59));
        let past = Lease::expires_at(Instant::now());
        assert!(past.remaining().unwrap() < Duration::from_millis(50));
    }
}
