//! Fault hooks for the failure tests: an environment variable names the training step at
//! which a supervised actor misbehaves. The end-to-end tests drive the release binary, so the
//! hooks are compiled in; each is read once and fires at most once per process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

pub struct FaultHook {
    var: &'static str,
    step: OnceLock<Option<u64>>,
    fired: AtomicBool,
}

impl FaultHook {
    pub const fn new(var: &'static str) -> FaultHook {
        FaultHook { var, step: OnceLock::new(), fired: AtomicBool::new(false) }
    }

    /// True the first time it is asked about the step its variable names.
    pub fn fires_at(&self, step: u64) -> bool {
        let wanted = *self.step.get_or_init(|| std::env::var(self.var).ok().and_then(|v| v.parse().ok()));
        wanted == Some(step) && !self.fired.swap(true, Ordering::SeqCst)
    }
}

/// A hook whose variable names how many times it fires: the first N times it is asked, in
/// this process (a supervised actor that crashes N times in a row, however often restarted).
pub struct FaultCount {
    var: &'static str,
    times: OnceLock<u64>,
    fired: std::sync::atomic::AtomicU64,
}

impl FaultCount {
    pub const fn new(var: &'static str) -> FaultCount {
        FaultCount { var, times: OnceLock::new(), fired: std::sync::atomic::AtomicU64::new(0) }
    }

    /// True for the first N calls (N from the variable; none without it).
    pub fn fires(&self) -> bool {
        let times = *self.times.get_or_init(|| std::env::var(self.var).ok().and_then(|v| v.parse().ok()).unwrap_or(0));
        self.fired.fetch_add(1, Ordering::SeqCst) < times
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_at_its_step_and_never_without_its_variable() {
        static HOOK: FaultHook = FaultHook::new("TROUPE_FAULT_TEST_HOOK_AT_STEP");
        static UNSET: FaultHook = FaultHook::new("TROUPE_FAULT_TEST_HOOK_UNSET");
        // SAFETY: no other thread of this test binary reads this variable.
        unsafe { std::env::set_var("TROUPE_FAULT_TEST_HOOK_AT_STEP", "3") };
        assert!(!HOOK.fires_at(2));
        assert!(HOOK.fires_at(3));
        assert!(!HOOK.fires_at(3), "once per process");
        assert!(!UNSET.fires_at(0));
    }
}
