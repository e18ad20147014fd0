//! The trainer's collectives over an NCCL communicator ([`NcclComm`]).

use std::time::Duration;

use tch::{Device, Tensor};
use tokio::sync::watch;
use troupe_common::collective::{CollectiveOp, CollectiveTag};
use troupe_core::proto::NcclPlace;

use super::{NcclComm, NcclError};
use crate::comm::{through_host, Comm, CommError};

/// Joining an NCCL communicator may take this many collective timeouts.
const NCCL_JOIN_TIMEOUTS: u32 = 10;

/// Tensors on this worker's GPU are combined where they are; host buffers (the small sums of
/// loss and norm, state sync, and every collective of a mixed generation) are copied to the
/// GPU and back. NCCL has no tags: every rank issues the same calls in the same order, which
/// the trainer guarantees.
pub struct NcclLink {
    comm: NcclComm,
    device: Device,
}

impl NcclLink {
    /// Joins generation `generation`'s communicator. Every wait on it (joining, each
    /// collective) ends at once when `latest` moves past that generation, as the ring's
    /// collectives do: a rank blocked on a dead peer is released when the coordinator re-forms
    /// the group, not at the timeout.
    pub fn join(
        id: &[u8],
        place: NcclPlace,
        device: Device,
        timeout: Duration,
        generation: u64,
        latest: &watch::Receiver<u64>,
    ) -> Result<NcclLink, NcclError> {
        let Device::Cuda(index) = device else {
            return Err(NcclError::Argument(format!(
                "NCCL needs a CUDA device, this worker computes on {}",
                troupe_common::device::device_name(device)
            )));
        };
        let latest = latest.clone();
        let cancelled = Box::new(move || *latest.borrow() != generation);
        // Joining waits for the slowest rank to build its model (or load a checkpoint), so it
        // gets longer than one collective; a rank that died is noticed by the coordinator,
        // whose new generation cancels the wait.
        let join_timeout = timeout * NCCL_JOIN_TIMEOUTS;
        let comm = NcclComm::init_cancellable(id, place.rank, place.world_size, index, timeout, join_timeout, cancelled)?;
        Ok(NcclLink { comm, device })
    }
}

impl Comm for NcclLink {
    /// A host buffer, staged through the GPU.
    fn run(&mut self, op: CollectiveOp, mut data: Vec<f32>, _: CollectiveTag) -> Result<Vec<f32>, CommError> {
        let n = data.len();
        let on_device = Tensor::f_from_slice(&data)?.f_to_device(self.device)?;
        self.comm.run(op, &on_device)?;
        on_device.f_copy_data(&mut data, n)?;
        Ok(data)
    }

    fn works_on_device(&self) -> bool {
        true
    }

    /// A tensor that is not on this worker's GPU (none of the trainer's are) goes through a
    /// host buffer and the staged collective.
    fn run_tensor(&mut self, op: CollectiveOp, t: &Tensor, tag: CollectiveTag) -> Result<(), CommError> {
        if t.device() != self.device {
            return through_host(t, |values| self.run(op, values, tag));
        }
        Ok(self.comm.run(op, t)?)
    }
}
