//! Training data: from raw documents to the token windows each rank trains on.
//!
//! - [`sources`]: reading text files and folders, JSONL (plain, gzip, zstd) and Parquet.
//! - [`filters`]: cleaning (Unicode, whitespace, PII scrubbing) and the content filters.
//! - [`dedup`]: exact and near-duplicate (MinHash LSH) detection.
//! - [`pipeline`]: the streaming, multi-threaded read → filter → encode pass.
//! - [`prepare`](mod@prepare): the whole preparation, from sources to a prepared folder.
//! - [`chat`]: chat and instruction data: a chat template, and a loss mask over the answers.
//! - [`mixture`]: mixing sources by weight into one train stream.
//! - [`shards`] and [`meta`]: the prepared folder — token shards and `meta.json`.
//! - [`remote`]: prepared data in object storage, fetched into each host's cache.
//! - [`corpus`]: fetching the Shakespeare corpus (or generating text), finding input files.
//! - [`tokenizer`]: the trained tokenizer as troupe uses it.
//! - [`tokens`]: memory-mapped token streams over one or more shards.
//! - [`sampler`]: the global-cursor sampler that makes data parallel training resumable and
//!   elastic without skipping or repeating samples.

pub mod chat;
pub mod corpus;
pub mod dedup;
mod error;
pub mod filters;
pub mod meta;
mod mixture;
mod pipeline;
pub mod prepare;
pub mod remote;
pub mod sampler;
pub mod shards;
pub mod sources;
pub mod tokenizer;
pub mod tokens;

pub use corpus::{clean_text, fetch_shakespeare, generated_text};
pub use error::{DataError, DataResult};
pub use meta::{
    is_prepared, load_meta, open_train, open_val, open_val_sources, verify_prepared, Meta, SourceReport, ValSplit, FORMAT_VERSION,
    META_JSON, TOKENIZER_JSON, TRAIN_BIN, VAL_BIN,
};
pub use prepare::{prepare, PrepareOptions, Source};
pub use sampler::{eval_indices, load_batch, num_samples, rank_range, trained_targets, Sampler, SamplerMemo};
pub use tokenizer::{Tokenizer, EOT_TOKEN, MAX_VOCAB_SIZE, MIN_VOCAB_SIZE};
pub use tokens::{TokenDtype, TokenFile};
