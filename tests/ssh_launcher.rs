//! `scripts/launch-ssh.sh` as a user runs it: a real OpenSSH server (Debian's package;
//! `scripts/test.sh` installs it where apt works) answering on two loopback addresses,
//! 127.0.0.2 and 127.0.0.3, that stand for two hosts; keys made here. The launcher copies the
//! binary and config over ssh, starts a coordinator and a worker per host, gathers the logs,
//! stops everything on Ctrl-C and exits with the coordinator's status.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use troupe_core::events::RunEvent;

const HOSTS: [&str; 2] = ["127.0.0.2", "127.0.0.3"];

struct Sshd {
    _process: KillOnDrop,
    port: u16,
    key: PathBuf,
}

/// An sshd on 127.0.0.2 and 127.0.0.3 that admits a key made here; None where OpenSSH is not
/// installed (the test then skips, or fails under CI=true).
fn start_sshd(dir: &Path) -> Option<Sshd> {
    let installed = Path::new("/usr/sbin/sshd").exists() && Command::new("ssh-keygen").arg("-?").output().is_ok();
    if !installed {
        skip_or_fail("OpenSSH (openssh-server, openssh-client) is not installed (scripts/test.sh installs it)");
        return None;
    }
    let ssh = dir.join("ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    for key in ["host_key", "client_key"] {
        let out = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(ssh.join(key)).output().unwrap();
        assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::copy(ssh.join("client_key.pub"), ssh.join("authorized_keys")).unwrap();
    // sshd insists on its privilege-separation folder.
    let _ = std::fs::create_dir_all("/run/sshd");
    // Probed, not port 0: sshd refuses `Port 0` ("Badly formatted port number"), and both
    // "hosts" must answer on the same port (the launcher passes one `-p PORT` to every ssh).
    let port = std::net::TcpListener::bind((HOSTS[0], 0)).unwrap().local_addr().unwrap().port();
    let config = format!(
        "Port {port}\nListenAddress {}\nListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
         PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n",
        HOSTS[0],
        HOSTS[1],
        ssh.join("host_key").display(),
        ssh.join("authorized_keys").display(),
        ssh.join("sshd.pid").display(),
    );
    std::fs::write(ssh.join("sshd_config"), config).unwrap();
    let log = std::fs::File::create(ssh.join("sshd.log")).unwrap();
    let process = KillOnDrop(
        Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(ssh.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start sshd"),
    );
    let sshd = Sshd { _process: process, port, key: ssh.join("client_key") };
    // Ready when both "hosts" answer a command.
    let started = Instant::now();
    for host in HOSTS {
        loop {
            let ok = ssh_command(&sshd).arg(host).arg("true").stdin(Stdio::null()).output().map(|o| o.status.success()).unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "sshd does not answer:\n{}",
                std::fs::read_to_string(ssh.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Some(sshd)
}

fn ssh_options(sshd: &Sshd) -> Vec<String> {
    let key = sshd.key.display().to_string();
    [
        "-p",
        &sshd.port.to_string(),
        "-i",
        &key,
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn ssh_command(sshd: &Sshd) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.args(["-o", "BatchMode=yes"]).args(ssh_options(sshd));
    cmd
}

/// `scripts/launch-ssh.sh` on both hosts, in its own process group (as a terminal runs it, so
/// that Ctrl-C reaches the whole group).
fn launcher(sshd: &Sshd, dir: &Path, config: &Path, extra: &[&str]) -> Command {
    use std::os::unix::process::CommandExt;
    // Probed, not port 0: the launcher starts the workers with `--join HOST:PORT` alongside the
    // coordinator, so the port must be known before anything listens on it.
    let port = free_udp_port();
    let mut cmd = Command::new(root().join("scripts/launch-ssh.sh"));
    cmd.arg("--hosts")
        .arg(HOSTS.join(","))
        .arg("--config")
        .arg(config)
        .args(["--port", &port.to_string(), "--worker-args", "--threads 1", "--binary", env!("CARGO_BIN_EXE_troupe")])
        .arg("--remote-dir")
        .arg(dir.join("remote"))
        .arg("--logs")
        .arg(dir.join("logs"))
        .args(extra);
    for opt in ssh_options(sshd) {
        cmd.arg("--ssh-opt").arg(opt);
    }
    cmd.process_group(0);
    cmd
}

fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join("logs").join(name)).unwrap_or_default()
}

/// Pids recorded by the launched processes (the remote folder is this machine's).
fn launched_pids(dir: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir.join("remote")).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(stem) = name.strip_suffix(".pid") {
            if let Ok(pid) = std::fs::read_to_string(entry.path()).unwrap_or_default().trim().parse() {
                out.push((stem.to_string(), pid));
            }
        }
    }
    out.sort();
    out
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent (sshd) has yet to reap it.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false)
}

#[test]
fn runs_a_job_on_two_hosts_over_ssh_and_gathers_the_logs() {
    let dir = scratch("ssh-launch");
    let Some(sshd) = start_sshd(&dir) else { return };
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 20);
    let output = run(launcher(&sshd, &dir, &config, &[]), Duration::from_secs(300));
    let coordinator = log(&dir, "coordinator.log");
    assert!(output.status.success(), "launch failed: {}\n{}\ncoordinator:\n{coordinator}", stdout(&output), stderr(&output));
    assert!(coordinator.contains("final train loss"), "{coordinator}");
    for host in HOSTS {
        let worker = log(&dir, &format!("worker-{host}-0.log"));
        assert!(worker.contains("joined"), "worker on {host}:\n{worker}");
    }
    let events = events(&dir.join("runs/tiny"));
    let joined = events.iter().filter(|e| matches!(e, RunEvent::WorkerJoined { .. })).count();
    let steps = events.iter().filter(|e| matches!(e, RunEvent::Step { .. })).count();
    assert_eq!((joined, steps), (2, 20), "two workers joined and trained every step");
    // Every launched process is gone.
    let pids = launched_pids(&dir);
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert!(pids.iter().all(|(_, pid)| !alive(*pid)), "{pids:?}");
    println!("launch-ssh: 20 steps on 2 hosts; logs {:?}", std::fs::read_dir(dir.join("logs")).unwrap().count());
}

#[test]
fn ctrl_c_stops_every_process_on_every_host() {
    let dir = scratch("ssh-launch-ctrl-c");
    let Some(sshd) = start_sshd(&dir) else { return };
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 1_000_000);
    // No periodic checkpoints: the only one must be written on the way out.
    let text = std::fs::read_to_string(&config).unwrap().replace("interval = 5\n", "interval = 1000000\n");
    std::fs::write(&config, text).unwrap();
    let mut child =
        KillOnDrop(launcher(&sshd, &dir, &config, &["--grace", "60"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
    wait_for_steps(&dir.join("runs/tiny"), 3, Duration::from_secs(180));
    assert_eq!(launched_pids(&dir).len(), 3, "a coordinator and two workers are running");
    // Ctrl-C in a terminal: SIGINT to the launcher's whole process group.
    let pgid = child.0.id();
    let interrupted = Instant::now();
    assert!(Command::new("kill").args(["-INT", "--", &format!("-{pgid}")]).status().unwrap().success());
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(interrupted.elapsed() < Duration::from_secs(120), "the launcher did not stop after Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr_text = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr_text).unwrap();
    assert_eq!(status.code(), Some(130), "the launcher exits 130 after Ctrl-C:\n{stderr_text}");
    let pids = launched_pids(&dir);
    assert!(pids.iter().all(|(_, pid)| !alive(*pid)), "processes left running after Ctrl-C: {pids:?}");
    // The coordinator was stopped the graceful way: a final checkpoint.
    let coordinator = log(&dir, "coordinator.log");
    assert!(coordinator.contains("shutdown requested"), "{coordinator}");
    let checkpoints = events(&dir.join("runs/tiny")).iter().filter(|e| matches!(e, RunEvent::Checkpoint { .. })).count();
    assert_eq!(checkpoints, 1, "a checkpoint on the way out");
    println!("launch-ssh: Ctrl-C stopped 3 processes on 2 hosts in {:.1} s", interrupted.elapsed().as_secs_f64());
}

#[test]
fn a_failing_coordinator_fails_the_launch_and_its_workers_are_stopped() {
    let dir = scratch("ssh-launch-fail");
    let Some(sshd) = start_sshd(&dir) else { return };
    // No prepared data where the config says: the coordinator refuses to start.
    let config = tiny_config(&dir, &dir.join("no-such-data"), 2, 20);
    let started = Instant::now();
    let output = run(launcher(&sshd, &dir, &config, &["--grace", "5"]), Duration::from_secs(120));
    assert_eq!(output.status.code(), Some(1), "the coordinator's exit status: {}", stderr(&output));
    assert!(log(&dir, "coordinator.log").contains("troupe prepare"), "{}", log(&dir, "coordinator.log"));
    let pids = launched_pids(&dir);
    assert!(pids.iter().all(|(_, pid)| !alive(*pid)), "workers left running: {pids:?}");
    println!("launch-ssh: a failed coordinator ended the launch in {:.1} s", started.elapsed().as_secs_f64());
}

/// `troupe sweep` with `[cluster]`: three trials, two at a time, each a launch-ssh.sh job on
/// its own host (127.0.0.2 or 127.0.0.3), with ASHA stopping one. Trial 0's coordinator is
/// killed with -9 once it has reported: the driver restarts it from its checkpoint on the same
/// hosts. The study equals that of the same sweep run with `troupe local` trials on this
/// machine — the same trials end the same way with the same metrics (within 1e-4).
#[test]
fn a_sweep_runs_its_trials_on_the_cluster_hosts() {
    let dir = scratch("ssh-sweep");
    let Some(sshd) = start_sshd(&dir) else { return };
    let data = prepare_small_corpus(&dir);
    let base = tiny_config(&dir, &data, 1, 20);
    // Two ports in a row for the two groups of hosts.
    let port = loop {
        let p = free_udp_port();
        if p < u16::MAX && std::net::UdpSocket::bind(("0.0.0.0", p + 1)).is_ok() {
            break p;
        }
    };
    let sweep_file = |name: &str, cluster: bool| {
        let mut text = format!(
            "name = \"{name}\"\nbase = \"{}\"\ntrials = 3\nparallel = 2\nseed = 5\nmax_restarts = 2\n\
             [set]\n\"checkpoint.interval\" = 5\n\"train.threads_per_worker\" = 1\n\
             [space.\"train.learning_rate\"]\nlog_uniform = [1e-3, 3e-2]\n\
             [scheduler]\nkind = \"asha\"\ngrace_steps = 5\nreduction_factor = 2\n",
            base.display()
        );
        if cluster {
            let mut args = vec!["--worker-args".to_string(), "--threads 1".to_string(), "--grace".into(), "10".into()];
            for opt in ssh_options(&sshd) {
                args.extend(["--ssh-opt".to_string(), opt]);
            }
            text += &format!(
                "[cluster]\nhosts = [\"{}\", \"{}\"]\nhosts_per_trial = 1\nport = {port}\nremote_dir = \"{}\"\nlauncher_args = {:?}\n",
                HOSTS[0],
                HOSTS[1],
                dir.join("remote").display(),
                args
            );
        }
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let sweeps = dir.join("sweeps");

    let mut local = troupe();
    local.arg("sweep").arg("--file").arg(sweep_file("here", false)).arg("--out").arg(&sweeps);
    let here = run(local, Duration::from_secs(300));
    assert!(here.status.success(), "{}\n{}", stdout(&here), stderr(&here));

    let study = sweeps.join("there");
    let mut driver = troupe();
    driver.arg("sweep").arg("--file").arg(sweep_file("there", true)).arg("--out").arg(&sweeps);
    let driver = KillOnDrop(driver.stdout(std::fs::File::create(dir.join("there.out")).unwrap()).stderr(Stdio::null()).spawn().unwrap());
    // Trial 0 runs on the first group of hosts: its coordinator's pid is in group-0's folder.
    wait_until("trial 0 reports", Duration::from_secs(300), Duration::from_millis(20), || count(&study_events(&study), "reported", 0) > 0);
    let pid: u32 = std::fs::read_to_string(dir.join("remote/group-0/coordinator.pid")).unwrap().trim().parse().unwrap();
    assert!(std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap().contains("trial-000"), "trial 0's coordinator");
    Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    let mut driver = driver;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = driver.0.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "the sweep did not end");
        std::thread::sleep(Duration::from_millis(100));
    };
    let said = std::fs::read_to_string(dir.join("there.out")).unwrap_or_default();
    assert!(status.success(), "{said}");
    assert!(said.contains("each on 1 of the hosts 127.0.0.2,127.0.0.3"), "{said}");

    let (here_events, there_events) = (study_events(&sweeps.join("here")), study_events(&study));
    assert_eq!(count(&there_events, "restarted", 0), 1, "{there_events:?}");
    assert!(there_events.iter().any(|e| e["event"] == "stopped"), "ASHA stopped someone: {there_events:?}");
    let (here_outcome, there_outcome) = (study_outcome(&here_events), study_outcome(&there_events));
    assert_eq!(here_outcome.len(), 3);
    for (trial, (ended, metrics)) in &here_outcome {
        let (there_ended, there_metrics) = &there_outcome[trial];
        assert_eq!(ended, there_ended, "trial {trial}");
        assert_eq!(metrics.keys().collect::<Vec<_>>(), there_metrics.keys().collect::<Vec<_>>(), "trial {trial}: the same steps");
        for (step, m) in metrics {
            assert!((m - there_metrics[step]).abs() < 1e-4, "trial {trial} step {step}: {m} here, {} on the cluster", there_metrics[step]);
        }
    }
    // Each trial ran as a launch on the hosts: a coordinator log and a worker log per attempt,
    // and the two groups both had work.
    let mut hosts_used = std::collections::BTreeSet::new();
    for trial in 0..3 {
        let logs = study.join(format!("trial-{trial:03}-logs/attempt-0"));
        assert!(logs.join("coordinator.log").is_file(), "trial {trial} has no coordinator log in {}", logs.display());
        for host in HOSTS {
            if logs.join(format!("worker-{host}-0.log")).is_file() {
                hosts_used.insert(host);
            }
        }
    }
    assert_eq!(hosts_used.len(), 2, "trials ran on both hosts");
    assert!(study.join("trial-000-logs/attempt-1/coordinator.log").is_file(), "the restart logs apart from the crash");
    // Nothing is left running on the hosts.
    for group in ["group-0", "group-1"] {
        for entry in std::fs::read_dir(dir.join("remote").join(group)).unwrap().flatten() {
            if entry.file_name().to_string_lossy().ends_with(".pid") {
                let pid: u32 = std::fs::read_to_string(entry.path()).unwrap().trim().parse().unwrap();
                assert!(!alive(pid), "{} still runs", entry.path().display());
            }
        }
    }
    println!("sweep on 2 hosts: 3 trials, trial 0 restarted once after kill -9 of its coordinator, same study as on this machine");
}
