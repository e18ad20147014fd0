//! Document cleaning and content filters (`[data.filters]`): Unicode normalisation, e-mail
//! and IP address scrubbing, length limits and the Gopher quality and repetition rules
//! (Rae et al. 2021, appendix A.1, in the spirit of datatrove's `GopherQualityFilter` and
//! `GopherRepetitionFilter`).
//!
//! Documents are untrusted text, so nothing here panics on any input, and every rule runs in
//! time linear in the document (one pass or a hash map, never a pairwise comparison).
//! De-duplication needs state across documents and lives in [`super::dedup`].

use std::collections::{HashMap, HashSet};
use std::fmt;

use troupe_core::config::{FilterConfig, GopherRules};
use unicode_normalization::UnicodeNormalization;

use crate::data::corpus::clean_text;
use crate::data::dedup::{hash_bytes, mix};

/// Why a document was dropped (one label per reason, used as a counter key and in reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Nothing left after cleaning.
    Empty,
    /// Fewer characters than `data.filters.min_chars`.
    TooShort,
    /// More characters than `data.filters.max_chars`.
    TooLong,
    /// Too few or too many words.
    GopherWordCount,
    /// Mean word length outside the allowed range.
    GopherMeanWordLength,
    /// Too many `#` or ellipses per word.
    GopherSymbolRatio,
    /// Too many lines ending with an ellipsis.
    GopherEllipsisLines,
    /// Too many lines starting with a bullet.
    GopherBulletLines,
    /// Too few words with a letter.
    GopherAlphabeticWords,
    /// Too many repeated lines, or too many characters in them.
    GopherDuplicateLines,
    /// Too many repeated paragraphs, or too many characters in them.
    GopherDuplicateParagraphs,
    /// One word 2-, 3- or 4-gram covers too much of the text.
    GopherTopNgrams,
    /// Repeated word 5- to 10-grams cover too much of the text.
    GopherDuplicateNgrams,
    /// The same cleaned text as an earlier document.
    ExactDuplicate,
    /// A MinHash near-duplicate of an earlier document.
    NearDuplicate,
}

impl DropReason {
    /// Every reason, in the order the checks run.
    pub const ALL: [DropReason; 15] = [
        DropReason::Empty,
        DropReason::TooShort,
        DropReason::TooLong,
        DropReason::GopherWordCount,
        DropReason::GopherMeanWordLength,
        DropReason::GopherSymbolRatio,
        DropReason::GopherEllipsisLines,
        DropReason::GopherBulletLines,
        DropReason::GopherAlphabeticWords,
        DropReason::GopherDuplicateLines,
        DropReason::GopherDuplicateParagraphs,
        DropReason::GopherTopNgrams,
        DropReason::GopherDuplicateNgrams,
        DropReason::ExactDuplicate,
        DropReason::NearDuplicate,
    ];

    /// A snake_case name, e.g. `"gopher_symbol_ratio"`.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Empty => "empty",
            DropReason::TooShort => "too_short",
            DropReason::TooLong => "too_long",
            DropReason::GopherWordCount => "gopher_word_count",
            DropReason::GopherMeanWordLength => "gopher_mean_word_length",
            DropReason::GopherSymbolRatio => "gopher_symbol_ratio",
            DropReason::GopherEllipsisLines => "gopher_ellipsis_lines",
            DropReason::GopherBulletLines => "gopher_bullet_lines",
            DropReason::GopherAlphabeticWords => "gopher_alphabetic_words",
            DropReason::GopherDuplicateLines => "gopher_duplicate_lines",
            DropReason::GopherDuplicateParagraphs => "gopher_duplicate_paragraphs",
            DropReason::GopherTopNgrams => "gopher_top_ngrams",
            DropReason::GopherDuplicateNgrams => "gopher_duplicate_ngrams",
            DropReason::ExactDuplicate => "exact_duplicate",
            DropReason::NearDuplicate => "near_duplicate",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Cleans one document and applies the content filters (not the dedup ones, which need state).
/// Returns the cleaned text to keep, or why it is dropped.
///
/// Steps, in order: Unicode normalisation ([`normalize_unicode`], if enabled), troupe's
/// whitespace cleaning ([`clean_text`]), e-mail and IP scrubbing ([`scrub_emails`],
/// [`scrub_ips`], if enabled), the empty / length checks, then the Gopher rules (if enabled).
/// Lengths are counted in characters (Unicode scalar values) of the cleaned text.
pub fn clean_and_filter(raw: &str, config: &FilterConfig) -> Result<String, DropReason> {
    let mut text = if config.normalize_unicode { clean_text(&normalize_unicode(raw)) } else { clean_text(raw) };
    if config.scrub_emails {
        text = scrub_emails(&text);
    }
    if config.scrub_ips {
        text = scrub_ips(&text);
    }
    if text.is_empty() {
        return Err(DropReason::Empty);
    }
    let chars = text.chars().count();
    if chars < config.min_chars {
        return Err(DropReason::TooShort);
    }
    if config.max_chars != 0 && chars > config.max_chars {
        return Err(DropReason::TooLong);
    }
    if config.gopher {
        gopher_rules(&text, chars, &config.gopher_rules)?;
    }
    Ok(text)
}

// ---------------------------------------------------------------------------------------------
// Unicode normalisation.

/// NFC-normalises `raw` (so that "e" + combining acute and "é" are the same text for the
/// tokenizer and for de-duplication), drops control characters (Unicode category Cc) except
/// `\n`, `\t` and `\r`, and drops a leading byte-order mark.
///
/// `\r` is kept because [`clean_text`] turns `\r\n` and a lone `\r` into line breaks; dropping
/// it here would glue lines of old Mac files together.
pub fn normalize_unicode(raw: &str) -> String {
    let raw = raw.strip_prefix('\u{feff}').unwrap_or(raw);
    let kept = |c: &char| !c.is_control() || matches!(c, '\n' | '\t' | '\r');
    if raw.is_ascii() {
        // ASCII text is already in NFC; skip the normaliser's buffering.
        raw.chars().filter(kept).collect()
    } else {
        raw.chars().filter(kept).nfc().collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Scrubbing. Hand-written scanners over bytes: every pattern is ASCII, so a match starts and
// ends on ASCII bytes, which are always character boundaries of the UTF-8 text.

/// What replaces an e-mail address.
pub const EMAIL_PLACEHOLDER: &str = "<email>";
/// What replaces an IP address.
pub const IP_PLACEHOLDER: &str = "<ip>";

/// Replaces e-mail addresses with [`EMAIL_PLACEHOLDER`].
///
/// An address is `local@domain`: the local part is the run of ASCII letters, digits and
/// `. _ % + -` before the `@` (leading dots dropped, as punctuation); the domain is two or
/// more dot-separated labels of ASCII letters, digits and `-` (1-63 characters, not starting
/// or ending with `-`), the last one (the top-level domain) 2-63 letters. Dots and hyphens
/// after the domain are punctuation, not part of it. `a@b`, `@name` and `x@y.z1` are left
/// alone.
pub fn scrub_emails(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    // `text[..copied]` is already in `out`; `search` is where to look for the next '@'.
    let (mut copied, mut search) = (0, 0);
    while let Some(offset) = bytes[search..].iter().position(|&b| b == b'@') {
        let at = search + offset;
        // The local part never reaches back into an earlier match or past an earlier '@'
        // (not a local-part byte), so every byte is scanned a bounded number of times.
        let mut start = at;
        while start > copied && is_email_local_byte(bytes[start - 1]) {
            start -= 1;
        }
        while start < at && bytes[start] == b'.' {
            start += 1;
        }
        let mut end = at + 1;
        while end < bytes.len() && is_domain_byte(bytes[end]) {
            end += 1;
        }
        while end > at + 1 && matches!(bytes[end - 1], b'.' | b'-') {
            end -= 1;
        }
        if start < at && is_email_domain(&bytes[at + 1..end]) {
            out.push_str(&text[copied..start]);
            out.push_str(EMAIL_PLACEHOLDER);
            copied = end;
            search = end;
        } else {
            search = at + 1;
        }
    }
    out.push_str(&text[copied..]);
    out
}

fn is_email_local_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn is_domain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')
}

fn is_email_domain(domain: &[u8]) -> bool {
    let mut labels = 0;
    let mut last: &[u8] = &[];
    for label in domain.split(|&b| b == b'.') {
        let valid = (1..=63).contains(&label.len())
            && label.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-')
            && label.first() != Some(&b'-')
            && label.last() != Some(&b'-');
        if !valid {
            return false;
        }
        labels += 1;
        last = label;
    }
    labels >= 2 && last.len() >= 2 && last.iter().all(u8::is_ascii_alphabetic)
}

/// Replaces IPv6 and IPv4 addresses with [`IP_PLACEHOLDER`].
///
/// IPv4: four dot-separated decimal numbers of 1-3 digits, each at most 255, not touching a
/// letter, digit, `_` or another dot-number (`v1.2.3.4`, `1.2.3.4.5` and `1.2.3.256` are left
/// alone; `1.2.3.4:80` becomes `<ip>:80`).
///
/// IPv6: colon-separated groups of 1-4 hex digits, either exactly eight, or fewer with one
/// `::` standing for the rest; the last group may be a dotted IPv4 address (counting as two).
/// At least three groups must be written out, so that `::1`, `fe80::1` and C++-like `a::b`
/// stay, and times such as `12:30:45` (three groups, no `::`) are not addresses.
pub fn scrub_ips(text: &str) -> String {
    // IPv6 first: its IPv4-mapped form (`::ffff:1.2.3.4`) would otherwise lose only its tail.
    let text = replace_runs(text, |b| b.is_ascii_hexdigit() || b == b':' || b == b'.', is_ipv6);
    replace_runs(&text, |b| b.is_ascii_digit() || b == b'.', is_ipv4)
}

/// Replaces each maximal run of `in_run` bytes, less surrounding punctuation (dots, a single
/// colon), that stands alone as a word and satisfies `is_address`, with [`IP_PLACEHOLDER`].
fn replace_runs(text: &str, in_run: impl Fn(u8) -> bool, is_address: impl Fn(&str) -> bool) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut i) = (0, 0);
    while i < bytes.len() {
        if !in_run(bytes[i]) {
            i += 1;
            continue;
        }
        let run_start = i;
        while i < bytes.len() && in_run(bytes[i]) {
            i += 1;
        }
        let (start, end) = trim_run(bytes, run_start, i);
        if start < end && stands_alone(text, start, end) && is_address(&text[start..end]) {
            out.push_str(&text[copied..start]);
            out.push_str(IP_PLACEHOLDER);
            copied = end;
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// Drops dots at both ends of `bytes[start..end]` (sentence punctuation) and a single colon
/// that is not part of `::` (as in "address:").
fn trim_run(bytes: &[u8], mut start: usize, mut end: usize) -> (usize, usize) {
    while start < end && bytes[start] == b'.' {
        start += 1;
    }
    while end > start && bytes[end - 1] == b'.' {
        end -= 1;
    }
    if end - start >= 2 && bytes[start] == b':' && bytes[start + 1] != b':' {
        start += 1;
    }
    if end - start >= 2 && bytes[end - 1] == b':' && bytes[end - 2] != b':' {
        end -= 1;
    }
    (start, end)
}

/// Whether `text[start..end]` is not glued to a letter, digit or underscore on either side.
fn stands_alone(text: &str, start: usize, end: usize) -> bool {
    let joins = |c: char| c.is_alphanumeric() || c == '_';
    !text[..start].chars().next_back().is_some_and(joins) && !text[end..].chars().next().is_some_and(joins)
}

fn is_ipv4(s: &str) -> bool {
    let mut parts = 0;
    for part in s.split('.') {
        let valid =
            (1..=3).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit()) && part.parse::<u16>().is_ok_and(|v| v <= 255);
        if !valid {
            return false;
        }
        parts += 1;
    }
    parts == 4
}

fn is_ipv6(s: &str) -> bool {
    if !s.contains(':') {
        return false;
    }
    let mut pieces = s.split("::");
    let head = pieces.next().unwrap_or("");
    let tail = pieces.next();
    if pieces.next().is_some() {
        return false; // two "::"
    }
    let compressed = tail.is_some();
    let mut groups = 0;
    for (piece, is_last_piece) in [(head, tail.is_none()), (tail.unwrap_or(""), true)] {
        if piece.is_empty() {
            continue;
        }
        let mut fields = piece.split(':').peekable();
        while let Some(field) = fields.next() {
            let is_last = is_last_piece && fields.peek().is_none();
            if (1..=4).contains(&field.len()) && field.bytes().all(|b| b.is_ascii_hexdigit()) {
                groups += 1;
            } else if is_last && is_ipv4(field) {
                groups += 2;
            } else {
                return false;
            }
        }
    }
    let complete = if compressed { groups <= 7 } else { groups == 8 };
    complete && groups >= 3
}

// ---------------------------------------------------------------------------------------------
// Gopher rules. Words are whitespace-separated tokens of the cleaned text; lines are its
// non-empty lines and paragraphs its blocks between empty lines (which `clean_text` reduces to
// exactly "\n\n"). A threshold of 0 turns its rule off.

/// Characters that mark a bulleted line when they start it.
const BULLETS: [char; 9] = ['•', '‣', '◦', '⁃', '▪', '●', '○', '-', '*'];

/// Applies the Gopher rules in the order of [`DropReason::ALL`]; `chars` is the number of
/// characters of `text`.
fn gopher_rules(text: &str, chars: usize, rules: &GopherRules) -> Result<(), DropReason> {
    word_count_and_length(text, rules)?;
    symbol_ratio(text, rules)?;
    ellipsis_lines(text, rules)?;
    bullet_lines(text, rules)?;
    alphabetic_words(text, rules)?;
    duplicate_lines(text, chars, rules)?;
    duplicate_paragraphs(text, chars, rules)?;
    repeated_ngrams(text, chars, rules)
}

/// `part / whole`, 0 for an empty whole.
fn fraction(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Whether `value` breaks a maximum (0: no maximum).
fn above(value: f64, max: f64) -> bool {
    max > 0.0 && value > max
}

/// Word count and mean word length. A word is a token with a letter or digit (a lone "-" or
/// "&" is not a word); its length leaves out punctuation around it ("end." has 3 letters).
fn word_count_and_length(text: &str, rules: &GopherRules) -> Result<(), DropReason> {
    let (mut words, mut letters) = (0usize, 0usize);
    for token in text.split_whitespace() {
        let core = token.trim_matches(|c: char| !c.is_alphanumeric());
        if !core.is_empty() {
            words += 1;
            letters += core.chars().count();
        }
    }
    if words < rules.min_words || (rules.max_words != 0 && words > rules.max_words) {
        return Err(DropReason::GopherWordCount);
    }
    let mean = fraction(letters, words);
    if mean < rules.min_mean_word_length || above(mean, rules.max_mean_word_length) {
        return Err(DropReason::GopherMeanWordLength);
    }
    Ok(())
}

/// `#` per token and ellipses (`...` or `…`) per token, each against the same maximum.
fn symbol_ratio(text: &str, rules: &GopherRules) -> Result<(), DropReason> {
    let tokens = text.split_whitespace().count();
    let hashes = text.bytes().filter(|&b| b == b'#').count();
    let ellipses = text.matches("...").count() + text.matches('…').count();
    if above(fraction(hashes, tokens), rules.max_symbol_word_ratio) || above(fraction(ellipses, tokens), rules.max_symbol_word_ratio) {
        return Err(DropReason::GopherSymbolRatio);
    }
    Ok(())
}

fn non_empty_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n').filter(|line| !line.trim().is_empty())
}

/// Share of lines that end with an ellipsis (truncated snippets, "read more" lists).
fn ellipsis_lines(text: &str, rules: &GopherRules) -> Result<(), DropReason> {
    let (mut lines, mut ellipsis) = (0, 0);
    for line in non_empty_lines(text) {
        lines += 1;
        let line = line.trim_end();
        if line.ends_with("...") || line.ends_with('…') {
            ellipsis += 1;
        }
    }
    if above(fraction(ellipsis, lines), rules.max_ellipsis_line_fraction) {
        return Err(DropReason::GopherEllipsisLines);
    }
    Ok(())
}

/// Share of lines that start with a bullet (navigation menus, lists without prose).
fn bullet_lines(text: &str, rules: &GopherRules) -> Result<(), DropReason> {
    let (mut lines, mut bullets) = (0, 0);
    for line in non_empty_lines(text) {
        lines += 1;
        if line.trim_start().starts_with(BULLETS) {
            bullets += 1;
        }
    }
    if above(fraction(bullets, lines), rules.max_bullet_line_fraction) {
        return Err(DropReason::GopherBulletLines);
    }
    Ok(())
}

/// Share of tokens with at least one letter (tables of numbers, code, symbol soup fail).
fn alphabetic_words(text: &str, rules: &GopherRules) -> Result<(), DropReason> {
    let (mut tokens, mut alphabetic) = (0, 0);
    for token in text.split_whitespace() {
        tokens += 1;
        if token.chars().any(char::is_alphabetic) {
            alphabetic += 1;
        }
    }
    if fraction(alphabetic, tokens) < rules.min_alphabetic_word_fraction {
        return Err(DropReason::GopherAlphabeticWords);
    }
    Ok(())
}

/// How many of `items` repeat an earlier one, and how many characters those repeats hold.
fn repeats<'a>(items: impl Iterator<Item = &'a str>) -> (usize, usize, usize) {
    let mut seen = HashSet::new();
    let (mut total, mut repeated, mut repeated_chars) = (0, 0, 0);
    for item in items {
        total += 1;
        if !seen.insert(item) {
            repeated += 1;
            repeated_chars += item.chars().count();
        }
    }
    (total, repeated, repeated_chars)
}

fn duplicate_lines(text: &str, chars: usize, rules: &GopherRules) -> Result<(), DropReason> {
    let (lines, repeated, repeated_chars) = repeats(non_empty_lines(text));
    if above(fraction(repeated, lines), rules.max_duplicate_line_fraction)
        || above(fraction(repeated_chars, chars), rules.max_duplicate_line_char_fraction)
    {
        return Err(DropReason::GopherDuplicateLines);
    }
    Ok(())
}

fn duplicate_paragraphs(text: &str, chars: usize, rules: &GopherRules) -> Result<(), DropReason> {
    let (paragraphs, repeated, repeated_chars) = repeats(text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()));
    if above(fraction(repeated, paragraphs), rules.max_duplicate_paragraph_fraction)
        || above(fraction(repeated_chars, chars), rules.max_duplicate_paragraph_char_fraction)
    {
        return Err(DropReason::GopherDuplicateParagraphs);
    }
    Ok(())
}

/// One token of the text, as the n-gram rules see it.
struct Token {
    hash: u64,
    chars: usize,
}

/// The top n-gram rule (n = 2, 3, 4) and the duplicate n-gram rule (n = 5 ..= 10).
///
/// N-grams are compared by a 64-bit hash of their tokens, built up in place from the
/// (n-1)-gram hashes, so memory stays a few machine words per token whatever `n`.
/// - Top n-gram: the most frequent n-gram (if it occurs at least twice) times its length in
///   characters (tokens and the spaces between them), over the text's characters.
/// - Duplicate n-grams: the characters of tokens that lie in any n-gram occurring more than
///   once (each token counted once, however many such n-grams overlap it), over the text's
///   characters.
fn repeated_ngrams(text: &str, chars: usize, rules: &GopherRules) -> Result<(), DropReason> {
    let top = rules.top_ngram_limits();
    let duplicate = rules.duplicate_ngram_limits();
    let Some(largest_n) = top.iter().chain(&duplicate).filter(|(_, max)| *max > 0.0).map(|&(n, _)| n).max() else {
        return Ok(());
    };
    let tokens: Vec<Token> = text.split_whitespace().map(|t| Token { hash: hash_bytes(t.as_bytes()), chars: t.chars().count() }).collect();
    // ngrams[i]: hash of the n tokens starting at i (n = 1 to begin with). Mixed once more
    // than the token hashes, so that `mix(h ^ next)` cannot cancel for a repeated token.
    let mut ngrams: Vec<u64> = tokens.iter().map(|t| mix(t.hash)).collect();
    let mut counts: HashMap<u64, (u32, usize)> = HashMap::new();
    for n in 2..=largest_n {
        if tokens.len() < n {
            break;
        }
        for i in 0..=tokens.len() - n {
            ngrams[i] = mix(ngrams[i] ^ tokens[i + n - 1].hash);
        }
        ngrams.truncate(tokens.len() - n + 1);

        counts.clear();
        for (i, &h) in ngrams.iter().enumerate() {
            counts.entry(h).and_modify(|(count, _)| *count = count.saturating_add(1)).or_insert((1, i));
        }
        if let Some(&(_, max)) = top.iter().find(|&&(top_n, max)| top_n == n && max > 0.0) {
            // The most frequent n-gram; among equally frequent ones, the longest.
            let ngram_chars = |first: usize| tokens[first..first + n].iter().map(|t| t.chars).sum::<usize>() + (n - 1);
            let most = counts.values().filter(|(count, _)| *count >= 2).map(|&(count, first)| (count, ngram_chars(first))).max();
            if let Some((count, ngram_chars)) = most {
                let covered = (count as usize).saturating_mul(ngram_chars).min(chars);
                if fraction(covered, chars) > max {
                    return Err(DropReason::GopherTopNgrams);
                }
            }
        }
        if let Some(&(_, max)) = duplicate.iter().find(|&&(dup_n, max)| dup_n == n && max > 0.0) {
            // Tokens before `covered_to` are already counted.
            let (mut covered, mut covered_to) = (0usize, 0usize);
            for (i, h) in ngrams.iter().enumerate() {
                if counts.get(h).is_some_and(|&(count, _)| count >= 2) {
                    covered += tokens[covered_to.max(i)..i + n].iter().map(|t| t.chars).sum::<usize>();
                    covered_to = i + n;
                }
            }
            if fraction(covered, chars) > max {
                return Err(DropReason::GopherDuplicateNgrams);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::data::corpus::tests::Lcg;

    const VOCABULARY: &[&str] = &[
        "river", "mountain", "quiet", "garden", "lantern", "harbor", "window", "silver", "morning", "distant", "village", "thunder",
        "meadow", "whisper", "candle", "forest", "shadow", "golden", "winter", "summer", "ancient", "bridge", "castle", "dancer",
        "feather", "glacier", "horizon", "island", "journey", "kingdom", "ladder", "marble", "needle", "orchard", "pepper", "quarry",
        "rabbit", "saddle", "tunnel", "umbrella", "valley", "wander", "yellow", "zephyr", "anchor", "basket", "cellar", "dragon", "ember",
        "falcon", "granite", "hollow", "ivory", "jasper", "kettle", "lemon", "mirror", "nutmeg", "oyster", "pebble",
    ];

    /// `lines` lines of `words_per_line` random words each (a sentence per line), in
    /// paragraphs of three lines: text that passes every default Gopher rule.
    fn prose(lines: usize, words_per_line: usize, seed: u64) -> Vec<String> {
        let mut rng = Lcg(seed);
        (0..lines)
            .map(|_| {
                let words: Vec<&str> = (0..words_per_line).map(|_| VOCABULARY[rng.next(VOCABULARY.len())]).collect();
                format!("{}.", words.join(" "))
            })
            .collect()
    }

    /// Joins lines into paragraphs of three lines.
    fn paragraphs(lines: &[String]) -> String {
        lines.chunks(3).map(|chunk| chunk.join("\n")).collect::<Vec<_>>().join("\n\n")
    }

    fn gopher() -> FilterConfig {
        FilterConfig { gopher: true, ..FilterConfig::default() }
    }

    fn base() -> String {
        paragraphs(&prose(12, 10, 7))
    }

    #[track_caller]
    fn passes(text: &str, config: &FilterConfig) {
        if let Err(reason) = clean_and_filter(text, config) {
            panic!("dropped as {reason}: {text:?}");
        }
    }

    #[track_caller]
    fn fails(text: &str, config: &FilterConfig, expected: DropReason) {
        assert_eq!(clean_and_filter(text, config), Err(expected), "{text:?}");
    }

    #[test]
    fn labels_are_distinct_snake_case() {
        let labels: HashSet<&str> = DropReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), DropReason::ALL.len());
        assert!(labels.iter().all(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
        assert_eq!(DropReason::GopherSymbolRatio.label(), "gopher_symbol_ratio");
        assert_eq!(DropReason::NearDuplicate.to_string(), "near_duplicate");
        let mut sorted = DropReason::ALL;
        sorted.sort();
        assert_eq!(sorted, DropReason::ALL, "ALL lists the reasons in declaration order");
    }

    #[test]
    fn normalisation_composes_and_drops_control_characters() {
        let config = FilterConfig::default();
        assert_eq!(clean_and_filter("caf\u{65}\u{301}", &config).unwrap(), "café");
        assert_eq!(clean_and_filter("\u{feff}a\u{0}b\u{7}c\u{1b}[0m d\u{85}e\u{7f}", &config).unwrap(), "abc[0m de");
        // Tabs and line breaks survive normalisation (clean_text then tidies them).
        assert_eq!(clean_and_filter("a\tb\r\nc\rd", &config).unwrap(), "a b\nc\nd");
        let off = FilterConfig { normalize_unicode: false, ..FilterConfig::default() };
        assert_eq!(clean_and_filter("e\u{301}\u{0}", &off).unwrap(), "e\u{301}\u{0}");
        assert_eq!(normalize_unicode("plain ascii\n"), "plain ascii\n");
    }

    #[test]
    fn whitespace_is_cleaned_and_empty_documents_are_dropped() {
        let config = FilterConfig::default();
        assert_eq!(clean_and_filter("  a   b  \r\n\r\n\r\n\r\nc\t\t", &config).unwrap(), "a b\n\nc");
        fails(" \n\t\r\n ", &config, DropReason::Empty);
        fails("\u{feff}\u{0}\n\u{7}", &config, DropReason::Empty);
        fails("", &FilterConfig { normalize_unicode: false, ..FilterConfig::default() }, DropReason::Empty);
    }

    #[test]
    fn length_limits_count_characters_after_cleaning() {
        let config = FilterConfig { min_chars: 5, max_chars: 8, ..FilterConfig::default() };
        passes("ééééé", &config); // 5 characters, 10 bytes
        passes("  a    b   c  ", &config); // "a b c"
        fails("abcd", &config, DropReason::TooShort);
        fails("a      b", &config, DropReason::TooShort); // "a b"
        fails("abcdefghi", &config, DropReason::TooLong);
        passes(&"x".repeat(10_000), &FilterConfig::default()); // 0: no limits
    }

    #[test]
    fn emails_are_scrubbed_and_look_alikes_left_alone() {
        assert_eq!(scrub_emails("mail john.doe+x@mail.example.co.uk, or me@b.io."), "mail <email>, or <email>.");
        assert_eq!(scrub_emails("(a_b%c@x-y.org) <first.last@host.museum>"), "(<email>) <<email>>");
        assert_eq!(scrub_emails("...dots@lead.com"), "...<email>");
        // Only ASCII addresses: a non-ASCII local part loses just its ASCII tail.
        assert_eq!(scrub_emails("ü-a@x.com and é@x.com"), "ü<email> and é@x.com");
        for alone in ["a@b", "@name", "x@y.z1", "x@y.c", "user@-bad.com", "user@bad-.com", "a@@b.com", "a@b..com", "@@@", "@", "éa@b"] {
            assert_eq!(scrub_emails(alone), alone);
        }
        let on = FilterConfig { scrub_emails: true, ..FilterConfig::default() };
        assert_eq!(clean_and_filter("write to  a@b.com  now", &on).unwrap(), "write to <email> now");
        assert_eq!(clean_and_filter("write to a@b.com", &FilterConfig::default()).unwrap(), "write to a@b.com");
    }

    #[test]
    fn ipv4_addresses_are_scrubbed_and_look_alikes_left_alone() {
        assert_eq!(scrub_ips("from 192.168.0.1 and 10.0.0.255."), "from <ip> and <ip>.");
        assert_eq!(scrub_ips("http://1.2.3.4:8080/x (8.8.8.8)"), "http://<ip>:8080/x (<ip>)");
        for alone in ["v1.2.3.4.5", "1.2.3.4.5", "v1.2.3.4", "1.2.3.256", "1.2.3", "1.2.3.4a", "1.2.3.4_", "3.14", "1234.1.1.1", "1..2.3.4"]
        {
            assert_eq!(scrub_ips(alone), alone);
        }
    }

    #[test]
    fn ipv6_addresses_are_scrubbed_and_look_alikes_left_alone() {
        assert_eq!(scrub_ips("host 2001:db8:85a3:0:0:8a2e:370:7334 up"), "host <ip> up");
        assert_eq!(scrub_ips("at 2001:db8::ff00:42:8329."), "at <ip>.");
        assert_eq!(scrub_ips("mapped ::ffff:192.0.2.128 here"), "mapped <ip> here");
        assert_eq!(scrub_ips("addr:fe80::1:2:3, next"), "addr:<ip>, next");
        assert_eq!(scrub_ips("[2001:db8::1:2]:443"), "[<ip>]:443");
        for alone in [
            "12:30:45",
            "::1",
            "fe80::1",
            "a::b",
            "std::vec",
            "1::2::3::4",
            "00:1a:2b:3c:4d:5e",
            "deadbeef",
            "1:2:3:4:5:6:7:8:9",
            "g::1:2:3",
        ] {
            assert_eq!(scrub_ips(alone), alone);
        }
        let on = FilterConfig { scrub_ips: true, ..FilterConfig::default() };
        assert_eq!(clean_and_filter("ping 127.0.0.1 and 2001:db8::1:2", &on).unwrap(), "ping <ip> and <ip>");
        assert_eq!(clean_and_filter("ping 127.0.0.1", &FilterConfig::default()).unwrap(), "ping 127.0.0.1");
    }

    #[test]
    fn the_base_text_passes_every_gopher_rule() {
        passes(&base(), &gopher());
        // With the rules off, short, repetitive text passes.
        passes("spam spam spam spam", &FilterConfig::default());
    }

    #[test]
    fn gopher_word_count() {
        fails(&paragraphs(&prose(4, 10, 1)), &gopher(), DropReason::GopherWordCount); // 40 words
        passes(&paragraphs(&prose(6, 10, 1)), &gopher());
        let mut few = gopher();
        few.gopher_rules.max_words = 100;
        // 120 words.
        fails(&base(), &few, DropReason::GopherWordCount);
        // Punctuation-only tokens are not words: 50 words plus 10 dashes is 50 words.
        let mut text = prose(5, 10, 2).join("\n");
        text.push_str(&" -".repeat(10));
        let mut exact = gopher();
        exact.gopher_rules.min_words = 51;
        fails(&text, &exact, DropReason::GopherWordCount);
        exact.gopher_rules.min_words = 50;
        passes(&text, &exact);
    }

    #[test]
    fn gopher_mean_word_length() {
        let short = (0..60).map(|i| ["a", "an", "to", "of"][i % 4]).collect::<Vec<_>>().join(" ");
        fails(&short, &gopher(), DropReason::GopherMeanWordLength);
        let long = (0..60).map(|i| format!("extraordinarily{}", VOCABULARY[i % VOCABULARY.len()])).collect::<Vec<_>>().join(" ");
        fails(&long, &gopher(), DropReason::GopherMeanWordLength);
        passes(&base(), &gopher());
    }

    #[test]
    fn gopher_symbol_ratio() {
        let mut lines = prose(12, 10, 3);
        for line in lines.iter_mut().take(2) {
            line.push_str(" #tag");
        }
        passes(&paragraphs(&lines), &gopher());
        for line in lines.iter_mut() {
            line.push_str(" #tag #tag");
        }
        fails(&paragraphs(&lines), &gopher(), DropReason::GopherSymbolRatio);
        // Ellipses inside lines count too.
        let mut lines = prose(12, 10, 3);
        for line in lines.iter_mut() {
            line.insert_str(0, "well... so… ");
        }
        fails(&paragraphs(&lines), &gopher(), DropReason::GopherSymbolRatio);
    }

    #[test]
    fn gopher_ellipsis_lines() {
        let mut lines = prose(10, 10, 4);
        for line in lines.iter_mut().take(3) {
            line.push_str("..");
        }
        passes(&paragraphs(&lines), &gopher()); // 3 of 10 lines: not above 0.3
        lines[3].push('…');
        fails(&paragraphs(&lines), &gopher(), DropReason::GopherEllipsisLines);
    }

    #[test]
    fn gopher_bullet_lines() {
        let mut lines = prose(10, 10, 5);
        for line in lines.iter_mut().take(9) {
            line.insert_str(0, "- ");
        }
        passes(&lines.join("\n"), &gopher()); // 9 of 10: not above 0.9
        lines[9].insert_str(0, "• ");
        fails(&lines.join("\n"), &gopher(), DropReason::GopherBulletLines);
    }

    #[test]
    fn gopher_alphabetic_words() {
        let mut rng = Lcg(6);
        let mut lines = prose(10, 10, 6);
        for line in lines.iter_mut().take(1) {
            line.push_str(" 1914 2024");
        }
        passes(&paragraphs(&lines), &gopher());
        for line in lines.iter_mut() {
            line.push_str(&format!(" {} {} 7", rng.next(10_000), rng.next(10_000)));
        }
        fails(&paragraphs(&lines), &gopher(), DropReason::GopherAlphabeticWords);
    }

    #[test]
    fn gopher_duplicate_lines() {
        let mut lines = prose(12, 10, 8);
        lines.insert(5, "Thank you.".into());
        lines.insert(9, "Thank you.".into());
        passes(&lines.join("\n"), &gopher());
        // Many short repeated lines: a small share of the characters, but 5 of 15 lines.
        let mut lines = prose(9, 10, 8);
        for at in [1, 3, 5, 7, 9, 11] {
            lines.insert(at, "Yes.".into());
        }
        fails(&lines.join("\n"), &gopher(), DropReason::GopherDuplicateLines);
        // Few long repeated lines: 3 of 12 lines, but a quarter of the characters.
        let mut lines = prose(9, 10, 8);
        for _ in 0..3 {
            lines.push(lines[0].clone());
        }
        fails(&lines.join("\n"), &gopher(), DropReason::GopherDuplicateLines);
    }

    #[test]
    fn gopher_duplicate_paragraphs() {
        let body = prose(8, 10, 9).join("\n");
        let text = |copies: usize| {
            let mut parts = vec!["Chapter one.".to_string(), body.clone(), "Chapter one.".to_string()];
            parts.extend((0..copies).map(|i| format!("Section {i} ends here now.")));
            parts.join("\n\n")
        };
        // One repeated paragraph of four: not above 0.3.
        passes(&text(1), &gopher());
        // One of three: its line is one of ten lines, but one of three paragraphs.
        fails(&text(0), &gopher(), DropReason::GopherDuplicateParagraphs);
    }

    #[test]
    fn gopher_top_ngrams() {
        let mut rng = Lcg(10);
        let lines: Vec<String> = prose(12, 10, 10)
            .into_iter()
            .map(|line| {
                // "the cat" before most words: one 2-gram covers a quarter of the text.
                line.split(' ').map(|w| if rng.next(10) < 4 { format!("the cat {w}") } else { w.to_string() }).collect::<Vec<_>>().join(" ")
            })
            .collect();
        fails(&paragraphs(&lines), &gopher(), DropReason::GopherTopNgrams);
        passes(&base(), &gopher());
    }

    #[test]
    fn gopher_duplicate_ngrams() {
        let phrase = "crimson lanterns drifted across evening waters";
        let text = |copies: usize| {
            let mut lines = prose(12, 10, 11);
            for i in 0..copies {
                lines[i * 3].push_str(&format!(" {phrase}"));
            }
            paragraphs(&lines)
        };
        passes(&text(2), &gopher());
        fails(&text(4), &gopher(), DropReason::GopherDuplicateNgrams);
    }

    #[test]
    fn ngram_rules_can_be_turned_off() {
        let text = "alpha beta gamma delta epsilon. ".repeat(30);
        fails(&text, &gopher(), DropReason::GopherTopNgrams);
        let mut config = gopher();
        config.gopher_rules.max_top_2gram_char_fraction = 0.0;
        config.gopher_rules.max_top_3gram_char_fraction = 0.0;
        config.gopher_rules.max_top_4gram_char_fraction = 0.0;
        fails(&text, &config, DropReason::GopherDuplicateNgrams);
    }

    #[test]
    fn a_long_document_is_checked_in_linear_time() {
        // 2 MB of varied text with every rule on (word limit lifted): seconds, not hours.
        let mut config = FilterConfig { gopher: true, scrub_emails: true, scrub_ips: true, ..FilterConfig::default() };
        config.gopher_rules.max_words = 0;
        let text = paragraphs(&prose(30_000, 10, 12));
        let started = std::time::Instant::now();
        let result = clean_and_filter(&text, &config);
        assert!(result.is_ok() || result == Err(DropReason::GopherDuplicateNgrams), "{result:?}");
        assert!(started.elapsed().as_secs() < 30, "{:?}", started.elapsed());
        // Pathological scrubber input: thousands of '@' and ':' without an address.
        let nasty = "a@".repeat(50_000) + &"1:".repeat(50_000) + &"1.".repeat(50_000);
        assert_eq!(scrub_ips(&scrub_emails(&nasty)), nasty);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // Bytes drawn mostly from the characters the scanners and rules care about, plus
        // arbitrary ones (decoded lossily, so invalid UTF-8 becomes U+FFFD).
        const INTERESTING: &[u8] = b"@.:-#*a1fF9 \n\n\t\r_%+0255";
        let mut config = FilterConfig { gopher: true, scrub_emails: true, scrub_ips: true, ..FilterConfig::default() };
        config.gopher_rules.min_words = 0;
        config.gopher_rules.min_mean_word_length = 0.0;
        config.gopher_rules.min_alphabetic_word_fraction = 0.0;
        let mut rng = Lcg(13);
        for _ in 0..3_000 {
            let len = rng.next(120);
            let bytes: Vec<u8> =
                (0..len).map(|_| if rng.next(4) == 0 { rng.next(256) as u8 } else { INTERESTING[rng.next(INTERESTING.len())] }).collect();
            let text = String::from_utf8_lossy(&bytes);
            let _ = clean_and_filter(&text, &config);
            let _ = clean_and_filter(&text, &gopher());
            let _ = clean_and_filter(&text, &FilterConfig { normalize_unicode: false, ..config.clone() });
            // Scrubbing only ever replaces ASCII runs, so the rest of the text survives.
            let scrubbed = scrub_ips(&scrub_emails(&text));
            assert_eq!(scrubbed.chars().filter(|c| !c.is_ascii()).count(), text.chars().filter(|c| !c.is_ascii()).count());
        }
    }
}
