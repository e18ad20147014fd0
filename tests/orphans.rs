//! Workers end cleanly: one whose coordinator dies (SIGKILL: no goodbye, no QUIC close) stops
//! training once the coordinator's lease runs out, tries to rejoin for `cluster.rejoin_ms`,
//! then exits and says why (no orphans); one asked to stop (SIGTERM) leaves at a step boundary.

mod common;

use common::*;
use std::process::Stdio;
use std::time::{Duration, Instant};
use troupe_core::events::RunEvent;

#[test]
fn a_worker_exits_when_its_coordinator_is_killed() {
    let dir = scratch("orphans");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 1, 100_000);
    let text = std::fs::read_to_string(&config).unwrap().replace("lease_ms = 5000", "lease_ms = 1500\nrejoin_ms = 1000");
    std::fs::write(&config, text).unwrap();

    let mut coordinator = CoordinatorProcess::start(&config, &["--listen", "127.0.0.1:0"]);
    let addr = coordinator.addr.to_string();
    let worker = troupe().args(["worker", "--join", &addr, "--threads", "1"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut worker = KillOnDrop(worker);

    let run_dir = dir.join("runs/tiny");
    wait_for_steps(&run_dir, 3, Duration::from_secs(120));
    coordinator.process.0.kill().unwrap();
    let killed_at = Instant::now();
    let mut stderr = worker.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let status = loop {
        if let Some(status) = worker.0.try_wait().unwrap() {
            break status;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(20), "the worker outlived its coordinator by 20 s");
        std::thread::park_timeout(Duration::from_millis(20));
    };
    let gone_after = killed_at.elapsed();
    let log = reader.join().unwrap();
    println!("worker exited {gone_after:?} after the coordinator was killed");
    assert!(!status.success(), "losing the coordinator is an error exit");
    assert!(log.contains("silent for longer than its lease") || log.contains("lost the coordinator"), "{log}");
    assert!(log.contains("trying to rejoin") && log.contains("did not come back"), "{log}");
    assert!(gone_after < Duration::from_secs(10), "{gone_after:?}");
}

/// SIGTERM to a worker: it leaves at a step boundary and exits 0; the others re-form the
/// ring without it and the run finishes.
#[test]
fn a_worker_asked_to_stop_leaves_at_a_step_boundary_and_the_run_goes_on() {
    let dir = scratch("leave");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 40);
    let coordinator = CoordinatorProcess::start(&config, &[]);
    let addr = coordinator.addr.to_string();
    let mut workers = spawn_workers(&addr, 2);
    let run_dir = dir.join("runs/tiny");
    wait_for_steps(&run_dir, 3, Duration::from_secs(120));
    let mut leaving = workers.pop().unwrap();
    std::process::Command::new("kill").args(["-TERM", &leaving.0.id().to_string()]).status().unwrap();
    assert!(leaving.0.wait().unwrap().success(), "a worker asked to stop exits 0");
    let left_at_step = step_losses(&run_dir).len();
    assert!(left_at_step < 40, "it left while the run went on (after {left_at_step} steps)");
    let (status, log) = coordinator.wait();
    assert!(status.success(), "{log}");
    for mut w in workers {
        assert!(w.0.wait().unwrap().success());
    }
    let events = events(&run_dir);
    assert!(events.iter().any(|e| matches!(e, RunEvent::Warning { message, .. } if message.contains("is leaving (SIGTERM"))), "{events:?}");
    assert!(events.iter().any(|e| matches!(e, RunEvent::Regrouped { world_size: 1, .. })), "{events:?}");
    let steps: Vec<u64> = step_losses(&run_dir).iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, (0..40).collect::<Vec<_>>(), "every step once");
}
