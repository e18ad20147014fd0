//! The model registry: the served versions of a run's model, as folders on disk.
//!
//! ```text
//! registry/
//!   v1/ v2/ …        one immutable folder per version: model.safetensors, tokenizer.json,
//!                    model.json, eval.json (validation loss, samples), source.json (source
//!                    checkpoint, step, time), MANIFEST (sha256 of each file)
//!   state.json       which version is stable, which one is a canary, the rollback stack
//!   history.jsonl    every transition, appended: publish, canary, promote, rollback
//!   .lock            serialises writers (the Deployer, serving replicas judging a canary,
//!                    `troupe deploy`) across processes
//!   .tmp-*/          a version being made; never visible as a version
//! ```
//!
//! A registry can also live in object storage (`s3://bucket/prefix`): each host then works on a
//! copy in its cache, brought up to the store when opened and before every change, and every
//! change is published back with conditional PUTs (see [`store`]).
//!
//! A version is made in a `.tmp-*` folder, fsynced, then renamed to `vN`: a writer killed
//! half-way leaves only a `.tmp-*` folder, which no reader looks at and the next publish
//! removes. `state.json` is replaced atomically; its `serial` grows with every change, so a
//! serving replica polls one small file to notice.

mod store;

use crate::checkpoint::{self, CheckpointError};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use troupe_core::proto::FileDigest;

pub const STATE_FILE: &str = "state.json";
pub const HISTORY_FILE: &str = "history.jsonl";
pub const EVAL_FILE: &str = "eval.json";
pub const SOURCE_FILE: &str = "source.json";
const VERSION_MANIFEST_FORMAT: u32 = 1;

/// A version's MANIFEST: the sha256 of each of its files (checked before it is served).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct VersionManifest {
    format: u32,
    /// The training step of the checkpoint it came from.
    step: u64,
    created_unix_ms: u64,
    files: Vec<FileDigest>,
}
const LOCK_FILE: &str = ".lock";
const TMP_PREFIX: &str = ".tmp-";
/// Files copied from a checkpoint into a version.
const MODEL_FILES: [&str; 3] = [checkpoint::MODEL_FILE, checkpoint::MODEL_CONFIG_FILE, checkpoint::TOKENIZER_FILE];
/// Files copied when the checkpoint has them: the chat template of chat data, and where a
/// fine-tuned model started from.
const OPTIONAL_FILES: [&str; 2] = [crate::data::chat::CHAT_TEMPLATE_JSON, checkpoint::BASE_MODEL_FILE];

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A registry in object storage changed between this writer's read and its write.
    #[error("{0}")]
    Conflict(String),
}

type Result<T> = std::result::Result<T, RegistryError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io { path: path.to_path_buf(), source }
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What the Evaluator measured on a checkpoint (its `eval.json`, copied into the version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResults {
    pub step: u64,
    pub val_loss: f64,
    pub perplexity: f64,
    pub sequences: u64,
    pub samples: Vec<Sample>,
    /// Evaluation tasks' scores (`eval.task_items`): metric → score, e.g. `next_line_acc`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tasks: std::collections::BTreeMap<String, f64>,
}

pub use troupe_core::events::Sample;

/// Where a version came from (`source.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionSource {
    pub version: u32,
    pub checkpoint: String,
    pub step: u64,
    pub run: String,
    pub created_unix_ms: u64,
    /// The model it was fine-tuned from (`model.init_from`: a Hugging Face folder as
    /// `hf:DIR`, or a troupe model folder), if it did not start from random weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
}

/// A canary in progress: `version` gets `fraction` of the requests until it has answered
/// `requests` of them, then it is judged against the stable version with these margins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Canary {
    pub version: u32,
    pub fraction: f64,
    pub requests: u64,
    pub max_error_rate_increase: f64,
    pub max_p95_ratio: f64,
    pub started_unix_ms: u64,
}

/// `state.json`: what the serving replicas should serve.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeployState {
    /// Grows with every change.
    pub serial: u64,
    /// The version that takes the traffic a canary does not.
    pub stable: Option<u32>,
    pub canary: Option<Canary>,
    /// Earlier stable versions, newest last: what `rollback` goes back to.
    pub previous: Vec<u32>,
}

/// One line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub time_unix_ms: u64,
    /// publish, canary, promote, rollback, supersede.
    pub action: String,
    pub version: Option<u32>,
    /// The stable version before the transition.
    pub from: Option<u32>,
    /// Who made it (deployer, serve, cli) and why.
    pub by: String,
    pub reason: String,
}

/// How a freshly published version goes live.
#[derive(Debug, Clone, PartialEq)]
pub enum Rollout {
    /// Stable at once.
    Direct,
    /// A canary first (stable at once when there is no stable version to compare with).
    Canary { fraction: f64, requests: u64, max_error_rate_increase: f64, max_p95_ratio: f64 },
}

/// A version as listed: its number and what is known about it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionSummary {
    pub version: u32,
    pub source: Option<VersionSource>,
    pub val_loss: Option<f64>,
}

pub fn version_name(v: u32) -> String {
    format!("v{v}")
}

/// Parses `v3` or `3`.
pub fn parse_version(text: &str) -> Option<u32> {
    let digits = text.strip_prefix('v').unwrap_or(text);
    digits.parse().ok().filter(|&v| v > 0)
}

#[derive(Debug)]
pub struct Registry {
    /// The registry's folder, or this host's copy of a registry in object storage.
    dir: PathBuf,
    store: Option<std::sync::Arc<store::RegistryStore>>,
}

/// Held while a writer reads, changes and writes the state (an advisory lock on `.lock`).
struct WriteLock {
    _file: File,
}

impl Registry {
    /// Opens (creating it when missing) a registry folder.
    pub fn create(dir: &Path) -> Result<Registry> {
        if crate::storage::is_remote(dir) {
            return Registry::open_remote(dir);
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(Registry { dir: dir.to_path_buf(), store: None })
    }

    /// A registry in object storage, through this host's copy (brought up to the store now).
    fn open_remote(url: &Path) -> Result<Registry> {
        let url = url.to_string_lossy().into_owned();
        let dir = store::cache_dir(&url);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let registry = Registry { dir, store: Some(std::sync::Arc::new(store::RegistryStore::open(&url)?)) };
        let _lock = registry.lock()?;
        Ok(registry)
    }

    /// Opens an existing registry; a folder that is not one is an error that says so.
    pub fn open(dir: &Path) -> Result<Registry> {
        if crate::storage::is_remote(dir) {
            return Registry::open_remote(dir);
        }
        if !dir.is_dir() {
            return Err(RegistryError::Invalid(format!(
                "{} is not a model registry (no such folder; a run's registry is <run dir>/registry, \
                 and `troupe deploy publish --registry DIR --checkpoint CKPT` creates one)",
                dir.display()
            )));
        }
        Ok(Registry { dir: dir.to_path_buf(), store: None })
    }

    /// Where it lives: the folder, or the object storage URL.
    pub fn location(&self) -> String {
        match &self.store {
            Some(store) => store.url().to_string(),
            None => self.dir.display().to_string(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn version_dir(&self, v: u32) -> PathBuf {
        self.dir.join(version_name(v))
    }

    fn lock(&self) -> Result<WriteLock> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
        file.lock().map_err(io(&path))?;
        // A change starts from the store's newest state.
        if let Some(store) = &self.store {
            store.sync(&self.dir)?;
        }
        Ok(WriteLock { _file: file })
    }

    /// The current state; an empty registry has the default (nothing served).
    pub fn state(&self) -> Result<DeployState> {
        let path = self.dir.join(STATE_FILE);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| RegistryError::Invalid(format!("{} is not valid: {e}", path.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DeployState::default()),
            Err(e) => Err(RegistryError::Io { path, source: e }),
        }
    }

    /// Complete versions, ascending (`.tmp-*` folders are not versions).
    pub fn versions(&self) -> Result<Vec<u32>> {
        let mut versions = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(v) = name.strip_prefix('v').and_then(|d| d.parse::<u32>().ok()) {
                if entry.path().join(checkpoint::MANIFEST).is_file() {
                    versions.push(v);
                }
            }
        }
        versions.sort_unstable();
        Ok(versions)
    }

    pub fn summaries(&self) -> Result<Vec<VersionSummary>> {
        let mut out = Vec::new();
        for v in self.versions()? {
            let dir = self.version_dir(v);
            let source = fs::read(dir.join(SOURCE_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok());
            let val_loss = self.eval_results(v).ok().flatten().map(|e| e.val_loss);
            out.push(VersionSummary { version: v, source, val_loss });
        }
        Ok(out)
    }

    pub fn eval_results(&self, v: u32) -> Result<Option<EvalResults>> {
        let path = self.version_dir(v).join(EVAL_FILE);
        match fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RegistryError::Io { path, source: e }),
        }
    }

    /// Checks a version's files against its MANIFEST (a serving replica does before loading).
    pub fn verify(&self, v: u32) -> Result<PathBuf> {
        let dir = self.version_dir(v);
        checkpoint::verify_files(&dir)?;
        Ok(dir)
    }

    pub fn history(&self) -> Result<Vec<Transition>> {
        let path = self.dir.join(HISTORY_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RegistryError::Io { path, source: e }),
        };
        // A line torn by a crash is skipped rather than failing the whole history.
        Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }

    /// Validation loss of the stable version, the bar a new checkpoint must beat.
    pub fn stable_val_loss(&self) -> Result<Option<f64>> {
        match self.state()?.stable {
            Some(v) => Ok(self.eval_results(v)?.map(|e| e.val_loss)),
            None => Ok(None),
        }
    }

    /// Publishes a checkpoint as the next version and puts it live as `rollout` says. Returns
    /// the new version. `before_visible` runs after the files are written and before the
    /// folder becomes visible (the Deployer's fault hook).
    pub fn publish(
        &self,
        checkpoint_dir: &Path,
        eval: Option<&EvalResults>,
        run: &str,
        rollout: &Rollout,
        by: &str,
        before_visible: impl FnOnce(),
    ) -> Result<u32> {
        let manifest = checkpoint::verify(checkpoint_dir)?;
        let _lock = self.lock()?;
        self.remove_stale_tmp();
        let version = self.versions()?.last().copied().unwrap_or(0).checked_add(1).ok_or_else(|| {
            RegistryError::Invalid(format!("{} has a version numbered {}: no number is left", self.dir.display(), u32::MAX))
        })?;
        let tmp = self.dir.join(format!("{TMP_PREFIX}{}-{}-{}", version_name(version), std::process::id(), now_unix_ms()));
        fs::create_dir(&tmp).map_err(io(&tmp))?;
        let made = (|| {
            let mut digests: Vec<FileDigest> = Vec::new();
            let optional = OPTIONAL_FILES.into_iter().filter(|name| manifest.files.iter().any(|f| f.name == *name));
            for name in MODEL_FILES.into_iter().chain(optional) {
                let from = checkpoint_dir.join(name);
                let to = tmp.join(name);
                if name == checkpoint::MODEL_FILE && !manifest.files.iter().any(|f| f.name == name) {
                    // A sharded checkpoint: the version gets the consolidated model.
                    let model = checkpoint::load_model(checkpoint_dir, tch::Device::Cpu)
                        .map_err(|e| RegistryError::Invalid(format!("cannot consolidate {}: {e:#}", checkpoint_dir.display())))?;
                    let bytes = model.to_safetensors_bytes().map_err(|e| RegistryError::Invalid(e.to_string()))?;
                    checkpoint::write_atomic(&to, &bytes)?;
                    digests.push(checkpoint::digest_file(&to)?);
                    continue;
                }
                fs::copy(&from, &to).map_err(io(&from))?;
                File::open(&to).and_then(|f| f.sync_all()).map_err(io(&to))?;
                let copied = checkpoint::digest_file(&to)?;
                // The copy must be what the checkpoint's MANIFEST vouches for (the file could
                // have changed since it was verified above).
                if let Some(want) = manifest.files.iter().find(|f| f.name == name) {
                    if (want.size, &want.sha256) != (copied.size, &copied.sha256) {
                        return Err(RegistryError::Invalid(format!(
                            "{} changed while it was copied (sha256 differs from the MANIFEST)",
                            from.display()
                        )));
                    }
                }
                digests.push(copied);
            }
            let source = VersionSource {
                version,
                checkpoint: checkpoint_dir.display().to_string(),
                step: manifest.step,
                run: run.to_string(),
                created_unix_ms: now_unix_ms(),
                base_model: checkpoint::base_model(checkpoint_dir),
            };
            let mut json_files = vec![(SOURCE_FILE, serde_json::to_vec_pretty(&source).expect("serializable"))];
            if let Some(eval) = eval {
                json_files.push((EVAL_FILE, serde_json::to_vec_pretty(eval).expect("serializable")));
            }
            for (name, bytes) in json_files {
                let path = tmp.join(name);
                checkpoint::write_atomic(&path, &bytes)?;
                digests.push(checkpoint::digest_file(&path)?);
            }
            let manifest =
                VersionManifest { format: VERSION_MANIFEST_FORMAT, step: manifest.step, created_unix_ms: now_unix_ms(), files: digests };
            let text = serde_json::to_vec_pretty(&manifest).expect("serializable");
            checkpoint::write_atomic(&tmp.join(checkpoint::MANIFEST), &text)?;
            Ok::<_, RegistryError>(())
        })();
        if let Err(e) = made {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        before_visible();
        let dest = self.version_dir(version);
        fs::rename(&tmp, &dest).map_err(io(&dest))?;
        checkpoint::fsync_path(&self.dir)?;

        let mut state = self.state()?;
        let mut log = Vec::new();
        let from = state.stable;
        let step = manifest.step;
        let loss = eval.map_or("not evaluated".to_string(), |e| format!("val loss {:.4}", e.val_loss));
        log.push(Transition {
            time_unix_ms: now_unix_ms(),
            action: "publish".into(),
            version: Some(version),
            from,
            by: by.into(),
            reason: format!("checkpoint of step {step}, {loss}"),
        });
        if let Some(old) = state.canary.take() {
            log.push(Transition {
                time_unix_ms: now_unix_ms(),
                action: "supersede".into(),
                version: Some(old.version),
                from,
                by: by.into(),
                reason: format!("canary replaced by the newer {}", version_name(version)),
            });
        }
        match rollout {
            Rollout::Canary { fraction, requests, max_error_rate_increase, max_p95_ratio } if from.is_some() => {
                state.canary = Some(Canary {
                    version,
                    fraction: *fraction,
                    requests: *requests,
                    max_error_rate_increase: *max_error_rate_increase,
                    max_p95_ratio: *max_p95_ratio,
                    started_unix_ms: now_unix_ms(),
                });
                log.push(Transition {
                    time_unix_ms: now_unix_ms(),
                    action: "canary".into(),
                    version: Some(version),
                    from,
                    by: by.into(),
                    reason: format!("gets {:.0}% of requests until it has answered {requests}", fraction * 100.0),
                });
            }
            _ => {
                state.previous.extend(from);
                state.stable = Some(version);
                log.push(Transition {
                    time_unix_ms: now_unix_ms(),
                    action: "promote".into(),
                    version: Some(version),
                    from,
                    by: by.into(),
                    reason: if from.is_none() { "first version".into() } else { "published directly".into() },
                });
            }
        }
        self.write_state(state, &log)?;
        Ok(version)
    }

    /// Makes `to` (default: the canary) the stable version.
    pub fn promote(&self, to: Option<u32>, by: &str, reason: &str) -> Result<DeployState> {
        let _lock = self.lock()?;
        self.promote_locked(to, by, reason)
    }

    fn promote_locked(&self, to: Option<u32>, by: &str, reason: &str) -> Result<DeployState> {
        let mut state = self.state()?;
        let target = match to.or(state.canary.as_ref().map(|c| c.version)) {
            Some(v) => v,
            None => return Err(RegistryError::Invalid("nothing to promote: there is no canary (name a version with --to vN)".into())),
        };
        if !self.versions()?.contains(&target) {
            return Err(RegistryError::Invalid(format!("{} is not a version of this registry", version_name(target))));
        }
        let from = state.stable;
        if state.canary.as_ref().is_some_and(|c| c.version == target) || to.is_some() {
            state.canary = None;
        }
        if from != Some(target) {
            state.previous.extend(from);
            state.previous.retain(|&v| v != target);
            state.stable = Some(target);
        }
        let t = Transition {
            time_unix_ms: now_unix_ms(),
            action: "promote".into(),
            version: Some(target),
            from,
            by: by.into(),
            reason: reason.into(),
        };
        self.write_state(state, &[t])
    }

    /// Undoes the last step: a canary is dropped (stable stays); without one, the stable
    /// version goes back to the previous stable one, or to `to`.
    pub fn rollback(&self, to: Option<u32>, by: &str, reason: &str) -> Result<DeployState> {
        let _lock = self.lock()?;
        self.rollback_locked(to, by, reason)
    }

    /// Promotes or drops the canary `version` — only if it is still the canary (another
    /// replica, an operator or a newer publish may have concluded or replaced it meanwhile;
    /// then nothing changes and `None` comes back). Checked and changed under the lock.
    pub fn conclude_canary(&self, version: u32, promote: bool, by: &str, reason: &str) -> Result<Option<DeployState>> {
        let _lock = self.lock()?;
        if self.state()?.canary.map(|c| c.version) != Some(version) {
            return Ok(None);
        }
        if promote {
            self.promote_locked(Some(version), by, reason).map(Some)
        } else {
            self.rollback_locked(None, by, reason).map(Some)
        }
    }

    fn rollback_locked(&self, to: Option<u32>, by: &str, reason: &str) -> Result<DeployState> {
        let mut state = self.state()?;
        let from = state.stable;
        let (removed, target) = match (state.canary.take(), to) {
            (Some(canary), None) => (Some(canary.version), from),
            (_, Some(v)) => {
                if !self.versions()?.contains(&v) {
                    return Err(RegistryError::Invalid(format!("{} is not a version of this registry", version_name(v))));
                }
                state.previous.retain(|&p| p != v);
                (from, Some(v))
            }
            (None, None) => match state.previous.pop() {
                Some(v) => (from, Some(v)),
                None => return Err(RegistryError::Invalid("nothing to roll back to: no earlier stable version".into())),
            },
        };
        state.stable = target;
        let t = Transition {
            time_unix_ms: now_unix_ms(),
            action: "rollback".into(),
            version: removed,
            from,
            by: by.into(),
            reason: format!("{reason}; serving {}", target.map_or("nothing".into(), version_name)),
        };
        self.write_state(state, &[t])
    }

    /// Replaces the state, then records the transitions that led to it: the history never
    /// claims a change that did not happen (a crash in between loses only the record).
    fn write_state(&self, mut state: DeployState, transitions: &[Transition]) -> Result<DeployState> {
        state.serial = self.state()?.serial + 1;
        let bytes = serde_json::to_vec_pretty(&state).expect("serializable");
        checkpoint::write_atomic(&self.dir.join(STATE_FILE), &bytes)?;
        for t in transitions {
            self.append(t)?;
        }
        if let Some(store) = &self.store {
            store.publish(&self.dir, &state, transitions)?;
        }
        Ok(state)
    }

    fn append(&self, t: &Transition) -> Result<()> {
        let path = self.dir.join(HISTORY_FILE);
        let mut line = serde_json::to_string(t).expect("serializable");
        line.push('\n');
        let mut f = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
        f.write_all(line.as_bytes()).map_err(io(&path))?;
        f.sync_data().map_err(io(&path))
    }

    /// Removes folders of versions that a writer never finished (called under the lock, so
    /// no live writer owns them).
    fn remove_stale_tmp(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                tracing::info!("removing an unfinished version {}", entry.path().display());
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder that passes `checkpoint::verify`, with the files a version copies.
    fn fake_checkpoint(dir: &Path, step: u64) -> PathBuf {
        let ckpt = dir.join(format!("ckpt-{step}"));
        fs::create_dir_all(&ckpt).unwrap();
        let mut files = Vec::new();
        for name in MODEL_FILES {
            fs::write(ckpt.join(name), format!("{name} of step {step}")).unwrap();
            files.push(checkpoint::digest_file(&ckpt.join(name)).unwrap());
        }
        let manifest = checkpoint::Manifest {
            format: checkpoint::MANIFEST_FORMAT,
            step,
            world_size: 1,
            strategy: "ddp".into(),
            layout: troupe_core::shard::ShardLayout::new(1, vec![1]),
            created_unix_ms: 0,
            files,
        };
        fs::write(ckpt.join(checkpoint::MANIFEST), serde_json::to_vec(&manifest).unwrap()).unwrap();
        ckpt
    }

    fn eval(step: u64, val_loss: f64) -> EvalResults {
        EvalResults { step, val_loss, perplexity: val_loss.exp(), sequences: 4, samples: vec![], tasks: Default::default() }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("troupe-registry-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_writer_dying_half_way_leaves_nothing_visible_and_the_next_publish_succeeds() {
        let dir = scratch("torn");
        let registry = Registry::create(&dir.join("registry")).unwrap();
        let ckpt = fake_checkpoint(&dir, 5);
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            registry.publish(&ckpt, Some(&eval(5, 3.0)), "run", &Rollout::Direct, "test", || panic!("killed half-way"))
        }));
        assert!(died.is_err());
        assert_eq!(registry.versions().unwrap(), Vec::<u32>::new(), "the half-made version is invisible");
        assert_eq!(registry.state().unwrap(), DeployState::default());
        assert!(registry.history().unwrap().is_empty());
        let leftovers = || {
            fs::read_dir(registry.dir())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(TMP_PREFIX))
                .count()
        };
        assert_eq!(leftovers(), 1);
        let v = registry.publish(&ckpt, Some(&eval(5, 3.0)), "run", &Rollout::Direct, "test", || {}).unwrap();
        assert_eq!(v, 1);
        assert_eq!(leftovers(), 0, "the next publish removes the leftovers");
        assert_eq!(registry.state().unwrap().stable, Some(1));
        registry.verify(1).unwrap();
        assert_eq!(registry.eval_results(1).unwrap().unwrap().val_loss, 3.0);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn promote_and_rollback_walk_the_versions_and_every_transition_is_recorded() {
        let dir = scratch("walk");
        let registry = Registry::create(&dir.join("registry")).unwrap();
        for step in [1, 2, 3] {
            let ckpt = fake_checkpoint(&dir, step);
            registry.publish(&ckpt, Some(&eval(step, 4.0 - step as f64)), "run", &Rollout::Direct, "test", || {}).unwrap();
        }
        let s = registry.state().unwrap();
        assert_eq!((s.stable, s.previous.clone()), (Some(3), vec![1, 2]));
        assert_eq!(registry.stable_val_loss().unwrap(), Some(1.0));
        assert_eq!(registry.rollback(None, "test", "worse").unwrap().stable, Some(2));
        assert_eq!(registry.rollback(Some(1), "test", "pin").unwrap().stable, Some(1));
        assert_eq!(registry.promote(Some(3), "test", "back").unwrap().stable, Some(3));
        assert!(registry.promote(None, "test", "x").unwrap_err().to_string().contains("no canary"));
        assert!(registry.promote(Some(9), "test", "x").unwrap_err().to_string().contains("v9 is not a version"));

        let canary = Rollout::Canary { fraction: 0.25, requests: 10, max_error_rate_increase: 0.01, max_p95_ratio: 1.5 };
        let v = registry.publish(&fake_checkpoint(&dir, 4), None, "run", &canary, "test", || {}).unwrap();
        let s = registry.state().unwrap();
        assert_eq!((s.stable, s.canary.as_ref().map(|c| c.version)), (Some(3), Some(v)));
        let s = registry.rollback(None, "test", "canary failed").unwrap();
        assert_eq!((s.stable, s.canary), (Some(3), None), "rolling back a canary keeps the stable version");
        // A verdict on a canary that is no longer the canary changes nothing.
        assert_eq!(registry.conclude_canary(v, true, "test", "late verdict").unwrap(), None);
        assert_eq!(registry.state().unwrap().stable, Some(3));
        let actions: Vec<String> = registry.history().unwrap().into_iter().map(|t| t.action).collect();
        assert_eq!(
            actions,
            [
                "publish", "promote", "publish", "promote", "publish", "promote", "rollback", "rollback", "promote", "publish", "canary",
                "rollback"
            ]
        );
        let serial = registry.state().unwrap().serial;
        assert_eq!(serial, 8, "one state change per transition that changes what serves");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupted_version_is_refused_by_name() {
        let dir = scratch("corrupt");
        let registry = Registry::create(&dir.join("registry")).unwrap();
        registry.publish(&fake_checkpoint(&dir, 1), None, "run", &Rollout::Direct, "test", || {}).unwrap();
        fs::write(registry.version_dir(1).join(checkpoint::MODEL_FILE), "flipped").unwrap();
        let err = registry.verify(1).unwrap_err().to_string();
        assert!(err.contains("model.safetensors is corrupted"), "{err}");
        assert!(Registry::open(&dir.join("nope")).unwrap_err().to_string().contains("not a model registry"));
        assert_eq!(parse_version("v12"), Some(12));
        assert_eq!(parse_version("0"), None);
        let _ = fs::remove_dir_all(&dir);
    }
}
