//! `troupe prepare` at scale: peak memory on a ~200 MB and a ~2 GB corpus with the same
//! options (the streaming pipeline should not grow with the corpus), and throughput with a
//! given tokenizer.json on 1 and 2 threads against Python `tokenizers` batch-encoding the same
//! text with the same tokenizer (`encode_batch`, every core) and writing the ids with numpy.
//!
//!   cargo bench --bench prepare
//!
//! The corpora are generated JSONL (English-like documents of ~8 KB, see
//! `data::generated_text`) under target/bench-data, made once and reused. Each prepare runs
//! as its own `troupe prepare` process; its peak RSS comes from wait4's rusage.
//!
//! Env: TROUPE_BENCH_SMALL_MB (default 200), TROUPE_BENCH_LARGE_MB (default 2000; 0 skips
//! the memory comparison), TROUPE_BENCH_PYTHONPATH (where `tokenizers` and `numpy` are;
//! default the test suite's $TROUPE_CACHE/python-hf-export).
//! Output: target/bench/prepare.{md,csv}.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn env_mb(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn troupe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/troupe")
}

/// A JSONL corpus of about `mb` megabytes (made once).
fn corpus(dir: &Path, mb: u64) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("corpus-{mb}mb.jsonl"));
    if path.is_file() {
        return Ok(path);
    }
    println!("generating {}…", path.display());
    let tmp = path.with_extension("partial");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    let mut written = 0u64;
    let mut seed = 0u64;
    while written < mb * 1_000_000 {
        let text = troupe_common::data::generated_text(6_000 + (seed % 5) as usize * 1_000, seed);
        let line = serde_json::json!({ "id": seed, "text": text }).to_string();
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        written += line.len() as u64 + 1;
        seed += 1;
    }
    out.flush()?;
    drop(out);
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Runs a command to its end; returns (seconds, peak RSS in MiB of that process).
fn timed(mut cmd: Command) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let child = cmd.stdout(std::process::Stdio::null()).spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child and fills a rusage struct.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    anyhow::ensure!(waited == pid, "wait4 failed");
    anyhow::ensure!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{cmd:?} failed (status {status})");
    Ok((started.elapsed().as_secs_f64(), usage.ru_maxrss as f64 / 1024.0))
}

fn prepare(input: &Path, out: &Path, tokenizer: &Path, threads: usize) -> anyhow::Result<(f64, f64)> {
    let _ = std::fs::remove_dir_all(out);
    let mut cmd = Command::new(troupe_bin());
    cmd.arg("prepare").arg("--input").arg(input).arg("--out").arg(out).arg("--tokenizer").arg(tokenizer);
    cmd.args(["--threads", &threads.to_string()]);
    let result = timed(cmd);
    let _ = std::fs::remove_dir_all(out);
    result
}

const PYTHON_ENCODE: &str = r#"
import json, sys, numpy
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
eot = tok.token_to_id("<|endoftext|>")
with open(sys.argv[2]) as f, open(sys.argv[3], "wb") as out:
    batch = []
    def flush():
        ids = []
        for enc in tok.encode_batch(batch):
            ids.extend(enc.ids)
            ids.append(eot)
        numpy.array(ids, dtype=numpy.uint16).tofile(out)
        batch.clear()
    for line in f:
        batch.append(json.loads(line)["text"])
        if len(batch) == 1000:
            flush()
    if batch:
        flush()
"#;

fn main() -> anyhow::Result<()> {
    let small_mb = env_mb("TROUPE_BENCH_SMALL_MB", 200);
    let large_mb = env_mb("TROUPE_BENCH_LARGE_MB", 2000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target/bench-data");
    std::fs::create_dir_all(&dir)?;
    anyhow::ensure!(troupe_bin().is_file(), "build the release binary first: cargo build --release");
    let small = corpus(&dir, small_mb)?;
    let small_bytes = std::fs::metadata(&small)?.len() as f64;

    // The tokenizer every run uses: trained once, by troupe, on a slice of the small corpus.
    let tokenizer = dir.join("tokenizer-8192.json");
    if !tokenizer.is_file() {
        let out = dir.join("tokenizer-run");
        let _ = std::fs::remove_dir_all(&out);
        let mut cmd = Command::new(troupe_bin());
        cmd.arg("prepare").arg("--input").arg(&small).arg("--out").arg(&out).args(["--vocab-size", "8192", "--tokenizer-sample-mb", "20"]);
        timed(cmd)?;
        std::fs::copy(out.join("tokenizer.json"), &tokenizer)?;
        let _ = std::fs::remove_dir_all(&out);
    }

    let mut md = String::from("`troupe prepare` (default [data.filters]: Unicode NFC, whitespace, exact dedup) with a given 8,192-id tokenizer.json on generated JSONL.\n\n");
    let mut csv = String::from("what,mb,threads,seconds,mb_per_s,peak_rss_mib\n");

    // Throughput, side by side.
    md.push_str(&format!(
        "Throughput on {:.0} MB:\n\n| encoder | threads | seconds | MB/s | peak RSS (MiB) |\n|---|---|---|---|---|\n",
        small_bytes / 1e6
    ));
    for threads in [1, 2] {
        let (s, rss) = prepare(&small, &dir.join("out-throughput"), &tokenizer, threads)?;
        println!("troupe prepare, {threads} thread(s): {s:.1} s, {:.1} MB/s, {rss:.0} MiB", small_bytes / 1e6 / s);
        md.push_str(&format!("| troupe prepare | {threads} | {s:.1} | {:.1} | {rss:.0} |\n", small_bytes / 1e6 / s));
        csv.push_str(&format!("troupe,{:.0},{threads},{s:.2},{:.2},{rss:.0}\n", small_bytes / 1e6, small_bytes / 1e6 / s));
    }
    let pythonpath = std::env::var("TROUPE_BENCH_PYTHONPATH").unwrap_or_else(|_| {
        let cache =
            std::env::var("TROUPE_CACHE").unwrap_or_else(|_| format!("{}/.cache/troupe", std::env::var("HOME").unwrap_or_default()));
        format!("{cache}/python-hf-export")
    });
    let mut python = Command::new("python3");
    python.env("PYTHONPATH", &pythonpath).arg("-c").arg(PYTHON_ENCODE).arg(&tokenizer).arg(&small).arg(dir.join("python-ids.bin"));
    match timed(python) {
        Ok((s, rss)) => {
            println!("python tokenizers encode_batch (all cores) + numpy: {s:.1} s, {:.1} MB/s, {rss:.0} MiB", small_bytes / 1e6 / s);
            md.push_str(&format!("| Python tokenizers encode_batch + numpy | all | {s:.1} | {:.1} | {rss:.0} |\n", small_bytes / 1e6 / s));
            csv.push_str(&format!("python,{:.0},all,{s:.2},{:.2},{rss:.0}\n", small_bytes / 1e6, small_bytes / 1e6 / s));
        }
        Err(e) => println!("python tokenizers: not measured ({e}); set TROUPE_BENCH_PYTHONPATH to where tokenizers and numpy are"),
    }
    let _ = std::fs::remove_file(dir.join("python-ids.bin"));

    // Memory: the same options on a corpus ten times larger.
    if large_mb > 0 {
        let large = corpus(&dir, large_mb)?;
        let large_bytes = std::fs::metadata(&large)?.len() as f64;
        md.push_str("\nPeak memory, same options, 2 threads:\n\n| corpus (MB) | seconds | MB/s | peak RSS (MiB) |\n|---|---|---|---|\n");
        let mut peaks = Vec::new();
        for (path, bytes) in [(&small, small_bytes), (&large, large_bytes)] {
            let (s, rss) = prepare(path, &dir.join("out-memory"), &tokenizer, 2)?;
            println!("{:.0} MB: {s:.1} s, peak RSS {rss:.0} MiB", bytes / 1e6);
            md.push_str(&format!("| {:.0} | {s:.1} | {:.1} | {rss:.0} |\n", bytes / 1e6, bytes / 1e6 / s));
            csv.push_str(&format!("memory,{:.0},2,{s:.2},{:.2},{rss:.0}\n", bytes / 1e6, bytes / 1e6 / s));
            peaks.push(rss);
        }
        let ratio = peaks[1] / peaks[0];
        println!("peak RSS ratio, {:.0} MB vs {:.0} MB: {ratio:.2}", large_bytes / 1e6, small_bytes / 1e6);
        md.push_str(&format!("\nPeak RSS of the large corpus is {ratio:.2}× the small one's.\n"));
    }
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("prepare.md"), md)?;
    std::fs::write(out.join("prepare.csv"), csv)?;
    println!("wrote target/bench/prepare.md");
    Ok(())
}
