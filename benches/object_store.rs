//! Uploading a checkpoint shard to S3-compatible storage (run: `cargo bench --bench object_store`).
//!
//! Claim: a rank uploads its checkpoint shard at least as fast as boto3, the reference S3
//! client, uploads the same bytes to the same server with the same multipart settings.
//!
//! Setup: moto's S3 server (PyPI `moto[server]` 5.1.0, installed into `$TROUPE_CACHE/python-moto`
//! on first use) on loopback; one file of TROUPE_BENCH_STORE_MIB MiB (default 256) of
//! pseudo-random bytes. troupe: `troupe_common::storage::Remote::put_file`, the call
//! `checkpoint::store::CheckpointStore::upload` makes for each file (8 MiB parts, 4 in flight).
//! boto3: `upload_file` with `TransferConfig(multipart_threshold = multipart_chunksize = 8 MiB,
//! max_concurrency = 4)`, timed inside Python (interpreter start-up excluded). One untimed
//! warm-up of each, then TROUPE_BENCH_ROUNDS rounds (default 3), the order alternating, the
//! object deleted after each upload; the claim is the median of the rounds' ratios. Target:
//! troupe MiB/s ≥ 1.0 × boto3 MiB/s. The server (single Python process, in memory) bounds both
//! clients alike; the ratio is what this bench is for, not the absolute figures.
//!
//! Output: a table on stdout and target/bench/object_store.md.

use anyhow::{ensure, Context, Result};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const TARGET: f64 = 1.0;
const BUCKET: &str = "bench";
const KEY_ID: &str = "bench";
const SECRET: &str = "bench-secret";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(default)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// moto's server and boto3 in the cache, installed with pip on first use.
fn moto_path() -> Result<PathBuf> {
    let cache = std::env::var("TROUPE_CACHE").unwrap_or_else(|_| format!("{}/.cache/troupe", std::env::var("HOME").unwrap_or_default()));
    let target = PathBuf::from(cache).join("python-moto");
    let ok = |p: &Path| {
        Command::new("python3").env("PYTHONPATH", p).args(["-c", "import boto3, moto.server"]).status().is_ok_and(|s| s.success())
    };
    if !ok(&target) {
        println!("installing moto[server] 5.1.0 into {} (pip)…", target.display());
        let status =
            Command::new("python3").args(["-m", "pip", "install", "-q", "--target"]).arg(&target).arg("moto[server]==5.1.0").status()?;
        ensure!(status.success() && ok(&target), "pip could not install moto into {}", target.display());
    }
    Ok(target)
}

/// boto3's upload of `file` as `key`; its seconds, measured inside Python.
fn boto3_upload(python_path: &Path, url: &str, file: &Path, key: &str) -> Result<f64> {
    let script = format!(
        "import time, boto3\nfrom boto3.s3.transfer import TransferConfig\n\
         c = boto3.client('s3', endpoint_url='{url}', region_name='us-east-1', aws_access_key_id='{KEY_ID}', aws_secret_access_key='{SECRET}')\n\
         cfg = TransferConfig(multipart_threshold=8*1024*1024, multipart_chunksize=8*1024*1024, max_concurrency=4, use_threads=True)\n\
         t = time.perf_counter()\nc.upload_file('{}', '{BUCKET}', '{key}', Config=cfg)\nprint(time.perf_counter() - t)\n",
        file.display()
    );
    let out = Command::new("python3").env("PYTHONPATH", python_path).args(["-c", &script]).output()?;
    ensure!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().context("boto3's time")
}

fn main() -> Result<()> {
    let mib = env_num("TROUPE_BENCH_STORE_MIB", 256);
    let rounds = env_num("TROUPE_BENCH_ROUNDS", 3).max(1);
    let python_path = moto_path()?;
    let dir = root().join("target/bench/object-store");
    std::fs::create_dir_all(&dir)?;

    println!("starting moto's S3 server…");
    let mut server = Command::new("python3")
        .env("PYTHONPATH", &python_path)
        .arg(root().join("tests/python/moto_s3.py"))
        .arg(BUCKET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().context("moto's output")?).read_line(&mut line)?;
    let url = line.trim().strip_prefix("READY ").context("moto did not start")?.to_string();
    for (key, value) in [
        ("AWS_ENDPOINT_URL", url.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
    ] {
        std::env::set_var(key, value);
    }

    let file = dir.join("shard.bin");
    println!("writing {mib} MiB of test data to {}…", file.display());
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            out.write_all(&block)?;
        }
    }
    let bytes = std::fs::metadata(&file)?.len();
    let remote = troupe_common::storage::Remote::open(&format!("s3://{BUCKET}/troupe"))?;
    let bucket = troupe_common::storage::Remote::open(&format!("s3://{BUCKET}"))?;
    let troupe_upload = || -> Result<f64> {
        let t = Instant::now();
        remote.put_file("shard.bin", &file)?;
        let seconds = t.elapsed().as_secs_f64();
        ensure!(remote.size("shard.bin")? == Some(bytes), "the uploaded object has the wrong size");
        remote.delete("shard.bin")?;
        Ok(seconds)
    };
    let boto3 = || -> Result<f64> {
        let seconds = boto3_upload(&python_path, &url, &file, "boto3/shard.bin")?;
        ensure!(bucket.size("boto3/shard.bin")? == Some(bytes), "boto3's object has the wrong size");
        bucket.delete("boto3/shard.bin")?;
        Ok(seconds)
    };
    println!("warm-up…");
    troupe_upload()?;
    boto3()?;
    let mib_s = |s: f64| bytes as f64 / (1 << 20) as f64 / s;
    let mut rows = Vec::new();
    for round in 0..rounds {
        let (t, b) = if round % 2 == 0 {
            let t = troupe_upload()?;
            (t, boto3()?)
        } else {
            let b = boto3()?;
            (troupe_upload()?, b)
        };
        println!("round {}: troupe {:.1} MiB/s, boto3 {:.1} MiB/s, ratio {:.2}", round + 1, mib_s(t), mib_s(b), b / t);
        rows.push((mib_s(t), mib_s(b), b / t));
    }
    drop(server.stdin.take());
    let _ = server.wait();

    let mut ratios: Vec<f64> = rows.iter().map(|r| r.2).collect();
    ratios.sort_by(f64::total_cmp);
    let ratio = ratios[ratios.len() / 2];
    let verdict = if ratio >= TARGET { "met" } else { "NOT met" };
    let mut report = format!(
        "# Uploading a checkpoint shard to S3 (moto, loopback)\n\n{mib} MiB, 8 MiB parts, 4 in flight, {rounds} rounds alternating.\n\n\
         | round | troupe MiB/s | boto3 MiB/s | troupe / boto3 |\n|---|---|---|---|\n"
    );
    for (i, (t, b, r)) in rows.iter().enumerate() {
        report += &format!("| {} | {t:.1} | {b:.1} | {r:.2} |\n", i + 1);
    }
    report += &format!("\nMedian ratio {ratio:.2}: target ≥ {TARGET:.1} {verdict}.\n");
    println!("\n{report}");
    std::fs::write(root().join("target/bench/object_store.md"), &report)?;
    Ok(())
}
