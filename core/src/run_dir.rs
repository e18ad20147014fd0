//! Where a run's checkpoints lie in its run folder (`run.out_dir/run.name`): named here, where
//! both the coordinator's core (which tells ranks where to write) and the checkpoint code
//! (which writes and commits them) can see them.

use std::path::{Path, PathBuf};

/// Creates the run folder (and any missing parent) readable by its owner only (0700), or
/// makes an existing one so: it holds the model, the run's history and the coordinator's
/// keys, none of which is anyone else's business.
pub fn create_private(run_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(run_dir)?;
    std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o700))
}

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
