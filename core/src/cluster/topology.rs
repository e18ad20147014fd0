//! How a generation's ranks combine gradients, and where each stands: a pure function of the
//! members (in rank order), the configured backend and whether NCCL already failed in this run.
//!
//! Kept out of the state machine so the layout rules — the ring's order and successors, the
//! NCCL group, a mixed generation whose NCCL rank 0 stands in the ring for its group — are
//! tested on their own, without playing a whole run.

use crate::cluster::WorkerId;
use crate::config::CollectiveBackend;
use crate::proto::{Capabilities, CollectiveKind, NcclPlace, RingPlace};

/// A generation's layout.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plan {
    pub(super) collective: CollectiveKind,
    /// The NCCL group: its members in rank order (empty for a ring generation).
    pub(super) nccl_group: Vec<WorkerId>,
    /// One per member, in rank order.
    pub(super) places: Vec<Place>,
}

/// One member's rank and its places in the ring and in the NCCL group, if any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Place {
    pub(super) id: WorkerId,
    pub(super) rank: u32,
    pub(super) ring: Option<RingPlace>,
    pub(super) nccl: Option<NcclPlace>,
}

/// Lays out a generation whose ranks are `members`, in order. Everyone is in the ring for a
/// ring generation and in the NCCL group for an NCCL one; in a mixed one the NCCL-capable
/// members form the group, whose rank 0 stands in the ring for it beside the other members.
/// An error when the configuration demands NCCL and a member cannot use it.
pub(super) fn plan(backend: CollectiveBackend, nccl_failed: bool, members: &[(WorkerId, &Capabilities)]) -> Result<Plan, String> {
    let collective = choose(backend, nccl_failed, members)?;
    let nccl_group: Vec<WorkerId> = match collective {
        CollectiveKind::Ring => Vec::new(),
        CollectiveKind::Nccl => members.iter().map(|(id, _)| *id).collect(),
        CollectiveKind::Mixed => members.iter().filter(|(_, info)| info.nccl).map(|(id, _)| *id).collect(),
    };
    let ring: Vec<&(WorkerId, &Capabilities)> = match collective {
        CollectiveKind::Ring => members.iter().collect(),
        CollectiveKind::Nccl => Vec::new(),
        CollectiveKind::Mixed => members.iter().filter(|(id, info)| !info.nccl || Some(id) == nccl_group.first()).collect(),
    };
    let places = members
        .iter()
        .enumerate()
        .map(|(rank, (id, _))| Place {
            id: *id,
            rank: rank as u32,
            ring: ring.iter().position(|(m, _)| m == id).map(|r| RingPlace {
                rank: r as u32,
                world_size: ring.len() as u32,
                successor: ring[(r + 1) % ring.len()].1.peer_addr,
            }),
            nccl: nccl_group.iter().position(|m| m == id).map(|r| NcclPlace { rank: r as u32, world_size: nccl_group.len() as u32 }),
        })
        .collect();
    Ok(Plan { collective, nccl_group, places })
}

/// NCCL when the configuration allows it and every member can join a communicator (a CUDA
/// worker built with NCCL); with `auto`, mixed when at least two members can and others cannot
/// (NCCL among those, the ring with the rest); the QUIC ring otherwise. A world of one needs
/// neither. An error when `parallel.collective = "nccl"` and a member cannot use it.
fn choose(backend: CollectiveBackend, nccl_failed: bool, members: &[(WorkerId, &Capabilities)]) -> Result<CollectiveKind, String> {
    let unable: Vec<String> = members
        .iter()
        .filter(|(_, info)| !info.nccl)
        .map(|(id, info)| format!("worker {id} on {} ({})", info.hostname, info.device))
        .collect();
    match backend {
        CollectiveBackend::Ring => Ok(CollectiveKind::Ring),
        _ if members.len() < 2 => Ok(CollectiveKind::Ring),
        CollectiveBackend::Auto if nccl_failed => Ok(CollectiveKind::Ring),
        CollectiveBackend::Auto if unable.is_empty() => Ok(CollectiveKind::Nccl),
        CollectiveBackend::Auto if members.len() - unable.len() >= 2 => Ok(CollectiveKind::Mixed),
        CollectiveBackend::Auto => Ok(CollectiveKind::Ring),
        CollectiveBackend::Nccl if unable.is_empty() => Ok(CollectiveKind::Nccl),
        CollectiveBackend::Nccl => Err(format!(
            "parallel.collective = \"nccl\", but {} cannot use NCCL (it needs a CUDA device, \
             a troupe built with --features cuda, and libnccl); use \"auto\" to let such \
             members average over the QUIC ring",
            unable.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn caps(port: u16, nccl: bool) -> Capabilities {
        Capabilities {
            hostname: "h".into(),
            pid: 1,
            threads: 1,
            device: if nccl { "cuda:0".into() } else { "cpu".into() },
            nccl,
            peer_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            metrics_addr: None,
            role: Default::default(),
        }
    }

    /// Members 1..=n on ports 1001.., with NCCL where `gpus` says so.
    fn plan_for(backend: CollectiveBackend, nccl_failed: bool, gpus: &[bool]) -> Result<Plan, String> {
        let infos: Vec<Capabilities> = gpus.iter().enumerate().map(|(i, g)| caps(1001 + i as u16, *g)).collect();
        let members: Vec<(WorkerId, &Capabilities)> = infos.iter().enumerate().map(|(i, c)| (i as WorkerId + 1, c)).collect();
        plan(backend, nccl_failed, &members)
    }

    fn ring_of(p: &Plan) -> Vec<(WorkerId, u32, u32, u16)> {
        p.places.iter().filter_map(|pl| pl.ring.map(|r| (pl.id, r.rank, r.world_size, r.successor.port()))).collect()
    }

    fn nccl_of(p: &Plan) -> Vec<(WorkerId, u32, u32)> {
        p.places.iter().filter_map(|pl| pl.nccl.map(|n| (pl.id, n.rank, n.world_size))).collect()
    }

    #[test]
    fn a_ring_generation_puts_every_rank_in_the_ring_in_rank_order() {
        let p = plan_for(CollectiveBackend::Auto, false, &[false, false, false]).unwrap();
        assert_eq!(p.collective, CollectiveKind::Ring);
        assert!(p.nccl_group.is_empty());
        assert_eq!(p.places.iter().map(|pl| (pl.id, pl.rank)).collect::<Vec<_>>(), vec![(1, 0), (2, 1), (3, 2)]);
        assert_eq!(ring_of(&p), vec![(1, 0, 3, 1002), (2, 1, 3, 1003), (3, 2, 3, 1001)]);
        assert!(nccl_of(&p).is_empty());
    }

    #[test]
    fn a_ring_of_one_is_its_own_successor() {
        let p = plan_for(CollectiveBackend::Nccl, false, &[false]).unwrap();
        assert_eq!(p.collective, CollectiveKind::Ring, "a world of one needs no NCCL");
        assert_eq!(ring_of(&p), vec![(1, 0, 1, 1001)]);
    }

    #[test]
    fn an_nccl_generation_has_no_ring() {
        let p = plan_for(CollectiveBackend::Auto, false, &[true, true]).unwrap();
        assert_eq!(p.collective, CollectiveKind::Nccl);
        assert_eq!(p.nccl_group, vec![1, 2]);
        assert_eq!(nccl_of(&p), vec![(1, 0, 2), (2, 1, 2)]);
        assert!(ring_of(&p).is_empty());
    }

    #[test]
    fn a_mixed_generation_bridges_the_nccl_group_into_the_ring_through_its_rank_0() {
        let p = plan_for(CollectiveBackend::Auto, false, &[false, true, false, true, true]).unwrap();
        assert_eq!(p.collective, CollectiveKind::Mixed);
        assert_eq!(p.nccl_group, vec![2, 4, 5]);
        assert_eq!(nccl_of(&p), vec![(2, 0, 3), (4, 1, 3), (5, 2, 3)]);
        assert_eq!(ring_of(&p), vec![(1, 0, 3, 1002), (2, 1, 3, 1003), (3, 2, 3, 1001)]);
        assert_eq!(p.places.iter().map(|pl| pl.rank).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn the_backend_and_an_earlier_nccl_failure_decide_the_collective() {
        let kind = |backend, failed, gpus: &[bool]| plan_for(backend, failed, gpus).map(|p| p.collective);
        assert_eq!(kind(CollectiveBackend::Ring, false, &[true, true]), Ok(CollectiveKind::Ring));
        assert_eq!(kind(CollectiveBackend::Auto, true, &[true, true]), Ok(CollectiveKind::Ring));
        assert_eq!(kind(CollectiveBackend::Auto, false, &[true, false]), Ok(CollectiveKind::Ring), "one NCCL member is no group");
        assert_eq!(kind(CollectiveBackend::Nccl, false, &[true, true]), Ok(CollectiveKind::Nccl));
        let err = kind(CollectiveBackend::Nccl, false, &[true, false, false]).unwrap_err();
        assert!(err.contains("worker 2 on h (cpu), worker 3 on h (cpu) cannot use NCCL"), "{err}");
    }
}
