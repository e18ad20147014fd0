//! The registry in object storage (`deploy.registry = "s3://bucket/prefix"`): every host keeps a
//! copy in its cache, and the store is the truth.
//!
//! ```text
//! <prefix>/v1/ v2/ …            the versions: files first (under a folder of the writer's own,
//!                               so two writers racing for v3 never overwrite each other's
//!                               files), MANIFEST last (put only if absent; it names that folder)
//! <prefix>/states/0000000042.json  {"state": …, "transitions": […]}: change number 42, put only
//!                                   if absent, so of two writers that both start from serial 41
//!                                   exactly one wins; the other is told, syncs and tries again
//! <prefix>/state.json           the newest state again, for pollers (a hint: `states/` decides)
//! ```
//! A reader (a serving replica) polls `state.json` and probes for the next change number, so a
//! poll costs two small requests; only a change fetches the new versions (each file checked
//! against its MANIFEST's sha256) and the new transitions. Writers (the Deployer, `troupe
//! deploy`, a replica concluding a canary) work on their copy under its lock as on a local
//! registry, then publish: new versions, then the change object, then the hint. Only the
//! conditional PUTs of S3 (`If-None-Match: *`) are needed, which S3, MinIO, R2 and moto have.

use std::path::{Path, PathBuf};

use super::{DeployState, RegistryError, Result, Transition, HISTORY_FILE, STATE_FILE};
use crate::checkpoint::{self, MANIFEST};
use crate::storage::Remote;

/// Where this host keeps its copy of the registry at `url`.
pub(super) fn cache_dir(url: &str) -> PathBuf {
    use sha2::Digest;
    let key = hex::encode(&sha2::Sha256::digest(url.trim_end_matches('/').as_bytes())[..8]);
    crate::storage::cache_root().join("registries").join(key)
}

/// The change number this copy was last brought up to.
const SYNCED_FILE: &str = ".synced-serial";

#[derive(serde::Serialize, serde::Deserialize)]
struct Change {
    state: DeployState,
    transitions: Vec<Transition>,
}

fn change_name(serial: u64) -> String {
    format!("states/{serial:010}.json")
}

/// A version's MANIFEST as stored: the local one plus the folder its files are under.
#[derive(serde::Deserialize)]
struct StoredManifest {
    files: Vec<troupe_core::proto::FileDigest>,
    store_files: String,
}

pub(super) struct RegistryStore {
    remote: Remote,
}

impl std::fmt::Debug for RegistryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryStore").field("url", &self.remote.url()).finish()
    }
}

fn store_err(e: crate::storage::StorageError) -> RegistryError {
    RegistryError::Checkpoint(e.into())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io { path: path.to_path_buf(), source }
}

impl RegistryStore {
    pub(super) fn open(url: &str) -> Result<RegistryStore> {
        Ok(RegistryStore { remote: Remote::open(url).map_err(store_err)? })
    }

    pub(super) fn url(&self) -> &str {
        self.remote.url()
    }

    /// The newest change number in the store (0: none yet).
    fn newest_serial(&self) -> Result<u64> {
        let hint = match self.remote.get(STATE_FILE) {
            Ok(bytes) => serde_json::from_slice::<DeployState>(&bytes).map(|s| s.serial).unwrap_or(0),
            Err(_) if !self.remote.exists(STATE_FILE).map_err(store_err)? => 0,
            Err(e) => return Err(store_err(e)),
        };
        // The hint may lag (a writer that died between the change and the hint).
        let mut serial = hint;
        while self.remote.exists(&change_name(serial + 1)).map_err(store_err)? {
            serial += 1;
        }
        Ok(serial)
    }

    /// Brings the copy in `dir` up to the store: new versions (checked), the newest state, the
    /// history. Versions in the copy the store does not have (a publish that lost a race) go.
    pub(super) fn sync(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let newest = self.newest_serial()?;
        let synced: u64 = std::fs::read_to_string(dir.join(SYNCED_FILE)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        if newest == synced && newest > 0 {
            return Ok(());
        }
        let stored: Vec<u32> =
            self.remote.list_dirs("").map_err(store_err)?.iter().filter_map(|n| n.strip_prefix('v')?.parse().ok()).collect();
        for v in &stored {
            self.fetch_version(dir, *v)?;
        }
        for entry in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(v) = name.strip_prefix('v').and_then(|d| d.parse::<u32>().ok()) {
                if !stored.contains(&v) || !self.remote.exists(&format!("{name}/{MANIFEST}")).map_err(store_err)? {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        // The history: the transitions of every change, in order (a copy that is behind
        // appends what it missed; one that is ahead, after a lost race, starts again).
        let mut history =
            if synced <= newest { std::fs::read_to_string(dir.join(HISTORY_FILE)).unwrap_or_default() } else { String::new() };
        let from = if synced <= newest { synced } else { 0 };
        let mut state = None;
        for serial in from + 1..=newest {
            let bytes = self.remote.get(&change_name(serial)).map_err(store_err)?;
            let change: Change = serde_json::from_slice(&bytes)
                .map_err(|e| RegistryError::Invalid(format!("{}/{} is not valid: {e}", self.url(), change_name(serial))))?;
            for t in &change.transitions {
                history.push_str(&serde_json::to_string(t).expect("serializable"));
                history.push('\n');
            }
            state = Some(change.state);
        }
        if newest == 0 {
            let _ = std::fs::remove_file(dir.join(STATE_FILE));
            history.clear();
        }
        checkpoint::write_atomic(&dir.join(HISTORY_FILE), history.as_bytes())?;
        if let Some(state) = state {
            checkpoint::write_atomic(&dir.join(STATE_FILE), &serde_json::to_vec_pretty(&state).expect("serializable"))?;
        }
        checkpoint::write_atomic(&dir.join(SYNCED_FILE), newest.to_string().as_bytes())?;
        Ok(())
    }

    /// Fetches version `v` into the copy unless it is there whole.
    fn fetch_version(&self, dir: &Path, v: u32) -> Result<()> {
        let name = super::version_name(v);
        let dest = dir.join(&name);
        if dest.join(MANIFEST).is_file() {
            return Ok(());
        }
        let text = match self.remote.get(&format!("{name}/{MANIFEST}")) {
            Ok(text) => text,
            // Files without a MANIFEST: a publish in progress or abandoned; not a version.
            Err(_) if !self.remote.exists(&format!("{name}/{MANIFEST}")).map_err(store_err)? => return Ok(()),
            Err(e) => return Err(store_err(e)),
        };
        let files: StoredManifest = serde_json::from_slice(&text)
            .map_err(|e| RegistryError::Invalid(format!("{}/{name}/{MANIFEST} is not valid: {e}", self.url())))?;
        if files.store_files.is_empty() || !files.store_files.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(RegistryError::Invalid(format!("{}/{name}/{MANIFEST} names a bad files folder", self.url())));
        }
        let tmp = dir.join(format!(".tmp-sync-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        for f in &files.files {
            if f.name.contains('/') || f.name.contains("..") {
                return Err(RegistryError::Invalid(format!("{}/{name}/{MANIFEST} names a file outside its folder", self.url())));
            }
            let key = format!("{name}/{}/{}", files.store_files, f.name);
            let digest = self.remote.get_to_file(&key, &tmp.join(&f.name)).map_err(store_err)?;
            if digest.as_deref() != Some(f.sha256.as_str()) {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(RegistryError::Invalid(format!("{}/{name}/{} does not match its MANIFEST's sha256", self.url(), f.name)));
            }
        }
        checkpoint::write_atomic(&tmp.join(MANIFEST), &text)?;
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        Ok(())
    }

    /// Publishes a change made in the copy: versions the store lacks (files, then MANIFEST if
    /// absent), then change `state.serial` (if absent), then the hint. `Conflict` when another
    /// writer got there first; the copy is then brought back to the store.
    pub(super) fn publish(&self, dir: &Path, state: &DeployState, transitions: &[Transition]) -> Result<()> {
        let conflict = |what: String| {
            // Forget what this writer did locally: the next sync restores the store's view.
            let _ = std::fs::remove_file(dir.join(SYNCED_FILE));
            RegistryError::Conflict(format!("{what}: another writer changed the registry {} first; try again", self.url()))
        };
        for entry in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_version = name.strip_prefix('v').is_some_and(|d| d.parse::<u32>().is_ok());
            if !is_version
                || !entry.path().join(MANIFEST).is_file()
                || self.remote.exists(&format!("{name}/{MANIFEST}")).map_err(store_err)?
            {
                continue;
            }
            let manifest = std::fs::read(entry.path().join(MANIFEST)).map_err(io(&entry.path()))?;
            let mut stored: serde_json::Value =
                serde_json::from_slice(&manifest).map_err(|e| RegistryError::Invalid(format!("{name}/{MANIFEST}: {e}")))?;
            let writer = format!("w{}-{}", std::process::id(), super::now_unix_ms());
            stored["store_files"] = serde_json::Value::String(writer.clone());
            let files: StoredManifest =
                serde_json::from_value(stored.clone()).map_err(|e| RegistryError::Invalid(format!("{name}/{MANIFEST}: {e}")))?;
            for f in &files.files {
                self.remote.put_file(&format!("{name}/{writer}/{}", f.name), &entry.path().join(&f.name)).map_err(store_err)?;
            }
            let stored = serde_json::to_vec_pretty(&stored).expect("serializable");
            if !self.remote.put_if_absent(&format!("{name}/{MANIFEST}"), stored).map_err(store_err)? {
                return Err(conflict(format!("publishing {name}")));
            }
        }
        let change = Change { state: state.clone(), transitions: transitions.to_vec() };
        let bytes = serde_json::to_vec_pretty(&change).expect("serializable");
        if !self.remote.put_if_absent(&change_name(state.serial), bytes).map_err(store_err)? {
            return Err(conflict(format!("registry change {}", state.serial)));
        }
        self.remote.put(STATE_FILE, serde_json::to_vec_pretty(state).expect("serializable")).map_err(store_err)?;
        checkpoint::write_atomic(&dir.join(SYNCED_FILE), state.serial.to_string().as_bytes())?;
        Ok(())
    }
}
