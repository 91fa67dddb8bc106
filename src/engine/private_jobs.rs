//! The engine's part of Private Mode (the mechanisms themselves live in [`crate::private`]): a private job runs
//! inside a [`PrivateDeviceScope`] with the device to itself, its leftover tensors and the CPU matmul scratch are
//! wiped, and nothing of it enters a cache (the embedding cache is skipped in `Engine::run_on_device`) or the
//! output's metadata (`encode_output`).

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::Device;

use super::{Engine, JobControl, JobInputs, JobOutput};
use crate::diffusion::pipeline::{Generated, StepProgress};
use crate::job::{ErrorCode, JobError, JobSpec};
use crate::private::{self, PrivateDeviceScope};

/// Who may use the device: any number of ordinary jobs, or one private job alone. On a GPU the memory pool and the
/// cuBLAS workspace a private job swaps in are shared by every thread, so a job beside it could be handed its freed
/// memory. On the CPU the zero-on-free allocator covers every job, so nothing is excluded there.
pub(super) struct DeviceAccess {
    exclusive_for_private: bool,
    lock: RwLock<()>,
}

/// Held for the duration of a job.
pub(super) enum DeviceTurn<'a> {
    Shared(#[allow(dead_code)] RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'a, ()>),
    Unrestricted,
}

impl DeviceAccess {
    pub(super) fn new(device: &Device) -> Self {
        Self { exclusive_for_private: !device.is_cpu(), lock: RwLock::new(()) }
    }

    /// The turn of an ordinary job.
    pub(super) fn shared(&self) -> DeviceTurn<'_> {
        match self.exclusive_for_private {
            true => DeviceTurn::Shared(self.lock.read().unwrap_or_else(|e| e.into_inner())),
            false => DeviceTurn::Unrestricted,
        }
    }

    /// The turn of a private job: waits until ordinary jobs on the device are done.
    fn exclusive(&self) -> DeviceTurn<'_> {
        match self.exclusive_for_private {
            true => DeviceTurn::Exclusive(self.lock.write().unwrap_or_else(|e| e.into_inner())),
            false => DeviceTurn::Unrestricted,
        }
    }
}

impl Engine {
    /// Runs a private job: model loaded first (its weights are not the job's), then the job inside a device scope
    /// that zeroes all device memory the job freed; whatever happens, the matmul scratch is wiped afterwards.
    pub(super) fn run_private(
        &self,
        spec: &JobSpec,
        inputs: &JobInputs,
        control: &JobControl,
        on_step: &mut dyn FnMut(StepProgress),
    ) -> Result<JobOutput, JobError> {
        let model = self.models.get(&spec.model)?;
        let _turn = self.device_access.exclusive();
        let unprotected =
            |e: private::PrivateDeviceError| JobError::new(ErrorCode::Internal, format!("private job refused: {e}"));
        let scope = PrivateDeviceScope::enter(&model.device).map_err(unprotected)?;
        let result = self.health.observe(self.run_on_device(spec, inputs, control, on_step));
        drop(model);
        private::wipe_matmul_scratch();
        match scope.finish() {
            Ok(report) if report.bytes_unreached > 0 => {
                tracing::warn!(bytes = report.bytes_unreached, "device memory of a private job released unwiped")
            }
            Ok(report) => tracing::debug!(zeroed = report.bytes_zeroed, "private job's device memory zeroed"),
            Err(e) => {
                // The job's memory is parked out of every allocator's reach; the device must not serve again.
                let fault = format!("wiping a private job's device memory failed: {e}");
                self.health.mark_lost(fault.clone());
                return Err(JobError::new(ErrorCode::Internal, fault));
            }
        }
        result
    }
}

/// Wipes the tensors the pipeline handed back once a private job's output is encoded: freed host memory is
/// zeroed by the allocator, but device memory is not (and these may outlive the device scope's sweep).
pub(super) fn forget_private_tensors(generated: &Generated) -> Result<(), JobError> {
    let held = [&generated.images, &generated.initial_noise, &generated.final_latents];
    private::wipe_tensors(held).map_err(|e| JobError::new(ErrorCode::Internal, format!("wiping the job failed: {e}")))
}
