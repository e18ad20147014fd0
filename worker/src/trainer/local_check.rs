//! Which rank a non-finite step came from, and the test hooks that make one.
//!
//! Whether a step is skipped is decided from the global figures every rank holds alike (see
//! [`super::StepContext::skip_reason`]); this side only answers "were *this* rank's own loss
//! and gradient finite?", so that the coordinator can name the rank the NaN came from.

use std::ops::RangeInclusive;

use tch::Tensor;

use super::TrainerError;

/// This rank's own loss share and the norms of its own gradients in the current step, before
/// they are summed with the other ranks'. The norms stay on the device and are read only when
/// the step was skipped (reading them would make a GPU wait every step).
#[derive(Default)]
pub(super) struct LocalCheck {
    step: u64,
    loss_share: f64,
    norms: Vec<Tensor>,
    /// The fault hook's NaN went into a gradient of this step already.
    poisoned: bool,
}

impl LocalCheck {
    pub(super) fn start(&mut self, step: u64) {
        *self = LocalCheck { step, loss_share: 0.0, norms: Vec::new(), poisoned: false };
    }

    pub(super) fn set_loss_share(&mut self, loss_share: f64) {
        self.loss_share = loss_share;
    }

    pub(super) fn add_grad(&mut self, grad: &Tensor) -> Result<(), TrainerError> {
        if grad.defined() {
            self.norms.push(grad.f_detach()?.f_norm()?);
        }
        Ok(())
    }

    /// True the first time it is asked in `step` (the hook poisons one gradient per step).
    pub(super) fn first_grad_of(&mut self, step: u64) -> bool {
        let first = self.step == step && !self.poisoned;
        self.poisoned |= first;
        first
    }

    /// Whether this rank's own loss share and every gradient noted were finite.
    pub(super) fn finite(&self) -> Result<bool, TrainerError> {
        if !self.loss_share.is_finite() {
            return Ok(false);
        }
        for norm in &self.norms {
            if !norm.f_double_value(&[])?.is_finite() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Test hooks on the gradient, read once from the environment:
/// `TROUPE_FAULT_NAN_GRAD=RANK:FIRST[-LAST]` puts a NaN into that rank's own gradient at those
/// steps (before the sum, as bad data or a flaky GPU would), and
/// `TROUPE_FAULT_SKIP_STEPS=FIRST[-LAST]` tells every rank to skip those steps as if they had
/// been non-finite (the run to compare a NaN run with).
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct StepFaults {
    pub(super) nan_grad: Option<(usize, RangeInclusive<u64>)>,
    pub(super) skip: Option<RangeInclusive<u64>>,
}

/// `FIRST[-LAST]` as an inclusive range of steps.
fn steps(text: &str) -> Option<RangeInclusive<u64>> {
    let (first, last) = text.split_once('-').unwrap_or((text, text));
    Some(first.trim().parse().ok()?..=last.trim().parse().ok()?)
}

impl StepFaults {
    pub(super) fn from_env() -> StepFaults {
        StepFaults::parse(std::env::var("TROUPE_FAULT_NAN_GRAD").ok().as_deref(), std::env::var("TROUPE_FAULT_SKIP_STEPS").ok().as_deref())
    }

    fn parse(nan_grad: Option<&str>, skip: Option<&str>) -> StepFaults {
        let nan_grad = nan_grad.and_then(|v| {
            let (rank, range) = v.split_once(':')?;
            Some((rank.trim().parse().ok()?, steps(range)?))
        });
        StepFaults { nan_grad, skip: skip.and_then(steps) }
    }

    pub(super) fn nan_due(&self, step: u64, rank: usize) -> bool {
        self.nan_grad.as_ref().is_some_and(|(r, steps)| *r == rank && steps.contains(&step))
    }

    pub(super) fn told_to_skip(&self, step: u64) -> bool {
        self.skip.as_ref().is_some_and(|steps| steps.contains(&step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_hooks_name_a_rank_and_a_range_of_steps() {
        let f = StepFaults::parse(Some("1:3-5"), Some("7"));
        assert!(f.nan_due(3, 1) && f.nan_due(5, 1) && !f.nan_due(6, 1) && !f.nan_due(4, 0));
        assert!(f.told_to_skip(7) && !f.told_to_skip(6));
        assert_eq!(StepFaults::parse(Some("garbage"), Some("x-")), StepFaults::default());
    }
}
