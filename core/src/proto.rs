//! Every message on the control channel, worker ⇄ coordinator.
//!
//! Frames are `postcard`-encoded and length-prefixed (see `troupe_common::net`). The first frame a
//! worker sends is [`Hello`]; the coordinator answers [`ToWorker::Authenticated`] (its own
//! proof of the join token, which the worker checks before acting on anything) and then
//! [`ToWorker::Welcome`], or [`ToWorker::Refused`]. Tensors never ride here: gradients move
//! on the ring's own streams.
//! Ordering is FIFO per connection; nothing assumes an order across workers.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Bumped on any incompatible change of a message below or of the bulk-data format.
pub const PROTOCOL_VERSION: u32 = 7;

/// The first frame on a worker's control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    /// `net::join_proof` of the cluster token over this connection's TLS keying material; all
    /// zeros when the worker has no token.
    pub join_proof: [u8; 32],
    pub capabilities: Capabilities,
}

/// What a worker tells the coordinator about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    pub hostname: String,
    pub pid: u32,
    /// Intra-op threads the worker will use.
    pub threads: u32,
    /// "cpu" or "cuda:N".
    pub device: String,
    /// This worker can join an NCCL communicator: it computes on a CUDA device, was built
    /// with the `cuda` feature, and loaded libnccl.
    pub nccl: bool,
    /// Where ring peers reach this worker (QUIC).
    pub peer_addr: SocketAddr,
    /// Where this worker serves Prometheus `/metrics`, if it does.
    pub metrics_addr: Option<SocketAddr>,
    /// What the worker joins as: a rank that trains, or an evaluator of checkpoints.
    pub role: WorkerRole,
}

/// What a worker joins the cluster as (`troupe worker --role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum WorkerRole {
    /// A rank that trains (the default).
    #[default]
    Train,
    /// An evaluator: it never trains or holds a rank; it loads each committed checkpoint the
    /// coordinator hands it and measures it ([`ToWorker::EvaluateCheckpoint`]), so training
    /// does not pause for evaluation.
    Eval,
}

/// Why the coordinator refused a worker. Each has its own close code too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalKind {
    VersionMismatch,
    BadToken,
    ClusterFull,
    Protocol,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToCoordinator {
    Hello(Hello),
    /// Liveness, sent every `cluster.heartbeat_ms` whatever the trainer is doing.
    Heartbeat,
    /// The model is built (and loaded, when resuming), the ring of `generation` is formed,
    /// and this worker's parameters are those after `completed_steps` optimizer steps.
    Ready {
        generation: u64,
        completed_steps: u64,
    },
    /// The state from the sync source is in place: this rank is at `step` completed steps.
    Synced {
        generation: u64,
        step: u64,
    },
    StepDone(StepReport),
    /// A collective of `generation` failed or timed out (or the ring could not be formed). The
    /// step it belonged to was not applied: parameters are as before it.
    CollectiveFailed {
        generation: u64,
        step: Option<u64>,
        error: String,
    },
    EvalDone(EvalReport),
    /// This rank's files for the checkpoint are written and fsynced in the temporary folder.
    CheckpointWritten {
        generation: u64,
        step: u64,
        files: Vec<FileDigest>,
    },
    /// This rank could not write its part of the checkpoint.
    CheckpointFailed {
        generation: u64,
        step: u64,
        error: String,
    },
    /// The worker hit an error it cannot recover from and is about to exit.
    Failed {
        error: String,
    },
    /// The worker was asked to stop (SIGINT/SIGTERM) and will leave at the next step boundary.
    Leaving {
        reason: String,
    },
    /// The NCCL group's rank 0: the `ncclUniqueId` (128 bytes) every member needs to join its
    /// communicator. The coordinator hands it to the group in [`ToWorker::NcclBootstrap`].
    NcclUniqueId {
        generation: u64,
        id: Vec<u8>,
    },
    /// NCCL itself failed to set up in `generation` (creating the unique id, joining the
    /// communicator): a reason to stop trying NCCL, unlike a ring or a peer failing.
    NcclFailed {
        generation: u64,
        error: String,
    },
    /// An eval worker's measurement of a committed checkpoint.
    CheckpointEvaluated(CheckpointEval),
    /// An eval worker could not evaluate the checkpoint of `step`.
    CheckpointEvalFailed {
        step: u64,
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    /// The coordinator's answer to a valid Hello, before anything else: its own
    /// `net::join_proof` of the cluster token over this connection (all zeros without a
    /// token). A worker with a token refuses a coordinator whose proof does not verify: only
    /// the real coordinator knows the token.
    Authenticated {
        proof: [u8; 32],
    },
    /// Joined. Both sides send heartbeats every `heartbeat_ms` from now on; a side that hears
    /// nothing for `lease_ms` considers the other gone.
    /// A worker that loses its coordinator tries to rejoin (a restarted one) for `rejoin_ms`.
    Welcome {
        worker_id: u64,
        heartbeat_ms: u64,
        lease_ms: u64,
        rejoin_ms: u64,
    },
    /// Liveness of the coordinator, so a worker can tell a long step from a dead coordinator.
    Heartbeat,
    Refused {
        kind: RefusalKind,
        reason: String,
    },
    /// Take part in membership generation `assignment.generation`: build the model (the first
    /// time), give up whatever the previous generation was doing, form the new ring, answer
    /// `Ready`. Sent again to every member whenever membership changes.
    Assign(Assignment),
    /// Too few workers remain: give up the current step and wait for the next `Assign`.
    Pause {
        generation: u64,
        reason: String,
    },
    /// Make every rank's parameters and optimizer state equal to `source_rank`'s, which is at
    /// `step` completed steps (a broadcast over the ring), then answer `Synced`.
    Sync {
        generation: u64,
        source_rank: u32,
        step: u64,
    },
    /// Run optimizer step `step` (0-based: the step after `step` completed steps).
    Step {
        step: u64,
    },
    /// Compute this rank's share of the validation loss with the current parameters.
    Evaluate {
        step: u64,
    },
    /// To an eval worker: load the committed checkpoint of `step` (at `checkpoint` on the
    /// coordinator's host, or in `checkpoint.store` when the run's config has one) and
    /// measure it as the run's config says; answer `CheckpointEvaluated`.
    EvaluateCheckpoint {
        step: u64,
        checkpoint: String,
        config_toml: String,
    },
    /// Write this rank's part of the checkpoint after `step` completed steps into `dir`.
    Checkpoint {
        step: u64,
        dir: String,
    },
    /// Leave the run and exit.
    Stop {
        reason: String,
    },
    /// Join the NCCL communicator of `generation` (identified by rank 0's `ncclUniqueId`),
    /// then answer `Ready` (or `CollectiveFailed` if NCCL cannot form it).
    NcclBootstrap {
        generation: u64,
        id: Vec<u8>,
    },
}

/// How a generation's ranks combine gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CollectiveKind {
    /// The ring over QUIC between the workers' peer endpoints (any device; GPU workers stage
    /// through host memory).
    Ring,
    /// NCCL between CUDA workers, bootstrapped through the coordinator: the group's rank 0
    /// sends [`ToCoordinator::NcclUniqueId`], every member gets [`ToWorker::NcclBootstrap`].
    Nccl,
    /// Both: NCCL inside the group of workers that can use it, the QUIC ring between that
    /// group (its rank 0) and the other workers. A sum is reduced in the group, then over the
    /// ring, then broadcast in the group.
    Mixed,
}

/// A worker's place in a generation's QUIC ring (ring ranks number the ring's members only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingPlace {
    pub rank: u32,
    pub world_size: u32,
    /// The next member's peer address (this worker's own in a ring of one).
    pub successor: SocketAddr,
}

/// A worker's place in a generation's NCCL group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NcclPlace {
    pub rank: u32,
    pub world_size: u32,
}

impl Assignment {
    /// How this assignment's generation combines gradients.
    pub fn collective(&self) -> CollectiveKind {
        // In a mixed generation neither the group nor the ring holds every rank.
        let partial =
            self.nccl.is_some_and(|n| n.world_size < self.world_size) || self.ring.is_some_and(|r| r.world_size < self.world_size);
        match (&self.ring, &self.nccl) {
            _ if partial => CollectiveKind::Mixed,
            (_, Some(_)) => CollectiveKind::Nccl,
            _ => CollectiveKind::Ring,
        }
    }
}

/// Bytes of an `ncclUniqueId`.
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub rank: u32,
    pub world_size: u32,
    /// Changes whenever membership changes; ring peers must agree on it.
    pub generation: u64,
    /// This worker's place in the generation's QUIC ring, if it is in one: every rank of a
    /// ring generation (a world of one is a ring of one); in a mixed generation, the workers
    /// that cannot use NCCL and the NCCL group's rank 0.
    pub ring: Option<RingPlace>,
    /// This worker's place in the generation's NCCL group, if it is in one: every rank of an
    /// NCCL generation; in a mixed generation, the CUDA workers that can use NCCL.
    pub nccl: Option<NcclPlace>,
    /// The whole run configuration, as TOML (validated again by the worker).
    pub config_toml: String,
    /// The run folder; checkpoint folders below are given as paths too.
    pub run_dir: String,
    /// Checkpoint folder to load parameters, optimizer state and cursor from; only used by a
    /// worker that does not hold a model yet, and only when no member holds the state.
    pub resume_from: Option<String>,
    /// Completed steps in `resume_from` (0 for a fresh run).
    pub start_step: u64,
}

/// One rank's result for one optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub generation: u64,
    /// Ranks of that generation (whose gradients the step summed).
    pub world_size: u32,
    pub step: u64,
    /// The step's mean loss over the whole global batch (summed over ranks with the
    /// gradients, so every rank reports the same value).
    pub loss: f64,
    /// Tokens this rank trained on.
    pub tokens: u64,
    /// Global gradient norm before clipping (identical on every rank).
    pub grad_norm: f64,
    pub lr: f64,
    pub data_seconds: f64,
    pub compute_seconds: f64,
    pub comm_seconds: f64,
    /// Why no update was applied at this step (parameters and optimizer state untouched), if
    /// none was. Decided from the summed loss and the global norm, which every rank holds
    /// alike, so every rank decides the same without another collective.
    pub skipped: Option<SkipReason>,
    /// Whether this rank's own loss and gradient, before they were summed with the others',
    /// were finite: names the rank a non-finite step came from.
    pub locally_finite: bool,
}

/// Why a step applied no update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SkipReason {
    /// The step's loss, summed over the ranks, is NaN or infinite.
    NonFiniteLoss,
    /// The gradient's global norm is NaN or infinite.
    NonFiniteGradient,
    /// A fault hook told every rank to skip this step (tests).
    Injected,
}

impl SkipReason {
    /// The `reason` label of `troupe_steps_skipped_total` and the events' text.
    pub fn label(self) -> &'static str {
        match self {
            SkipReason::NonFiniteLoss => "nonfinite_loss",
            SkipReason::NonFiniteGradient => "nonfinite_gradient",
            SkipReason::Injected => "injected",
        }
    }

    /// Whether a step with this (global) loss and gradient norm must be skipped. NaN and
    /// infinities propagate through the sums, so a bad value on any one rank shows here on
    /// every rank.
    pub fn of_step(loss: f64, grad_norm: f64) -> Option<SkipReason> {
        if !loss.is_finite() {
            Some(SkipReason::NonFiniteLoss)
        } else if !grad_norm.is_finite() {
            Some(SkipReason::NonFiniteGradient)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub generation: u64,
    pub step: u64,
    /// Σ over this rank's validation sequences of their mean token loss.
    pub loss_sum: f64,
    pub sequences: u64,
    /// The same per source, when the data has several (each source's share of the
    /// sequences; their sums are `loss_sum` and `sequences`).
    pub per_source: Vec<SourceLoss>,
}

/// What an eval worker measured on a committed checkpoint: the validation loss over all of
/// `eval.sequences` (as the ranks' shares would sum to), the evaluation tasks and the samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointEval {
    pub step: u64,
    pub loss_sum: f64,
    pub sequences: u64,
    pub per_source: Vec<SourceLoss>,
    /// Task metric → score (e.g. `next_line_acc`), when `eval.task_items` > 0.
    pub tasks: Vec<(String, f64)>,
    pub samples: Vec<crate::events::Sample>,
}

/// One source's part of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceLoss {
    pub source: String,
    pub loss_sum: f64,
    pub sequences: u64,
}

/// A file of a checkpoint, as its writer saw it after fsync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub name: String,
    pub size: u64,
    /// Lowercase hex sha256.
    pub sha256: String,
}

/// The protocol version of a frame that claims to be a [`ToCoordinator::Hello`], read without
/// decoding the rest (whose layout may differ between versions). `None` if it is not a Hello.
pub fn peek_hello_version(frame: &[u8]) -> Option<u32> {
    // postcard: the enum variant index, then Hello's first field, both as varints.
    let (variant, rest) = postcard::take_from_bytes::<u32>(frame).ok()?;
    if variant != 0 {
        return None;
    }
    postcard::take_from_bytes::<u32>(rest).ok().map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(version: u32) -> ToCoordinator {
        ToCoordinator::Hello(Hello {
            protocol_version: version,
            join_proof: [7; 32],
            capabilities: Capabilities {
                hostname: "h".into(),
                pid: 1,
                threads: 1,
                device: "cpu".into(),
                nccl: false,
                peer_addr: "127.0.0.1:9".parse().unwrap(),
                metrics_addr: None,
                role: Default::default(),
            },
        })
    }

    #[test]
    fn hello_version_is_readable_without_decoding_the_rest() {
        for v in [0, 1, 2, 300, u32::MAX] {
            let bytes = postcard::to_allocvec(&hello(v)).unwrap();
            assert_eq!(peek_hello_version(&bytes), Some(v));
        }
        let not_hello = postcard::to_allocvec(&ToCoordinator::Heartbeat).unwrap();
        assert_eq!(peek_hello_version(&not_hello), None);
        assert_eq!(peek_hello_version(&[]), None);
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = vec![
            hello(PROTOCOL_VERSION),
            ToCoordinator::Heartbeat,
            ToCoordinator::StepDone(StepReport {
                generation: 2,
                world_size: 2,
                step: 3,
                loss: 1.5,
                tokens: 10,
                grad_norm: 0.5,
                lr: 1e-3,
                data_seconds: 0.1,
                compute_seconds: 0.2,
                comm_seconds: 0.3,
                skipped: Some(SkipReason::NonFiniteGradient),
                locally_finite: false,
            }),
            ToCoordinator::CheckpointWritten {
                generation: 1,
                step: 4,
                files: vec![FileDigest { name: "a".into(), size: 1, sha256: "ab".into() }],
            },
            ToCoordinator::NcclUniqueId { generation: 3, id: (0..NCCL_UNIQUE_ID_BYTES as u8).collect() },
            ToCoordinator::NcclFailed { generation: 3, error: "ncclSystemError".into() },
            ToCoordinator::CheckpointEvaluated(CheckpointEval {
                step: 8,
                loss_sum: 12.5,
                sequences: 4,
                per_source: vec![SourceLoss { source: "a".into(), loss_sum: 12.5, sequences: 4 }],
                tasks: vec![("next_line_acc".into(), 0.25)],
                samples: vec![crate::events::Sample { prompt: "p".into(), text: "t".into() }],
            }),
            ToCoordinator::CheckpointEvalFailed { step: 8, error: "no data".into() },
        ];
        for m in msgs {
            let bytes = postcard::to_allocvec(&m).unwrap();
            assert_eq!(postcard::from_bytes::<ToCoordinator>(&bytes).unwrap(), m);
        }
        let to_worker = vec![
            ToWorker::NcclBootstrap { generation: 3, id: vec![0xab; NCCL_UNIQUE_ID_BYTES] },
            ToWorker::Authenticated { proof: [7; 32] },
            ToWorker::Assign(Assignment {
                rank: 1,
                world_size: 2,
                generation: 3,
                ring: Some(RingPlace { rank: 0, world_size: 2, successor: "127.0.0.1:9".parse().unwrap() }),
                nccl: Some(NcclPlace { rank: 1, world_size: 2 }),
                config_toml: String::new(),
                run_dir: "runs/x".into(),
                resume_from: None,
                start_step: 0,
            }),
            ToWorker::EvaluateCheckpoint { step: 8, checkpoint: "runs/x/checkpoints/step-000008".into(), config_toml: "[run]".into() },
        ];
        for m in to_worker {
            let bytes = postcard::to_allocvec(&m).unwrap();
            assert_eq!(postcard::from_bytes::<ToWorker>(&bytes).unwrap(), m);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, ..Default::default() })]

        /// Every message type decodes arbitrary bytes to a value or an error, never a panic
        /// (and never an allocation beyond the frame: postcard reads lengths from the input).
        #[test]
        fn arbitrary_bytes_never_panic_a_decoder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
            let _ = postcard::from_bytes::<ToCoordinator>(&bytes);
            let _ = postcard::from_bytes::<ToWorker>(&bytes);
            let _ = peek_hello_version(&bytes);
        }
    }
}
