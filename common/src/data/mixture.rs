//! Mixing sources by weight into one train stream.
//!
//! Each source's kept train documents were written once, in order, to its own intermediate
//! shards. The stream is as long as all of them together; source `s` gets `weight_s` of its
//! tokens. Documents are drawn one at a time from the source furthest below its share, each
//! source's documents in a seeded order that changes every pass over them: a source with
//! more weight than data is repeated (up-sampled; its `epochs` above 1), one with less is cut
//! short (down-sampled). Shares come out right to within one document.

use sha2::{Digest, Sha256};

use super::error::{DataError, DataResult};
use super::shards::ShardWriter;
use super::tokens::TokenFile;

/// One source's train documents, ready to be mixed.
pub(crate) struct MixInput {
    pub name: String,
    pub weight: f64,
    /// Its intermediate shards as one stream.
    pub tokens: TokenFile,
    /// End of each document in `tokens` (the separator included).
    pub doc_ends: Vec<u64>,
}

/// Writes the mixed stream; returns the tokens each source contributed.
pub(crate) fn mix(inputs: &[MixInput], out: &mut ShardWriter, seed: u64) -> DataResult<Vec<u64>> {
    let total: u64 = inputs.iter().map(|i| i.doc_ends.last().copied().unwrap_or(0)).sum();
    let weights: f64 = inputs.iter().map(|i| i.weight).sum();
    for input in inputs {
        if input.weight > 0.0 && input.doc_ends.is_empty() {
            return Err(DataError::InvalidOption {
                field: "sources",
                reason: format!("source {:?} has weight {} but no train documents are left after filtering", input.name, input.weight),
            });
        }
    }
    let targets: Vec<f64> = inputs.iter().map(|i| i.weight / weights * total as f64).collect();
    let mut written = vec![0u64; inputs.len()];
    let mut cursors: Vec<Cursor> = inputs.iter().enumerate().map(|(s, i)| Cursor::new(i.doc_ends.len(), seed, s)).collect();
    let mut window: Vec<i64> = Vec::new();
    let mut ids: Vec<u32> = Vec::new();
    while written.iter().sum::<u64>() < total {
        // The source furthest below its share (ties: the first).
        let Some(s) = (0..inputs.len())
            .filter(|&s| targets[s] > 0.0)
            .min_by(|&a, &b| (written[a] as f64 / targets[a]).total_cmp(&(written[b] as f64 / targets[b])))
        else {
            break;
        };
        let doc = cursors[s].next();
        let ends = &inputs[s].doc_ends;
        let start = if doc == 0 { 0 } else { ends[doc - 1] };
        let len = (ends[doc] - start) as usize;
        window.clear();
        inputs[s].tokens.extend_window(start as usize, len, &mut window)?;
        ids.clear();
        ids.extend(window.iter().map(|&id| id as u32));
        out.write(&ids)?;
        written[s] += len as u64;
    }
    Ok(written)
}

/// A source's documents in a seeded order, reshuffled at each pass.
struct Cursor {
    order: Vec<u32>,
    at: usize,
    epoch: u64,
    seed: u64,
    source: usize,
}

impl Cursor {
    fn new(documents: usize, seed: u64, source: usize) -> Cursor {
        let mut cursor = Cursor { order: (0..documents as u32).collect(), at: 0, epoch: 0, seed, source };
        cursor.shuffle();
        cursor
    }

    fn shuffle(&mut self) {
        // Fisher–Yates driven by a hash counter: the same order for the same seed, source
        // and epoch, on every platform.
        let mut state: [u8; 32] =
            Sha256::digest([self.seed.to_le_bytes(), (self.source as u64).to_le_bytes(), self.epoch.to_le_bytes()].concat()).into();
        for i in (1..self.order.len()).rev() {
            state = Sha256::digest(state).into();
            let r = u64::from_le_bytes(state[..8].try_into().expect("8 bytes"));
            self.order.swap(i, (r % (i as u64 + 1)) as usize);
        }
    }

    fn next(&mut self) -> usize {
        if self.at == self.order.len() {
            self.epoch += 1;
            self.at = 0;
            self.shuffle();
        }
        self.at += 1;
        self.order[self.at - 1] as usize
    }
}
