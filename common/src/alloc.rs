//! Allocator settings for the process, applied once at start.
//!
//! A ring all-reduce allocates and frees send pieces (256 KiB) and QUIC packet buffers at a
//! high rate. glibc's defaults serve allocations from 128 KiB up with fresh `mmap`s and give
//! freed memory back to the kernel, so the same memory is faulted in and zeroed again by the
//! kernel over and over: measured at ~10% of an all-reduce's CPU time on 2 cores, and 10–20%
//! more bus bandwidth once it stops (`cargo bench --bench allreduce`). Raising the mmap and
//! trim thresholds keeps freed memory in the process for reuse (what PyTorch's CPU tuning
//! guide gets from jemalloc or tcmalloc), at the cost of a resident size that does not shrink
//! after a peak.

/// Allocations below this come from the heap (and are reused) instead of a fresh mmap. 32 MiB
/// is the largest value every 64-bit glibc accepts (older ones refuse more than half their
/// 64 MiB heap size).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of the heap is returned to the kernel only beyond this.
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Applies the settings above, unless the user chose their own through glibc's environment
/// (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `GLIBC_TUNABLES`), which then stands.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set =
            ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"].iter().any(|var| std::env::var_os(var).is_some());
        if user_set {
            return;
        }
        // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
        // The trim threshold is set only if the mmap threshold was accepted: setting either one
        // turns off glibc's adaptive mmap threshold, which alone would be worse than nothing.
        unsafe {
            if libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 {
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            }
        }
    }
}
