//! One rank's shard of a checkpoint: written while hashed, and read back by range.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use troupe_core::proto::FileDigest;
use troupe_core::shard::ShardLayout;

use super::{io, read_train_state, shard_file, CheckpointError};

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

/// Where a shard file's bytes come from: a memory map of a local file, or ranged reads of one
/// in object storage.
enum ShardBytes {
    Mapped(memmap2::Mmap),
    Stored(super::store::StoredShard),
}

impl ShardBytes {
    fn read(&self, range: Range<usize>) -> Result<std::borrow::Cow<'_, [u8]>, CheckpointError> {
        match self {
            ShardBytes::Mapped(map) => map.get(range.clone()).map(std::borrow::Cow::Borrowed).ok_or_else(|| CheckpointError::Invalid {
                dir: PathBuf::new(),
                reason: format!("bytes {range:?} lie outside a shard file of {} bytes", map.len()),
            }),
            ShardBytes::Stored(file) => file.read(range).map(std::borrow::Cow::Owned),
        }
    }
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
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(b' ');
    }
    let total = (8 + text.len() + 3 * bytes + 8) as u64;
    super::check_free_space(dir, total)?;
    let written = write_shard_file(&path, &text, shard, fault);
    if written.is_err() {
        // A half-written shard is useless and holds the space a retry needs.
        let _ = std::fs::remove_file(&path);
    }
    let (size, sha256) = written?;
    Ok(FileDigest { name, size, sha256 })
}

/// The body of [`write_shard`]: header, the three parts, the step; fsynced. Its size and sha256.
fn write_shard_file(path: &Path, text: &[u8], shard: &ShardSnapshot, fault: &dyn Fn()) -> Result<(u64, String), CheckpointError> {
    let file = File::create(path).map_err(io(path))?;
    let mut w = HashingWriter { file, hasher: Sha256::new(), written: 0, started: 0 };
    // The header is small: one buffer with the first tensor's start is one write.
    let mut head = (text.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(text);
    w.write_all(&head).map_err(io(path))?;
    for (i, values) in [&shard.params, &shard.exp_avg, &shard.exp_avg_sq].into_iter().enumerate() {
        w.write_all(f32_bytes(values)).map_err(io(path))?;
        if i == 1 {
            fault();
        }
    }
    w.write_all(&(shard.step as i64).to_le_bytes()).map_err(io(path))?;
    w.file.sync_all().map_err(io(path))?;
    Ok((w.written, hex::encode(w.hasher.finalize())))
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
    files: Vec<ShardBytes>,
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
            files.push(ShardBytes::Mapped(map));
            starts.push(part_starts);
        }
        Ok(ShardReader { dir: dir.to_path_buf(), layout, step: state.step, files, starts })
    }

    /// A reader over shard files in object storage that reads only the byte ranges asked for
    /// (in verified blocks): `name` is the checkpoint's URL (for messages), `state` its
    /// `state.json`, `files` each rank's stored shard, opened.
    pub(super) fn from_stored(
        name: PathBuf,
        state: &super::TrainState,
        files: Vec<super::store::StoredShard>,
    ) -> Result<ShardReader, CheckpointError> {
        let layout = state.layout.clone();
        let invalid = |reason: String| CheckpointError::Invalid { dir: name.clone(), reason };
        let mut starts = Vec::with_capacity(files.len());
        let mut bytes = Vec::with_capacity(files.len());
        for (rank, file) in files.into_iter().enumerate() {
            let header = file.header()?;
            let tensor = |t: &str| -> Result<(String, Vec<usize>, usize, usize), CheckpointError> {
                let info = header.get(t).ok_or_else(|| invalid(format!("{} has no `{t}` tensor", shard_file(rank as u32))))?;
                let dtype = info["dtype"].as_str().unwrap_or_default().to_string();
                let shape: Vec<usize> =
                    info["shape"].as_array().map(|a| a.iter().filter_map(|d| d.as_u64()).map(|d| d as usize).collect()).unwrap_or_default();
                let offsets = info["data_offsets"].as_array().filter(|o| o.len() == 2);
                let (a, b) = offsets
                    .and_then(|o| Some((o[0].as_u64()? as usize, o[1].as_u64()? as usize)))
                    .ok_or_else(|| invalid(format!("{}: `{t}` has no data offsets", shard_file(rank as u32))))?;
                Ok((dtype, shape, a, b))
            };
            let mut part_starts = [0; 3];
            for (i, part) in ShardPart::ALL.into_iter().enumerate() {
                let (dtype, shape, a, b) = tensor(part.name())?;
                if dtype != "F32" || shape != [layout.shard_len()] || b - a != 4 * layout.shard_len() {
                    return Err(invalid(format!(
                        "{}: `{}` is {dtype} {shape:?}, the layout needs F32 [{}]",
                        shard_file(rank as u32),
                        part.name(),
                        layout.shard_len()
                    )));
                }
                part_starts[i] = file.data_start() + a;
            }
            let (dtype, _, a, b) = tensor("step")?;
            let step_bytes = file.read(file.data_start() + a..file.data_start() + b)?;
            let step = (dtype == "I64" && step_bytes.len() == 8).then(|| i64::from_le_bytes(step_bytes[..8].try_into().expect("8 bytes")));
            if step != Some(state.step as i64) {
                return Err(invalid(format!("{} is at step {step:?}, state.json at {}", shard_file(rank as u32), state.step)));
            }
            bytes.push(ShardBytes::Stored(file));
            starts.push(part_starts);
        }
        Ok(ShardReader { dir: name, layout, step: state.step, files: bytes, starts })
    }

    /// Bytes fetched from object storage so far (0 for local files): what ranged reads saved
    /// shows against the checkpoint's size.
    pub fn fetched_bytes(&self) -> u64 {
        self.files.iter().map(|f| if let ShardBytes::Stored(s) = f { s.fetched() } else { 0 }).sum()
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
            let src = self.files[piece.rank as usize].read(start..start + 4 * piece.global.len())?;
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
