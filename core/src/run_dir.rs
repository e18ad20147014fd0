//! Where a run's checkpoints lie in its run folder (`run.out_dir/run.name`): named here, where
//! both the coordinator's core (which tells ranks where to write) and the checkpoint code
//! (which writes and commits them) can see them.

use std::path::{Path, PathBuf};

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// A committed checkpoint's folder.
pub fn final_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(step_dir_name(step))
}

/// Where the ranks of membership generation `generation` write checkpoint `step`: one folder
/// per generation, so that a write abandoned by a membership change can never mix with the
/// new generation's files.
pub fn tmp_dir(run_dir: &Path, step: u64, generation: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("{}.g{generation}.tmp", step_dir_name(step)))
}
