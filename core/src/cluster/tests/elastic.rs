//! Elastic membership: workers lost, joining and leaving, regroups, syncs from the most
//! advanced survivor, pauses below `min_workers`, and state reloaded from a checkpoint.

use super::*;

#[test]
fn under_a_sharded_strategy_a_new_generation_starts_from_the_newest_checkpoint() {
    let mut c = config(3, 10);
    c.parallel.strategy = crate::shard::Strategy::Zero2;
    let mut sim = Sim::new(c);
    start(&mut sim, 3);
    for step in 0..3 {
        for id in [1, 2, 3] {
            sim.step_done(id, step, 1.0);
        }
    }
    // Step 2's checkpoint is committed; step 3 is done when rank 2 is lost.
    for id in [1, 2, 3] {
        sim.written(id, 2, vec![]);
    }
    sim.on(Event::CheckpointCommitted { step: 2, path: "c2".into() });
    let cmds = sim.lose(3, "connection reset");
    let a = assigns(&cmds);
    assert_eq!(a.len(), 2);
    // The survivors hold the state of step 3, but a third of it was on the lost rank.
    assert!(a.iter().all(|(_, a)| a.world_size == 2 && a.resume_from.as_deref() == Some("c2") && a.start_step == 2), "{a:?}");
    assert!(records(&cmds)
        .iter()
        .any(|e| matches!(e, RunEvent::Warning { message, .. } if message.contains("continuing from checkpoint c2"))));
    sim.ready(1, 2);
    let cmds = sim.ready(2, 2);
    assert_eq!(steps_sent(&cmds), vec![(1, 2), (2, 2)], "step 2 again, resharded over 2 ranks");
}

#[test]
fn a_worker_lost_mid_step_makes_the_survivors_regroup_and_redo_the_step() {
    let mut sim = Sim::new(config(3, 10));
    start(&mut sim, 3);
    sim.step_done(1, 0, 1.0);
    sim.step_done(1, 0, 1.0);
    sim.step_done(2, 0, 1.0);
    sim.step_done(3, 0, 1.0);
    // Step 1 is interrupted: rank 2 is lost before anyone finished it.
    sim.step_done(1, 1, 1.0);
    let cmds = sim.lose(3, "connection reset");
    let rec = records(&cmds);
    assert!(rec.iter().any(|e| matches!(e, RunEvent::WorkerLeft { rank: Some(2), .. })));
    assert!(!rec.iter().any(|e| matches!(e, RunEvent::Failed { .. })), "the run goes on");
    let a = assigns(&cmds);
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|(_, a)| a.world_size == 2 && a.generation == 2 && a.resume_from.is_none()));
    // The survivors form a ring of two: each is the other's successor.
    assert_eq!(a[0].1.ring.unwrap().successor.port(), 1002);
    assert_eq!(a[1].1.ring.unwrap().successor.port(), 1001);
    assert_eq!(sim.core.phase(), Phase::Forming);
    // Rank 0's old report for step 1 belonged to generation 1 and counts for nothing.
    sim.advance(700);
    sim.ready(1, 1);
    let cmds = sim.ready(2, 1);
    assert_eq!(steps_sent(&cmds), vec![(1, 1), (2, 1)], "step 1 again, with the new ring");
    let rec = records(&cmds);
    assert!(rec.iter().any(|e| matches!(e, RunEvent::Regrouped { step: 1, generation: 2, world_size: 2, synced: false, seconds } if (*seconds - 0.7).abs() < 1e-9)));
    assert!(!sends(&cmds).iter().any(|(_, m)| matches!(m, ToWorker::Sync { .. })), "identical replicas need no sync");
    sim.step_done(1, 1, 1.0);
    let cmds = sim.step_done(2, 1, 1.0);
    assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Step { step: 1, world_size: 2, generation: 2, .. })));
}

#[test]
fn a_loss_during_the_all_reduce_that_some_survivor_completed_syncs_the_others_from_it() {
    let mut sim = Sim::new(config(3, 10));
    start(&mut sim, 3);
    // Worker 1 got through step 0's all-reduce (every gradient arrived) before worker 3
    // died; worker 2 did not.
    sim.step_done(1, 0, 3.5);
    let cmds = sim.lose(3, "lease expired");
    assert_eq!(assigns(&cmds).len(), 2);
    sim.ready(1, 1);
    let cmds = sim.ready(2, 0);
    let rec = records(&cmds);
    assert!(
        rec.iter().any(|e| matches!(e, RunEvent::Step { step: 0, loss, generation: 1, world_size: 3, .. } if *loss == 3.5)),
        "step 0 counts, recorded once, as the 3 ranks' step"
    );
    let syncs: Vec<_> = sends(&cmds).into_iter().filter(|(_, m)| matches!(m, ToWorker::Sync { .. })).collect();
    assert_eq!(syncs.len(), 2);
    assert!(syncs.iter().all(|(_, m)| *m == ToWorker::Sync { generation: 2, source_rank: 0, step: 1 }));
    assert_eq!(sim.core.phase(), Phase::Syncing);
    assert!(steps_sent(&cmds).is_empty(), "no step before every rank is synced");
    sim.from(1, ToCoordinator::Synced { generation: 2, step: 1 });
    let cmds = sim.from(2, ToCoordinator::Synced { generation: 2, step: 1 });
    assert_eq!(steps_sent(&cmds), vec![(1, 1), (2, 1)]);
    assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Regrouped { synced: true, .. })));
    assert_eq!(sim.core.snapshot().completed_steps, 1);
}

#[test]
fn a_loss_during_a_checkpoint_writes_it_again_with_the_new_ring() {
    let mut sim = Sim::new(config(2, 10));
    start(&mut sim, 2);
    for step in 0..2 {
        sim.step_done(1, step, 1.0);
        sim.step_done(2, step, 1.0);
    }
    // Checkpoint at step 2 requested; rank 0 wrote its part, rank 1 is lost.
    sim.written(1, 2, vec![FileDigest { name: "model.safetensors".into(), size: 1, sha256: "x".into() }]);
    let cmds = sim.lose(2, "killed");
    assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Warning { message, .. } if message.contains("checkpoint at step 2"))));
    assert!(!cmds.iter().any(|c| matches!(c, Command::CommitCheckpoint { .. })), "an incomplete checkpoint is never committed");
    let cmds = sim.ready(1, 2);
    let s = sends(&cmds);
    assert!(s.iter().any(|(to, m)| *to == 1 && matches!(m, ToWorker::Checkpoint { step: 2, .. })), "requested again");
    assert!(s.iter().any(|(to, m)| *to == 1 && matches!(m, ToWorker::Evaluate { step: 2 })), "the evaluation too");
    let cmds = sim.written(1, 2, vec![FileDigest { name: "model.safetensors".into(), size: 1, sha256: "y".into() }]);
    assert!(cmds.iter().any(
        |c| matches!(c, Command::CommitCheckpoint { step: 2, world_size: 1, files, .. } if files.len() == 1 && files[0].sha256 == "y")
    ));
    // Reports from the old generation are ignored.
    assert!(sim.from(1, ToCoordinator::CheckpointWritten { generation: 1, step: 2, files: vec![] }).is_empty());
}

#[test]
fn two_losses_in_a_row_regroup_twice_and_below_min_workers_the_run_pauses() {
    let mut c = config(3, 10);
    c.cluster.min_workers = 2;
    let mut sim = Sim::new(c);
    start(&mut sim, 3);
    sim.step_done(2, 0, 1.0);
    let cmds = sim.lose(3, "killed");
    assert_eq!(assigns(&cmds).len(), 2);
    sim.ready(1, 0);
    // The second loss strikes while the ring is forming again.
    let cmds = sim.lose(2, "killed");
    assert!(assigns(&cmds).is_empty());
    let s = sends(&cmds);
    assert!(matches!(&s[..], [(1, ToWorker::Pause { generation: 3, .. })]));
    assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Paused { workers: 1, min_workers: 2, .. })));
    assert_eq!(sim.core.phase(), Phase::Paused);
    assert_eq!(sim.core.snapshot().completed_steps, 0);
    // Worker 2 had completed step 0 before it was lost; its report names generation 1.
    // A new worker arrives: the run goes on, the newcomer synced from the survivor.
    let cmds = sim.join(4);
    let a = assigns(&cmds);
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|(_, a)| a.generation == 4 && a.resume_from.is_none()));
    sim.ready(1, 0);
    let cmds = sim.ready(4, 0);
    assert_eq!(steps_sent(&cmds), vec![(1, 0), (4, 0)], "nobody completed step 0 among the members: no sync needed");
}

#[test]
fn a_rejoin_racing_a_loss_is_taken_in_by_the_same_regroup_and_synced() {
    let mut c = config(2, 10);
    c.cluster.max_workers = 3;
    let mut sim = Sim::new(c);
    start(&mut sim, 2);
    for step in 0..3 {
        sim.step_done(1, step, 1.0);
        sim.step_done(2, step, 1.0);
    }
    // A worker arrives mid-step: it waits for the step boundary...
    let cmds = sim.join(3);
    assert!(matches!(&sends(&cmds)[..], [(3, ToWorker::Welcome { .. })]));
    assert!(assigns(&cmds).is_empty());
    // ...but a member is lost first: one regroup handles both.
    let cmds = sim.lose(2, "link down");
    let a = assigns(&cmds);
    assert_eq!(a.iter().map(|(id, a)| (*id, a.rank)).collect::<Vec<_>>(), vec![(1, 0), (3, 1)]);
    sim.ready(1, 3);
    let cmds = sim.ready(3, 0);
    assert!(sends(&cmds).iter().all(|(_, m)| *m == ToWorker::Sync { generation: 2, source_rank: 0, step: 3 }));
    sim.from(1, ToCoordinator::Synced { generation: 2, step: 3 });
    let cmds = sim.from(3, ToCoordinator::Synced { generation: 2, step: 3 });
    assert_eq!(steps_sent(&cmds), vec![(1, 3), (3, 3)]);
}

#[test]
fn a_new_worker_joins_at_the_next_step_boundary() {
    let mut c = config(2, 10);
    c.cluster.max_workers = 3;
    let mut sim = Sim::new(c);
    start(&mut sim, 2);
    sim.step_done(1, 0, 1.0);
    sim.join(3);
    let cmds = sim.step_done(2, 0, 1.0);
    assert!(steps_sent(&cmds).is_empty());
    let a = assigns(&cmds);
    assert_eq!(a.len(), 3);
    assert!(a.iter().all(|(_, a)| a.world_size == 3 && a.generation == 2));
    sim.ready(1, 1);
    sim.ready(2, 1);
    let cmds = sim.ready(3, 0);
    assert!(sends(&cmds).iter().all(|(_, m)| *m == ToWorker::Sync { generation: 2, source_rank: 0, step: 1 }));
    assert_eq!(sends(&cmds).len(), 3);
}

#[test]
fn failed_collectives_regroup_then_give_up() {
    let mut sim = Sim::new(config(2, 10));
    start(&mut sim, 2);
    for attempt in 1..=MAX_FAILED_REGROUPS {
        let generation = sim.core.generation();
        let cmds = sim.from(
            2,
            ToCoordinator::CollectiveFailed { generation, step: Some(0), error: "timed out waiting on predecessor rank 0".into() },
        );
        assert!(records(&cmds).iter().any(
            |e| matches!(e, RunEvent::Warning { message, .. } if message.contains("rank 1") && message.contains("predecessor rank 0"))
        ));
        assert_eq!(assigns(&cmds).len(), 2, "attempt {attempt}: a new ring");
        sim.ready(1, 0);
        sim.ready(2, 0);
    }
    // A stale report of an older generation is ignored.
    assert!(sim.from(2, ToCoordinator::CollectiveFailed { generation: 1, step: Some(0), error: "old".into() }).is_empty());
    let generation = sim.core.generation();
    let cmds = sim.from(1, ToCoordinator::CollectiveFailed { generation, step: Some(0), error: "again".into() });
    assert!(cmds.iter().any(|c| matches!(c, Command::Finish { ok: false, error: Some(e) } if e.contains("in a row"))));
}

#[test]
fn when_no_worker_holds_the_state_it_comes_from_the_newest_checkpoint() {
    let mut sim = Sim::new(config(1, 10));
    start(&mut sim, 1);
    for step in 0..2 {
        sim.step_done(1, step, 1.0);
    }
    sim.written(1, 2, vec![]);
    sim.on(Event::CheckpointCommitted { step: 2, path: "runs/x/checkpoints/step-000002".into() });
    sim.step_done(1, 2, 1.0);
    let cmds = sim.lose(1, "killed");
    assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Paused { workers: 0, .. })));
    let cmds = sim.join(2);
    let a = assigns(&cmds);
    assert_eq!(a[0].1.resume_from.as_deref(), Some("runs/x/checkpoints/step-000002"));
    assert_eq!(a[0].1.start_step, 2);
    let cmds = sim.ready(2, 2);
    assert_eq!(steps_sent(&cmds), vec![(2, 2)]);
}

#[test]
fn a_leaving_worker_leaves_at_the_next_step_boundary_and_the_rest_go_on() {
    let mut sim = Sim::new(config(2, 100));
    start(&mut sim, 2);
    sim.step_done(1, 0, 1.0);
    let cmds = sim.from(2, ToCoordinator::Leaving { reason: "SIGTERM".into() });
    assert!(records(&cmds)
        .iter()
        .any(|e| matches!(e, RunEvent::Warning { message, .. } if message.contains("rank 1") && message.contains("SIGTERM"))));
    let cmds = sim.step_done(2, 0, 1.0);
    let s = sends(&cmds);
    assert!(s.iter().any(|(to, m)| *to == 2 && matches!(m, ToWorker::Stop { .. })));
    assert!(matches!(&assigns(&cmds)[..], [(1, Assignment { world_size: 1, generation: 2, .. })]));
    assert!(steps_sent(&cmds).is_empty());
    let cmds = sim.ready(1, 1);
    assert_eq!(steps_sent(&cmds), vec![(1, 1)]);
}

#[test]
fn the_last_worker_leaving_checkpoints_and_stops_the_run() {
    let mut sim = Sim::new(config(1, 100));
    start(&mut sim, 1);
    sim.from(1, ToCoordinator::Leaving { reason: "SIGTERM".into() });
    let cmds = sim.step_done(1, 0, 1.0);
    let s = sends(&cmds);
    assert!(s.iter().any(|(_, m)| matches!(m, ToWorker::Checkpoint { step: 1, .. })));
    assert!(!s.iter().any(|(_, m)| matches!(m, ToWorker::Step { .. })));
}
