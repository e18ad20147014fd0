//! Corpus preparation: raw text files in, a folder of token files, tokenizer and metadata out.
//!
//! ```text
//! out/
//!   tokenizer.json   byte-level BPE trained on the train documents only
//!   train.bin        u16 little-endian ids, <|endoftext|> after every document
//!   val.bin          the same for the held-out documents
//!   meta.json        Meta: counts, hashes, entropy baseline, provenance
//! ```
//! The folder is built under a temporary name and renamed into place at the end, so a folder
//! called `out` is always complete.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::corpus::{clean_text, collect_files, read_utf8};
use super::error::{DataError, DataResult};
use super::tokenizer::{train_bpe, Tokenizer, MAX_VOCAB_SIZE, MIN_VOCAB_SIZE};

pub const TRAIN_BIN: &str = "train.bin";
pub const VAL_BIN: &str = "val.bin";
pub const TOKENIZER_JSON: &str = "tokenizer.json";
pub const META_JSON: &str = "meta.json";

/// Bumped whenever the layout or meaning of a prepared folder changes.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq)]
pub struct PrepareOptions {
    /// Files or folders; folders are walked recursively in sorted order.
    pub inputs: Vec<PathBuf>,
    /// A required file-name suffix for files found in folders, e.g. `"_gut.txt"`.
    pub file_filter: Option<String>,
    pub out: PathBuf,
    pub vocab_size: usize,
    /// Share of documents held out for validation, in `[0, 1)`.
    pub val_fraction: f64,
    pub seed: u64,
}

/// What `prepare` made, stored as `meta.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format_version: u32,
    /// The tokenizer's actual vocabulary size (it can come out below the requested one on a
    /// small corpus).
    pub vocab_size: usize,
    pub eot_id: u32,
    /// Documents kept (after dropping empty ones and duplicates).
    pub documents: usize,
    pub duplicates_dropped: usize,
    pub empty_dropped: usize,
    pub train_documents: usize,
    pub val_documents: usize,
    pub train_tokens: u64,
    pub val_tokens: u64,
    /// UTF-8 bytes of cleaned text in each split (for bytes-per-token and bits-per-byte).
    pub train_bytes: u64,
    pub val_bytes: u64,
    pub train_sha256: String,
    pub val_sha256: String,
    /// Entropy of the train stream's token frequencies, in nats: the loss of the best model
    /// that ignores context, so a trained model's loss must end up well below it.
    pub unigram_entropy_nats: f64,
    pub sources: Vec<String>,
    pub files_read: usize,
    pub file_filter: Option<String>,
    pub val_fraction: f64,
    pub seed: u64,
}

struct Document {
    text: String,
    hash: [u8; 32],
}

/// Prepares a corpus; see the module documentation for what it writes.
pub fn prepare(opts: &PrepareOptions) -> DataResult<Meta> {
    validate(opts)?;
    if opts.out.exists() {
        return Err(DataError::OutputExists { path: opts.out.clone() });
    }
    let started = Instant::now();

    let files = collect_files(&opts.inputs, opts.file_filter.as_deref())?;
    let (docs, empty_dropped, duplicates_dropped) = read_documents(&files)?;
    if docs.is_empty() {
        return Err(DataError::NoDocuments { files: files.len() });
    }
    let is_val = split_documents(&docs.iter().map(|d| d.hash).collect::<Vec<_>>(), opts.val_fraction, opts.seed);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (doc, &held_out) in docs.iter().zip(&is_val) {
        if held_out {
            val.push(doc)
        } else {
            train.push(doc)
        }
    }
    tracing::info!(
        files = files.len(),
        documents = docs.len(),
        train = train.len(),
        val = val.len(),
        duplicates_dropped,
        empty_dropped,
        "corpus read"
    );

    let train_texts: Vec<String> = train.iter().map(|d| d.text.clone()).collect();
    let tokenizer_json = train_bpe(&train_texts, opts.vocab_size)?;
    let tokenizer = Tokenizer::from_json(&tokenizer_json)?;
    tracing::info!(vocab_size = tokenizer.vocab_size(), elapsed = ?started.elapsed(), "tokenizer trained");

    let train_ids = encode_documents(&tokenizer, &train_texts)?;
    let val_texts: Vec<String> = val.iter().map(|d| d.text.clone()).collect();
    let val_ids = encode_documents(&tokenizer, &val_texts)?;
    let train_bin = to_le_bytes(&train_ids);
    let val_bin = to_le_bytes(&val_ids);

    let meta = Meta {
        format_version: FORMAT_VERSION,
        vocab_size: tokenizer.vocab_size(),
        eot_id: tokenizer.eot_id(),
        documents: docs.len(),
        duplicates_dropped,
        empty_dropped,
        train_documents: train.len(),
        val_documents: val.len(),
        train_tokens: train_ids.len() as u64,
        val_tokens: val_ids.len() as u64,
        train_bytes: train.iter().map(|d| d.text.len() as u64).sum(),
        val_bytes: val.iter().map(|d| d.text.len() as u64).sum(),
        train_sha256: hex::encode(Sha256::digest(&train_bin)),
        val_sha256: hex::encode(Sha256::digest(&val_bin)),
        unigram_entropy_nats: unigram_entropy_nats(&train_ids, tokenizer.vocab_size()),
        sources: opts.inputs.iter().map(|p| p.display().to_string()).collect(),
        files_read: files.len(),
        file_filter: opts.file_filter.clone(),
        val_fraction: opts.val_fraction,
        seed: opts.seed,
    };
    let meta_json = serde_json::to_string_pretty(&meta)
        .map_err(|e| DataError::BadPrepared { path: opts.out.clone(), reason: format!("could not serialise meta.json: {e}") })?;

    write_atomically(
        &opts.out,
        &[(TOKENIZER_JSON, tokenizer_json.as_bytes()), (TRAIN_BIN, &train_bin), (VAL_BIN, &val_bin), (META_JSON, meta_json.as_bytes())],
    )?;
    tracing::info!(
        out = %opts.out.display(),
        train_tokens = meta.train_tokens,
        val_tokens = meta.val_tokens,
        elapsed = ?started.elapsed(),
        "corpus prepared"
    );
    Ok(meta)
}

fn validate(opts: &PrepareOptions) -> DataResult<()> {
    if opts.inputs.is_empty() {
        return Err(DataError::InvalidOption { field: "inputs", reason: "no input files or folders given".into() });
    }
    if !(opts.val_fraction.is_finite() && (0.0..1.0).contains(&opts.val_fraction)) {
        return Err(DataError::InvalidOption {
            field: "val_fraction",
            reason: format!("{} is not in [0, 1); 0.1 holds out a tenth of the documents", opts.val_fraction),
        });
    }
    if !(MIN_VOCAB_SIZE..=MAX_VOCAB_SIZE).contains(&opts.vocab_size) {
        return Err(DataError::InvalidOption {
            field: "vocab_size",
            reason: format!(
                "{} is outside {MIN_VOCAB_SIZE}..={MAX_VOCAB_SIZE} (256 byte tokens plus the \
                 separator at least; ids are stored as u16)",
                opts.vocab_size
            ),
        });
    }
    if opts.out.file_name().is_none() {
        return Err(DataError::InvalidOption { field: "out", reason: format!("{} does not name a folder to create", opts.out.display()) });
    }
    Ok(())
}

/// Reads and cleans every file, returning the kept documents with the numbers of empty and
/// duplicate ones dropped. The first copy of a duplicate is kept, so the result follows the
/// input order.
fn read_documents(files: &[PathBuf]) -> DataResult<(Vec<Document>, usize, usize)> {
    let mut docs = Vec::with_capacity(files.len());
    let mut seen = std::collections::HashSet::new();
    let (mut empty, mut duplicates) = (0, 0);
    for path in files {
        let text = clean_text(&read_utf8(path)?);
        if text.is_empty() {
            empty += 1;
            continue;
        }
        let hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if !seen.insert(hash) {
            duplicates += 1;
            continue;
        }
        docs.push(Document { text, hash });
    }
    Ok((docs, empty, duplicates))
}

/// Chooses the validation documents: `is_val[i]` for document `i`.
///
/// Documents are ranked by a hash of (seed, document hash) and the first ones in that order go
/// to validation. The choice depends only on the seed and the documents' content, not on file
/// names or order, and adding a document moves few others between the splits.
fn split_documents(doc_hashes: &[[u8; 32]], val_fraction: f64, seed: u64) -> Vec<bool> {
    let n = doc_hashes.len();
    let n_val = if n < 2 || val_fraction <= 0.0 { 0 } else { ((n as f64 * val_fraction).round() as usize).clamp(1, n - 1) };
    let mut ranked: Vec<([u8; 32], usize)> = doc_hashes
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let mut key = Sha256::new();
            key.update(seed.to_le_bytes());
            key.update(h);
            (key.finalize().into(), i)
        })
        .collect();
    ranked.sort();
    let mut is_val = vec![false; n];
    for &(_, i) in &ranked[..n_val] {
        is_val[i] = true;
    }
    is_val
}

/// Encodes documents into one stream with the separator after each. Documents are spread
/// over the cores; the stream keeps document order whatever the thread count.
fn encode_documents(tokenizer: &Tokenizer, texts: &[String]) -> DataResult<Vec<u16>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(texts.len().max(1));
    let chunk = texts.len().div_ceil(threads).max(1);
    let parts: Vec<DataResult<Vec<u16>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = texts.chunks(chunk).map(|part| scope.spawn(move || encode_part(tokenizer, part))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(DataError::Tokenizer { context: "encoding documents".into(), message: "an encoder thread panicked".into() })
                })
            })
            .collect()
    });
    let mut stream = Vec::new();
    for part in parts {
        stream.extend(part?);
    }
    Ok(stream)
}

fn encode_part(tokenizer: &Tokenizer, texts: &[String]) -> DataResult<Vec<u16>> {
    let eot = narrow(tokenizer.eot_id())?;
    let mut stream = Vec::new();
    for text in texts {
        for id in tokenizer.encode(text)? {
            stream.push(narrow(id)?);
        }
        stream.push(eot);
    }
    Ok(stream)
}

fn narrow(id: u32) -> DataResult<u16> {
    u16::try_from(id).map_err(|_| DataError::Tokenizer {
        context: "writing token files".into(),
        message: format!("token id {id} does not fit the u16 token format"),
    })
}

fn to_le_bytes(ids: &[u16]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.to_le_bytes()).collect()
}

/// Shannon entropy (nats) of the empirical token distribution.
pub fn unigram_entropy_nats(ids: &[u16], vocab_size: usize) -> f64 {
    if ids.is_empty() {
        return 0.0;
    }
    let mut counts = vec![0u64; vocab_size.max(1 << 16)];
    for &id in ids {
        counts[id as usize] += 1;
    }
    let total = ids.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total;
            -p * p.ln()
        })
        .sum()
}

/// Writes the files into `<out>.tmp-<pid>`, flushes them to disk, and renames the folder to
/// `out`. On failure the temporary folder is removed.
fn write_atomically(out: &Path, files: &[(&str, &[u8])]) -> DataResult<()> {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = out.with_file_name(format!("{name}.tmp-{}", std::process::id()));
    let result = (|| {
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| DataError::io("remove the stale folder", &tmp, e))?;
        }
        fs::create_dir_all(&tmp).map_err(|e| DataError::io("create the folder", &tmp, e))?;
        for (file_name, bytes) in files {
            let path = tmp.join(file_name);
            let mut file = File::create(&path).map_err(|e| DataError::io("create", &path, e))?;
            file.write_all(bytes).map_err(|e| DataError::io("write", &path, e))?;
            file.sync_all().map_err(|e| DataError::io("flush to disk", &path, e))?;
        }
        fs::rename(&tmp, out).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::DirectoryNotEmpty => DataError::OutputExists { path: out.to_owned() },
            _ => DataError::io("move the prepared folder into place at", out, e),
        })?;
        // The rename itself must reach the disk too, or a crash could lose the whole folder.
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(dir) = File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Reads `meta.json` of a prepared folder and checks that the files it describes are there
/// with the sizes it records. Cheap: the contents are not hashed (see [`verify_prepared`]).
pub fn load_meta(dir: &Path) -> DataResult<Meta> {
    let bad = |reason: String| DataError::BadPrepared { path: dir.to_owned(), reason };
    let meta_path = dir.join(META_JSON);
    let text = fs::read_to_string(&meta_path).map_err(|e| DataError::io("read", &meta_path, e))?;
    let meta: Meta = serde_json::from_str(&text).map_err(|e| bad(format!("{META_JSON} is malformed: {e}")))?;
    if meta.format_version != FORMAT_VERSION {
        return Err(bad(format!("it has format version {}, this build reads version {FORMAT_VERSION}", meta.format_version)));
    }
    if !dir.join(TOKENIZER_JSON).is_file() {
        return Err(bad(format!("{TOKENIZER_JSON} is missing")));
    }
    for (file, tokens) in [(TRAIN_BIN, meta.train_tokens), (VAL_BIN, meta.val_tokens)] {
        let path = dir.join(file);
        let len = fs::metadata(&path).map_err(|e| DataError::io("read", &path, e))?.len();
        if Some(len) != tokens.checked_mul(2) {
            return Err(bad(format!("{file} holds {len} bytes but {META_JSON} says {tokens} tokens")));
        }
    }
    Ok(meta)
}

/// [`load_meta`] plus a check of the token files' sha256 against the recorded ones.
pub fn verify_prepared(dir: &Path) -> DataResult<Meta> {
    let meta = load_meta(dir)?;
    for (file, expected) in [(TRAIN_BIN, &meta.train_sha256), (VAL_BIN, &meta.val_sha256)] {
        let path = dir.join(file);
        let bytes = fs::read(&path).map_err(|e| DataError::io("read", &path, e))?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if &actual != expected {
            return Err(DataError::BadPrepared {
                path: dir.to_owned(),
                reason: format!("{file} has sha256 {actual}, but {META_JSON} records {expected}"),
            });
        }
    }
    Ok(meta)
}

/// Whether `dir` is a complete prepared folder (by [`load_meta`]'s checks).
pub fn is_prepared(dir: &Path) -> bool {
    load_meta(dir).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::corpus::tests::scratch_dir;
    use crate::data::TokenFile;

    fn write(path: &Path, text: &str) {
        if let Some(parent) = path.parent() {
            let _ = fs::create_dir_all(parent);
        }
        let _ = fs::write(path, text);
    }

    fn options(inputs: Vec<PathBuf>, out: PathBuf) -> PrepareOptions {
        PrepareOptions { inputs, file_filter: Some(".txt".into()), out, vocab_size: 300, val_fraction: 0.25, seed: 7 }
    }

    const PLAYS: [&str; 5] = [
        "To be, or not to be, that is the question:\r\nWhether 'tis nobler in the mind to suffer",
        "Now is the winter of our discontent\n\n\n\nMade glorious summer by this sun of York;",
        "Friends, Romans, countrymen,   lend me your ears;\nI come to bury Caesar, not to praise him.",
        "All the world's a stage,\nAnd all the men and women merely players;",
        "If music be the food of love, play on;\nGive me excess of it, that, surfeiting,",
    ];

    #[test]
    fn end_to_end_prepare_then_reload() -> DataResult<()> {
        let dir = scratch_dir("prepare");
        let corpus = dir.join("corpus");
        for (i, play) in PLAYS.iter().enumerate() {
            write(&corpus.join(format!("play{i}.txt")), play);
        }
        write(&corpus.join("nested/dup.txt"), &format!("{}\n\n", PLAYS[0])); // equal once cleaned
        write(&corpus.join("blank.txt"), " \n\t\n");
        write(&corpus.join("notes.md"), "filtered out");
        let out = dir.join("prepared");

        let meta = prepare(&options(vec![corpus.clone()], out.clone()))?;
        assert_eq!(meta.files_read, 7);
        assert_eq!(meta.documents, 5);
        assert_eq!(meta.duplicates_dropped, 1);
        assert_eq!(meta.empty_dropped, 1);
        assert_eq!((meta.train_documents, meta.val_documents), (4, 1));
        assert!(meta.vocab_size <= 300);
        assert!(meta.unigram_entropy_nats > 0.0 && meta.unigram_entropy_nats < (meta.vocab_size as f64).ln());
        assert!(is_prepared(&out));
        assert_eq!(load_meta(&out)?, meta);
        assert_eq!(verify_prepared(&out)?, meta);
        assert!(!dir
            .read_dir()
            .map_err(|e| DataError::io("list", &dir, e))?
            .any(|e| e.map(|e| e.file_name().to_string_lossy().contains(".tmp-")).unwrap_or(false)));

        // The token files hold exactly the cleaned documents, each followed by the separator.
        let tok = Tokenizer::load(&out.join(TOKENIZER_JSON))?;
        assert_eq!(tok.eot_id(), meta.eot_id);
        for (file, docs, bytes) in [(TRAIN_BIN, meta.train_documents, meta.train_bytes), (VAL_BIN, meta.val_documents, meta.val_bytes)] {
            let tokens = TokenFile::open(&out.join(file))?;
            let ids: Vec<u32> = tokens.window(0, tokens.len())?.into_iter().map(|i| i as u32).collect();
            assert_eq!(ids.last(), Some(&meta.eot_id));
            let texts: Vec<String> =
                ids.split(|&id| id == meta.eot_id).filter(|d| !d.is_empty()).map(|d| tok.decode(d)).collect::<DataResult<_>>()?;
            assert_eq!(texts.len(), docs);
            assert_eq!(texts.iter().map(|t| t.len() as u64).sum::<u64>(), bytes);
            for text in &texts {
                assert!(PLAYS.iter().any(|p| clean_text(p) == *text), "{text:?} is not a cleaned input");
            }
        }
        let sample = "Shall I compare thee to a summer's day?";
        assert_eq!(tok.decode(&tok.encode(sample)?)?, sample);

        // A second prepare into the same folder refuses rather than mixing outputs.
        assert!(matches!(prepare(&options(vec![corpus], out.clone())), Err(DataError::OutputExists { .. })));
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn prepare_is_deterministic() -> DataResult<()> {
        let dir = scratch_dir("prepare-det");
        for (i, play) in PLAYS.iter().enumerate() {
            write(&dir.join(format!("in/{i}.txt")), play);
        }
        let a = prepare(&options(vec![dir.join("in")], dir.join("a")))?;
        let b = prepare(&options(vec![dir.join("in")], dir.join("b")))?;
        assert_eq!((a.train_sha256, a.val_sha256), (b.train_sha256, b.val_sha256));
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn missing_input_is_named_and_leaves_no_output() {
        let dir = scratch_dir("prepare-missing");
        let missing = dir.join("no-such-corpus");
        let out = dir.join("out");
        let Err(err) = prepare(&options(vec![missing.clone()], out.clone())) else {
            panic!("a missing input must fail");
        };
        let msg = err.to_string();
        assert!(msg.contains(&missing.display().to_string()) && msg.contains("does not exist"), "{msg}");
        assert!(!out.exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_options_are_refused() {
        let out = PathBuf::from("/tmp/unused");
        let base = options(vec![PathBuf::from("/tmp")], out);
        for bad in [
            PrepareOptions { val_fraction: 1.0, ..base.clone() },
            PrepareOptions { val_fraction: f64::NAN, ..base.clone() },
            PrepareOptions { vocab_size: 10, ..base.clone() },
            PrepareOptions { vocab_size: 70_000, ..base.clone() },
            PrepareOptions { inputs: vec![], ..base.clone() },
        ] {
            assert!(matches!(prepare(&bad), Err(DataError::InvalidOption { .. })), "{bad:?}");
        }
    }

    #[test]
    fn all_empty_inputs_are_an_error() {
        let dir = scratch_dir("prepare-empty");
        write(&dir.join("in/a.txt"), "\n \n");
        let result = prepare(&options(vec![dir.join("in")], dir.join("out")));
        assert!(matches!(result, Err(DataError::NoDocuments { files: 1 })), "{result:?}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn duplicates_are_dropped_keeping_the_first() -> DataResult<()> {
        let dir = scratch_dir("dups");
        let (a, b, c) = (dir.join("a.txt"), dir.join("b.txt"), dir.join("c.txt"));
        write(&a, "same  text\n");
        write(&b, "other text");
        write(&c, "same text");
        let (docs, empty, dups) = read_documents(&[a, b, c])?;
        assert_eq!((docs.len(), empty, dups), (2, 0, 1));
        assert_eq!(docs[0].text, "same text");
        assert_eq!(docs[1].text, "other text");
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }

    fn hashes(n: usize) -> Vec<[u8; 32]> {
        (0..n).map(|i| Sha256::digest(i.to_le_bytes()).into()).collect()
    }

    #[test]
    fn split_sizes() {
        let count = |n, f| split_documents(&hashes(n), f, 1).iter().filter(|&&v| v).count();
        assert_eq!(count(0, 0.1), 0);
        assert_eq!(count(1, 0.5), 0);
        assert_eq!(count(2, 0.01), 1, "at least one val document");
        assert_eq!(count(2, 0.99), 1, "at least one train document");
        assert_eq!(count(42, 0.1), 4);
        assert_eq!(count(100, 0.1), 10);
        assert_eq!(count(100, 0.0), 0, "no val when none is asked for");
    }

    #[test]
    fn split_depends_on_seed_and_content_only() {
        let h = hashes(50);
        let a = split_documents(&h, 0.2, 1);
        assert_eq!(a, split_documents(&h, 0.2, 1));
        assert_ne!(a, split_documents(&h, 0.2, 2));
        // Reordering the documents moves no document between the splits.
        let reversed: Vec<_> = h.iter().rev().copied().collect();
        let b = split_documents(&reversed, 0.2, 1);
        assert_eq!(a, b.into_iter().rev().collect::<Vec<_>>());
    }

    #[test]
    fn entropy_of_known_distributions() {
        assert_eq!(unigram_entropy_nats(&[], 300), 0.0);
        assert!(unigram_entropy_nats(&[5, 5, 5], 300).abs() < 1e-12);
        let uniform: Vec<u16> = (0..256).collect();
        assert!((unigram_entropy_nats(&uniform, 300) - (256f64).ln()).abs() < 1e-9);
    }

    #[test]
    fn load_meta_notices_truncated_files() -> DataResult<()> {
        let dir = scratch_dir("prepare-trunc");
        for (i, play) in PLAYS.iter().enumerate() {
            write(&dir.join(format!("in/{i}.txt")), play);
        }
        let out = dir.join("out");
        prepare(&options(vec![dir.join("in")], out.clone()))?;
        let train = out.join(TRAIN_BIN);
        let bytes = fs::read(&train).map_err(|e| DataError::io("read", &train, e))?;
        fs::write(&train, &bytes[..bytes.len() - 2]).map_err(|e| DataError::io("write", &train, e))?;
        assert!(!is_prepared(&out));
        assert!(matches!(load_meta(&out), Err(DataError::BadPrepared { .. })));
        assert!(!is_prepared(&dir.join("nothing-here")));
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }
}
