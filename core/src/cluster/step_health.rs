//! Whether a completed step can be trusted: the ranks' reports of it must agree, and a step
//! whose loss or gradient was not finite applied no update (see `SkipReason`) and counts
//! towards `train.max_skipped_steps`.
//!
//! Every rank reports the step's loss (summed over the ranks), the gradient's global norm and
//! whether it skipped the update; by construction these are the same on every rank, so a rank
//! whose report differs is either faulty or not computing what the others compute. A rank
//! that disagrees about the skip itself has a different model from the others now: the run
//! stops rather than train on diverged replicas.

use std::collections::{BTreeMap, BTreeSet};

use super::{Command, Core};
use crate::events::RunEvent;
use crate::proto::{SkipReason, StepReport};

/// Skipped steps in a row, and the ranks their non-finite values came from.
#[derive(Debug, Default)]
pub(super) struct SkipStreak {
    pub(super) in_a_row: u32,
    pub(super) first_step: u64,
    pub(super) ranks: BTreeSet<u32>,
}

/// Two reports of the same global figure agree: equal up to the last bits of float
/// arithmetic, or both not finite in the same way.
fn same_figure(a: f64, b: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    a == b || (a - b).abs() <= 1e-6 * a.abs().max(b.abs())
}

/// The ranks whose report differs from the majority's, each with what differs. The majority
/// is taken on the skip decision (ties go to the lowest rank); the figures are then compared
/// with the first report of that majority.
pub(super) fn disagreements(reports: &BTreeMap<u32, StepReport>) -> Vec<(u32, String)> {
    let mut votes: BTreeMap<String, (usize, u32)> = BTreeMap::new();
    for (&rank, r) in reports {
        let entry = votes.entry(format!("{:?}", r.skipped)).or_insert((0, rank));
        entry.0 += 1;
    }
    let Some((_, &(_, reference_rank))) = votes.iter().max_by(|a, b| a.1 .0.cmp(&b.1 .0).then(b.1 .1.cmp(&a.1 .1))) else {
        return Vec::new();
    };
    let reference = &reports[&reference_rank];
    let describe = |r: &StepReport| match r.skipped {
        Some(reason) => format!("skipped ({})", reason.label()),
        None => "applied the update".to_string(),
    };
    let mut out = Vec::new();
    for (&rank, r) in reports {
        let mut what = Vec::new();
        if r.skipped != reference.skipped {
            what.push(format!("{} where rank {reference_rank} {}", describe(r), describe(reference)));
        }
        if !same_figure(r.loss, reference.loss) {
            what.push(format!("loss {} where rank {reference_rank} reported {}", r.loss, reference.loss));
        }
        if !same_figure(r.grad_norm, reference.grad_norm) {
            what.push(format!("gradient norm {} where rank {reference_rank} reported {}", r.grad_norm, reference.grad_norm));
        }
        if !what.is_empty() {
            out.push((rank, what.join("; ")));
        }
    }
    out
}

impl Core {
    /// Records what differs between the ranks' reports of a step. Returns false when the run
    /// was aborted because the ranks disagree about applying the update.
    pub(super) fn check_agreement(&mut self, reports: &BTreeMap<u32, StepReport>, out: &mut Vec<Command>) -> bool {
        let Some(step) = reports.values().next().map(|r| r.step) else { return true };
        let mut diverged = Vec::new();
        for (rank, what) in disagreements(reports) {
            if what.contains("skipped") || what.contains("applied the update") {
                diverged.push(format!("rank {rank} ({}): {what}", self.describe_rank(rank)));
            }
            out.push(Command::Record(RunEvent::RankDisagreed { step, rank, what }));
        }
        if diverged.is_empty() {
            return true;
        }
        let error = format!(
            "the ranks disagree whether step {step} applied its update, so their models now differ: {}. \
             Check that rank's hardware and troupe version; `--resume` continues from the newest checkpoint",
            diverged.join("; ")
        );
        self.abort(error, out);
        false
    }

    /// A step every rank skipped: recorded, counted, and the run stopped once
    /// `train.max_skipped_steps` were skipped in a row. Returns false when it stopped.
    pub(super) fn on_skipped_step(&mut self, reports: &BTreeMap<u32, StepReport>, reason: SkipReason, out: &mut Vec<Command>) -> bool {
        let first = reports.values().next().expect("a completed step has reports");
        let (step, generation) = (first.step, first.generation);
        let ranks: Vec<u32> = reports.iter().filter(|(_, r)| !r.locally_finite).map(|(&rank, _)| rank).collect();
        let streak = &mut self.progress.skips;
        if streak.in_a_row == 0 {
            streak.first_step = step;
            streak.ranks.clear();
        }
        streak.in_a_row += 1;
        streak.ranks.extend(ranks.iter().copied());
        let in_a_row = streak.in_a_row;
        out.push(Command::Record(RunEvent::StepSkipped { step, generation, reason: reason.label().into(), ranks, in_a_row }));
        let max = self.settings.config.train.max_skipped_steps;
        if in_a_row < max {
            return true;
        }
        let first_step = self.progress.skips.first_step;
        let from = if self.progress.skips.ranks.is_empty() {
            "every rank's own values were finite: their sum overflowed".to_string()
        } else {
            let named: Vec<String> = self.progress.skips.ranks.iter().map(|&r| format!("rank {r} ({})", self.describe_rank(r))).collect();
            format!("the non-finite values came from {}", named.join(", "))
        };
        let error = format!(
            "{in_a_row} steps in a row ({first_step}..={step}) were skipped because the {} was not finite \
             (train.max_skipped_steps = {max}); {from}. Check that rank's data and hardware, lower \
             train.learning_rate, or use train.precision = \"fp32\"; `--resume` continues from the newest checkpoint",
            if reason == SkipReason::NonFiniteLoss { "loss" } else { "gradient" }
        );
        self.abort(error, out);
        false
    }

    /// "worker 3, host:pid, at addr" for a rank of the current generation.
    pub(super) fn describe_rank(&self, rank: u32) -> String {
        let Some(id) = self.members.ranks.get(rank as usize) else { return "no longer a member".into() };
        match self.members.workers.get(id) {
            Some(w) => format!("worker {id} on {} pid {}, peers at {}", w.info.hostname, w.info.pid, w.info.peer_addr),
            None => format!("worker {id}, gone"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(loss: f64, grad_norm: f64, skipped: Option<SkipReason>) -> StepReport {
        StepReport {
            generation: 1,
            world_size: 3,
            step: 4,
            loss,
            tokens: 10,
            grad_norm,
            lr: 0.1,
            data_seconds: 0.0,
            compute_seconds: 0.0,
            comm_seconds: 0.0,
            skipped,
            locally_finite: true,
        }
    }

    #[test]
    fn reports_that_agree_up_to_rounding_or_in_their_nan_agree() {
        let reports: BTreeMap<u32, StepReport> =
            [(0, report(2.5, 1.0, None)), (1, report(2.5 + 1e-12, 1.0, None)), (2, report(2.5, 1.0 - 1e-9, None))].into();
        assert!(disagreements(&reports).is_empty());
        let nan = Some(SkipReason::NonFiniteGradient);
        let reports: BTreeMap<u32, StepReport> =
            [(0, report(2.5, f64::NAN, nan)), (1, report(2.5, f64::NAN, nan)), (2, report(2.5, f64::NAN, nan))].into();
        assert!(disagreements(&reports).is_empty());
    }

    #[test]
    fn the_odd_rank_out_is_named_with_what_differs() {
        let reports: BTreeMap<u32, StepReport> =
            [(0, report(2.5, 1.0, None)), (1, report(2.5, 7.0, None)), (2, report(2.5, 1.0, None))].into();
        let found = disagreements(&reports);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, 1);
        assert!(found[0].1.contains("gradient norm 7 where rank 0 reported 1"), "{}", found[0].1);

        // The skip decision is voted on: rank 0, alone in skipping, is the one named.
        let reports: BTreeMap<u32, StepReport> =
            [(0, report(f64::NAN, 1.0, Some(SkipReason::NonFiniteLoss))), (1, report(2.5, 1.0, None)), (2, report(2.5, 1.0, None))].into();
        let found = disagreements(&reports);
        assert_eq!(found.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![0], "{found:?}");
        assert!(found[0].1.contains("skipped (nonfinite_loss) where rank 1 applied the update"), "{}", found[0].1);
    }
}
