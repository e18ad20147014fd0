//! Checkpoints on disk: layout, integrity and the atomic commit.
//!
//! ```text
//! runs/<name>/checkpoints/step-000500/{model.safetensors, optim-rank0.safetensors, state.json, MANIFEST}
//! ```
//! Ranks write their files into `step-000500.tmp/` and fsync them. The coordinator's
//! Checkpointer then re-hashes them, fsyncs the folder, renames it to `step-000500/` and writes
//! `MANIFEST` (sizes and sha256 of every file) last, atomically. Only a folder whose MANIFEST
//! matches its files counts: a torn or corrupted checkpoint is skipped with a warning and resume
//! falls back to the previous complete one.

use crate::proto::FileDigest;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "MANIFEST";
pub const MODEL_FILE: &str = "model.safetensors";
pub const STATE_FILE: &str = "state.json";
/// The model's shape (`GptConfig` as JSON), next to its weights.
pub const MODEL_CONFIG_FILE: &str = "model.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
const MANIFEST_FORMAT: u32 = 1;

pub fn optim_file(rank: u32) -> String {
    format!("optim-rank{rank}.safetensors")
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {dir} is not usable: {reason}")]
    Invalid { dir: PathBuf, reason: String },
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
    pub created_unix_ms: u64,
    pub files: Vec<FileDigest>,
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
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

pub fn final_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(step_dir_name(step))
}

pub fn tmp_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("{}.tmp", step_dir_name(step)))
}

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
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
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

/// Makes a checkpoint count: checks the files the ranks reported against the disk, renames the
/// temporary folder into place and writes the MANIFEST last. Returns the final folder.
pub fn commit(
    run_dir: &Path,
    step: u64,
    world_size: u32,
    strategy: &str,
    reported: &[FileDigest],
) -> Result<PathBuf, CheckpointError> {
    let tmp = tmp_dir(run_dir, step);
    let dest = final_dir(run_dir, step);
    let mut files = Vec::with_capacity(reported.len());
    for want in reported {
        if want.name.contains('/') || want.name.contains("..") || want.name == MANIFEST {
            return Err(CheckpointError::Invalid { dir: tmp, reason: format!("bad file name {:?}", want.name) });
        }
        let got = digest_file(&tmp.join(&want.name))?;
        if got != *want {
            return Err(CheckpointError::Invalid {
                dir: tmp,
                reason: format!(
                    "{} on disk ({} bytes, sha256 {}) differs from what its writer reported ({} bytes, sha256 {})",
                    want.name, got.size, got.sha256, want.size, want.sha256
                ),
            });
        }
        files.push(got);
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    fsync_path(&tmp)?;
    if dest.exists() {
        // A previous attempt at this step got as far as the rename but not the MANIFEST.
        fs::remove_dir_all(&dest).map_err(io(&dest))?;
    }
    fs::rename(&tmp, &dest).map_err(io(&dest))?;
    fsync_path(&checkpoints_dir(run_dir))?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        step,
        world_size,
        strategy: strategy.to_string(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        files,
    };
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Invalid {
        dir: dest.clone(),
        reason: format!("cannot encode MANIFEST: {e}"),
    })?;
    write_atomic(&dest.join(MANIFEST), &text)?;
    Ok(dest)
}

/// Reads a checkpoint's MANIFEST and checks every file it lists against the disk.
pub fn verify(dir: &Path) -> Result<Manifest, CheckpointError> {
    let invalid = |reason: String| CheckpointError::Invalid { dir: dir.to_path_buf(), reason };
    let path = dir.join(MANIFEST);
    let text = fs::read(&path).map_err(|e| invalid(format!("no readable MANIFEST ({e})")))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| invalid(format!("MANIFEST is not valid: {e}")))?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(invalid(format!("MANIFEST format {} is not supported", manifest.format)));
    }
    for want in &manifest.files {
        let file = dir.join(&want.name);
        if !file.is_file() {
            return Err(invalid(format!("{} is missing", want.name)));
        }
        let got = digest_file(&file)?;
        if got.size != want.size || got.sha256 != want.sha256 {
            return Err(invalid(format!("{} is corrupted (sha256 or size does not match the MANIFEST)", want.name)));
        }
    }
    Ok(manifest)
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

/// Deletes all but the newest `keep_last` complete checkpoints, except those in `pinned`
/// (still being evaluated or deployed). Called only after a commit, so the newest always
/// survives.
pub fn apply_retention(run_dir: &Path, keep_last: usize, pinned: &std::collections::BTreeSet<u64>) -> Result<Vec<PathBuf>, CheckpointError> {
    let dir = checkpoints_dir(run_dir);
    let steps = list_steps(&dir)?;
    let mut removed = Vec::new();
    if steps.len() > keep_last {
        for (_, path) in steps[..steps.len() - keep_last].iter().filter(|(step, _)| !pinned.contains(step)) {
            fs::remove_dir_all(path).map_err(io(path))?;
            removed.push(path.clone());
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("troupe-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn write_step(run: &Path, step: u64) -> PathBuf {
        let tmp = tmp_dir(run, step);
        fs::create_dir_all(&tmp).unwrap();
        fs::write(tmp.join("a.bin"), vec![step as u8; 100]).unwrap();
        fs::write(tmp.join("b.bin"), b"hello").unwrap();
        let files = vec![digest_file(&tmp.join("a.bin")).unwrap(), digest_file(&tmp.join("b.bin")).unwrap()];
        commit(run, step, 1, "ddp", &files).unwrap()
    }

    #[test]
    fn commit_then_resume_newest() {
        let run = scratch("newest");
        write_step(&run, 10);
        let dest = write_step(&run, 20);
        let point = find_resumable(&run).unwrap().unwrap();
        assert_eq!(point.dir, dest);
        assert_eq!(point.manifest.step, 20);
        assert!(point.skipped.is_empty());
    }

    #[test]
    fn corrupted_or_torn_checkpoints_fall_back_and_say_why() {
        let run = scratch("fallback");
        write_step(&run, 10);
        let d20 = write_step(&run, 20);
        let d30 = write_step(&run, 30);
        fs::write(d30.join("a.bin"), vec![0u8; 100]).unwrap(); // corrupted, same size
        fs::remove_file(d20.join("b.bin")).unwrap(); // missing file
        fs::create_dir_all(final_dir(&run, 40)).unwrap(); // renamed but no MANIFEST
        let point = find_resumable(&run).unwrap().unwrap();
        assert_eq!(point.manifest.step, 10);
        assert_eq!(point.skipped.len(), 3);
        assert!(point.skipped[0].contains("MANIFEST"), "{:?}", point.skipped);
        assert!(point.skipped[1].contains("a.bin is corrupted"), "{:?}", point.skipped);
        assert!(point.skipped[2].contains("b.bin is missing"), "{:?}", point.skipped);
    }

    #[test]
    fn commit_refuses_files_that_differ_from_the_report() {
        let run = scratch("refuse");
        let tmp = tmp_dir(&run, 5);
        fs::create_dir_all(&tmp).unwrap();
        fs::write(tmp.join("a.bin"), b"abc").unwrap();
        let mut d = digest_file(&tmp.join("a.bin")).unwrap();
        d.sha256 = "00".repeat(32);
        let err = commit(&run, 5, 1, "ddp", &[d]).unwrap_err().to_string();
        assert!(err.contains("differs"), "{err}");
        assert!(find_resumable(&run).unwrap().is_none());
    }

    #[test]
    fn retention_keeps_newest() {
        let run = scratch("retention");
        for s in [1, 2, 3, 4] {
            write_step(&run, s);
        }
        let removed = apply_retention(&run, 2, &Default::default()).unwrap();
        assert_eq!(removed.len(), 2);
        assert_eq!(list_steps(&checkpoints_dir(&run)).unwrap().iter().map(|s| s.0).collect::<Vec<_>>(), vec![3, 4]);
    }
}
