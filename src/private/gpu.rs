//! The CUDA side of Private Mode (feature `cuda`): zeroing a tensor's whole device allocation, and the memory-pool
//! scope behind [`PrivateDeviceScope`](super::PrivateDeviceScope), whose module doc says what it guarantees.
//!
//! candle 0.11 allocates through cudarc's stream-ordered allocator (`cuMemAllocAsync`, the device's current pool),
//! and a dropped tensor goes back to that pool unwiped. Every driver and cuBLAS symbol used here is in cudarc
//! 0.19's bindings, reached through candle's re-export so no second cudarc is built.

use std::ffi::{c_int, c_void};
use std::fmt::Display;
use std::mem::{align_of, size_of};
use std::sync::Arc;

use candle_core::cuda::cudarc::cublas::{sys as cublas_sys, CudaBlas};
use candle_core::cuda::cudarc::driver::{result as driver, sys, CudaContext, CudaStream, DriverError};
use candle_core::cuda::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::CudaStorage;

use super::device::{DeviceClaim, DeviceWipeReport, PrivateDeviceError};
use super::sweep::{claim_free_memory, PoolUsage, SweepTarget};

/// The workspace handed to cuBLAS for the job: the size cuBLAS recommends on Hopper, ample on older GPUs.
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Zeroes the whole device allocation behind `storage` (every element, not only a view's), in stream order.
pub(crate) fn wipe_cuda_storage(storage: &mut CudaStorage) -> candle_core::Result<()> {
    let stream = storage.device.cuda_stream();
    match &mut storage.slice {
        CudaStorageSlice::U8(slice)
        | CudaStorageSlice::F6E2M3(slice)
        | CudaStorageSlice::F6E3M2(slice)
        | CudaStorageSlice::F4(slice)
        | CudaStorageSlice::F8E8M0(slice) => stream.memset_zeros(slice),
        CudaStorageSlice::U32(slice) => stream.memset_zeros(slice),
        CudaStorageSlice::I16(slice) => stream.memset_zeros(slice),
        CudaStorageSlice::I32(slice) => stream.memset_zeros(slice),
        CudaStorageSlice::I64(slice) => stream.memset_zeros(slice),
        CudaStorageSlice::BF16(slice) => stream.memset_zeros(slice),
        CudaStorageSlice::F16(slice) => stream.memset_zeros(slice),
        CudaStorageSlice::F32(slice) => stream.memset_zeros(slice),
        CudaStorageSlice::F64(slice) => stream.memset_zeros(slice),
        CudaStorageSlice::F8E4M3(slice) => stream.memset_zeros(slice),
    }
    .w()
}

/// Bytes the device's current memory pool holds from the driver (for sizing residue checks).
pub fn device_pool_reserved_bytes(device: &CudaDevice) -> Result<u64, PrivateDeviceError> {
    let context = device.cuda_stream().context().clone();
    context.bind_to_thread().map_err(failed("binding the device's context"))?;
    // SAFETY: the device handle comes from a live context.
    let pool = unsafe { driver::device::get_mem_pool(context.cu_device()) }
        .map_err(failed("looking up the device's memory pool"))?;
    Ok(pool_usage(pool)?.reserved)
}

/// The error of a failed driver or cuBLAS call made while doing `step`.
fn failed<E: Display>(step: &'static str) -> impl FnOnce(E) -> PrivateDeviceError {
    move |error| PrivateDeviceError::Cuda { step, message: error.to_string() }
}

/// A memory pool handle. Driver handles are process-wide and valid on any thread (each use here binds the
/// device's context first), so the scope may move between threads.
struct PoolHandle(sys::CUmemoryPool);

// SAFETY: see the type's doc; the handle is never used concurrently (the scope is not `Sync`).
unsafe impl Send for PoolHandle {}

/// The CUDA state of one open private scope.
pub(crate) struct CudaPrivateScope {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: Arc<CudaBlas>,
    pool: PoolHandle,
    previous_pool: PoolHandle,
    workspace: Option<sys::CUdeviceptr>,
    _claim: DeviceClaim,
}

impl CudaPrivateScope {
    /// Makes a fresh pool the device's current one and gives cuBLAS a workspace from it.
    pub(crate) fn enter(device: &CudaDevice) -> Result<Self, PrivateDeviceError> {
        let stream = device.cuda_stream();
        let context = stream.context().clone();
        let ordinal = context.ordinal();
        if !context.has_async_alloc() {
            return Err(PrivateDeviceError::NoMemoryPools { ordinal });
        }
        let claim = DeviceClaim::take(ordinal)?;
        // Earlier work and frees complete first, so nothing allocated before lands in the job's pool.
        context.synchronize().map_err(failed("waiting for earlier work on the device"))?;
        // SAFETY: the device handle comes from a live context.
        let previous_pool = unsafe { driver::device::get_mem_pool(context.cu_device()) }
            .map_err(failed("looking up the device's memory pool"))?;
        let pool = create_private_pool(context.cu_device())?;
        let mut scope = Self {
            context,
            stream,
            blas: device.cublas_handle(),
            pool: PoolHandle(pool),
            previous_pool: PoolHandle(previous_pool),
            workspace: None,
            _claim: claim,
        };
        if let Err(error) = scope.install() {
            scope.undo_failed_enter();
            return Err(error);
        }
        Ok(scope)
    }

    fn install(&mut self) -> Result<(), PrivateDeviceError> {
        // SAFETY: the device handle is live and the pool was made for it.
        unsafe { driver::device::set_mem_pool(self.context.cu_device(), self.pool.0) }
            .map_err(failed("making the job's memory pool current"))?;
        // SAFETY: pool and stream are live; cuBLAS writes its workspace before reading it.
        let workspace =
            unsafe { driver::mem_pool::alloc_async(self.pool.0, CUBLAS_WORKSPACE_BYTES, self.stream.cu_stream()) }
                .map_err(failed("allocating the cuBLAS workspace"))?;
        self.workspace = Some(workspace);
        // SAFETY: the handle is candle's live cuBLAS handle, bound to `self.stream`, on which the workspace was
        // allocated; pool allocations are aligned well beyond the 256 bytes cuBLAS needs.
        unsafe {
            cublas_sys::cublasSetWorkspace_v2(*self.blas.handle(), workspace as *mut c_void, CUBLAS_WORKSPACE_BYTES)
        }
        .result()
        .map_err(failed("giving cuBLAS the job's workspace"))?;
        // The workspace was allocated in stream order; the job may run on another thread's stream.
        self.synchronize()
    }

    /// Puts the device back as it was after a failed `enter`; nothing of the job has run, so nothing is wiped.
    /// Errors are dropped: the one that made `enter` fail is the one reported.
    fn undo_failed_enter(&mut self) {
        let _ = self.restore_previous_pool();
        if let Some(workspace) = self.workspace.take() {
            if reset_cublas_workspace(&self.blas).is_ok() {
                // SAFETY: allocated on this stream from the job's pool and no longer known to cuBLAS.
                let _ = unsafe { driver::free_async(workspace, self.stream.cu_stream()) };
            }
        }
        let _ = self.context.synchronize();
        // SAFETY: the pool is no longer current; destroying it with allocations outstanding defers the release.
        let _ = unsafe { driver::mem_pool::destroy(self.pool.0) };
    }

    /// Zeroes what the job freed so far, keeping the scope open. Returns the bytes zeroed.
    pub(crate) fn zero_free_memory(&self) -> Result<u64, PrivateDeviceError> {
        self.synchronize()?;
        Ok(self.sweep()?.bytes_zeroed)
    }

    /// Wipes and dismantles the job's pool; see the module doc of `device.rs` for the order and its reasons.
    pub(crate) fn finish(&mut self) -> Result<DeviceWipeReport, PrivateDeviceError> {
        self.synchronize()?;
        self.restore_previous_pool()?;
        let workspace_bytes_zeroed = self.release_workspace()?;
        self.synchronize()?;
        let sweep = self.sweep()?;
        // SAFETY: the pool is no longer current and its free memory is zeros; allocations the caller still holds
        // keep their memory until freed (the driver defers the release).
        unsafe { driver::mem_pool::trim_to(self.pool.0, 0) }.map_err(failed("trimming the job's memory pool"))?;
        // SAFETY: as above; the pool is not used after this.
        unsafe { driver::mem_pool::destroy(self.pool.0) }.map_err(failed("destroying the job's memory pool"))?;
        let report = DeviceWipeReport {
            pool_bytes: sweep.before.reserved,
            bytes_zeroed: sweep.bytes_zeroed,
            workspace_bytes_zeroed,
            bytes_still_allocated: sweep.before.used,
            bytes_unreached: sweep.unreached,
        };
        tracing::debug!(
            pool_bytes = report.pool_bytes,
            bytes_zeroed = report.bytes_zeroed,
            workspace_bytes_zeroed = report.workspace_bytes_zeroed,
            bytes_still_allocated = report.bytes_still_allocated,
            bytes_unreached = report.bytes_unreached,
            "private device scope finished"
        );
        Ok(report)
    }

    /// Waits for every stream of the device's context: all the job's kernels and frees are complete after it.
    fn synchronize(&self) -> Result<(), PrivateDeviceError> {
        self.context.synchronize().map_err(failed("waiting for the job's work on the device"))
    }

    fn restore_previous_pool(&self) -> Result<(), PrivateDeviceError> {
        // SAFETY: the previous pool was the device's current one at `enter`; this crate destroys only its own.
        unsafe { driver::device::set_mem_pool(self.context.cu_device(), self.previous_pool.0) }
            .map_err(failed("restoring the device's memory pool"))
    }

    /// Zeroes the cuBLAS workspace after handing cuBLAS its default one back, then frees it into the job's pool.
    fn release_workspace(&mut self) -> Result<u64, PrivateDeviceError> {
        let Some(workspace) = self.workspace else {
            return Ok(0);
        };
        reset_cublas_workspace(&self.blas)?;
        let stream = self.stream.cu_stream();
        // SAFETY: the workspace is CUBLAS_WORKSPACE_BYTES of live device memory that cuBLAS no longer uses.
        unsafe { driver::memset_d8_async(workspace, 0, CUBLAS_WORKSPACE_BYTES, stream) }
            .map_err(failed("zeroing the cuBLAS workspace"))?;
        // SAFETY: allocated on this stream, freed once, after the memset in stream order.
        unsafe { driver::free_async(workspace, stream) }.map_err(failed("freeing the cuBLAS workspace"))?;
        self.workspace = None;
        Ok(CUBLAS_WORKSPACE_BYTES as u64)
    }

    /// Claims, zeroes and frees every free byte of the job's pool. The device must be synchronized before.
    fn sweep(&self) -> Result<SweepOutcome, PrivateDeviceError> {
        let stream = self.stream.cu_stream();
        let mut target = PoolSweep { pool: self.pool.0, stream };
        let before = target.usage()?;
        let mut blocks = Vec::new();
        let claimed = claim_free_memory(&mut target, &mut blocks);
        // Whatever was claimed is zeroed and freed, even if the search stopped on an error.
        let zeroed = zero_and_free(&blocks, stream);
        let unreached = claimed?;
        let bytes_zeroed = zeroed?;
        self.synchronize()?;
        Ok(SweepOutcome { before, bytes_zeroed, unreached })
    }
}

/// What one sweep of the job's pool found and did.
struct SweepOutcome {
    before: PoolUsage,
    bytes_zeroed: u64,
    unreached: u64,
}

/// The job's pool as the sweep sees it.
struct PoolSweep {
    pool: sys::CUmemoryPool,
    stream: sys::CUstream,
}

impl SweepTarget for PoolSweep {
    type Block = sys::CUdeviceptr;
    type Error = PrivateDeviceError;

    fn usage(&self) -> Result<PoolUsage, PrivateDeviceError> {
        pool_usage(self.pool)
    }

    fn allocate(&mut self, bytes: u64) -> Result<Option<sys::CUdeviceptr>, PrivateDeviceError> {
        let bytes = usize::try_from(bytes).map_err(failed("sizing a sweep allocation"))?;
        // SAFETY: pool and stream are live; the memory is only zeroed and freed.
        match unsafe { driver::mem_pool::alloc_async(self.pool, bytes, self.stream) } {
            Ok(pointer) => Ok(Some(pointer)),
            Err(DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => Ok(None),
            Err(error) => Err(failed("claiming the job's free memory")(error)),
        }
    }
}

/// Zeroes every block, then frees them all; returns the bytes zeroed.
fn zero_and_free(blocks: &[(sys::CUdeviceptr, u64)], stream: sys::CUstream) -> Result<u64, PrivateDeviceError> {
    let mut zeroed = 0;
    for &(pointer, bytes) in blocks {
        // Sizes were usize before the sweep widened them.
        let len = usize::try_from(bytes).map_err(failed("sizing a sweep block"))?;
        // SAFETY: each block is `len` bytes allocated by the sweep and not freed yet.
        unsafe { driver::memset_d8_async(pointer, 0, len, stream) }.map_err(failed("zeroing the job's free memory"))?;
        zeroed += bytes;
    }
    for &(pointer, _) in blocks {
        // SAFETY: allocated on this stream by the sweep, freed once, after its memset in stream order.
        unsafe { driver::free_async(pointer, stream) }.map_err(failed("freeing the sweep's blocks"))?;
    }
    Ok(zeroed)
}

/// Hands cuBLAS its default workspace back: setting the handle's stream again resets the workspace.
fn reset_cublas_workspace(blas: &CudaBlas) -> Result<(), PrivateDeviceError> {
    let handle = *blas.handle();
    let mut stream: cublas_sys::cudaStream_t = std::ptr::null_mut();
    // SAFETY: a live handle and a valid out pointer.
    unsafe { cublas_sys::cublasGetStream_v2(handle, &mut stream) }
        .result()
        .map_err(failed("reading the cuBLAS stream"))?;
    // SAFETY: the handle's own stream, set again.
    unsafe { cublas_sys::cublasSetStream_v2(handle, stream) }
        .result()
        .map_err(failed("restoring cuBLAS's default workspace"))
}

/// `CUmemLocation` as every CUDA version lays it out: a location kind, then a device ordinal. From CUDA 13.2 the
/// bindings put the ordinal in a union, so its field name depends on the toolkit cudarc was built against; writing
/// through this mirror works with all of them.
#[repr(C)]
struct DeviceLocation {
    kind: sys::CUmemLocationType,
    id: c_int,
}

const _: () = assert!(
    size_of::<DeviceLocation>() == size_of::<sys::CUmemLocation>()
        && align_of::<DeviceLocation>() == align_of::<sys::CUmemLocation>()
);

/// A new device-memory pool on `device` that keeps everything freed into it until trimmed.
fn create_private_pool(device: sys::CUdevice) -> Result<sys::CUmemoryPool, PrivateDeviceError> {
    // SAFETY: plain C data for which all-zero bits are valid (zero enums are INVALID/NONE, a null pointer, zero
    // sizes) and the documented default of every field not set below.
    let mut props: sys::CUmemPoolProps = unsafe { std::mem::zeroed() };
    props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
    let location = DeviceLocation { kind: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: device };
    // SAFETY: DeviceLocation has CUmemLocation's size, alignment (checked above) and field order.
    unsafe { std::ptr::addr_of_mut!(props.location).cast::<DeviceLocation>().write(location) };
    // SAFETY: `props` is fully initialized.
    let pool = unsafe { driver::mem_pool::create(&props) }.map_err(failed("creating the job's memory pool"))?;
    let mut keep_everything: u64 = u64::MAX;
    // SAFETY: the release threshold is a cuuint64_t, which `keep_everything` is.
    let threshold = unsafe {
        driver::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut keep_everything as *mut u64).cast(),
        )
    };
    let mut allow: c_int = 1;
    // Freed blocks must be reusable from any stream once their frees completed, for the sweep to claim them
    // whichever thread freed them (the default, set so it does not depend on one).
    // SAFETY: the reuse attributes are ints, which `allow` is.
    let reuse = threshold.and_then(|()| unsafe {
        driver::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC,
            (&mut allow as *mut c_int).cast(),
        )
    });
    if let Err(error) = reuse {
        // SAFETY: nothing was allocated from the new pool.
        let _ = unsafe { driver::mem_pool::destroy(pool) };
        return Err(failed("configuring the job's memory pool")(error));
    }
    Ok(pool)
}

/// How much memory `pool` holds and has handed out.
fn pool_usage(pool: sys::CUmemoryPool) -> Result<PoolUsage, PrivateDeviceError> {
    let attribute = |attribute: sys::CUmemPool_attribute| {
        let mut value: u64 = 0;
        // SAFETY: both attributes read here are cuuint64_t, which `value` is.
        unsafe { driver::mem_pool::get_attribute(pool, attribute, (&mut value as *mut u64).cast()) }
            .map(|()| value)
            .map_err(failed("reading the job's pool usage"))
    };
    Ok(PoolUsage {
        reserved: attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
        used: attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
    })
}
