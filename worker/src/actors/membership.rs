//! This worker's place in the membership generations the coordinator announces, as a plain
//! type the Worker actor drives (no I/O, no actors: tested on its own below).
//!
//! Every `Assign` starts a new generation, newer than any before. A generation's link to the
//! other ranks arrives in parts, in any order: the ring (formed by this worker, off the
//! mailbox) if it is in the ring, the NCCL unique id (handed out by the coordinator) if it is
//! in an NCCL group. The trainer regroups once every part it needs is there. Parts of a
//! generation that is over are refused, so that a late ring or id never reaches the trainer.

use std::path::{Component, Path};

use troupe_core::proto::{Assignment, CollectiveKind, NcclPlace, RingPlace};

/// How the trainer of a generation reaches the other ranks. `R` is the handle of the
/// generation's ring (the collective actor's address in the worker).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LinkPlan<R> {
    /// A world of one.
    Alone,
    /// The generation's QUIC ring.
    Ring(R),
    /// An NCCL communicator of every rank, joined with the group's rank-0 unique id.
    Nccl { id: Vec<u8>, place: NcclPlace },
    /// A mixed generation: this worker's NCCL group (if it is in it) and the ring (if it is in
    /// it), see `comm::Mixed`.
    Mixed { nccl: Option<(Vec<u8>, NcclPlace)>, ring: Option<R> },
}

/// This worker's place in one generation, as its assignment gives it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Place {
    pub(crate) rank: u32,
    pub(crate) world_size: u32,
    pub(crate) kind: CollectiveKind,
    pub(crate) ring: Option<RingPlace>,
    pub(crate) nccl: Option<NcclPlace>,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct WorkerMembership<R> {
    /// The newest generation the coordinator announced (0 before the first).
    generation: u64,
    /// This worker's place in it; `None` before the first assignment and while paused.
    place: Option<Place>,
    ring: Option<R>,
    nccl_id: Option<Vec<u8>>,
}

impl<R> Default for WorkerMembership<R> {
    fn default() -> Self {
        WorkerMembership { generation: 0, place: None, ring: None, nccl_id: None }
    }
}

impl<R> WorkerMembership<R> {
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn place(&self) -> Option<Place> {
        self.place
    }

    /// Takes the place `a` gives in its generation, which must be newer than the current one
    /// (otherwise a protocol error, returned as its text). The parts of the previous
    /// generation's link that arrived are dropped.
    pub(crate) fn assign(&mut self, a: &Assignment) -> Result<Place, String> {
        if a.generation <= self.generation {
            return Err(format!("protocol error: assignment for generation {} after generation {}", a.generation, self.generation));
        }
        let place = Place { rank: a.rank, world_size: a.world_size, kind: a.collective(), ring: a.ring, nccl: a.nccl };
        *self = WorkerMembership { generation: a.generation, place: Some(place), ring: None, nccl_id: None };
        Ok(place)
    }

    /// The coordinator paused the run in `generation`: this worker has no place until the next
    /// assignment.
    pub(crate) fn pause(&mut self, generation: u64) {
        *self = WorkerMembership { generation, place: None, ring: None, nccl_id: None };
    }

    /// The ring of `generation` is formed. A ring of another generation (or while paused) is
    /// handed back, to be closed.
    pub(crate) fn ring_formed(&mut self, generation: u64, ring: R) -> Result<(), R> {
        if generation != self.generation || self.place.is_none_or(|p| p.ring.is_none()) {
            return Err(ring);
        }
        self.ring = Some(ring);
        Ok(())
    }

    /// Whether a ring formed for `generation` is still wanted (before starting its actor).
    pub(crate) fn wants_ring(&self, generation: u64) -> bool {
        generation == self.generation && self.place.is_some_and(|p| p.ring.is_some())
    }

    /// The NCCL unique id of `generation` arrived; ignored (false) unless this worker is in
    /// that generation's NCCL group.
    pub(crate) fn nccl_id(&mut self, generation: u64, id: Vec<u8>) -> bool {
        if generation != self.generation || self.place.is_none_or(|p| p.nccl.is_none()) {
            return false;
        }
        self.nccl_id = Some(id);
        true
    }

    /// The link of the current generation, once every part this worker needs has arrived
    /// (taken: it is returned once). `None` while a part is missing; an error when the parts
    /// do not make the generation's kind of link (a protocol error).
    pub(crate) fn take_link(&mut self) -> Option<Result<LinkPlan<R>, String>> {
        let place = self.place?;
        let ring_ready = place.ring.is_none() || self.ring.is_some();
        let nccl_ready = place.nccl.is_none() || self.nccl_id.is_some();
        if !ring_ready || !nccl_ready {
            return None;
        }
        let nccl = place.nccl.zip(self.nccl_id.take()).map(|(place, id)| (id, place));
        Some(match (place.kind, nccl, self.ring.take()) {
            (CollectiveKind::Ring, _, Some(ring)) => Ok(LinkPlan::Ring(ring)),
            (CollectiveKind::Nccl, Some((id, place)), _) => Ok(LinkPlan::Nccl { id, place }),
            (CollectiveKind::Mixed, nccl, ring) => Ok(LinkPlan::Mixed { nccl, ring }),
            (kind, _, _) => Err(format!("protocol error: a {kind:?} generation without its ring or NCCL group")),
        })
    }
}

/// Whether `path`, a folder named by the coordinator (a checkpoint to write or resume from),
/// lies inside the run folder `run_dir` of the assignment: below it, with no `..` that could
/// climb out. Anything else is refused, so that even a coordinator that goes wrong cannot
/// make this worker write or read elsewhere.
pub(crate) fn inside_run_dir(run_dir: &Path, path: &Path) -> bool {
    let climbs = |p: &Path| p.components().any(|c| matches!(c, Component::ParentDir));
    !run_dir.as_os_str().is_empty() && !climbs(run_dir) && !climbs(path) && path.starts_with(run_dir) && path != run_dir
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    /// Rank `rank` of `world_size`, in the ring and the NCCL group as asked, each of the whole
    /// world (a ring or NCCL generation).
    fn assignment(generation: u64, rank: u32, world_size: u32, ring: bool, nccl: bool) -> Assignment {
        let successor: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        Assignment {
            generation,
            rank,
            world_size,
            ring: ring.then_some(RingPlace { rank, world_size, successor }),
            nccl: nccl.then_some(NcclPlace { rank, world_size }),
            config_toml: String::new(),
            run_dir: String::new(),
            resume_from: None,
            start_step: 0,
        }
    }

    #[test]
    fn an_assignment_must_be_newer_than_the_current_generation() {
        let mut m = WorkerMembership::<&str>::default();
        assert!(m.assign(&assignment(3, 0, 2, true, false)).is_ok());
        assert_eq!(m.generation(), 3);
        for stale in [3, 2] {
            let e = m.assign(&assignment(stale, 0, 2, true, false)).unwrap_err();
            assert!(e.contains(&format!("generation {stale} after generation 3")), "{e}");
        }
        assert_eq!(m.generation(), 3, "a refused assignment changes nothing");
    }

    #[test]
    fn a_ring_link_is_ready_when_its_ring_is_formed_and_only_once() {
        let mut m = WorkerMembership::default();
        m.assign(&assignment(1, 1, 3, true, false)).unwrap();
        assert!(m.take_link().is_none(), "no ring yet");
        assert!(m.wants_ring(1));
        m.ring_formed(1, "ring-1").unwrap();
        assert_eq!(m.take_link(), Some(Ok(LinkPlan::Ring("ring-1"))));
        assert_eq!(m.take_link(), None, "the link was taken: it is handed out once");
    }

    #[test]
    fn parts_of_an_older_generation_are_refused() {
        let mut m = WorkerMembership::default();
        m.assign(&assignment(1, 0, 2, true, true)).unwrap();
        m.assign(&assignment(2, 0, 2, true, true)).unwrap();
        assert!(!m.wants_ring(1));
        assert_eq!(m.ring_formed(1, "old"), Err("old"), "handed back to be closed");
        assert!(!m.nccl_id(1, vec![1]));
        assert!(m.take_link().is_none(), "nothing of generation 2 has arrived");
    }

    #[test]
    fn a_mixed_link_waits_for_both_the_ring_and_the_nccl_id_in_any_order() {
        for ring_first in [true, false] {
            let mut m = WorkerMembership::default();
            // Rank 0 of three: in an NCCL group of two, and in the ring with the third worker.
            let mut a = assignment(4, 0, 3, true, true);
            a.nccl = Some(NcclPlace { rank: 0, world_size: 2 });
            a.ring = a.ring.map(|r| RingPlace { world_size: 2, ..r });
            assert_eq!(a.collective(), CollectiveKind::Mixed);
            m.assign(&a).unwrap();
            if ring_first {
                m.ring_formed(4, "ring").unwrap();
            } else {
                assert!(m.nccl_id(4, vec![7; 4]));
            }
            assert!(m.take_link().is_none(), "one part is missing");
            if ring_first {
                assert!(m.nccl_id(4, vec![7; 4]));
            } else {
                m.ring_formed(4, "ring").unwrap();
            }
            let place = NcclPlace { rank: 0, world_size: 2 };
            assert_eq!(m.take_link(), Some(Ok(LinkPlan::Mixed { nccl: Some((vec![7; 4], place)), ring: Some("ring") })));
        }
    }

    #[test]
    fn an_nccl_id_is_ignored_by_a_worker_outside_the_group() {
        let mut m = WorkerMembership::<&str>::default();
        m.assign(&assignment(2, 2, 3, true, false)).unwrap();
        assert!(!m.nccl_id(2, vec![1]));
    }

    #[test]
    fn a_paused_worker_takes_no_part_until_its_next_assignment() {
        let mut m = WorkerMembership::default();
        m.assign(&assignment(1, 0, 2, true, false)).unwrap();
        m.pause(2);
        assert_eq!(m.generation(), 2);
        assert!(m.place().is_none());
        assert_eq!(m.ring_formed(2, "late"), Err("late"));
        assert!(m.take_link().is_none());
        assert!(m.assign(&assignment(2, 0, 2, true, false)).is_err(), "the pause was generation 2");
        assert!(m.assign(&assignment(3, 0, 2, true, false)).is_ok());
    }

    #[test]
    fn only_folders_below_the_run_folder_are_inside_it() {
        let run = Path::new("/data/runs/tiny");
        assert!(inside_run_dir(run, Path::new("/data/runs/tiny/checkpoints/step-000005.g2.tmp")));
        assert!(inside_run_dir(Path::new("runs/tiny"), Path::new("runs/tiny/checkpoints/step-000010")));
        for outside in ["/data/runs/tiny", "/data/runs/tinyx/checkpoints", "/etc", "/data/runs/tiny/../other", "runs/tiny/x"] {
            assert!(!inside_run_dir(run, Path::new(outside)), "{outside}");
        }
        assert!(!inside_run_dir(Path::new(""), Path::new("checkpoints")), "no run folder: nothing is inside it");
        assert!(!inside_run_dir(Path::new("/data/runs/../x"), Path::new("/data/runs/../x/y")));
    }
}
