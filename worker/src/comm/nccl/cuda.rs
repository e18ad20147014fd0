//! The CUDA driver and NCCL through cudarc (loaded at run time).

use super::{Buffer, NcclError, UNIQUE_ID_BYTES};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError};
use cudarc::nccl::sys;
use std::ffi::{c_int, CStr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use troupe_common::collective::CollectiveOp;

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

pub(super) fn probe() -> Result<(), NcclError> {
    // cudarc loads a library on its first call and panics if it (or a symbol) is missing,
    // so everything it will look up is checked first; the catch is only a backstop.
    match std::panic::catch_unwind(probe_libraries) {
        Ok(result) => result,
        Err(_) => Err(NcclError::Unavailable(
            "loading the CUDA driver or NCCL library panicked (see the message above); check LD_LIBRARY_PATH".to_string(),
        )),
    }
}

/// Why NCCL cannot be used here, if it cannot (the text becomes [`NcclError::Unavailable`]).
fn probe_libraries() -> Result<(), NcclError> {
    let unavailable = |why: String| Err(NcclError::Unavailable(why));
    let search_path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    // SAFETY: loading the driver library runs its initializers, which is what any CUDA
    // program does.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return unavailable(format!(
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
            return unavailable(format!(
                "the CUDA driver library lacks {name}: the NVIDIA driver is too old for \
                 troupe, update it"
            ));
        }
    }
    // SAFETY: as for the driver library.
    if !unsafe { sys::is_culib_present() } {
        let names = cudarc::get_lib_name_candidates("nccl");
        return unavailable(format!(
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
            return unavailable(format!("the loaded NCCL library lacks {name}: troupe needs NCCL 2.14 or newer"));
        }
    }
    cudarc::driver::result::init().map_err(|e| {
        NcclError::Unavailable(format!(
            "cuInit failed: {}; is a GPU visible to this process (CUDA_VISIBLE_DEVICES, \
             container runtime)?",
            cuda_message(&e)
        ))
    })
}

pub(super) fn unique_id() -> Result<Vec<u8>, NcclError> {
    let mut id = sys::ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
    // SAFETY: `id` is a valid ncclUniqueId to write into.
    let code = unsafe { sys::ncclGetUniqueId(&mut id) };
    if code != sys::ncclResult_t::ncclSuccess {
        return Err(NcclError::Op { op: "get_unique_id", rank: 0, code: code as u32, message: nccl_message(std::ptr::null_mut(), code) });
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
    collective: CollectiveOp,
    rank: u32,
    device: usize,
    timeout: Duration,
    cancelled: &dyn Fn() -> bool,
    buffer: Buffer,
) -> Result<(), NcclError> {
    let op = collective.name();
    let cuda = |what: &'static str, e: DriverError| NcclError::Cuda { what, rank, device, message: cuda_message(&e) };
    let op_failed =
        |comm: sys::ncclComm_t, code: sys::ncclResult_t| NcclError::Op { op, rank, code: code as u32, message: nccl_message(comm, code) };
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
    let code = enqueue(h.comm, h.stream.cu_stream() as sys::cudaStream_t, collective, buffer);
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
fn enqueue(comm: sys::ncclComm_t, stream: sys::cudaStream_t, op: CollectiveOp, b: Buffer) -> sys::ncclResult_t {
    use sys::ncclDataType_t::ncclFloat32 as F32;
    use sys::ncclRedOp_t::ncclSum as SUM;
    // SAFETY: the pointers come from a contiguous float32 tensor on this communicator's
    // device, checked by `check_tensor`, and the counts stay inside it; the caller waits
    // for the operation before returning, while it still borrows the tensor.
    unsafe {
        match op {
            CollectiveOp::AllReduce => sys::ncclAllReduce(b.base, b.base, b.numel, F32, SUM, comm, stream),
            // In place: the receive buffer is this rank's chunk of the send buffer.
            CollectiveOp::ReduceScatter => sys::ncclReduceScatter(b.base, b.own_chunk(), b.chunk(), F32, SUM, comm, stream),
            // In place: the send buffer is this rank's chunk of the receive buffer.
            CollectiveOp::AllGather => sys::ncclAllGather(b.own_chunk(), b.base, b.chunk(), F32, comm, stream),
            CollectiveOp::Broadcast { root } => sys::ncclBroadcast(b.base, b.base, b.numel, F32, root as c_int, comm, stream),
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
