//! `troupe status`: reads the coordinator's `GET /status` and prints it.

use anyhow::{bail, Context};
use std::time::Duration;
use troupe_common::status::RunStatus;

/// Fetches `/status` from the coordinator's HTTP address (the one it prints as
/// "coordinator metrics on http://ADDR/metrics").
pub(crate) fn fetch(addr: &str) -> anyhow::Result<RunStatus> {
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let (status, body) = crate::http::call("GET", &format!("http://{addr}/status"), None, None, Duration::from_secs(10))
        .with_context(|| format!("cannot reach the coordinator's status endpoint at {addr} (its metrics.listen address)"))?;
    if status != 200 {
        bail!("{addr} answered {status}: is this the coordinator's metrics address?");
    }
    serde_json::from_str(&body).with_context(|| format!("{addr} did not answer with a troupe status"))
}

pub(crate) fn print(status: &RunStatus) {
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    troupe_common::say!(
        "run {} | {} | step {}/{} | loss {} | val loss {} | {} tok/s",
        status.run,
        status.phase,
        status.step,
        status.total_steps,
        opt(status.loss, 4),
        opt(status.val_loss, 4),
        opt(status.tokens_per_second, 0)
    );
    troupe_common::say!(
        "{} ranks (membership generation {}) | last checkpoint: {}",
        status.world_size,
        status.generation,
        status.last_checkpoint.as_deref().unwrap_or("-")
    );
    if status.checkpoint_failures_in_a_row > 0 {
        troupe_common::say!(
            "WARNING: the last {} checkpoint(s) FAILED: nothing is being saved (see events.jsonl; a full disk?)",
            status.checkpoint_failures_in_a_row
        );
    }
    if status.skipped_steps_in_a_row > 0 {
        troupe_common::say!(
            "WARNING: the last {} step(s) were skipped: their loss or gradient was not finite (see events.jsonl)",
            status.skipped_steps_in_a_row
        );
    }
    troupe_common::say!(
        "{:>6} {:>4} {:<22} {:<16} {:<8} {:>12} {:>10}",
        "worker",
        "rank",
        "address",
        "host",
        "state",
        "heartbeat",
        "step (s)"
    );
    for w in &status.workers {
        troupe_common::say!(
            "{:>6} {:>4} {:<22} {:<16} {:<8} {:>10}ms {:>10}",
            w.worker_id,
            w.rank.map_or("-".into(), |r| r.to_string()),
            w.addr,
            w.hostname,
            w.state,
            w.last_heartbeat_ms,
            opt(w.step_seconds, 3)
        );
    }
}
