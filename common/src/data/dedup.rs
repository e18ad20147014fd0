//! De-duplication across documents (`data.filters.exact_dedup`, `data.filters.near_dedup`).
//!
//! - [`ExactDedup`]: a set of 128-bit hashes of cleaned texts.
//! - [`MinHasher`]: a document's MinHash signature; pure, so worker threads compute them in
//!   parallel.
//! - [`NearDedupIndex`]: locality-sensitive hashing over signatures, fed in document order by
//!   one thread, so the first copy of a near-duplicate is the one kept whatever the thread
//!   count.
//!
//! The first copy of a duplicate is always the one kept, as in `prepare`'s exact de-duplication.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use troupe_core::config::MinHashConfig;

/// Exact duplicates: a 128-bit hash of the cleaned text (first copy kept).
///
/// The hash is SHA-256 cut to 128 bits: documents are untrusted, and with a fast
/// non-cryptographic hash anyone could write a document that collides with another and so
/// silently removes it. 16 bytes per document (plus the set's overhead) stay in memory.
#[derive(Debug, Default)]
pub struct ExactDedup {
    seen: HashSet<u128>,
}

impl ExactDedup {
    pub fn new() -> Self {
        ExactDedup::default()
    }

    /// True if `text` was seen before (and records it otherwise).
    pub fn seen(&mut self, text: &str) -> bool {
        self.seen_sha256(&Sha256::digest(text.as_bytes()).into())
    }

    /// [`seen`](Self::seen) for a text whose SHA-256 a worker thread has already computed.
    pub fn seen_sha256(&mut self, sha256: &[u8; 32]) -> bool {
        let mut first = [0u8; 16];
        first.copy_from_slice(&sha256[..16]);
        !self.seen.insert(u128::from_le_bytes(first))
    }

    /// Distinct texts recorded.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// MinHash signatures: computed per document in parallel worker threads (pure, Send + Sync).
///
/// Words are whitespace-separated tokens, lowercased, without the punctuation around them
/// (tokens of punctuation only are skipped); a shingle is `shingle_words` consecutive words
/// (a document with fewer words is one shingle of all of them). Each distinct shingle is
/// hashed once to 64 bits; permutation `i` maps a shingle hash `h` to the high 32 bits of
/// `a_i * h + b_i` (wrapping u64 arithmetic, `a_i` odd: multiply-shift hashing), and entry
/// `i` of the signature is the minimum over the shingles. Two documents agree on an entry
/// with probability equal to the Jaccard similarity of their shingle sets.
///
/// All hashing is written out here (FNV-1a and a fixed mixer), not std's `DefaultHasher`,
/// whose output may change between Rust releases: the same corpus and seed always drop the
/// same documents.
#[derive(Debug, Clone)]
pub struct MinHasher {
    shingle_words: usize,
    /// `(a_i, b_i)` of each permutation.
    permutations: Vec<(u64, u64)>,
}

impl MinHasher {
    pub fn new(config: &MinHashConfig, seed: u64) -> Self {
        let mut state = seed;
        let mut next = move || {
            // SplitMix64's sequence: consecutive states are spread over all 64 bits.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            mix(state)
        };
        let permutations = (0..config.permutations).map(|_| (next() | 1, next())).collect();
        MinHasher { shingle_words: config.shingle_words.max(1), permutations }
    }

    /// Entries of each signature.
    pub fn permutations(&self) -> usize {
        self.permutations.len()
    }

    /// The MinHash signature of `text`. Texts without words (empty, or punctuation only) all
    /// get the same signature, every entry `u32::MAX`, so they are near-duplicates of one
    /// another.
    pub fn signature(&self, text: &str) -> Vec<u32> {
        let mut signature = vec![u32::MAX; self.permutations.len()];
        let words: Vec<u64> = text.split_whitespace().filter_map(word_hash).collect();
        if words.is_empty() {
            return signature;
        }
        let mut shingles: Vec<u64> = words.windows(self.shingle_words.min(words.len())).map(shingle_hash).collect();
        // A repeated shingle cannot lower a minimum twice; hashing it again would only cost time.
        shingles.sort_unstable();
        shingles.dedup();
        for h in shingles {
            for (entry, &(a, b)) in signature.iter_mut().zip(&self.permutations) {
                let value = (a.wrapping_mul(h).wrapping_add(b) >> 32) as u32;
                *entry = (*entry).min(value);
            }
        }
        signature
    }
}

/// The hash of a word, lowercased and without surrounding punctuation; `None` for a token
/// of punctuation only.
fn word_hash(token: &str) -> Option<u64> {
    let word = token.trim_matches(|c: char| !c.is_alphanumeric());
    if word.is_empty() {
        return None;
    }
    let mut h = FNV_OFFSET;
    let mut utf8 = [0u8; 4];
    for c in word.chars().flat_map(char::to_lowercase) {
        h = fnv1a(h, c.encode_utf8(&mut utf8).as_bytes());
    }
    Some(mix(h))
}

/// An order-sensitive hash of a shingle's word hashes.
fn shingle_hash(words: &[u64]) -> u64 {
    words.iter().fold(mix(words.len() as u64), |h, &w| mix(h ^ w))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a: continues hash `h` over `bytes`.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// FNV-1a over `bytes`, then [`mix`]: a stable 64-bit hash with every output bit depending on
/// every input bit.
pub(crate) fn hash_bytes(bytes: &[u8]) -> u64 {
    mix(fnv1a(FNV_OFFSET, bytes))
}

/// A 64-bit finaliser (xor-shift and multiply rounds, as in SplitMix64). It is a bijection, so
/// chaining `mix(previous ^ next)` gives an order-sensitive hash of a sequence.
pub(crate) fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Numbers the scratch files of the indexes of this process.
static NEXT_SCRATCH_FILE: AtomicU64 = AtomicU64::new(0);

/// LSH index over signatures, fed in document order by one thread (so the first copy is the
/// one kept, whatever the thread count).
///
/// Signatures are cut into `bands` bands of `rows = permutations / bands` entries. A pair of
/// documents with Jaccard similarity `s` shares at least one band with probability
/// `1 - (1 - s^rows)^bands`, which climbs steeply around `(1 / bands)^(bands / permutations)`
/// ([`MinHashConfig::lsh_threshold`]; 0.67 for the default 112 permutations in 16 bands).
/// Such a candidate is confirmed by comparing whole signatures: it is a duplicate when the
/// share of equal entries (an unbiased estimate of `s`) is at least `threshold`.
///
/// Memory: per kept document and band, one entry of a hash map from the band's 64-bit hash
/// (band number mixed in) to the number of the first document with it: 17 bytes a slot at a
/// load of 7/16 to 7/8, so 300-600 bytes per document with 16 bands. The full signatures (4 bytes per permutation) go to
/// a scratch file and are read back, with positioned reads, only to confirm a candidate; the
/// file is removed when the index is dropped.
#[derive(Debug)]
pub struct NearDedupIndex {
    permutations: usize,
    rows: usize,
    threshold: f64,
    /// Band hash → number of the first kept document with that band.
    bands: HashMap<u64, u32>,
    /// Signature `n` is at byte `n * permutations * 4`, little-endian u32s.
    signatures: BufWriter<File>,
    path: PathBuf,
    documents: usize,
    /// Documents whose signature has reached the file (not just the writer's buffer).
    flushed: usize,
    /// Reused for reading a candidate's signature back.
    read_buffer: Vec<u8>,
    /// Set by an I/O error: the file may then hold a partial signature, which would shift
    /// every later one, so the index refuses further work rather than answer wrongly.
    failed: bool,
}

impl NearDedupIndex {
    /// An empty index whose scratch file goes to `scratch_dir` (created if missing).
    pub fn new(config: &MinHashConfig, scratch_dir: &Path) -> io::Result<Self> {
        if config.permutations == 0 || config.bands == 0 || !config.permutations.is_multiple_of(config.bands) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("minhash: {} permutations do not split into {} whole bands", config.permutations, config.bands),
            ));
        }
        fs::create_dir_all(scratch_dir)?;
        let number = NEXT_SCRATCH_FILE.fetch_add(1, Ordering::Relaxed);
        let path = scratch_dir.join(format!("minhash-signatures-{}-{number}.bin", std::process::id()));
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        Ok(NearDedupIndex {
            permutations: config.permutations,
            rows: config.permutations / config.bands,
            threshold: config.threshold,
            bands: HashMap::new(),
            signatures: BufWriter::with_capacity(1 << 20, file),
            path,
            documents: 0,
            flushed: 0,
            read_buffer: vec![0; config.permutations * 4],
            failed: false,
        })
    }

    /// True if `signature` is a near-duplicate of a document inserted before (an LSH
    /// candidate whose estimated Jaccard >= threshold); otherwise inserts it and returns false.
    ///
    /// Only the first document with a given band is remembered for it, so a document is
    /// compared with at most `bands` earlier ones, whatever the corpus size.
    pub fn is_duplicate_or_insert(&mut self, signature: &[u32]) -> io::Result<bool> {
        if self.failed {
            return Err(io::Error::other("the near-duplicate index failed earlier and cannot be used"));
        }
        if signature.len() != self.permutations {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a signature of {} entries given to an index of {} permutations", signature.len(), self.permutations),
            ));
        }
        let result = self.check_and_insert(signature);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn check_and_insert(&mut self, signature: &[u32]) -> io::Result<bool> {
        let keys: Vec<u64> = signature.chunks(self.rows).enumerate().map(|(band, rows)| band_hash(band, rows)).collect();
        let mut compared: Vec<u32> = Vec::new();
        for key in &keys {
            let Some(&candidate) = self.bands.get(key) else {
                continue;
            };
            if compared.contains(&candidate) {
                continue;
            }
            compared.push(candidate);
            if self.similarity(candidate, signature)? >= self.threshold {
                return Ok(true);
            }
        }

        let number =
            u32::try_from(self.documents).map_err(|_| io::Error::other("the near-duplicate index holds 2^32 documents, its most"))?;
        let bytes: Vec<u8> = signature.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.signatures.write_all(&bytes)?;
        for key in keys {
            self.bands.entry(key).or_insert(number);
        }
        self.documents += 1;
        Ok(false)
    }

    /// The share of equal entries of `signature` and that of document `candidate`.
    fn similarity(&mut self, candidate: u32, signature: &[u32]) -> io::Result<f64> {
        let candidate = candidate as usize;
        if candidate >= self.flushed {
            self.signatures.flush()?;
            self.flushed = self.documents;
        }
        let offset = (candidate as u64) * (self.permutations as u64) * 4;
        self.signatures.get_ref().read_exact_at(&mut self.read_buffer, offset)?;
        let equal = self
            .read_buffer
            .chunks_exact(4)
            .zip(signature)
            .filter(|(stored, &value)| u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]) == value)
            .count();
        Ok(equal as f64 / self.permutations as f64)
    }

    /// Documents inserted (kept).
    pub fn documents(&self) -> usize {
        self.documents
    }

    /// Approximate bytes of memory the index holds (for reports).
    pub fn memory_bytes(&self) -> usize {
        // hashbrown stores the entries and one control byte per slot.
        self.bands.capacity() * (std::mem::size_of::<(u64, u32)>() + 1) + self.signatures.capacity() + self.read_buffer.capacity()
    }
}

impl Drop for NearDedupIndex {
    fn drop(&mut self) {
        // The writer's last flush then goes to the unlinked file, which is harmless.
        let _ = fs::remove_file(&self.path);
    }
}

/// The hash of one band of a signature, with the band number mixed in so that equal values
/// in different bands do not collide.
fn band_hash(band: usize, rows: &[u32]) -> u64 {
    rows.iter().fold(mix(band as u64 ^ 0x5851_f42d_4c95_7f2d), |h, &r| mix(h ^ u64::from(r)))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::data::corpus::tests::Lcg;

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("troupe-dedup-test-{name}-{}", std::process::id()))
    }

    /// An index whose scratch file goes straight to the temporary folder (and leaves nothing
    /// behind when dropped).
    fn index() -> NearDedupIndex {
        NearDedupIndex::new(&MinHashConfig::default(), &std::env::temp_dir()).unwrap()
    }

    /// `count` made-up words of 3-10 letters.
    fn vocabulary(count: usize, rng: &mut Lcg) -> Vec<String> {
        const CONSONANTS: &[u8] = b"bcdfghjklmnprstvwz";
        const VOWELS: &[u8] = b"aeiou";
        (0..count)
            .map(|_| {
                let letters = 3 + rng.next(8);
                (0..letters)
                    .map(|i| if i % 2 == 0 { CONSONANTS[rng.next(CONSONANTS.len())] } else { VOWELS[rng.next(VOWELS.len())] } as char)
                    .collect()
            })
            .collect()
    }

    fn document(words: usize, vocabulary: &[String], rng: &mut Lcg) -> Vec<String> {
        (0..words).map(|_| vocabulary[rng.next(vocabulary.len())].clone()).collect()
    }

    #[test]
    fn exact_dedup_keeps_the_first_copy() {
        let mut exact = ExactDedup::new();
        assert!(exact.is_empty());
        assert!(!exact.seen("to be or not to be"));
        assert!(!exact.seen("to be or not to be."));
        assert!(exact.seen("to be or not to be"));
        assert!(!exact.seen(""));
        assert!(exact.seen(""));
        assert!(exact.seen_sha256(&Sha256::digest(b"to be or not to be").into()));
        assert!(!exact.seen_sha256(&[7; 32]));
        assert_eq!(exact.len(), 4);
    }

    #[test]
    fn identical_texts_are_duplicates_and_different_ones_are_not() {
        let hasher = MinHasher::new(&MinHashConfig::default(), 1);
        let mut index = index();
        let mut rng = Lcg(2);
        let words = vocabulary(5_000, &mut rng);
        let a = document(400, &words, &mut rng).join(" ");
        let b = document(400, &words, &mut rng).join(" ");
        assert!(!index.is_duplicate_or_insert(&hasher.signature(&a)).unwrap());
        // Read back while still in the writer's buffer, and again after a flush.
        assert!(index.is_duplicate_or_insert(&hasher.signature(&a)).unwrap());
        assert!(!index.is_duplicate_or_insert(&hasher.signature(&b)).unwrap());
        assert!(index.is_duplicate_or_insert(&hasher.signature(&a)).unwrap());
        assert!(index.is_duplicate_or_insert(&hasher.signature(&b)).unwrap());
        // Case and punctuation around words do not matter; a short text is one shingle.
        assert!(index.is_duplicate_or_insert(&hasher.signature(&a.to_uppercase().replace(' ', ", "))).unwrap());
        assert!(!index.is_duplicate_or_insert(&hasher.signature("Hello, world!")).unwrap());
        assert!(index.is_duplicate_or_insert(&hasher.signature("hello world")).unwrap());
        assert!(!index.is_duplicate_or_insert(&hasher.signature("hello there world")).unwrap());
        assert_eq!(index.documents(), 4);
        assert!(index.memory_bytes() > 0);
    }

    #[test]
    fn signatures_are_stable_and_the_same_from_any_thread() {
        let hasher = MinHasher::new(&MinHashConfig::default(), 7);
        assert_eq!(hasher.permutations(), 112);
        let text = "The quick brown fox jumps over the lazy dog";
        let signature = hasher.signature(text);
        // Pinned: the hashing is our own, so a change here means a change of which documents
        // a corpus loses.
        assert_eq!(&signature[..4], &[667_843_066, 359_181_453, 1_505_073_117, 1_211_875_580]);
        assert_eq!(hasher.signature(""), vec![u32::MAX; 112]);
        assert_eq!(hasher.signature("-- ... !!"), vec![u32::MAX; 112]);
        let from_threads: Vec<Vec<u32>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4).map(|_| scope.spawn(|| hasher.signature(text))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(from_threads.iter().all(|s| *s == signature));
        fn send_sync<T: Send + Sync>() {}
        send_sync::<MinHasher>();
        assert_ne!(MinHasher::new(&MinHashConfig::default(), 8).signature(text), signature);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut index = index();
        assert_eq!(index.is_duplicate_or_insert(&[1, 2, 3]).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let uneven = MinHashConfig { permutations: 100, bands: 16, ..MinHashConfig::default() };
        assert_eq!(NearDedupIndex::new(&uneven, &scratch("bad-input")).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn the_scratch_file_is_removed_on_drop() {
        let dir = scratch("drop");
        let mut index = NearDedupIndex::new(&MinHashConfig::default(), &dir).unwrap();
        index.is_duplicate_or_insert(&[5; 112]).unwrap();
        let path = index.path.clone();
        assert!(path.starts_with(&dir) && path.exists());
        let second = NearDedupIndex::new(&MinHashConfig::default(), &dir).unwrap();
        assert_ne!(second.path, path, "two indexes share no file");
        drop(index);
        assert!(!path.exists());
        drop(second);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        let _ = fs::remove_dir(&dir);
    }

    /// The acceptance test: 2,000 distinct documents of 300-600 words from 20,000
    /// made-up words, and 200 of them copied with 2% of their words replaced, each copy at a
    /// random later position. The default configuration must flag at least 95% of the copies
    /// and under 1% of the distinct documents.
    #[test]
    fn planted_near_duplicates_are_found() {
        const DISTINCT: usize = 2_000;
        const COPIES: usize = 200;
        let mut rng = Lcg(2021);
        let words = vocabulary(20_000, &mut rng);
        let originals: Vec<Vec<String>> = (0..DISTINCT).map(|_| document(300 + rng.next(301), &words, &mut rng)).collect();

        // (sort key, text, is a planted copy): a copy of document i gets a key after i's.
        let mut corpus: Vec<(usize, String, bool)> = originals.iter().enumerate().map(|(i, doc)| (2 * i, doc.join(" "), false)).collect();
        let mut copied = HashSet::new();
        while copied.len() < COPIES {
            let i = rng.next(DISTINCT);
            if !copied.insert(i) {
                continue;
            }
            let mut copy = originals[i].clone();
            let changes = (copy.len() as f64 * 0.02).round() as usize;
            for _ in 0..changes {
                let at = rng.next(copy.len());
                copy[at] = words[rng.next(words.len())].clone();
            }
            let after = i + rng.next(DISTINCT - i);
            corpus.push((2 * after + 1, copy.join(" "), true));
        }
        corpus.sort_by_key(|(key, _, _)| *key);

        let config = MinHashConfig::default();
        let hasher = MinHasher::new(&config, 42);
        let mut index = index();
        let (mut copies_flagged, mut distinct_flagged) = (0, 0);
        for (_, text, is_copy) in &corpus {
            let duplicate = index.is_duplicate_or_insert(&hasher.signature(text)).unwrap();
            match (duplicate, is_copy) {
                (true, true) => copies_flagged += 1,
                (true, false) => distinct_flagged += 1,
                _ => {}
            }
        }
        let copy_rate = copies_flagged as f64 / COPIES as f64;
        let false_rate = distinct_flagged as f64 / DISTINCT as f64;
        println!(
            "planted copies flagged: {copies_flagged}/{COPIES} ({:.1}%); distinct documents flagged: {distinct_flagged}/{DISTINCT} ({:.2}%); \
             index memory {} KiB",
            100.0 * copy_rate,
            100.0 * false_rate,
            index.memory_bytes() / 1024
        );
        assert!(copy_rate >= 0.95, "only {copies_flagged} of {COPIES} planted near-duplicates found");
        assert!(false_rate < 0.01, "{distinct_flagged} of {DISTINCT} distinct documents flagged");
        assert_eq!(index.documents(), DISTINCT + COPIES - copies_flagged - distinct_flagged);
    }
}
