//! A prepared folder's description, `meta.json`, and opening its token streams.
//!
//! ```text
//! out/
//!   tokenizer.json            the tokenizer every id was made with
//!   train-00000.bin …         the train stream, in shards (u16, or u32 above 65,536 ids)
//!   val-<source>-00000.bin …  each source's held-out documents
//!   meta.json                 Meta: shards with sizes and sha256, counts, the report
//! ```
//! Format 1 folders (one `train.bin` and one `val.bin` of u16 ids) still load: they read as a
//! one-shard stream each.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{DataError, DataResult};
use super::shards::ShardInfo;
use super::tokens::{TokenDtype, TokenFile};

pub const TOKENIZER_JSON: &str = "tokenizer.json";
pub const META_JSON: &str = "meta.json";
/// The token files of a format-1 folder.
pub const TRAIN_BIN: &str = "train.bin";
pub const VAL_BIN: &str = "val.bin";

/// Bumped whenever the layout or meaning of a prepared folder changes (2: shards, u32 ids,
/// sources and per-source validation).
pub const FORMAT_VERSION: u32 = 2;

/// One source's held-out documents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValSplit {
    pub source: String,
    pub shards: Vec<ShardInfo>,
    /// Its loss mask (chat and instruction data), shard for shard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mask: Vec<ShardInfo>,
}

/// What happened to one source's documents.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceReport {
    pub name: String,
    pub inputs: Vec<String>,
    /// Its share of the train stream's tokens, as asked (the weights are normalised).
    pub weight: f64,
    pub files: u64,
    /// Bytes read from its files (compressed bytes for compressed files).
    pub bytes_read: u64,
    /// Lines, rows or files read.
    pub records: u64,
    /// Records that were not documents (not JSON, no text field, null).
    pub bad_records: u64,
    pub documents_kept: u64,
    /// Documents dropped, by reason (`empty`, `exact_duplicate`, `gopher_…`, …).
    pub dropped: BTreeMap<String, u64>,
    pub train_documents: u64,
    pub val_documents: u64,
    /// Tokens of its kept train documents, once each.
    pub train_tokens: u64,
    pub val_tokens: u64,
    /// Bytes of cleaned text kept in each split.
    pub train_bytes: u64,
    pub val_bytes: u64,
    /// Tokens it contributes to the train stream after mixing (repeats counted).
    pub mixed_tokens: u64,
    /// How many times its train documents were used: above 1 when up-sampled, below when
    /// down-sampled.
    pub epochs: f64,
}

/// What `prepare` made, stored as `meta.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format_version: u32,
    /// The tokenizer's vocabulary size (it can come out below the requested one on a small
    /// corpus).
    pub vocab_size: usize,
    pub eot_id: u32,
    pub dtype: TokenDtype,
    pub train: Vec<ShardInfo>,
    pub val: Vec<ValSplit>,
    /// Documents kept, in both splits.
    pub documents: u64,
    pub train_documents: u64,
    pub val_documents: u64,
    /// Tokens of the train stream (after mixing) and of every validation split together.
    pub train_tokens: u64,
    pub val_tokens: u64,
    /// UTF-8 bytes of cleaned text in each split (for bytes-per-token and bits-per-byte).
    pub train_bytes: u64,
    pub val_bytes: u64,
    /// Entropy of the train stream's token frequencies, in nats: the loss of the best model
    /// that ignores context, so a trained model's loss must end up well below it.
    pub unigram_entropy_nats: f64,
    pub sources: Vec<SourceReport>,
    /// Documents dropped over all sources, by reason.
    pub dropped: BTreeMap<String, u64>,
    pub files_read: u64,
    pub val_fraction: f64,
    pub seed: u64,
    /// Where the tokenizer came from: trained on a sample, or a given file.
    pub tokenizer: String,
    /// The `[data.filters]` the documents went through.
    pub filters: troupe_core::config::FilterConfig,
    /// Chat and instruction data: the train stream's loss mask (1 where a token is trained on),
    /// shard for shard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub train_mask: Vec<ShardInfo>,
    /// Chat and instruction data: every conversation is padded to this many tokens, so one
    /// sample is one conversation; model.block_size must equal it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_tokens: Option<usize>,
}

/// `meta.json` of a format-1 folder, as it was written.
#[derive(Deserialize)]
struct MetaV1 {
    vocab_size: usize,
    eot_id: u32,
    documents: usize,
    duplicates_dropped: usize,
    empty_dropped: usize,
    train_documents: usize,
    val_documents: usize,
    train_tokens: u64,
    val_tokens: u64,
    train_bytes: u64,
    val_bytes: u64,
    train_sha256: String,
    val_sha256: String,
    unigram_entropy_nats: f64,
    sources: Vec<String>,
    files_read: usize,
    val_fraction: f64,
    seed: u64,
}

impl MetaV1 {
    fn into_meta(self) -> Meta {
        let dropped: BTreeMap<String, u64> =
            [("empty".to_string(), self.empty_dropped as u64), ("exact_duplicate".to_string(), self.duplicates_dropped as u64)].into();
        Meta {
            format_version: 1,
            vocab_size: self.vocab_size,
            eot_id: self.eot_id,
            dtype: TokenDtype::U16,
            train: vec![ShardInfo { file: TRAIN_BIN.into(), tokens: self.train_tokens, sha256: self.train_sha256 }],
            val: vec![ValSplit {
                source: "corpus".into(),
                shards: vec![ShardInfo { file: VAL_BIN.into(), tokens: self.val_tokens, sha256: self.val_sha256 }],
                mask: Vec::new(),
            }],
            documents: self.documents as u64,
            train_documents: self.train_documents as u64,
            val_documents: self.val_documents as u64,
            train_tokens: self.train_tokens,
            val_tokens: self.val_tokens,
            train_bytes: self.train_bytes,
            val_bytes: self.val_bytes,
            unigram_entropy_nats: self.unigram_entropy_nats,
            sources: vec![SourceReport {
                name: "corpus".into(),
                inputs: self.sources,
                weight: 1.0,
                files: self.files_read as u64,
                documents_kept: self.documents as u64,
                dropped: dropped.clone(),
                train_documents: self.train_documents as u64,
                val_documents: self.val_documents as u64,
                train_tokens: self.train_tokens,
                val_tokens: self.val_tokens,
                mixed_tokens: self.train_tokens,
                epochs: 1.0,
                ..SourceReport::default()
            }],
            dropped,
            files_read: self.files_read as u64,
            val_fraction: self.val_fraction,
            seed: self.seed,
            tokenizer: "trained on the train documents (format 1)".into(),
            filters: troupe_core::config::FilterConfig::default(),
            train_mask: Vec::new(),
            sample_tokens: None,
        }
    }
}

impl Meta {
    /// Every shard of the folder, train first.
    fn shards(&self) -> impl Iterator<Item = &ShardInfo> {
        self.train.iter().chain(&self.train_mask).chain(self.val.iter().flat_map(|v| v.shards.iter().chain(&v.mask)))
    }
}

/// Reads `meta.json` of a prepared folder and checks that the files it describes are there
/// with the sizes it records. Cheap: the contents are not hashed (see [`verify_prepared`]).
pub fn load_meta(dir: &Path) -> DataResult<Meta> {
    let bad = |reason: String| DataError::BadPrepared { path: dir.to_owned(), reason };
    let meta_path = dir.join(META_JSON);
    let text = fs::read_to_string(&meta_path).map_err(|e| DataError::io("read", &meta_path, e))?;
    let version = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| bad(format!("{META_JSON} is malformed: {e}")))?
        .get("format_version")
        .and_then(|v| v.as_u64());
    let meta = match version {
        Some(1) => serde_json::from_str::<MetaV1>(&text).map_err(|e| bad(format!("{META_JSON} (format 1) is malformed: {e}")))?.into_meta(),
        Some(v) if v == u64::from(FORMAT_VERSION) => {
            serde_json::from_str::<Meta>(&text).map_err(|e| bad(format!("{META_JSON} is malformed: {e}")))?
        }
        other => {
            return Err(bad(format!(
                "it has format version {}, this build reads versions 1 and {FORMAT_VERSION}; prepare it again with this \
                 build's `troupe prepare`",
                other.map_or("none".to_string(), |v| v.to_string())
            )))
        }
    };
    if !dir.join(TOKENIZER_JSON).is_file() {
        return Err(bad(format!("{TOKENIZER_JSON} is missing")));
    }
    for shard in meta.shards() {
        if shard.file.contains('/') || shard.file.starts_with('.') {
            return Err(bad(format!("{META_JSON} names a file outside the folder: {:?}", shard.file)));
        }
        let path = dir.join(&shard.file);
        let len = fs::metadata(&path).map_err(|e| DataError::io("read", &path, e))?.len();
        if Some(len) != shard.tokens.checked_mul(meta.dtype.bytes() as u64) {
            return Err(bad(format!("{} holds {len} bytes but {META_JSON} says {} tokens", shard.file, shard.tokens)));
        }
    }
    Ok(meta)
}

/// [`load_meta`] plus a check of every shard's sha256 against the recorded one (read in
/// pieces: shards can be large).
pub fn verify_prepared(dir: &Path) -> DataResult<Meta> {
    use std::io::Read;
    let meta = load_meta(dir)?;
    for shard in meta.shards() {
        let path = dir.join(&shard.file);
        let mut file = fs::File::open(&path).map_err(|e| DataError::io("read", &path, e))?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(|e| DataError::io("read", &path, e))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
        let actual = hex::encode(hash.finalize());
        if actual != shard.sha256 {
            return Err(DataError::BadPrepared {
                path: dir.to_owned(),
                reason: format!("{} has sha256 {actual}, but {META_JSON} records {}", shard.file, shard.sha256),
            });
        }
    }
    Ok(meta)
}

/// Whether `dir` is a complete prepared folder (by [`load_meta`]'s checks).
pub fn is_prepared(dir: &Path) -> bool {
    load_meta(dir).is_ok()
}

/// The train stream of a prepared folder (every shard, in order).
pub fn open_train(dir: &Path, meta: &Meta) -> DataResult<TokenFile> {
    open_stream(dir, meta, &meta.train, &meta.train_mask)
}

/// Shards as one stream, with their loss mask when there is one.
fn open_stream(dir: &Path, meta: &Meta, shards: &[ShardInfo], mask: &[ShardInfo]) -> DataResult<TokenFile> {
    let paths = |s: &[ShardInfo]| s.iter().map(|s| dir.join(&s.file)).collect::<Vec<PathBuf>>();
    let stream = TokenFile::open_shards(&paths(shards), meta.dtype)?;
    if mask.is_empty() {
        return Ok(stream);
    }
    stream.with_mask(TokenFile::open_shards(&paths(mask), meta.dtype)?)
}

/// Each source's validation documents as a stream of its own, with the source's name.
pub fn open_val_sources(dir: &Path, meta: &Meta) -> DataResult<Vec<(String, TokenFile)>> {
    meta.val.iter().map(|v| Ok((v.source.clone(), open_stream(dir, meta, &v.shards, &v.mask)?))).collect()
}

/// Every source's validation documents as one stream (sources in order).
pub fn open_val(dir: &Path, meta: &Meta) -> DataResult<TokenFile> {
    let shards: Vec<ShardInfo> = meta.val.iter().flat_map(|v| v.shards.iter().cloned()).collect();
    let mask: Vec<ShardInfo> = meta.val.iter().flat_map(|v| v.mask.iter().cloned()).collect();
    open_stream(dir, meta, &shards, &mask)
}
