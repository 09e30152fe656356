//! Synchronous replication (design rule S6), pure: which standbys the primary waits for, in
//! which order a change of that set is committed and applied, and which members a failover may
//! promote without losing an acknowledged write.
//!
//! The invariant: every commit the primary acknowledged is on at least `k` members of the
//! committed set `C`. A failover hears from `|C| - k + 1` members of `C` (any that many overlap
//! every `k` of them) and promotes the most advanced, which then holds every acknowledged write.
//!
//! Changing the set keeps the invariant in two ways:
//! - a *weaker* set (more members, or a smaller `k`) is committed first and applied after: what
//!   was acknowledged under the old set is on enough members of the new one;
//! - a *stronger* set is first a committed target; the primary applies it and confirms that `k`
//!   of its members have flushed past the position where it took effect; only then is it
//!   committed. Until then failover still relies on the old set, which the target satisfies.
//!
//! A change that is neither (replace one standby by another) goes in two steps: grow, then
//! shrink.

use std::collections::{BTreeMap, BTreeSet};

use super::report::SyncApplied;
use crate::cluster_state::{SyncSet, SyncState};
use crate::dynamic_config::{DynamicConfig, SyncMode};
use crate::types::NodeId;

/// Whether `to` may be committed while the primary still runs `from`: every commit
/// acknowledged by `from.k` of `from.members` is on at least `to.k` members of `to`.
pub fn covers(from: &SyncSet, to: &SyncSet) -> bool {
    let outside = from.members.difference(&to.members).count() as u32;
    from.k.saturating_sub(outside) >= to.k
}

/// Like [`covers`], for a committed set that carried over a promotion and names the primary
/// itself: the primary holds every write it acknowledges, so it counts as one holder.
pub fn covers_with_primary(from: &SyncSet, to: &SyncSet, primary: NodeId) -> bool {
    let outside = from.members.difference(&to.members).count() as u32;
    let own = u32::from(to.members.contains(&primary));
    own + from.k.saturating_sub(outside) >= to.k
}

/// How many members of a synchronous set must report before a failover knows which of them
/// holds every acknowledged write: any that many overlap every `k` of them.
pub fn reports_needed(set: &SyncSet) -> usize {
    (set.members.len() + 1)
        .saturating_sub(set.k as usize)
        .max(1)
}

/// The set the cluster should run with. `eligible` are the standbys fit to acknowledge commits
/// now (healthy, streaming from the primary, not tagged `nosync`), best first; `possible` are all
/// members that could ever be (not the primary, not `nosync`).
pub fn desired(
    cfg: &DynamicConfig,
    current: &SyncSet,
    eligible: &[NodeId],
    possible: &BTreeSet<NodeId>,
) -> SyncSet {
    let count = cfg.synchronous_node_count as usize;
    // Keep standbys that are already synchronous, so a healthy set does not churn.
    let mut ordered: Vec<NodeId> = eligible
        .iter()
        .copied()
        .filter(|n| current.members.contains(n))
        .collect();
    ordered.extend(
        eligible
            .iter()
            .copied()
            .filter(|n| !current.members.contains(n)),
    );
    let k = cfg.synchronous_node_count;
    match cfg.synchronous_mode {
        SyncMode::Off => SyncSet::asynchronous(),
        SyncMode::On => {
            let members: BTreeSet<NodeId> = ordered.into_iter().take(count).collect();
            if members.is_empty() {
                SyncSet::asynchronous()
            } else {
                let k = members.len() as u32;
                SyncSet { members, k }
            }
        }
        SyncMode::Strict | SyncMode::Quorum => {
            let take = if cfg.synchronous_mode == SyncMode::Quorum {
                usize::MAX
            } else {
                count
            };
            let mut members: BTreeSet<NodeId> = ordered.into_iter().take(take).collect();
            // Too few fit standbys: keep waiting for the ones that were (writes block), never
            // fall back to asynchronous.
            let fill = current
                .members
                .iter()
                .chain(possible.iter())
                .filter(|n| possible.contains(n));
            for n in fill {
                if members.len() >= count {
                    break;
                }
                members.insert(*n);
            }
            SyncSet { members, k }
        }
    }
}

/// One change of the synchronous set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncStep {
    /// Commit this set (a weaker one, or a target the primary confirmed).
    Commit(SyncSet),
    /// Commit this stronger set as the primary's target.
    Target(SyncSet),
}

/// The next change toward `want`, given the committed state, what the primary reports it runs,
/// and who the primary is. `None`: nothing to do, or waiting for the primary to confirm the
/// target.
pub fn next_step(
    state: &SyncState,
    want: &SyncSet,
    applied: Option<&SyncApplied>,
    primary: NodeId,
) -> Option<SyncStep> {
    let want = normalised(want);
    let committed = &state.committed;
    // A confirmation counts only for the very revision that asks for this set: an older
    // report about the same set may predate a weaker set applied since.
    let confirmed = |t: &SyncSet| {
        applied.is_some_and(|a| {
            a.epoch == state.epoch && a.revision == state.revision && &a.set == t && a.confirmed
        })
    };
    if committed.members.contains(&primary) {
        // Carried over a promotion: the writes acknowledged so far are on the primary and on
        // the old set. A new set replaces it only once it has caught up (confirmed), and only
        // if what it acknowledges meanwhile is covered; `on` may still fall back, committed
        // first.
        if !want.is_synchronous() {
            return Some(SyncStep::Commit(want));
        }
        if !covers_with_primary(&want, committed, primary) {
            return None;
        }
        if state.target.as_ref() != Some(&want) {
            return Some(SyncStep::Target(want));
        }
        return confirmed(&want).then_some(SyncStep::Commit(want));
    }
    if &want == committed {
        // A leftover target would keep the primary on another set: clear it.
        return state
            .target
            .is_some()
            .then(|| SyncStep::Commit(committed.clone()));
    }
    if !want.is_synchronous() {
        return Some(SyncStep::Commit(want));
    }
    let adding = !want.members.is_subset(&committed.members);
    if adding && committed.is_synchronous() {
        return Some(SyncStep::Commit(SyncSet {
            members: committed.members.union(&want.members).copied().collect(),
            k: committed.k,
        }));
    }
    if !adding && want.k < committed.k {
        return Some(SyncStep::Commit(SyncSet {
            members: committed.members.clone(),
            k: want.k,
        }));
    }
    debug_assert!(covers(&want, committed));
    if state.target.as_ref() != Some(&want) {
        return Some(SyncStep::Target(want));
    }
    confirmed(&want).then_some(SyncStep::Commit(want))
}

/// The set the primary of `state.epoch` should run: its target while one is pending, else the
/// committed set.
pub fn to_apply(state: &SyncState) -> &SyncSet {
    state.target.as_ref().unwrap_or(&state.committed)
}

fn normalised(set: &SyncSet) -> SyncSet {
    if set.is_synchronous() {
        set.clone()
    } else {
        SyncSet::asynchronous()
    }
}

/// Whether `set`, in force since WAL position `switch_lsn`, is confirmed: at least `k` of its
/// members have flushed past that position (`flushed`: each standby's flushed position as the
/// primary sees it), so every earlier acknowledged commit is on `k` of them too.
pub fn confirmed(set: &SyncSet, switch_lsn: u64, flushed: &BTreeMap<NodeId, u64>) -> bool {
    let caught_up = set
        .members
        .iter()
        .filter(|m| flushed.get(m).is_some_and(|l| *l >= switch_lsn))
        .count();
    caught_up >= set.k as usize
}

/// Who may be promoted under a committed synchronous set: of the members with a recent report
/// (`reported`: their WAL positions), the most advanced, once enough have reported to be sure.
/// Otherwise the reason, in an operator's words.
pub fn holders_of_every_ack(
    set: &SyncSet,
    reported: &BTreeMap<NodeId, u64>,
) -> Result<BTreeSet<NodeId>, String> {
    let present: Vec<(NodeId, u64)> = set
        .members
        .iter()
        .filter_map(|m| reported.get(m).map(|l| (*m, *l)))
        .collect();
    let needed = reports_needed(set);
    if present.len() < needed {
        return Err(format!(
            "{} of the synchronous standbys {:?} reported; {needed} must, to know who holds \
             every acknowledged write",
            present.len(),
            set.members
        ));
    }
    let best = present.iter().map(|(_, l)| *l).max().unwrap_or(0);
    Ok(present
        .into_iter()
        .filter(|(_, l)| *l == best)
        .map(|(n, _)| n)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(members: &[NodeId], k: u32) -> SyncSet {
        SyncSet {
            members: members.iter().copied().collect(),
            k,
        }
    }

    fn state(committed: SyncSet, target: Option<SyncSet>) -> SyncState {
        SyncState {
            epoch: 1,
            committed,
            target,
            legacy: None,
            revision: 0,
        }
    }

    fn cfg(mode: SyncMode, count: u32) -> DynamicConfig {
        DynamicConfig {
            synchronous_mode: mode,
            synchronous_node_count: count,
            ..Default::default()
        }
    }

    /// Walks `next_step` from `start` to `want`, the primary applying and confirming whatever
    /// it is asked to, and checks the invariant at every step: what the primary may run is
    /// covered by the committed set.
    fn walk(start: SyncSet, want: SyncSet) -> Vec<SyncStep> {
        let mut st = state(start.clone(), None);
        let mut running = start;
        let mut steps = Vec::new();
        for _ in 0..10 {
            let applied = SyncApplied {
                epoch: 1,
                set: running.clone(),
                confirmed: true,
                revision: st.revision,
            };
            let Some(step) = next_step(&st, &want, Some(&applied), 99) else {
                return steps;
            };
            match &step {
                SyncStep::Commit(s) => {
                    // Committing first: what runs now must already satisfy the new set.
                    assert!(covers(&running, s), "{running:?} does not cover {s:?}");
                    st.committed = s.clone();
                    st.target = None;
                    st.revision += 1;
                }
                SyncStep::Target(t) => {
                    assert!(covers(t, &st.committed), "{t:?} weaker than committed");
                    st.target = Some(t.clone());
                    st.revision += 1;
                }
            }
            running = to_apply(&st).clone();
            assert!(covers(&running, &st.committed));
            steps.push(step);
        }
        panic!("no convergence: {steps:?}");
    }

    #[test]
    fn growing_commits_first_shrinking_confirms_first() {
        assert_eq!(
            walk(set(&[2], 1), set(&[2, 3], 1)),
            vec![SyncStep::Commit(set(&[2, 3], 1))]
        );
        assert_eq!(
            walk(set(&[2, 3], 1), set(&[3], 1)),
            vec![
                SyncStep::Target(set(&[3], 1)),
                SyncStep::Commit(set(&[3], 1))
            ]
        );
    }

    #[test]
    fn replacing_a_standby_grows_then_shrinks() {
        assert_eq!(
            walk(set(&[2], 1), set(&[3], 1)),
            vec![
                SyncStep::Commit(set(&[2, 3], 1)),
                SyncStep::Target(set(&[3], 1)),
                SyncStep::Commit(set(&[3], 1)),
            ]
        );
    }

    #[test]
    fn a_smaller_k_first_then_fewer_members() {
        walk(set(&[2, 3, 4], 2), set(&[2], 1));
    }

    #[test]
    fn async_to_sync_only_after_confirmation() {
        let st = state(SyncSet::asynchronous(), None);
        let want = set(&[2], 1);
        assert_eq!(
            next_step(&st, &want, None, 99),
            Some(SyncStep::Target(want.clone()))
        );
        let st = state(SyncSet::asynchronous(), Some(want.clone()));
        let unconfirmed = SyncApplied {
            epoch: 1,
            set: want.clone(),
            confirmed: false,
            revision: 0,
        };
        assert_eq!(next_step(&st, &want, Some(&unconfirmed), 99), None);
        let old_epoch = SyncApplied {
            epoch: 0,
            confirmed: true,
            ..unconfirmed.clone()
        };
        assert_eq!(next_step(&st, &want, Some(&old_epoch), 99), None);
        let ok = SyncApplied {
            confirmed: true,
            ..unconfirmed
        };
        assert_eq!(
            next_step(&st, &want, Some(&ok), 99),
            Some(SyncStep::Commit(want.clone()))
        );
        // A confirmation of an earlier revision of the same set proves nothing about now.
        let older = SyncApplied {
            revision: 7,
            ..ok.clone()
        };
        let mut newer = st.clone();
        newer.revision = 8;
        assert_eq!(next_step(&newer, &want, Some(&older), 99), None);
    }

    #[test]
    fn falling_back_to_async_is_committed_before_it_is_applied() {
        assert_eq!(
            next_step(
                &state(set(&[2], 1), None),
                &SyncSet::asynchronous(),
                None,
                99
            ),
            Some(SyncStep::Commit(SyncSet::asynchronous()))
        );
    }

    #[test]
    fn every_path_between_small_sets_keeps_the_invariant() {
        let sets: Vec<SyncSet> = (0u32..16)
            .flat_map(|mask| {
                let members: Vec<NodeId> = (0..4).filter(|b| mask & (1 << b) != 0).collect();
                (0..=members.len() as u32).map(move |k| set(&members, k))
            })
            .filter(|s| s.k > 0 || s.members.is_empty())
            .collect();
        for a in &sets {
            for b in &sets {
                walk(a.clone(), b.clone());
            }
        }
    }

    #[test]
    fn a_set_carried_over_a_promotion_is_replaced_only_once_the_new_one_caught_up() {
        // Primary 2 was promoted from the set {2, 3}; its new standby is 4.
        let carried = state(set(&[2, 3], 1), Some(set(&[4], 1)));
        let want = set(&[4], 1);
        assert_eq!(next_step(&carried, &want, None, 2), None);
        let caught_up = SyncApplied {
            epoch: 1,
            set: want.clone(),
            confirmed: true,
            revision: 0,
        };
        assert_eq!(
            next_step(&carried, &want, Some(&caught_up), 2),
            Some(SyncStep::Commit(want))
        );
        // With k = 2 a new standby outside the old set is not covered by the primary alone.
        let wide = state(set(&[2, 3, 5], 2), None);
        assert_eq!(next_step(&wide, &set(&[4], 1), None, 2), None);
        assert_eq!(
            next_step(&wide, &set(&[3, 4], 2), None, 2),
            Some(SyncStep::Target(set(&[3, 4], 2)))
        );
    }

    #[test]
    fn modes_choose_their_sets() {
        let possible: BTreeSet<NodeId> = [2, 3, 4].into();
        let none = SyncSet::asynchronous();
        assert_eq!(
            desired(&cfg(SyncMode::Off, 1), &none, &[2], &possible),
            none
        );
        assert_eq!(
            desired(&cfg(SyncMode::On, 1), &none, &[3, 2], &possible),
            set(&[3], 1)
        );
        // A standby already synchronous stays, even if another is further ahead.
        assert_eq!(
            desired(&cfg(SyncMode::On, 1), &set(&[2], 1), &[3, 2], &possible),
            set(&[2], 1)
        );
        // on: no fit standby, fall back; strict: keep waiting for the old one.
        assert_eq!(
            desired(&cfg(SyncMode::On, 1), &set(&[2], 1), &[], &possible),
            none
        );
        assert_eq!(
            desired(&cfg(SyncMode::Strict, 1), &set(&[2], 1), &[], &possible),
            set(&[2], 1)
        );
        // on with fewer fit standbys than asked: wait for those there are.
        assert_eq!(
            desired(&cfg(SyncMode::On, 2), &none, &[4], &possible),
            set(&[4], 1)
        );
        assert_eq!(
            desired(&cfg(SyncMode::Quorum, 1), &none, &[2, 3, 4], &possible),
            set(&[2, 3, 4], 1)
        );
    }

    #[test]
    fn failover_needs_enough_reports_and_takes_the_most_advanced() {
        let s = set(&[2, 3, 4], 2);
        assert_eq!(reports_needed(&s), 2);
        let one: BTreeMap<NodeId, u64> = [(2, 10)].into();
        assert!(holders_of_every_ack(&s, &one).is_err());
        let two: BTreeMap<NodeId, u64> = [(2, 10), (4, 12), (9, 99)].into();
        assert_eq!(holders_of_every_ack(&s, &two), Ok([4].into()));
        assert_eq!(reports_needed(&set(&[2], 1)), 1);
    }

    #[test]
    fn confirmation_counts_members_flushed_past_the_switch() {
        let s = set(&[2, 3], 1);
        assert!(!confirmed(&s, 100, &[(2, 99), (5, 200)].into()));
        assert!(confirmed(&s, 100, &[(2, 99), (3, 100)].into()));
        assert!(confirmed(&SyncSet::asynchronous(), 100, &BTreeMap::new()));
    }
}
