//! NCCL collectives for GPU workers: the bindings ([`NcclComm`], in `cuda.rs` with the
//! `cuda` feature) and the trainer's [`Comm`](crate::comm::Comm) over them ([`NcclLink`]).
//!
//! The trainer thread owns one [`NcclComm`] per membership generation (in an [`NcclLink`]) and calls it with
//! gradient and parameter tensors that live on its GPU. Every operation works in place on a
//! contiguous float32 CUDA tensor and is enqueued on the legacy default stream, the stream
//! libtorch launches its kernels on, so it runs after the kernels that produced the tensor and
//! before any kernel queued later. The call then waits for the operation to finish, polling
//! (rather than blocking in the driver) so that a peer that died or hung is noticed: past the
//! communicator's timeout, or when NCCL reports an asynchronous error, this rank aborts its
//! communicator and returns an error. An aborted communicator is never used again; the next
//! membership generation builds a new one.
//!
//! Everything that touches CUDA or NCCL sits in `backend`, built only with the `cuda` feature.
//! Without it the same API exists: [`available`], [`unique_id`] and [`NcclComm::init`] return
//! [`NcclError::Unavailable`], and no [`NcclComm`] can ever be built. The argument checks and
//! the error texts are plain functions, the same in both builds.

use std::ffi::c_void;
use std::sync::OnceLock;
use std::time::Duration;

use tch::{Device, Kind, Tensor};
use troupe_common::collective::CollectiveOp;

/// Bytes of an `ncclUniqueId` (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// Why an NCCL operation failed. The texts are meant for the person running the job: what
/// failed, on which rank, NCCL's own words, and what to do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NcclError {
    /// Built without the `cuda` feature, or the CUDA driver or NCCL library cannot be loaded.
    #[error("NCCL is not available: {0}")]
    Unavailable(String),
    /// The unique id handed to [`NcclComm::init`] is not an `ncclUniqueId`.
    #[error(
        "bad NCCL unique id: got {len} bytes, expected {UNIQUE_ID_BYTES}; the id must be the \
         bytes rank 0 got from nccl::unique_id(), passed on unchanged"
    )]
    BadId { len: usize },
    /// Joining the communicator failed.
    #[error("{}", describe("init", *.rank, *.code, .message))]
    Init { rank: u32, code: u32, message: String },
    /// NCCL returned an error for an operation (enqueueing it, or asynchronously while it ran).
    #[error("{}", describe(.op, *.rank, *.code, .message))]
    Op { op: &'static str, rank: u32, code: u32, message: String },
    /// The operation (or joining) did not finish in time; the communicator was aborted.
    #[error(
        "rank {rank}: NCCL {op} did not finish within {after:?}: another rank never joined or \
         stopped taking part (it crashed, hung, or is in another membership generation). This \
         rank aborted its communicator. Check the other ranks' logs; if they are only slow, \
         raise the collective timeout"
    )]
    Timeout { op: &'static str, rank: u32, after: Duration },
    /// The worker abandoned the operation (or joining) because its membership generation
    /// ended; the communicator was aborted.
    #[error(
        "rank {rank}: NCCL {op} abandoned: the coordinator started a new membership generation \
         (a rank failed or left, or one joined); this rank aborted its communicator"
    )]
    Cancelled { op: &'static str, rank: u32 },
    /// A CUDA driver call made around an NCCL operation failed.
    #[error(
        "rank {rank}: {what} failed on CUDA device {device}: {message}; a CUDA call failed on \
         this GPU (check nvidia-smi and the kernel log; an earlier kernel may have faulted)"
    )]
    Cuda { what: &'static str, rank: u32, device: usize, message: String },
    /// A tensor or parameter NCCL cannot work with; nothing was enqueued.
    #[error("invalid NCCL argument: {0}")]
    Argument(String),
    /// The communicator was aborted by an earlier failure and cannot be used again.
    #[error(
        "rank {rank}: the NCCL communicator was aborted after an earlier failure and cannot be \
         used again (a new one is built for the next membership generation); the first \
         failure was: {first}"
    )]
    Aborted { rank: u32, first: String },
}

/// NCCL's name for a result code (`ncclResult_t`).
pub fn result_name(code: u32) -> &'static str {
    match code {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError",
        2 => "ncclSystemError",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError",
        7 => "ncclInProgress",
        // Added in NCCL 2.30.
        8 => "ncclTimeout",
        _ => "unknown NCCL result",
    }
}

/// What a user can do about a result code.
fn result_hint(code: u32) -> &'static str {
    match code {
        0 => "no error",
        1 => {
            "a CUDA call failed on this GPU (out of memory, or an earlier kernel faulted); \
              check nvidia-smi and the kernel log, run with NCCL_DEBUG=INFO for details"
        }
        2 => {
            "a system call or network socket failed (network/socket problem): check \
              NCCL_SOCKET_IFNAME names an interface that reaches the other ranks, firewalls, \
              and free space in /dev/shm; run with NCCL_DEBUG=INFO for details"
        }
        3 => {
            "NCCL hit an internal error; make sure every rank loads the same NCCL version, \
              and run with NCCL_DEBUG=INFO for details"
        }
        4 => {
            "NCCL refused an argument (pointer, count, rank or device); this is a bug in \
              troupe, please report it with the NCCL_DEBUG=WARN output"
        }
        5 => {
            "the ranks disagree on the call sequence (every rank must issue the same \
              collectives in the same order), or two ranks share one GPU; run with \
              NCCL_DEBUG=WARN for details"
        }
        6 => "a peer rank failed or was killed; check that rank's log",
        7 => "the operation was still in progress when it was abandoned",
        8 => "NCCL's own timeout fired: a peer rank stopped taking part",
        _ => {
            "the loaded libnccl returned a code troupe does not know (is it newer than \
              2.30?); run with NCCL_DEBUG=INFO for details"
        }
    }
}

/// The text of a failed NCCL call: `op` on `rank` returned `code`, with NCCL's own message
/// (`ncclGetLastError`, or `ncclGetErrorString` when that is empty) and a hint.
pub fn describe(op: &str, rank: u32, code: u32, nccl_message: &str) -> String {
    let name = result_name(code);
    let hint = result_hint(code);
    let message = nccl_message.trim();
    if message.is_empty() {
        format!("rank {rank}: NCCL {op} failed with {name} ({code}); {hint}")
    } else {
        format!("rank {rank}: NCCL {op} failed with {name} ({code}): {message}; {hint}")
    }
}

/// Checks that `t` is something an in-place NCCL `op` can work on: a defined, contiguous
/// float32 tensor whose elements split into `world` equal chunks when `chunked` (reduce-scatter
/// and all-gather), on CUDA device `device`. Returns the number of elements.
///
/// The device is checked last so that every other refusal can be tested with CPU tensors.
pub fn check_tensor(op: &str, t: &Tensor, device: usize, world: u32, chunked: bool) -> Result<usize, NcclError> {
    if !t.defined() {
        return Err(NcclError::Argument(format!("NCCL {op} was given an undefined tensor")));
    }
    // `kind()` panics on dtypes tch does not know; `f_kind` reports them.
    match t.f_kind() {
        Ok(Kind::Float) => {}
        Ok(kind) => {
            return Err(NcclError::Argument(format!(
                "NCCL {op} works on float32 tensors, got {kind:?}: convert with \
                 .to_kind(Kind::Float) first"
            )));
        }
        Err(e) => return Err(NcclError::Argument(format!("NCCL {op} works on float32 tensors, got an unsupported element type: {e}"))),
    }
    // NCCL sees a pointer and a count, so the elements must be one dense run in memory.
    if !t.is_contiguous() {
        return Err(NcclError::Argument(format!(
            "NCCL {op} needs a contiguous tensor (it works on one dense block of memory), \
             got one with size {:?} and strides {:?}: call .contiguous() first",
            t.size(),
            t.stride()
        )));
    }
    let numel = t.numel();
    if chunked {
        troupe_common::collective::check_chunked_len(op, numel, world).map_err(|e| match e {
            troupe_common::collective::CollectiveError::InvalidArgument(m) => NcclError::Argument(m),
            other => NcclError::Argument(other.to_string()),
        })?;
    }
    check_device(op, t.device(), device)?;
    Ok(numel)
}

/// Checks that a tensor found on `found` is on CUDA device `expected`, the communicator's.
pub fn check_device(op: &str, found: Device, expected: usize) -> Result<(), NcclError> {
    match found {
        Device::Cuda(n) if n == expected => Ok(()),
        Device::Cuda(n) => Err(NcclError::Argument(format!(
            "NCCL {op}: the tensor is on cuda:{n} but this communicator drives cuda:{expected}; \
             move it with .to_device(Device::Cuda({expected}))"
        ))),
        other => Err(NcclError::Argument(format!(
            "NCCL {op} needs a tensor on the GPU (cuda:{expected}), got one on {other:?}: NCCL \
             moves GPU memory only; move it with .to_device(Device::Cuda({expected})), or use \
             the CPU ring collective for CPU tensors"
        ))),
    }
}

/// Checks the rank numbering given to [`NcclComm::init`].
fn check_membership(rank: u32, world: u32) -> Result<(), NcclError> {
    // NCCL takes ranks as C ints.
    if world == 0 || world > i32::MAX as u32 {
        return Err(NcclError::Argument(format!("an NCCL communicator needs between 1 and {} ranks, got {world}", i32::MAX)));
    }
    if rank >= world {
        return Err(NcclError::Argument(format!("rank {rank} is out of range for a communicator of {world} ranks (0..{world})")));
    }
    Ok(())
}

/// Is NCCL usable in this process: built with the `cuda` feature, and the CUDA driver
/// (`libcuda.so.1`) and NCCL (`libnccl.so`) loadable with every function troupe calls? The
/// answer is computed once. Never panics.
pub fn available() -> Result<(), NcclError> {
    static PROBE: OnceLock<Result<(), NcclError>> = OnceLock::new();
    PROBE.get_or_init(backend::probe).clone()
}

/// A fresh `ncclUniqueId`, [`UNIQUE_ID_BYTES`] long. Rank 0 calls this and hands the bytes to
/// the coordinator, which gives them to every rank of the generation. (It also starts NCCL's
/// bootstrap listener in this process, which the other ranks connect to.)
pub fn unique_id() -> Result<Vec<u8>, NcclError> {
    available()?;
    backend::unique_id()
}

/// The tensor a collective works on, as the backend enqueues it: its device address, its
/// element count and how it splits into chunks (rank `r`'s chunk `r`, NCCL's in-place
/// convention for reduce-scatter and all-gather).
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Buffer {
    base: *mut c_void,
    numel: usize,
    rank: u32,
    world: u32,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Buffer {
    /// Elements of one rank's chunk.
    fn chunk(&self) -> usize {
        self.numel / self.world as usize
    }

    /// The address of this rank's chunk.
    fn own_chunk(&self) -> *mut c_void {
        chunk_ptr(self.base, self.rank, self.chunk())
    }
}

/// This rank's membership in one NCCL communicator, on one GPU.
pub struct NcclComm {
    rank: u32,
    world: u32,
    device: usize,
    /// Limit for each operation (and for joining).
    timeout: Duration,
    /// The text of the failure that aborted the communicator; once set, every call fails.
    first_failure: Option<String>,
    /// Asked while waiting on NCCL: true once the wait should be given up (the membership
    /// generation ended), which aborts the communicator at once instead of at the timeout.
    cancelled: Cancel,
    handle: backend::Handle,
}

/// Whether to give up a wait on NCCL now (see [`NcclComm::init_cancellable`]).
pub type Cancel = Box<dyn Fn() -> bool + Send>;

// The communicator is used by one thread at a time (`&mut self`), and every call binds the
// CUDA context to the calling thread first, so moving it to another thread is sound.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins the communicator of `world` ranks identified by `id` (the bytes of
    /// [`unique_id`] from rank 0) as `rank`, on CUDA device `device`.
    ///
    /// Binds the device's primary context (the one libtorch uses) to the calling thread. Gives
    /// up after `timeout` if some ranks never join, aborting the half-built communicator.
    /// `timeout` is also the limit of each later operation; note that NCCL connects peers
    /// lazily, so the first operation takes longer than the rest.
    pub fn init(id: &[u8], rank: u32, world: u32, device: usize, timeout: Duration) -> Result<NcclComm, NcclError> {
        Self::init_cancellable(id, rank, world, device, timeout, timeout, Box::new(|| false))
    }

    /// As [`NcclComm::init`], waiting up to `join_timeout` for the other ranks to join (they
    /// may still be loading a checkpoint), and every wait (joining, each operation) also ends
    /// as soon as `cancelled` returns true: the communicator is then aborted and the call
    /// returns [`NcclError::Cancelled`]. A worker passes "my membership generation is over", so
    /// that a rank blocked in a collective whose peer died is released when the coordinator
    /// re-forms the group rather than at the timeout.
    pub fn init_cancellable(
        id: &[u8],
        rank: u32,
        world: u32,
        device: usize,
        timeout: Duration,
        join_timeout: Duration,
        cancelled: Cancel,
    ) -> Result<NcclComm, NcclError> {
        let id: &[u8; UNIQUE_ID_BYTES] = id.try_into().map_err(|_| NcclError::BadId { len: id.len() })?;
        check_membership(rank, world)?;
        available()?;
        let handle = backend::init(id, rank, world, device, join_timeout, &*cancelled)?;
        Ok(NcclComm { rank, world, device, timeout, first_failure: None, cancelled, handle })
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    pub fn world_size(&self) -> u32 {
        self.world
    }

    /// Runs `op` on `t`, in place (see [`CollectiveOp`]). `t` must be a contiguous float32
    /// tensor on this communicator's device, of the same length on every rank (a multiple of
    /// the world size for the chunked ops). NCCL has no tags: every rank issues the same calls
    /// in the same order.
    pub fn run(&mut self, op: CollectiveOp, t: &Tensor) -> Result<(), NcclError> {
        if let CollectiveOp::Broadcast { root } = op {
            if root >= self.world {
                return Err(NcclError::Argument(format!("broadcast from rank {root}, but the communicator has ranks 0..{}", self.world)));
            }
        }
        let numel = self.check(op.name(), t, op.is_chunked())?;
        // Every rank passes the same length, so every rank skips alike.
        if numel == 0 {
            return Ok(());
        }
        let buffer = Buffer { base: t.data_ptr(), numel, rank: self.rank, world: self.world };
        let result = backend::run(&mut self.handle, op, self.rank, self.device, self.timeout, &*self.cancelled, buffer);
        // A failure here (unlike an argument error) leaves the communicator aborted.
        if let Err(e) = &result {
            self.first_failure = Some(e.to_string());
        }
        result
    }

    /// Refuses calls on an aborted communicator and tensors NCCL cannot take.
    fn check(&self, op: &str, t: &Tensor, chunked: bool) -> Result<usize, NcclError> {
        if let Some(first) = &self.first_failure {
            return Err(NcclError::Aborted { rank: self.rank, first: first.clone() });
        }
        check_tensor(op, t, self.device, self.world, chunked)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        backend::close(&mut self.handle);
    }
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            .field("aborted", &self.first_failure.is_some())
            .finish()
    }
}

/// The address of chunk `rank` (of `chunk` float32 elements) of the buffer at `base`.
fn chunk_ptr(base: *mut c_void, rank: u32, chunk: usize) -> *mut c_void {
    // Only pointer arithmetic; the chunk is inside the tensor because numel = world * chunk.
    base.cast::<f32>().wrapping_add(rank as usize * chunk).cast()
}

#[cfg(not(feature = "cuda"))]
mod backend {
    //! Without the `cuda` feature nothing can be loaded and no communicator can exist.

    use super::{Buffer, CollectiveOp, NcclError, UNIQUE_ID_BYTES};
    use std::time::Duration;

    const NOT_BUILT: &str = "this troupe was built without the `cuda` feature: rebuild with \
                             `cargo build --release --features cuda`";

    /// Uninhabited: an `NcclComm` cannot be built in this configuration.
    pub(super) enum Handle {}

    pub(super) fn probe() -> Result<(), NcclError> {
        Err(NcclError::Unavailable(NOT_BUILT.to_string()))
    }

    pub(super) fn unique_id() -> Result<Vec<u8>, NcclError> {
        Err(NcclError::Unavailable(NOT_BUILT.to_string()))
    }

    pub(super) fn init(
        _id: &[u8; UNIQUE_ID_BYTES],
        _rank: u32,
        _world: u32,
        _device: usize,
        _timeout: Duration,
        _cancelled: &dyn Fn() -> bool,
    ) -> Result<Handle, NcclError> {
        Err(NcclError::Unavailable(NOT_BUILT.to_string()))
    }

    pub(super) fn run(
        handle: &mut Handle,
        _op: CollectiveOp,
        _rank: u32,
        _device: usize,
        _timeout: Duration,
        _cancelled: &dyn Fn() -> bool,
        _buffer: Buffer,
    ) -> Result<(), NcclError> {
        match *handle {}
    }

    pub(super) fn close(handle: &mut Handle) {
        match *handle {}
    }
}

#[cfg(feature = "cuda")]
#[path = "cuda.rs"]
mod backend;

mod link;
pub use link::NcclLink;

#[cfg(test)]
mod tests;
