//! Token files: flat arrays of little-endian token ids (`u16`, or `u32` for vocabularies above
//! 65,536), read through memory maps so a worker touches only the pages its samples live on.
//!
//! A [`TokenFile`] is one logical stream over one or more shard files, in order: a sample
//! window may span the end of one shard and the start of the next, exactly as if the shards
//! were one file. The sampler and its exactly-once guarantee see only the stream.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::error::{DataError, DataResult};

/// How ids are stored: the narrowest type that holds every id of the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// `u16` up to 65,536 ids, `u32` above.
    pub fn for_vocab(vocab_size: usize) -> TokenDtype {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }

    /// Appends `id` in this type's little-endian layout (the caller checked it fits).
    pub fn push(self, id: u32, out: &mut Vec<u8>) {
        match self {
            TokenDtype::U16 => out.extend_from_slice(&(id as u16).to_le_bytes()),
            TokenDtype::U32 => out.extend_from_slice(&id.to_le_bytes()),
        }
    }
}

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Position of the shard's first token in the stream.
    start: usize,
    tokens: usize,
}

pub struct TokenFile {
    shards: Vec<Shard>,
    dtype: TokenDtype,
    len: usize,
    /// For chat and instruction data: a parallel stream, 1 where the token is trained on as a
    /// target (an assistant's answer) and 0 where it is not (prompts, padding).
    mask: Option<Box<TokenFile>>,
}

impl TokenFile {
    /// One file of u16 ids (the layout of format-1 prepared folders).
    pub fn open(path: &Path) -> DataResult<Self> {
        Self::open_shards(&[path.to_path_buf()], TokenDtype::U16)
    }

    /// The stream over `paths`, in order, each holding ids of `dtype`.
    pub fn open_shards(paths: &[PathBuf], dtype: TokenDtype) -> DataResult<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut start = 0usize;
        for path in paths {
            let file = File::open(path).map_err(|e| DataError::io("open the token file", path, e))?;
            // SAFETY: the map is read-only and token files are written once, into a temporary
            // folder that is renamed into place; nothing truncates or rewrites them while mapped.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io("memory-map", path, e))?;
            if map.len() % dtype.bytes() != 0 {
                return Err(DataError::BadTokenFile {
                    path: path.clone(),
                    reason: format!("its length {} bytes is not a whole number of {dtype:?} ids", map.len()),
                });
            }
            let tokens = map.len() / dtype.bytes();
            shards.push(Shard { path: path.clone(), map, start, tokens });
            start += tokens;
        }
        Ok(TokenFile { shards, dtype, len: start, mask: None })
    }

    /// This stream with its loss mask (the same length).
    pub fn with_mask(mut self, mask: TokenFile) -> DataResult<Self> {
        if mask.len != self.len {
            return Err(DataError::BadTokenFile {
                path: mask.path().to_path_buf(),
                reason: format!("the loss mask holds {} values for {} tokens", mask.len, self.len),
            });
        }
        self.mask = Some(Box::new(mask));
        Ok(self)
    }

    /// Whether only some tokens are trained on (see [`TokenFile::with_mask`]).
    pub fn is_masked(&self) -> bool {
        self.mask.is_some()
    }

    /// The loss mask over `[start, start + len)`: whether each token is a trained target (all
    /// true without a mask).
    pub fn trained(&self, start: usize, len: usize) -> DataResult<Vec<bool>> {
        match &self.mask {
            Some(mask) => Ok(mask.window(start, len)?.into_iter().map(|m| m != 0).collect()),
            None => Ok(vec![true; len]),
        }
    }

    /// Number of tokens in the whole stream.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first shard's path (the file, for a one-file stream), for messages.
    pub fn path(&self) -> &Path {
        self.shards.first().map_or(Path::new(""), |s| &s.path)
    }

    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Tokens `[start, start + len)`, widened to i64 (what the model's embedding takes).
    pub fn window(&self, start: usize, len: usize) -> DataResult<Vec<i64>> {
        let mut out = Vec::with_capacity(len.min(self.len()));
        self.extend_window(start, len, &mut out)?;
        Ok(out)
    }

    pub(crate) fn extend_window(&self, start: usize, len: usize, out: &mut Vec<i64>) -> DataResult<()> {
        let out_of_bounds = || DataError::OutOfBounds { path: self.path().to_path_buf(), start, len, available: self.len };
        let end = start.checked_add(len).ok_or_else(out_of_bounds)?;
        if end > self.len {
            return Err(out_of_bounds());
        }
        // The shard holding `start`: the last one starting at or before it.
        let mut index = self.shards.partition_point(|s| s.start <= start).saturating_sub(1);
        let mut at = start;
        while at < end {
            let shard = &self.shards[index];
            let (from, to) = (at - shard.start, (end - shard.start).min(shard.tokens));
            let bytes = &shard.map[from * self.dtype.bytes()..to * self.dtype.bytes()];
            match self.dtype {
                TokenDtype::U16 => out.extend(bytes.chunks_exact(2).map(|b| i64::from(u16::from_le_bytes([b[0], b[1]])))),
                TokenDtype::U32 => out.extend(bytes.chunks_exact(4).map(|b| i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))),
            }
            at = shard.start + to;
            index += 1;
        }
        Ok(())
    }
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile").field("first", &self.path()).field("shards", &self.shards.len()).field("tokens", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::corpus::tests::scratch_dir;

    fn write_tokens(path: &Path, ids: &[u32], dtype: TokenDtype) {
        let mut bytes = Vec::new();
        for &id in ids {
            dtype.push(id, &mut bytes);
        }
        std::fs::write(path, bytes).ok();
    }

    #[test]
    fn windows_read_little_endian_ids() -> DataResult<()> {
        let dir = scratch_dir("tokens");
        let path = dir.join("t.bin");
        write_tokens(&path, &[1, 2, 300, 65535, 7], TokenDtype::U16);
        let tokens = TokenFile::open(&path)?;
        assert_eq!(tokens.len(), 5);
        assert_eq!(tokens.window(0, 5)?, vec![1, 2, 300, 65535, 7]);
        assert_eq!(tokens.window(2, 2)?, vec![300, 65535]);
        assert_eq!(tokens.window(5, 0)?, Vec::<i64>::new());
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn a_stream_of_shards_reads_like_one_file_across_their_boundaries() -> DataResult<()> {
        let dir = scratch_dir("tokens-shards");
        let ids: Vec<u32> = (0..40).map(|i| 70_000 + i).collect();
        // Shards of 7, 0 (empty), 13 and 20 ids, u32 (ids above 65,535).
        let cuts = [0, 7, 7, 20, 40];
        let paths: Vec<PathBuf> = (0..4).map(|i| dir.join(format!("s{i}.bin"))).collect();
        for (i, path) in paths.iter().enumerate() {
            write_tokens(path, &ids[cuts[i]..cuts[i + 1]], TokenDtype::U32);
        }
        let tokens = TokenFile::open_shards(&paths, TokenDtype::U32)?;
        assert_eq!((tokens.len(), tokens.shards()), (40, 4));
        for start in 0..40 {
            for len in 0..=(40 - start) {
                let want: Vec<i64> = ids[start..start + len].iter().map(|&i| i64::from(i)).collect();
                assert_eq!(tokens.window(start, len)?, want, "window {start}+{len}");
            }
        }
        assert!(matches!(tokens.window(35, 6), Err(DataError::OutOfBounds { .. })));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn out_of_bounds_windows_are_errors_not_panics() -> DataResult<()> {
        let dir = scratch_dir("tokens-oob");
        let path = dir.join("t.bin");
        write_tokens(&path, &[1, 2, 3], TokenDtype::U16);
        let tokens = TokenFile::open(&path)?;
        assert!(matches!(tokens.window(2, 2), Err(DataError::OutOfBounds { .. })));
        assert!(matches!(tokens.window(4, 0), Err(DataError::OutOfBounds { .. })));
        assert!(matches!(tokens.window(usize::MAX, 2), Err(DataError::OutOfBounds { .. })));
        assert!(matches!(tokens.window(1, usize::MAX), Err(DataError::OutOfBounds { .. })));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn odd_length_and_empty_files() -> DataResult<()> {
        let dir = scratch_dir("tokens-odd");
        let odd = dir.join("odd.bin");
        std::fs::write(&odd, [1u8, 2, 3]).ok();
        assert!(matches!(TokenFile::open(&odd), Err(DataError::BadTokenFile { .. })));
        assert!(matches!(TokenFile::open_shards(&[odd], TokenDtype::U32), Err(DataError::BadTokenFile { .. })));
        let empty = dir.join("empty.bin");
        std::fs::write(&empty, []).ok();
        let tokens = TokenFile::open(&empty)?;
        assert!(tokens.is_empty());
        assert!(tokens.window(0, 1).is_err());
        assert!(matches!(TokenFile::open(&dir.join("missing.bin")), Err(DataError::Io { .. })));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
