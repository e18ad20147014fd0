//! How the trainer reaches the other ranks of its membership generation: the [`Comm`] trait
//! and every implementation of it, one file each.
//!
//! - [`alone`]: a world of one; nothing to combine.
//! - [`ring`]: the QUIC ring, through the generation's collective actor
//!   (`actors::collective`, which owns the ring's connections).
//! - [`nccl`]: NCCL on the worker's GPU: the bindings ([`nccl::NcclComm`]) and the trainer's
//!   view of them ([`nccl::NcclLink`]).
//! - [`mixed`]: NCCL inside a group of GPU workers, the ring between that group and the
//!   workers that cannot use it.
//!
//! Every operation is a [`CollectiveOp`] and goes through one entry point, [`Comm::run`] (host
//! buffers) or [`Comm::run_tensor`] (tensors, combined where they are when the backend can).
//! Failures are a [`CommError`] that says what failed and where.

pub mod alone;
pub mod mixed;
pub mod nccl;
pub mod ring;

use tch::Tensor;
use troupe_common::collective::{CollectiveError, CollectiveTag};
use troupe_common::model;

pub use alone::Alone;
pub use mixed::Mixed;
pub use nccl::{NcclComm, NcclError, NcclLink};
pub use ring::RingHandle;
pub use troupe_common::collective::CollectiveOp;

/// Why a collective of the trainer failed. Each says which collective and why; the worker
/// reports it to the coordinator, which replaces the generation.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The QUIC ring failed: a timeout (naming the phase and the peer it waited on), a peer
    /// that closed or refused, a protocol error.
    #[error(transparent)]
    Ring(#[from] CollectiveError),
    /// NCCL failed: its result code and text, a timeout, a cancelled wait, or a communicator
    /// aborted by an earlier failure.
    #[error(transparent)]
    Nccl(#[from] NcclError),
    /// The coordinator began a newer membership generation while this collective waited.
    #[error("collective {tag} abandoned: membership generation {generation} is over")]
    Cancelled { generation: u64, tag: CollectiveTag },
    /// An earlier collective of this generation's ring failed, leaving the ring in an unknown
    /// state: every later call fails with the first error until the generation is replaced.
    #[error("the ring of generation {generation} failed earlier: {first}")]
    RingBroken { generation: u64, first: String },
    /// The collective actor of this generation is gone (it stopped, or panicked).
    #[error("the ring of this generation closed {when}")]
    RingClosed { when: &'static str },
    /// Fault injection: this rank stalled in the collective until the generation ended.
    #[error("collective {tag} abandoned after a stall (fault injection)")]
    Stalled { tag: CollectiveTag },
    /// An operation no rank can run (a chunk length the world does not divide, a root that
    /// is not a rank), refused before any traffic.
    #[error("invalid collective argument: {0}")]
    InvalidArgument(String),
    /// A result that does not fit the tensor it is written back into.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// libtorch failed moving a buffer to or from where it is combined.
    #[error("libtorch, moving the buffer of a collective: {0}")]
    Torch(#[from] tch::TchError),
}

/// The collectives of this rank's generation, blocking (the trainer thread waits on them).
/// Buffers move in and out, as they travel to the collective actor and back.
pub trait Comm {
    /// Runs `op` on a host buffer (see [`CollectiveOp`] for what each computes).
    fn run(&mut self, op: CollectiveOp, data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, CommError>;

    /// Starts `op` on a host buffer and returns without waiting for it to finish, so that the
    /// caller can compute meanwhile: the ring runs it in its collective actor. Collectives
    /// started one after another run in that order, as every rank must issue them. The
    /// default runs it before returning.
    fn start(&mut self, op: CollectiveOp, data: Vec<f32>, tag: CollectiveTag) -> Pending {
        Pending::Done(self.run(op, data, tag))
    }

    /// Whether this group combines tensors where they are (NCCL on GPU memory). Then the
    /// trainer keeps gradients on the device and reduces them in buckets with
    /// [`Comm::run_tensor`]; otherwise it stages them through host memory once.
    fn works_on_device(&self) -> bool {
        false
    }

    /// Runs `op` on a contiguous float32 tensor, in place. The default goes through host
    /// memory ([`through_host`]).
    fn run_tensor(&mut self, op: CollectiveOp, t: &Tensor, tag: CollectiveTag) -> Result<(), CommError> {
        through_host(t, |values| self.run(op, values, tag))
    }
}

/// A collective begun by [`Comm::start`].
pub enum Pending {
    /// Already finished (a backend that cannot run it in the background).
    Done(Result<Vec<f32>, CommError>),
    /// Running in the ring's collective actor, which answers here.
    Ring(std::sync::mpsc::Receiver<Result<Vec<f32>, CommError>>),
}

impl Pending {
    /// The result of the collective, waiting for it if it is still running.
    pub fn wait(self) -> Result<Vec<f32>, CommError> {
        match self {
            Pending::Done(result) => result,
            Pending::Ring(answer) => answer.recv().map_err(|_| CommError::RingClosed { when: "during the collective" })?,
        }
    }
}

/// Runs the host-memory collective `op` on the values of `t` and writes its result back into
/// `t`: how a [`Comm`] combines a tensor it cannot work on where it is.
pub fn through_host(t: &Tensor, op: impl FnOnce(Vec<f32>) -> Result<Vec<f32>, CommError>) -> Result<(), CommError> {
    let result = op(model::flatten(std::slice::from_ref(t)))?;
    Ok(model::unflatten_into(std::slice::from_ref(t), &result)?)
}

/// The trainer's link in its current generation: which [`Comm`] it uses.
pub enum Link {
    /// Before the first generation, and in a world of one.
    Alone(Alone),
    Ring(RingHandle),
    Nccl(NcclLink),
    Mixed(Mixed),
}

impl Link {
    pub fn comm(&mut self) -> &mut dyn Comm {
        match self {
            Link::Alone(a) => a,
            Link::Ring(r) => r,
            Link::Nccl(n) => n,
            Link::Mixed(m) => m,
        }
    }
}
