//! Prepared data in object storage: `troupe prepare --out s3://…` uploads a prepared folder
//! (`meta.json` last, so a reader finds the data complete whenever it finds `meta.json`), and a
//! host that trains on `data.dir = "s3://…"` fetches it into a cache of its own, checking every
//! shard against the sha256 `meta.json` records. A cached shard that is missing, cut short or
//! corrupt is fetched again; one that matches is kept, so later runs on the host start at once.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::chat::CHAT_TEMPLATE_JSON;
use super::error::{DataError, DataResult};
use super::meta::{load_meta, Meta, META_JSON, TOKENIZER_JSON};
use crate::storage::{self, Remote, StorageError};

fn remote_error(e: StorageError) -> DataError {
    DataError::Remote(e.to_string())
}

/// The local folder a data location is read from: the folder itself, or the host's cache of a
/// remote location (filled by [`fetch_prepared`]).
pub fn local_dir(location: &Path) -> PathBuf {
    if !storage::is_remote(location) {
        return location.to_path_buf();
    }
    let url = location.to_string_lossy();
    let digest = hex::encode(Sha256::digest(url.trim_end_matches('/').as_bytes()));
    storage::cache_root().join("remote-data").join(&digest[..16])
}

/// Uploads the prepared folder `dir` to `url`: every file it lists, then `meta.json`.
pub fn upload_prepared(dir: &Path, url: &str) -> DataResult<Meta> {
    let meta = load_meta(dir)?;
    let remote = Remote::open(url).map_err(remote_error)?;
    // As a local --out: never over data that is there (a reader would see the old meta.json
    // over new shards).
    if remote.exists(META_JSON).map_err(remote_error)? {
        return Err(DataError::Remote(format!(
            "{url}/{META_JSON} exists: prepared data is there already; choose another --out or delete it"
        )));
    }
    let mut files: Vec<String> = vec![TOKENIZER_JSON.to_string()];
    if dir.join(CHAT_TEMPLATE_JSON).is_file() {
        files.push(CHAT_TEMPLATE_JSON.to_string());
    }
    files.extend(shard_files(&meta).map(|(f, _)| f.to_string()));
    for file in &files {
        remote.put_file(file, &dir.join(file)).map_err(remote_error)?;
    }
    remote.put_file(META_JSON, &dir.join(META_JSON)).map_err(remote_error)?;
    Ok(meta)
}

/// Every shard file `meta.json` lists, with its sha256.
fn shard_files(meta: &Meta) -> impl Iterator<Item = (&str, &str)> {
    meta.train
        .iter()
        .chain(&meta.train_mask)
        .chain(meta.val.iter().flat_map(|v| v.shards.iter().chain(&v.mask)))
        .map(|s| (s.file.as_str(), s.sha256.as_str()))
}

/// What [`fetch_prepared`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Fetched {
    pub dir: PathBuf,
    /// Shards downloaded now, and shards kept from the cache.
    pub fetched: usize,
    pub kept: usize,
    /// Cached shards that did not match their sha256 (fetched again).
    pub replaced: Vec<String>,
}

/// Brings the prepared data at `url` into this host's cache (see [`local_dir`]) and returns
/// the folder. Hosts' workers that fetch at once take turns (a lock file in the cache).
pub fn fetch_prepared(url: &str) -> DataResult<Fetched> {
    let dir = local_dir(Path::new(url));
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io("create the data cache", &dir, e))?;
    let _lock = lock(&dir)?;
    let remote = Remote::open(url).map_err(remote_error)?;
    let meta_bytes = remote.get(META_JSON).map_err(|e| match e {
        StorageError::Remote { message, .. } if message.contains("not found") || message.contains("NotFound") => {
            DataError::Remote(format!(
            "{url}/{META_JSON} does not exist: no prepared data there (troupe prepare --out {url} writes it; {META_JSON} is written last)"
        ))
        }
        other => remote_error(other),
    })?;
    let meta: Meta = serde_json::from_slice(&meta_bytes)
        .map_err(|e| DataError::BadPrepared { path: PathBuf::from(url), reason: format!("{META_JSON} is malformed: {e}") })?;
    let mut report = Fetched { dir: dir.clone(), ..Fetched::default() };
    for name in [TOKENIZER_JSON, CHAT_TEMPLATE_JSON] {
        let found = remote.get_to_file(name, &dir.join(name)).map_err(remote_error)?;
        match (found, name) {
            (None, TOKENIZER_JSON) => return Err(DataError::Remote(format!("{url}/{TOKENIZER_JSON} does not exist"))),
            // Not chat data: no template may linger from earlier data at this URL.
            (None, _) => {
                let _ = std::fs::remove_file(dir.join(name));
            }
            _ => {}
        }
    }
    for (file, want) in shard_files(&meta) {
        if file.contains('/') || file.starts_with('.') {
            return Err(DataError::BadPrepared {
                path: PathBuf::from(url),
                reason: format!("{META_JSON} names a file outside the folder: {file:?}"),
            });
        }
        let path = dir.join(file);
        if path.is_file() {
            match crate::checkpoint::digest_file(&path) {
                Ok(got) if got.sha256 == want => {
                    report.kept += 1;
                    continue;
                }
                _ => report.replaced.push(file.to_string()),
            }
        }
        let mut tries = 0;
        loop {
            tries += 1;
            let got = remote.get_to_file(file, &path).map_err(remote_error)?;
            match got {
                Some(got) if got == want => break,
                Some(got) if tries >= 2 => {
                    let _ = std::fs::remove_file(&path);
                    return Err(remote_error(StorageError::Corrupt {
                        url: url.to_string(),
                        what: file.to_string(),
                        got,
                        want: want.to_string(),
                    }));
                }
                Some(_) => continue,
                None => return Err(DataError::Remote(format!("{url}/{file} does not exist, but {META_JSON} lists it"))),
            }
        }
        report.fetched += 1;
    }
    storage::write_replacing(&dir.join(META_JSON), &meta_bytes).map_err(remote_error)?;
    Ok(report)
}

/// An exclusive lock on `<dir>/.lock`, released when dropped.
fn lock(dir: &Path) -> DataResult<std::fs::File> {
    let path = dir.join(".lock");
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| DataError::io("open", &path, e))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; it is released when the file is closed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(DataError::io("lock", &path, std::io::Error::last_os_error()));
    }
    Ok(file)
}
