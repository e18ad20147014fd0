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

use troupe_core::proto::FileDigest;
use troupe_core::shard::ShardLayout;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "MANIFEST";
pub const MODEL_FILE: &str = "model.safetensors";
pub const STATE_FILE: &str = "state.json";
/// The model's shape (`GptConfig` as JSON), next to its weights.
pub const MODEL_CONFIG_FILE: &str = "model.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
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
    let state = read_train_state(&tmp)?;
    if state.step != step || state.layout.world_size != world_size {
        return Err(invalid(format!(
            "state.json says step {} over {} ranks, the coordinator committed step {step} over {world_size}",
            state.step, state.layout.world_size
        )));
    }
    for rank in 0..world_size {
        if !files.iter().any(|f| f.name == shard_file(rank)) {
            return Err(invalid(format!("rank {rank} reported no {}", shard_file(rank))));
        }
    }
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
        strategy: state.strategy,
        layout: state.layout,
        created_unix_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        files,
    };
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

/// One rank's part of the training state, copied to host memory: what it writes to its shard
/// file. All three vectors have the layout's shard length.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardSnapshot {
    pub rank: u32,
    pub step: u64,
    pub params: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

/// The three tensors of a shard file, in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardPart {
    Params,
    ExpAvg,
    ExpAvgSq,
}

impl ShardPart {
    pub const ALL: [ShardPart; 3] = [ShardPart::Params, ShardPart::ExpAvg, ShardPart::ExpAvgSq];
    fn name(self) -> &'static str {
        match self {
            ShardPart::Params => "params",
            ShardPart::ExpAvg => "exp_avg",
            ShardPart::ExpAvgSq => "exp_avg_sq",
        }
    }
}

/// Makes the calling thread a background one: CPU nice +10 and the lowest best-effort I/O
/// priority. A checkpoint writer runs beside training on the same cores; this way it yields to
/// the step while still finishing well before the next checkpoint (the idle class, tried too,
/// starved it on a busy machine: a crash then lost checkpoints that training had long
/// "written"). Best effort: a refusal (e.g. in a restricted container) changes nothing else.
pub fn lower_thread_priority() {
    // SAFETY: plain syscalls on this thread's own id; no memory is passed.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid, 10);
        // ioprio_set(IOPRIO_WHO_PROCESS, tid, IOPRIO_CLASS_BE << 13 | 7)
        let _ = libc::syscall(libc::SYS_ioprio_set, 1, tid, (2 << 13) | 7);
    }
}

/// Writes to `file` in pieces, hashing every byte on the way (one pass over the data), and
/// starts the disk writing each piece as soon as it is in the page cache
/// (`sync_file_range(WRITE)`), so that hashing and writing the next piece overlap with the disk
/// instead of all of it waiting for the final fsync.
struct HashingWriter {
    file: File,
    hasher: Sha256,
    written: u64,
    /// Bytes up to here have been handed to the disk.
    started: u64,
}

/// Writeback is started every this many bytes.
const WRITEBACK_PIECE: u64 = 32 << 20;

impl HashingWriter {
    fn write_all(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let n = buf.len().min(WRITEBACK_PIECE as usize);
            self.file.write_all(&buf[..n])?;
            self.hasher.update(&buf[..n]);
            self.written += n as u64;
            buf = &buf[n..];
            if self.written - self.started >= WRITEBACK_PIECE {
                use std::os::fd::AsRawFd;
                // SAFETY: a plain syscall on our open file; a failure only loses the head start.
                unsafe {
                    libc::sync_file_range(
                        self.file.as_raw_fd(),
                        self.started as i64,
                        (self.written - self.started) as i64,
                        libc::SYNC_FILE_RANGE_WRITE,
                    );
                }
                self.started = self.written;
            }
        }
        Ok(())
    }
}

/// Writes `shard` as `dir/shard-<rank>.safetensors` (float32 `params`, `exp_avg`,
/// `exp_avg_sq` and an int64 `step`), fsyncs it, and returns its size and sha256, computed while
/// writing. `fault` is called once half of the tensor bytes are written (fault injection).
pub fn write_shard(dir: &Path, shard: &ShardSnapshot, fault: &dyn Fn()) -> Result<FileDigest, CheckpointError> {
    let name = shard_file(shard.rank);
    let path = dir.join(&name);
    let n = shard.params.len();
    if shard.exp_avg.len() != n || shard.exp_avg_sq.len() != n {
        return Err(CheckpointError::Invalid { dir: dir.to_path_buf(), reason: "shard parts of different lengths".into() });
    }
    let bytes = 4 * n;
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt", "rank": shard.rank.to_string()}));
    for (i, part) in ShardPart::ALL.iter().enumerate() {
        header.insert(part.name().into(), serde_json::json!({"dtype": "F32", "shape": [n], "data_offsets": [i * bytes, (i + 1) * bytes]}));
    }
    header.insert("step".into(), serde_json::json!({"dtype": "I64", "shape": [], "data_offsets": [3 * bytes, 3 * bytes + 8]}));
    let mut text = serde_json::to_vec(&serde_json::Value::Object(header)).expect("plain JSON");
    // Data must start 8-byte aligned: pad the header with spaces, as the format allows.
    while (8 + text.len()) % 8 != 0 {
        text.push(b' ');
    }
    let file = File::create(&path).map_err(io(&path))?;
    let mut w = HashingWriter { file, hasher: Sha256::new(), written: 0, started: 0 };
    // The header is small: one buffer with the first tensor's start is one write.
    let mut head = (text.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&text);
    w.write_all(&head).map_err(io(&path))?;
    for (i, values) in [&shard.params, &shard.exp_avg, &shard.exp_avg_sq].into_iter().enumerate() {
        w.write_all(f32_bytes(values)).map_err(io(&path))?;
        if i == 1 {
            fault();
        }
    }
    w.write_all(&(shard.step as i64).to_le_bytes()).map_err(io(&path))?;
    w.file.sync_all().map_err(io(&path))?;
    Ok(FileDigest { name, size: w.written, sha256: hex::encode(w.hasher.finalize()) })
}

/// The bytes of `values` in little-endian order (the host's order: troupe runs on little-endian
/// machines only, which `f32_bytes` checks at compile time).
fn f32_bytes(values: &[f32]) -> &[u8] {
    const _: () = assert!(cfg!(target_endian = "little"), "checkpoint files are little-endian");
    // SAFETY: any f32 is 4 initialised bytes; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

/// Reads any range of the flat training state from a checkpoint's shard files, whatever
/// world size and strategy wrote them. The files are memory-mapped: only the ranges asked for
/// are read from disk.
pub struct ShardReader {
    dir: PathBuf,
    layout: ShardLayout,
    step: u64,
    files: Vec<memmap2::Mmap>,
    /// Per file, where each part's data starts in it (bytes), in [`ShardPart::ALL`]'s order.
    starts: Vec<[usize; 3]>,
}

impl ShardReader {
    /// Opens the shard files of the checkpoint in `dir` (its `state.json` names the layout) and
    /// checks their headers: three float32 tensors of the shard length and the step.
    pub fn open(dir: &Path) -> Result<ShardReader, CheckpointError> {
        let state = read_train_state(dir)?;
        let layout = state.layout;
        let invalid = |reason: String| CheckpointError::Invalid { dir: dir.to_path_buf(), reason };
        let mut files = Vec::with_capacity(layout.world_size as usize);
        let mut starts = Vec::with_capacity(layout.world_size as usize);
        for rank in 0..layout.world_size {
            let path = dir.join(shard_file(rank));
            let file = File::open(&path).map_err(io(&path))?;
            // SAFETY: checkpoint files are immutable once written (the commit renames a folder
            // nobody writes to any more); a concurrent truncation would be a user error.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(&path))?;
            let st = safetensors::SafeTensors::deserialize(&map)
                .map_err(|e| invalid(format!("{} is not a valid safetensors file: {e}", shard_file(rank))))?;
            let mut part_starts = [0; 3];
            for (i, part) in ShardPart::ALL.into_iter().enumerate() {
                let view = st.tensor(part.name()).map_err(|_| invalid(format!("{} has no `{}` tensor", shard_file(rank), part.name())))?;
                part_starts[i] = view.data().as_ptr() as usize - map.as_ptr() as usize;
                if view.dtype() != safetensors::Dtype::F32 || view.shape() != [layout.shard_len()] {
                    return Err(invalid(format!(
                        "{}: `{}` is {:?} {:?}, the layout needs F32 [{}]",
                        shard_file(rank),
                        part.name(),
                        view.dtype(),
                        view.shape(),
                        layout.shard_len()
                    )));
                }
            }
            let step = st.tensor("step").ok().filter(|v| v.dtype() == safetensors::Dtype::I64 && v.data().len() == 8);
            let step = step.map(|v| i64::from_le_bytes(v.data().try_into().expect("8 bytes")));
            if step != Some(state.step as i64) {
                return Err(invalid(format!("{} is at step {step:?}, state.json at {}", shard_file(rank), state.step)));
            }
            drop(st);
            files.push(map);
            starts.push(part_starts);
        }
        Ok(ShardReader { dir: dir.to_path_buf(), layout, step: state.step, files, starts })
    }

    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Copies `range` of the flat `part` into `out` (of the range's length).
    pub fn read(&self, part: ShardPart, range: Range<usize>, out: &mut [f32]) -> Result<(), CheckpointError> {
        if out.len() != range.len() || range.end > self.layout.numel() {
            return Err(CheckpointError::Invalid {
                dir: self.dir.clone(),
                reason: format!("asked for {range:?} of a state of {} scalars into {} values", self.layout.numel(), out.len()),
            });
        }
        let part_index = ShardPart::ALL.iter().position(|p| *p == part).expect("one of ALL");
        for piece in self.layout.locate(range.clone()) {
            let start = self.starts[piece.rank as usize][part_index] + 4 * piece.local;
            let src = &self.files[piece.rank as usize][start..start + 4 * piece.global.len()];
            let dst = &mut out[piece.global.start - range.start..piece.global.end - range.start];
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Ok(())
    }

    /// `range` of the flat `part`, as a new vector.
    pub fn read_range(&self, part: ShardPart, range: Range<usize>) -> Result<Vec<f32>, CheckpointError> {
        let mut out = vec![0f32; range.len()];
        self.read(part, range, &mut out)?;
        Ok(out)
    }

    /// The whole flat `part` (e.g. every parameter, to consolidate the model).
    pub fn read_all(&self, part: ShardPart) -> Result<Vec<f32>, CheckpointError> {
        self.read_range(part, 0..self.layout.numel())
    }
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
    let steps = list_steps(&dir)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("troupe-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// A committed checkpoint of a 10-scalar state over `world` ranks, values from `step`.
    fn write_step_over(run: &Path, step: u64, world: u32) -> PathBuf {
        let tmp = tmp_dir(run, step, 1);
        fs::create_dir_all(&tmp).unwrap();
        let layout = ShardLayout::new(world, vec![6, 4]);
        let mut files = Vec::new();
        for rank in 0..world {
            let mut shard = ShardSnapshot {
                rank,
                step,
                params: vec![0.0; layout.shard_len()],
                exp_avg: vec![0.0; layout.shard_len()],
                exp_avg_sq: vec![0.0; layout.shard_len()],
            };
            for p in layout.owned(rank) {
                for (k, g) in p.global.clone().enumerate() {
                    shard.params[p.local + k] = (step * 100 + g as u64) as f32;
                    shard.exp_avg[p.local + k] = -(g as f32);
                    shard.exp_avg_sq[p.local + k] = g as f32 * 0.5;
                }
            }
            files.push(write_shard(&tmp, &shard, &|| ()).unwrap());
        }
        let state =
            TrainState { step, cursor: 0, seed: 1, world_size: world, strategy: "zero1".into(), tokens_seen: 0, vocab_size: 8, layout };
        fs::write(tmp.join(STATE_FILE), serde_json::to_vec(&state).unwrap()).unwrap();
        files.push(digest_file(&tmp.join(STATE_FILE)).unwrap());
        commit(run, step, 1, world, &files).unwrap()
    }

    fn write_step(run: &Path, step: u64) -> PathBuf {
        write_step_over(run, step, 2)
    }

    #[test]
    fn shards_read_back_any_range_whatever_wrote_them() {
        let run = scratch("reshard");
        for world in [1, 2, 3, 4] {
            let dir = write_step_over(&run, world as u64, world);
            let reader = ShardReader::open(&dir).unwrap();
            let all: Vec<f32> = (0..10).map(|g| (world as u64 * 100 + g) as f32).collect();
            assert_eq!(reader.read_all(ShardPart::Params).unwrap(), all);
            let mut part = vec![0f32; 5];
            reader.read(ShardPart::ExpAvgSq, 3..8, &mut part).unwrap();
            assert_eq!(part, vec![1.5, 2.0, 2.5, 3.0, 3.5]);
            assert!(reader.read(ShardPart::ExpAvg, 8..11, &mut [0.0; 3]).is_err());
        }
        // The files are valid safetensors for other readers too.
        let dir = final_dir(&run, 2);
        let bytes = fs::read(dir.join(shard_file(1))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("params").unwrap().shape(), &[5]);
    }

    #[test]
    fn commit_then_resume_newest() {
        let run = scratch("newest");
        write_step(&run, 10);
        let dest = write_step(&run, 20);
        let point = find_resumable(&run).unwrap().unwrap();
        assert_eq!(point.dir, dest);
        assert_eq!(point.manifest.step, 20);
        assert_eq!(point.manifest.layout, ShardLayout::new(2, vec![6, 4]));
        assert_eq!(point.manifest.strategy, "zero1");
        assert!(point.skipped.is_empty());
    }

    #[test]
    fn corrupted_or_torn_checkpoints_fall_back_and_say_why() {
        let run = scratch("fallback");
        write_step(&run, 10);
        let d20 = write_step(&run, 20);
        let d30 = write_step(&run, 30);
        // One flipped byte inside shard 1's parameters.
        let shard = d30.join(shard_file(1));
        let mut bytes = fs::read(&shard).unwrap();
        let at = bytes.len() - 20;
        bytes[at] ^= 0x40;
        fs::write(&shard, bytes).unwrap();
        fs::remove_file(d20.join(shard_file(0))).unwrap(); // missing file
        fs::create_dir_all(final_dir(&run, 40)).unwrap(); // renamed but no MANIFEST
        let point = find_resumable(&run).unwrap().unwrap();
        assert_eq!(point.manifest.step, 10);
        assert_eq!(point.skipped.len(), 3);
        assert!(point.skipped[0].contains("MANIFEST"), "{:?}", point.skipped);
        assert!(point.skipped[1].contains("shard-00001.safetensors is corrupted"), "{:?}", point.skipped);
        assert!(point.skipped[2].contains("shard-00000.safetensors is missing"), "{:?}", point.skipped);
    }

    #[test]
    fn commit_refuses_files_that_differ_from_the_report() {
        let run = scratch("refuse");
        let tmp = tmp_dir(&run, 5, 1);
        fs::create_dir_all(&tmp).unwrap();
        fs::write(tmp.join("a.bin"), b"abc").unwrap();
        let mut d = digest_file(&tmp.join("a.bin")).unwrap();
        d.size = 4;
        let err = commit(&run, 5, 1, 1, &[d]).unwrap_err().to_string();
        assert!(err.contains("reported 4"), "{err}");
        // A rank's shard missing from the reports: refused too.
        let d = digest_file(&tmp.join("a.bin")).unwrap();
        let err = commit(&run, 5, 1, 1, &[d]).unwrap_err().to_string();
        assert!(err.contains("state.json"), "{err}");
        assert!(find_resumable(&run).unwrap().is_none());
    }

    #[test]
    fn retention_keeps_newest_and_best_and_clears_abandoned_writes() {
        let run = scratch("retention");
        for s in [1, 2, 3, 4, 5] {
            write_step(&run, s);
        }
        fs::write(final_dir(&run, 2).join("eval.json"), r#"{"step": 2, "val_loss": 1.5}"#).unwrap();
        fs::write(final_dir(&run, 3).join("eval.json"), r#"{"step": 3, "val_loss": 2.5}"#).unwrap();
        fs::create_dir_all(tmp_dir(&run, 4, 7)).unwrap(); // abandoned at step 4
        fs::create_dir_all(tmp_dir(&run, 6, 7)).unwrap(); // being written
        apply_retention(&run, 5, 2, &Default::default()).unwrap();
        let left: Vec<u64> = list_steps(&checkpoints_dir(&run)).unwrap().iter().map(|s| s.0).collect();
        assert_eq!(left, vec![2, 4, 5], "the best (2) and the newest two");
        assert!(!tmp_dir(&run, 4, 7).exists());
        assert!(tmp_dir(&run, 6, 7).exists());
    }
}
