//! Every shell script in the repository passes `shellcheck` (Debian's package; `scripts/test.sh`
//! installs it where it can). Skipped with a message where it is not installed, except in CI,
//! where a missing shellcheck is a failure rather than a silent pass.

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
        let shebang = head.starts_with("#!") && (head.lines().next().unwrap_or("").contains("bash") || head.lines().next().unwrap_or("").ends_with("/sh"));
        if path.extension().is_some_and(|e| e == "sh") || shebang {
            out.push(path);
        }
    }
}

#[test]
fn every_shell_script_passes_shellcheck() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut scripts = Vec::new();
    for dir in ["scripts", ".ci", "deploy", "benches"] {
        shell_scripts(&root.join(dir), &mut scripts);
    }
    scripts.sort();
    assert!(scripts.iter().any(|p| p.ends_with("scripts/test.sh")) && scripts.iter().any(|p| p.ends_with(".ci/run")), "{scripts:?}");
    let found = Command::new("shellcheck").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "shellcheck is missing in CI: scripts/test.sh should have installed it");
        eprintln!("SKIPPED: shellcheck is not installed (apt-get install shellcheck)");
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
