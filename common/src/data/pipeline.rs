//! The streaming half of `prepare`: read → clean and filter → hash, sign and encode, on every
//! core, handed back in input order.
//!
//! ```text
//! reader thread ──batches──▶ N worker threads ──results──▶ caller (in input order)
//! ```
//! The reader walks the sources' files and cuts their records into batches of about a
//! megabyte; workers clean, filter, hash (exact dedup and the split), MinHash (near dedup)
//! and encode each document; the caller gets the results batch by batch *in input order*,
//! whatever the thread count, so what it decides (which copy of a duplicate is kept, which
//! shard a document lands in) is deterministic. Both channels are bounded: memory holds a
//! few batches per thread, whatever the corpus size.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use troupe_core::config::FilterConfig;

use super::dedup::MinHasher;
use super::error::{DataError, DataResult};
use super::filters::{clean_and_filter, DropReason};
use super::sources::{read_records, InputFormat, Record};
use super::tokenizer::Tokenizer;

/// One input file and the source it belongs to.
#[derive(Debug, Clone)]
pub(crate) struct InputFile {
    pub source: usize,
    pub path: PathBuf,
    pub format: InputFormat,
}

/// What the workers do to each document.
pub(crate) struct Work<'a> {
    pub files: &'a [InputFile],
    pub sources: usize,
    pub text_field: &'a str,
    pub filters: &'a FilterConfig,
    /// Encode kept documents (not for the tokenizer's sample, which keeps the text instead).
    pub tokenizer: Option<&'a Tokenizer>,
    pub keep_text: bool,
    pub minhasher: Option<&'a MinHasher>,
    pub threads: usize,
    pub max_bad_records: u64,
    /// Print progress lines (stderr) while reading.
    pub progress: Option<&'a str>,
}

/// A document that passed the content filters (dedup is the caller's: it needs order).
pub(crate) struct Kept {
    /// sha256 of the cleaned text: exact dedup, and (with the seed) the split.
    pub hash: [u8; 32],
    pub signature: Option<Vec<u32>>,
    pub ids: Vec<u32>,
    pub text: Option<String>,
    /// UTF-8 bytes of the cleaned text.
    pub bytes: u64,
}

pub(crate) enum Outcome {
    Kept(Kept),
    Dropped(DropReason),
}

/// What reading found, per source.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReadCounts {
    pub files: u64,
    pub bytes_read: u64,
    pub records: u64,
    pub bad_records: u64,
}

struct Batch {
    seq: u64,
    source: usize,
    texts: Vec<String>,
}

struct Done {
    seq: u64,
    source: usize,
    outcomes: DataResult<Vec<Outcome>>,
}

/// Records per batch at most, and text bytes after which a batch is sent early.
const BATCH_RECORDS: usize = 512;
const BATCH_BYTES: usize = 1 << 20;
/// Examples of bad records kept for the error message.
const BAD_EXAMPLES: usize = 5;

/// Runs the pipeline over `work.files`, calling `each` with every document's outcome in input
/// order. Returns what reading found, per source.
pub(crate) fn run(work: &Work<'_>, each: &mut dyn FnMut(usize, Outcome) -> DataResult<()>) -> DataResult<Vec<ReadCounts>> {
    let threads = work.threads.max(1);
    let bytes_read = Arc::new(AtomicU64::new(0));
    let total_bytes: u64 = work.files.iter().map(|f| std::fs::metadata(&f.path).map_or(0, |m| m.len())).sum();
    let (batch_tx, batch_rx) = mpsc::sync_channel::<Batch>(threads * 2);
    let (done_tx, done_rx) = mpsc::sync_channel::<Done>(threads * 2);
    let batch_rx = Arc::new(Mutex::new(batch_rx));
    std::thread::scope(|scope| {
        let reader = {
            let bytes_read = bytes_read.clone();
            scope.spawn(move || read_all(work, &bytes_read, batch_tx))
        };
        for _ in 0..threads {
            let (batch_rx, done_tx) = (batch_rx.clone(), done_tx.clone());
            scope.spawn(move || process_batches(work, &batch_rx, &done_tx));
        }
        // Only the workers hold the channels' other ends: when the caller stops early (an
        // error), the workers' sends fail, they return, and so does the reader's send.
        drop(batch_rx);
        drop(done_tx);
        let consumed = consume_in_order(done_rx, work, &bytes_read, total_bytes, each);
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(DataError::Tokenizer { context: "reading".into(), message: "the reader panicked".into() }));
        // A failure to read explains a shortfall downstream: it is the error to report.
        let counts = read?;
        consumed?;
        Ok(counts)
    })
}

fn read_all(work: &Work<'_>, bytes_read: &Arc<AtomicU64>, tx: SyncSender<Batch>) -> DataResult<Vec<ReadCounts>> {
    let mut counts = vec![ReadCounts::default(); work.sources];
    let mut seq = 0u64;
    let mut bad_total = 0u64;
    let mut examples: Vec<String> = Vec::new();
    for file in work.files {
        let before = bytes_read.load(Ordering::Relaxed);
        let mut batch = Batch { seq, source: file.source, texts: Vec::new() };
        let mut batch_bytes = 0usize;
        let mut stopped = false;
        let result = read_records(&file.path, file.format, work.text_field, bytes_read, &mut |record| {
            let c = &mut counts[file.source];
            c.records += 1;
            match record {
                Record::Document { text, .. } => {
                    batch_bytes += text.len();
                    batch.texts.push(text);
                    if batch.texts.len() >= BATCH_RECORDS || batch_bytes >= BATCH_BYTES {
                        let full = std::mem::replace(&mut batch, Batch { seq: seq + 1, source: file.source, texts: Vec::new() });
                        seq += 1;
                        batch_bytes = 0;
                        if tx.send(full).is_err() {
                            stopped = true;
                            return Err(DataError::Tokenizer { context: "reading".into(), message: "the pipeline stopped".into() });
                        }
                    }
                }
                Record::Bad { line, reason } => {
                    c.bad_records += 1;
                    bad_total += 1;
                    if examples.len() < BAD_EXAMPLES {
                        examples.push(format!("  {}:{line}: {reason}", file.path.display()));
                    }
                    if bad_total > work.max_bad_records {
                        return Err(DataError::TooManyBadRecords {
                            count: bad_total,
                            limit: work.max_bad_records,
                            examples: examples.join("\n"),
                        });
                    }
                }
            }
            Ok(())
        });
        if stopped {
            return Ok(counts);
        }
        result?;
        counts[file.source].files += 1;
        counts[file.source].bytes_read += bytes_read.load(Ordering::Relaxed) - before;
        if !batch.texts.is_empty() {
            seq += 1;
            if tx.send(batch).is_err() {
                return Ok(counts);
            }
        }
    }
    if bad_total > 0 {
        tracing::warn!("{bad_total} records were not documents and were skipped; the first ones:\n{}", examples.join("\n"));
    }
    Ok(counts)
}

fn process_batches(work: &Work<'_>, rx: &Mutex<Receiver<Batch>>, tx: &SyncSender<Done>) {
    loop {
        let batch = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(batch) = batch else { return };
        let outcomes = batch.texts.into_iter().map(|text| process(work, &text)).collect();
        if tx.send(Done { seq: batch.seq, source: batch.source, outcomes }).is_err() {
            return;
        }
    }
}

fn process(work: &Work<'_>, raw: &str) -> DataResult<Outcome> {
    let text = match clean_and_filter(raw, work.filters) {
        Ok(text) => text,
        Err(reason) => return Ok(Outcome::Dropped(reason)),
    };
    let hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
    let signature = work.minhasher.map(|m| m.signature(&text));
    let ids = match work.tokenizer {
        Some(tokenizer) => tokenizer.encode(&text)?,
        None => Vec::new(),
    };
    let bytes = text.len() as u64;
    Ok(Outcome::Kept(Kept { hash, signature, ids, text: work.keep_text.then_some(text), bytes }))
}

fn consume_in_order(
    rx: Receiver<Done>,
    work: &Work<'_>,
    bytes_read: &AtomicU64,
    total_bytes: u64,
    each: &mut dyn FnMut(usize, Outcome) -> DataResult<()>,
) -> DataResult<()> {
    let mut waiting: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    let mut progress = work.progress.map(|what| Progress::new(what, total_bytes));
    let mut documents = 0u64;
    for done in rx {
        waiting.insert(done.seq, done);
        while let Some(done) = waiting.remove(&next) {
            next += 1;
            for outcome in done.outcomes? {
                documents += 1;
                each(done.source, outcome)?;
            }
            if let Some(p) = progress.as_mut() {
                p.update(bytes_read.load(Ordering::Relaxed), documents, false);
            }
        }
    }
    if let Some(p) = progress.as_mut() {
        p.update(bytes_read.load(Ordering::Relaxed), documents, true);
    }
    Ok(())
}

/// Progress while reading: on a terminal one line redrawn every second (bytes and documents
/// per second, ETA from the input's size), elsewhere a plain line every ten seconds.
struct Progress {
    what: String,
    total: u64,
    started: Instant,
    shown: Instant,
    terminal: bool,
}

impl Progress {
    fn new(what: &str, total: u64) -> Progress {
        use std::io::IsTerminal;
        let now = Instant::now();
        Progress { what: what.to_string(), total, started: now, shown: now, terminal: std::io::stderr().is_terminal() }
    }

    fn update(&mut self, bytes: u64, documents: u64, last: bool) {
        let every = if self.terminal { Duration::from_secs(1) } else { Duration::from_secs(10) };
        if !last && self.shown.elapsed() < every {
            return;
        }
        self.shown = Instant::now();
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = bytes as f64 / seconds;
        let eta = if rate > 0.0 { self.total.saturating_sub(bytes) as f64 / rate } else { 0.0 };
        let line = format!(
            "{}: {:.0}/{:.0} MB ({:.0} %), {:.1} MB/s, {:.0} documents/s, ETA {:.0} s",
            self.what,
            bytes as f64 / 1e6,
            self.total as f64 / 1e6,
            100.0 * bytes as f64 / self.total.max(1) as f64,
            rate / 1e6,
            documents as f64 / seconds,
            eta
        );
        if self.terminal {
            eprint!("\r\x1b[2K{line}");
            if last {
                eprintln!();
            }
        } else {
            eprintln!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::corpus::tests::scratch_dir;

    /// A caller that fails half-way stops the reader and the workers: `run` returns its error
    /// instead of waiting for ever on a full channel.
    #[test]
    fn a_caller_that_fails_stops_the_pipeline_without_hanging() {
        let dir = scratch_dir("pipeline-stop");
        let path = dir.join("many.jsonl");
        let lines: String = (0..20_000).map(|i| format!("{{\"text\": \"document number {i}\"}}\n")).collect();
        std::fs::write(&path, lines).unwrap();
        let files = [InputFile { source: 0, path, format: InputFormat::Jsonl }];
        let filters = FilterConfig::default();
        let work = Work {
            files: &files,
            sources: 1,
            text_field: "text",
            filters: &filters,
            tokenizer: None,
            keep_text: false,
            minhasher: None,
            threads: 2,
            max_bad_records: 0,
            progress: None,
        };
        let mut seen = 0;
        let result = run(&work, &mut |_, _| {
            seen += 1;
            if seen == 100 {
                return Err(DataError::InvalidOption { field: "test", reason: "stop here".into() });
            }
            Ok(())
        });
        assert!(matches!(result, Err(DataError::InvalidOption { field: "test", .. })), "{result:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
