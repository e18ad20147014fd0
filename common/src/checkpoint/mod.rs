//! Checkpoints on disk: layout, integrity and the atomic commit.
//!
//! ```text
//! runs/<name>/checkpoints/step-000500/
//!     shard-00000.safetensors …   one per rank: its shard of the parameters and AdamW moments
//!     state.json                  counters and the shard layout (rank 0)
//!     model.json tokenizer.json   the model's shape and the tokenizer (rank 0)
//!     MANIFEST                    written last, by the coordinator
//! ```
//! Every strategy writes the same format: the flat training state split by a
//! [`ShardLayout`] over the ranks that wrote it, each rank writing its own shard in parallel
//! (under `ddp`, where every rank holds everything, each still writes only its 1/W). No rank
//! ever gathers the whole state to save it, and [`ShardReader`] reads any range back, so a
//! checkpoint resumes on any world size under any strategy.
//!
//! Ranks write into `step-000500.g<generation>.tmp/`, hashing while they write, and fsync. Once
//! every rank has reported, the coordinator's Checkpointer checks the files' sizes, fsyncs the
//! folder, renames it to `step-000500/` and writes `MANIFEST` (sizes and sha256 of every file,
//! step, world size, strategy, layout) last, atomically. Only a folder whose MANIFEST matches its
//! files counts: a torn or corrupted checkpoint is skipped with a warning and resume falls back
//! to the previous complete one.
//!
//! [`shard`] holds one rank's part: writing its shard file while hashing it, and reading any
//! range of the state back from every shard.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use troupe_core::proto::FileDigest;
use troupe_core::shard::ShardLayout;

mod shard;
pub mod store;
#[cfg(test)]
mod tests;

pub use shard::{lower_thread_priority, write_shard, ShardPart, ShardReader, ShardSnapshot};

pub const MANIFEST: &str = "MANIFEST";
pub const MODEL_FILE: &str = "model.safetensors";
pub const STATE_FILE: &str = "state.json";
/// The model's shape (`GptConfig` as JSON), next to its weights.
pub const MODEL_CONFIG_FILE: &str = "model.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// In a fine-tuned run's checkpoints: `{"init_from": …, "source": …}`, where its weights
/// started (and that folder's own `source.json`, e.g. the Hugging Face folder it came from).
pub const BASE_MODEL_FILE: &str = "base_model.json";

/// The base model a checkpoint was fine-tuned from: the Hugging Face folder an import came
/// from where known, else the `init_from` folder.
pub fn base_model(dir: &Path) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&fs::read(dir.join(BASE_MODEL_FILE)).ok()?).ok()?;
    v["source"]["base_model"].as_str().or(v["init_from"].as_str()).map(str::to_string)
}
/// 2: sharded state files and the layout (format 1 held `model.safetensors` and one optimizer
/// file; it is not read any more).
pub const MANIFEST_FORMAT: u32 = 2;

/// The file rank `rank` writes its shard of the training state to.
pub fn shard_file(rank: u32) -> String {
    format!("shard-{rank:05}.safetensors")
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {dir} is not usable: {reason}")]
    Invalid { dir: PathBuf, reason: String },
    #[error(
        "no room for a checkpoint in {}: the disk mounted at {} has {} MiB free, {} MiB are needed; free space there \
         (older runs, checkpoint.keep_last) or move run.out_dir to a larger disk",
        path.display(), mount_point(path).display(), available >> 20, needed.div_ceil(1 << 20)
    )]
    NoSpace { path: PathBuf, needed: u64, available: u64 },
    #[error("checkpoint store: {0}")]
    Store(#[from] crate::storage::StorageError),
}

/// The mount point of the filesystem holding `path`: its highest ancestor on the same device.
fn mount_point(path: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let path = path.as_path();
    let Ok(dev) = fs::metadata(path).map(|m| m.dev()) else { return path.to_path_buf() };
    let mut mount = path.to_path_buf();
    for ancestor in path.ancestors().skip(1) {
        match fs::metadata(ancestor) {
            Ok(m) if m.dev() == dev => mount = ancestor.to_path_buf(),
            _ => break,
        }
    }
    mount
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// What the MANIFEST records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub step: u64,
    pub world_size: u32,
    pub strategy: String,
    /// How the flat state is split over the shard files.
    pub layout: ShardLayout,
    pub created_unix_ms: u64,
    pub files: Vec<FileDigest>,
}

impl Manifest {
    /// The MANIFEST of a commit of `step` over `world_size` ranks: its `state.json` must say
    /// the same, and every rank's shard must be among `files`. Why not, otherwise.
    pub(crate) fn for_commit(step: u64, world_size: u32, state: TrainState, files: Vec<FileDigest>) -> Result<Manifest, String> {
        if state.step != step || state.layout.world_size != world_size {
            return Err(format!(
                "state.json says step {} over {} ranks, the coordinator committed step {step} over {world_size}",
                state.step, state.layout.world_size
            ));
        }
        if let Some(rank) = (0..world_size).find(|&rank| !files.iter().any(|f| f.name == shard_file(rank))) {
            return Err(format!("rank {rank} reported no {}", shard_file(rank)));
        }
        Ok(Manifest {
            format: MANIFEST_FORMAT,
            step,
            world_size,
            strategy: state.strategy,
            layout: state.layout,
            created_unix_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            files,
        })
    }
}

/// Training state beside the tensors: everything needed to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Completed optimizer steps.
    pub step: u64,
    /// Samples consumed since the start of training (the sampler's global cursor).
    pub cursor: u64,
    pub seed: u64,
    pub world_size: u32,
    pub strategy: String,
    pub tokens_seen: u64,
    pub vocab_size: usize,
    /// How the shard files split the flat state (the ranks that wrote them, the units).
    pub layout: ShardLayout,
}

/// Where checkpoints go in the run folder (the coordinator's core names them too).
pub use troupe_core::run_dir::{checkpoints_dir, final_dir, step_dir_name, tmp_dir};

/// sha256 and size of a file, streaming.
pub fn digest_file(path: &Path) -> Result<FileDigest, CheckpointError> {
    let mut file = File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(FileDigest { name, size, sha256: hex::encode(hasher.finalize()) })
}

/// fsync a file or a folder (a folder's fsync makes renames inside it durable).
pub fn fsync_path(path: &Path) -> Result<(), CheckpointError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
}

/// Writes `bytes` to `path` durably: into a temporary sibling, fsync, rename, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = path.with_extension("partial");
    {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(parent) = path.parent() {
        fsync_path(parent)?;
    }
    Ok(())
}

/// Makes a checkpoint count: checks the files the ranks reported against the disk (names and
/// sizes; their sha256 was computed by the writers while writing, and is checked again at
/// resume), reads the layout from `state.json`, renames the temporary folder into place and
/// writes the MANIFEST last. Returns the final folder.
pub fn commit(run_dir: &Path, step: u64, generation: u64, world_size: u32, reported: &[FileDigest]) -> Result<PathBuf, CheckpointError> {
    let tmp = tmp_dir(run_dir, step, generation);
    let dest = final_dir(run_dir, step);
    let invalid = |reason: String| CheckpointError::Invalid { dir: tmp.clone(), reason };
    let mut files = Vec::with_capacity(reported.len());
    for want in reported {
        if want.name.contains('/') || want.name.contains("..") || want.name == MANIFEST || want.name.is_empty() {
            return Err(invalid(format!("bad file name {:?}", want.name)));
        }
        let path = tmp.join(&want.name);
        let size = fs::metadata(&path).map_err(io(&path))?.len();
        if size != want.size {
            return Err(invalid(format!("{} on disk has {size} bytes, its writer reported {}", want.name, want.size)));
        }
        files.push(want.clone());
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    files.dedup_by(|a, b| a.name == b.name);
    if files.len() != reported.len() {
        return Err(invalid("a file was reported twice".into()));
    }
    let manifest = Manifest::for_commit(step, world_size, read_train_state(&tmp)?, files).map_err(invalid)?;
    fsync_path(&tmp)?;
    // A previous attempt at this step may have got as far as the rename but not the MANIFEST.
    // It is moved aside, not deleted, until the new folder has taken its place: a failure in
    // between leaves one of the two.
    let replaced = dest.exists().then(|| dest.with_extension(format!("replaced.g{generation}.tmp")));
    if let Some(aside) = &replaced {
        fs::rename(&dest, aside).map_err(io(&dest))?;
    }
    fs::rename(&tmp, &dest).map_err(io(&dest))?;
    fsync_path(&checkpoints_dir(run_dir))?;
    if let Some(aside) = &replaced {
        fs::remove_dir_all(aside).map_err(io(aside))?;
    }
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| CheckpointError::Invalid { dir: dest.clone(), reason: format!("cannot encode MANIFEST: {e}") })?;
    write_atomic(&dest.join(MANIFEST), &text)?;
    Ok(dest)
}

/// `state.json` of a checkpoint folder.
pub fn read_train_state(dir: &Path) -> Result<TrainState, CheckpointError> {
    let path = dir.join(STATE_FILE);
    let bytes = fs::read(&path).map_err(io(&path))?;
    let state: TrainState = serde_json::from_slice(&bytes)
        .map_err(|e| CheckpointError::Invalid { dir: dir.to_path_buf(), reason: format!("{STATE_FILE} is not valid: {e}") })?;
    state
        .layout
        .validate()
        .map_err(|e| CheckpointError::Invalid { dir: dir.to_path_buf(), reason: format!("{STATE_FILE}: bad layout: {e}") })?;
    Ok(state)
}

/// What every MANIFEST lists, checkpoints' and registry versions' alike.
#[derive(Deserialize)]
struct FileList {
    files: Vec<FileDigest>,
}

/// Reads the MANIFEST in `dir` and checks every file it lists against the disk (size and
/// sha256); returns the MANIFEST's bytes. Used for checkpoints and registry versions.
pub fn verify_files(dir: &Path) -> Result<Vec<u8>, CheckpointError> {
    let invalid = |reason: String| CheckpointError::Invalid { dir: dir.to_path_buf(), reason };
    let path = dir.join(MANIFEST);
    let text = fs::read(&path).map_err(|e| invalid(format!("no readable MANIFEST ({e})")))?;
    let list: FileList = serde_json::from_slice(&text).map_err(|e| invalid(format!("MANIFEST is not valid: {e}")))?;
    for want in &list.files {
        if want.name.contains('/') || want.name.contains("..") {
            return Err(invalid(format!("MANIFEST names a file outside its folder: {:?}", want.name)));
        }
        let file = dir.join(&want.name);
        if !file.is_file() {
            return Err(invalid(format!("{} is missing", want.name)));
        }
        let got = digest_file(&file)?;
        if got.size != want.size || got.sha256 != want.sha256 {
            return Err(invalid(format!("{} is corrupted (sha256 or size does not match the MANIFEST)", want.name)));
        }
    }
    Ok(text)
}

/// Reads a checkpoint's MANIFEST and checks every file it lists against the disk.
pub fn verify(dir: &Path) -> Result<Manifest, CheckpointError> {
    let invalid = |reason: String| CheckpointError::Invalid { dir: dir.to_path_buf(), reason };
    let text = verify_files(dir)?;
    let format = serde_json::from_slice::<serde_json::Value>(&text).ok().and_then(|v| v.get("format")?.as_u64());
    if format != Some(u64::from(MANIFEST_FORMAT)) {
        return Err(invalid(format!(
            "MANIFEST format {format:?} is not supported (this troupe reads format {MANIFEST_FORMAT}: sharded checkpoints)"
        )));
    }
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| invalid(format!("MANIFEST is not valid: {e}")))?;
    manifest.layout.validate().map_err(|e| invalid(format!("MANIFEST: bad layout: {e}")))?;
    Ok(manifest)
}

/// The model of a checkpoint or model folder: `model.safetensors` where there is one (registry
/// versions, exports), otherwise the parameters consolidated from the shard files. `model.json`
/// gives its shape. Reads only; the caller verifies the folder first where it matters.
pub fn load_model(dir: &Path, device: tch::Device) -> anyhow::Result<crate::model::Gpt> {
    use anyhow::Context;
    let path = dir.join(MODEL_CONFIG_FILE);
    let bytes = fs::read(&path)
        .with_context(|| format!("cannot read {}; is {} a troupe checkpoint or model version?", path.display(), dir.display()))?;
    let config: crate::model::GptConfig = serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid", path.display()))?;
    let mut model = crate::model::Gpt::for_loading(&config, device)?;
    if dir.join(MODEL_FILE).is_file() {
        model.load_safetensors(dir.join(MODEL_FILE))?;
    } else {
        let reader = ShardReader::open(dir)?;
        if reader.layout().numel() != model.num_params() {
            anyhow::bail!(
                "{}: the shards hold {} parameters, model.json describes {}",
                dir.display(),
                reader.layout().numel(),
                model.num_params()
            );
        }
        crate::model::unflatten_into(&model.parameter_tensors(), &reader.read_all(ShardPart::Params)?)?;
    }
    Ok(model)
}

/// A checkpoint that can be resumed from, and the newer ones that could not (with why).
#[derive(Debug)]
pub struct ResumePoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub skipped: Vec<String>,
}

/// The newest complete checkpoint of a run, skipping torn or corrupted ones (each skip is
/// reported in `skipped`, to be shown to the user). `Ok(None)` when there is none at all.
pub fn find_resumable(run_dir: &Path) -> Result<Option<ResumePoint>, CheckpointError> {
    let dir = checkpoints_dir(run_dir);
    let mut skipped = Vec::new();
    for (_, candidate) in list_steps(&dir)?.into_iter().rev() {
        match verify(&candidate) {
            Ok(manifest) => return Ok(Some(ResumePoint { dir: candidate, manifest, skipped })),
            Err(e) => skipped.push(e.to_string()),
        }
    }
    if skipped.is_empty() {
        Ok(None)
    } else {
        Err(CheckpointError::Invalid { dir, reason: format!("no complete checkpoint: {}", skipped.join("; ")) })
    }
}

/// `step-NNNNNN` folders (not `.tmp`), ascending by step.
fn list_steps(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut steps = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(steps),
        Err(e) => return Err(CheckpointError::Io { path: dir.to_path_buf(), source: e }),
    };
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
            if entry.path().is_dir() {
                steps.push((n, entry.path()));
            }
        }
    }
    steps.sort();
    Ok(steps)
}

/// The steps of a run's complete checkpoints (a MANIFEST that matches the files' sizes).
pub fn complete_steps(run_dir: &Path) -> Result<std::collections::BTreeSet<u64>, CheckpointError> {
    Ok(list_steps(&checkpoints_dir(run_dir))?.into_iter().filter(|(_, path)| looks_complete(path)).map(|(step, _)| step).collect())
}

/// Whether a checkpoint folder's MANIFEST parses and lists files of the sizes on disk: the
/// cheap half of [`verify`] (no hashing), enough to tell a complete checkpoint from a torn one.
fn looks_complete(dir: &Path) -> bool {
    let Ok(bytes) = fs::read(dir.join(MANIFEST)) else { return false };
    let Ok(list) = serde_json::from_slice::<FileList>(&bytes) else { return false };
    list.files.iter().all(|f| fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.len() == f.size))
}

/// Refuses to start writing `bytes` into `dir` when its filesystem has less room (with a
/// margin for the small files and the filesystem's own use): failing before writing leaves
/// nothing half-written, and the error says which disk is full and how much is missing.
pub fn check_free_space(dir: &Path, bytes: u64) -> Result<(), CheckpointError> {
    let Some(available) = available_bytes(dir) else { return Ok(()) };
    let needed = bytes + bytes / 20 + (1 << 20);
    if available >= needed {
        return Ok(());
    }
    Err(CheckpointError::NoSpace { path: dir.to_path_buf(), needed, available })
}

/// Bytes an unprivileged writer may still use on the filesystem holding `dir` (statvfs).
fn available_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a struct statvfs fills.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// The validation loss the Evaluator recorded for a checkpoint (its `eval.json`), if any.
fn val_loss(dir: &Path) -> Option<f64> {
    let bytes = fs::read(dir.join("eval.json")).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("val_loss")?.as_f64().filter(|v| v.is_finite())
}

/// Retention, applied after `committed` was committed: keeps the newest `keep_last` checkpoints,
/// the one with the best (lowest) validation loss, and those in `pinned` (still being evaluated
/// or deployed); deletes the other checkpoints and the temporary folders of steps up to
/// `committed` (writes abandoned by a membership change). Returns what it deleted.
pub fn apply_retention(
    run_dir: &Path,
    committed: u64,
    keep_last: usize,
    pinned: &std::collections::BTreeSet<u64>,
) -> Result<Vec<PathBuf>, CheckpointError> {
    let dir = checkpoints_dir(run_dir);
    // Only complete checkpoints count towards keep_last (a folder without a MANIFEST that
    // matches its files is a torn write, left for the operator to look at).
    let steps: Vec<(u64, PathBuf)> = list_steps(&dir)?.into_iter().filter(|(_, path)| looks_complete(path)).collect();
    let best = steps
        .iter()
        .filter_map(|(step, path)| val_loss(path).map(|loss| (loss, *step)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, step)| step);
    let mut removed = Vec::new();
    let keep_from = steps.len().saturating_sub(keep_last);
    for (step, path) in &steps[..keep_from] {
        if pinned.contains(step) || best == Some(*step) {
            continue;
        }
        fs::remove_dir_all(path).map_err(io(path))?;
        removed.push(path.clone());
    }
    for entry in fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let step = name
            .strip_suffix(".tmp")
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.split('.').next())
            .and_then(|n| n.parse::<u64>().ok());
        if step.is_some_and(|s| s <= committed) {
            fs::remove_dir_all(entry.path()).map_err(io(&entry.path()))?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}
