//! Steps that must not count as ordinary ones (a NaN on one rank, ranks that disagree) and
//! checkpoints that cannot be written (a full disk).

use super::*;

fn finish_of(cmds: &[Command]) -> Option<(bool, Option<String>)> {
    cmds.iter().find_map(|c| match c {
        Command::Finish { ok, error } => Some((*ok, error.clone())),
        _ => None,
    })
}

const NAN_GRAD: Option<SkipReason> = Some(SkipReason::NonFiniteGradient);

#[test]
fn a_step_skipped_on_every_rank_is_recorded_with_the_rank_it_came_from_and_training_goes_on() {
    let mut sim = Sim::new(config(2, 10));
    start(&mut sim, 2);
    sim.step_done(1, 0, 2.0);
    sim.step_done(2, 0, 2.0);
    // Rank 1's own gradient held the NaN; the sum made it every rank's.
    sim.step_report(1, 1, 2.0, f64::NAN, NAN_GRAD, true);
    let cmds = sim.step_report(2, 1, 2.0, f64::NAN, NAN_GRAD, false);
    let events = records(&cmds);
    assert!(
        events.iter().any(|e| matches!(e, RunEvent::StepSkipped { step: 1, ranks, in_a_row: 1, reason, .. }
            if ranks == &vec![1] && reason == "nonfinite_gradient")),
        "{events:?}"
    );
    assert!(!events.iter().any(|e| matches!(e, RunEvent::Step { .. })), "a skipped step is not an ordinary one: {events:?}");
    assert_eq!(steps_sent(&cmds).len(), 2, "the run moves on to step 2");
    assert_eq!(sim.core.snapshot().last_loss, Some(2.0), "no NaN becomes the run's latest loss");
    assert_eq!(sim.core.snapshot().skipped_steps_in_a_row, 1);
    // A good step ends the streak.
    sim.step_done(1, 2, 1.9);
    sim.step_done(2, 2, 1.9);
    assert_eq!(sim.core.snapshot().skipped_steps_in_a_row, 0);
}

#[test]
fn max_skipped_steps_in_a_row_stop_the_run_naming_the_rank() {
    let mut c = config(2, 10);
    c.train.max_skipped_steps = 3;
    let mut sim = Sim::new(c);
    start(&mut sim, 2);
    let mut last = Vec::new();
    for step in 0..3 {
        sim.step_report(1, step, f64::NAN, f64::NAN, Some(SkipReason::NonFiniteLoss), true);
        last = sim.step_report(2, step, f64::NAN, f64::NAN, Some(SkipReason::NonFiniteLoss), false);
        if step < 2 {
            assert!(finish_of(&last).is_none(), "step {step}: {last:?}");
        }
    }
    let (ok, error) = finish_of(&last).expect("the run stops");
    let error = error.unwrap();
    assert!(!ok);
    assert!(error.contains("3 steps in a row (0..=2)") && error.contains("rank 1 (worker 2"), "{error}");
    assert!(error.contains("train.max_skipped_steps = 3") && error.contains("--resume"), "{error}");
    assert_eq!(sim.core.phase(), Phase::Done);
}

#[test]
fn a_rank_that_disagrees_is_named_and_one_that_diverged_stops_the_run() {
    let mut sim = Sim::new(config(3, 10));
    start(&mut sim, 3);
    sim.step_report(1, 0, 2.0, 1.0, None, true);
    sim.step_report(2, 0, 2.0, 1.0, None, true);
    let cmds = sim.step_report(3, 0, 2.0, 5.0, None, true);
    let events = records(&cmds);
    assert!(
        events.iter().any(|e| matches!(e, RunEvent::RankDisagreed { step: 0, rank: 2, what } if what.contains("gradient norm 5"))),
        "{events:?}"
    );
    assert_eq!(steps_sent(&cmds).len(), 3, "a figure that differs is reported, and training goes on");

    // Rank 0 alone applied the update: the replicas differ now.
    sim.step_report(1, 1, 2.0, f64::NAN, None, true);
    sim.step_report(2, 1, 2.0, f64::NAN, NAN_GRAD, true);
    let cmds = sim.step_report(3, 1, 2.0, f64::NAN, NAN_GRAD, false);
    let (ok, error) = finish_of(&cmds).expect("the run stops");
    let error = error.unwrap();
    assert!(!ok && error.contains("rank 0 (worker 1") && error.contains("applied the update where rank 1 skipped"), "{error}");
}

#[test]
fn a_rank_that_cannot_write_its_part_fails_the_checkpoint_once_all_have_answered_and_its_folder_is_removed() {
    let mut sim = Sim::new(config(2, 10));
    start(&mut sim, 2);
    sim.step_done(1, 0, 2.0);
    sim.step_done(2, 0, 2.0);
    sim.step_done(1, 1, 2.0);
    sim.step_done(2, 1, 2.0);
    let cmds = sim.write_failed(1, 2, "no space left on /data");
    assert!(records(&cmds).is_empty(), "rank 1 may still be writing into the folder: {cmds:?}");
    let cmds = sim.written(2, 2, vec![]);
    assert!(cmds.iter().any(|c| matches!(c, Command::DiscardCheckpoint { step: 2, .. })), "{cmds:?}");
    assert!(!cmds.iter().any(|c| matches!(c, Command::CommitCheckpoint { .. })));
    let events = records(&cmds);
    assert!(
        events.iter().any(|e| matches!(e, RunEvent::CheckpointFailed { step: 2, in_a_row: 1, error } if error.contains("rank 0") && error.contains("/data"))),
        "{events:?}"
    );
    assert_eq!(sim.core.snapshot().checkpoint_failures_in_a_row, 1);
}

#[test]
fn max_failures_checkpoints_in_a_row_stop_the_run_and_a_commit_resets_the_count() {
    let mut c = config(1, 20);
    c.checkpoint.max_failures = 2;
    let mut sim = Sim::new(c);
    start(&mut sim, 1);
    let mut step = 0;
    let mut run_to_checkpoint = |sim: &mut Sim| {
        sim.step_done(1, step, 2.0);
        sim.step_done(1, step + 1, 2.0);
        step += 2;
        step
    };
    let s = run_to_checkpoint(&mut sim);
    sim.write_failed(1, s, "disk full");
    let s = run_to_checkpoint(&mut sim);
    sim.written(1, s, vec![]);
    sim.on(Event::CheckpointCommitted { step: s, path: "p".into() });
    assert_eq!(sim.core.snapshot().checkpoint_failures_in_a_row, 0);
    let s = run_to_checkpoint(&mut sim);
    let cmds = sim.write_failed(1, s, "disk full");
    assert!(finish_of(&cmds).is_none());
    let s = run_to_checkpoint(&mut sim);
    sim.written(1, s, vec![]);
    let cmds = sim.on(Event::CheckpointCommitFailed { step: s, error: "disk full".into() });
    let (ok, error) = finish_of(&cmds).expect("the run stops");
    let error = error.unwrap();
    assert!(
        !ok && error.contains("2 checkpoints in a row failed") && error.contains("newest committed checkpoint is p (step 4)"),
        "{error}"
    );
}

#[test]
fn the_final_checkpoint_is_retried_with_backoff_and_the_run_fails_saying_what_was_lost() {
    let mut c = config(1, 4);
    c.checkpoint.max_failures = 3;
    let mut sim = Sim::new(c);
    start(&mut sim, 1);
    sim.step_done(1, 0, 2.0);
    sim.step_done(1, 1, 2.0);
    sim.written(1, 2, vec![]);
    sim.on(Event::CheckpointCommitted { step: 2, path: "ckpt-2".into() });
    sim.from(1, ToCoordinator::EvalDone(EvalReport { generation: 1, step: 2, loss_sum: 1.0, sequences: 1, per_source: vec![] }));
    sim.step_done(1, 2, 2.0);
    sim.step_done(1, 3, 2.0);
    sim.from(1, ToCoordinator::EvalDone(EvalReport { generation: 1, step: 4, loss_sum: 1.0, sequences: 1, per_source: vec![] }));
    assert_eq!(sim.core.phase(), Phase::Finishing);
    for (attempt, backoff_s) in [(1, 1), (2, 2)] {
        let cmds = sim.write_failed(1, 4, "No space left on device");
        assert!(finish_of(&cmds).is_none(), "attempt {attempt}: retried, not finished: {cmds:?}");
        let retry = sim.core.poll_timeout().expect("a retry is timed");
        assert_eq!(retry.saturating_duration_since(sim.now), Duration::from_secs(backoff_s), "attempt {attempt}");
        sim.advance(backoff_s * 1000 - 1);
        assert!(sends(&sim.on(Event::Timeout)).iter().all(|(_, m)| !matches!(m, ToWorker::Checkpoint { .. })), "not before its time");
        sim.advance(1);
        let cmds = sim.on(Event::Timeout);
        assert!(sends(&cmds).iter().any(|(_, m)| matches!(m, ToWorker::Checkpoint { step: 4, .. })), "attempt {attempt}: {cmds:?}");
    }
    let cmds = sim.write_failed(1, 4, "No space left on device");
    let (ok, error) = finish_of(&cmds).expect("the run ends");
    let error = error.unwrap();
    assert!(!ok, "a run whose final checkpoint is lost is not a success");
    assert!(error.contains("after 3 tries") && error.contains("ckpt-2 (step 2)") && error.contains("steps 2..4 are lost"), "{error}");

    // A retry that succeeds finishes the run as usual.
    let mut sim = Sim::new(config(1, 2));
    start(&mut sim, 1);
    sim.step_done(1, 0, 2.0);
    sim.step_done(1, 1, 2.0);
    sim.from(1, ToCoordinator::EvalDone(EvalReport { generation: 1, step: 2, loss_sum: 1.0, sequences: 1, per_source: vec![] }));
    sim.write_failed(1, 2, "No space left on device");
    sim.advance(1000);
    sim.on(Event::Timeout);
    sim.written(1, 2, vec![]);
    let cmds = sim.on(Event::CheckpointCommitted { step: 2, path: "p".into() });
    assert_eq!(finish_of(&cmds), Some((true, None)));
}

#[test]
fn an_earlier_checkpoint_failing_late_while_finishing_is_not_taken_for_the_final_one() {
    let mut sim = Sim::new(config(1, 4));
    start(&mut sim, 1);
    sim.step_done(1, 0, 2.0);
    sim.step_done(1, 1, 2.0);
    sim.written(1, 2, vec![]);
    sim.step_done(1, 2, 2.0);
    sim.step_done(1, 3, 2.0);
    sim.written(1, 4, vec![]);
    assert_eq!(sim.core.phase(), Phase::Finishing);
    // Step 2's commit fails only now (a Checkpointer that crashed and was restarted).
    let cmds = sim.on(Event::CheckpointCommitFailed { step: 2, error: "the Checkpointer crashed".into() });
    assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::CheckpointFailed { step: 2, .. })), "{cmds:?}");
    sim.advance(1000);
    sim.from(1, ToCoordinator::Heartbeat);
    let cmds = sim.on(Event::Timeout);
    assert!(!sends(&cmds).iter().any(|(_, m)| matches!(m, ToWorker::Checkpoint { .. })), "no retry: {cmds:?}");
    sim.on(Event::CheckpointCommitted { step: 4, path: "p4".into() });
    let cmds = sim.from(1, ToCoordinator::EvalDone(EvalReport { generation: 1, step: 4, loss_sum: 1.0, sequences: 1, per_source: vec![] }));
    assert_eq!(finish_of(&cmds), Some((true, None)), "finished once, with no retry of step 4: {cmds:?}");
}
