//! The terminal display of `troupe local` and `troupe coordinator`: a line every few steps.

use super::*;

/// The terminal display: a line every few steps with loss, throughput and ETA.
pub(super) struct Progress {
    total_steps: u64,
    every: u64,
    started: Instant,
    first_step: Option<u64>,
}

impl Progress {
    pub(super) fn new(total_steps: u64) -> Progress {
        Progress { total_steps, every: (total_steps / 30).max(1), started: Instant::now(), first_step: None }
    }

    pub(super) fn line(&self, text: &str) {
        troupe_common::say!("[{:>7.1}s] {text}", self.started.elapsed().as_secs_f64());
    }

    pub(super) fn show(&mut self, event: &RunEvent) {
        match event {
            RunEvent::Step { step, loss, lr, tokens_per_sec, step_seconds, .. } => {
                let first = *self.first_step.get_or_insert(*step);
                let done = step + 1;
                if done % self.every != 0 && done != self.total_steps && *step != first {
                    return;
                }
                let per_step = self.started.elapsed().as_secs_f64() / (done - first).max(1) as f64;
                let eta = per_step * self.total_steps.saturating_sub(done) as f64;
                self.line(&format!(
                    "step {done:>5}/{} | loss {loss:.4} | lr {lr:.2e} | {tokens_per_sec:>8.0} tok/s | {step_seconds:.3} s/step | ETA {}",
                    self.total_steps,
                    format_duration(eta)
                ));
            }
            RunEvent::Eval { step, val_loss, sequences, per_source } => {
                let by_source: Vec<String> = per_source.iter().map(|(source, loss)| format!("{source} {loss:.4}")).collect();
                let by_source = if by_source.is_empty() { String::new() } else { format!(" ({})", by_source.join(", ")) };
                self.line(&format!("eval  after step {step}: val loss {val_loss:.4} over {sequences} sequences{by_source}"))
            }
            RunEvent::Checkpoint { path, seconds, .. } => self.line(&format!("checkpoint {path} ({seconds:.2} s)")),
            RunEvent::Evaluated { step, perplexity, samples, tasks, by, .. } => {
                let first = samples.first().map(|s| format!(": {:?}", format!("{}{}", s.prompt, s.text))).unwrap_or_default();
                let tasks: Vec<String> = tasks.iter().map(|(metric, score)| format!(", {metric} {score:.3}")).collect();
                let by = if by.is_empty() || by == "ranks" { String::new() } else { format!(" (by the {by})") };
                self.line(&format!("evaluated step {step}{by}: perplexity {perplexity:.1}{}{first}", tasks.concat()))
            }
            RunEvent::Deployed { step, action, version, reason } => self.line(&format!(
                "deploy step {step}: {action}{} ({reason})",
                version.map(|v| format!(" as {}", version_name(v))).unwrap_or_default()
            )),
            RunEvent::CheckpointFailed { step, error, in_a_row } => {
                self.line(&format!("checkpoint at step {step} FAILED ({in_a_row} in a row): {error}"))
            }
            RunEvent::StepSkipped { step, reason, ranks, in_a_row, .. } => self.line(&format!(
                "step {step} SKIPPED on every rank ({reason}; {in_a_row} in a row): non-finite values from {}",
                if ranks.is_empty() { "no single rank (the sum overflowed)".to_string() } else { format!("rank(s) {ranks:?}") }
            )),
            RunEvent::RankDisagreed { step, rank, what } => self.line(&format!("rank {rank} DISAGREES about step {step}: {what}")),
            RunEvent::WorkerJoined { rank, addr, .. } => self.line(&format!("rank {rank} assigned to worker at {addr}")),
            RunEvent::WorkerLeft { rank, reason, .. } => {
                let rank = rank.map_or("-".to_string(), |r| r.to_string());
                self.line(&format!("worker (rank {rank}) left: {reason}"))
            }
            RunEvent::Started { world_size, resumed_from, step, .. } => match resumed_from {
                Some(dir) => self.line(&format!("training resumed at step {step} from {dir} on {world_size} workers")),
                None => self.line(&format!("training started on {world_size} workers")),
            },
            RunEvent::Warning { message, .. } => self.line(&format!("warning: {message}")),
            RunEvent::Regrouped { step, generation, world_size, seconds, synced } => self.line(&format!(
                "regrouped: {world_size} workers (generation {generation}) continue at step {step} after {seconds:.2} s{}",
                if *synced { ", state synced from a peer" } else { "" }
            )),
            RunEvent::Paused { reason, .. } => self.line(&format!("PAUSED: {reason}")),
            RunEvent::Failed { error, .. } => self.line(&format!("run FAILED: {error}")),
            RunEvent::Finished { step, seconds, .. } => {
                self.line(&format!("finished at step {step} after {} of training", format_duration(*seconds)))
            }
        }
    }
}

fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
