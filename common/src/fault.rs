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
