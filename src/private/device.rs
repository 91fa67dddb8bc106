//! The device side of one private job: [`PrivateDeviceScope`] makes sure none of the job's device memory (its
//! embeddings, latents, decoded images, matmul and convolution scratch) can be handed to anyone once it ends.
//!
//! On the CPU the scope does nothing: the [`ZeroOnFree`](super::ZeroOnFree) allocator already zeroes every freed
//! host block. On CUDA (feature `cuda`, see `gpu.rs`) it works as follows.
//!
//! * `enter` synchronizes the device and makes a fresh memory pool (release threshold `u64::MAX`, so what the job
//!   frees stays in it) the device's current pool. candle allocates every tensor, intermediate and cuDNN workspace
//!   with `cuMemAllocAsync`, which takes from the current pool, so the whole job lives in that pool. cuBLAS gets a
//!   workspace of our own, allocated from the same pool, in place of its default one.
//! * `finish` synchronizes, restores the previous pool, zeroes the cuBLAS workspace and hands cuBLAS back its
//!   default one, then allocates every free byte of the job's pool (see `sweep.rs`), zeroes it, frees it, trims the
//!   pool to nothing and destroys it. The report says how many bytes were zeroed.
//!
//! Guaranteed, once `finish` returned `Ok` with `bytes_unreached == 0`: no allocation made on that device while
//! the scope was open, and freed before `finish`, still holds its content; the memory the pool gives back to the
//! driver is zeros.
//!
//! Not guaranteed (the caller's part, or out of reach):
//! * Tensors still alive at `finish` (`bytes_still_allocated`) stay as they are: wipe them with
//!   [`wipe_tensor`](super::wipe_tensor) before dropping them, or their memory goes back to the driver unwiped.
//! * Memory allocated before `enter` (model weights, caches) is not the job's and is not touched. Load the model
//!   before `enter`: weights loaded inside the scope would pin the job's pool until they are dropped.
//! * The driver's and the libraries' own state: kernel arguments, the cuBLAS/cuDNN handles' internals, the random
//!   generator's state (derived from the seed alone), L2 cache lines, registers and shared memory of finished
//!   kernels, and memory of another process.
//! * Other work on the same device at the same time. The current pool and the cuBLAS handle are shared by every
//!   thread using the device, so a job running beside the private one would allocate from the private pool (and
//!   could receive the private job's freed memory uninitialized) and race with the cuBLAS workspace swap. The scope
//!   refuses a second private scope on the same device ([`PrivateDeviceError::DeviceBusy`]), but it cannot see
//!   non-private jobs: the engine must give a private job the device to itself, for example with a per-device
//!   `RwLock` that other jobs take for reading and a private job for writing, held from `enter` to `finish`.
//! * A device without memory-pool support: `enter` fails ([`PrivateDeviceError::NoMemoryPools`]) rather than run
//!   unprotected. So does any device other than the CPU and CUDA.
//! * If `finish` fails (for instance after a device fault), the job's pool is left alive, unwiped but out of
//!   every allocator's reach; the device should be treated as lost.

use candle_core::Device;

/// What a finished scope did to the device's memory, in bytes. All zero on the CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceWipeReport {
    /// Device memory the job's pool held at the end: the job's peak footprint, its cuBLAS workspace included.
    pub pool_bytes: u64,
    /// Bytes of the pool zeroed by the sweep: all it held but the allocations still alive, plus any fresh memory
    /// the sweep took while searching.
    pub bytes_zeroed: u64,
    /// The cuBLAS workspace, zeroed before cuBLAS got its default one back.
    pub workspace_bytes_zeroed: u64,
    /// Allocations of the job still alive at `finish` (tensors the caller keeps): not wiped by the scope.
    pub bytes_still_allocated: u64,
    /// Free memory the sweep could not claim (fragments smaller than its smallest request), released unwiped.
    /// Expected 0: anything else is worth a warning.
    pub bytes_unreached: u64,
}

/// Why the device memory of a private job cannot be protected.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDeviceError {
    /// The device is neither the CPU nor a CUDA GPU this build supports.
    #[error("private jobs cannot run on {0}: only the CPU and CUDA devices can wipe a job's memory")]
    UnsupportedDevice(&'static str),
    /// The GPU has no stream-ordered memory pools, so the job's memory cannot be kept apart and swept.
    #[error("CUDA device {ordinal} has no memory-pool support, so a private job's memory cannot be wiped on it")]
    NoMemoryPools {
        /// The device's ordinal.
        ordinal: usize,
    },
    /// Another private scope is open on this device.
    #[error("a private job already holds CUDA device {ordinal}: private jobs on one device must run one at a time")]
    DeviceBusy {
        /// The device's ordinal.
        ordinal: usize,
    },
    /// A CUDA driver or cuBLAS call failed.
    #[error("CUDA failed while {step}: {message}")]
    Cuda {
        /// What the scope was doing.
        step: &'static str,
        /// The driver's or library's error.
        message: String,
    },
}

/// One private job's hold on its device. Enter it after the model is loaded and before the job's first tensor;
/// finish it once the result is out of device memory (copied to the host) and every tensor of the job is dropped
/// or wiped. Dropped without [`finish`](Self::finish), it finishes anyway and logs what went wrong.
#[must_use = "the job's device memory is wiped when the scope finishes"]
pub struct PrivateDeviceScope {
    state: Option<ScopeState>,
}

enum ScopeState {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(super::gpu::CudaPrivateScope),
}

impl PrivateDeviceScope {
    /// Starts keeping the device memory of one private job apart, on the device the job will run on.
    pub fn enter(device: &Device) -> Result<Self, PrivateDeviceError> {
        let state = match device {
            Device::Cpu => ScopeState::Cpu,
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => ScopeState::Cuda(super::gpu::CudaPrivateScope::enter(cuda)?),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(PrivateDeviceError::UnsupportedDevice("CUDA in a build without it")),
            Device::Metal(_) => return Err(PrivateDeviceError::UnsupportedDevice("Metal")),
        };
        Ok(Self { state: Some(state) })
    }

    /// Zeroes the device memory the job has freed so far and keeps the scope open (`finish` does this too). For
    /// long jobs between stages, and for checking the wipe. Returns the bytes zeroed.
    pub fn zero_free_memory(&self) -> Result<u64, PrivateDeviceError> {
        match &self.state {
            #[cfg(feature = "cuda")]
            Some(ScopeState::Cuda(scope)) => scope.zero_free_memory(),
            _ => Ok(0),
        }
    }

    /// Ends the scope: zeroes everything the job freed on the device and gives the device its previous memory
    /// setup back.
    pub fn finish(mut self) -> Result<DeviceWipeReport, PrivateDeviceError> {
        self.finish_state()
    }

    fn finish_state(&mut self) -> Result<DeviceWipeReport, PrivateDeviceError> {
        match self.state.take() {
            None | Some(ScopeState::Cpu) => Ok(DeviceWipeReport::default()),
            #[cfg(feature = "cuda")]
            Some(ScopeState::Cuda(mut scope)) => scope.finish(),
        }
    }
}

impl Drop for PrivateDeviceScope {
    fn drop(&mut self) {
        if matches!(self.state, None | Some(ScopeState::Cpu)) {
            return;
        }
        // A job that failed or was cancelled on its way out: wipe as `finish` would.
        match self.finish_state() {
            Ok(report) => tracing::debug!(
                bytes_zeroed = report.bytes_zeroed,
                bytes_unreached = report.bytes_unreached,
                "private device scope wiped on drop"
            ),
            Err(error) => tracing::error!(%error, "wiping a dropped private device scope failed"),
        }
    }
}

/// The ordinals of the devices that have a private scope open: at most one per device.
#[cfg(any(test, feature = "cuda"))]
static CLAIMED_DEVICES: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

/// A device held by one private scope; released on drop.
#[cfg(any(test, feature = "cuda"))]
#[derive(Debug)]
pub(crate) struct DeviceClaim {
    ordinal: usize,
}

#[cfg(any(test, feature = "cuda"))]
impl DeviceClaim {
    /// Claims device `ordinal`, or fails if another scope holds it.
    pub(crate) fn take(ordinal: usize) -> Result<Self, PrivateDeviceError> {
        // A poisoned lock only means a thread panicked while holding it; the list itself is always consistent.
        let mut claimed = CLAIMED_DEVICES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if claimed.contains(&ordinal) {
            return Err(PrivateDeviceError::DeviceBusy { ordinal });
        }
        claimed.push(ordinal);
        Ok(Self { ordinal })
    }
}

#[cfg(any(test, feature = "cuda"))]
impl Drop for DeviceClaim {
    fn drop(&mut self) {
        let mut claimed = CLAIMED_DEVICES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        claimed.retain(|&ordinal| ordinal != self.ordinal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_scope_reports_nothing_wiped_on_the_device() {
        let scope = PrivateDeviceScope::enter(&Device::Cpu).unwrap();
        assert_eq!(scope.zero_free_memory().unwrap(), 0);
        assert_eq!(scope.finish().unwrap(), DeviceWipeReport::default());
    }

    #[test]
    fn a_device_holds_one_claim_at_a_time() {
        // An ordinal no real machine has, so the test never meets a scope another test opened.
        let ordinal = 9_001;
        let first = DeviceClaim::take(ordinal).unwrap();
        assert!(matches!(DeviceClaim::take(ordinal), Err(PrivateDeviceError::DeviceBusy { ordinal: 9_001 })));
        let other = DeviceClaim::take(ordinal + 1).unwrap();
        drop(first);
        let again = DeviceClaim::take(ordinal).unwrap();
        assert_eq!((again.ordinal, other.ordinal), (ordinal, ordinal + 1));
    }
}
