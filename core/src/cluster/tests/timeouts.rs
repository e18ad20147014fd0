//! Time: leases that expire, a resumed run's gathering deadline, and `poll_timeout` — the
//! deadline it reports, a Timeout just before it that does nothing, and one at it that acts.

use super::*;

#[test]
fn silent_workers_are_declared_lost_after_the_lease() {
    let mut sim = Sim::new(config(2, 10));
    start(&mut sim, 2);
    sim.advance(3000);
    sim.from(1, ToCoordinator::Heartbeat);
    assert!(sim.on(Event::Timeout).is_empty(), "within the lease");
    sim.advance(2500); // worker 2 silent for 5.5 s > 5 s lease; worker 1 for 2.5 s
    let cmds = sim.on(Event::Timeout);
    assert!(cmds.iter().any(|c| matches!(c, Command::Disconnect { id: 2, .. })));
    assert!(!cmds.iter().any(|c| matches!(c, Command::Disconnect { id: 1, .. })));
    assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::WorkerLeft { reason, rank: Some(1), .. } if reason.contains("lease"))));
    assert!(matches!(&assigns(&cmds)[..], [(1, Assignment { world_size: 1, .. })]));
}

#[test]
fn a_resumed_run_starts_without_workers_that_did_not_come_back() {
    let mut c = config(3, 10);
    c.cluster.min_workers = 2;
    let mut core = Core::new(c, Some(ResumeFrom { dir: "d".into(), step: 4 }));
    let t0 = Instant::now();
    core.on(t0, Event::WorkerJoined { id: 1, info: caps(1) });
    assert!(core.on(t0 + Duration::from_secs(4), Event::Timeout).is_empty(), "one worker is below min_workers");
    let t1 = t0 + Duration::from_millis(4500);
    core.on(t1, Event::FromWorker { id: 1, msg: ToCoordinator::Heartbeat });
    core.on(t1, Event::WorkerJoined { id: 2, info: caps(2) });
    assert!(assigns(&core.on(t1 + Duration::from_millis(4900), Event::Timeout)).is_empty(), "within a lease of the last join");
    for id in [1, 2] {
        core.on(t1 + Duration::from_millis(4900), Event::FromWorker { id, msg: ToCoordinator::Heartbeat });
    }
    let cmds = core.on(t1 + Duration::from_millis(5100), Event::Timeout);
    assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Warning { message, .. } if message.contains("2 of 3 workers"))));
    let a = assigns(&cmds);
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|(_, a)| a.world_size == 2 && a.resume_from.as_deref() == Some("d")));
    // A fresh run waits for all its workers.
    let mut c = config(3, 10);
    c.cluster.min_workers = 2;
    let mut fresh = Core::new(c, None);
    fresh.on(t0, Event::WorkerJoined { id: 1, info: caps(1) });
    fresh.on(t0, Event::WorkerJoined { id: 2, info: caps(2) });
    assert!(assigns(&fresh.on(t0 + Duration::from_secs(600), Event::Timeout)).is_empty());
}

#[test]
fn nothing_is_timed_without_workers() {
    let mut sim = Sim::new(config(2, 10));
    assert_eq!(sim.core.poll_timeout(), None);
    assert!(sim.on(Event::Timeout).is_empty(), "a Timeout with nothing due does nothing");
    sim.join(1);
    sim.lose(1, "gone");
    assert_eq!(sim.core.poll_timeout(), None);
}

#[test]
fn poll_timeout_is_the_earliest_lease_expiry_and_a_timeout_acts_exactly_at_it() {
    let mut sim = Sim::new(config(2, 10));
    let t0 = sim.now;
    let lease = Duration::from_millis(sim.core.config().cluster.lease_ms);
    start(&mut sim, 2);
    assert_eq!(sim.core.poll_timeout(), Some(t0 + lease), "both were last heard from at t0");
    sim.advance(3000);
    sim.from(1, ToCoordinator::Heartbeat);
    let deadline = t0 + lease;
    assert_eq!(sim.core.poll_timeout(), Some(deadline), "worker 2's lease, the earlier of the two");
    // Just before the deadline: nothing happens and the deadline stands.
    sim.now = deadline - Duration::from_millis(1);
    assert!(sim.on(Event::Timeout).is_empty());
    assert_eq!(sim.core.poll_timeout(), Some(deadline));
    // At it: worker 2 is lost, and the next deadline is worker 1's lease.
    sim.now = deadline;
    let cmds = sim.on(Event::Timeout);
    assert!(cmds.iter().any(|c| matches!(c, Command::Disconnect { id: 2, reason } if reason.contains("lease"))));
    assert!(!cmds.iter().any(|c| matches!(c, Command::Disconnect { id: 1, .. })));
    assert_eq!(sim.core.poll_timeout(), Some(t0 + Duration::from_millis(3000) + lease));
    // A stale Timeout (its deadline was handled) does nothing.
    assert!(sim.on(Event::Timeout).is_empty());
}

#[test]
fn poll_timeout_reports_a_resumed_runs_gathering_deadline_while_it_can_act() {
    let mut c = config(3, 10);
    c.cluster.min_workers = 2;
    let lease = Duration::from_millis(c.cluster.lease_ms);
    let mut core = Core::new(c, Some(ResumeFrom { dir: "d".into(), step: 4 }));
    let t0 = Instant::now();
    core.on(t0, Event::WorkerJoined { id: 1, info: caps(1) });
    assert_eq!(core.poll_timeout(), Some(t0 + lease), "below min_workers: only the lease");
    let t1 = t0 + Duration::from_millis(1000);
    core.on(t1, Event::FromWorker { id: 1, msg: ToCoordinator::Heartbeat });
    core.on(t1, Event::WorkerJoined { id: 2, info: caps(2) });
    let gather = t1 + lease;
    assert_eq!(core.poll_timeout(), Some(gather));
    // Heartbeats push the leases beyond the gathering deadline, which then stands alone.
    let t2 = t1 + Duration::from_millis(4000);
    for id in [1, 2] {
        core.on(t2, Event::FromWorker { id, msg: ToCoordinator::Heartbeat });
    }
    assert_eq!(core.poll_timeout(), Some(gather));
    assert!(core.on(gather - Duration::from_millis(1), Event::Timeout).is_empty(), "just before the gathering deadline");
    let cmds = core.on(gather, Event::Timeout);
    assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Warning { message, .. } if message.contains("2 of 3 workers"))));
    assert_eq!(assigns(&cmds).len(), 2);
    assert_eq!(core.poll_timeout(), Some(t2 + lease), "formed: only the leases are timed");
}

#[test]
fn a_gathering_deadline_left_over_when_every_worker_came_back_is_not_reported() {
    let mut c = config(2, 10);
    let lease = Duration::from_millis(c.cluster.lease_ms);
    c.cluster.min_workers = 1;
    let mut core = Core::new(c, Some(ResumeFrom { dir: "d".into(), step: 4 }));
    let t0 = Instant::now();
    core.on(t0, Event::WorkerJoined { id: 1, info: caps(1) });
    assert_eq!(core.poll_timeout(), Some(t0 + lease), "the gathering deadline and worker 1's lease coincide");
    let t1 = t0 + Duration::from_millis(1000);
    core.on(t1, Event::FromWorker { id: 1, msg: ToCoordinator::Heartbeat });
    let cmds = core.on(t1, Event::WorkerJoined { id: 2, info: caps(2) });
    assert_eq!(assigns(&cmds).len(), 2, "everyone is back: the run forms at once");
    assert_eq!(core.poll_timeout(), Some(t1 + lease), "the gathering deadline (t0 + lease) no longer counts");
    assert!(core.on(t0 + lease, Event::Timeout).is_empty());
}
