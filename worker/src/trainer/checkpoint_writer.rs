//! A rank's part of a checkpoint: the training loop copies its shard of the state into host
//! memory, and a background thread writes, fsyncs and hashes the files while training goes on.

use std::path::Path;
use std::time::Instant;

use troupe_common::checkpoint::{self, ShardSnapshot, TrainState};
use troupe_common::data;
use troupe_core::proto::FileDigest;

use super::{Trainer, TrainerError, MODEL_CONFIG_FILE, TOKENIZER_FILE};

/// Where a finished background checkpoint write reports: its files, or why it failed.
pub type WriteDone = Box<dyn FnOnce(Result<Vec<FileDigest>, String>) + Send>;

/// The background write in progress, if any.
#[derive(Default)]
pub(super) struct CheckpointWriter(Option<std::thread::JoinHandle<()>>);

impl CheckpointWriter {
    /// Waits for the write in progress to finish; returns the seconds waited.
    fn wait(&mut self) -> f64 {
        match self.0.take() {
            Some(writer) => {
                let t = Instant::now();
                let _ = writer.join();
                t.elapsed().as_secs_f64()
            }
            None => 0.0,
        }
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        // A checkpoint being written is finished, not torn, when the trainer goes.
        self.wait();
    }
}

impl Trainer {
    /// Starts writing this rank's part of the checkpoint into `dir` (a temporary folder the
    /// coordinator commits later). The training loop pays only for copying its shard into host
    /// memory: the files are written, fsynced and hashed by a background thread, which calls
    /// `done` with what it wrote. If the previous write is still running, this waits for it
    /// first; the seconds waited are returned (a metric counts them).
    pub fn save_checkpoint(&mut self, step: u64, dir: &Path, done: WriteDone) -> Result<f64, TrainerError> {
        if step != self.step {
            return Err(TrainerError::OutOfOrder { what: "to checkpoint step", asked: step, completed: self.step });
        }
        let waited = self.writer.wait();
        let cx = &self.cx;
        let layout = self.state.checkpoint_layout(cx.world_size, cx.model.num_params());
        let rank = cx.rank as u32;
        let snapshot = self.state.snapshot(&layout, rank, step);
        // Rank 0 also writes what is not sharded: counters and layout, the model's shape, the
        // tokenizer.
        let mut extra: Vec<(String, Vec<u8>)> = Vec::new();
        if rank == 0 {
            let state = TrainState {
                step: self.step,
                cursor: self.step * cx.config.train.global_batch as u64,
                seed: cx.config.run.seed,
                world_size: cx.world_size as u32,
                strategy: self.state.strategy().name().into(),
                tokens_seen: self.tokens_seen(),
                vocab_size: self.meta.vocab_size,
                layout,
            };
            extra.push((checkpoint::STATE_FILE.into(), json(&state)));
            extra.push((MODEL_CONFIG_FILE.into(), json(&self.gpt_config)));
            let path = cx.config.data.dir.join(TOKENIZER_FILE);
            let tokenizer = std::fs::read(&path).map_err(|source| TrainerError::Io { what: "read the tokenizer", path, source })?;
            extra.push((TOKENIZER_FILE.into(), tokenizer));
            let template = cx.config.data.dir.join(data::chat::CHAT_TEMPLATE_JSON);
            if let Ok(bytes) = std::fs::read(&template) {
                extra.push((data::chat::CHAT_TEMPLATE_JSON.into(), bytes));
            }
            if !cx.config.model.init_from.is_empty() {
                let init = std::path::Path::new(&cx.config.model.init_from);
                let source: Option<serde_json::Value> =
                    std::fs::read(init.join(troupe_common::model::hf::SOURCE_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok());
                extra.push((checkpoint::BASE_MODEL_FILE.into(), json(&serde_json::json!({ "init_from": init, "source": source }))));
            }
        }
        let store = &cx.config.checkpoint.store;
        let store = (!store.is_empty()).then(|| (store.clone(), cx.config.run.name.clone()));
        // With a store, this host's part is staged in its own cache, never in the coordinator's
        // run folder (which this host need not see), and uploaded from there.
        let dir = match &store {
            Some((_, run_name)) => {
                troupe_common::storage::cache_root().join("checkpoint-staging").join(run_name).join(dir.file_name().unwrap_or_default())
            }
            None => dir.to_path_buf(),
        };
        let writer = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                checkpoint::lower_thread_priority();
                let written = write_part(&dir, &snapshot, &extra);
                let stored = match (written, store) {
                    (Ok(files), Some((url, run_name))) => upload_part(&dir, &url, &run_name, files),
                    (written, _) => written,
                };
                done(stored.map_err(|e| e.to_string()))
            })
            .map_err(TrainerError::WriterThread)?;
        self.writer.0 = Some(writer);
        Ok(waited)
    }
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(value).expect("plain data serialises")
}

/// With `checkpoint.store`: uploads what this rank wrote to the attempt's folder in the store
/// (named like the temporary folder, without `.tmp`), then removes the local files — the
/// store holds the checkpoint now, and a host that shares no disk with the coordinator would
/// otherwise keep every one.
fn upload_part(dir: &Path, url: &str, run_name: &str, files: Vec<FileDigest>) -> Result<Vec<FileDigest>, TrainerError> {
    let attempt = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".tmp")).unwrap_or_default();
    // Each shard gets its block digests beside it, for the ranged reads of a resume.
    let mut files = files;
    for shard in files.iter().filter(|f| f.name.starts_with("shard-")).map(|f| f.name.clone()).collect::<Vec<_>>() {
        let digests = checkpoint::store::block_digests(&dir.join(&shard))?;
        let sidecar = dir.join(checkpoint::store::blocks_file(&shard));
        std::fs::write(&sidecar, serde_json::to_vec(&digests).expect("strings serialise")).map_err(|source| TrainerError::Io {
            what: "write",
            path: sidecar.clone(),
            source,
        })?;
        files.push(checkpoint::digest_file(&sidecar)?);
    }
    let store = checkpoint::store::CheckpointStore::open(url, run_name)?;
    store.upload(attempt, dir, &files)?;
    for file in &files {
        let _ = std::fs::remove_file(dir.join(&file.name));
    }
    let _ = std::fs::remove_dir(dir);
    Ok(files)
}

/// The background half of [`Trainer::save_checkpoint`]: this rank's shard file and (rank 0)
/// the small files, each fsynced, then the folder.
fn write_part(dir: &Path, snapshot: &ShardSnapshot, extra: &[(String, Vec<u8>)]) -> Result<Vec<FileDigest>, TrainerError> {
    // Skipped steps keep NaN out of the state; this is the last line before the disk, so that
    // nothing non-finite is ever committed, retained or published.
    for (what, values) in [("parameters", &snapshot.params), ("AdamW moments", &snapshot.exp_avg), ("AdamW moments", &snapshot.exp_avg_sq)]
    {
        let count = values.iter().filter(|v| !v.is_finite()).count();
        if count > 0 {
            return Err(TrainerError::NonFinite { rank: snapshot.rank, step: snapshot.step, what, count });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| TrainerError::Io { what: "create", path: dir.to_path_buf(), source })?;
    // Test hook: `TROUPE_FAULT_KILL_DURING_CHECKPOINT=STEP:RANK` kills this process half-way
    // through that rank's shard file of that step, as a machine failure would.
    let fault = || {
        let wanted = std::env::var("TROUPE_FAULT_KILL_DURING_CHECKPOINT").ok();
        if wanted.as_deref() == Some(&format!("{}:{}", snapshot.step, snapshot.rank)) {
            eprintln!("fault injection: rank {} dies while writing its checkpoint shard of step {}", snapshot.rank, snapshot.step);
            std::process::abort();
        }
    };
    let mut files = vec![checkpoint::write_shard(dir, snapshot, &fault)?];
    for (name, bytes) in extra {
        let path = dir.join(name);
        if let Err(source) = std::fs::write(&path, bytes) {
            return Err(TrainerError::Io { what: "write", path, source });
        }
        checkpoint::fsync_path(&path)?;
        files.push(checkpoint::digest_file(&path)?);
    }
    checkpoint::fsync_path(dir)?;
    Ok(files)
}
