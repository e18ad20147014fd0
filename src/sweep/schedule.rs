//! Early stopping of bad trials: successive halving (ASHA) and the median stopping rule. Pure:
//! the driver asks, for a trial's metric at a step, whether the trial goes on, stops, or must
//! wait.
//!
//! Both rules compare a trial with the trials *before it in trial order* that reached the same
//! step, as if trials always arrived in order. Asynchronous ASHA as Ray Tune runs it compares
//! with whoever happened to arrive first, so two runs of the same sweep can stop different
//! trials; here the decision for trial `t` at step `s` waits (the trial keeps training) until
//! every trial before `t` has either reported at `s` or ended without reaching it. Trials start
//! in order, so the wait is short, and the same sweep makes the same decisions every time —
//! after a crash, a `--resume`, or on a slower machine.

use std::collections::BTreeMap;

use super::spec::SchedulerSpec;

/// What a trial does after reporting a metric at a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    GoOn,
    Stop,
    /// An earlier trial has not yet reached this step: ask again later.
    Wait,
}

/// What is known of an earlier trial at a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum AtStep {
    Reported(f64),
    /// It ended, or went past the step, without a metric there.
    Never,
    NotYet,
}

#[derive(Debug, Clone)]
pub(crate) struct Scheduler {
    spec: SchedulerSpec,
    minimize: bool,
}

impl Scheduler {
    pub(crate) fn new(spec: &SchedulerSpec, minimize: bool) -> Scheduler {
        Scheduler { spec: spec.clone(), minimize }
    }

    /// The steps at which trials are compared (ASHA's rungs): `grace`, `grace·rf`, … For the
    /// median rule every evaluation from `grace` on.
    pub(crate) fn compares_at(&self, step: u64) -> bool {
        match self.spec.kind.as_str() {
            "asha" => {
                let mut rung = self.spec.grace_steps;
                while rung < step {
                    rung = rung.saturating_mul(self.spec.reduction_factor);
                }
                rung == step
            }
            "median" => step >= self.spec.grace_steps,
            _ => false,
        }
    }

    /// Trial `trial` reports `metric` at `step`; `earlier(s)` says what trial `s < trial`
    /// has at that step.
    pub(crate) fn decide(&self, trial: usize, step: u64, metric: f64, earlier: impl Fn(usize) -> AtStep) -> Decision {
        if !self.compares_at(step) {
            return Decision::GoOn;
        }
        let mut peers = Vec::new();
        for s in 0..trial {
            match earlier(s) {
                AtStep::Reported(m) => peers.push(m),
                AtStep::Never => {}
                AtStep::NotYet => return Decision::Wait,
            }
        }
        // A non-finite metric is the worst there is.
        let metric = if metric.is_finite() {
            metric
        } else if self.minimize {
            f64::INFINITY
        } else {
            f64::NEG_INFINITY
        };
        let better = |a: f64, b: f64| if self.minimize { a < b } else { a > b };
        match self.spec.kind.as_str() {
            "asha" => {
                // The trial and its peers at the rung: it goes on if among the best 1/rf.
                let n = peers.len() + 1;
                let factor = self.spec.reduction_factor as usize;
                if n < factor {
                    return Decision::GoOn;
                }
                let keep = (n / factor).max(1);
                let better_than_me = peers.iter().filter(|&&m| better(m, metric)).count();
                if better_than_me < keep {
                    Decision::GoOn
                } else {
                    Decision::Stop
                }
            }
            "median" => {
                // Optuna's median pruner: worse than the median of the earlier trials at this
                // step, once `min_trials` of them got there.
                if peers.len() < self.spec.min_trials {
                    return Decision::GoOn;
                }
                peers.sort_by(f64::total_cmp);
                let mid = peers.len() / 2;
                let median = if peers.len() % 2 == 1 { peers[mid] } else { (peers[mid - 1] + peers[mid]) / 2.0 };
                if better(median, metric) {
                    Decision::Stop
                } else {
                    Decision::GoOn
                }
            }
            _ => Decision::GoOn,
        }
    }
}

/// What each trial reported, by step, for [`Scheduler::decide`]'s `earlier`.
pub(crate) fn at_step(reports: &BTreeMap<u64, f64>, furthest: Option<u64>, ended: bool, step: u64) -> AtStep {
    match reports.get(&step) {
        Some(m) => AtStep::Reported(*m),
        None if ended || furthest.is_some_and(|f| f > step) => AtStep::Never,
        None => AtStep::NotYet,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(kind: &str, grace: u64, factor: u64, min_trials: usize) -> Scheduler {
        Scheduler::new(&SchedulerSpec { kind: kind.into(), grace_steps: grace, reduction_factor: factor, min_trials }, true)
    }

    #[test]
    fn asha_keeps_the_best_third_of_the_earlier_trials_at_each_rung() {
        let asha = scheduler("asha", 10, 3, 0);
        assert!(asha.compares_at(10) && asha.compares_at(30) && asha.compares_at(90) && !asha.compares_at(20));
        let reported = |ms: Vec<f64>| move |s: usize| AtStep::Reported(ms[s]);
        assert_eq!(asha.decide(0, 5, 9.0, reported(vec![])), Decision::GoOn, "not a rung");
        assert_eq!(asha.decide(1, 10, 3.0, reported(vec![2.0])), Decision::GoOn, "fewer than 3 at the rung");
        assert_eq!(asha.decide(2, 10, 4.0, reported(vec![3.0, 2.0])), Decision::Stop, "worst of three");
        assert_eq!(asha.decide(2, 10, 1.0, reported(vec![3.0, 2.0])), Decision::GoOn, "best of three");
        assert_eq!(asha.decide(2, 10, f64::NAN, reported(vec![3.0, 2.0])), Decision::Stop, "NaN is the worst");
        // An earlier trial not at the rung yet: wait; one that ended before it: not counted.
        let mixed = |s: usize| [AtStep::Reported(1.0), AtStep::NotYet][s];
        assert_eq!(asha.decide(2, 10, 9.0, mixed), Decision::Wait);
        let ended = |s: usize| [AtStep::Reported(1.0), AtStep::Never][s];
        assert_eq!(asha.decide(2, 10, 9.0, ended), Decision::GoOn, "two at the rung: fewer than 3");
    }

    #[test]
    fn the_median_rule_stops_trials_worse_than_the_earlier_median_after_its_grace() {
        let median = scheduler("median", 20, 3, 2);
        let reported = |ms: Vec<f64>| move |s: usize| AtStep::Reported(ms[s]);
        assert_eq!(median.decide(3, 10, 9.0, reported(vec![1.0, 2.0, 3.0])), Decision::GoOn, "within the grace steps");
        assert_eq!(median.decide(1, 20, 9.0, reported(vec![1.0])), Decision::GoOn, "fewer than min_trials before it");
        assert_eq!(median.decide(3, 20, 2.5, reported(vec![1.0, 2.0, 3.0])), Decision::Stop);
        assert_eq!(median.decide(3, 30, 1.5, reported(vec![1.0, 2.0, 3.0])), Decision::GoOn);
        assert_eq!(median.decide(2, 20, 1.4, reported(vec![1.0, 2.0])), Decision::GoOn, "median of two is their mean");
    }

    #[test]
    fn what_an_earlier_trial_has_at_a_step() {
        let reports: BTreeMap<u64, f64> = [(10, 1.0)].into();
        assert_eq!(at_step(&reports, Some(10), false, 10), AtStep::Reported(1.0));
        assert_eq!(at_step(&reports, Some(10), false, 20), AtStep::NotYet);
        assert_eq!(at_step(&reports, Some(10), true, 20), AtStep::Never);
        assert_eq!(at_step(&reports, Some(30), false, 20), AtStep::Never, "went past it without an evaluation");
    }
}
