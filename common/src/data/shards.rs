//! Writing token shards: `<prefix>-00000.bin`, `<prefix>-00001.bin`, … of at most a given
//! number of tokens each, hashed (sha256) while they are written and flushed to disk when
//! finished. What was written is described by [`ShardInfo`]s, which `meta.json` lists.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{DataError, DataResult};
use super::tokens::TokenDtype;

/// One shard file of a prepared folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name inside the prepared folder.
    pub file: String,
    pub tokens: u64,
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
}

struct OpenShard {
    path: PathBuf,
    file: BufWriter<File>,
    hash: Sha256,
    tokens: u64,
}

pub struct ShardWriter {
    dir: PathBuf,
    prefix: String,
    dtype: TokenDtype,
    max_tokens: u64,
    current: Option<OpenShard>,
    done: Vec<ShardInfo>,
    buffer: Vec<u8>,
    /// Token frequencies of everything written (for the unigram entropy), when asked for.
    counts: Option<Vec<u64>>,
}

impl ShardWriter {
    /// Shards named `<prefix>-NNNNN.bin` in `dir`, of at most `max_tokens` tokens each.
    pub fn new(dir: &Path, prefix: &str, dtype: TokenDtype, max_tokens: u64) -> ShardWriter {
        ShardWriter {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            dtype,
            max_tokens: max_tokens.max(1),
            current: None,
            done: Vec::new(),
            buffer: Vec::new(),
            counts: None,
        }
    }

    /// Also counts how often each id is written, for [`ShardWriter::unigram_entropy_nats`].
    pub fn counting(mut self, vocab_size: usize) -> ShardWriter {
        self.counts = Some(vec![0; vocab_size]);
        self
    }

    /// Appends ids, starting new shards as they fill. A document may span two shards: the
    /// reader sees the shards as one stream.
    pub fn write(&mut self, ids: &[u32]) -> DataResult<()> {
        if let Some(counts) = self.counts.as_mut() {
            for &id in ids {
                if let Some(c) = counts.get_mut(id as usize) {
                    *c += 1;
                }
            }
        }
        let mut rest = ids;
        while !rest.is_empty() {
            if self.current.as_ref().is_none_or(|s| s.tokens >= self.max_tokens) {
                self.roll()?;
            }
            let shard = self.current.as_mut().expect("rolled above");
            let room = (self.max_tokens - shard.tokens) as usize;
            let (now, later) = rest.split_at(rest.len().min(room));
            self.buffer.clear();
            for &id in now {
                self.dtype.push(id, &mut self.buffer);
            }
            shard.file.write_all(&self.buffer).map_err(|e| DataError::io("write", &shard.path, e))?;
            shard.hash.update(&self.buffer);
            shard.tokens += now.len() as u64;
            rest = later;
        }
        Ok(())
    }

    fn roll(&mut self) -> DataResult<()> {
        self.close_current()?;
        let file_name = format!("{}-{:05}.bin", self.prefix, self.done.len());
        let path = self.dir.join(&file_name);
        let file = File::create(&path).map_err(|e| DataError::io("create", &path, e))?;
        self.current = Some(OpenShard { path, file: BufWriter::with_capacity(1 << 20, file), hash: Sha256::new(), tokens: 0 });
        Ok(())
    }

    fn close_current(&mut self) -> DataResult<()> {
        let Some(mut shard) = self.current.take() else { return Ok(()) };
        shard.file.flush().map_err(|e| DataError::io("write", &shard.path, e))?;
        shard.file.get_ref().sync_all().map_err(|e| DataError::io("flush to disk", &shard.path, e))?;
        let file = shard.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.done.push(ShardInfo { file, tokens: shard.tokens, sha256: hex::encode(shard.hash.finalize()) });
        Ok(())
    }

    pub fn tokens(&self) -> u64 {
        self.done.iter().map(|s| s.tokens).sum::<u64>() + self.current.as_ref().map_or(0, |s| s.tokens)
    }

    /// Entropy (nats) of the ids written so far; 0 when not counting.
    pub fn unigram_entropy_nats(&self) -> f64 {
        let Some(counts) = &self.counts else { return 0.0 };
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / total as f64;
                -p * p.ln()
            })
            .sum()
    }

    /// Flushes and describes every shard written (none if nothing was written).
    pub fn finish(mut self) -> DataResult<Vec<ShardInfo>> {
        self.close_current()?;
        Ok(self.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::corpus::tests::scratch_dir;
    use crate::data::tokens::TokenFile;

    #[test]
    fn shards_fill_up_to_their_size_and_read_back_as_one_stream() -> DataResult<()> {
        let dir = scratch_dir("shard-writer");
        let mut writer = ShardWriter::new(&dir, "train", TokenDtype::U32, 10).counting(100_000);
        let ids: Vec<u32> = (0..35).map(|i| 66_000 + i).collect();
        for doc in ids.chunks(6) {
            writer.write(doc)?;
        }
        assert_eq!(writer.tokens(), 35);
        assert!(writer.unigram_entropy_nats() > 3.0);
        let shards = writer.finish()?;
        assert_eq!(shards.iter().map(|s| s.tokens).collect::<Vec<_>>(), vec![10, 10, 10, 5]);
        assert_eq!(shards[1].file, "train-00001.bin");
        let bytes = std::fs::read(dir.join(&shards[0].file)).unwrap();
        assert_eq!(shards[0].sha256, hex::encode(Sha256::digest(&bytes)));
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(&s.file)).collect();
        let stream = TokenFile::open_shards(&paths, TokenDtype::U32)?;
        assert_eq!(stream.window(0, 35)?, ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>());
        assert!(ShardWriter::new(&dir, "empty", TokenDtype::U16, 10).finish()?.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
