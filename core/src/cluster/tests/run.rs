//! A run's course: ranks and the ring, steps, evaluations, checkpoints, shutdown, resume,
//! and reports that are stale or come from strangers.

use super::*;

#[test]
fn ranks_follow_join_order_and_form_a_ring() {
    let mut sim = Sim::new(config(3, 4));
    let mut all = Vec::new();
    for id in 1..=3 {
        all.extend(sim.join(id));
    }
    let assigns = assigns(&all);
    assert_eq!(assigns.len(), 3);
    for (to, a) in &assigns {
        assert_eq!(a.rank as u64, to - 1);
        assert_eq!(a.world_size, 3);
        assert_eq!(a.generation, 1);
        let successor_port = 1000 + ((a.rank as u16 + 1) % 3) + 1;
        assert_eq!(a.ring.unwrap().successor.port(), successor_port);
    }
    assert_eq!(sim.core.phase(), Phase::Forming);
    // A fourth worker is refused: the run has its workers (max_workers = workers).
    let cmds = sim.join(4);
    assert!(matches!(&sends(&cmds)[0], (4, ToWorker::Refused { kind: RefusalKind::ClusterFull, .. })));
    assert!(cmds.iter().any(|c| matches!(c, Command::Disconnect { id: 4, .. })));
}

#[test]
fn a_full_run_steps_evaluates_checkpoints_and_finishes() {
    let mut sim = Sim::new(config(2, 3));
    start(&mut sim, 2);
    let mut commits = Vec::new();
    let mut events = Vec::new();
    for step in 0..3 {
        let a = sim.step_done(1, step, 2.75);
        assert!(sends(&a).is_empty(), "waits for every rank");
        sim.advance(500);
        let cmds = sim.step_done(2, step, 2.75);
        events.extend(records(&cmds));
        let s = sends(&cmds);
        let completed = step + 1;
        let wants_eval = completed == 2 || completed == 3;
        assert_eq!(s.iter().filter(|(_, m)| matches!(m, ToWorker::Evaluate { .. })).count(), if wants_eval { 2 } else { 0 });
        for id in [1, 2] {
            if wants_eval {
                sim.from(
                    id,
                    ToCoordinator::EvalDone(EvalReport { generation: 1, step: completed, loss_sum: 4.0, sequences: 2, per_source: vec![] }),
                );
            }
            if s.iter().any(|(_, m)| matches!(m, ToWorker::Checkpoint { .. })) {
                let files =
                    if id == 1 { vec![FileDigest { name: "model.safetensors".into(), size: 1, sha256: "x".into() }] } else { vec![] };
                let c = sim.written(id, completed, files);
                commits.extend(c.into_iter().filter(|c| matches!(c, Command::CommitCheckpoint { .. })));
            }
        }
    }
    let steps: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Step { step, loss, world_size, .. } => Some((*step, *loss, *world_size)),
            _ => None,
        })
        .collect();
    assert_eq!(steps, vec![(0, 2.75, 2), (1, 2.75, 2), (2, 2.75, 2)]);
    let tps = events
        .iter()
        .find_map(|e| match e {
            RunEvent::Step { tokens_per_sec, .. } => Some(*tokens_per_sec),
            _ => None,
        })
        .unwrap();
    assert!((tps - 400.0).abs() < 1e-9, "200 tokens in 0.5 s, got {tps}");
    assert_eq!(commits.len(), 2, "checkpoints after steps 2 and 3");
    assert_eq!(sim.core.phase(), Phase::Finishing, "waits for the last commit");
    let cmds = sim.on(Event::CheckpointCommitted { step: 2, path: "c2".into() });
    assert!(!cmds.iter().any(|c| matches!(c, Command::Finish { .. })));
    let cmds = sim.on(Event::CheckpointCommitted { step: 3, path: "c3".into() });
    assert!(cmds.iter().any(|c| matches!(c, Command::Finish { ok: true, .. })));
    assert_eq!(sends(&cmds).iter().filter(|(_, m)| matches!(m, ToWorker::Stop { .. })).count(), 2);
    let snap = sim.core.snapshot();
    assert_eq!(snap.last_val_loss, Some(2.0));
    assert_eq!(snap.last_checkpoint.as_deref(), Some("c3"));
    assert_eq!(snap.completed_steps, 3);
}

#[test]
fn a_failed_commit_keeps_training_and_is_recorded() {
    let mut sim = Sim::new(config(1, 4));
    start(&mut sim, 1);
    sim.step_done(1, 0, 1.0);
    let cmds = sim.step_done(1, 1, 1.0);
    assert!(sends(&cmds).iter().any(|(_, m)| matches!(m, ToWorker::Step { step: 2 })));
    sim.written(1, 2, vec![]);
    let cmds = sim.on(Event::CheckpointCommitFailed { step: 2, error: "disk full".into() });
    assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::CheckpointFailed { step: 2, .. })));
    assert_eq!(sim.core.phase(), Phase::Training);
    assert_eq!(sim.core.snapshot().last_checkpoint, None);
}

#[test]
fn shutdown_checkpoints_at_the_next_step_boundary() {
    let mut sim = Sim::new(config(1, 100));
    start(&mut sim, 1);
    sim.on(Event::ShutdownRequested);
    let cmds = sim.step_done(1, 0, 1.0);
    let s = sends(&cmds);
    assert!(s.iter().any(|(_, m)| matches!(m, ToWorker::Checkpoint { step: 1, .. })));
    assert!(!s.iter().any(|(_, m)| matches!(m, ToWorker::Step { .. })));
    assert!(s.iter().any(|(_, m)| matches!(m, ToWorker::Evaluate { step: 1 })), "every checkpoint is evaluated");
    sim.written(1, 1, vec![]);
    let cmds = sim.on(Event::CheckpointCommitted { step: 1, path: "p".into() });
    assert!(!cmds.iter().any(|c| matches!(c, Command::Finish { .. })), "the evaluation is still out");
    let cmds = sim.from(1, ToCoordinator::EvalDone(EvalReport { generation: 1, step: 1, loss_sum: 1.0, sequences: 1, per_source: vec![] }));
    assert!(cmds.iter().any(|c| matches!(c, Command::Finish { ok: true, .. })));
}

#[test]
fn shutdown_while_paused_stops_at_once() {
    let mut c = config(2, 100);
    c.cluster.min_workers = 2;
    let mut sim = Sim::new(c);
    start(&mut sim, 2);
    sim.lose(2, "killed");
    assert_eq!(sim.core.phase(), Phase::Paused);
    let cmds = sim.on(Event::ShutdownRequested);
    assert!(cmds.iter().any(|c| matches!(c, Command::Finish { ok: false, error: Some(e) } if e.contains("paused"))));
}

#[test]
fn a_worker_failing_before_training_started_fails_the_run() {
    let mut sim = Sim::new(config(2, 10));
    sim.join(1);
    sim.join(2);
    let cmds = sim.from(2, ToCoordinator::Failed { error: "data folder missing".into() });
    assert!(cmds.iter().any(|c| matches!(c, Command::Finish { ok: false, error: Some(e) } if e.contains("data folder missing"))));
}

#[test]
fn resume_starts_at_the_checkpoint_step() {
    let mut core = Core::new(config(1, 10), Some(ResumeFrom { dir: "d".into(), step: 4 }));
    let now = Instant::now();
    let cmds = core.on(now, Event::WorkerJoined { id: 1, info: caps(1) });
    let a = assigns(&cmds).remove(0).1;
    assert_eq!(a.start_step, 4);
    assert_eq!(a.resume_from.as_deref(), Some("d"));
    let cmds = core.on(now, Event::FromWorker { id: 1, msg: ToCoordinator::Ready { generation: 1, completed_steps: 4 } });
    assert!(sends(&cmds).iter().any(|(_, m)| matches!(m, ToWorker::Step { step: 4 })));
    assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Started { resumed_from: Some(d), .. } if d == "d")));
}

#[test]
fn stale_or_foreign_reports_are_ignored() {
    let mut sim = Sim::new(config(2, 10));
    start(&mut sim, 2);
    assert!(sim.step_done(1, 5, 1.0).is_empty(), "a report for another step");
    assert!(sim.step_done(99, 0, 1.0).is_empty(), "an unknown worker");
    assert!(sim
        .from(1, ToCoordinator::EvalDone(EvalReport { generation: 1, step: 0, loss_sum: 1.0, sequences: 1, per_source: vec![] }))
        .is_empty());
    assert!(sim.written(1, 7, vec![]).is_empty());
    assert!(sim.from(1, ToCoordinator::Ready { generation: 1, completed_steps: 9 }).is_empty(), "Ready outside Forming");
}

#[test]
fn validation_losses_per_source_are_summed_over_the_ranks() {
    use crate::proto::SourceLoss;
    let mut c = config(2, 4);
    c.eval.interval = 1;
    let mut sim = Sim::new(c);
    start(&mut sim, 2);
    sim.step_done(1, 0, 2.0);
    sim.step_done(2, 0, 2.0);
    let part = |source: &str, loss_sum: f64, sequences: u64| SourceLoss { source: source.into(), loss_sum, sequences };
    // Rank 0 evaluated 2 web and 1 books sequence, rank 1 2 web and none of books.
    sim.from(
        1,
        ToCoordinator::EvalDone(EvalReport {
            generation: 1,
            step: 1,
            loss_sum: 9.0,
            sequences: 3,
            per_source: vec![part("web", 4.0, 2), part("books", 5.0, 1)],
        }),
    );
    let cmds = sim.from(
        2,
        ToCoordinator::EvalDone(EvalReport {
            generation: 1,
            step: 1,
            loss_sum: 8.0,
            sequences: 2,
            per_source: vec![part("web", 8.0, 2), part("books", 0.0, 0)],
        }),
    );
    let eval = records(&cmds).into_iter().find_map(|e| match e {
        RunEvent::Eval { val_loss, per_source, .. } => Some((val_loss, per_source)),
        _ => None,
    });
    let (val_loss, per_source) = eval.expect("an Eval event");
    assert!((val_loss - 17.0 / 5.0).abs() < 1e-12);
    assert_eq!(per_source.len(), 2);
    assert!((per_source["web"] - 3.0).abs() < 1e-12 && (per_source["books"] - 5.0).abs() < 1e-12, "{per_source:?}");
}
