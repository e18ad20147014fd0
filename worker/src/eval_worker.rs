//! An eval worker (`troupe worker --role eval`): it joins the coordinator like a training
//! worker but never holds a rank. The coordinator's Evaluator hands it committed checkpoints
//! one at a time ([`ToWorker::EvaluateCheckpoint`]); it loads each from the coordinator's run
//! folder (same host or a shared disk) or, when the run has `checkpoint.store`, from the store,
//! measures it (`troupe_common::evaluation`: validation loss per source, the next-line task,
//! samples) on a blocking thread, and answers. Meanwhile the training ranks go on stepping.
//!
//! Liveness is as for a training worker: heartbeats both ways, the coordinator's lease and
//! port probe. A measurement is not interrupted by a heartbeat: they run on other tasks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tch::Device;
use troupe_common::checkpoint;
use troupe_common::evaluation::{self, Loss};
use troupe_common::net;
use troupe_core::config::Config;
use troupe_core::proto::{ToCoordinator, ToWorker};

use crate::actors::worker::Outcome;

/// What the eval worker needs from the join.
pub(crate) struct EvalLink {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub coordinator: std::net::SocketAddr,
    pub heartbeat: Duration,
    pub lease: Duration,
    pub device: Device,
}

/// Serves evaluation jobs until the coordinator says Stop, goes away, or `leave` resolves (a
/// signal).
pub(crate) async fn serve(link: EvalLink, leave: impl std::future::Future<Output = String>) -> Outcome {
    let EvalLink { send, recv, coordinator, heartbeat, lease, device } = link;
    let (outbox, writer) = crate::actors::link::spawn_writer(send);
    let heartbeats = crate::actors::link::spawn_heartbeats(outbox.clone(), heartbeat);
    let probe = tokio::spawn(async move {
        let e = net::probe::until_port_closed(coordinator, net::probe::PROBE_PERIOD).await;
        format!("the coordinator's process is gone: its port {coordinator} is closed ({e})")
    });
    // Frames are read on a task of their own: a read cut short by another branch of the
    // select below would lose the part of a frame already read.
    let (frames_tx, mut frames) = tokio::sync::mpsc::channel(16);
    let reader = tokio::spawn(async move {
        let mut recv = recv;
        loop {
            let frame = tokio::time::timeout(lease, net::read_frame::<ToWorker>(&mut recv, net::MAX_CONTROL_FRAME)).await;
            let end = !matches!(frame, Ok(Ok(Some(_))));
            if frames_tx.send(frame).await.is_err() || end {
                break;
            }
        }
    });
    tokio::pin!(probe);
    tokio::pin!(leave);
    // One job at a time (the Evaluator sends one at a time); a second one waits its turn.
    let mut queue: std::collections::VecDeque<(u64, String, String)> = Default::default();
    let mut running: Option<(u64, tokio::task::JoinHandle<ToCoordinator>)> = None;
    let outcome = loop {
        if running.is_none() {
            if let Some((step, checkpoint, config_toml)) = queue.pop_front() {
                tracing::info!("evaluating the checkpoint of step {step} ({checkpoint})");
                running = Some((step, tokio::task::spawn_blocking(move || answer(step, &checkpoint, &config_toml, device))));
            }
        }
        let job = async {
            match running.as_mut() {
                Some((_, handle)) => handle.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            frame = frames.recv() => match frame.unwrap_or(Ok(Ok(None))) {
                Ok(Ok(Some(ToWorker::Heartbeat))) => {}
                Ok(Ok(Some(ToWorker::EvaluateCheckpoint { step, checkpoint, config_toml }))) => {
                    exit_if_asked(step);
                    queue.push_back((step, checkpoint, config_toml));
                }
                Ok(Ok(Some(ToWorker::Stop { reason }))) => break Outcome::Stopped(reason),
                Ok(Ok(Some(other))) => tracing::debug!("an eval worker ignores {other:?}"),
                Ok(Ok(None)) => break Outcome::CoordinatorLost("the coordinator closed the control stream".into()),
                Ok(Err(e)) => break Outcome::CoordinatorLost(format!("lost the coordinator: {e}")),
                Err(_) => break Outcome::CoordinatorLost(format!("the coordinator has been silent for longer than its lease ({lease:?})")),
            },
            answered = job => {
                let step = running.take().map_or(0, |(step, _)| step);
                let msg = answered.unwrap_or_else(|e| ToCoordinator::CheckpointEvalFailed { step, error: format!("the evaluation thread died: {e}") });
                if let ToCoordinator::CheckpointEvaluated(eval) = &msg {
                    tracing::info!("step {}: val loss {:.4} over {} sequences", eval.step, eval.loss_sum / eval.sequences.max(1) as f64, eval.sequences);
                }
                let _ = outbox.send(msg);
            }
            reason = &mut probe => break Outcome::CoordinatorLost(reason.unwrap_or_else(|e| format!("probe failed: {e}"))),
            reason = &mut leave => {
                let _ = outbox.send(ToCoordinator::Leaving { reason: reason.clone() });
                break Outcome::Stopped(reason);
            }
        }
    };
    heartbeats.abort();
    probe.abort();
    reader.abort();
    drop(outbox);
    // Let what was written (a last answer, Leaving) reach the coordinator.
    let _ = tokio::time::timeout(Duration::from_secs(3), writer).await;
    outcome
}

/// Measures one checkpoint; the answer to send.
fn answer(step: u64, checkpoint: &str, config_toml: &str, device: Device) -> ToCoordinator {
    let measured = (|| {
        let config = Config::from_toml_str(config_toml, "the coordinator's config")?;
        let dir = local_checkpoint(&config, step, Path::new(checkpoint))?;
        let measured = evaluation::measure(&config, &dir, Loss::Measure, device);
        if dir != Path::new(checkpoint) {
            // This host's copy from the store is not needed any more.
            let _ = std::fs::remove_dir_all(&dir);
        }
        measured?.into_report(step)
    })();
    match measured {
        Ok(eval) => ToCoordinator::CheckpointEvaluated(eval),
        Err(e) => ToCoordinator::CheckpointEvalFailed { step, error: format!("{e:#}") },
    }
}

/// The checkpoint's folder on this host: the coordinator's, when this host sees it (same host,
/// shared disk), else this host's copy from `checkpoint.store`.
fn local_checkpoint(config: &Config, step: u64, coordinators: &Path) -> anyhow::Result<PathBuf> {
    if coordinators.join(checkpoint::MANIFEST).is_file() {
        return Ok(coordinators.to_path_buf());
    }
    anyhow::ensure!(
        !config.checkpoint.store.is_empty(),
        "the checkpoint of step {step} is at {} on the coordinator's host, which this host does not see; \
         set checkpoint.store (object storage) or run the eval worker where that folder is",
        coordinators.display()
    );
    let store = checkpoint::store::CheckpointStore::open(&config.checkpoint.store, &config.run.name)?;
    let attempt = store
        .committed()?
        .into_iter()
        .find(|(s, _)| *s == step)
        .map(|(_, attempt)| attempt)
        .ok_or_else(|| anyhow::anyhow!("the checkpoint of step {step} is not committed in {}", store.url()))?;
    let dest = std::env::temp_dir().join(format!("troupe-eval-{}", config.run.name)).join(&attempt);
    std::fs::create_dir_all(dest.parent().unwrap_or(Path::new(".")))?;
    store.fetch(&attempt, &dest)?;
    Ok(dest)
}

/// Test hook: `TROUPE_FAULT_EVAL_WORKER_EXIT_ONCE=<file>` makes the first eval worker that gets
/// a job, of all processes, exit at once (the file marks that it happened), as a crash would.
fn exit_if_asked(step: u64) {
    let Some(marker) = std::env::var_os("TROUPE_FAULT_EVAL_WORKER_EXIT_ONCE") else { return };
    if std::fs::OpenOptions::new().write(true).create_new(true).open(&marker).is_ok() {
        eprintln!("fault injection: the eval worker exits on the checkpoint of step {step}");
        std::process::exit(3);
    }
}
