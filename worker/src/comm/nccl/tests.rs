//! The argument checks and error texts, in every build; and (feature `cuda`) real
//! collectives on the GPUs present.

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

/// GPU tests: they skip (pass) without a CUDA device, unless TROUPE_REQUIRE_CUDA=1.
#[cfg(feature = "cuda")]
mod gpu {
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
        comm.run(CollectiveOp::AllReduce, &t).unwrap();
        assert_eq!(values(&t), [2.0, -4.0, 7.0, 8.0]);
        comm.run(CollectiveOp::ReduceScatter, &t).unwrap();
        assert_eq!(values(&t), [2.0, -4.0, 7.0, 8.0]);
        comm.run(CollectiveOp::AllGather, &t).unwrap();
        assert_eq!(values(&t), [2.0, -4.0, 7.0, 8.0]);
        comm.run(CollectiveOp::Broadcast { root: 0 }, &t).unwrap();
        assert_eq!(values(&t), [2.0, -4.0, 7.0, 8.0]);

        // A CPU tensor is refused, and the refusal leaves the communicator usable.
        let err = comm.run(CollectiveOp::AllReduce, &Tensor::from_slice(&data)).unwrap_err();
        assert!(err.to_string().contains("needs a tensor on the GPU"), "{err}");
        let err = comm.run(CollectiveOp::Broadcast { root: 1 }, &t).unwrap_err();
        assert!(matches!(err, NcclError::Argument(_)), "{err}");
        let big = Tensor::ones([1 << 20], (Kind::Float, Device::Cuda(0)));
        comm.run(CollectiveOp::AllReduce, &big).unwrap();
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
                    comm.run(CollectiveOp::AllReduce, &t).unwrap();
                    assert_eq!(values(&t), [3.0; 4]);
                    // reduce-scatter: rank r keeps chunk r of the sum.
                    let t = on_gpu(&[1.0, 2.0, 10.0 * (r + 1.0), 20.0], device);
                    comm.run(CollectiveOp::ReduceScatter, &t).unwrap();
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
                    comm.run(CollectiveOp::AllGather, &t).unwrap();
                    assert_eq!(values(&t), [5.0, 7.0, 6.0, 8.0]);
                    // broadcast from rank 1.
                    let t = on_gpu(&[r; 3], device);
                    comm.run(CollectiveOp::Broadcast { root: 1 }, &t).unwrap();
                    assert_eq!(values(&t), [1.0; 3]);
                })
            })
            .collect();
        for rank in ranks {
            rank.join().unwrap();
        }
    }
}
