//! Checkpoints in object storage (`checkpoint.store = "s3://bucket/prefix"`), so that a run
//! survives the loss of any host's disk and can resume on hosts that never saw its folder.
//!
//! ```text
//! <store>/<run name>/checkpoints/step-000500.g3/
//!     shard-00000.safetensors …  state.json  model.json  tokenizer.json   (from the ranks)
//!     MANIFEST                                                           (the commit)
//! ```
//! Each rank uploads the files it has just written (its shard; rank 0 also the small files)
//! into the attempt's folder, named by step *and* membership generation: an upload from an
//! attempt abandoned by a membership change can never land in the folder of a committed one.
//! The coordinator commits by checking every reported file's size in the store, reading
//! `state.json`, and writing the MANIFEST (sizes and sha256 from the writers) with a
//! conditional PUT: a checkpoint exists in the store exactly when its MANIFEST does, and of two
//! coordinators racing (an old one that has not noticed it was replaced) one wins. The
//! coordinator then fetches the checkpoint into the run folder of its own host, checking every
//! file's sha256, where evaluation, deployment and retention use it as they use a local one;
//! resume takes the newest committed checkpoint in the store when it is newer than the host's.
//!
//! Workers resume by ranged reads: each shard file has a sidecar `<shard>.blocks` with the
//! sha256 of its header and of every 4 MiB block (the sidecar itself listed, with its sha256,
//! in the MANIFEST), so a rank fetches only the headers and the blocks that hold the ranges it
//! needs (under ZeRO, its slice of the state) and checks each before using a byte of it.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use troupe_core::proto::FileDigest;

use super::{read_train_state, shard_file, write_atomic, CheckpointError, Manifest, MANIFEST};
use crate::storage::Remote;

/// The checkpoints of one run in the store.
pub struct CheckpointStore {
    remote: Arc<Remote>,
}

/// Blocks of a shard file that ranged reads fetch and verify one by one.
pub const BLOCK: usize = 4 << 20;
/// Blocks a reader keeps per shard file (128 MiB).
const CACHED_BLOCKS: usize = 32;

/// The sidecar of shard file `name`: the sha256 of each of its blocks (a JSON list).
pub fn blocks_file(name: &str) -> String {
    format!("{name}.blocks")
}

/// A shard file's sidecar: the digest of its safetensors header (the first `header_len`
/// bytes) and of each [`BLOCK`], so that a reader checks what it fetches without fetching the
/// whole file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BlockDigests {
    pub header_len: u64,
    pub header_sha256: String,
    pub block: u64,
    pub blocks: Vec<String>,
}

/// The sidecar of a local shard file.
pub fn block_digests(path: &Path) -> Result<BlockDigests, CheckpointError> {
    use sha2::Digest;
    use std::io::Read;
    let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut blocks = Vec::new();
    let mut first = Vec::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        let mut filled = 0;
        while filled < BLOCK {
            let n = file.read(&mut buf[filled..]).map_err(io)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if blocks.is_empty() {
            first = buf[..filled.min(BLOCK)].to_vec();
        }
        blocks.push(hex::encode(sha2::Sha256::digest(&buf[..filled])));
        if filled < BLOCK {
            break;
        }
    }
    let n = first.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).unwrap_or(0);
    let header_len = 8 + n;
    let header = if header_len as usize <= first.len() {
        first[..header_len as usize].to_vec()
    } else {
        let mut header = vec![0u8; header_len as usize];
        let mut file = std::fs::File::open(path).map_err(io)?;
        file.read_exact(&mut header).map_err(io)?;
        header
    };
    Ok(BlockDigests { header_len, header_sha256: hex::encode(sha2::Sha256::digest(&header)), block: BLOCK as u64, blocks })
}

/// One rank's shard file in the store, read by verified blocks.
pub struct StoredShard {
    remote: Arc<Remote>,
    key: String,
    size: u64,
    digests: BlockDigests,
    /// Blocks fetched, kept for the reads that follow (a rank's pieces of the three parts
    /// interleave over the same blocks), the oldest dropped past [`CACHED_BLOCKS`].
    cache: Mutex<std::collections::VecDeque<(usize, Arc<Vec<u8>>)>>,
    fetched: AtomicU64,
}

impl StoredShard {
    fn block(&self, index: usize) -> Result<Arc<Vec<u8>>, CheckpointError> {
        use sha2::Digest;
        if let Some((_, bytes)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|(i, _)| *i == index) {
            return Ok(bytes.clone());
        }
        let start = (index * BLOCK) as u64;
        let end = (start + BLOCK as u64).min(self.size);
        let bytes = self.remote.get_range(&self.key, start..end)?;
        self.fetched.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let want = self.digests.blocks.get(index).map(String::as_str).unwrap_or_default();
        if hex::encode(sha2::Sha256::digest(&bytes)) != want {
            return Err(CheckpointError::Invalid {
                dir: format!("{}/{}", self.remote.url(), self.key).into(),
                reason: format!("block {index} does not match its sha256 in {}", blocks_file(&self.key)),
            });
        }
        let bytes = Arc::new(bytes);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHED_BLOCKS {
            cache.pop_front();
        }
        cache.push_back((index, bytes.clone()));
        Ok(bytes)
    }

    /// Bytes `range` of the file, from the blocks that hold them, each verified.
    pub(super) fn read(&self, range: Range<usize>) -> Result<Vec<u8>, CheckpointError> {
        if range.end as u64 > self.size || range.start > range.end {
            return Err(CheckpointError::Invalid {
                dir: format!("{}/{}", self.remote.url(), self.key).into(),
                reason: format!("bytes {range:?} lie outside a file of {} bytes", self.size),
            });
        }
        let mut out = Vec::with_capacity(range.len());
        let mut at = range.start;
        while at < range.end {
            let index = at / BLOCK;
            let block = self.block(index)?;
            let from = at - index * BLOCK;
            let to = (range.end - index * BLOCK).min(block.len());
            out.extend_from_slice(&block[from..to]);
            at = index * BLOCK + to;
        }
        Ok(out)
    }

    /// The safetensors header (its JSON): only its own bytes are fetched, checked against its
    /// digest in the sidecar.
    pub(super) fn header(&self) -> Result<serde_json::Value, CheckpointError> {
        use sha2::Digest;
        let invalid = |reason: String| CheckpointError::Invalid { dir: format!("{}/{}", self.remote.url(), self.key).into(), reason };
        let len = self.digests.header_len;
        if len < 8 || len > self.size || len > 100 << 20 {
            return Err(invalid(format!("a header of {len} bytes does not fit the file")));
        }
        let bytes = self.remote.get_range(&self.key, 0..len)?;
        self.fetched.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if hex::encode(sha2::Sha256::digest(&bytes)) != self.digests.header_sha256 {
            return Err(invalid("its header does not match its sha256 in the sidecar".into()));
        }
        serde_json::from_slice(&bytes[8..]).map_err(|e| invalid(format!("the safetensors header is not valid: {e}")))
    }

    /// Where the tensors' data begins.
    pub(super) fn data_start(&self) -> usize {
        self.digests.header_len as usize
    }

    pub(super) fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }
}

/// `step-000500.g3` → (500, 3).
fn parse_attempt(name: &str) -> Option<(u64, u64)> {
    let (step, generation) = name.strip_prefix("step-")?.split_once(".g")?;
    Some((step.parse().ok()?, generation.parse().ok()?))
}

/// The store's folder name of an attempt at `step` in membership generation `generation`:
/// the name of the temporary folder the ranks write into, without `.tmp`.
pub fn attempt_name(step: u64, generation: u64) -> String {
    format!("{}.g{generation}", super::step_dir_name(step))
}

impl CheckpointStore {
    /// The checkpoints of run `run_name` under `store` (`s3://bucket/prefix`).
    pub fn open(store: &str, run_name: &str) -> Result<CheckpointStore, CheckpointError> {
        let url = format!("{}/{run_name}/checkpoints", store.trim_end_matches('/'));
        Ok(CheckpointStore { remote: Arc::new(Remote::open(&url)?) })
    }

    pub fn url(&self) -> &str {
        self.remote.url()
    }

    /// Uploads the files a rank wrote into `dir` (as reported by its writer) to the attempt's
    /// folder. Multipart for large files; a failed upload leaves no object under its name.
    pub fn upload(&self, attempt: &str, dir: &Path, files: &[FileDigest]) -> Result<(), CheckpointError> {
        if parse_attempt(attempt).is_none() {
            return Err(CheckpointError::Invalid {
                dir: dir.to_path_buf(),
                reason: format!("{attempt:?} is not a checkpoint attempt's name"),
            });
        }
        for file in files {
            self.remote.put_file(&format!("{attempt}/{}", file.name), &dir.join(&file.name))?;
        }
        Ok(())
    }

    /// Commits an attempt: every reported file is in the store at its reported size, every
    /// rank's shard is among them, `state.json` agrees with the step and world size; then the
    /// MANIFEST, put only if absent.
    pub fn commit(&self, step: u64, generation: u64, world_size: u32, reported: &[FileDigest]) -> Result<Manifest, CheckpointError> {
        let attempt = attempt_name(step, generation);
        let invalid = |reason: String| CheckpointError::Invalid { dir: format!("{}/{attempt}", self.url()).into(), reason };
        let mut files = reported.to_vec();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        files.dedup_by(|a, b| a.name == b.name);
        if files.len() != reported.len() {
            return Err(invalid("a file was reported twice".into()));
        }
        for want in &files {
            if want.name.contains('/') || want.name.contains("..") || want.name == MANIFEST || want.name.is_empty() {
                return Err(invalid(format!("bad file name {:?}", want.name)));
            }
            match self.remote.size(&format!("{attempt}/{}", want.name))? {
                Some(size) if size == want.size => {}
                Some(size) => {
                    return Err(invalid(format!("{} in the store has {size} bytes, its writer reported {}", want.name, want.size)))
                }
                None => return Err(invalid(format!("{} was reported but is not in the store", want.name))),
            }
        }
        let state_bytes = self.remote.get(&format!("{attempt}/{}", super::STATE_FILE))?;
        let state: super::TrainState =
            serde_json::from_slice(&state_bytes).map_err(|e| invalid(format!("{} is not valid: {e}", super::STATE_FILE)))?;
        let manifest = Manifest::for_commit(step, world_size, state, files).map_err(invalid)?;
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| invalid(format!("cannot encode MANIFEST: {e}")))?;
        if !self.remote.put_if_absent(&format!("{attempt}/{MANIFEST}"), text)? {
            // Ours, if an earlier try of this PUT reached the store but its answer was lost;
            // anything else is another coordinator's commit.
            let existing: Option<Manifest> = serde_json::from_slice(&self.remote.get(&format!("{attempt}/{MANIFEST}"))?).ok();
            if existing.as_ref().is_none_or(|m| m.files != manifest.files) {
                return Err(invalid("it already has a MANIFEST with other files: another coordinator committed it".into()));
            }
        }
        Ok(manifest)
    }

    /// The highest membership generation any attempt in the store was written in (0: none).
    /// A coordinator's generations restart at 1, so a restarted one starts above this: its
    /// attempts' names never meet those of an earlier coordinator, whose ranks may still be
    /// uploading.
    pub fn highest_generation(&self) -> Result<u64, CheckpointError> {
        Ok(self.remote.list_dirs("")?.iter().filter_map(|n| parse_attempt(n)).map(|(_, g)| g).max().unwrap_or(0))
    }

    /// Committed checkpoints (those with a MANIFEST), ascending by step: (step, attempt).
    pub fn committed(&self) -> Result<Vec<(u64, String)>, CheckpointError> {
        let mut found: Vec<(u64, u64, String)> = Vec::new();
        for name in self.remote.list_dirs("")? {
            let Some((step, generation)) = parse_attempt(&name) else { continue };
            if self.remote.exists(&format!("{name}/{MANIFEST}"))? {
                found.push((step, generation, name));
            }
        }
        found.sort();
        // One per step: the latest generation's.
        let mut steps: Vec<(u64, String)> = Vec::new();
        for (step, _, name) in found {
            match steps.last_mut() {
                Some(last) if last.0 == step => last.1 = name,
                _ => steps.push((step, name)),
            }
        }
        Ok(steps)
    }

    /// Fetches a committed checkpoint into `dest` (a checkpoint folder): every file is checked
    /// against the MANIFEST's size and sha256, the MANIFEST is written last and the folder
    /// renamed into place, so `dest` counts only when complete. A complete `dest` is kept.
    pub fn fetch(&self, attempt: &str, dest: &Path) -> Result<Manifest, CheckpointError> {
        if let Ok(manifest) = super::verify(dest) {
            return Ok(manifest);
        }
        let invalid = |reason: String| CheckpointError::Invalid { dir: format!("{}/{attempt}", self.url()).into(), reason };
        let text = self.remote.get(&format!("{attempt}/{MANIFEST}"))?;
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| invalid(format!("MANIFEST is not valid: {e}")))?;
        let tmp = dest.with_extension(format!("fetch-{}.tmp", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|source| CheckpointError::Io { path: tmp.clone(), source })?;
        let fetched = (|| {
            for want in &manifest.files {
                if want.name.contains('/') || want.name.contains("..") {
                    return Err(invalid(format!("MANIFEST names a file outside its folder: {:?}", want.name)));
                }
                let digest = self.remote.get_to_file(&format!("{attempt}/{}", want.name), &tmp.join(&want.name))?;
                let size = std::fs::metadata(tmp.join(&want.name)).map(|m| m.len()).unwrap_or(0);
                if digest.as_deref() != Some(want.sha256.as_str()) || size != want.size {
                    return Err(invalid(format!("{} in the store does not match its MANIFEST (sha256 or size)", want.name)));
                }
            }
            write_atomic(&tmp.join(MANIFEST), &text)?;
            read_train_state(&tmp)?;
            if dest.exists() {
                std::fs::remove_dir_all(dest).map_err(|source| CheckpointError::Io { path: dest.to_path_buf(), source })?;
            }
            std::fs::rename(&tmp, dest).map_err(|source| CheckpointError::Io { path: dest.to_path_buf(), source })?;
            if let Some(parent) = dest.parent() {
                super::fsync_path(parent)?;
            }
            Ok(())
        })();
        if fetched.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        fetched.map(|()| manifest)
    }

    /// Fetches the committed checkpoint of `step` into `dest`.
    pub fn fetch_step(&self, step: u64, dest: &Path) -> Result<Manifest, CheckpointError> {
        let Some((_, attempt)) = self.committed()?.into_iter().find(|(s, _)| *s == step) else {
            return Err(CheckpointError::Invalid {
                dir: format!("{}/{}", self.url(), super::step_dir_name(step)).into(),
                reason: "no committed checkpoint of that step in the store".into(),
            });
        };
        self.fetch(&attempt, dest)
    }

    /// A reader of the committed checkpoint of `step` that fetches only the blocks it reads
    /// (see [`BLOCK`]), every small file and block checked against the MANIFEST.
    pub fn reader(&self, step: u64) -> Result<super::ShardReader, CheckpointError> {
        use sha2::Digest;
        let Some((_, attempt)) = self.committed()?.into_iter().find(|(s, _)| *s == step) else {
            return Err(CheckpointError::Invalid {
                dir: format!("{}/{}", self.url(), super::step_dir_name(step)).into(),
                reason: "no committed checkpoint of that step in the store".into(),
            });
        };
        let name: PathBuf = format!("{}/{attempt}", self.url()).into();
        let invalid = |reason: String| CheckpointError::Invalid { dir: name.clone(), reason };
        let manifest: Manifest = serde_json::from_slice(&self.remote.get(&format!("{attempt}/{MANIFEST}"))?)
            .map_err(|e| invalid(format!("MANIFEST is not valid: {e}")))?;
        let small = |file: &str| -> Result<Vec<u8>, CheckpointError> {
            let want = manifest.files.iter().find(|f| f.name == file).ok_or_else(|| invalid(format!("the MANIFEST lists no {file}")))?;
            let bytes = self.remote.get(&format!("{attempt}/{file}"))?;
            if hex::encode(sha2::Sha256::digest(&bytes)) != want.sha256 {
                return Err(invalid(format!("{file} does not match its sha256 in the MANIFEST")));
            }
            Ok(bytes)
        };
        let state: super::TrainState =
            serde_json::from_slice(&small(super::STATE_FILE)?).map_err(|e| invalid(format!("state.json is not valid: {e}")))?;
        let mut files = Vec::with_capacity(state.layout.world_size as usize);
        for rank in 0..state.layout.world_size {
            let shard = shard_file(rank);
            let size = manifest.files.iter().find(|f| f.name == shard).map(|f| f.size).ok_or_else(|| invalid(format!("no {shard}")))?;
            let digests: BlockDigests = serde_json::from_slice(&small(&blocks_file(&shard))?)
                .map_err(|e| invalid(format!("{} is not valid: {e}", blocks_file(&shard))))?;
            if digests.block != BLOCK as u64 || digests.blocks.len() != (size as usize).div_ceil(BLOCK) {
                return Err(invalid(format!("{} lists {} blocks for {size} bytes", blocks_file(&shard), digests.blocks.len())));
            }
            files.push(StoredShard {
                remote: self.remote.clone(),
                key: format!("{attempt}/{shard}"),
                size,
                digests,
                cache: Mutex::new(std::collections::VecDeque::new()),
                fetched: AtomicU64::new(0),
            });
        }
        super::ShardReader::from_stored(name, &state, files)
    }

    /// Retention in the store, after `committed` was committed: deletes committed checkpoints
    /// whose step is not in `keep` (what the local retention kept), and attempts without a
    /// MANIFEST at steps up to `committed` (abandoned by a membership change). The MANIFEST of
    /// a deleted checkpoint goes first, so a half-deleted one no longer counts.
    pub fn retain(&self, keep: &BTreeSet<u64>, committed: u64) -> Result<Vec<String>, CheckpointError> {
        let mut removed = Vec::new();
        for name in self.remote.list_dirs("")? {
            let Some((step, _)) = parse_attempt(&name) else { continue };
            if step > committed || keep.contains(&step) && self.remote.exists(&format!("{name}/{MANIFEST}"))? {
                continue;
            }
            if step == committed && self.remote.exists(&format!("{name}/{MANIFEST}"))? {
                continue;
            }
            self.remote.delete(&format!("{name}/{MANIFEST}"))?;
            self.remote.delete_dir(&name)?;
            removed.push(name);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn attempt_names_round_trip() {
        assert_eq!(super::attempt_name(500, 3), "step-000500.g3");
        assert_eq!(super::parse_attempt("step-000500.g3"), Some((500, 3)));
        assert_eq!(super::parse_attempt("step-000500"), None);
        assert_eq!(super::parse_attempt("step-x.g1"), None);
    }
}
