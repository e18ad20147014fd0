//! Training data: from raw text to the token windows each rank trains on.
//!
//! - [`corpus`]: fetching the Shakespeare corpus (or generating text), finding input files,
//!   cleaning text.
//! - [`prepare`](mod@prepare): cleaning, de-duplicating and splitting documents, training the
//!   byte-level BPE tokenizer, writing `train.bin` / `val.bin` / `tokenizer.json` /
//!   `meta.json` atomically.
//! - [`tokenizer`]: the trained tokenizer as troupe uses it.
//! - [`tokens`]: memory-mapped u16 token files.
//! - [`sampler`]: the global-cursor sampler that makes data parallel training resumable and
//!   elastic without skipping or repeating samples.

pub mod corpus;
mod error;
pub mod prepare;
pub mod sampler;
pub mod tokenizer;
pub mod tokens;

pub use corpus::{clean_text, fetch_shakespeare, generated_text};
pub use error::{DataError, DataResult};
pub use prepare::{
    is_prepared, load_meta, prepare, unigram_entropy_nats, verify_prepared, Meta, PrepareOptions, FORMAT_VERSION, META_JSON,
    TOKENIZER_JSON, TRAIN_BIN, VAL_BIN,
};
pub use sampler::{eval_indices, load_batch, num_samples, rank_range, Sampler, SamplerMemo};
pub use tokenizer::{Tokenizer, EOT_TOKEN, MAX_VOCAB_SIZE, MIN_VOCAB_SIZE};
pub use tokens::TokenFile;
