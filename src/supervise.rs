//! `troupe local`'s worker processes, supervised the way the coordinator supervises its
//! actors: a worker that dies (a crash, a signal, the OOM killer) is started again after a
//! backoff and rejoins the run, as a restarted worker on another host would; the coordinator
//! carries on without it meanwhile. A worker is restarted at most `max_restarts` times (as
//! torchrun's `--max-restarts`); after that it stays lost, and the run fails only when fewer
//! than `min_workers` are left. A worker that exits cleanly (stopped at the end of the run, or
//! leaving on SIGTERM) is not restarted.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::Child;

/// First wait before a restart; it doubles with each restart of the same worker.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Starts worker `index` for the `attempt`-th time (0: the first start), its output appended
/// to `log`.
pub(crate) type Spawn = Box<dyn FnMut(usize, u32, &std::path::Path) -> anyhow::Result<Child> + Send>;

struct Slot {
    index: usize,
    log: PathBuf,
    /// `None` once it has exited for good (cleanly, or lost for good).
    child: Option<Child>,
    restarts: u32,
}

pub(crate) struct Supervisor {
    slots: Vec<Slot>,
    spawn: Spawn,
    max_restarts: u32,
    min_workers: usize,
    /// Slots `0..training` are training workers, which count towards `min_workers`; those
    /// after them (an eval worker) are restarted alike but do not count.
    training: usize,
}

impl Supervisor {
    /// Starts `extra` other workers (an eval worker) and, once `before_training` resolves (it
    /// has joined), `workers` training workers; worker `i` logs to `log(i)`, the training
    /// workers being `0..workers`.
    pub(crate) async fn start(
        workers: usize,
        extra: usize,
        log: impl Fn(usize) -> PathBuf,
        max_restarts: u32,
        min_workers: usize,
        mut spawn: Spawn,
        before_training: impl std::future::Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<Supervisor> {
        let mut slots = Vec::with_capacity(workers + extra);
        for index in workers..workers + extra {
            let log = log(index);
            let child = spawn(index, 0, &log)?;
            slots.push(Slot { index, log, child: Some(child), restarts: 0 });
        }
        before_training.await?;
        for index in 0..workers {
            let log = log(index);
            let child = spawn(index, 0, &log)?;
            slots.push(Slot { index, log, child: Some(child), restarts: 0 });
        }
        slots.sort_by_key(|s| s.index);
        Ok(Supervisor { slots, spawn, max_restarts, min_workers, training: workers })
    }

    /// Restarts workers that die, for as long as the run goes on; resolves only when the run
    /// cannot go on (a worker lost for good leaves fewer than `min_workers`), with why.
    pub(crate) async fn supervise(&mut self) -> String {
        loop {
            let waits: Vec<_> = self
                .slots
                .iter_mut()
                .enumerate()
                .filter_map(|(at, slot)| slot.child.as_mut().map(|child| Box::pin(async move { (at, child.wait().await) })))
                .collect();
            if waits.is_empty() {
                return std::future::pending().await;
            }
            // `Child::wait` is cancel safe: the waits not chosen are simply polled again.
            let ((at, status), _, _) = futures::future::select_all(waits).await;
            if let Some(failure) = self.on_exit(at, status).await {
                return failure;
            }
        }
    }

    /// Handles worker slot `at` having exited; `Some(why)` when the run cannot go on.
    async fn on_exit(&mut self, at: usize, status: std::io::Result<ExitStatus>) -> Option<String> {
        let slot = &mut self.slots[at];
        slot.child = None;
        if status.as_ref().is_ok_and(|s| s.success()) {
            return None;
        }
        let how = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        if slot.restarts < self.max_restarts {
            slot.restarts += 1;
            let backoff = FIRST_BACKOFF.saturating_mul(1 << (slot.restarts - 1).min(5)).min(MAX_BACKOFF);
            troupe_common::say_err!(
                "worker {} exited ({how}); restarting it in {}s (restart {} of {}), log {}",
                slot.index,
                backoff.as_secs(),
                slot.restarts,
                self.max_restarts,
                slot.log.display()
            );
            tokio::time::sleep(backoff).await;
            match (self.spawn)(slot.index, slot.restarts, &slot.log) {
                Ok(child) => {
                    slot.child = Some(child);
                    return None;
                }
                Err(e) => troupe_common::say_err!("worker {} could not be restarted: {e:#}", slot.index),
            }
        }
        let alive = self.slots.iter().filter(|s| s.index < self.training && s.child.is_some()).count();
        let slot = &self.slots[at];
        let lost = format!(
            "worker {} exited ({how}) after {} restart(s) of at most {}; the last lines of {}:\n{}",
            slot.index,
            slot.restarts,
            self.max_restarts,
            slot.log.display(),
            log_tail(&slot.log, 15)
        );
        if alive < self.min_workers {
            return Some(format!("{lost}\n{alive} worker(s) left, fewer than cluster.min_workers = {}", self.min_workers));
        }
        troupe_common::say_err!("{lost}\ngoing on with {alive} worker(s)");
        None
    }

    /// Restarts made so far, per worker.
    pub(crate) fn restarts(&self) -> Vec<u32> {
        self.slots.iter().map(|s| s.restarts).collect()
    }

    /// Waits up to `grace` for the workers to exit (they do on the coordinator's Stop), then
    /// kills any left.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        for slot in &mut self.slots {
            if let Some(child) = slot.child.as_mut() {
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
            }
        }
    }
}

/// The last `lines` lines of a log file (empty if it cannot be read).
fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}
