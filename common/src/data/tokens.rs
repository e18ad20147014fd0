//! Token files: flat arrays of little-endian u16 token ids, read through a memory map so a
//! worker touches only the pages its samples live on.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::error::{DataError, DataResult};

pub struct TokenFile {
    path: PathBuf,
    map: Mmap,
}

impl TokenFile {
    pub fn open(path: &Path) -> DataResult<Self> {
        let file = File::open(path).map_err(|e| DataError::io("open the token file", path, e))?;
        // SAFETY: the map is read-only and token files are written once, into a temporary
        // folder that is renamed into place; nothing truncates or rewrites them while mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io("memory-map", path, e))?;
        if map.len() % 2 != 0 {
            return Err(DataError::BadTokenFile {
                path: path.to_owned(),
                reason: format!("its length {} bytes is odd, so it is not a whole number of u16 ids", map.len()),
            });
        }
        Ok(TokenFile { path: path.to_owned(), map })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.map.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tokens `[start, start + len)`, widened to i64 (what the model's embedding takes).
    pub fn window(&self, start: usize, len: usize) -> DataResult<Vec<i64>> {
        let mut out = Vec::with_capacity(len.min(self.len()));
        self.extend_window(start, len, &mut out)?;
        Ok(out)
    }

    pub(crate) fn extend_window(&self, start: usize, len: usize, out: &mut Vec<i64>) -> DataResult<()> {
        let bytes = self.window_bytes(start, len)?;
        out.extend(bytes.chunks_exact(2).map(|pair| i64::from(u16::from_le_bytes([pair[0], pair[1]]))));
        Ok(())
    }

    fn window_bytes(&self, start: usize, len: usize) -> DataResult<&[u8]> {
        let out_of_bounds = || DataError::OutOfBounds { path: self.path.clone(), start, len, available: self.len() };
        let end = start.checked_add(len).ok_or_else(out_of_bounds)?;
        if end > self.len() {
            return Err(out_of_bounds());
        }
        // end <= len() = map.len() / 2, so the byte range cannot overflow or run past the map.
        Ok(&self.map[start * 2..end * 2])
    }
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile").field("path", &self.path).field("tokens", &self.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::corpus::tests::scratch_dir;

    fn write_tokens(path: &Path, ids: &[u16]) {
        let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
        std::fs::write(path, bytes).ok();
    }

    #[test]
    fn windows_read_little_endian_ids() -> DataResult<()> {
        let dir = scratch_dir("tokens");
        let path = dir.join("t.bin");
        write_tokens(&path, &[1, 2, 300, 65535, 7]);
        let tokens = TokenFile::open(&path)?;
        assert_eq!(tokens.len(), 5);
        assert_eq!(tokens.window(0, 5)?, vec![1, 2, 300, 65535, 7]);
        assert_eq!(tokens.window(2, 2)?, vec![300, 65535]);
        assert_eq!(tokens.window(5, 0)?, Vec::<i64>::new());
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn out_of_bounds_windows_are_errors_not_panics() -> DataResult<()> {
        let dir = scratch_dir("tokens-oob");
        let path = dir.join("t.bin");
        write_tokens(&path, &[1, 2, 3]);
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
