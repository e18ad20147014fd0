//! The cluster launchers: the Slurm batch script (scripts/slurm/troupe.sbatch), the Kubernetes
//! manifests (deploy/k8s) and the container image (deploy/docker/Dockerfile).
//!
//! The sbatch script is run for real outside Slurm: its dry run with the Slurm environment set
//! by hand, and whole jobs with a stand-in `srun` (it starts the tasks here, with their
//! SLURM_LOCALID) — one with the real `troupe` binary that trains a tiny model, others with a
//! stand-in `troupe` that records what it was given and exits as told. The manifests are
//! parsed and checked against each other and against troupe's own config loader, then
//! validated against the Kubernetes API's schemas with kubernetes-validate (PyPI; installed by
//! scripts/test.sh; skipped with a message where it is missing, except in CI). shellcheck is
//! skipped the same way.
//!
//! Why one file of ~900 lines: every file under tests/ is a test binary of its own, linked
//! against libtorch, so splitting this one by launcher would add links to every build of the
//! suite; the three launchers are its sections (Slurm, then Kubernetes, then the image).

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use troupe_core::config::Config;
use troupe_core::events::RunEvent;

fn sbatch() -> PathBuf {
    root().join("scripts/slurm/troupe.sbatch")
}

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The words of one line of POSIX shell as `quote` in the script writes them: bare words,
/// '…' (with '\'' for a quote inside) and "…".
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    w.push(c);
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => w.push(chars.next().unwrap_or('\\')),
                        c => w.push(c),
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).push(chars.next().unwrap_or('\\')),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

/// The value of `--name value` or `--name=value` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let eq = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| if a == name { args.get(i + 1).map(String::as_str) } else { a.strip_prefix(&eq) })
}

/// A folder of stand-in programs put first on PATH: `openssl` (prints a known token, so the
/// tests can look for it) and whatever else a test adds.
struct FakeBin {
    dir: PathBuf,
}

const FAKE_TOKEN: &str = "5eeded0123456789abcdef0123456789";

impl FakeBin {
    fn new(scratch: &Path) -> FakeBin {
        let dir = scratch.join("fakebin");
        std::fs::create_dir_all(&dir).unwrap();
        write_executable(&dir.join("openssl"), &format!("#!/bin/sh\n[ \"$1 $2 $3\" = 'rand -hex 16' ] || exit 9\necho {FAKE_TOKEN}\n"));
        FakeBin { dir }
    }

    fn path(&self) -> String {
        format!("{}:{}", self.dir.display(), std::env::var("PATH").unwrap_or_default())
    }
}

/// `bash troupe.sbatch ARGS` with a clean Slurm/troupe environment plus `env`.
fn sbatch_command(dir: &Path, path: &str, env: &[(&str, &str)], args: &[&str]) -> Command {
    // The batch script's own shebang; PATH below may not lead to bash.
    let mut cmd = Command::new("/bin/bash");
    cmd.arg(sbatch()).args(args).current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("SLURM_") || k.starts_with("TROUPE_") {
            cmd.env_remove(k);
        }
    }
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    cmd.env("PATH", path).env("TMPDIR", &tmp).env("TROUPE_LOG", "warn,troupe=info,troupe_worker=info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// A dry run's commands (lines that are not notes), as words.
fn dry_run(dir: &Path, fake: &FakeBin, env: &[(&str, &str)], args: &[&str]) -> (String, Vec<Vec<String>>) {
    let out = run(sbatch_command(dir, &fake.path(), env, args), Duration::from_secs(30));
    assert!(out.status.success(), "dry run failed:\n{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let commands = text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).map(shell_words).collect();
    (text, commands)
}

/// What a worker task is started with: the srun command's program part run through bash with
/// the task's SLURM_LOCALID, `troupe` replaced by a stand-in that prints its arguments.
fn task_argv(srun: &[String], local_id: usize, dir: &Path) -> Vec<String> {
    let program = srun.iter().position(|a| !a.starts_with("--") && a != "srun").expect("srun names a program");
    let echo = dir.join("echo-args");
    write_executable(&echo, "#!/bin/sh\nfor a in \"$0\" \"$@\"; do printf '%s\\n' \"$a\"; done\n");
    let mut words: Vec<String> = srun[program..].to_vec();
    let bin = words.iter().position(|w| w.ends_with("/troupe")).expect("the troupe binary is in the command");
    words[bin] = echo.display().to_string();
    let out = Command::new(&words[0]).args(&words[1..]).env("SLURM_LOCALID", local_id.to_string()).output().unwrap();
    assert!(out.status.success(), "{words:?}: {}", String::from_utf8_lossy(&out.stderr));
    let mut argv: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    argv[0] = "troupe".into();
    argv
}

fn assert_no_token(text: &str, argvs: &[&Vec<String>]) {
    for secret in [FAKE_TOKEN, "preset-secret-from-the-submit-shell"] {
        assert!(!text.contains(secret), "a join token is printed:\n{text}");
    }
    for argv in argvs {
        assert!(!argv.iter().any(|a| a == "--token" || a.starts_with("--token=")), "a token on a command line: {argv:?}");
    }
}

#[test]
fn sbatch_is_valid_bash() {
    let out = Command::new("bash").arg("-n").arg(sbatch()).output().unwrap();
    assert!(out.status.success(), "bash -n: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(sbatch()).unwrap();
    assert!(text.starts_with("#!/bin/bash\n"), "a bash shebang (tests/scripts.rs shellchecks it)");
    let directives: Vec<&str> = text.lines().filter(|l| l.starts_with("#SBATCH")).collect();
    for wanted in ["--job-name=", "--nodes=", "--time=", "--signal=B:TERM@", "--output="] {
        assert!(directives.iter().any(|d| d.contains(wanted)), "#SBATCH {wanted}… in {directives:?}");
    }
    // sbatch reads #SBATCH lines only before the first command.
    let lines: Vec<&str> = text.lines().collect();
    let first_command = lines.iter().position(|l| !l.is_empty() && !l.starts_with('#')).unwrap();
    let last_directive = lines.iter().rposition(|l| l.starts_with("#SBATCH")).unwrap();
    assert!(last_directive < first_command, "#SBATCH lines after the first command are ignored by sbatch");
}

#[test]
fn sbatch_dry_run_three_nodes_with_two_gpus_each() {
    let dir = scratch("launchers-dry-gpu");
    let fake = FakeBin::new(&dir);
    let config = root().join("configs/default.toml");
    let (text, commands) = dry_run(
        &dir,
        &fake,
        &[
            ("SLURM_JOB_ID", "4242"),
            ("SLURM_JOB_NODELIST", "gpu[07-09]"),
            ("SLURM_JOB_NUM_NODES", "3"),
            ("SLURM_GPUS_ON_NODE", "2"),
            ("SLURM_CPUS_ON_NODE", "16"),
            ("TROUPE_DRY_RUN", "1"),
            ("TROUPE_BIN", "/opt/troupe/bin/troupe"),
            ("TROUPE_CONFIG", config.to_str().unwrap()),
            ("TROUPE_PORT", "7171"),
            ("TROUPE_METRICS_PORT", "9190"),
            ("TROUPE_WORKER_METRICS_PORT", "9300"),
            ("TROUPE_TOKEN", "preset-secret-from-the-submit-shell"),
        ],
        &["--steps", "100"],
    );
    assert_eq!(commands.len(), 2, "one coordinator command and one srun:\n{text}");
    let coordinator = &commands[0];
    assert_eq!(&coordinator[..2], ["/opt/troupe/bin/troupe", "coordinator"], "{text}");
    assert_eq!(flag(coordinator, "--workers"), Some("6"), "3 nodes x 2 GPUs: {coordinator:?}");
    assert_eq!(flag(coordinator, "--listen"), Some("0.0.0.0:7171"));
    assert_eq!(flag(coordinator, "--steps"), Some("100"), "arguments go to the coordinator");
    let job_config = flag(coordinator, "--config").unwrap();
    assert!(job_config.contains("troupe-4242") && job_config.ends_with("/run.toml"), "{job_config}");
    let before = text.lines().take_while(|l| !l.starts_with("/opt/troupe")).last().unwrap();
    assert!(before.contains("on gpu07"), "the coordinator runs on the first node: {before}");
    assert!(text.contains("listen = \"0.0.0.0:9190\""), "the metrics port goes into the coordinator's config:\n{text}");
    assert!(text.contains("http://gpu07:9190/metrics"), "{text}");

    let srun = &commands[1];
    assert_eq!(srun[0], "srun");
    assert_eq!(flag(srun, "--nodes"), Some("3"));
    assert_eq!(flag(srun, "--ntasks"), Some("6"));
    assert_eq!(flag(srun, "--ntasks-per-node"), Some("2"));
    assert_eq!(flag(srun, "--cpus-per-task"), Some("8"), "16 cores shared by 2 workers");
    assert_eq!(flag(srun, "--export"), Some("ALL"), "the token travels in the environment");
    for local_id in 0..2 {
        let argv = task_argv(srun, local_id, &dir);
        assert_eq!(argv[1], "worker", "{argv:?}");
        assert_eq!(flag(&argv, "--join"), Some("gpu07:7171"), "{argv:?}");
        assert_eq!(flag(&argv, "--device"), Some(format!("cuda:{local_id}").as_str()), "one GPU per worker: {argv:?}");
        assert_eq!(flag(&argv, "--metrics-listen"), Some(format!("0.0.0.0:{}", 9300 + local_id).as_str()));
        assert_eq!(flag(&argv, "--threads"), Some("8"));
        assert_no_token(&argv.join(" "), &[&argv]);
    }
    assert_no_token(&text, &[coordinator, srun]);
    assert!(!dir.join("tmp").read_dir().unwrap().any(|_| true), "a dry run makes no files");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sbatch_dry_run_two_cpu_nodes_uses_scontrol() {
    let dir = scratch("launchers-dry-cpu");
    let fake = FakeBin::new(&dir);
    let asked = dir.join("scontrol-asked");
    write_executable(
        &fake.dir.join("scontrol"),
        &format!(
            "#!/bin/sh\necho \"$*\" >> {}\n[ \"$1 $2 $3\" = 'show hostnames cpu-[a-b]' ] || exit 9\nprintf 'cpu-a\\ncpu-b\\n'\n",
            asked.display()
        ),
    );
    let (text, commands) = dry_run(
        &dir,
        &fake,
        &[
            ("SLURM_JOB_NODELIST", "cpu-[a-b]"),
            ("SLURM_CPUS_ON_NODE", "16"),
            ("TROUPE_BIN", "/shared/bin/troupe"),
            ("TROUPE_CONFIG", root().join("configs/default.toml").to_str().unwrap()),
        ],
        &["--dry-run"],
    );
    assert_eq!(std::fs::read_to_string(&asked).unwrap().trim(), "show hostnames cpu-[a-b]");
    assert_eq!(commands.len(), 2, "{text}");
    let coordinator = &commands[0];
    assert_eq!(flag(coordinator, "--workers"), Some("2"), "one worker per node without GPUs: {coordinator:?}");
    assert_eq!(flag(coordinator, "--listen"), Some("0.0.0.0:7070"), "the default port");
    assert!(!coordinator.contains(&"--dry-run".to_string()));
    let srun = &commands[1];
    assert_eq!((flag(srun, "--nodes"), flag(srun, "--ntasks"), flag(srun, "--ntasks-per-node")), (Some("2"), Some("2"), Some("1")));
    assert_eq!(flag(srun, "--cpus-per-task"), Some("16"), "a worker gets all the node's cores");
    // One task per node: the command is complete as printed.
    let program = srun.iter().position(|a| a == "/shared/bin/troupe").expect("srun runs troupe directly");
    let worker = &srun[program..];
    assert_eq!(worker[1], "worker");
    assert_eq!(flag(worker, "--join"), Some("cpu-a:7070"));
    assert_eq!(flag(worker, "--device"), Some("cpu"));
    assert_eq!(flag(worker, "--threads"), Some("16"));
    assert_eq!(flag(worker, "--metrics-listen"), Some("0.0.0.0:9401"));
    assert!(text.contains("http://cpu-a:9400/metrics"), "the coordinator's metrics on the fixed default port:\n{text}");
    assert_no_token(&text, &[coordinator, srun]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sbatch_expands_host_lists_without_scontrol() {
    let dir = scratch("launchers-hostlist");
    let fake = FakeBin::new(&dir);
    // A PATH without scontrol, whatever the machine has: the script's own expansion.
    let tools = dir.join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    for tool in ["od", "tr", "cat"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap();
        std::os::unix::fs::symlink(String::from_utf8_lossy(&found.stdout).trim(), tools.join(tool)).unwrap();
    }
    let path = format!("{}:{}", fake.dir.display(), tools.display());
    let env = [
        ("SLURM_JOB_NODELIST", "rack[1-2]-n[08-10],login,x[9-10]"),
        ("TROUPE_DRY_RUN", "1"),
        ("TROUPE_BIN", "/t/troupe"),
        ("TROUPE_CONFIG", "/dev/null"),
    ];
    let out = run(sbatch_command(&dir, &path, &env, &[]), Duration::from_secs(30));
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("(rack1-n08 rack1-n09 rack1-n10 rack2-n08 rack2-n09 rack2-n10 login x9 x10)"),
        "zero-padded ranges, several bracket groups, plain names:\n{text}"
    );
    let srun = text.lines().find(|l| l.starts_with("srun ")).map(shell_words).unwrap();
    assert_eq!(flag(&srun, "--nodes"), Some("9"));
    assert!(text.contains("--join rack1-n08:7070"), "{text}");
    // Not a host list it can read: a clear error, no command.
    let bad = [("SLURM_JOB_NODELIST", "n[a-c]"), ("TROUPE_DRY_RUN", "1"), ("TROUPE_BIN", "/t/troupe"), ("TROUPE_CONFIG", "/dev/null")];
    let out = run(sbatch_command(&dir, &path, &bad, &[]), Duration::from_secs(30));
    assert!(!out.status.success() && stderr(&out).contains("cannot expand"), "{}", stderr(&out));
    assert!(!stdout(&out).contains("srun"), "{}", stdout(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stand-in `srun`: starts --ntasks copies of its command here, each with its
/// SLURM_LOCALID/SLURM_PROCID, records their argv and whether TROUPE_TOKEN reached them, passes
/// SIGTERM on, and exits with the worst task status.
fn fake_srun(fake: &FakeBin, log: &Path) {
    write_executable(
        &fake.dir.join("srun"),
        &format!(
            r#"#!/bin/bash
log={log}
ntasks=1
while [ $# -gt 0 ]; do
    case $1 in
        --ntasks=*) ntasks=${{1#*=}}; shift ;;
        --*) shift ;;
        *) break ;;
    esac
done
printf '%s\n' "$@" > "$log/srun.argv"
pids=()
for ((i = 0; i < ntasks; i++)); do
    printf '%s' "${{TROUPE_TOKEN:-}}" > "$log/task-$i.token"
    SLURM_LOCALID=$i SLURM_PROCID=$i SLURM_NODEID=0 "$@" > "$log/task-$i.out" 2>&1 &
    pids+=($!)
done
trap 'kill -TERM "${{pids[@]}}" 2>/dev/null' TERM INT
rc=0
for p in "${{pids[@]}}"; do
    while :; do
        wait "$p"; s=$?
        kill -0 "$p" 2>/dev/null || break
    done
    [ "$s" -le "$rc" ] || rc=$s
done
exit $rc
"#,
            log = log.display()
        ),
    );
}

#[test]
fn sbatch_job_trains_with_real_processes() {
    let dir = scratch("launchers-job");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 1, 4);
    let fake = FakeBin::new(&dir);
    let log = dir.join("srun-log");
    std::fs::create_dir_all(&log).unwrap();
    fake_srun(&fake, &log);
    let real_openssl = Command::new("sh").args(["-c", "command -v openssl"]).output().unwrap();
    if real_openssl.status.success() {
        // A real token for a real run.
        std::fs::remove_file(fake.dir.join("openssl")).unwrap();
    }
    // Probed, not port 0: the script's contract is fixed ports (TROUPE_PORT is what every
    // node's workers join; the metrics ports are what Prometheus is told to scrape), and the
    // test checks that the processes use exactly those.
    let (port, metrics, worker_metrics) = (free_udp_port(), free_tcp_ports(1), free_tcp_ports(2));
    let env = [
        ("SLURM_JOB_ID", "77"),
        ("SLURM_JOB_NODELIST", "127.0.0.1"),
        ("SLURM_JOB_NUM_NODES", "1"),
        ("SLURM_CPUS_ON_NODE", "2"),
        ("TROUPE_WORKERS_PER_NODE", "2"),
        ("TROUPE_BIN", env!("CARGO_BIN_EXE_troupe")),
        ("TROUPE_CONFIG", config.to_str().unwrap()),
        ("TROUPE_PORT", &port.to_string()),
        ("TROUPE_METRICS_PORT", &metrics.to_string()),
        ("TROUPE_WORKER_METRICS_PORT", &worker_metrics.to_string()),
        ("TROUPE_WORKER_GRACE", "20"),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, *v)).collect();
    let out = run(sbatch_command(&dir, &fake.path(), &env, &[]), Duration::from_secs(240));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    let tasks: Vec<String> = (0..2).map(|i| std::fs::read_to_string(log.join(format!("task-{i}.out"))).unwrap_or_default()).collect();
    assert!(out.status.success(), "the job failed ({}):\n{text}\n--- tasks\n{}", out.status, tasks.join("\n---\n"));

    let run_dir = dir.join("runs/tiny");
    let events = events(&run_dir);
    let joined = events.iter().filter(|e| matches!(e, RunEvent::WorkerJoined { .. })).count();
    assert_eq!(joined, 2, "both workers of the node joined: {events:?}");
    assert!(events.iter().any(|e| matches!(e, RunEvent::Finished { step: 4, .. })), "{events:?}");
    assert!(text.contains(&format!("coordinator metrics on http://0.0.0.0:{metrics}/metrics")), "the fixed metrics port:\n{text}");
    for (i, task) in tasks.iter().enumerate() {
        let port = worker_metrics + i as u16;
        assert!(task.contains(&format!("worker metrics on http://0.0.0.0:{port}/metrics")), "task {i}:\n{task}");
    }
    // One fresh token, in both workers' environment, on no command line and in no log.
    let tokens: Vec<String> = (0..2).map(|i| std::fs::read_to_string(log.join(format!("task-{i}.token"))).unwrap()).collect();
    assert_eq!(tokens[0], tokens[1]);
    assert!(tokens[0].len() == 32 && tokens[0].chars().all(|c| c.is_ascii_hexdigit()), "{:?}", tokens[0]);
    let srun_argv = std::fs::read_to_string(log.join("srun.argv")).unwrap();
    for place in [&text, &srun_argv, &tasks[0], &tasks[1]] {
        assert!(!place.contains(&tokens[0]), "the token leaked:\n{place}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("tmp")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(leftovers.is_empty(), "the job's private config is removed: {leftovers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stand-in `troupe`: the coordinator records its arguments, config and token and behaves as
/// $FAKE_COORDINATOR says; a worker as $FAKE_WORKER says.
fn fake_troupe(dir: &Path) -> PathBuf {
    let bin = dir.join("bin/troupe");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    write_executable(
        &bin,
        &format!(
            r#"#!/bin/bash
log={log}
role=$1
if [ "$role" = coordinator ]; then
    printf '%s\n' "$@" > "$log/coordinator.argv"
    printf '%s' "${{TROUPE_TOKEN:-}}" > "$log/coordinator.token"
    while [ $# -gt 0 ]; do
        if [ "$1" = --config ]; then cp "$2" "$log/coordinator.toml"; fi
        shift
    done
    trap 'echo TERM >> "$log/coordinator.signals"; exit 0' TERM
    case $FAKE_COORDINATOR in
        exit3) sleep 0.5; exit 3 ;;
        forever) while :; do sleep 0.1; done ;;
    esac
else
    trap 'echo TERM >> "$log/worker-$SLURM_LOCALID.signals"; exit 0' TERM
    case $FAKE_WORKER in
        fail) exit 1 ;;
        forever) while :; do sleep 0.1; done ;;
    esac
fi
"#,
            log = dir.join("log").display()
        ),
    );
    std::fs::create_dir_all(dir.join("log")).unwrap();
    bin
}

struct FakeJob {
    dir: PathBuf,
    fake: FakeBin,
    bin: PathBuf,
}

impl FakeJob {
    fn new(name: &str) -> FakeJob {
        let dir = scratch(name);
        let fake = FakeBin::new(&dir);
        std::fs::create_dir_all(dir.join("srun-log")).unwrap();
        fake_srun(&fake, &dir.join("srun-log"));
        let bin = fake_troupe(&dir);
        FakeJob { dir, fake, bin }
    }

    fn command(&self, coordinator: &str, worker: &str) -> Command {
        let config = root().join("configs/default.toml");
        let env = [
            ("SLURM_JOB_ID", "99"),
            ("SLURM_JOB_NODELIST", "node[1-2]"),
            ("SLURM_GPUS_PER_NODE", "h100:2"),
            ("TROUPE_WORKERS_PER_NODE", "1"),
            ("TROUPE_BIN", self.bin.to_str().unwrap()),
            ("TROUPE_CONFIG", config.to_str().unwrap()),
            ("TROUPE_METRICS_PORT", "9555"),
            ("TROUPE_WORKER_GRACE", "2"),
            ("FAKE_COORDINATOR", coordinator),
            ("FAKE_WORKER", worker),
        ];
        sbatch_command(&self.dir, &self.fake.path(), &env, &[])
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join("log").join(name)).unwrap_or_default()
    }
}

#[test]
fn sbatch_job_exits_with_the_coordinators_code_and_stops_the_workers() {
    let job = FakeJob::new("launchers-exit");
    let started = Instant::now();
    let out = run(job.command("exit3", "forever"), Duration::from_secs(60));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(3), "the job's exit code is the coordinator's:\n{text}");
    assert!(started.elapsed() < Duration::from_secs(30), "the workers were stopped after the grace period");
    assert!(text.contains("workers still running"), "{text}");
    assert_eq!(job.log("worker-0.signals").trim(), "TERM", "srun passed SIGTERM to the worker:\n{text}");

    // What the coordinator got: the config with [metrics] replaced, through troupe's loader.
    let argv: Vec<String> = job.log("coordinator.argv").lines().map(str::to_string).collect();
    assert_eq!(flag(&argv, "--workers"), Some("2"), "TROUPE_WORKERS_PER_NODE=1 on 2 nodes: {argv:?}");
    let written = Config::from_toml_str(&job.log("coordinator.toml"), "the job's config").expect("a valid config");
    let mut expected = Config::default_config();
    expected.metrics.listen = "0.0.0.0:9555".into();
    assert_eq!(written, expected, "only metrics.listen differs from the user's config");
    let token = job.log("coordinator.token");
    assert_eq!(token.len(), 32, "the coordinator has the token in its environment");
    assert!(!argv.iter().any(|a| a.contains(&token)) && !text.contains(&token));
    // The GPU count came from SLURM_GPUS_PER_NODE ("h100:2"): cuda devices.
    let srun_argv = std::fs::read_to_string(job.dir.join("srun-log/srun.argv")).unwrap();
    assert!(srun_argv.contains("cuda:0"), "{srun_argv}");
    let _ = std::fs::remove_dir_all(&job.dir);
}

#[test]
fn sbatch_job_stops_a_coordinator_left_without_workers() {
    let job = FakeJob::new("launchers-no-workers");
    let out = run(job.command("forever", "fail"), Duration::from_secs(60));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(job.log("coordinator.signals").trim(), "TERM", "{text}");
    assert_eq!(out.status.code(), Some(1), "no worker left is a failed job even if the coordinator exits 0:\n{text}");
    assert!(text.contains("no worker was left"), "{text}");
    let _ = std::fs::remove_dir_all(&job.dir);
}

#[test]
fn sbatch_job_passes_sigterm_to_the_coordinator() {
    let job = FakeJob::new("launchers-sigterm");
    let mut child = job.command("forever", "forever").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while job.log("coordinator.argv").is_empty() || !job.dir.join("srun-log/srun.argv").exists() {
        assert!(started.elapsed() < Duration::from_secs(30), "the job did not start its processes");
        std::thread::sleep(Duration::from_millis(50));
    }
    // As Slurm does before the time limit with --signal=B:TERM@120: to the batch shell only.
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the job did not end after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(job.log("coordinator.signals").trim(), "TERM", "{err}");
    assert_eq!(status.code(), Some(0), "the coordinator's exit code after a graceful stop:\n{err}");
    let _ = std::fs::remove_dir_all(&job.dir);
}

#[test]
fn sbatch_passes_shellcheck() {
    let found = Command::new("shellcheck").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !found {
        skip_or_fail("shellcheck is not installed (scripts/test.sh installs it: apt-get install shellcheck)");
        return;
    }
    let out = Command::new("shellcheck").arg("--external-sources").arg(sbatch()).current_dir(root()).output().unwrap();
    assert!(out.status.success(), "shellcheck:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

// --- Kubernetes ------------------------------------------------------------------------------

fn k8s_dir() -> PathBuf {
    root().join("deploy/k8s")
}

/// Every YAML file of deploy/k8s with its documents.
fn k8s_files() -> Vec<(String, Vec<Value>)> {
    let mut files: Vec<_> = std::fs::read_dir(k8s_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
                .map(|doc| serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display())))
                .filter(|v: &Value| !v.is_null())
                .collect();
            assert!(!docs.is_empty(), "{}: no document", path.display());
            (path.file_name().unwrap().to_string_lossy().into_owned(), docs)
        })
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name).unwrap_or_else(|| panic!("no {kind} {name} in deploy/k8s"))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// The port part of an IP:port address.
fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// A container's port by name: (number, protocol).
fn container_port(container: &Value, name: &str) -> (u64, String) {
    let port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no port {name} in {}", container["name"]));
    (port["containerPort"].as_u64().unwrap(), port["protocol"].as_str().unwrap_or("TCP").to_string())
}

/// The words of a container's command line (`bash -c` scripts split on whitespace, quotes
/// dropped).
fn command_words(container: &Value) -> Vec<String> {
    let mut words = Vec::new();
    for part in ["command", "args"] {
        for w in container[part].as_array().into_iter().flatten() {
            words.extend(str_of(w).split_whitespace().map(|s| s.trim_matches('"').to_string()));
        }
    }
    words
}

#[test]
fn k8s_manifests_fit_together() {
    let files = k8s_files();
    let all: Vec<Value> = files.iter().flat_map(|(_, d)| d.clone()).collect();

    // Every object: apiVersion, kind, name; every container: image, resources, no secrets.
    let kustomization = &files.iter().find(|(f, _)| f == "kustomization.yaml").expect("a kustomization.yaml").1[0];
    assert_eq!(kustomization["kind"], "Kustomization");
    let objects: Vec<&Value> = all.iter().filter(|d| d["kind"] != "Kustomization").collect();
    for doc in &objects {
        assert!(doc["apiVersion"].is_string() && doc["kind"].is_string(), "{doc}");
        let name = str_of(&doc["metadata"]["name"]);
        assert!(
            !name.is_empty() && name.len() <= 63 && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{name}"
        );
        let pod = &doc["spec"]["template"]["spec"];
        for container in pod["containers"].as_array().into_iter().flatten() {
            assert!(str_of(&container["image"]).starts_with("troupe:"), "the image kustomization.yaml renames: {container}");
            for side in ["requests", "limits"] {
                for what in ["cpu", "memory"] {
                    assert!(container["resources"][side][what].is_string(), "{} {side}.{what}", container["name"]);
                }
            }
        }
    }

    // kustomization.yaml lists every manifest but the Secret template and the optional
    // ServiceMonitor, and only files that exist.
    let listed: BTreeSet<String> = kustomization["resources"].as_array().unwrap().iter().map(|r| str_of(r).to_string()).collect();
    let present: BTreeSet<String> = files.iter().map(|(f, _)| f.clone()).filter(|f| f != "kustomization.yaml").collect();
    let unlisted: BTreeSet<String> = present.difference(&listed).cloned().collect();
    assert!(listed.is_subset(&present), "{listed:?} vs {present:?}");
    assert_eq!(unlisted, BTreeSet::from(["secret.template.yaml".to_string(), "servicemonitor.yaml".to_string()]));
    assert_eq!(kustomization["images"][0]["name"], "troupe");

    // The run config, read by troupe's own loader.
    let configmap = find(&all, "ConfigMap", "troupe-config");
    let config = Config::from_toml_str(str_of(&configmap["data"]["run.toml"]), "the ConfigMap's run.toml").expect("a valid run config");
    assert!(config.cluster.token.is_empty(), "the token comes from the Secret, not the ConfigMap");
    assert_eq!(config.data.source, "none", "the image has no pip to download a corpus with");

    // The coordinator: one pod at a time, behind a Service with QUIC on UDP.
    let deployment = find(&all, "Deployment", "troupe-coordinator");
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let pod_labels = deployment["spec"]["template"]["metadata"]["labels"].as_object().unwrap();
    for (k, v) in deployment["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "the Deployment selects its own pods");
    }
    let coordinator = &deployment["spec"]["template"]["spec"]["containers"][0];
    let (quic_port, quic_protocol) = container_port(coordinator, "quic");
    assert_eq!(quic_protocol, "UDP", "QUIC is UDP");
    assert_eq!(quic_port, port_of(&config.cluster.listen), "cluster.listen");
    let (metrics_port, metrics_protocol) = container_port(coordinator, "metrics");
    assert_eq!(metrics_protocol, "TCP");
    assert_eq!(metrics_port, port_of(&config.metrics.listen), "metrics.listen");
    let words = command_words(coordinator);
    let config_mount = coordinator["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "config").unwrap();
    assert_eq!(flag(&words, "--config").unwrap(), format!("{}/run.toml", str_of(&config_mount["mountPath"])));
    assert_eq!(port_of(flag(&words, "--listen").unwrap()), quic_port);
    assert!(words.contains(&"--resume".to_string()), "a restarted coordinator continues the run");
    let readiness = &coordinator["readinessProbe"]["httpGet"];
    assert_eq!((readiness["path"].as_str(), readiness["port"].as_str()), (Some("/metrics"), Some("metrics")));

    let service = find(&all, "Service", "troupe-coordinator");
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "the Service selects the coordinator's pods ({k})");
    }
    let service_ports = service["spec"]["ports"].as_array().unwrap();
    let udp = service_ports.iter().find(|p| p["protocol"] == "UDP").expect("a UDP port");
    assert_eq!((udp["port"].as_u64(), udp["targetPort"].as_str()), (Some(quic_port), Some("quic")));
    let tcp = service_ports.iter().find(|p| p["name"] == "metrics").expect("a metrics port");
    assert_eq!((tcp["protocol"].as_str(), tcp["port"].as_u64()), (Some("TCP"), Some(metrics_port)));

    // The workers: an Indexed Job of cluster.workers pods that join the Service.
    let job = find(&all, "Job", "troupe-workers");
    assert_eq!(job["spec"]["completionMode"], "Indexed");
    assert_eq!(job["spec"]["parallelism"], job["spec"]["completions"]);
    assert_eq!(job["spec"]["parallelism"].as_u64(), Some(config.cluster.workers as u64), "cluster.workers in the ConfigMap");
    let worker = &job["spec"]["template"]["spec"]["containers"][0];
    let words = command_words(worker);
    assert_eq!(words.iter().position(|w| w == "worker").map(|i| &words[i - 1]).map(String::as_str), Some("troupe"));
    assert_eq!(flag(&words, "--join").unwrap(), format!("{}:{}", str_of(&service["metadata"]["name"]), udp["port"]));
    assert_eq!(flag(&words, "--tls-worker"), Some("$JOB_COMPLETION_INDEX"), "pod i presents worker-i's certificate");
    assert_eq!(flag(&words, "--threads"), worker["resources"]["limits"]["cpu"].as_str(), "one thread per core of the CPU limit");
    let (worker_metrics, _) = container_port(worker, "metrics");
    assert_eq!(port_of(flag(&words, "--metrics-listen").unwrap()), worker_metrics);

    // Both pods: Prometheus annotations on the metrics port, the token from the Secret,
    // /shared holding the data and the runs.
    for (pod, port) in [(&deployment["spec"]["template"], metrics_port), (&job["spec"]["template"], worker_metrics)] {
        let annotations = &pod["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], port.to_string());
        assert_eq!(annotations["prometheus.io/path"], "/metrics");
        let container = &pod["spec"]["containers"][0];
        let token = container["env"].as_array().unwrap().iter().find(|e| e["name"] == "TROUPE_TOKEN").expect("TROUPE_TOKEN");
        assert!(token["valueFrom"]["secretKeyRef"].is_object(), "the token comes from a Secret");
        let shared = container["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "shared").expect("/shared");
        let shared = Path::new(str_of(&shared["mountPath"]));
        assert!(
            config.data.dir.starts_with(shared) && config.run.out_dir.starts_with(shared),
            "data.dir and run.out_dir on the shared volume"
        );
        let tls = container["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "tls").expect("certificates");
        assert_eq!(flag(&command_words(container), "--tls-dir"), tls["mountPath"].as_str());
    }

    // Everything a pod refers to exists, with the keys it uses.
    let secret_keys = |name: &str| -> BTreeSet<String> {
        let secret = find(&all, "Secret", name);
        secret["stringData"].as_object().or(secret["data"].as_object()).unwrap().keys().cloned().collect()
    };
    for pod in [&deployment["spec"]["template"]["spec"], &job["spec"]["template"]["spec"]] {
        for volume in pod["volumes"].as_array().unwrap() {
            if let Some(name) = volume["secret"]["secretName"].as_str() {
                let keys = secret_keys(name);
                if name.ends_with("-tls") {
                    assert!(keys.contains("ca.pem"), "{name}: {keys:?}");
                    assert!(!keys.contains("ca-key.pem"), "the CA key stays off the cluster");
                }
            }
            if let Some(name) = volume["configMap"]["name"].as_str() {
                find(&all, "ConfigMap", name);
            }
            if let Some(name) = volume["persistentVolumeClaim"]["claimName"].as_str() {
                let pvc = find(&all, "PersistentVolumeClaim", name);
                assert!(pvc["spec"]["accessModes"].as_array().unwrap().iter().any(|m| m == "ReadWriteMany"), "every pod mounts it at once");
            }
        }
        for container in pod["containers"].as_array().unwrap() {
            for env in container["env"].as_array().into_iter().flatten() {
                if let Some(r) = env["valueFrom"]["secretKeyRef"].as_object() {
                    assert!(secret_keys(str_of(&r["name"])).contains(str_of(&r["key"])), "{env}");
                }
            }
            for mount in container["volumeMounts"].as_array().unwrap() {
                assert!(pod["volumes"].as_array().unwrap().iter().any(|v| v["name"] == mount["name"]), "{mount}");
            }
        }
    }
    let coordinator_tls = secret_keys("troupe-coordinator-tls");
    for key in ["ca.pem", "coordinator.pem", "coordinator-key.pem"] {
        assert!(coordinator_tls.contains(key), "troupe coordinator --tls-dir reads {key}");
    }
    let worker_tls = secret_keys("troupe-worker-tls");
    for i in 0..config.cluster.workers {
        for key in [format!("worker-{i}.pem"), format!("worker-{i}-key.pem")] {
            assert!(worker_tls.contains(&key), "troupe worker --tls-worker {i} reads {key}");
        }
    }
    // No real secret in the repository: the template holds placeholders only.
    let template = std::fs::read_to_string(k8s_dir().join("secret.template.yaml")).unwrap();
    assert!(!template.contains("PRIVATE KEY") && !template.contains("BEGIN CERTIFICATE"));
    for doc in &files.iter().find(|(f, _)| f == "secret.template.yaml").unwrap().1 {
        assert!(doc["data"].is_null(), "no base64 data in the template");
        for (key, value) in doc["stringData"].as_object().unwrap() {
            assert!(str_of(value).starts_with("REPLACE_WITH"), "{key} is a placeholder");
        }
    }

    // The optional ServiceMonitor finds both Services' metrics ports.
    let monitor = find(&all, "ServiceMonitor", "troupe");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let selector = monitor["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let endpoint_port = str_of(&monitor["spec"]["endpoints"][0]["port"]);
    let workers_service = find(&all, "Service", "troupe-workers");
    for svc in [service, workers_service] {
        let labels = svc["metadata"]["labels"].as_object().unwrap();
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)), "the ServiceMonitor selects {}", svc["metadata"]["name"]);
        assert!(svc["spec"]["ports"].as_array().unwrap().iter().any(|p| p["name"] == endpoint_port && p["protocol"] == "TCP"));
    }
    let worker_labels = job["spec"]["template"]["metadata"]["labels"].as_object().unwrap();
    for (k, v) in workers_service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(worker_labels.get(k), Some(v), "troupe-workers selects the worker pods");
    }
    let wp = &workers_service["spec"]["ports"][0];
    assert_eq!((wp["port"].as_u64(), wp["targetPort"].as_str()), (Some(worker_metrics), Some("metrics")));
}

/// Where scripts/test.sh installs kubernetes-validate.
fn k8s_validate_dir() -> PathBuf {
    troupe_cache().join("python-k8s-validate")
}

#[test]
fn k8s_manifests_validate_against_the_kubernetes_schemas() {
    let pythonpath = k8s_validate_dir();
    let importable = Command::new("python3")
        .env("PYTHONPATH", &pythonpath)
        .args(["-c", "import kubernetes_validate"])
        .status()
        .is_ok_and(|s| s.success());
    if !importable {
        skip_or_fail(&format!("kubernetes-validate is not installed in {} (scripts/test.sh installs it)", pythonpath.display()));
        return;
    }
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(k8s_dir()).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "yaml")).collect();
    files.sort();
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", &pythonpath).arg(root().join("tests/python/validate_k8s.py")).args(&files);
    let out: Output = run(cmd, Duration::from_secs(120));
    let text = stdout(&out);
    assert!(out.status.success(), "the manifests do not validate:\n{text}{}", stderr(&out));
    // Every API object was checked (twice: the oldest and the newest Kubernetes version).
    let objects =
        k8s_files().iter().flat_map(|(_, d)| d.clone()).filter(|d| d["kind"] != "Kustomization" && d["kind"] != "ServiceMonitor").count();
    assert_eq!(text.lines().filter(|l| l.starts_with("OK ")).count(), 2 * objects, "{text}");
    println!("{}", text.lines().last().unwrap_or_default());
}

#[test]
fn dockerfile_copies_what_the_build_needs() {
    let text = std::fs::read_to_string(root().join("deploy/docker/Dockerfile")).unwrap();
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage: {froms:?}");
    assert!(froms[0].contains("AS build") && froms[1].trim() == "FROM debian:bookworm-slim", "{froms:?}");
    assert!(text.contains("torch==2.11.0"), "the libtorch that tch 0.24 expects");
    // Every COPY from the build context names something that exists, and together they hold
    // what `cargo build` reads: the manifests, the workspace members, build.rs, the benches
    // Cargo.toml declares and the embedded default config.
    let mut copied = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from=")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        for source in &words[1..words.len() - 1] {
            assert!(root().join(source).exists(), "COPY {source}: not in the repository");
            copied.insert(source.to_string());
        }
    }
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let members = manifest.lines().find(|l| l.starts_with("members")).unwrap();
    let members: Vec<&str> = members.split('"').skip(1).step_by(2).collect();
    for needed in ["Cargo.toml", "Cargo.lock", "build.rs", "src", "configs", "benches"].into_iter().chain(members) {
        assert!(copied.contains(needed), "the image build needs {needed}: {copied:?}");
    }
    // The pods run as the image's user.
    assert!(text.contains("USER 10001:10001"));
    for doc in k8s_files().iter().flat_map(|(_, d)| d.clone()) {
        let sc = &doc["spec"]["template"]["spec"]["securityContext"];
        if !sc.is_null() {
            assert_eq!(sc["runAsUser"], 10001);
        }
    }
}

/// A one-node Slurm cluster of this machine, for real: `munged`, `slurmctld` and `slurmd` from
/// Debian's packages (scripts/test.sh installs them), on loopback ports of their own, with
/// their state, spool, logs and munge key in a scratch folder. Every daemon is stopped when
/// this is dropped. None (with the reason) where it cannot run: not root, or Slurm missing.
struct SlurmCluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl SlurmCluster {
    fn start(name: &str) -> Result<SlurmCluster, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("the Slurm daemons need root".into());
        }
        for tool in ["munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "sinfo"] {
            if !Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success()) {
                return Err(format!(
                    "{tool} is not installed (Debian: slurmd slurmctld slurm-client munge; scripts/test.sh installs them)"
                ));
            }
        }
        let dir = scratch(name);
        for sub in ["state", "spool", "log", "munge"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let key = dir.join("munge/munge.key");
        let mut bytes = vec![0u8; 1024];
        std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut bytes).unwrap();
        std::fs::write(&key, &bytes).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
        let socket = dir.join("munge/munge.sock");
        let munged = Command::new("munged")
            .arg("--force")
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.join("munge/munged.pid").display()))
            .arg(format!("--log-file={}", dir.join("munge/munged.log").display()))
            .arg(format!("--seed-file={}", dir.join("munge/seed").display()))
            .status()
            .map_err(|e| format!("cannot start munged: {e}"))?;
        if !munged.success() {
            return Err(format!("munged failed ({munged})"));
        }
        let host = String::from_utf8(Command::new("hostname").arg("-s").output().unwrap().stdout).unwrap().trim().to_string();
        let ports = free_tcp_ports(2);
        let d = dir.display();
        let conf = dir.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=trouptest\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={ports}\nSlurmdPort={}\n\
                 AuthType=auth/munge\nAuthInfo=socket={}\nCredType=cred/munge\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSwitchType=switch/none\nMpiDefault=none\n\
                 SlurmUser=root\nSlurmdUser=root\nStateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
                 SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
                 SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
                 SchedulerType=sched/backfill\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core\nReturnToService=2\n\
                 JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\nKillWait=30\n\
                 NodeName={host} NodeAddr=127.0.0.1 CPUs={} State=UNKNOWN\n\
                 PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP\n",
                ports + 1,
                socket.display(),
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
        )
        .unwrap();
        let cluster = SlurmCluster { dir, conf };
        for daemon in [&["slurmctld", "-c", "-i"][..], &["slurmd"][..]] {
            let status = cluster.command(daemon[0]).args(&daemon[1..]).status().map_err(|e| format!("cannot start {}: {e}", daemon[0]))?;
            if !status.success() {
                return Err(format!("{} failed ({status}); its log: {}", daemon[0], cluster.log(daemon[0])));
            }
        }
        let started = Instant::now();
        loop {
            let state =
                cluster.command("sinfo").args(["-h", "-o", "%t"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
            if state.as_ref().is_ok_and(|s| s == "idle") {
                return Ok(cluster);
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(format!("the node is not idle after 60 s ({state:?}); slurmd's log: {}", cluster.log("slurmd")));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A Slurm command for this cluster.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SLURM_CONF", &self.conf);
        cmd
    }

    fn log(&self, daemon: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("log/{daemon}.log"))).unwrap_or_default()
    }

    /// The job's state and exit code as `scontrol show job` says them.
    fn job(&self, id: &str) -> (String, String) {
        let out = self.command("scontrol").args(["show", "job", id]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let field = |name: &str| text.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}="))).unwrap_or_default().to_string();
        (field("JobState"), field("ExitCode"))
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        let _ = self.command("scancel").args(["--full", "--user", "root"]).status();
        for pid_file in ["slurmd.pid", "slurmctld.pid", "munge/munged.pid"] {
            if let Ok(pid) = std::fs::read_to_string(self.dir.join(pid_file)) {
                let pid = pid.trim().to_string();
                let _ = Command::new("kill").args(["-TERM", &pid]).status();
                // Wait for it to go, so that the next test's daemons find their ports free.
                for _ in 0..100 {
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// `troupe.sbatch` submitted to a real Slurm (one node, two workers): the job trains to the end
/// and its exit code is the coordinator's; `scancel --batch --signal=TERM` (what
/// `--signal=B:TERM@120` does before the time limit) and `scancel --signal=TERM` (to the
/// workers' step) each make it checkpoint and stop; a job whose coordinator cannot start fails,
/// and its workers are stopped.
#[test]
fn the_sbatch_script_runs_on_a_real_slurm_cluster() {
    let cluster = match SlurmCluster::start("launchers-slurm") {
        Ok(c) => c,
        Err(why) => {
            skip_or_fail(&format!("no Slurm cluster here: {why}"));
            return;
        }
    };
    let data = prepare_small_corpus(&cluster.dir);
    let submit = |name: &str, steps: u64, config_override: Option<&Path>| -> (PathBuf, String) {
        let here = cluster.dir.join(name);
        std::fs::create_dir_all(&here).unwrap();
        let config = tiny_config(&here, &data, 2, steps);
        let (port, metrics, worker_metrics) = (free_udp_port(), free_tcp_ports(1), free_tcp_ports(2));
        let out = cluster
            .command("sbatch")
            .current_dir(&here)
            .args(["--parsable", "--nodes=1", "--ntasks-per-node=2", "--output", "job.out"])
            .arg(sbatch())
            .env("TROUPE_BIN", env!("CARGO_BIN_EXE_troupe"))
            .env("TROUPE_CONFIG", config_override.unwrap_or(&config))
            .env("TROUPE_WORKERS_PER_NODE", "2")
            .env("TROUPE_DEVICE", "cpu")
            .env("TROUPE_PORT", port.to_string())
            .env("TROUPE_METRICS_PORT", metrics.to_string())
            .env("TROUPE_WORKER_METRICS_PORT", worker_metrics.to_string())
            .env("TROUPE_WORKER_GRACE", "20")
            .env("TROUPE_CONNECT_TIMEOUT", "30")
            .output()
            .unwrap();
        assert!(out.status.success(), "sbatch refused the job: {}", String::from_utf8_lossy(&out.stderr));
        (here, String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap().to_string())
    };
    let wait_done = |id: &str, here: &Path| -> (String, String) {
        let mut last = (String::new(), String::new());
        wait_until(&format!("job {id} to end"), Duration::from_secs(240), Duration::from_millis(250), || {
            last = cluster.job(id);
            !matches!(last.0.as_str(), "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "")
        });
        println!("job {id}: {} exit {}\n{}", last.0, last.1, std::fs::read_to_string(here.join("job.out")).unwrap_or_default());
        last
    };

    // 1. To the end: the coordinator's exit code (0) is the job's.
    let (here, id) = submit("to-the-end", 6, None);
    let (state, code) = wait_done(&id, &here);
    assert_eq!(
        (state.as_str(), code.as_str()),
        ("COMPLETED", "0:0"),
        "{}",
        std::fs::read_to_string(here.join("job.out")).unwrap_or_default()
    );
    let finished = events(&here.join("runs/tiny"));
    assert_eq!(finished.iter().filter(|e| matches!(e, RunEvent::WorkerJoined { .. })).count(), 2, "{finished:?}");
    assert!(finished.iter().any(|e| matches!(e, RunEvent::Finished { step: 6, .. })), "{finished:?}");

    // 2. SIGTERM to the batch shell while training: a checkpoint, then a clean stop.
    let (here, id) = submit("sigterm", 100_000, None);
    let run_dir = here.join("runs/tiny");
    wait_until("the job to train a few steps", Duration::from_secs(120), Duration::from_millis(200), || {
        run_dir.join("events.jsonl").is_file() && events(&run_dir).iter().filter(|e| matches!(e, RunEvent::Step { .. })).count() >= 3
    });
    let signalled = cluster.command("scancel").args(["--batch", "--signal=TERM", &id]).status().unwrap();
    assert!(signalled.success());
    let (state, code) = wait_done(&id, &here);
    assert_eq!((state.as_str(), code.as_str()), ("COMPLETED", "0:0"), "a graceful stop is the coordinator's 0");
    let stopped = events(&run_dir);
    assert!(stopped.iter().any(|e| matches!(e, RunEvent::Checkpoint { .. })), "it checkpointed before stopping: {stopped:?}");

    // 2b. SIGTERM to every step of the job (`scancel --signal=TERM`: the workers): the same.
    let (here, id) = submit("sigterm-steps", 100_000, None);
    let run_dir = here.join("runs/tiny");
    wait_until("the job to train a few steps", Duration::from_secs(120), Duration::from_millis(200), || {
        run_dir.join("events.jsonl").is_file() && events(&run_dir).iter().filter(|e| matches!(e, RunEvent::Step { .. })).count() >= 3
    });
    assert!(cluster.command("scancel").args(["--signal=TERM", &id]).status().unwrap().success());
    let (state, code) = wait_done(&id, &here);
    assert_eq!((state.as_str(), code.as_str()), ("COMPLETED", "0:0"), "the workers' TERM stops the run gracefully");
    let stopped = events(&run_dir);
    assert!(stopped.iter().any(|e| matches!(e, RunEvent::Checkpoint { .. })), "it checkpointed before stopping: {stopped:?}");

    // 3. A coordinator that cannot start (its config does not parse): the job fails, and the
    // workers it started are stopped.
    let bad = cluster.dir.join("bad.toml");
    std::fs::write(&bad, "[train]\nsteps = \"many\"\n").unwrap();
    let (here, id) = submit("bad-config", 6, Some(&bad));
    let (state, code) = wait_done(&id, &here);
    assert_eq!(state, "FAILED", "exit {code}");
    assert_ne!(code, "0:0");
    let leftover = Command::new("pgrep").args(["-f", &format!("{} worker", env!("CARGO_BIN_EXE_troupe"))]).output().unwrap();
    assert!(!leftover.status.success(), "workers left running: {}", String::from_utf8_lossy(&leftover.stdout));
}
