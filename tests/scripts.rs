//! Every shell script in the repository passes `shellcheck` (Debian's package; `scripts/test.sh`
//! installs it where it can). Skipped with a message where it is not installed, except in CI,
//! where a missing shellcheck is a failure rather than a silent pass.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Files under `dir` (recursively) that are shell scripts: a `.sh` name or a sh/bash shebang.
fn shell_scripts(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            shell_scripts(&path, out);
            continue;
        }
        let head = std::fs::read(&path).map(|b| b.into_iter().take(64).collect::<Vec<u8>>()).unwrap_or_default();
        let head = String::from_utf8_lossy(&head);
        let shebang = head.starts_with("#!")
            && (head.lines().next().unwrap_or("").contains("bash") || head.lines().next().unwrap_or("").ends_with("/sh"));
        if path.extension().is_some_and(|e| e == "sh") || shebang {
            out.push(path);
        }
    }
}

#[test]
fn every_shell_script_passes_shellcheck() {
    let root = root();
    let mut scripts = Vec::new();
    for dir in ["scripts", ".ci", "deploy", "benches"] {
        shell_scripts(&root.join(dir), &mut scripts);
    }
    scripts.sort();
    assert!(scripts.iter().any(|p| p.ends_with("scripts/test.sh")) && scripts.iter().any(|p| p.ends_with(".ci/run")), "{scripts:?}");
    let found = Command::new("shellcheck").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !found {
        skip_or_fail("shellcheck is not installed (scripts/test.sh installs it: apt-get install shellcheck)");
        return;
    }
    let out = Command::new("shellcheck").arg("--external-sources").args(&scripts).current_dir(root).output().unwrap();
    assert!(
        out.status.success(),
        "shellcheck found problems in {} scripts:\n{}{}",
        scripts.len(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("shellcheck: {} scripts clean: {scripts:?}", scripts.len());
}

/// scripts/gpu_mfu.py, which scripts/gpu-check.sh uses to turn a GPU run into tokens/s and
/// MFU: counted for GPT-2 124M the way nanoGPT does, and the warm-up steps left out.
#[test]
fn gpu_mfu_counts_gpt2_124m_like_nanogpt() {
    let root = root();
    let dir = std::env::temp_dir().join(format!("troupe-gpu-mfu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/meta.json"), r#"{"vocab_size": 50257}"#).unwrap();
    let config =
        std::fs::read_to_string(root.join("configs/gpt2-124m.toml")).unwrap().replace("dir = \"data/shakespeare-gpt2\"", "dir = \"data\"");
    std::fs::write(dir.join("run.toml"), config).unwrap();
    // Ten slow warm-up steps, then five at 100,000 tokens/s.
    let events: String = (0..15)
        .map(|step| {
            format!(
                "{{\"event\":\"step\",\"step\":{step},\"loss\":{},\"tokens_per_sec\":{}}}\n",
                10.0 - step as f64 * 0.1,
                if step < 10 { 1 } else { 100_000 }
            )
        })
        .collect();
    std::fs::write(dir.join("events.jsonl"), events).unwrap();
    let out = Command::new("python3")
        .arg(root.join("scripts/gpu_mfu.py"))
        .args([dir.join("events.jsonl"), dir.join("run.toml")])
        .arg("NVIDIA H200")
        .arg(dir.join("figures.json"))
        .env_remove("TROUPE_PEAK_TFLOPS")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    // nanoGPT's GPT-2 (124M) without position embeddings: 123.65 M parameters.
    assert!(text.contains("123.7 M parameters (vocabulary 50257), 0.855 GFLOP per token"), "{text}");
    // 100,000 tokens/s x 0.855 GFLOP = 85.5 TFLOPS of an H200's 989.
    assert!(text.contains("100,000 tokens/s, MFU 8.6% of 989 TFLOPS bf16"), "{text}");
    let figures: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("figures.json")).unwrap()).unwrap();
    assert_eq!(figures["training"]["parameters"], 123_653_376);
    assert_eq!(figures["training"]["steps"], 15);
    let _ = std::fs::remove_dir_all(&dir);
}
