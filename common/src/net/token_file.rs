//! The join token kept in a file, so that it is on no command line, in no process listing and
//! in no shell history: `troupe coordinator --token-file F` makes a strong one there when F
//! does not exist yet, and the coordinator and the workers (`troupe worker --token-file F`)
//! read it from there.
//!
//! The file is created 0600 and must stay private: like ssh with its keys, a token file that
//! others may read is refused, with the command that fixes it.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use troupe_core::secret::Secret;

/// Random bytes in a generated token (written as hex: 64 characters).
const TOKEN_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read the join token file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot create the join token file {}: {source}", path.display())]
    Create { path: PathBuf, source: std::io::Error },
    #[error(
        "the join token file {} may be read by others (mode {mode:o}); make it private: chmod 600 {}",
        path.display(), path.display()
    )]
    NotPrivate { path: PathBuf, mode: u32 },
    #[error("the join token file {} is empty; delete it and let `troupe coordinator --token-file` make one", path.display())]
    Empty { path: PathBuf },
    #[error("no randomness from the operating system for a new join token")]
    NoRandomness,
}

/// A new token: 32 random bytes from the operating system, as 64 hex characters.
pub fn generate() -> Result<Secret, TokenFileError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; TOKEN_BYTES];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| TokenFileError::NoRandomness)?;
    Ok(Secret::new(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// Reads the token in `path` (its first line, surrounding whitespace dropped). The file must
/// be readable by its owner only.
pub fn read(path: &Path) -> Result<Secret, TokenFileError> {
    let read_err = |source| TokenFileError::Read { path: path.to_path_buf(), source };
    let metadata = std::fs::metadata(path).map_err(read_err)?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenFileError::NotPrivate { path: path.to_path_buf(), mode });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(TokenFileError::Empty { path: path.to_path_buf() });
    }
    Ok(Secret::new(token))
}

/// The token in `path`, made there first if the file does not exist (then `true`).
pub fn read_or_create(path: &Path) -> Result<(Secret, bool), TokenFileError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => return Ok((read(path)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(TokenFileError::Read { path: path.to_path_buf(), source }),
    }
    let token = generate()?;
    let create_err = |source| TokenFileError::Create { path: path.to_path_buf(), source };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(create_err)?;
    }
    // create_new: never overwrite a token someone else just made; 0600 from the first byte.
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(create_err)?;
    file.write_all(format!("{}\n", token.expose()).as_bytes()).map_err(create_err)?;
    file.sync_all().map_err(create_err)?;
    Ok((token, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_made_private_and_strong_read_back_and_refused_once_others_may_read_it() {
        let dir = std::env::temp_dir().join(format!("troupe-token-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/join.token");
        let (made, created) = read_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(made.chars(), 64);
        assert!(made.expose().chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (again, created) = read_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again, made, "the same token, not a new one");
        assert_ne!(generate().unwrap(), made, "tokens are random");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("may be read by others (mode 644)") && err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "\n").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("is empty"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
