//! bf16 mixed precision on CUDA: the forward pass (and so its backward) runs under libtorch's
//! autocast in bfloat16, while parameters, gradients, optimizer state and gradient reduction
//! stay float32. bf16 keeps float32's exponent range, so unlike fp16 it needs no loss scaling.
//!
//! tch's `autocast` switches CUDA autocast on but leaves its dtype at libtorch's default,
//! float16, and has no setter; libtorch exports `at::autocast::set_autocast_dtype`, declared
//! here by its C++ name. Both the switch and the dtype are per thread: call this on the thread
//! that runs the model (the trainer thread).

use tch::Kind;

// c10::DeviceType and c10::ScalarType are `enum class : int8_t`; their values (c10's
// DeviceType.h and ScalarType.h) are part of libtorch's ABI.
const DEVICE_TYPE_CUDA: i8 = 1;
const SCALAR_HALF: i8 = 5;
const SCALAR_FLOAT: i8 = 6;
const SCALAR_BFLOAT16: i8 = 15;

extern "C" {
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_set_autocast_dtype(device_type: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn at_get_autocast_dtype(device_type: i8) -> i8;
}

/// Runs `f` with CUDA autocast in bfloat16 when `bf16` is true; plainly otherwise. Only
/// operations on CUDA tensors are affected.
pub fn with_autocast<T>(bf16: bool, f: impl FnOnce() -> T) -> T {
    if !bf16 {
        return f();
    }
    // SAFETY: both are plain setters/getters of a thread-local in libtorch taking enum values
    // by value; BFloat16 is a valid ScalarType and CUDA a valid DeviceType.
    unsafe {
        if at_get_autocast_dtype(DEVICE_TYPE_CUDA) != SCALAR_BFLOAT16 {
            at_set_autocast_dtype(DEVICE_TYPE_CUDA, SCALAR_BFLOAT16);
        }
    }
    tch::autocast(true, f)
}

/// The dtype CUDA autocast uses on this thread (for tests and the GPU check).
pub fn cuda_autocast_kind() -> Option<Kind> {
    // SAFETY: a getter of a thread-local, see above.
    match unsafe { at_get_autocast_dtype(DEVICE_TYPE_CUDA) } {
        SCALAR_HALF => Some(Kind::Half),
        SCALAR_BFLOAT16 => Some(Kind::BFloat16),
        SCALAR_FLOAT => Some(Kind::Float),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_autocast_dtype_becomes_bfloat16_on_this_thread_only() {
        // The setter works without a GPU: it only records the dtype for later CUDA ops.
        std::thread::spawn(|| {
            assert_eq!(cuda_autocast_kind(), Some(Kind::Half), "libtorch's default");
            let x = with_autocast(true, || 2 + 2);
            assert_eq!(x, 4);
            assert_eq!(cuda_autocast_kind(), Some(Kind::BFloat16));
        })
        .join()
        .unwrap();
        std::thread::spawn(|| assert_eq!(cuda_autocast_kind(), Some(Kind::Half))).join().unwrap();
        // CPU tensors are untouched by CUDA autocast.
        let t = tch::Tensor::ones([2, 2], (Kind::Float, tch::Device::Cpu));
        let y = with_autocast(true, || t.matmul(&t));
        assert_eq!(y.kind(), Kind::Float);
    }
}
