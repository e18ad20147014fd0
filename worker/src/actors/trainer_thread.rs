//! The trainer thread: builds the model, then runs the Worker's orders one at a time until
//! Stop (libtorch calls block, so training runs on an OS thread, not in an actor). Orders of a
//! membership generation that is over are skipped; every result goes back to the Worker as a
//! [`TrainerReport`].

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use ractor::ActorRef;
use tokio::sync::watch;
use troupe_core::proto::{EvalReport, FileDigest, StepReport};

use super::collective::CollectiveMsg;
use super::membership::LinkPlan;
use super::worker::WorkerMsg;
use crate::comm::{Alone, Comm, Link, Mixed, NcclLink, RingHandle};
use crate::trainer::{Footprint, Trainer, TrainerError, TrainerSetup, WriteDone};

/// What the trainer thread reports back.
pub enum TrainerReport {
    /// The model is built (and loaded); the thread now waits for its first `Regroup`.
    Built(Footprint),
    /// Training waited this long for the previous checkpoint write.
    CheckpointWaited(f64),
    /// Took its place in `generation`, holding the state after `completed_steps` steps.
    Regrouped {
        generation: u64,
        completed_steps: u64,
    },
    Synced {
        generation: u64,
        step: u64,
    },
    SyncFailed {
        generation: u64,
        error: String,
    },
    /// NCCL could not form the generation's communicator.
    LinkFailed {
        generation: u64,
        error: String,
    },
    StepDone(StepReport),
    /// The step's collective failed: nothing was applied.
    StepAborted {
        generation: u64,
        step: u64,
        error: String,
    },
    EvalDone(EvalReport),
    CheckpointWritten {
        generation: u64,
        step: u64,
        files: Vec<FileDigest>,
    },
    CheckpointFailed {
        generation: u64,
        step: u64,
        error: String,
    },
    Failed(String),
}

/// Orders for the trainer thread, each tagged with the membership generation it belongs to:
/// orders of a generation that is over are skipped.
pub(crate) enum TrainerCmd {
    /// Build the training state again for a new place in the run (sharded strategies, whose
    /// state is split by world size, after a membership change: from the newest checkpoint).
    Rebuild(Box<TrainerSetup>),
    /// Take rank `rank` of `world_size` in `generation`, linked as `link` says; collectives
    /// give up after `timeout`.
    Regroup {
        generation: u64,
        rank: u32,
        world_size: u32,
        link: LinkPlan<ActorRef<CollectiveMsg>>,
        timeout: Duration,
    },
    Sync {
        generation: u64,
        source_rank: u32,
        step: u64,
    },
    Step {
        generation: u64,
        step: u64,
    },
    Evaluate {
        generation: u64,
        step: u64,
    },
    Checkpoint {
        generation: u64,
        step: u64,
        dir: PathBuf,
    },
    Stop,
}

/// The trainer thread: builds the model, then runs orders until Stop.
pub(crate) fn trainer_thread(
    setup: TrainerSetup,
    cmds: mpsc::Receiver<TrainerCmd>,
    latest: watch::Receiver<u64>,
    reporter: ActorRef<WorkerMsg>,
) {
    let report = |r| send_report(&reporter, r);
    let mut trainer = match Trainer::new(setup) {
        Ok(t) => t,
        Err(e) => return report(TrainerReport::Failed(format!("cannot start training: {e}"))),
    };
    report(TrainerReport::Built(trainer.footprint()));
    let mut link = Link::Alone(Alone);
    while let Ok(cmd) = cmds.recv() {
        // libtorch reports some errors by panicking through tch; one must not take the
        // process down silently, so it becomes a reported failure.
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_command(&mut trainer, &mut link, cmd, &latest, &reporter)));
        match outcome {
            Ok(true) => {}
            Ok(false) => return,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                return report(TrainerReport::Failed(format!("the training loop failed: {what}")));
            }
        }
    }
}

/// Hands a report from the trainer thread (or its checkpoint writer) to the Worker.
pub(crate) fn send_report(reporter: &ActorRef<WorkerMsg>, report: TrainerReport) {
    let _ = reporter.cast(WorkerMsg::Trainer(report));
}

/// Runs one order; false when the thread should end.
fn run_command(
    trainer: &mut Trainer,
    link: &mut Link,
    cmd: TrainerCmd,
    latest: &watch::Receiver<u64>,
    reporter: &ActorRef<WorkerMsg>,
) -> bool {
    let report = |r| send_report(reporter, r);
    let stale = |generation: u64| generation < *latest.borrow();
    match cmd {
        TrainerCmd::Rebuild(setup) => match Trainer::new(*setup) {
            Ok(rebuilt) => {
                *trainer = rebuilt;
                report(TrainerReport::Built(trainer.footprint()));
            }
            Err(e) => {
                report(TrainerReport::Failed(format!("cannot rebuild the training state: {e}")));
                return false;
            }
        },
        TrainerCmd::Regroup { generation, rank, world_size, link: plan, timeout } => {
            if stale(generation) {
                return true;
            }
            let link_failed = |error: String| {
                tracing::warn!("cannot join the NCCL communicator of generation {generation}: {error}");
                report(TrainerReport::LinkFailed { generation, error });
                true
            };
            if let Err(e) = trainer.set_membership(generation, rank as usize, world_size as usize) {
                report(TrainerReport::Failed(e.to_string()));
                return false;
            }
            // The previous generation's link goes first: an NCCL communicator is aborted
            // (never waited on: its peers may be gone) before the next one takes the GPU.
            *link = Link::Alone(Alone);
            *link = match plan {
                LinkPlan::Alone => Link::Alone(Alone),
                LinkPlan::Ring(actor) => Link::Ring(RingHandle { actor }),
                LinkPlan::Nccl { id, place } => match NcclLink::join(&id, place, trainer.device(), timeout, generation, latest) {
                    Ok(n) => Link::Nccl(n),
                    Err(error) => return link_failed(error.to_string()),
                },
                LinkPlan::Mixed { nccl, ring } => {
                    // The group's members wait in its broadcast while its rank 0 runs the ring's
                    // all-reduce: the group gets twice the ring's limit, so that a slow or dead
                    // ring peer is reported by the ring, which names it.
                    let group = match nccl {
                        Some((id, place)) => match NcclLink::join(&id, place, trainer.device(), timeout * 2, generation, latest) {
                            Ok(n) => Some(Box::new(n) as Box<dyn Comm>),
                            Err(error) => return link_failed(error.to_string()),
                        },
                        None => None,
                    };
                    let ring = ring.map(|actor| Box::new(RingHandle { actor }) as Box<dyn Comm>);
                    Link::Mixed(Mixed { group, ring, rank, world_size })
                }
            };
            report(TrainerReport::Regrouped { generation, completed_steps: trainer.completed_steps() });
        }
        TrainerCmd::Sync { generation, source_rank, step } => {
            if stale(generation) {
                return true;
            }
            match trainer.sync_state(source_rank, step, link.comm()) {
                Ok(()) => report(TrainerReport::Synced { generation, step }),
                Err(e) => report(TrainerReport::SyncFailed { generation, error: e.to_string() }),
            }
        }
        TrainerCmd::Step { generation, step } => {
            if stale(generation) {
                return true;
            }
            match trainer.step(step, link.comm()) {
                Ok(r) => report(TrainerReport::StepDone(r)),
                Err(TrainerError::Collective { step, error }) => {
                    report(TrainerReport::StepAborted { generation, step, error: error.to_string() })
                }
                Err(e) => {
                    report(TrainerReport::Failed(e.to_string()));
                    return false;
                }
            }
        }
        TrainerCmd::Evaluate { generation, step } => {
            if stale(generation) {
                return true;
            }
            match trainer.evaluate(step, link.comm()) {
                Ok(r) => report(TrainerReport::EvalDone(r)),
                // Under zero3 evaluation gathers parameters: a failed gather is a ring
                // failure like a failed step, and the generation is replaced.
                Err(TrainerError::Collective { step, error }) => {
                    report(TrainerReport::StepAborted { generation, step, error: error.to_string() })
                }
                Err(e) => {
                    report(TrainerReport::Failed(e.to_string()));
                    return false;
                }
            }
        }
        TrainerCmd::Checkpoint { generation, step, dir } => {
            if stale(generation) {
                return true;
            }
            let reporter = reporter.clone();
            let done: WriteDone = Box::new(move |result| {
                let r = match result {
                    Ok(files) => TrainerReport::CheckpointWritten { generation, step, files },
                    Err(error) => TrainerReport::CheckpointFailed { generation, step, error },
                };
                send_report(&reporter, r);
            });
            match trainer.save_checkpoint(step, &dir, done) {
                Ok(waited) => report(TrainerReport::CheckpointWaited(waited)),
                Err(e) => report(TrainerReport::CheckpointFailed { generation, step, error: e.to_string() }),
            }
        }
        TrainerCmd::Stop => return false,
    }
    true
}
