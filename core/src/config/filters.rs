//! `[data.filters]`: which documents of a raw corpus are cleaned, dropped or de-duplicated
//! before the tokenizer sees them.
//!
//! Every section has `#[serde(default)]`, so a config file names only what it changes.
//! Thresholds of the Gopher rules follow the Gopher paper (Rae et al. 2021, appendix A.1) as
//! datatrove implements them; a threshold of 0 turns its rule off.

use serde::{Deserialize, Serialize};

/// `[data.filters]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// NFC-normalise Unicode, drop control characters other than newline, tab and carriage
    /// return, and drop a leading byte-order mark.
    pub normalize_unicode: bool,
    /// Drop documents shorter than this many characters after cleaning (0: no minimum; empty
    /// documents are always dropped).
    pub min_chars: usize,
    /// Drop documents longer than this many characters after cleaning (0: no maximum).
    pub max_chars: usize,
    /// Apply the Gopher quality and repetition rules (`[data.filters.gopher_rules]`).
    pub gopher: bool,
    /// Thresholds of the Gopher rules, used when `gopher` is on.
    pub gopher_rules: GopherRules,
    /// Drop documents whose cleaned text equals an earlier one's (the first copy is kept).
    pub exact_dedup: bool,
    /// Drop near-duplicates found with MinHash LSH (`[data.filters.minhash]`); the first copy
    /// is kept.
    pub near_dedup: bool,
    /// MinHash LSH parameters, used when `near_dedup` is on.
    pub minhash: MinHashConfig,
    /// Replace e-mail addresses with `<email>`.
    pub scrub_emails: bool,
    /// Replace IPv4 and IPv6 addresses with `<ip>`.
    pub scrub_ips: bool,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            normalize_unicode: true,
            // Empty documents are dropped anyway; a real minimum is the Gopher word count.
            min_chars: 0,
            max_chars: 0,
            gopher: false,
            gopher_rules: GopherRules::default(),
            exact_dedup: true,
            near_dedup: false,
            minhash: MinHashConfig::default(),
            scrub_emails: false,
            scrub_ips: false,
        }
    }
}

/// `[data.filters.gopher_rules]`: Gopher's quality and repetition thresholds. "Words" are
/// whitespace-separated tokens; every `max_*` / `min_*` set to 0 turns its rule off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GopherRules {
    /// Drop documents with fewer words (tokens with a letter or digit) than this.
    pub min_words: usize,
    /// Drop documents with more words than this.
    pub max_words: usize,
    /// Drop documents whose mean word length (characters, surrounding punctuation not
    /// counted) is below this.
    pub min_mean_word_length: f64,
    /// Drop documents whose mean word length is above this.
    pub max_mean_word_length: f64,
    /// Drop documents with more `#` per word, or more ellipses (`...`, `…`) per word, than this.
    pub max_symbol_word_ratio: f64,
    /// Drop documents in which more than this fraction of lines end with an ellipsis.
    pub max_ellipsis_line_fraction: f64,
    /// Drop documents in which more than this fraction of lines start with a bullet.
    pub max_bullet_line_fraction: f64,
    /// Drop documents in which fewer than this fraction of words contain a letter.
    pub min_alphabetic_word_fraction: f64,
    /// Drop documents in which more than this fraction of lines repeat an earlier line.
    pub max_duplicate_line_fraction: f64,
    /// Drop documents in which more than this fraction of paragraphs repeat an earlier one.
    pub max_duplicate_paragraph_fraction: f64,
    /// Drop documents in which lines that repeat an earlier line hold more than this fraction
    /// of the characters.
    pub max_duplicate_line_char_fraction: f64,
    /// Drop documents in which paragraphs that repeat an earlier one hold more than this
    /// fraction of the characters.
    pub max_duplicate_paragraph_char_fraction: f64,
    /// Drop documents in which the most frequent word 2-gram covers more than this fraction of
    /// the characters.
    pub max_top_2gram_char_fraction: f64,
    /// The same for word 3-grams.
    pub max_top_3gram_char_fraction: f64,
    /// The same for word 4-grams.
    pub max_top_4gram_char_fraction: f64,
    /// Drop documents in which word 5-grams that occur more than once cover more than this
    /// fraction of the characters.
    pub max_duplicate_5gram_char_fraction: f64,
    /// The same for word 6-grams.
    pub max_duplicate_6gram_char_fraction: f64,
    /// The same for word 7-grams.
    pub max_duplicate_7gram_char_fraction: f64,
    /// The same for word 8-grams.
    pub max_duplicate_8gram_char_fraction: f64,
    /// The same for word 9-grams.
    pub max_duplicate_9gram_char_fraction: f64,
    /// The same for word 10-grams.
    pub max_duplicate_10gram_char_fraction: f64,
}

impl Default for GopherRules {
    fn default() -> Self {
        GopherRules {
            min_words: 50,
            max_words: 100_000,
            min_mean_word_length: 3.0,
            max_mean_word_length: 10.0,
            max_symbol_word_ratio: 0.1,
            max_ellipsis_line_fraction: 0.3,
            max_bullet_line_fraction: 0.9,
            min_alphabetic_word_fraction: 0.8,
            max_duplicate_line_fraction: 0.3,
            max_duplicate_paragraph_fraction: 0.3,
            max_duplicate_line_char_fraction: 0.2,
            max_duplicate_paragraph_char_fraction: 0.2,
            max_top_2gram_char_fraction: 0.20,
            max_top_3gram_char_fraction: 0.18,
            max_top_4gram_char_fraction: 0.16,
            max_duplicate_5gram_char_fraction: 0.15,
            max_duplicate_6gram_char_fraction: 0.14,
            max_duplicate_7gram_char_fraction: 0.13,
            max_duplicate_8gram_char_fraction: 0.12,
            max_duplicate_9gram_char_fraction: 0.11,
            max_duplicate_10gram_char_fraction: 0.10,
        }
    }
}

impl GopherRules {
    /// `(n, max_top_<n>gram_char_fraction)` for n = 2, 3, 4.
    pub fn top_ngram_limits(&self) -> [(usize, f64); 3] {
        [(2, self.max_top_2gram_char_fraction), (3, self.max_top_3gram_char_fraction), (4, self.max_top_4gram_char_fraction)]
    }

    /// `(n, max_duplicate_<n>gram_char_fraction)` for n = 5 ..= 10.
    pub fn duplicate_ngram_limits(&self) -> [(usize, f64); 6] {
        [
            (5, self.max_duplicate_5gram_char_fraction),
            (6, self.max_duplicate_6gram_char_fraction),
            (7, self.max_duplicate_7gram_char_fraction),
            (8, self.max_duplicate_8gram_char_fraction),
            (9, self.max_duplicate_9gram_char_fraction),
            (10, self.max_duplicate_10gram_char_fraction),
        ]
    }

    /// Every fraction threshold with its field name (all must lie in [0, 1]).
    fn fractions(&self) -> [(&'static str, f64); 17] {
        [
            ("max_ellipsis_line_fraction", self.max_ellipsis_line_fraction),
            ("max_bullet_line_fraction", self.max_bullet_line_fraction),
            ("min_alphabetic_word_fraction", self.min_alphabetic_word_fraction),
            ("max_duplicate_line_fraction", self.max_duplicate_line_fraction),
            ("max_duplicate_paragraph_fraction", self.max_duplicate_paragraph_fraction),
            ("max_duplicate_line_char_fraction", self.max_duplicate_line_char_fraction),
            ("max_duplicate_paragraph_char_fraction", self.max_duplicate_paragraph_char_fraction),
            ("max_top_2gram_char_fraction", self.max_top_2gram_char_fraction),
            ("max_top_3gram_char_fraction", self.max_top_3gram_char_fraction),
            ("max_top_4gram_char_fraction", self.max_top_4gram_char_fraction),
            ("max_duplicate_5gram_char_fraction", self.max_duplicate_5gram_char_fraction),
            ("max_duplicate_6gram_char_fraction", self.max_duplicate_6gram_char_fraction),
            ("max_duplicate_7gram_char_fraction", self.max_duplicate_7gram_char_fraction),
            ("max_duplicate_8gram_char_fraction", self.max_duplicate_8gram_char_fraction),
            ("max_duplicate_9gram_char_fraction", self.max_duplicate_9gram_char_fraction),
            ("max_duplicate_10gram_char_fraction", self.max_duplicate_10gram_char_fraction),
            // Not a fraction of lines or characters, but a ratio that is meaningful in the same range.
            ("max_symbol_word_ratio", self.max_symbol_word_ratio),
        ]
    }
}

/// `[data.filters.minhash]`: near-duplicate detection with MinHash and locality-sensitive
/// hashing (LSH).
///
/// A document's signature is `permutations` minimum hashes of its word shingles; it is cut
/// into `bands` bands of `permutations / bands` rows, and two documents that agree on a whole
/// band become candidates. A pair of Jaccard similarity `s` becomes a candidate with
/// probability `1 - (1 - s^rows)^bands`, an S-curve that rises steepest near
/// `(1 / bands)^(1 / rows)` (see [`MinHashConfig::lsh_threshold`]). A candidate counts as a
/// duplicate when the share of equal signature entries (an estimate of `s`) is at least
/// `threshold`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MinHashConfig {
    /// Words per shingle (documents with fewer words make one shingle of all of them).
    pub shingle_words: usize,
    /// Hash functions per signature (a multiple of `bands`).
    pub permutations: usize,
    /// LSH bands the signature is cut into.
    pub bands: usize,
    /// Estimated Jaccard similarity at or above which a candidate counts as a duplicate.
    pub threshold: f64,
}

impl Default for MinHashConfig {
    fn default() -> Self {
        // 112 hashes as in datatrove, but cut into 16 bands of 7 rows rather than 14 of 8:
        // the LSH threshold falls from 0.72 to 0.67, below `threshold`, so near-duplicates at
        // the threshold are still found. A copy with 2% of its words changed differs in ~10% of
        // its 5-word shingles (Jaccard ~0.82); 14 x 8 makes such a pair a candidate with
        // probability ~0.96, 16 x 7 with ~0.99, for a few more false candidates that the
        // signature comparison then rejects.
        MinHashConfig { shingle_words: 5, permutations: 112, bands: 16, threshold: 0.7 }
    }
}

impl MinHashConfig {
    /// Signature entries per band.
    pub fn rows_per_band(&self) -> usize {
        self.permutations / self.bands.max(1)
    }

    /// The Jaccard similarity at which a pair becomes an LSH candidate with probability about
    /// one half: `(1 / bands)^(bands / permutations)`.
    pub fn lsh_threshold(&self) -> f64 {
        let bands = self.bands.max(1) as f64;
        (1.0 / bands).powf(bands / self.permutations.max(1) as f64)
    }
}

/// Most words a shingle may hold (longer shingles only match verbatim copies).
const MAX_SHINGLE_WORDS: usize = 64;
/// Most hash functions a signature may have (each costs 4 bytes per document on disk).
const MAX_PERMUTATIONS: usize = 1024;

impl FilterConfig {
    /// Checks every value's range. The error is the dotted field name and what is wrong with
    /// its value and how to fix it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        fn check(field: &str, ok: bool, message: impl FnOnce() -> String) -> Result<(), (String, String)> {
            if ok {
                Ok(())
            } else {
                Err((format!("data.filters.{field}"), message()))
            }
        }
        check("max_chars", self.max_chars == 0 || self.max_chars >= self.min_chars, || {
            format!("{} is below data.filters.min_chars ({}); raise it, or use 0 for no maximum", self.max_chars, self.min_chars)
        })?;

        let g = &self.gopher_rules;
        check("gopher_rules.max_words", g.max_words == 0 || g.max_words >= g.min_words, || {
            format!("{} is below gopher_rules.min_words ({}); raise it, or use 0 for no maximum", g.max_words, g.min_words)
        })?;
        for (field, value) in [("min_mean_word_length", g.min_mean_word_length), ("max_mean_word_length", g.max_mean_word_length)] {
            check(&format!("gopher_rules.{field}"), value.is_finite() && value >= 0.0, || {
                format!("{value} is not a number >= 0 (characters; 0 turns the rule off)")
            })?;
        }
        check(
            "gopher_rules.max_mean_word_length",
            g.max_mean_word_length == 0.0 || g.max_mean_word_length >= g.min_mean_word_length,
            || {
                format!(
                    "{} is below gopher_rules.min_mean_word_length ({}); raise it, or use 0 for no maximum",
                    g.max_mean_word_length, g.min_mean_word_length
                )
            },
        )?;
        for (field, value) in g.fractions() {
            check(&format!("gopher_rules.{field}"), (0.0..=1.0).contains(&value), || {
                format!("{value} is not in [0, 1] (0 turns the rule off)")
            })?;
        }

        let m = &self.minhash;
        check("minhash.shingle_words", (1..=MAX_SHINGLE_WORDS).contains(&m.shingle_words), || {
            format!("{} is not in 1..={MAX_SHINGLE_WORDS}; 5 is usual", m.shingle_words)
        })?;
        check("minhash.permutations", (1..=MAX_PERMUTATIONS).contains(&m.permutations), || {
            format!("{} is not in 1..={MAX_PERMUTATIONS}; 112 is usual", m.permutations)
        })?;
        check("minhash.bands", m.bands >= 1 && m.permutations.is_multiple_of(m.bands), || {
            format!(
                "{} does not divide minhash.permutations ({}) into whole bands; e.g. 112 permutations in 16 bands of 7 rows",
                m.bands, m.permutations
            )
        })?;
        check("minhash.threshold", m.threshold > 0.0 && m.threshold <= 1.0, || {
            format!("{} is not in (0, 1]; it is the estimated Jaccard similarity of a duplicate, e.g. 0.7", m.threshold)
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let config = FilterConfig::default();
        config.validate().unwrap();
        let text = toml::to_string(&config).unwrap();
        let again: FilterConfig = toml::from_str(&text).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn a_partial_section_keeps_the_other_defaults() {
        let config: FilterConfig = toml::from_str("gopher = true\n[gopher_rules]\nmin_words = 10\n[minhash]\nbands = 8\n").unwrap();
        assert!(config.gopher);
        assert_eq!(config.gopher_rules.min_words, 10);
        assert_eq!(config.gopher_rules.max_words, GopherRules::default().max_words);
        assert_eq!(config.minhash.bands, 8);
        assert_eq!(config.minhash.permutations, 112);
        assert!(config.exact_dedup);
        config.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<FilterConfig>("min_char = 3").unwrap_err().to_string().contains("min_char"));
        assert!(toml::from_str::<FilterConfig>("[minhash]\nband = 3").unwrap_err().to_string().contains("band"));
        assert!(toml::from_str::<FilterConfig>("[gopher_rules]\nmax_top_5gram_char_fraction = 0.1").is_err());
    }

    #[test]
    fn bad_values_name_their_field() {
        let field = |change: fn(&mut FilterConfig)| {
            let mut config = FilterConfig::default();
            change(&mut config);
            config.validate().unwrap_err().0
        };
        assert_eq!(field(|c| c.minhash.bands = 15), "data.filters.minhash.bands");
        assert_eq!(field(|c| c.minhash.bands = 0), "data.filters.minhash.bands");
        assert_eq!(field(|c| c.minhash.permutations = 0), "data.filters.minhash.permutations");
        assert_eq!(field(|c| c.minhash.shingle_words = 0), "data.filters.minhash.shingle_words");
        assert_eq!(field(|c| c.minhash.threshold = f64::NAN), "data.filters.minhash.threshold");
        assert_eq!(
            field(|c| {
                c.min_chars = 10;
                c.max_chars = 5;
            }),
            "data.filters.max_chars"
        );
        assert_eq!(field(|c| c.gopher_rules.max_words = 10), "data.filters.gopher_rules.max_words");
        assert_eq!(field(|c| c.gopher_rules.max_mean_word_length = 2.0), "data.filters.gopher_rules.max_mean_word_length");
        assert_eq!(field(|c| c.gopher_rules.min_mean_word_length = -1.0), "data.filters.gopher_rules.min_mean_word_length");
        assert_eq!(field(|c| c.gopher_rules.max_symbol_word_ratio = f64::INFINITY), "data.filters.gopher_rules.max_symbol_word_ratio");
        let mut config = FilterConfig::default();
        config.gopher_rules.max_duplicate_7gram_char_fraction = 1.5;
        let (name, message) = config.validate().unwrap_err();
        assert_eq!(name, "data.filters.gopher_rules.max_duplicate_7gram_char_fraction");
        assert!(message.contains("1.5") && message.contains("[0, 1]"), "{message}");
    }

    #[test]
    fn the_default_lsh_threshold_lies_below_the_similarity_threshold() {
        let m = MinHashConfig::default();
        assert_eq!(m.rows_per_band() * m.bands, m.permutations);
        assert!(m.lsh_threshold() < m.threshold, "{}", m.lsh_threshold());
        assert!((m.lsh_threshold() - (1.0f64 / 16.0).powf(1.0 / 7.0)).abs() < 1e-12);
    }
}
