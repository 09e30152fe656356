//! Consecutive probe failures with a threshold, so that one missed probe
//! does not flap a member's health.

/// Health verdict after recording a probe result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Last probe succeeded.
    Healthy,
    /// Failing, but fewer than `threshold` times in a row.
    Suspect {
        /// Consecutive failures so far.
        failures: u32,
    },
    /// `threshold` or more consecutive failures.
    Failed {
        /// Consecutive failures so far.
        failures: u32,
    },
}

/// Counts consecutive failed probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureCounter {
    threshold: u32,
    consecutive: u32,
}

impl FailureCounter {
    /// `threshold` consecutive failures mean failed; 0 is treated as 1.
    pub fn new(threshold: u32) -> Self {
        FailureCounter {
            threshold: threshold.max(1),
            consecutive: 0,
        }
    }

    /// Records one probe and returns the verdict.
    pub fn record(&mut self, success: bool) -> Health {
        if success {
            self.consecutive = 0;
        } else {
            self.consecutive = self.consecutive.saturating_add(1);
        }
        self.health()
    }

    /// The current verdict.
    pub fn health(&self) -> Health {
        match self.consecutive {
            0 => Health::Healthy,
            n if n < self.threshold => Health::Suspect { failures: n },
            n => Health::Failed { failures: n },
        }
    }

    /// Consecutive failures so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// True once the threshold is reached.
    pub fn is_failed(&self) -> bool {
        matches!(self.health(), Health::Failed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_miss_does_not_fail() {
        let mut c = FailureCounter::new(3);
        assert_eq!(c.record(false), Health::Suspect { failures: 1 });
        assert_eq!(c.record(true), Health::Healthy);
        assert_eq!(c.record(false), Health::Suspect { failures: 1 });
        assert!(!c.is_failed());
    }

    #[test]
    fn threshold_consecutive_misses_fail_until_success() {
        let mut c = FailureCounter::new(3);
        c.record(false);
        c.record(false);
        assert_eq!(c.record(false), Health::Failed { failures: 3 });
        assert_eq!(c.record(false), Health::Failed { failures: 4 });
        assert!(c.is_failed());
        assert_eq!(c.record(true), Health::Healthy);
        assert_eq!(c.consecutive_failures(), 0);
    }

    #[test]
    fn zero_threshold_means_one() {
        let mut c = FailureCounter::new(0);
        assert_eq!(c.record(false), Health::Failed { failures: 1 });
    }
}
