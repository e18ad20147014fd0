//! Checkpointer: makes a checkpoint count once every rank has written its part.
//!
//! It checks the files against the ranks' reports, renames the temporary folder into place,
//! writes the MANIFEST last and applies retention (the newest `keep_last`, the best by
//! validation loss, and those still in use are kept) — all on a blocking thread, so the
//! coordinator's mailbox never waits on the disk. A failure here is reported to the core as
//! `CheckpointCommitFailed` and the partial folder is removed: the previous checkpoint stays
//! the newest and training goes on.
//!
//! With `checkpoint.store`, the ranks have uploaded their parts to object storage: the commit
//! is the MANIFEST written there (only if absent), then the checkpoint is fetched into the run
//! folder on this host, and retention applies in the store too (see
//! [`checkpoint::store`]).

use super::coordinator::CoordinatorMsg;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::path::PathBuf;
use troupe_common::checkpoint;
use troupe_common::fault::FaultHook;
use troupe_core::cluster::Event;
use troupe_core::proto::FileDigest;

pub struct Checkpointer;

pub struct CheckpointerArgs {
    pub run_dir: PathBuf,
    pub keep_last: usize,
    /// `checkpoint.store` and the run's name, when checkpoints go to object storage.
    pub store: Option<(String, String)>,
    pub coordinator: ActorRef<CoordinatorMsg>,
    /// Steps whose checkpoints are still being evaluated or deployed: retention keeps them.
    pub pinned: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
}

pub enum CheckpointerMsg {
    Commit { step: u64, generation: u64, world_size: u32, files: Vec<FileDigest> },
}

impl Actor for Checkpointer {
    type Msg = CheckpointerMsg;
    type State = CheckpointerArgs;
    type Arguments = CheckpointerArgs;

    async fn pre_start(&self, _me: ActorRef<Self::Msg>, args: CheckpointerArgs) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(&self, _me: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let CheckpointerMsg::Commit { step, generation, world_size, files } = msg;
        static PANIC: FaultHook = FaultHook::new("TROUPE_FAULT_CHECKPOINTER_PANIC_AT_STEP");
        if PANIC.fires_at(step) {
            panic!("fault injection: Checkpointer panics while committing step {step}");
        }
        let run_dir = state.run_dir.clone();
        let keep_last = state.keep_last;
        let pinned = state.pinned.lock().map(|p| p.clone()).unwrap_or_default();
        let store = state.store.clone();
        let result = tokio::task::spawn_blocking(move || {
            if let Some((url, run_name)) = store {
                return commit_in_store(&run_dir, &url, &run_name, (step, generation, world_size), &files, keep_last, &pinned);
            }
            let dest = checkpoint::commit(&run_dir, step, generation, world_size, &files).inspect_err(|_| {
                // What the ranks wrote is of no use now and holds space a later checkpoint
                // needs (a full disk is the usual cause).
                let tmp = checkpoint::tmp_dir(&run_dir, step, generation);
                if tmp.exists() {
                    let _ = std::fs::remove_dir_all(&tmp);
                }
            })?;
            if let Err(e) = checkpoint::apply_retention(&run_dir, step, keep_last, &pinned) {
                tracing::warn!("checkpoint retention failed (the new checkpoint is committed): {e}");
            }
            Ok::<_, checkpoint::CheckpointError>(dest)
        })
        .await?;
        let event = match result {
            Ok(path) => Event::CheckpointCommitted { step, path: path.display().to_string() },
            Err(e) => Event::CheckpointCommitFailed { step, error: e.to_string() },
        };
        state.coordinator.cast(CoordinatorMsg::Core(event))?;
        Ok(())
    }
}

/// The commit with `checkpoint.store`: the MANIFEST in the store, the checkpoint fetched into
/// the run folder here (its files checked against the MANIFEST), retention here and there.
fn commit_in_store(
    run_dir: &std::path::Path,
    url: &str,
    run_name: &str,
    (step, generation, world_size): (u64, u64, u32),
    files: &[FileDigest],
    keep_last: usize,
    pinned: &std::collections::BTreeSet<u64>,
) -> Result<PathBuf, checkpoint::CheckpointError> {
    let store = checkpoint::store::CheckpointStore::open(url, run_name)?;
    store.commit(step, generation, world_size, files)?;
    let dest = checkpoint::final_dir(run_dir, step);
    std::fs::create_dir_all(checkpoint::checkpoints_dir(run_dir))
        .map_err(|source| checkpoint::CheckpointError::Io { path: checkpoint::checkpoints_dir(run_dir), source })?;
    store.fetch(&checkpoint::store::attempt_name(step, generation), &dest)?;
    if let Err(e) = checkpoint::apply_retention(run_dir, step, keep_last, pinned) {
        tracing::warn!("checkpoint retention failed (the new checkpoint is committed): {e}");
    }
    let kept = checkpoint::complete_steps(run_dir)?;
    if let Err(e) = store.retain(&kept, step) {
        tracing::warn!("checkpoint retention in the store failed (the new checkpoint is committed): {e}");
    }
    Ok(dest)
}
