//! Collectives as a run sees them: NCCL for CUDA workers and its unique id's bootstrap, the
//! ring's fallbacks, and mixed generations (the layout rules alone are tested in `topology`).

use super::*;

#[test]
fn cuda_workers_get_nccl_and_rank_0s_unique_id_reaches_every_rank() {
    let mut sim = Sim::new(config(2, 10));
    join_gpu(&mut sim, 1, true);
    let cmds = join_gpu(&mut sim, 2, true);
    let a = assigns(&cmds);
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|(_, a)| a.collective() == CollectiveKind::Nccl), "{a:?}");
    let generation = sim.core.generation();
    // Only rank 0 (worker 1) hands out the id; others and old generations are ignored.
    assert!(sim.from(2, ToCoordinator::NcclUniqueId { generation, id: vec![2; NCCL_UNIQUE_ID_BYTES] }).is_empty());
    assert!(sim.from(1, ToCoordinator::NcclUniqueId { generation: generation - 1, id: vec![1; NCCL_UNIQUE_ID_BYTES] }).is_empty());
    let cmds = sim.from(1, ToCoordinator::NcclUniqueId { generation, id: vec![7; NCCL_UNIQUE_ID_BYTES] });
    let boot: Vec<_> = sends(&cmds)
        .into_iter()
        .filter_map(|(to, m)| match m {
            ToWorker::NcclBootstrap { generation: g, id } => Some((to, g, id)),
            _ => None,
        })
        .collect();
    assert_eq!(boot.len(), 2);
    assert!(boot.iter().all(|(_, g, id)| *g == generation && *id == vec![7; NCCL_UNIQUE_ID_BYTES]));
    assert_eq!(boot.iter().map(|(to, _, _)| *to).collect::<Vec<_>>(), vec![1, 2]);
}

#[test]
fn a_malformed_unique_id_disconnects_its_sender() {
    let mut sim = Sim::new(config(2, 10));
    join_gpu(&mut sim, 1, true);
    join_gpu(&mut sim, 2, true);
    let generation = sim.core.generation();
    let cmds = sim.from(1, ToCoordinator::NcclUniqueId { generation, id: vec![0; 5] });
    assert!(
        cmds.iter().any(|c| matches!(c, Command::Disconnect { id: 1, reason } if reason.contains("ncclUniqueId of 5 bytes"))),
        "{cmds:?}"
    );
}

#[test]
fn a_member_without_nccl_puts_the_generation_on_the_ring_or_fails_a_run_that_demands_nccl() {
    let mut sim = Sim::new(config(2, 10));
    join_gpu(&mut sim, 1, true);
    let cmds = join_gpu(&mut sim, 2, false);
    assert!(assigns(&cmds).iter().all(|(_, a)| a.collective() == CollectiveKind::Ring));

    let mut c = config(2, 10);
    c.parallel.collective = CollectiveBackend::Ring;
    let mut sim = Sim::new(c);
    join_gpu(&mut sim, 1, true);
    let cmds = join_gpu(&mut sim, 2, true);
    assert!(assigns(&cmds).iter().all(|(_, a)| a.collective() == CollectiveKind::Ring));

    let mut c = config(2, 10);
    c.parallel.collective = CollectiveBackend::Nccl;
    let mut sim = Sim::new(c);
    join_gpu(&mut sim, 1, true);
    let cmds = join_gpu(&mut sim, 2, false);
    let failed = cmds.iter().find_map(|c| match c {
        Command::Finish { ok: false, error: Some(e) } => Some(e.clone()),
        _ => None,
    });
    let failed = failed.expect("the run fails");
    assert!(failed.contains("parallel.collective = \"nccl\"") && failed.contains("worker 2 on test (cpu)"), "{failed}");
    // A world of one needs no collective at all.
    let mut c = config(1, 10);
    c.parallel.collective = CollectiveBackend::Nccl;
    let mut sim = Sim::new(c);
    let cmds = join_gpu(&mut sim, 1, false);
    assert!(matches!(&assigns(&cmds)[..], [(1, a)] if a.collective() == CollectiveKind::Ring));
}

#[test]
fn under_auto_an_nccl_communicator_that_cannot_form_falls_back_to_the_ring() {
    let mut sim = Sim::new(config(2, 10));
    join_gpu(&mut sim, 1, true);
    join_gpu(&mut sim, 2, true);
    let generation = sim.core.generation();
    let cmds = sim.from(2, ToCoordinator::NcclFailed { generation, error: "ncclInvalidUsage: duplicate GPU".into() });
    assert!(records(&cmds).iter().any(|e| matches!(e, RunEvent::Warning { message, .. }
        if message.contains("could not set up NCCL") && message.contains("duplicate GPU") && message.contains("averages over the QUIC ring"))), "{cmds:?}");
    let a = assigns(&cmds);
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|(_, a)| a.collective() == CollectiveKind::Ring), "{a:?}");
    // A failed step, or a ring that did not form, is no reason to give NCCL up.
    let mut sim = Sim::new(config(2, 10));
    join_gpu(&mut sim, 1, true);
    join_gpu(&mut sim, 2, true);
    let generation = sim.core.generation();
    let cmds = sim.from(2, ToCoordinator::CollectiveFailed { generation, step: Some(0), error: "timed out".into() });
    assert!(assigns(&cmds).iter().all(|(_, a)| a.collective() == CollectiveKind::Nccl));
    let generation = sim.core.generation();
    let cmds = sim.from(1, ToCoordinator::CollectiveFailed { generation, step: None, error: "ring peer unreachable".into() });
    assert!(assigns(&cmds).iter().all(|(_, a)| a.collective() == CollectiveKind::Nccl));
}

#[test]
fn a_mixed_generation_puts_the_cuda_workers_in_an_nccl_group_whose_rank_0_joins_the_ring() {
    let mut sim = Sim::new(config(5, 10));
    let mut cmds = Vec::new();
    for (id, gpu) in [(1, true), (2, false), (3, true), (4, false), (5, true)] {
        cmds = join_gpu(&mut sim, id, gpu);
    }
    let a: BTreeMap<WorkerId, Assignment> = assigns(&cmds).into_iter().collect();
    assert_eq!(a.len(), 5);
    assert!(a.values().all(|a| a.collective() == CollectiveKind::Mixed && a.world_size == 5));
    // The NCCL group: workers 1, 3, 5 in rank order.
    let nccl: Vec<(WorkerId, NcclPlace)> = a.iter().filter_map(|(id, a)| a.nccl.map(|n| (*id, n))).collect();
    assert_eq!(
        nccl,
        vec![
            (1, NcclPlace { rank: 0, world_size: 3 }),
            (3, NcclPlace { rank: 1, world_size: 3 }),
            (5, NcclPlace { rank: 2, world_size: 3 })
        ]
    );
    // The ring: the group's rank 0 (worker 1) and the CPU workers 2 and 4, each pointing at the next.
    let ring: Vec<(WorkerId, u32, u32, u16)> =
        a.iter().filter_map(|(id, a)| a.ring.map(|r| (*id, r.rank, r.world_size, r.successor.port()))).collect();
    assert_eq!(ring, vec![(1, 0, 3, 1002), (2, 1, 3, 1004), (4, 2, 3, 1001)]);
    // Only the group's rank 0 hands out the id, and only the group gets it.
    let generation = sim.core.generation();
    assert!(sim.from(3, ToCoordinator::NcclUniqueId { generation, id: vec![3; NCCL_UNIQUE_ID_BYTES] }).is_empty());
    let cmds = sim.from(1, ToCoordinator::NcclUniqueId { generation, id: vec![1; NCCL_UNIQUE_ID_BYTES] });
    let to: Vec<WorkerId> =
        sends(&cmds).into_iter().filter(|(_, m)| matches!(m, ToWorker::NcclBootstrap { .. })).map(|(to, _)| to).collect();
    assert_eq!(to, vec![1, 3, 5]);
    // Forwarded once per generation.
    assert!(sim.from(1, ToCoordinator::NcclUniqueId { generation, id: vec![1; NCCL_UNIQUE_ID_BYTES] }).is_empty());
}
