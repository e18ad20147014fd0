//! Supervision, as a user of `troupe local` and of the coordinator sees it: a worker process
//! killed twice is restarted twice and the run finishes as if nothing happened; a child actor
//! of the coordinator that crashes ten times in a row costs no worker.

mod common;

use common::*;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use troupe_core::events::RunEvent;

/// The worker processes `troupe local` (pid `parent`) has running now, by start time.
fn worker_children(parent: u32) -> Vec<u32> {
    let text = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap_or_default();
    let mut children: Vec<(u64, u32)> = text
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Field 22 (start time), counted after the command name in parentheses.
            let start = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()?;
            Some((start, pid))
        })
        .collect();
    children.sort();
    children.into_iter().map(|(_, pid)| pid).collect()
}

fn regrouped_to(run_dir: &Path, world: u32) -> usize {
    events(run_dir).iter().filter(|e| matches!(e, RunEvent::Regrouped { world_size, .. } if *world_size == world)).count()
}

/// `troupe local --workers 3`; the newest worker is killed with SIGKILL, twice: each time
/// `troupe local` restarts it, it rejoins, and the run finishes with exit 0, every step once
/// and no sample lost or repeated.
#[test]
fn a_worker_killed_twice_is_restarted_twice_and_the_run_finishes() {
    const STEPS: u64 = 500;
    let dir = scratch("supervised-local");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 3, STEPS);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("lease_ms = 5000", "lease_ms = 1500")
        .replace("collective_timeout_ms = 30000", "collective_timeout_ms = 2000")
        .replace("workers = 3\n", "workers = 3\nmin_workers = 2\nmax_workers = 3\n");
    std::fs::write(&config, text).unwrap();
    let trace = dir.join("trace");
    std::fs::create_dir_all(&trace).unwrap();
    let run_dir = dir.join("runs/tiny");
    let mut local = local_command(&config);
    local.env("TROUPE_TRACE_SAMPLES", &trace).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut process = KillOnDrop(local.spawn().unwrap());
    let pid = process.0.id();
    let stdout = process.0.stdout.take().unwrap();
    let stderr = process.0.stderr.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());

    wait_for_steps(&run_dir, 10, Duration::from_secs(120));
    for kill in 1..=2 {
        let regrouped = regrouped_to(&run_dir, 3);
        let victim = *worker_children(pid).last().expect("worker processes");
        let killed = std::process::Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap();
        assert!(killed.success());
        let t = Instant::now();
        // Back to three workers: the restarted one has rejoined.
        wait_until(&format!("the worker killed ({kill}) to rejoin"), Duration::from_secs(60), Duration::from_millis(50), || {
            regrouped_to(&run_dir, 3) > regrouped && worker_children(pid).len() == 3
        });
        println!("kill {kill}: three workers again after {:?}", t.elapsed());
    }
    let status = process.0.wait().unwrap();
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(status.success(), "{out}\n{err}");
    assert_eq!(err.matches("restarting it in").count(), 2, "{err}");
    assert!(out.contains("worker restarts during the run"), "{out}");
    let steps = steps_once(&run_dir, STEPS);
    assert!(steps.values().any(|(_, w)| *w == 2), "the run went on with two workers in between");
    assert_no_sample_lost_or_repeated(&trace, &data, &steps);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Evaluator crashes on ten checkpoints in a row while two workers train with a 2 s lease:
/// its restarts are scheduled (their backoff reaches 6.4 s) and the coordinator goes on
/// serving heartbeats meanwhile, so no worker is lost.
#[test]
fn ten_evaluator_crashes_in_a_row_lose_no_worker() {
    let dir = scratch("supervised-evaluator");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 200);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("lease_ms = 5000", "lease_ms = 2000")
        .replace("[checkpoint]\ninterval = 5", "[checkpoint]\ninterval = 2");
    std::fs::write(&config, text).unwrap();
    let mut local = local_command(&config);
    local.env("TROUPE_FAULT_EVALUATOR_CRASHES", "10");
    let out = run(local, Duration::from_secs(300));
    assert_success(&out);
    let err = stderr(&out);
    assert!(err.matches("evaluator failed").count() >= 10, "ten crashes: {err}");
    let run_dir = dir.join("runs/tiny");
    let regroups = events(&run_dir).iter().filter(|e| matches!(e, RunEvent::Regrouped { .. })).count();
    assert_eq!(regroups, 0, "the first generation only: no worker was lost ({:?})", events(&run_dir));
    assert!(!err.contains("was lost"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
