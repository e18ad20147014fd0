//! Scenario tests of the cluster core on a simulated clock: a `Sim` plays the workers' part
//! and the tests check the commands the core answers with. Split by concern: `run` (a run's
//! course from start to finish), `elastic` (losses, joins, leaves, regroups), `collective`
//! (NCCL, the ring, mixed generations), `timeouts` (leases, gathering, `poll_timeout`),
//! `failures` (non-finite steps, ranks that disagree, checkpoints that cannot be written) and
//! `eval_workers` (evaluation off the training path).

mod collective;
mod elastic;
mod eval_workers;
mod failures;
mod run;
mod timeouts;

use super::*;
use crate::config::CollectiveBackend;
use crate::proto::{Assignment, CollectiveKind, EvalReport, NcclPlace, RefusalKind, SkipReason, StepReport, NCCL_UNIQUE_ID_BYTES};
use std::net::SocketAddr;
use std::time::Duration;

fn config(workers: usize, steps: u64) -> Config {
    let mut c = Config::default_config();
    c.cluster.workers = workers;
    c.cluster.max_workers = 0;
    c.cluster.min_workers = 1;
    c.train.steps = steps;
    c.train.warmup_steps = 0;
    c.eval.interval = 2;
    c.checkpoint.interval = 2;
    c
}

fn caps(port: u16) -> Capabilities {
    Capabilities {
        hostname: "test".into(),
        pid: port as u32,
        threads: 1,
        device: "cpu".into(),
        nccl: false,
        peer_addr: SocketAddr::from(([127, 0, 0, 1], port)),
        metrics_addr: None,
        role: Default::default(),
    }
}

/// A simulated clock and the core, with helpers to play the workers' part.
struct Sim {
    core: Core,
    now: Instant,
}

impl Sim {
    fn new(config: Config) -> Sim {
        Sim { core: Core::new(config, None), now: Instant::now() }
    }
    fn on(&mut self, ev: Event) -> Vec<Command> {
        self.core.on(self.now, ev)
    }
    fn from(&mut self, id: WorkerId, msg: ToCoordinator) -> Vec<Command> {
        self.on(Event::FromWorker { id, msg })
    }
    fn join(&mut self, id: WorkerId) -> Vec<Command> {
        self.on(Event::WorkerJoined { id, info: caps(1000 + id as u16) })
    }
    fn lose(&mut self, id: WorkerId, reason: &str) -> Vec<Command> {
        self.on(Event::WorkerLost { id, reason: reason.into() })
    }
    fn ready(&mut self, id: WorkerId, completed_steps: u64) -> Vec<Command> {
        let generation = self.core.generation();
        self.from(id, ToCoordinator::Ready { generation, completed_steps })
    }
    fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
    }
    fn step_done(&mut self, id: WorkerId, step: u64, loss: f64) -> Vec<Command> {
        let generation = self.core.generation();
        self.step_done_in(generation, id, step, loss)
    }
    fn step_done_in(&mut self, generation: u64, id: WorkerId, step: u64, loss: f64) -> Vec<Command> {
        let world_size = self.core.snapshot().world_size as u32;
        self.from(
            id,
            ToCoordinator::StepDone(StepReport {
                generation,
                world_size,
                step,
                loss,
                tokens: 100,
                grad_norm: 1.0,
                lr: 0.1,
                data_seconds: 0.0,
                compute_seconds: 0.1,
                comm_seconds: 0.01,
                skipped: None,
                locally_finite: true,
            }),
        )
    }
    /// A step report whose figures are given: `skipped` and whether the rank's own values were
    /// finite.
    fn step_report(
        &mut self,
        id: WorkerId,
        step: u64,
        loss: f64,
        grad_norm: f64,
        skipped: Option<SkipReason>,
        locally_finite: bool,
    ) -> Vec<Command> {
        let (generation, world_size) = (self.core.generation(), self.core.snapshot().world_size as u32);
        let report = StepReport {
            generation,
            world_size,
            step,
            loss,
            tokens: 100,
            grad_norm,
            lr: 0.1,
            data_seconds: 0.0,
            compute_seconds: 0.1,
            comm_seconds: 0.01,
            skipped,
            locally_finite,
        };
        self.from(id, ToCoordinator::StepDone(report))
    }
    fn write_failed(&mut self, id: WorkerId, step: u64, error: &str) -> Vec<Command> {
        let generation = self.core.generation();
        self.from(id, ToCoordinator::CheckpointFailed { generation, step, error: error.into() })
    }
    fn written(&mut self, id: WorkerId, step: u64, files: Vec<FileDigest>) -> Vec<Command> {
        let generation = self.core.generation();
        self.from(id, ToCoordinator::CheckpointWritten { generation, step, files })
    }
}

fn sends(cmds: &[Command]) -> Vec<(WorkerId, ToWorker)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Send { to, msg } => Some((*to, msg.clone())),
            _ => None,
        })
        .collect()
}

fn assigns(cmds: &[Command]) -> Vec<(WorkerId, Assignment)> {
    sends(cmds)
        .into_iter()
        .filter_map(|(to, m)| match m {
            ToWorker::Assign(a) => Some((to, a)),
            _ => None,
        })
        .collect()
}

fn steps_sent(cmds: &[Command]) -> Vec<(WorkerId, u64)> {
    sends(cmds)
        .into_iter()
        .filter_map(|(to, m)| match m {
            ToWorker::Step { step } => Some((to, step)),
            _ => None,
        })
        .collect()
}

fn records(cmds: &[Command]) -> Vec<RunEvent> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Record(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn start(sim: &mut Sim, n: u64) {
    for id in 1..=n {
        sim.join(id);
    }
    for id in 1..=n {
        sim.ready(id, 0);
    }
    assert_eq!(sim.core.phase(), Phase::Training);
}

fn join_gpu(sim: &mut Sim, id: WorkerId, nccl: bool) -> Vec<Command> {
    let info = Capabilities { device: if nccl { format!("cuda:{id}") } else { "cpu".into() }, nccl, ..caps(1000 + id as u16) };
    sim.on(Event::WorkerJoined { id, info })
}
