//! Which device a worker computes on.
//!
//! `troupe worker --device auto|cpu|cuda:N` and `troupe local --gpus all|N`. Parsing and the
//! choice are pure functions of what the user asked and how many CUDA devices libtorch sees,
//! so they are tested without a GPU; [`cuda_device_count`] is the only part that asks libtorch.
//!
//! Training on a CUDA device needs only a CUDA build of libtorch (the setup script installs one
//! where `nvidia-smi` works). NCCL, for gradients between GPU workers, additionally needs a
//! troupe built with the `cuda` feature; without it GPU workers average over the QUIC ring.

use std::fmt;
use std::str::FromStr;

use tch::Device;

/// What `--device` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// The first CUDA device when there is one, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("device {given:?}: expected auto, cpu or cuda:N (N a device index, e.g. cuda:0)")]
    Unknown { given: String },
    #[error(
        "{asked}: no CUDA device is visible to libtorch. Check that `nvidia-smi` lists one, that \
         CUDA_VISIBLE_DEVICES does not hide it, and that LIBTORCH is a CUDA build of PyTorch \
         (scripts/setup.sh installs one where nvidia-smi works); or compute on the CPU (--device cpu, or troupe local without --gpus)"
    )]
    NoCuda { asked: String },
    #[error("{asked}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{last})", last = count - 1)]
    NoSuchCuda { asked: String, count: usize },
    #[error("--gpus {given:?}: expected all or a number of GPUs of at least 1")]
    BadGpus { given: String },
}

impl FromStr for DeviceRequest {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || DeviceError::Unknown { given: s.to_string() };
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            // Plain "cuda" means the first device, as in PyTorch.
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            other => {
                let index = other.strip_prefix("cuda:").ok_or_else(unknown)?;
                index.parse().map(DeviceRequest::Cuda).map_err(|_| unknown())
            }
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Auto => f.write_str("auto"),
            DeviceRequest::Cpu => f.write_str("cpu"),
            DeviceRequest::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceRequest {
    /// The device this request means on a machine where libtorch sees `cuda_count` CUDA
    /// devices. Asking for CUDA where there is none (or not that one) is an error, never a
    /// silent fall-back to the CPU: a GPU job that quietly trains on the CPU wastes the day.
    pub fn resolve(self, cuda_count: usize) -> Result<Device, DeviceError> {
        match self {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Auto if cuda_count == 0 => Ok(Device::Cpu),
            DeviceRequest::Auto => Ok(Device::Cuda(0)),
            DeviceRequest::Cuda(_) if cuda_count == 0 => Err(DeviceError::NoCuda { asked: format!("--device {self}") }),
            DeviceRequest::Cuda(i) if i >= cuda_count => {
                Err(DeviceError::NoSuchCuda { asked: format!("--device {self}"), count: cuda_count })
            }
            DeviceRequest::Cuda(i) => Ok(Device::Cuda(i)),
        }
    }
}

/// How a device is named on the command line, in logs and in the worker's capabilities:
/// "cpu" or "cuda:N" (the form [`DeviceRequest`] parses).
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The CUDA device a capability string names ("cuda:N"), if it names one.
pub fn cuda_index(name: &str) -> Option<usize> {
    match name.parse() {
        Ok(DeviceRequest::Cuda(i)) => Some(i),
        _ => None,
    }
}

/// CUDA devices libtorch can use in this process (0 with a CPU-only libtorch or no driver).
pub fn cuda_device_count() -> usize {
    load_cuda_backend();
    // libtorch answers 0 when it finds no driver; it does not fail.
    tch::Cuda::device_count().max(0) as usize
}

/// libtorch's CUDA backend lives in `libtorch_cuda.so`, which registers itself with libtorch
/// when it is loaded. troupe's binary references none of its symbols, so the linker's
/// `--as-needed` drops it and libtorch would see no GPU: load it here, once, from the library
/// path (LIBTORCH's `lib/`). Where it cannot load (a CPU machine lacks cuBLAS and cuDNN, which
/// it needs) nothing changes and libtorch reports no CUDA device.
pub fn load_cuda_backend() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        let name = c"libtorch_cuda.so";
        // SAFETY: dlopen with a valid C string; the handle is kept for the process's life.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        !handle.is_null()
    })
}

/// What `troupe local --gpus` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuRequest {
    All,
    Count(usize),
}

impl FromStr for GpuRequest {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "all" => Ok(GpuRequest::All),
            n => match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(GpuRequest::Count(n)),
                _ => Err(DeviceError::BadGpus { given: s.to_string() }),
            },
        }
    }
}

impl GpuRequest {
    /// The device of each worker to start, one per GPU: cuda:0 to cuda:K-1.
    pub fn devices(self, cuda_count: usize) -> Result<Vec<Device>, DeviceError> {
        let asked = match self {
            GpuRequest::All => "--gpus all".to_string(),
            GpuRequest::Count(n) => format!("--gpus {n}"),
        };
        let wanted = match self {
            GpuRequest::All => cuda_count,
            GpuRequest::Count(n) => n,
        };
        if cuda_count == 0 {
            return Err(DeviceError::NoCuda { asked });
        }
        if wanted > cuda_count {
            return Err(DeviceError::NoSuchCuda { asked, count: cuda_count });
        }
        Ok((0..wanted).map(Device::Cuda).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_requests_parse_and_name_themselves() {
        for (text, want) in [
            ("auto", DeviceRequest::Auto),
            ("cpu", DeviceRequest::Cpu),
            ("CPU", DeviceRequest::Cpu),
            ("cuda", DeviceRequest::Cuda(0)),
            ("cuda:0", DeviceRequest::Cuda(0)),
            ("cuda:7", DeviceRequest::Cuda(7)),
        ] {
            assert_eq!(text.parse::<DeviceRequest>(), Ok(want), "{text}");
        }
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "cuda0", "", "mps"] {
            let err = bad.parse::<DeviceRequest>().unwrap_err().to_string();
            assert!(err.contains("expected auto, cpu or cuda:N"), "{bad}: {err}");
        }
        assert_eq!(DeviceRequest::Cuda(3).to_string(), "cuda:3");
        assert_eq!(device_name(Device::Cuda(3)), "cuda:3");
        assert_eq!(device_name(Device::Cpu), "cpu");
        assert_eq!(cuda_index("cuda:2"), Some(2));
        assert_eq!(cuda_index("cpu"), None);
    }

    #[test]
    fn auto_takes_cuda_only_where_there_is_one() {
        assert_eq!(DeviceRequest::Auto.resolve(0), Ok(Device::Cpu));
        assert_eq!(DeviceRequest::Auto.resolve(4), Ok(Device::Cuda(0)));
        assert_eq!(DeviceRequest::Cpu.resolve(4), Ok(Device::Cpu));
        assert_eq!(DeviceRequest::Cuda(3).resolve(4), Ok(Device::Cuda(3)));
    }

    #[test]
    fn asking_for_missing_cuda_is_a_clear_error_not_a_cpu_run() {
        let err = DeviceRequest::Cuda(0).resolve(0).unwrap_err().to_string();
        assert!(err.contains("--device cuda:0: no CUDA device is visible"), "{err}");
        assert!(err.contains("nvidia-smi") && err.contains("--device cpu"), "{err}");
        let err = DeviceRequest::Cuda(2).resolve(2).unwrap_err().to_string();
        assert!(err.contains("only 2 CUDA device(s) are visible (cuda:0 to cuda:1)"), "{err}");
    }

    #[test]
    fn gpus_start_one_worker_per_device() {
        assert_eq!("all".parse::<GpuRequest>(), Ok(GpuRequest::All));
        assert_eq!("2".parse::<GpuRequest>(), Ok(GpuRequest::Count(2)));
        for bad in ["0", "-1", "two", ""] {
            assert!(bad.parse::<GpuRequest>().unwrap_err().to_string().contains("expected all or a number"), "{bad}");
        }
        assert_eq!(GpuRequest::All.devices(3), Ok(vec![Device::Cuda(0), Device::Cuda(1), Device::Cuda(2)]));
        assert_eq!(GpuRequest::Count(2).devices(8), Ok(vec![Device::Cuda(0), Device::Cuda(1)]));
        let err = GpuRequest::Count(4).devices(2).unwrap_err().to_string();
        assert!(err.contains("--gpus 4: only 2 CUDA device(s)"), "{err}");
        let err = GpuRequest::All.devices(0).unwrap_err().to_string();
        assert!(err.contains("--gpus all: no CUDA device is visible"), "{err}");
    }

    #[test]
    fn libtorch_without_a_driver_reports_no_cuda_device() {
        // On the CPU machines that build and test troupe; on a GPU machine it is >= 1.
        let n = cuda_device_count();
        assert_eq!(DeviceRequest::Auto.resolve(n).unwrap() == Device::Cpu, n == 0);
    }
}
