//! Device faults during a run, and what the engine does about them:
//! - **out of memory**: the job may fit at a smaller batch, so it is retried in halves (image `i` keeps seed
//!   `seed + i`, so the images are the ones a single run would give); when one image alone does not fit the job
//!   fails with `out_of_memory`, which the queue retries later.
//! - **context-killing faults** (illegal address, launch failure, device-side assert, uncorrectable ECC, …): CUDA
//!   errors that are "sticky", so every later call on the context fails too. The engine remembers the first one
//!   and refuses all further work; the worker hands its jobs back and exits non-zero so that its supervisor starts
//!   a fresh process with a fresh context.

use std::sync::Mutex;

use candle_core::Tensor;

use crate::diffusion::pipeline::{GenerateParams, Generated, StageTimings};
use crate::diffusion::{Error as DiffusionError, Result as DiffusionResult};
use crate::job::{ErrorCode, JobError};

/// Whether a device error message says that memory ran out (CUDA driver, cuBLAS or cuDNN allocation).
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("out_of_memory") || m.contains("alloc_failed")
}

/// CUDA error names (driver and runtime spelling) after which the context is unusable.
const CONTEXT_KILLING_NAMES: &[&str] = &[
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_ASSERT",
    "CUDA_ERROR_LAUNCH_TIMEOUT",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_NVLINK_UNCORRECTABLE",
    "CUDA_ERROR_CONTAINED",
    "CUDA_ERROR_CONTEXT_IS_DESTROYED",
    "CUDA_ERROR_DEINITIALIZED",
    "CUDA_ERROR_DEVICE_UNAVAILABLE",
    "CUDA_ERROR_MPS_CLIENT_TERMINATED",
    "cudaErrorIllegalAddress",
    "cudaErrorLaunchFailure",
    "cudaErrorIllegalInstruction",
    "cudaErrorMisalignedAddress",
    "cudaErrorInvalidAddressSpace",
    "cudaErrorInvalidPc",
    "cudaErrorHardwareStackError",
    "cudaErrorAssert",
    "cudaErrorLaunchTimeout",
    "cudaErrorECCUncorrectable",
    "cudaErrorContextIsDestroyed",
];

/// The driver's descriptions of the same errors (`cuGetErrorString`), for messages that carry only the text.
const CONTEXT_KILLING_TEXTS: &[&str] = &[
    "an illegal memory access was encountered",
    "unspecified launch failure",
    "an illegal instruction was encountered",
    "misaligned address",
    "device-side assert triggered",
    "uncorrectable ecc error encountered",
    "the launch timed out and was terminated",
    "context is destroyed",
];

/// Whether a device error message reports a fault that leaves the CUDA context unusable.
pub fn is_device_lost(message: &str) -> bool {
    // Whole identifiers only: a name must not match as the prefix of a longer one.
    let named = message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|word| CONTEXT_KILLING_NAMES.contains(&word));
    let lower = message.to_ascii_lowercase();
    named || CONTEXT_KILLING_TEXTS.iter().any(|text| lower.contains(text))
}

/// Runs a batch of `batch` images, image `i` from seed `seed + i`, as `run(first_seed, count)` calls: first whole,
/// then, each time a chunk fails with out-of-memory, in chunks of half that size. Returns the chunks in order, or
/// the first error that is not out-of-memory, or out-of-memory when a single image does not fit.
pub fn run_in_chunks<T, E>(
    batch: usize,
    seed: u64,
    is_oom: impl Fn(&E) -> bool,
    mut run: impl FnMut(u64, usize) -> Result<T, E>,
) -> Result<Vec<T>, E> {
    let mut chunk = batch;
    let mut done = 0;
    let mut parts = Vec::new();
    while done < batch {
        let size = chunk.min(batch - done);
        match run(seed.wrapping_add(done as u64), size) {
            Ok(part) => {
                parts.push(part);
                done += size;
            }
            Err(e) if size > 1 && is_oom(&e) => {
                chunk = size / 2;
                tracing::warn!(batch, chunk, "out of device memory; retrying in smaller batches");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(parts)
}

fn is_oom_error(e: &DiffusionError) -> bool {
    matches!(e, DiffusionError::Tensor(t) if is_out_of_memory(&t.to_string()))
}

/// Runs `params` through `run`, splitting the batch on out-of-memory (see [`run_in_chunks`]), and joins the
/// chunks into one [`Generated`].
pub fn generate_in_chunks(
    params: &GenerateParams,
    mut run: impl FnMut(&GenerateParams) -> DiffusionResult<Generated>,
) -> DiffusionResult<Generated> {
    let parts = run_in_chunks(params.batch, params.seed, is_oom_error, |seed, batch| {
        run(&GenerateParams { seed, batch, ..params.clone() })
    })?;
    join_chunks(parts)
}

/// Concatenates chunks of one batch along the batch axis, adding up their stage timings.
fn join_chunks(mut parts: Vec<Generated>) -> DiffusionResult<Generated> {
    if parts.len() <= 1 {
        return parts.pop().ok_or_else(|| DiffusionError::InvalidRequest("a batch needs at least one image".into()));
    }
    let cat = |pick: fn(&Generated) -> &Tensor| -> DiffusionResult<Tensor> {
        Ok(Tensor::cat(&parts.iter().map(pick).collect::<Vec<_>>(), 0)?)
    };
    let mut timings = StageTimings::default();
    for part in &parts {
        timings.text_encode += part.timings.text_encode;
        timings.denoise += part.timings.denoise;
        timings.vae_decode += part.timings.vae_decode;
    }
    Ok(Generated {
        images: cat(|g| &g.images)?,
        initial_noise: cat(|g| &g.initial_noise)?,
        final_latents: cat(|g| &g.final_latents)?,
        truncated_tokens: parts.iter().map(|g| g.truncated_tokens).max().unwrap_or(0),
        timings,
    })
}

/// Remembers the first context-killing fault of the engine's device; after it, all work is refused.
#[derive(Default)]
pub struct DeviceHealth {
    lost: Mutex<Option<String>>,
}

impl DeviceHealth {
    /// The fault that made the device unusable, if one happened.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Refuses work once the device is lost.
    pub fn ensure_usable(&self) -> Result<(), JobError> {
        match self.lost() {
            Some(fault) => Err(JobError::new(
                ErrorCode::Internal,
                format!("the device failed earlier and this worker must restart: {fault}"),
            )),
            None => Ok(()),
        }
    }

    /// Marks the device lost for a fault found outside a job's result (the first fault is kept).
    pub fn mark_lost(&self, fault: String) {
        tracing::error!(%fault, "the device is unusable; refusing further work");
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(fault);
    }

    /// Passes `result` through, remembering it when it is a context-killing fault.
    pub fn observe<T>(&self, result: Result<T, JobError>) -> Result<T, JobError> {
        if let Err(e) = &result {
            if e.code == ErrorCode::Internal && is_device_lost(&e.message) {
                tracing::error!(error = %e.message, "the device context is lost; refusing further work");
                self.lost.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| e.message.clone());
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn context_killing_cuda_errors_are_recognised_as_device_loss() {
        for message in [
            r#"DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, "an illegal memory access was encountered")"#,
            r#"DriverError(CUDA_ERROR_LAUNCH_FAILED, "unspecified launch failure")"#,
            r#"DriverError(CUDA_ERROR_ASSERT, "device-side assert triggered")"#,
            r#"DriverError(CUDA_ERROR_ECC_UNCORRECTABLE, "uncorrectable ECC error encountered")"#,
            "CUDA error: an illegal memory access was encountered",
            "cuda kernel failed: unspecified launch failure",
            "cudaErrorIllegalAddress when synchronizing",
            "model at /m failed to load: DriverError(CUDA_ERROR_MISALIGNED_ADDRESS, \"misaligned address\")",
        ] {
            assert!(is_device_lost(message), "{message}");
            assert!(!is_out_of_memory(message), "{message}");
        }
    }

    #[test]
    fn recoverable_errors_are_not_device_loss() {
        for message in [
            r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#,
            r#"DriverError(CUDA_ERROR_INVALID_VALUE, "invalid argument")"#,
            "CublasError(CUBLAS_STATUS_ALLOC_FAILED)",
            "shape mismatch in matmul, lhs: [1, 4], rhs: [3, 4]",
            "CUDA_ERROR_ASSERTION_HELPER is not a real error", // a longer name that merely starts like one
            "unknown model \"illegal\"",
        ] {
            assert!(!is_device_lost(message), "{message}");
        }
        assert!(is_out_of_memory(r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#));
        assert!(is_out_of_memory("CublasError(CUBLAS_STATUS_ALLOC_FAILED)"));
        assert!(is_out_of_memory("CudnnError(CUDNN_STATUS_ALLOC_FAILED)"));
    }

    /// A fake device that runs out of memory above `capacity` images and logs every call.
    fn fake_device(
        capacity: usize,
        calls: &mut Vec<(u64, usize)>,
    ) -> impl FnMut(u64, usize) -> Result<Vec<u64>, String> + '_ {
        move |seed, n| {
            calls.push((seed, n));
            if n > capacity {
                Err("CUDA_ERROR_OUT_OF_MEMORY".into())
            } else {
                Ok((0..n as u64).map(|i| seed + i).collect())
            }
        }
    }

    #[test]
    fn out_of_memory_halves_the_batch_and_keeps_each_images_seed() {
        let mut calls = Vec::new();
        let parts = run_in_chunks(8, 100, |e: &String| is_out_of_memory(e), fake_device(3, &mut calls)).unwrap();
        assert_eq!(parts.concat(), (100..108).collect::<Vec<_>>());
        assert_eq!(calls, [(100, 8), (100, 4), (100, 2), (102, 2), (104, 2), (106, 2)]);
        let mut calls = Vec::new();
        let parts = run_in_chunks(5, 0, |e: &String| is_out_of_memory(e), fake_device(2, &mut calls)).unwrap();
        assert_eq!(parts.concat(), (0..5).collect::<Vec<_>>());
        assert_eq!(calls, [(0, 5), (0, 2), (2, 2), (4, 1)]);
    }

    #[test]
    fn a_single_image_that_does_not_fit_is_out_of_memory_and_other_errors_are_not_retried() {
        let mut calls = Vec::new();
        let err = run_in_chunks(4, 7, |e: &String| is_out_of_memory(e), fake_device(0, &mut calls)).unwrap_err();
        assert!(is_out_of_memory(&err));
        assert_eq!(calls, [(7, 4), (7, 2), (7, 1)]);
        let mut attempts = 0;
        let err = run_in_chunks(
            4,
            7,
            |e: &String| is_out_of_memory(e),
            |_, _| -> Result<(), String> {
                attempts += 1;
                Err("shape mismatch".into())
            },
        )
        .unwrap_err();
        assert_eq!((err.as_str(), attempts), ("shape mismatch", 1));
    }

    fn generated(seed: u64, batch: usize) -> Generated {
        let rows: Vec<u8> = (0..batch as u64).flat_map(|i| [(seed + i) as u8; 3]).collect();
        let latents =
            Tensor::from_vec(rows.iter().map(|&v| v as f32).collect::<Vec<_>>(), (batch, 3, 1, 1), &Device::Cpu);
        let latents = latents.unwrap();
        Generated {
            images: Tensor::from_vec(rows, (batch, 3, 1, 1), &Device::Cpu).unwrap(),
            initial_noise: latents.clone(),
            final_latents: latents,
            truncated_tokens: 0,
            timings: StageTimings { denoise: std::time::Duration::from_millis(10), ..Default::default() },
        }
    }

    #[test]
    fn chunks_are_joined_in_order_along_the_batch() {
        let params = GenerateParams {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: 8,
            height: 8,
            steps: 1,
            guidance: 0.0,
            seed: 40,
            scheduler: crate::diffusion::schedulers::SchedulerKind::Euler,
            batch: 4,
        };
        let out = generate_in_chunks(&params, |p| {
            if p.batch > 1 {
                Err(DiffusionError::Tensor(candle_core::Error::Msg("CUDA_ERROR_OUT_OF_MEMORY".into())))
            } else {
                Ok(generated(p.seed, p.batch))
            }
        })
        .unwrap();
        let pixels = out.images.to_dtype(DType::U8).unwrap().flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(pixels, [40, 40, 40, 41, 41, 41, 42, 42, 42, 43, 43, 43]);
        assert_eq!(out.final_latents.dims(), [4, 3, 1, 1]);
        assert_eq!(out.timings.denoise, std::time::Duration::from_millis(40));
    }

    #[test]
    fn a_split_batch_gives_the_images_of_one_run() {
        use crate::diffusion::model::{DiffusionModel, LoadOptions};
        use crate::diffusion::pipeline::GenerateRequest;
        use crate::diffusion::schedulers::SchedulerKind;
        use crate::diffusion::tiny::{write_tiny_model, TinyFamily, TinyOptions};
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), TinyOptions { family: TinyFamily::SdTurbo, seed: 0, fp16_variant: false })
            .unwrap();
        let model = DiffusionModel::load(dir.path(), &LoadOptions::cpu()).unwrap();
        let request = GenerateRequest {
            prompt: "a red circle".into(),
            seed: 9,
            batch: 3,
            steps: Some(2),
            // Ancestral: fresh noise every step, so each image's own noise stream must survive the split too.
            scheduler: Some(SchedulerKind::EulerAncestral),
            ..Default::default()
        };
        let params = model.params(request).unwrap();
        let whole = model.generate(&params, &mut |_| true).unwrap();
        let mut chunk_sizes = Vec::new();
        let split = generate_in_chunks(&params, |p| {
            chunk_sizes.push(p.batch);
            if p.batch > 1 {
                Err(DiffusionError::Tensor(candle_core::Error::Msg("CUDA_ERROR_OUT_OF_MEMORY".into())))
            } else {
                model.generate(p, &mut |_| true)
            }
        })
        .unwrap();
        assert_eq!(chunk_sizes, [3, 1, 1, 1]);
        let values = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Every image is computed as it would be alone (see `diffusion::batch`), so the split is exact.
        assert_eq!(values(&split.final_latents), values(&whole.final_latents));
        assert_eq!(values(&split.images), values(&whole.images));
        assert_eq!(values(&split.initial_noise), values(&whole.initial_noise), "each image keeps its seed");
    }

    #[test]
    fn a_lost_device_refuses_all_later_work() {
        let health = DeviceHealth::default();
        let oom = health.observe::<()>(Err(JobError::new(ErrorCode::OutOfMemory, "CUDA_ERROR_OUT_OF_MEMORY")));
        assert_eq!(oom.unwrap_err().code, ErrorCode::OutOfMemory);
        assert!(health.ensure_usable().is_ok() && health.lost().is_none());
        let fault = r#"DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, "an illegal memory access was encountered")"#;
        let _ = health.observe::<()>(Err(JobError::new(ErrorCode::Internal, fault)));
        assert_eq!(health.lost().as_deref(), Some(fault));
        let refused = health.ensure_usable().unwrap_err();
        assert_eq!(refused.code, ErrorCode::Internal);
        assert!(refused.message.contains("must restart") && refused.message.contains("CUDA_ERROR_ILLEGAL_ADDRESS"));
    }
}
