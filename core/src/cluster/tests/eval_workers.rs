//! Eval workers (`--role eval`): never ranks; while one is connected a checkpointed step is
//! evaluated off the training path instead of by the ranks; their answers, losses and leases
//! reach the Evaluator; what only a rank may say gets them disconnected.

use super::*;
use crate::proto::{CheckpointEval, WorkerRole};

fn join_eval_worker(sim: &mut Sim, id: WorkerId) -> Vec<Command> {
    let info = Capabilities { role: WorkerRole::Eval, ..caps(1000 + id as u16) };
    sim.on(Event::WorkerJoined { id, info })
}

fn notes(cmds: &[Command]) -> Vec<EvaluatorNote> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::ToEvaluator(n) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_checkpointed_step_is_evaluated_off_the_training_path_while_an_eval_worker_is_connected() {
    // eval every step, checkpoint every 2: steps 1 and 3 stay sharded, 2 and 4 go off path.
    let mut c = config(2, 4);
    c.eval.interval = 1;
    let mut sim = Sim::new(c);
    let joined = join_eval_worker(&mut sim, 9);
    assert!(matches!(&sends(&joined)[..], [(9, ToWorker::Welcome { worker_id: 9, .. })]), "{joined:?}");
    assert_eq!(notes(&joined), vec![EvaluatorNote::Joined { id: 9, hostname: "test".into() }]);
    start(&mut sim, 2);
    assert_eq!(sim.core.snapshot().world_size, 2, "the eval worker holds no rank");
    for step in 0..4 {
        sim.step_done(1, step, 2.0);
        let cmds = sim.step_done(2, step, 2.0);
        let completed = step + 1;
        let evaluates = sends(&cmds).iter().filter(|(_, m)| matches!(m, ToWorker::Evaluate { .. })).count();
        let off_path = cmds.iter().any(|c| matches!(c, Command::EvaluateOffPath { step } if *step == completed));
        if completed % 2 == 0 {
            assert!(off_path && evaluates == 0, "step {completed}: {cmds:?}");
        } else {
            assert!(!off_path && evaluates == 2, "step {completed}: {cmds:?}");
            for id in [1, 2] {
                sim.from(
                    id,
                    ToCoordinator::EvalDone(EvalReport { generation: 1, step: completed, loss_sum: 2.0, sequences: 1, per_source: vec![] }),
                );
            }
        }
        assert!(sends(&cmds).iter().all(|(to, _)| *to != 9), "nothing of a step goes to the eval worker");
    }
    // Its answer goes to the Evaluator.
    let eval = CheckpointEval { step: 2, loss_sum: 3.0, sequences: 2, per_source: vec![], tasks: vec![], samples: vec![] };
    let cmds = sim.from(9, ToCoordinator::CheckpointEvaluated(eval.clone()));
    assert_eq!(notes(&cmds), vec![EvaluatorNote::Evaluated { id: 9, eval }]);
    let cmds = sim.from(9, ToCoordinator::CheckpointEvalFailed { step: 4, error: "no data".into() });
    assert_eq!(notes(&cmds), vec![EvaluatorNote::Failed { id: 9, step: 4, error: "no data".into() }]);
    // At the end the coordinator stops it (once the last evaluation is over).
    let stops = sim.core.stop_eval_workers("the run is over");
    assert!(matches!(&sends(&stops)[..], [(9, ToWorker::Stop { .. })]));
}

#[test]
fn without_an_eval_worker_the_ranks_evaluate_again() {
    let mut sim = Sim::new(config(2, 4));
    join_eval_worker(&mut sim, 9);
    start(&mut sim, 2);
    // Sixteen eval workers at most; more would only wait.
    for id in 100..115 {
        join_eval_worker(&mut sim, id);
    }
    let refused = join_eval_worker(&mut sim, 115);
    assert!(matches!(&sends(&refused)[..], [(115, ToWorker::Refused { kind: RefusalKind::ClusterFull, .. })]), "{refused:?}");
    for id in 100..115 {
        sim.lose(id, "gone");
    }
    let lost = sim.lose(9, "its port is closed");
    assert_eq!(notes(&lost), vec![EvaluatorNote::Lost { id: 9, reason: "its port is closed".into() }]);
    assert_eq!(sim.core.phase(), Phase::Training, "losing an eval worker is no membership change");
    sim.step_done(1, 0, 2.0);
    sim.step_done(2, 0, 2.0);
    sim.step_done(1, 1, 2.0);
    let cmds = sim.step_done(2, 1, 2.0);
    assert_eq!(sends(&cmds).iter().filter(|(_, m)| matches!(m, ToWorker::Evaluate { step: 2 })).count(), 2);
    assert!(!cmds.iter().any(|c| matches!(c, Command::EvaluateOffPath { .. })));
}

#[test]
fn an_eval_worker_that_says_what_only_a_rank_says_or_falls_silent_is_disconnected() {
    let mut sim = Sim::new(config(2, 4));
    join_eval_worker(&mut sim, 9);
    join_eval_worker(&mut sim, 8);
    start(&mut sim, 2);
    let cmds = sim.step_done(9, 0, 2.0);
    assert!(cmds.iter().any(|c| matches!(c, Command::Disconnect { id: 9, reason } if reason.contains("StepDone"))), "{cmds:?}");
    assert!(matches!(&notes(&cmds)[..], [EvaluatorNote::Lost { id: 9, .. }]));
    assert_eq!(sim.core.snapshot().world_size, 2);
    // A rank that sends an eval worker's answer is a protocol error too.
    let eval = CheckpointEval { step: 2, loss_sum: 3.0, sequences: 2, per_source: vec![], tasks: vec![], samples: vec![] };
    let cmds = sim.from(1, ToCoordinator::CheckpointEvaluated(eval));
    assert!(cmds.iter().any(|c| matches!(c, Command::Disconnect { id: 1, .. })));
    // Eval worker 8 heard nothing from past its lease: lost, and the core's timer says when.
    let lease = sim.core.config().cluster.lease_ms;
    assert!(sim.core.poll_timeout().is_some());
    sim.advance(lease + 1);
    let cmds = sim.on(Event::Timeout);
    assert!(cmds.iter().any(|c| matches!(c, Command::Disconnect { id: 8, .. })), "{cmds:?}");
    assert!(notes(&cmds).iter().any(|n| matches!(n, EvaluatorNote::Lost { id: 8, .. })));
}
