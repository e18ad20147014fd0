//! NCCL collectives for GPU workers.
//!
//! The trainer thread owns one [`NcclComm`] per membership generation and calls it with
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
            )))
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
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(backend::probe).clone().map_err(NcclError::Unavailable)
}

/// A fresh `ncclUniqueId`, [`UNIQUE_ID_BYTES`] long. Rank 0 calls this and hands the bytes to
/// the coordinator, which gives them to every rank of the generation. (It also starts NCCL's
/// bootstrap listener in this process, which the other ranks connect to.)
pub fn unique_id() -> Result<Vec<u8>, NcclError> {
    available()?;
    backend::unique_id()
}

/// One collective as the backend enqueues it: device pointers and NCCL element counts.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum Coll {
    AllReduce { buf: *mut c_void, count: usize },
    ReduceScatter { send: *const c_void, recv: *mut c_void, recv_count: usize },
    AllGather { send: *const c_void, recv: *mut c_void, send_count: usize },
    Broadcast { buf: *mut c_void, count: usize, root: u32 },
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

    /// Sums `t` over all ranks, in place: every rank ends with the same sum. `t` must be a
    /// contiguous float32 tensor on this communicator's device, of the same length on every
    /// rank.
    pub fn all_reduce_sum(&mut self, t: &Tensor) -> Result<(), NcclError> {
        const OP: &str = "all_reduce_sum";
        let count = self.check(OP, t, false)?;
        let buf = t.data_ptr();
        self.run(OP, count, Coll::AllReduce { buf, count })
    }

    /// Sums `t` over all ranks and leaves chunk `rank` of the sum in place, at chunk `rank` of
    /// `t` (the rest of `t` is left as it was). `t.numel()` must be a multiple of the world size.
    pub fn reduce_scatter_sum(&mut self, t: &Tensor) -> Result<(), NcclError> {
        const OP: &str = "reduce_scatter_sum";
        let numel = self.check(OP, t, true)?;
        let chunk = numel / self.world as usize;
        let base = t.data_ptr();
        // NCCL's in-place reduce-scatter: the receive buffer is this rank's chunk of the send
        // buffer.
        let recv = chunk_ptr(base, self.rank, chunk);
        let coll = Coll::ReduceScatter { send: base, recv, recv_count: chunk };
        self.run(OP, numel, coll)
    }

    /// Fills every chunk `r` of `t` with rank `r`'s chunk `r`, in place.
    /// `t.numel()` must be a multiple of the world size.
    pub fn all_gather(&mut self, t: &Tensor) -> Result<(), NcclError> {
        const OP: &str = "all_gather";
        let numel = self.check(OP, t, true)?;
        let chunk = numel / self.world as usize;
        let base = t.data_ptr();
        // NCCL's in-place all-gather: the send buffer is this rank's chunk of the receive
        // buffer.
        let coll = Coll::AllGather { send: chunk_ptr(base, self.rank, chunk), recv: base, send_count: chunk };
        self.run(OP, numel, coll)
    }

    /// Copies `t` of rank `root` into `t` of every rank, in place.
    pub fn broadcast(&mut self, t: &Tensor, root: u32) -> Result<(), NcclError> {
        const OP: &str = "broadcast";
        if root >= self.world {
            return Err(NcclError::Argument(format!("broadcast from rank {root}, but the communicator has ranks 0..{}", self.world)));
        }
        let count = self.check(OP, t, false)?;
        let buf = t.data_ptr();
        self.run(OP, count, Coll::Broadcast { buf, count, root })
    }

    /// Refuses calls on an aborted communicator and tensors NCCL cannot take.
    fn check(&self, op: &str, t: &Tensor, chunked: bool) -> Result<usize, NcclError> {
        if let Some(first) = &self.first_failure {
            return Err(NcclError::Aborted { rank: self.rank, first: first.clone() });
        }
        check_tensor(op, t, self.device, self.world, chunked)
    }

    /// Runs one collective and waits for it. A failure here (unlike an argument error) leaves
    /// the communicator aborted, so it is remembered.
    fn run(&mut self, op: &'static str, numel: usize, coll: Coll) -> Result<(), NcclError> {
        // Every rank passes the same length, so every rank skips alike.
        if numel == 0 {
            return Ok(());
        }
        let result = backend::run(&mut self.handle, op, self.rank, self.device, self.timeout, &*self.cancelled, coll);
        if let Err(e) = &result {
            self.first_failure = Some(e.to_string());
        }
        result
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

    use super::{Coll, NcclError, UNIQUE_ID_BYTES};
    use std::time::Duration;

    const NOT_BUILT: &str = "this troupe was built without the `cuda` feature: rebuild with \
                             `cargo build --release --features cuda`";

    /// Uninhabited: an `NcclComm` cannot be built in this configuration.
    pub(super) enum Handle {}

    pub(super) fn probe() -> Result<(), String> {
        Err(NOT_BUILT.to_string())
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
        _op: &'static str,
        _rank: u32,
        _device: usize,
        _timeout: Duration,
        _cancelled: &dyn Fn() -> bool,
        _coll: Coll,
    ) -> Result<(), NcclError> {
        match *handle {}
    }

    pub(super) fn close(handle: &mut Handle) {
        match *handle {}
    }
}

#[cfg(feature = "cuda")]
mod backend {
    //! The CUDA driver and NCCL through cudarc (loaded at run time).

    use super::{Coll, NcclError, UNIQUE_ID_BYTES};
    use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError};
    use cudarc::nccl::sys;
    use std::ffi::{c_int, CStr};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// Driver functions cudarc calls for us (context, events, error strings).
    const DRIVER_SYMBOLS: &[&str] = &[
        "cuInit",
        "cuDeviceGet",
        "cuDeviceGetAttribute",
        "cuDevicePrimaryCtxRetain",
        "cuDevicePrimaryCtxRelease_v2",
        "cuCtxGetCurrent",
        "cuCtxSetCurrent",
        "cuEventCreate",
        "cuEventRecord",
        "cuEventQuery",
        "cuEventDestroy_v2",
        "cuGetErrorName",
        "cuGetErrorString",
    ];

    /// NCCL functions this module calls. `ncclCommInitRankConfig` and `ncclGetLastError`
    /// need NCCL 2.14 or newer.
    const NCCL_SYMBOLS: &[&str] = &[
        "ncclGetUniqueId",
        "ncclCommInitRankConfig",
        "ncclCommGetAsyncError",
        "ncclGetErrorString",
        "ncclGetLastError",
        "ncclCommAbort",
        "ncclAllReduce",
        "ncclReduceScatter",
        "ncclAllGather",
        "ncclBroadcast",
    ];

    /// `NCCL_CONFIG_UNDEF_INT`: "let NCCL choose".
    const CONFIG_UNDEF: c_int = c_int::MIN;
    /// `NCCL_VERSION(2, 30, 0)`: the header version cudarc's `ncclConfig_t` follows. NCCL
    /// reads only `min(size, its own sizeof)` bytes of the config and trusts the fields this
    /// version says exist, so older and newer libraries both accept it.
    const CONFIG_VERSION: u32 = 2 * 10_000 + 30 * 100;
    /// `NCCL_API_MAGIC`, which `NCCL_CONFIG_INITIALIZER` writes.
    const CONFIG_MAGIC: u32 = 0xcafe_beef;

    /// Polls start this short, so a fast collective is not slowed down much ...
    const FIRST_PAUSE: Duration = Duration::from_micros(50);
    /// ... and double up to this, so a long one does not burn a core.
    const MAX_PAUSE: Duration = Duration::from_millis(1);

    pub(super) struct Handle {
        /// Null once destroyed or aborted.
        comm: sys::ncclComm_t,
        /// Recorded after each collective; polled to learn when it finished.
        event: CudaEvent,
        /// The legacy default (NULL) stream of `ctx`, the one libtorch launches on.
        stream: Arc<CudaStream>,
        /// The device's primary context (shared with libtorch).
        ctx: Arc<CudaContext>,
    }

    pub(super) fn probe() -> Result<(), String> {
        // cudarc loads a library on its first call and panics if it (or a symbol) is missing,
        // so everything it will look up is checked first; the catch is only a backstop.
        match std::panic::catch_unwind(probe_libraries) {
            Ok(result) => result,
            Err(_) => Err("loading the CUDA driver or NCCL library panicked (see the message \
                           above); check LD_LIBRARY_PATH"
                .to_string()),
        }
    }

    fn probe_libraries() -> Result<(), String> {
        let search_path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
        // SAFETY: loading the driver library runs its initializers, which is what any CUDA
        // program does.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(format!(
                "the CUDA driver library libcuda.so.1 could not be loaded: this machine needs \
                 an NVIDIA GPU and driver; if the driver is installed, add the directory that \
                 holds libcuda.so.1 to LD_LIBRARY_PATH (now {search_path:?})"
            ));
        }
        // SAFETY: present, checked just above, so `culib` finds it instead of panicking.
        let driver = unsafe { cudarc::driver::sys::culib() };
        for name in DRIVER_SYMBOLS {
            // SAFETY: the symbol is only looked up, never called through this type.
            if unsafe { driver.get::<unsafe extern "C" fn()>(*name) }.is_err() {
                return Err(format!(
                    "the CUDA driver library lacks {name}: the NVIDIA driver is too old for \
                     troupe, update it"
                ));
            }
        }
        // SAFETY: as for the driver library.
        if !unsafe { sys::is_culib_present() } {
            let names = cudarc::get_lib_name_candidates("nccl");
            return Err(format!(
                "the NCCL library could not be loaded (looked for {names:?} on the library \
                 search path, LD_LIBRARY_PATH now {search_path:?}). Install NCCL 2.14 or newer \
                 and add its lib directory to LD_LIBRARY_PATH; runtime-only packages (apt \
                 libnccl2, pip nvidia-nccl-cu12) ship only libnccl.so.2, so also create a link \
                 libnccl.so -> libnccl.so.2 in that directory, or install libnccl-dev"
            ));
        }
        // SAFETY: present, checked just above.
        let nccl = unsafe { sys::culib() };
        for name in NCCL_SYMBOLS {
            // SAFETY: only looked up.
            if unsafe { nccl.get::<unsafe extern "C" fn()>(*name) }.is_err() {
                return Err(format!("the loaded NCCL library lacks {name}: troupe needs NCCL 2.14 or newer"));
            }
        }
        cudarc::driver::result::init().map_err(|e| {
            format!(
                "cuInit failed: {}; is a GPU visible to this process (CUDA_VISIBLE_DEVICES, \
                 container runtime)?",
                cuda_message(&e)
            )
        })
    }

    pub(super) fn unique_id() -> Result<Vec<u8>, NcclError> {
        let mut id = sys::ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
        // SAFETY: `id` is a valid ncclUniqueId to write into.
        let code = unsafe { sys::ncclGetUniqueId(&mut id) };
        if code != sys::ncclResult_t::ncclSuccess {
            return Err(NcclError::Op {
                op: "get_unique_id",
                rank: 0,
                code: code as u32,
                message: nccl_message(std::ptr::null_mut(), code),
            });
        }
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }

    pub(super) fn init(
        id: &[u8; UNIQUE_ID_BYTES],
        rank: u32,
        world: u32,
        device: usize,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Handle, NcclError> {
        let cuda = |what: &'static str| move |e: DriverError| NcclError::Cuda { what, rank, device, message: cuda_message(&e) };
        // Retains the device's primary context and makes it current on this thread
        // (cudarc CudaContext::new). NCCL builds the communicator on the current device, and
        // libtorch's memory lives in the primary context.
        let ctx = CudaContext::new(device).map_err(cuda("binding the primary context"))?;
        let event = ctx.new_event(None).map_err(cuda("creating a CUDA event"))?;
        let stream = ctx.default_stream();

        let mut raw_id = sys::ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
        for (dst, &src) in raw_id.internal.iter_mut().zip(id.iter()) {
            *dst = src as _;
        }
        // Non-blocking: init returns at once and joins in the background, so that ranks that
        // never arrive cannot hold this thread forever. (NCCL_COMM_BLOCKING=1 in the
        // environment overrides this; init then blocks and the timeout does not apply.)
        let mut config = nonblocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let deadline = Instant::now() + timeout;
        // SAFETY: `comm` and `config` are valid for writes and reads; ranks were checked.
        let code = unsafe { sys::ncclCommInitRankConfig(&mut comm, world as c_int, raw_id, rank as c_int, &mut config) };
        let failed = |comm: sys::ncclComm_t, code: sys::ncclResult_t| {
            let message = nccl_message(comm, code);
            abort(comm);
            NcclError::Init { rank, code: code as u32, message }
        };
        if !matches!(code, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
            return Err(failed(comm, code));
        }
        match poll(comm, None, deadline, cancelled) {
            Poll::Done => Ok(Handle { comm, event, stream, ctx }),
            Poll::Failed(code) => Err(failed(comm, code)),
            Poll::TimedOut => {
                abort(comm);
                Err(NcclError::Timeout { op: "init", rank, after: timeout })
            }
            Poll::Cuda(e) => {
                abort(comm);
                Err(cuda("waiting for init")(e))
            }
            Poll::Cancelled => {
                abort(comm);
                Err(NcclError::Cancelled { op: "init", rank })
            }
        }
    }

    pub(super) fn run(
        h: &mut Handle,
        op: &'static str,
        rank: u32,
        device: usize,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
        coll: Coll,
    ) -> Result<(), NcclError> {
        let cuda = |what: &'static str, e: DriverError| NcclError::Cuda { what, rank, device, message: cuda_message(&e) };
        let op_failed = |comm: sys::ncclComm_t, code: sys::ncclResult_t| NcclError::Op {
            op,
            rank,
            code: code as u32,
            message: nccl_message(comm, code),
        };
        // Every failure below aborts the communicator: an operation that other ranks may be
        // inside cannot be retried on it.
        let fail = |h: &mut Handle, e: NcclError| {
            abort(h.comm);
            h.comm = std::ptr::null_mut();
            Err(e)
        };
        if let Err(e) = h.ctx.bind_to_thread() {
            return fail(h, cuda("binding the primary context", e));
        }
        let deadline = Instant::now() + timeout;
        let code = enqueue(h.comm, h.stream.cu_stream() as sys::cudaStream_t, coll);
        match code {
            sys::ncclResult_t::ncclSuccess => {}
            // Non-blocking communicator: the operation is being enqueued in the background;
            // it is on the stream once the communicator's state is success again.
            sys::ncclResult_t::ncclInProgress => match poll(h.comm, None, deadline, cancelled) {
                Poll::Done => {}
                Poll::Failed(code) => {
                    let e = op_failed(h.comm, code);
                    return fail(h, e);
                }
                Poll::TimedOut => return fail(h, NcclError::Timeout { op, rank, after: timeout }),
                Poll::Cuda(e) => return fail(h, cuda("enqueueing the collective", e)),
                Poll::Cancelled => return fail(h, NcclError::Cancelled { op, rank }),
            },
            code => {
                let e = op_failed(h.comm, code);
                return fail(h, e);
            }
        }
        if let Err(e) = h.event.record(&h.stream) {
            return fail(h, cuda("recording a CUDA event after the collective", e));
        }
        match poll(h.comm, Some(&h.event), deadline, cancelled) {
            Poll::Done => Ok(()),
            Poll::Failed(code) => {
                let e = op_failed(h.comm, code);
                fail(h, e)
            }
            Poll::TimedOut => fail(h, NcclError::Timeout { op, rank, after: timeout }),
            Poll::Cuda(e) => fail(h, cuda("waiting for the collective", e)),
            Poll::Cancelled => fail(h, NcclError::Cancelled { op, rank }),
        }
    }

    /// Enqueues `coll` on `stream`.
    fn enqueue(comm: sys::ncclComm_t, stream: sys::cudaStream_t, coll: Coll) -> sys::ncclResult_t {
        use sys::ncclDataType_t::ncclFloat32 as F32;
        use sys::ncclRedOp_t::ncclSum as SUM;
        // SAFETY: the pointers come from a contiguous float32 tensor on this communicator's
        // device, checked by `check_tensor`, and the counts stay inside it; the caller waits
        // for the operation before returning, while it still borrows the tensor.
        unsafe {
            match coll {
                Coll::AllReduce { buf, count } => sys::ncclAllReduce(buf, buf, count, F32, SUM, comm, stream),
                Coll::ReduceScatter { send, recv, recv_count } => sys::ncclReduceScatter(send, recv, recv_count, F32, SUM, comm, stream),
                Coll::AllGather { send, recv, send_count } => sys::ncclAllGather(send, recv, send_count, F32, comm, stream),
                Coll::Broadcast { buf, count, root } => sys::ncclBroadcast(buf, buf, count, F32, root as c_int, comm, stream),
            }
        }
    }

    enum Poll {
        Done,
        Failed(sys::ncclResult_t),
        TimedOut,
        Cuda(DriverError),
        Cancelled,
    }

    /// Waits until the communicator's state is success and, if given, `event` has completed;
    /// gives up on an NCCL error, a CUDA error, at `deadline`, or once `cancelled()`.
    fn poll(comm: sys::ncclComm_t, event: Option<&CudaEvent>, deadline: Instant, cancelled: &dyn Fn() -> bool) -> Poll {
        let mut pause = FIRST_PAUSE;
        loop {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is a live communicator; `state` is valid for writes.
            let code = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
            if code != sys::ncclResult_t::ncclSuccess {
                return Poll::Failed(code);
            }
            match state {
                sys::ncclResult_t::ncclSuccess => {
                    // cuEventQuery: Ok(false) while the work before the event is running.
                    match event.map_or(Ok(true), |e| e.try_is_complete()) {
                        Ok(true) => return Poll::Done,
                        Ok(false) => {}
                        Err(e) => return Poll::Cuda(e),
                    }
                }
                sys::ncclResult_t::ncclInProgress => {}
                failed => return Poll::Failed(failed),
            }
            if Instant::now() >= deadline {
                return Poll::TimedOut;
            }
            if cancelled() {
                return Poll::Cancelled;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    pub(super) fn close(h: &mut Handle) {
        if h.comm.is_null() {
            return;
        }
        let comm = std::mem::replace(&mut h.comm, std::ptr::null_mut());
        // NCCL calls act on the current context; a failure here only means the
        // teardown below fails too, which is all Drop could report anyway.
        let _ = h.ctx.bind_to_thread();
        // Always abort, never finalize: a communicator is dropped when membership changes,
        // usually because a peer died, and finalizing then waits on that peer (in recent NCCL
        // versions the teardown synchronises the ranks). Every operation was waited for, so
        // nothing is in flight, and abort is local: it frees this rank's resources at once.
        abort(comm);
    }

    /// Aborts `comm` (if any): stops its kernels and frees it. It must not be used after.
    fn abort(comm: sys::ncclComm_t) {
        if !comm.is_null() {
            // SAFETY: `comm` came from ncclCommInitRankConfig and has not been freed.
            // Nothing more can be done if abort itself fails.
            unsafe { sys::ncclCommAbort(comm) };
        }
    }

    /// NCCL's explanation of the last failure: `ncclGetLastError`, which is specific, or the
    /// generic `ncclGetErrorString` of `code` when there is none.
    fn nccl_message(comm: sys::ncclComm_t, code: sys::ncclResult_t) -> String {
        // SAFETY: both return NUL-terminated static or thread-local strings (or NULL).
        unsafe {
            let last = c_string(sys::ncclGetLastError(comm));
            if !last.trim().is_empty() {
                return last;
            }
            c_string(sys::ncclGetErrorString(code))
        }
    }

    /// # Safety
    /// `p` is NULL or a NUL-terminated string.
    unsafe fn c_string(p: *const std::ffi::c_char) -> String {
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }

    /// "CUDA_ERROR_X: description" for a driver error.
    fn cuda_message(e: &DriverError) -> String {
        let name = e.error_name().map(|s| s.to_string_lossy().into_owned());
        let text = e.error_string().map(|s| s.to_string_lossy().into_owned());
        match (name, text) {
            (Ok(name), Ok(text)) => format!("{name}: {text}"),
            _ => format!("CUDA error {:?}", e.0),
        }
    }

    /// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`.
    fn nonblocking_config() -> sys::ncclConfig_t {
        sys::ncclConfig_t {
            size: std::mem::size_of::<sys::ncclConfig_t>(),
            magic: CONFIG_MAGIC,
            version: CONFIG_VERSION,
            blocking: 0,
            cgaClusterSize: CONFIG_UNDEF,
            minCTAs: CONFIG_UNDEF,
            maxCTAs: CONFIG_UNDEF,
            netName: std::ptr::null(),
            splitShare: CONFIG_UNDEF,
            trafficClass: CONFIG_UNDEF,
            commName: std::ptr::null(),
            collnetEnable: CONFIG_UNDEF,
            CTAPolicy: CONFIG_UNDEF,
            shrinkShare: CONFIG_UNDEF,
            nvlsCTAs: CONFIG_UNDEF,
            nChannelsPerNetPeer: CONFIG_UNDEF,
            nvlinkCentricSched: CONFIG_UNDEF,
            graphUsageMode: CONFIG_UNDEF,
            numRmaCtx: CONFIG_UNDEF,
            maxP2pPeers: CONFIG_UNDEF,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(values: &[f32]) -> Tensor {
        Tensor::from_slice(values)
    }

    #[test]
    fn every_result_code_has_its_nccl_name() {
        let names = [
            (0, "ncclSuccess"),
            (1, "ncclUnhandledCudaError"),
            (2, "ncclSystemError"),
            (3, "ncclInternalError"),
            (4, "ncclInvalidArgument"),
            (5, "ncclInvalidUsage"),
            (6, "ncclRemoteError"),
            (7, "ncclInProgress"),
            (8, "ncclTimeout"),
        ];
        for (code, name) in names {
            assert_eq!(result_name(code), name);
        }
        assert_eq!(result_name(99), "unknown NCCL result");
    }

    #[test]
    fn describe_names_rank_op_code_message_and_hint() {
        let text = describe("all_reduce_sum", 3, 6, "remote process exited\n");
        assert!(text.starts_with("rank 3: NCCL all_reduce_sum failed"), "{text}");
        assert!(text.contains("ncclRemoteError (6): remote process exited;"), "{text}");
        assert!(text.contains("a peer rank failed or was killed"), "{text}");

        let text = describe("init", 0, 2, "");
        assert!(text.contains("ncclSystemError (2); "), "{text}");
        assert!(text.contains("NCCL_SOCKET_IFNAME"), "{text}");
        assert!(describe("x", 0, 1, "").contains("a CUDA call failed on this GPU"));
        assert!(describe("x", 0, 42, "").contains("unknown NCCL result"));

        let e = NcclError::Op { op: "broadcast", rank: 1, code: 5, message: "bad order".into() };
        assert_eq!(e.to_string(), describe("broadcast", 1, 5, "bad order"));
        let e = NcclError::Init { rank: 2, code: 3, message: String::new() };
        assert_eq!(e.to_string(), describe("init", 2, 3, ""));
        let e = NcclError::Cancelled { op: "all_gather", rank: 4 };
        assert!(e.to_string().starts_with("rank 4: NCCL all_gather abandoned: the coordinator started a new membership generation"), "{e}");
    }

    #[test]
    fn cpu_tensors_are_refused_with_a_clear_message() {
        let err = check_tensor("all_reduce_sum", &cpu(&[1.0, 2.0]), 0, 1, false).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, NcclError::Argument(_)));
        assert!(text.contains("needs a tensor on the GPU (cuda:0)"), "{text}");
        assert!(text.contains("Cpu"), "{text}");
    }

    #[test]
    fn tensors_on_another_gpu_are_refused() {
        assert!(check_device("all_gather", Device::Cuda(1), 1).is_ok());
        let text = check_device("all_gather", Device::Cuda(2), 0).unwrap_err().to_string();
        assert!(text.contains("on cuda:2 but this communicator drives cuda:0"), "{text}");
    }

    #[test]
    fn only_contiguous_float32_tensors_are_taken() {
        let ints = Tensor::from_slice(&[1i64, 2, 3]);
        let text = check_tensor("broadcast", &ints, 0, 1, false).unwrap_err().to_string();
        assert!(text.contains("float32") && text.contains("Int64"), "{text}");

        let doubles = Tensor::from_slice(&[1f64, 2.0]);
        assert!(check_tensor("broadcast", &doubles, 0, 1, false).is_err());

        let strided = cpu(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape([2, 3]).tr();
        let text = check_tensor("all_reduce_sum", &strided, 0, 1, false).unwrap_err().to_string();
        assert!(text.contains("contiguous"), "{text}");

        let text = check_tensor("all_reduce_sum", &Tensor::new(), 0, 1, false).unwrap_err().to_string();
        assert!(text.contains("undefined"), "{text}");
    }

    #[test]
    fn chunked_ops_refuse_lengths_the_world_does_not_divide() {
        let t = cpu(&[0.0; 10]);
        let text = check_tensor("reduce_scatter_sum", &t, 0, 3, true).unwrap_err().to_string();
        assert!(text.contains("multiple of the world size"), "{text}");
        assert!(text.contains("10 elements over 3 ranks"), "{text}");
        // Divisible lengths pass the length check and stop at the device check.
        let text = check_tensor("all_gather", &t, 0, 5, true).unwrap_err().to_string();
        assert!(text.contains("on the GPU"), "{text}");
        // All-reduce does not split the tensor.
        let text = check_tensor("all_reduce_sum", &t, 0, 3, false).unwrap_err().to_string();
        assert!(text.contains("on the GPU"), "{text}");
    }

    #[test]
    fn init_refuses_bad_ids_and_ranks_before_touching_nccl() {
        let err = NcclComm::init(&[0u8; 5], 0, 1, 0, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, NcclError::BadId { len: 5 }), "{err}");
        assert!(err.to_string().contains("expected 128"), "{err}");

        let id = [0u8; UNIQUE_ID_BYTES];
        let err = NcclComm::init(&id, 2, 2, 0, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("rank 2 is out of range"), "{err}");
        let err = NcclComm::init(&id, 0, 0, 0, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, NcclError::Argument(_)), "{err}");
    }

    #[test]
    fn chunk_pointers_step_by_whole_chunks_of_f32() {
        let base = 0x1000 as *mut c_void;
        assert_eq!(chunk_ptr(base, 0, 8) as usize, 0x1000);
        assert_eq!(chunk_ptr(base, 3, 8) as usize, 0x1000 + 3 * 8 * 4);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_cuda_feature_nccl_is_unavailable() {
        let rebuild = "rebuild with `cargo build --release --features cuda`";
        let err = available().unwrap_err();
        assert!(matches!(err, NcclError::Unavailable(_)));
        assert!(err.to_string().contains(rebuild), "{err}");
        assert!(unique_id().unwrap_err().to_string().contains(rebuild));
        let id = [0u8; UNIQUE_ID_BYTES];
        let err = NcclComm::init(&id, 0, 1, 0, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains(rebuild), "{err}");
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn probing_never_panics() {
        // Here (no GPU) this reports the missing library; on a GPU machine it passes.
        match available() {
            Ok(()) => {}
            Err(e) => {
                println!("{e}");
                assert!(matches!(e, NcclError::Unavailable(_)));
                assert!(e.to_string().len() > 40, "{e}");
                // The same answer again, from the cache, and from every entry point.
                assert_eq!(available().unwrap_err().to_string(), e.to_string());
                assert!(unique_id().is_err());
                let id = [0u8; UNIQUE_ID_BYTES];
                assert!(NcclComm::init(&id, 0, 1, 0, Duration::from_secs(1)).is_err());
            }
        }
    }
}

/// GPU tests: they skip (pass) without a CUDA device, unless TROUPE_REQUIRE_CUDA=1.
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::*;
    use std::time::Instant;

    /// True when a CUDA device is present; panics if none is but one is required.
    fn have_cuda(devices: i64) -> bool {
        let found = troupe_common::device::cuda_device_count() as i64;
        if found >= devices {
            return true;
        }
        if std::env::var("TROUPE_REQUIRE_CUDA").as_deref() == Ok("1") {
            panic!("TROUPE_REQUIRE_CUDA=1 but libtorch sees {found} CUDA devices, need {devices}");
        }
        println!("skipped: no CUDA device");
        false
    }

    fn on_gpu(values: &[f32], device: usize) -> Tensor {
        Tensor::from_slice(values).to_device(Device::Cuda(device))
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.to_device(Device::Cpu)).unwrap()
    }

    #[test]
    fn world_of_one_runs_every_collective() {
        if !have_cuda(1) {
            return;
        }
        available().unwrap();
        let id = unique_id().unwrap();
        assert_eq!(id.len(), UNIQUE_ID_BYTES);
        let mut comm = NcclComm::init(&id, 0, 1, 0, Duration::from_secs(60)).unwrap();
        assert_eq!((comm.rank(), comm.world_size()), (0, 1));

        let data = [1.0, -2.0, 3.5, 4.0];
        // Computed by libtorch on the default stream just before, so ordering is exercised.
        let t = on_gpu(&data, 0) * 2.0;
        comm.all_reduce_sum(&t).unwrap();
        assert_eq!(values(&t), [2.0, -4.0, 7.0, 8.0]);
        comm.reduce_scatter_sum(&t).unwrap();
        assert_eq!(values(&t), [2.0, -4.0, 7.0, 8.0]);
        comm.all_gather(&t).unwrap();
        assert_eq!(values(&t), [2.0, -4.0, 7.0, 8.0]);
        comm.broadcast(&t, 0).unwrap();
        assert_eq!(values(&t), [2.0, -4.0, 7.0, 8.0]);

        // A CPU tensor is refused, and the refusal leaves the communicator usable.
        let err = comm.all_reduce_sum(&Tensor::from_slice(&data)).unwrap_err();
        assert!(err.to_string().contains("needs a tensor on the GPU"), "{err}");
        let err = comm.broadcast(&t, 1).unwrap_err();
        assert!(matches!(err, NcclError::Argument(_)), "{err}");
        let big = Tensor::ones([1 << 20], (Kind::Float, Device::Cuda(0)));
        comm.all_reduce_sum(&big).unwrap();
        assert_eq!(big.sum(Kind::Float).double_value(&[]), (1 << 20) as f64);
    }

    #[test]
    fn init_times_out_when_a_rank_never_joins() {
        if !have_cuda(1) {
            return;
        }
        let id = unique_id().unwrap();
        let timeout = Duration::from_secs(2);
        let start = Instant::now();
        let err = NcclComm::init(&id, 0, 2, 0, timeout).unwrap_err();
        let took = start.elapsed();
        println!("init with a missing rank: {err} (after {took:?})");
        assert!(matches!(err, NcclError::Timeout { op: "init", rank: 0, .. }), "{err}");
        assert!(err.to_string().contains("did not finish within 2s"), "{err}");
        // The timeout plus the abort, which must not wait for the missing rank.
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }

    /// Two ranks on two GPUs of this machine (NCCL refuses two ranks on one GPU).
    #[test]
    fn two_ranks_sum_scatter_gather_and_broadcast() {
        if troupe_common::device::cuda_device_count() < 2 {
            println!("skipped: fewer than 2 CUDA devices");
            return;
        }
        let id = unique_id().unwrap();
        let ranks: Vec<_> = (0..2u32)
            .map(|rank| {
                let id = id.clone();
                std::thread::spawn(move || {
                    let device = rank as usize;
                    let mut comm = NcclComm::init(&id, rank, 2, device, Duration::from_secs(60)).unwrap();
                    let r = rank as f32;
                    // all-reduce: [r+1; 4] summed = [3; 4]
                    let t = on_gpu(&[r + 1.0; 4], device);
                    comm.all_reduce_sum(&t).unwrap();
                    assert_eq!(values(&t), [3.0; 4]);
                    // reduce-scatter: rank r keeps chunk r of the sum.
                    let t = on_gpu(&[1.0, 2.0, 10.0 * (r + 1.0), 20.0], device);
                    comm.reduce_scatter_sum(&t).unwrap();
                    let got = values(&t);
                    if rank == 0 {
                        assert_eq!(got[..2], [2.0, 4.0]);
                    } else {
                        assert_eq!(got[2..], [30.0, 40.0]);
                    }
                    // all-gather: chunk r comes from rank r.
                    let mut mine = [0.0; 4];
                    mine[2 * rank as usize] = r + 5.0;
                    mine[2 * rank as usize + 1] = r + 7.0;
                    let t = on_gpu(&mine, device);
                    comm.all_gather(&t).unwrap();
                    assert_eq!(values(&t), [5.0, 7.0, 6.0, 8.0]);
                    // broadcast from rank 1.
                    let t = on_gpu(&[r; 3], device);
                    comm.broadcast(&t, 1).unwrap();
                    assert_eq!(values(&t), [1.0; 3]);
                })
            })
            .collect();
        for rank in ranks {
            rank.join().unwrap();
        }
    }
}
