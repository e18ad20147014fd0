//! The byte-level BPE tokenizer: training it, and a small wrapper for using a trained one.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder, TokenizerImpl,
};

use super::error::{DataError, DataResult};

/// The document separator, as in GPT-2: appended after every document in the token files.
pub const EOT_TOKEN: &str = "<|endoftext|>";

/// The byte alphabet plus the separator must fit; above 65,536 ids the token shards hold u32.
pub const MAX_VOCAB_SIZE: usize = 1 << 20;
pub const MIN_VOCAB_SIZE: usize = 256 + 1;

/// A trained tokenizer as the rest of troupe uses it: text to ids and back.
///
/// The separator is never produced by `encode`: a literal `<|endoftext|>` in the text is
/// encoded as ordinary text, so only the pipeline decides where documents end.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eot_id: u32,
}

impl Tokenizer {
    pub fn load(path: &Path) -> DataResult<Self> {
        if !path.is_file() {
            return Err(DataError::io("open the tokenizer", path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")));
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| DataError::tokenizer(format!("loading {}", path.display()), e))?;
        Self::from_inner(inner, &path.display().to_string())
    }

    /// Builds the tokenizer from the JSON text of `tokenizer.json` (as shipped with a model).
    pub fn from_json(json: &str) -> DataResult<Self> {
        let inner = json.parse::<tokenizers::Tokenizer>().map_err(|e| DataError::tokenizer("parsing tokenizer JSON", e))?;
        Self::from_inner(inner, "tokenizer JSON")
    }

    fn from_inner(mut inner: tokenizers::Tokenizer, origin: &str) -> DataResult<Self> {
        let eot_id = inner.token_to_id(EOT_TOKEN).ok_or_else(|| DataError::Tokenizer {
            context: format!("loading {origin}"),
            message: format!("it has no {EOT_TOKEN} token, so it was not made by troupe's prepare"),
        })?;
        inner.set_encode_special_tokens(true);
        Ok(Tokenizer { inner, eot_id })
    }

    pub fn encode(&self, text: &str) -> DataResult<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| DataError::tokenizer("encoding text", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids outside the vocabulary are an error rather than silently dropped, since they mean
    /// the ids came from a different tokenizer or model.
    pub fn decode(&self, ids: &[u32]) -> DataResult<String> {
        let vocab = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(DataError::Tokenizer {
                context: "decoding ids".into(),
                message: format!("id {bad} is outside the vocabulary of {vocab} tokens"),
            });
        }
        self.inner.decode(ids, false).map_err(|e| DataError::tokenizer("decoding ids", e))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eot_id(&self) -> u32 {
        self.eot_id
    }

    /// What decides the ids `encode` gives, in one comparable form: the normalizer,
    /// pre-tokenizer and model (vocabulary, merges), and the added tokens. Two tokenizer.json
    /// files that differ only in how they are written (merges as "a b" or ["a", "b"], key
    /// order, a truncation setting) have the same fingerprint.
    pub fn fingerprint(&self) -> DataResult<serde_json::Value> {
        let text = self.inner.to_string(false).map_err(|e| DataError::tokenizer("writing the tokenizer", e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| DataError::Tokenizer { context: "reading the tokenizer back".into(), message: e.to_string() })?;
        let added: Vec<_> =
            v["added_tokens"].as_array().map(|a| a.iter().map(|t| (t["id"].clone(), t["content"].clone())).collect()).unwrap_or_default();
        Ok(serde_json::json!({ "normalizer": v["normalizer"], "pre_tokenizer": v["pre_tokenizer"], "model": v["model"], "added": added }))
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).field("eot_id", &self.eot_id).finish()
    }
}

type Trainable = TokenizerImpl<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>;

/// Trains a byte-level BPE on the given documents and returns the tokenizer's JSON.
///
/// Byte level means every string is encodable (no unknown token) and decoding inverts
/// encoding exactly. No prefix space is added, so a document's first word is tokenized as
/// written and `decode(encode(s)) == s`.
pub(crate) fn train_bpe(documents: &[String], vocab_size: usize) -> DataResult<String> {
    if !(MIN_VOCAB_SIZE..=MAX_VOCAB_SIZE).contains(&vocab_size) {
        return Err(DataError::InvalidOption {
            field: "vocab_size",
            reason: format!(
                "{vocab_size} is outside {MIN_VOCAB_SIZE}..={MAX_VOCAB_SIZE} (the 256 byte \
                 tokens plus {EOT_TOKEN} are the minimum)"
            ),
        });
    }
    let byte_level = ByteLevel::default().add_prefix_space(false);
    let mut tokenizer: Trainable = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(byte_level)))
        .with_post_processor(None)
        .with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)))
        .build()
        .map_err(|e| DataError::tokenizer("building the BPE tokenizer", e))?;

    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .initial_alphabet(alphabet)
        .special_tokens(vec![AddedToken::from(EOT_TOKEN, true)])
        .build();
    tokenizer.train(&mut trainer, documents.iter()).map_err(|e| DataError::tokenizer("training the BPE tokenizer", e))?;
    tokenizer.to_string(false).map_err(|e| DataError::tokenizer("serialising the trained tokenizer", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs() -> Vec<String> {
        vec![
            "To be, or not to be, that is the question:".to_owned(),
            "Whether 'tis nobler in the mind to suffer\nThe slings and arrows".to_owned(),
            "Now is the winter of our discontent".to_owned(),
        ]
    }

    #[test]
    fn trained_tokenizer_round_trips_any_text() -> DataResult<()> {
        let json = train_bpe(&docs(), 300)?;
        let tok = Tokenizer::from_json(&json)?;
        assert!(tok.vocab_size() <= 300);
        assert!(tok.vocab_size() >= MIN_VOCAB_SIZE);
        for text in ["To be, or not to be", "  leading spaces", "naïve café — 日本語 🎭", "", "\n\n"] {
            let ids = tok.encode(text)?;
            assert_eq!(tok.decode(&ids)?, text);
        }
        Ok(())
    }

    #[test]
    fn literal_separator_in_text_is_plain_text() -> DataResult<()> {
        let tok = Tokenizer::from_json(&train_bpe(&docs(), 300)?)?;
        let ids = tok.encode("a <|endoftext|> b")?;
        assert!(!ids.contains(&tok.eot_id()));
        assert_eq!(tok.decode(&ids)?, "a <|endoftext|> b");
        assert_eq!(tok.decode(&[tok.eot_id()])?, EOT_TOKEN);
        Ok(())
    }

    #[test]
    fn out_of_vocabulary_ids_are_errors() -> DataResult<()> {
        let tok = Tokenizer::from_json(&train_bpe(&docs(), 300)?)?;
        assert!(tok.decode(&[u32::MAX]).is_err());
        Ok(())
    }

    #[test]
    fn vocab_size_is_validated() {
        assert!(matches!(train_bpe(&docs(), 100), Err(DataError::InvalidOption { .. })));
        assert!(matches!(train_bpe(&docs(), 2_000_000), Err(DataError::InvalidOption { .. })));
    }
}
