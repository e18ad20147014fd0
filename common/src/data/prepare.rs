//! Corpus preparation: raw documents in (text, JSONL, Parquet, from one or more named
//! sources), a folder of token shards, tokenizer and metadata out (see [`super::meta`] for
//! the layout).
//!
//! 1. The tokenizer: a given `tokenizer.json`, or a byte-level BPE trained on a bounded,
//!    seeded sample of the cleaned train documents (`tokenizer_sample_mb`).
//! 2. One streaming pass ([`super::pipeline`]): every document is cleaned and filtered
//!    (`[data.filters]`), de-duplicated (exact, and near-duplicates by MinHash LSH; the first
//!    copy is kept), assigned to train or validation by a seeded hash of its content, encoded
//!    and appended to its shards. Memory does not grow with the corpus, but for the dedup
//!    indexes (16 bytes per document for exact dedup, ~200 for near dedup).
//! 3. With several sources, their train documents are mixed by weight ([`super::mixture`]);
//!    each source keeps its own validation shards.
//!
//! Everything is written into `<out>.tmp-<pid>` and renamed into place at the end, so a folder
//! called `out` is always complete, and a failure leaves nothing behind.

use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};
use troupe_core::config::FilterConfig;

use super::dedup::{MinHasher, NearDedupIndex};
use super::error::{DataError, DataResult};
use super::filters::DropReason;
use super::meta::{Meta, SourceReport, ValSplit, FORMAT_VERSION, META_JSON, TOKENIZER_JSON};
use super::mixture::{mix, MixInput};
use super::pipeline::{self, InputFile, Outcome, Work};
use super::shards::ShardWriter;
use super::sources::source_files;
use super::tokenizer::{train_bpe, Tokenizer, MAX_VOCAB_SIZE, MIN_VOCAB_SIZE};
use super::tokens::{TokenDtype, TokenFile};

/// A named source of documents and its share of the train stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    /// Used in file names and reports: letters, digits, `-` and `_`.
    pub name: String,
    /// Files or folders; folders are walked recursively in sorted order.
    pub inputs: Vec<PathBuf>,
    /// Relative weight in the train stream (normalised over the sources).
    pub weight: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PrepareOptions {
    pub sources: Vec<Source>,
    /// A required file-name suffix for files found in folders, e.g. `"_gut.txt"` (they are
    /// then read as text whatever their extension).
    pub file_filter: Option<String>,
    /// The field (JSONL) or column (Parquet) holding a document's text.
    pub text_field: String,
    pub out: PathBuf,
    /// Vocabulary of the tokenizer to train (ignored with `tokenizer`).
    pub vocab_size: usize,
    /// A tokenizer to use instead of training one (a previous run's, a Hugging Face model's).
    pub tokenizer: Option<PathBuf>,
    /// Megabytes of cleaned train text the tokenizer is trained on (a seeded sample).
    pub tokenizer_sample_mb: u64,
    /// Share of documents held out for validation, in `[0, 1)`.
    pub val_fraction: f64,
    pub seed: u64,
    pub filters: FilterConfig,
    /// Worker threads (0: every core).
    pub threads: usize,
    /// Tokens per shard file.
    pub shard_tokens: u64,
    /// Records that are not documents (bad JSON, no text field) tolerated before stopping.
    pub max_bad_records: u64,
    /// Print progress lines and the final report.
    pub progress: bool,
}

impl PrepareOptions {
    /// One source named `corpus` reading `inputs`, with `troupe prepare`'s defaults.
    pub fn new(inputs: Vec<PathBuf>, out: PathBuf) -> PrepareOptions {
        PrepareOptions {
            sources: vec![Source { name: "corpus".into(), inputs, weight: 1.0 }],
            file_filter: None,
            text_field: "text".into(),
            out,
            vocab_size: 8192,
            tokenizer: None,
            tokenizer_sample_mb: 256,
            val_fraction: 0.1,
            seed: 1337,
            filters: FilterConfig::default(),
            threads: 0,
            shard_tokens: 256 << 20,
            max_bad_records: 1000,
            progress: false,
        }
    }
}

/// Prepares a corpus; see the module documentation for what it writes.
pub fn prepare(opts: &PrepareOptions) -> DataResult<Meta> {
    validate(opts)?;
    if opts.out.exists() {
        return Err(DataError::OutputExists { path: opts.out.clone() });
    }
    let name = opts.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = opts.out.with_file_name(format!("{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| DataError::io("remove the stale folder", &tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| DataError::io("create the folder", &tmp, e))?;
    let result = prepare_into(opts, &tmp).and_then(|meta| {
        fs::rename(&tmp, &opts.out).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::DirectoryNotEmpty => DataError::OutputExists { path: opts.out.clone() },
            _ => DataError::io("move the prepared folder into place at", &opts.out, e),
        })?;
        // The rename itself must reach the disk too, or a crash could lose the whole folder.
        if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(dir) = File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        Ok(meta)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn validate(opts: &PrepareOptions) -> DataResult<()> {
    let invalid = |field: &'static str, reason: String| Err(DataError::InvalidOption { field, reason });
    if opts.sources.is_empty() || opts.sources.iter().any(|s| s.inputs.is_empty()) {
        return invalid("inputs", "no input files or folders given".into());
    }
    let mut names = HashSet::new();
    for s in &opts.sources {
        if s.name.is_empty() || s.name.len() > 64 || !s.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return invalid("sources", format!("source name {:?}: use 1-64 letters, digits, '-' or '_'", s.name));
        }
        if !names.insert(s.name.as_str()) {
            return invalid("sources", format!("source name {:?} is given twice", s.name));
        }
        if !(s.weight.is_finite() && s.weight >= 0.0) {
            return invalid("sources", format!("source {:?} has weight {}; weights are >= 0", s.name, s.weight));
        }
    }
    if opts.sources.iter().all(|s| s.weight == 0.0) {
        return invalid("sources", "every source has weight 0: nothing would be trained on".into());
    }
    if !(opts.val_fraction.is_finite() && (0.0..1.0).contains(&opts.val_fraction)) {
        return invalid("val_fraction", format!("{} is not in [0, 1); 0.1 holds out a tenth of the documents", opts.val_fraction));
    }
    if opts.tokenizer.is_none() && !(MIN_VOCAB_SIZE..=MAX_VOCAB_SIZE).contains(&opts.vocab_size) {
        return invalid(
            "vocab_size",
            format!("{} is outside {MIN_VOCAB_SIZE}..={MAX_VOCAB_SIZE} (256 byte tokens plus the separator at least)", opts.vocab_size),
        );
    }
    if opts.out.file_name().is_none() {
        return invalid("out", format!("{} does not name a folder to create", opts.out.display()));
    }
    if let Err((field, reason)) = opts.filters.validate() {
        return Err(DataError::InvalidOption { field: "filters", reason: format!("{field}: {reason}") });
    }
    Ok(())
}

fn threads(opts: &PrepareOptions) -> usize {
    if opts.threads > 0 {
        opts.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

fn prepare_into(opts: &PrepareOptions, dir: &Path) -> DataResult<Meta> {
    let started = Instant::now();
    let mut files = Vec::new();
    for (source, s) in opts.sources.iter().enumerate() {
        for (path, format) in source_files(&s.inputs, opts.file_filter.as_deref())? {
            files.push(InputFile { source, path, format });
        }
    }
    let val_threshold = (opts.val_fraction * u64::MAX as f64) as u64;
    let (tokenizer_json, tokenizer_origin) = match &opts.tokenizer {
        Some(path) => {
            let json = fs::read_to_string(path).map_err(|e| DataError::io("read the tokenizer", path, e))?;
            (json, format!("given: {}", path.display()))
        }
        None => {
            let (sample, dropped) = tokenizer_sample(opts, &files, val_threshold)?;
            let mb = sample.iter().map(|t| t.len()).sum::<usize>() as f64 / 1e6;
            if sample.is_empty() {
                return Err(no_documents(files.len(), &dropped));
            }
            (train_bpe(&sample, opts.vocab_size)?, format!("byte-level BPE trained on a {mb:.1} MB sample of the train documents"))
        }
    };
    let tokenizer = Tokenizer::from_json(&tokenizer_json)?;
    let dtype = TokenDtype::for_vocab(tokenizer.vocab_size());
    if opts.progress {
        crate::say!("tokenizer: {tokenizer_origin}; {} ids, stored as {dtype:?}", tokenizer.vocab_size());
    }

    let mixing = opts.sources.len() > 1;
    let vocab = tokenizer.vocab_size();
    let mut sink = Sink {
        sources: opts
            .sources
            .iter()
            .map(|s| SourceSink {
                report: SourceReport {
                    name: s.name.clone(),
                    inputs: s.inputs.iter().map(|p| p.display().to_string()).collect(),
                    weight: s.weight,
                    ..SourceReport::default()
                },
                train: if mixing {
                    ShardWriter::new(dir, &format!("mix-{}", s.name), dtype, opts.shard_tokens)
                } else {
                    ShardWriter::new(dir, "train", dtype, opts.shard_tokens).counting(vocab)
                },
                val: ShardWriter::new(dir, &format!("val-{}", s.name), dtype, opts.shard_tokens),
                doc_ends: Vec::new(),
            })
            .collect(),
        exact: opts.filters.exact_dedup.then(HashSet::new),
        near: if opts.filters.near_dedup {
            Some(NearDedupIndex::new(&opts.filters.minhash, dir).map_err(|e| DataError::io("create the dedup index in", dir, e))?)
        } else {
            None
        },
        seed: opts.seed,
        val_threshold,
        eot: tokenizer.eot_id(),
        mixing,
        held_train: None,
        held_val: None,
        wrote_train: false,
        wrote_val: false,
    };
    let minhasher = opts.filters.near_dedup.then(|| MinHasher::new(&opts.filters.minhash, opts.seed));
    let work = Work {
        files: &files,
        sources: opts.sources.len(),
        text_field: &opts.text_field,
        filters: &opts.filters,
        tokenizer: Some(&tokenizer),
        keep_text: false,
        minhasher: minhasher.as_ref(),
        threads: threads(opts),
        max_bad_records: opts.max_bad_records,
        progress: opts.progress.then_some("preparing"),
    };
    let counts = pipeline::run(&work, &mut |source, outcome| sink.take(source, outcome))?;
    sink.release_held(opts.val_fraction)?;
    let near_memory = sink.near.as_ref().map_or(0, |n| n.memory_bytes());
    drop(sink.near.take());

    let mut reports = Vec::new();
    let mut val = Vec::new();
    let mut mix_inputs = Vec::new();
    let mut train_writer = ShardWriter::new(dir, "train", dtype, opts.shard_tokens).counting(vocab);
    for (s, (source, read)) in sink.sources.into_iter().zip(&counts).enumerate() {
        let mut report = source.report;
        (report.files, report.bytes_read, report.records, report.bad_records) =
            (read.files, read.bytes_read, read.records, read.bad_records);
        val.push(ValSplit { source: report.name.clone(), shards: source.val.finish()?, mask: Vec::new() });
        if mixing {
            let shards = source.train.finish()?;
            let paths: Vec<PathBuf> = shards.iter().map(|sh| dir.join(&sh.file)).collect();
            mix_inputs.push(MixInput {
                name: report.name.clone(),
                weight: opts.sources[s].weight,
                tokens: TokenFile::open_shards(&paths, dtype)?,
                doc_ends: source.doc_ends,
            });
        } else {
            train_writer = source.train;
        }
        reports.push(report);
    }
    let documents: u64 = reports.iter().map(|r| r.documents_kept).sum();
    let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
    for r in &reports {
        for (reason, n) in &r.dropped {
            *dropped.entry(reason.clone()).or_default() += n;
        }
    }
    if reports.iter().map(|r| r.train_documents).sum::<u64>() == 0 {
        return Err(no_documents(files.len(), &dropped));
    }
    if mixing {
        let contributed = mix(&mix_inputs, &mut train_writer, opts.seed)?;
        for ((report, input), tokens) in reports.iter_mut().zip(&mix_inputs).zip(contributed) {
            report.mixed_tokens = tokens;
            report.epochs = tokens as f64 / input.doc_ends.last().copied().unwrap_or(1).max(1) as f64;
        }
        drop(mix_inputs);
        for entry in fs::read_dir(dir).map_err(|e| DataError::io("list", dir, e))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with("mix-") {
                fs::remove_file(entry.path()).map_err(|e| DataError::io("remove", entry.path(), e))?;
            }
        }
    } else {
        for r in &mut reports {
            r.mixed_tokens = r.train_tokens;
            r.epochs = 1.0;
        }
    }
    let weights: f64 = opts.sources.iter().map(|s| s.weight).sum();
    for r in &mut reports {
        r.weight /= weights;
    }
    let unigram_entropy_nats = train_writer.unigram_entropy_nats();
    let train = train_writer.finish()?;
    let meta = Meta {
        format_version: FORMAT_VERSION,
        vocab_size: vocab,
        eot_id: tokenizer.eot_id(),
        dtype,
        train_tokens: train.iter().map(|s| s.tokens).sum(),
        val_tokens: val.iter().flat_map(|v| v.shards.iter()).map(|s| s.tokens).sum(),
        train,
        val,
        documents,
        train_documents: reports.iter().map(|r| r.train_documents).sum(),
        val_documents: reports.iter().map(|r| r.val_documents).sum(),
        train_bytes: reports.iter().map(|r| r.train_bytes).sum(),
        val_bytes: reports.iter().map(|r| r.val_bytes).sum(),
        unigram_entropy_nats,
        sources: reports,
        dropped,
        files_read: files.len() as u64,
        val_fraction: opts.val_fraction,
        seed: opts.seed,
        tokenizer: tokenizer_origin,
        filters: opts.filters.clone(),
        train_mask: Vec::new(),
        sample_tokens: None,
    };
    let meta_json = serde_json::to_string_pretty(&meta)
        .map_err(|e| DataError::BadPrepared { path: opts.out.clone(), reason: format!("could not serialise meta.json: {e}") })?;
    for (file, bytes) in [(TOKENIZER_JSON, tokenizer_json.as_bytes()), (META_JSON, meta_json.as_bytes())] {
        let path = dir.join(file);
        let mut f = File::create(&path).map_err(|e| DataError::io("create", &path, e))?;
        f.write_all(bytes).map_err(|e| DataError::io("write", &path, e))?;
        f.sync_all().map_err(|e| DataError::io("flush to disk", &path, e))?;
    }
    if opts.progress {
        print_report(&meta, started.elapsed().as_secs_f64(), near_memory);
    }
    tracing::info!(
        out = %opts.out.display(),
        train_tokens = meta.train_tokens,
        val_tokens = meta.val_tokens,
        elapsed = ?started.elapsed(),
        "corpus prepared"
    );
    Ok(meta)
}

fn no_documents(files: usize, dropped: &BTreeMap<String, u64>) -> DataError {
    let dropped: Vec<String> = dropped.iter().filter(|(_, &n)| n > 0).map(|(reason, n)| format!("{n} {reason}")).collect();
    DataError::NoDocuments { files, dropped: dropped.join(", ") }
}

/// The split a document goes to: its content hashed with the seed, against the validation
/// share. It depends on the seed and the content only, not on file names or order.
fn split_key(seed: u64, hash: &[u8; 32]) -> u64 {
    let mut key = Sha256::new();
    key.update(seed.to_le_bytes());
    key.update(hash);
    u64::from_le_bytes(key.finalize()[..8].try_into().expect("8 bytes"))
}

/// A seeded sample of the cleaned train documents, at most `tokenizer_sample_mb`: the ones
/// with the smallest sampling keys (a bottom-k sketch), so the sample is uniform over the
/// whole corpus and the same for the same seed. Also returns the documents the filters
/// dropped, by reason (what to say when nothing is left).
fn tokenizer_sample(opts: &PrepareOptions, files: &[InputFile], val_threshold: u64) -> DataResult<(Vec<String>, BTreeMap<String, u64>)> {
    let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
    let budget = opts.tokenizer_sample_mb.saturating_mul(1 << 20);
    let mut heap: BinaryHeap<(u64, String)> = BinaryHeap::new();
    let mut bytes = 0u64;
    let work = Work {
        files,
        sources: opts.sources.len(),
        text_field: &opts.text_field,
        filters: &opts.filters,
        tokenizer: None,
        keep_text: true,
        minhasher: None,
        threads: threads(opts),
        max_bad_records: opts.max_bad_records,
        progress: opts.progress.then_some("sampling for the tokenizer"),
    };
    pipeline::run(&work, &mut |_, outcome| {
        let doc = match outcome {
            Outcome::Kept(doc) => doc,
            Outcome::Dropped(reason) => {
                *dropped.entry(reason.label().to_string()).or_default() += 1;
                return Ok(());
            }
        };
        if opts.val_fraction > 0.0 && split_key(opts.seed, &doc.hash) < val_threshold {
            return Ok(());
        }
        let key = split_key(opts.seed.wrapping_add(1), &doc.hash);
        if bytes >= budget && heap.peek().is_some_and(|(top, _)| key >= *top) {
            return Ok(());
        }
        bytes += doc.bytes;
        heap.push((key, doc.text.unwrap_or_default()));
        while bytes > budget && heap.len() > 1 {
            if let Some((_, text)) = heap.pop() {
                bytes -= text.len() as u64;
            }
        }
        Ok(())
    })?;
    // In key order: the sample does not depend on the input order either.
    Ok((heap.into_sorted_vec().into_iter().map(|(_, text)| text).collect(), dropped))
}

struct SourceSink {
    report: SourceReport,
    train: ShardWriter,
    val: ShardWriter,
    /// Where each train document ends in `train` (for mixing).
    doc_ends: Vec<u64>,
}

/// A document kept back until the end, in case a split would otherwise be empty.
struct Held {
    key: u64,
    source: usize,
    ids: Vec<u32>,
    bytes: u64,
}

/// Where the pipeline's documents go, in input order: dedup decisions, the split, the shards.
struct Sink {
    sources: Vec<SourceSink>,
    exact: Option<HashSet<u128>>,
    near: Option<NearDedupIndex>,
    seed: u64,
    val_threshold: u64,
    eot: u32,
    mixing: bool,
    /// The train document with the smallest split key (the first to move to validation if
    /// none went there) and the validation one with the largest (the other way round).
    held_train: Option<Held>,
    held_val: Option<Held>,
    wrote_train: bool,
    wrote_val: bool,
}

impl Sink {
    fn drop_doc(&mut self, source: usize, reason: DropReason) {
        *self.sources[source].report.dropped.entry(reason.label().to_string()).or_default() += 1;
    }

    fn take(&mut self, source: usize, outcome: Outcome) -> DataResult<()> {
        let doc = match outcome {
            Outcome::Dropped(reason) => {
                self.drop_doc(source, reason);
                return Ok(());
            }
            Outcome::Kept(doc) => doc,
        };
        if let Some(seen) = self.exact.as_mut() {
            if !seen.insert(u128::from_le_bytes(doc.hash[..16].try_into().expect("16 bytes"))) {
                self.drop_doc(source, DropReason::ExactDuplicate);
                return Ok(());
            }
        }
        if let (Some(index), Some(signature)) = (self.near.as_mut(), doc.signature.as_ref()) {
            let duplicate =
                index.is_duplicate_or_insert(signature).map_err(|e| DataError::io("use the dedup index in", PathBuf::from("."), e))?;
            if duplicate {
                self.drop_doc(source, DropReason::NearDuplicate);
                return Ok(());
            }
        }
        self.sources[source].report.documents_kept += 1;
        let key = split_key(self.seed, &doc.hash);
        let held = Held { key, source, ids: doc.ids, bytes: doc.bytes };
        if key < self.val_threshold {
            // Keep back the validation document with the largest key.
            let write = match self.held_val.take() {
                Some(h) if h.key >= held.key => {
                    self.held_val = Some(h);
                    held
                }
                previous => {
                    self.held_val = Some(held);
                    match previous {
                        Some(h) => h,
                        None => return Ok(()),
                    }
                }
            };
            self.write(write, true)
        } else {
            let write = match self.held_train.take() {
                Some(h) if h.key <= held.key => {
                    self.held_train = Some(h);
                    held
                }
                previous => {
                    self.held_train = Some(held);
                    match previous {
                        Some(h) => h,
                        None => return Ok(()),
                    }
                }
            };
            self.write(write, false)
        }
    }

    fn write(&mut self, doc: Held, val: bool) -> DataResult<()> {
        let s = &mut self.sources[doc.source];
        let (writer, report) = (if val { &mut s.val } else { &mut s.train }, &mut s.report);
        writer.write(&doc.ids)?;
        writer.write(&[self.eot])?;
        let tokens = doc.ids.len() as u64 + 1;
        if val {
            self.wrote_val = true;
            report.val_documents += 1;
            report.val_tokens += tokens;
            report.val_bytes += doc.bytes;
        } else {
            self.wrote_train = true;
            report.train_documents += 1;
            report.train_tokens += tokens;
            report.train_bytes += doc.bytes;
            if self.mixing {
                s.doc_ends.push(s.train.tokens());
            }
        }
        Ok(())
    }

    /// The documents kept back go where they were meant to, unless a split would be empty:
    /// validation gets at least one document when asked for, train always at least one.
    fn release_held(&mut self, val_fraction: f64) -> DataResult<()> {
        let (held_train, held_val) = (self.held_train.take(), self.held_val.take());
        let (train_then, val_then) = (self.wrote_train || held_train.is_some(), self.wrote_val || held_val.is_some());
        match (held_train, held_val) {
            (Some(t), Some(v)) => {
                self.write(t, false)?;
                self.write(v, true)
            }
            // Nothing went to validation: the train document with the smallest key does, if
            // another train document remains.
            (Some(t), None) if val_fraction > 0.0 && !val_then && self.wrote_train => self.write(t, true),
            (Some(t), None) => self.write(t, false),
            // Nothing went to train: the validation document with the largest key does.
            (None, Some(v)) if !train_then => self.write(v, false),
            (None, Some(v)) => self.write(v, true),
            (None, None) => Ok(()),
        }
    }
}

/// The table at the end of `troupe prepare`: documents and tokens kept and dropped, per
/// source and per reason.
fn print_report(meta: &Meta, seconds: f64, near_memory: usize) {
    let mb: f64 = meta.sources.iter().map(|s| s.bytes_read).sum::<u64>() as f64 / 1e6;
    crate::say!(
        "prepared {mb:.1} MB in {seconds:.1} s ({:.1} MB/s): {} documents kept, {} train / {} val tokens ({:?}), vocabulary {}",
        mb / seconds.max(1e-9),
        meta.documents,
        meta.train_tokens,
        meta.val_tokens,
        meta.dtype,
        meta.vocab_size
    );
    crate::say!(
        "{:<16} {:>9} {:>9} {:>9} {:>9} {:>13} {:>12} {:>8} {:>7}",
        "source",
        "records",
        "bad",
        "kept",
        "dropped",
        "train tokens",
        "val tokens",
        "share",
        "epochs"
    );
    for s in &meta.sources {
        crate::say!(
            "{:<16} {:>9} {:>9} {:>9} {:>9} {:>13} {:>12} {:>7.1}% {:>7.2}",
            s.name,
            s.records,
            s.bad_records,
            s.documents_kept,
            s.dropped.values().sum::<u64>(),
            s.mixed_tokens,
            s.val_tokens,
            100.0 * s.mixed_tokens as f64 / meta.train_tokens.max(1) as f64,
            s.epochs
        );
    }
    if !meta.dropped.is_empty() {
        let reasons: Vec<String> = meta.dropped.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
        crate::say!("dropped by reason: {}", reasons.join(", "));
    }
    if near_memory > 0 {
        crate::say!("near-duplicate index: {:.1} MB", near_memory as f64 / 1e6);
    }
}

#[cfg(test)]
mod tests;
