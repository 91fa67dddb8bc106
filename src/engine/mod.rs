//! The engine: runs validated jobs on loaded models. It owns model loading and caching, input decoding, seeds,
//! cancellation and deadlines, and knows nothing about NATS: a job arrives as a [`JobSpec`] plus its input bytes
//! and leaves as encoded images or a [`JobError`] whose code decides what the transport does with it.

mod batch;
mod embeddings;
mod faults;
mod lru;
mod models;
mod private_jobs;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use image::{GrayImage, RgbImage};

pub use batch::{batch_key, plan_batches, BatchJob, BatchKey};
pub use embeddings::{EmbeddingCache, EmbeddingCacheStats};
pub use faults::{generate_in_chunks, is_device_lost, is_out_of_memory, run_in_chunks, DeviceHealth};
pub use models::{ModelCache, ModelCacheStats, ModelDirectory};

use crate::diffusion::edit::{default_edit_size, EditInputs, EditParams};
use crate::diffusion::image_io::{encode_jpeg, encode_png, parameters_text, tensor_to_images};
use crate::diffusion::input::{check_mask_size, decode_image, decode_mask, fit_image, InputLimits};
use crate::diffusion::model::{DiffusionModel, LoadOptions};
use crate::diffusion::pipeline::{GenerateParams, GenerateRequest, Generated, StepProgress};
use crate::diffusion::Error as DiffusionError;
use crate::job::{ErrorCode, JobError, JobKind, JobSpec, OutputFormat, Timings};
use crate::private::SecretBytes;
use private_jobs::{forget_private_tensors, DeviceAccess};

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub models: ModelDirectory,
    pub load: LoadOptions,
    pub input_limits: InputLimits,
}

/// Memory the engine's caches may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Bytes of model weights kept loaded; beyond it the least recently used models are dropped. `None`: no limit.
    pub model_bytes: Option<u64>,
    /// Bytes of encoded prompts kept for jobs that repeat them; 0 turns the cache off.
    pub prompt_embedding_bytes: u64,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self { model_bytes: None, prompt_embedding_bytes: 64 << 20 }
    }
}

/// The inputs of an edit job as the transport delivered them (still encoded image files), in secret buffers.
#[derive(Default)]
pub struct JobInputs {
    pub image: Option<SecretBytes>,
    pub mask: Option<SecretBytes>,
}

/// Cancellation and deadline of one running job; the flag may be set from any thread.
#[derive(Clone, Default)]
pub struct JobControl {
    pub cancel: Arc<AtomicBool>,
    pub deadline: Option<SystemTime>,
}

impl JobControl {
    pub fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| SystemTime::now() >= d)
    }

    fn stop_requested(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.past_deadline()
    }
}

/// A finished job's images.
pub struct JobOutput {
    pub images: Vec<Vec<u8>>,
    pub seeds: Vec<u64>,
    pub width: u32,
    pub height: u32,
    pub format: OutputFormat,
    /// The parameters the model ran with (defaults filled in).
    pub steps: u32,
    pub guidance: f64,
    pub scheduler: String,
    pub timings: Timings,
}

/// What the worker needs from an engine: run one job to completion, cancellation or failure (blocking).
/// [`Engine`] is the real one; the queue benchmark measures the transport alone with a runner that answers at once.
pub trait JobRunner: Send + Sync + 'static {
    fn run(
        &self,
        spec: &JobSpec,
        inputs: &JobInputs,
        control: &JobControl,
        on_step: &mut dyn FnMut(StepProgress),
    ) -> Result<JobOutput, JobError>;

    /// Runs generate jobs (no inputs) that [`plan_batches`] grouped, together where the runner can; one result per
    /// job, in order. By default one by one.
    fn run_batch(&self, jobs: &mut [BatchJob]) -> Vec<Result<JobOutput, JobError>> {
        jobs.iter_mut().map(|job| self.run(job.spec, &JobInputs::default(), job.control, &mut *job.on_step)).collect()
    }

    /// The fault that made the device unusable (a context-killing CUDA error), if one happened: the worker then
    /// hands its jobs back and stops, for a supervisor to restart it on a fresh context.
    fn device_lost(&self) -> Option<String> {
        None
    }
}

impl JobRunner for Engine {
    fn run(
        &self,
        spec: &JobSpec,
        inputs: &JobInputs,
        control: &JobControl,
        on_step: &mut dyn FnMut(StepProgress),
    ) -> Result<JobOutput, JobError> {
        Engine::run(self, spec, inputs, control, on_step)
    }

    fn run_batch(&self, jobs: &mut [BatchJob]) -> Vec<Result<JobOutput, JobError>> {
        Engine::run_batch(self, jobs)
    }

    fn device_lost(&self) -> Option<String> {
        self.health.lost()
    }
}

/// Runs jobs; share one per worker.
pub struct Engine {
    models: ModelCache,
    input_limits: InputLimits,
    health: DeviceHealth,
    embeddings: EmbeddingCache,
    device_access: DeviceAccess,
}

fn random_seed() -> u64 {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (nanos as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % 1_000_000_000_000
}

impl Engine {
    /// An engine with the default [`CacheLimits`].
    pub fn new(config: EngineConfig) -> Self {
        Self::with_caches(config, CacheLimits::default())
    }

    pub fn with_caches(config: EngineConfig, caches: CacheLimits) -> Self {
        let device_access = DeviceAccess::new(&config.load.device);
        Self {
            models: ModelCache::new(config.models, config.load, caches.model_bytes),
            input_limits: config.input_limits,
            health: DeviceHealth::default(),
            embeddings: EmbeddingCache::new(caches.prompt_embedding_bytes),
            device_access,
        }
    }

    /// What the model cache holds and did so far.
    pub fn model_cache_stats(&self) -> ModelCacheStats {
        self.models.stats()
    }

    /// What the prompt-embedding cache holds and did so far.
    pub fn embedding_cache_stats(&self) -> EmbeddingCacheStats {
        self.embeddings.stats()
    }

    /// The loaded model a job's `model` name refers to, loading it if needed: for tools that drive the pipeline
    /// beside the engine on the same weights (`imago bench` times its stages this way).
    pub fn model(&self, name: &str) -> Result<Arc<DiffusionModel>, JobError> {
        self.models.get(name)
    }

    /// Runs one job to completion, cancellation or failure. Blocking: call it from a blocking thread.
    /// After a context-killing device fault every job is refused (see [`JobRunner::device_lost`]).
    pub fn run(
        &self,
        spec: &JobSpec,
        inputs: &JobInputs,
        control: &JobControl,
        on_step: &mut dyn FnMut(StepProgress),
    ) -> Result<JobOutput, JobError> {
        self.health.ensure_usable()?;
        if spec.private {
            return self.run_private(spec, inputs, control, on_step);
        }
        let _turn = self.device_access.shared();
        self.health.observe(self.run_on_device(spec, inputs, control, on_step))
    }

    fn run_on_device(
        &self,
        spec: &JobSpec,
        inputs: &JobInputs,
        control: &JobControl,
        on_step: &mut dyn FnMut(StepProgress),
    ) -> Result<JobOutput, JobError> {
        let started = Instant::now();
        if control.past_deadline() {
            return Err(JobError::new(ErrorCode::DeadlineExceeded, "the job's deadline passed before it started"));
        }
        let model = self.models.get(&spec.model)?;
        let request = job_request(spec, spec.seed.unwrap_or_else(random_seed));
        let mut progress = |p: StepProgress| {
            on_step(p);
            !control.stop_requested()
        };
        let (params, generated) = match spec.kind {
            JobKind::Generate => {
                let params = model.params(request).map_err(|e| diffusion_error(e, control))?;
                let generated = self.generate_one(&model, spec, &params, &mut progress);
                (params, generated)
            }
            JobKind::Edit => {
                let (params, image, mask) = self.prepare_edit(&model, spec, inputs, request, control)?;
                let inputs = EditInputs { image: &image, mask: mask.as_ref() };
                let generated = generate_in_chunks(&params.generate, |p| {
                    model.edit(&EditParams { generate: p.clone(), ..params.clone() }, &inputs, &mut progress)
                });
                (params.generate, generated)
            }
        };
        let generated = generated.map_err(|e| diffusion_error(e, control))?;
        let output = encode_output(spec, &params, &generated, started);
        if spec.private {
            forget_private_tensors(&generated)?;
        }
        output
    }

    /// Decodes and fits an edit's inputs and fills in its parameters.
    fn prepare_edit(
        &self,
        model: &DiffusionModel,
        spec: &JobSpec,
        inputs: &JobInputs,
        request: GenerateRequest,
        control: &JobControl,
    ) -> Result<(EditParams, RgbImage, Option<GrayImage>), JobError> {
        let missing = || JobError::new(ErrorCode::ImageRequired, "edit jobs need an image");
        let edit = spec.edit.as_ref().ok_or_else(missing)?;
        let image =
            decode_image(inputs.image.as_ref().map(SecretBytes::expose).ok_or_else(missing)?, &self.input_limits)
                .map_err(input_error)?;
        let mask = match inputs.mask.as_ref().map(SecretBytes::expose) {
            Some(bytes) => {
                let mask = decode_mask(bytes, &self.input_limits).map_err(input_error)?;
                check_mask_size(&image, &mask).map_err(input_error)?;
                Some(mask)
            }
            None => None,
        };
        let (native, _) = model.default_size();
        let fallback = default_edit_size(image.dimensions(), native, model.vae_scale_factor());
        let request = GenerateRequest { size: request.size.or(Some(fallback)), ..request };
        let generate = model.params(request).map_err(|e| diffusion_error(e, control))?;
        let (w, h) = (generate.width as u32, generate.height as u32);
        let image = fit_image(&image, w, h);
        let mask = mask.map(|m| fit_image(&m, w, h));
        let strength = edit.strength.unwrap_or(if mask.is_some() { 1.0 } else { 0.6 });
        Ok((EditParams { generate, strength, mask_blur: edit.mask_blur }, image, mask))
    }
}

/// What a job asks of the pipeline, `seed` for its first image.
fn job_request(spec: &JobSpec, seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: spec.prompt.expose().to_string(),
        negative_prompt: spec.negative_prompt.expose().to_string(),
        size: spec.size.map(|(w, h)| (w as usize, h as usize)),
        steps: spec.steps.map(|s| s as usize),
        guidance: spec.guidance,
        seed,
        scheduler: spec.scheduler,
        batch: spec.batch as usize,
    }
}

/// Encodes the images as the job asked, with the parameters as PNG text (not for private jobs).
fn encode_output(
    spec: &JobSpec,
    params: &GenerateParams,
    generated: &Generated,
    started: Instant,
) -> Result<JobOutput, JobError> {
    let internal = |e: DiffusionError| JobError::new(ErrorCode::Internal, format!("encoding the output failed: {e}"));
    let images = tensor_to_images(&generated.images).map_err(internal)?;
    let encoded = images
        .iter()
        .enumerate()
        .map(|(i, image)| match spec.output_format {
            OutputFormat::Png => {
                let text = if spec.private { Vec::new() } else { parameters_text(params, i, &spec.model) };
                encode_png(image, &text)
            }
            OutputFormat::Jpeg => encode_jpeg(image, 92),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(internal)?;
    let t = &generated.timings;
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    Ok(JobOutput {
        images: encoded,
        seeds: (0..params.batch as u64).map(|i| params.seed.wrapping_add(i)).collect(),
        width: params.width as u32,
        height: params.height as u32,
        format: spec.output_format,
        steps: params.steps as u32,
        guidance: params.guidance,
        scheduler: params.scheduler.name().to_string(),
        timings: Timings {
            queue_ms: None,
            text_encode_ms: ms(t.text_encode),
            denoise_ms: ms(t.denoise),
            vae_decode_ms: ms(t.vae_decode),
            total_ms: ms(started.elapsed()),
        },
    })
}

fn input_error(e: crate::diffusion::input::InputError) -> JobError {
    let code = match e.code() {
        "image_too_large" => ErrorCode::ImageTooLarge,
        "image_unsupported_format" => ErrorCode::ImageUnsupportedFormat,
        "mask_size_mismatch" => ErrorCode::MaskSizeMismatch,
        _ => ErrorCode::ImageUndecodable,
    };
    JobError::new(code, e.to_string())
}

/// Maps a diffusion failure to the code that decides the job's fate.
fn diffusion_error(e: DiffusionError, control: &JobControl) -> JobError {
    let code = match &e {
        DiffusionError::Cancelled if control.past_deadline() => ErrorCode::DeadlineExceeded,
        DiffusionError::Cancelled => ErrorCode::Cancelled,
        DiffusionError::InvalidRequest(_) => ErrorCode::InvalidParameter,
        DiffusionError::UnknownScheduler { .. } => ErrorCode::UnknownScheduler,
        DiffusionError::Tensor(t) if is_out_of_memory(&t.to_string()) => ErrorCode::OutOfMemory,
        _ => ErrorCode::Internal,
    };
    let message = match code {
        ErrorCode::DeadlineExceeded => "the job's deadline passed while it ran".to_string(),
        _ => e.to_string(),
    };
    JobError::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancellation_maps_to_deadline_only_when_the_deadline_passed() {
        let running = JobControl::default();
        assert_eq!(diffusion_error(DiffusionError::Cancelled, &running).code, ErrorCode::Cancelled);
        let late = JobControl { deadline: Some(SystemTime::UNIX_EPOCH), ..Default::default() };
        assert_eq!(diffusion_error(DiffusionError::Cancelled, &late).code, ErrorCode::DeadlineExceeded);
        let oom = candle_core::Error::Msg("CUDA_ERROR_OUT_OF_MEMORY".into());
        assert_eq!(diffusion_error(DiffusionError::Tensor(oom), &running).code, ErrorCode::OutOfMemory);
        assert!(ErrorCode::OutOfMemory.is_transient());
    }
}
