//! Following a trial's `events.jsonl` as its run appends to it: the metrics the scheduler
//! decides on, and how far the run got.

use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::path::Path;

use troupe_core::events::RunEvent;

/// The driver's view of one trial's `events.jsonl`: read incrementally.
#[derive(Default)]
pub(super) struct Follow {
    inode: u64,
    offset: u64,
    partial: Vec<u8>,
    /// Metrics read but not yet recorded (a decision waits on an earlier trial), by step.
    pub unrecorded: BTreeMap<u64, f64>,
    /// The furthest step any event of the run names: the steps it trained.
    pub furthest: u64,
}

impl Follow {
    /// Reads what the run appended since the last call. Only the evaluations the trial's
    /// schedule makes count (every `eval_every` steps and the last step): a run stopped by a
    /// signal also evaluates where it stopped, which an uninterrupted run would not.
    pub(super) fn read(&mut self, run_dir: &Path, metric: &str, recorded_up_to: Option<u64>, schedule: (u64, u64)) {
        let (eval_every, last_step) = schedule;
        let Ok(mut file) = std::fs::File::open(run_dir.join("events.jsonl")) else { return };
        // A trial restarted before its first checkpoint starts a new run folder (the old one
        // is archived): a new file, read from its start.
        let inode = file.metadata().map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m));
        if inode != self.inode {
            (self.inode, self.offset) = (inode, 0);
            self.partial.clear();
        }
        if file.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        // Bytes, not text: a read can end inside a character; lines are whole only up to the
        // last newline.
        let mut bytes = Vec::new();
        let Ok(n) = file.read_to_end(&mut bytes) else { return };
        self.offset += n as u64;
        self.partial.extend_from_slice(&bytes);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else { return };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        for line in complete.split(|&b| b == b'\n').filter(|l| !l.trim_ascii().is_empty()) {
            let Ok(event) = serde_json::from_slice::<RunEvent>(line) else { continue };
            self.furthest = self.furthest.max(event.step());
            let scheduled = |step: u64| step == last_step || (eval_every > 0 && step.is_multiple_of(eval_every));
            if let RunEvent::Eval { step, val_loss, per_source, .. } = event.clone() {
                if !scheduled(step) {
                    continue;
                }
                let value = match metric.strip_prefix("val_loss/") {
                    Some(source) => per_source.get(source).copied(),
                    None => Some(val_loss),
                };
                // A run resumed from a checkpoint reports some steps again: the same values.
                if let (Some(v), true) = (value, recorded_up_to.is_none_or(|r| step > r)) {
                    self.unrecorded.insert(step, v);
                }
            }
        }
    }
}
