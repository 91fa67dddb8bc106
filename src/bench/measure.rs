//! Running a workload: prepare and load the model once, then per iteration one job through the engine (latency)
//! and one generation straight through the pipeline (stage times), keeping the iterations after warm-up.

use std::time::{Duration, Instant};

use crate::diffusion::hub::HubOptions;
use crate::diffusion::input::InputLimits;
use crate::diffusion::model::DiffusionModel;
use crate::diffusion::pipeline::{GenerateParams, GenerateRequest, MAX_BATCH, MAX_IMAGE_SIDE, MAX_STEPS};
use crate::engine::{CacheLimits, Engine, EngineConfig, JobControl, JobInputs, ModelDirectory};
use crate::job::{parse, validate, ErrorBody, JobError, JobLimits};

use super::flops::{device_peak_tflops, unet_flops, UNetInput};
use super::memory::{device_name, peak_rss_bytes, GpuMemory, GpuMemorySampler};
use super::report::{BenchReport, LatencyStats, Results, Samples, StageStats, WorkloadSummary};
use super::workload::{prepare_model, Workload};
use super::BenchError;

/// The engine serves the benchmarked folder as its default model.
const MODEL_NAME: &str = "default";

/// How many times a workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchOptions {
    /// Measured iterations (at least one).
    pub iterations: usize,
    /// Iterations run first and discarded: the first calls pay for allocations and kernel selection.
    pub warmup: usize,
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `workload` and reports what was measured. A job the engine refuses (e.g. a Private Mode job on a worker
/// without it) ends the run with [`BenchReport::failure`] set instead of an error.
pub fn run(workload: &Workload, options: BenchOptions) -> Result<BenchReport, BenchError> {
    if options.iterations == 0 {
        return Err(BenchError::NoIterations);
    }
    let device = &workload.load.device;
    let gpu_sampler = GpuMemorySampler::start(device);

    let preparing = Instant::now();
    let prepared = prepare_model(&workload.model)?;
    let prepare_seconds = if prepared.is_scratch() { preparing.elapsed().as_secs_f64() } else { 0.0 };
    tracing::info!(model = %workload.model, dir = %prepared.dir.display(), "benchmark model ready");

    // Without the prompt-embedding cache: every job pays for its text encoding, as a job with a new prompt does
    // (the benchmark repeats one prompt).
    let no_prompt_cache = CacheLimits { prompt_embedding_bytes: 0, ..CacheLimits::default() };
    let engine = Engine::with_caches(
        EngineConfig {
            models: ModelDirectory {
                models_dir: None,
                default_model: Some(prepared.dir.clone()),
                hub: HubOptions::from_env(),
            },
            load: workload.load.clone(),
            input_limits: InputLimits::default(),
        },
        no_prompt_cache,
    );
    let loading = Instant::now();
    let model = engine.model(MODEL_NAME).map_err(BenchError::Load)?;
    device.synchronize().map_err(crate::diffusion::Error::from)?;
    let load_seconds = loading.elapsed().as_secs_f64();

    let params = model.params(GenerateRequest {
        prompt: workload.prompt.clone(),
        negative_prompt: String::new(),
        size: match (workload.width, workload.height) {
            (None, None) => None,
            (width, height) => {
                let (default_width, default_height) = model.default_size();
                Some((width.unwrap_or(default_width), height.unwrap_or(default_height)))
            }
        },
        steps: workload.steps,
        guidance: workload.guidance,
        seed: workload.seed,
        scheduler: workload.scheduler,
        batch: workload.batch,
    })?;
    let summary = summarize(workload, &model, &params);
    let report = |failure, results| BenchReport {
        imago_version: env!("CARGO_PKG_VERSION").to_string(),
        workload: summary.clone(),
        iterations: options.iterations,
        warmup: options.warmup,
        prepare_seconds,
        load_seconds,
        failure,
        results,
    };

    // The bench may ask for anything the pipeline can run, beyond a worker's configurable limits.
    let limits = JobLimits {
        max_side: MAX_IMAGE_SIDE as u32,
        max_steps: MAX_STEPS as u32,
        max_batch: MAX_BATCH as u32,
        ..JobLimits::default()
    };
    let mut samples = Samples::default();
    for index in 0..options.warmup + options.iterations {
        let message = serde_json::to_vec(&workload.job_message(index, &params))
            .map_err(|e| crate::diffusion::Error::InvalidRequest(format!("job message: {e}")))?;
        let started = Instant::now();
        if let Err(refused) = run_job(&engine, &message, &limits) {
            tracing::warn!(code = refused.code.as_str(), "the engine refused the benchmark job");
            gpu_sampler.finish();
            return Ok(report(Some(ErrorBody { code: refused.code, message: refused.message }), None));
        }
        let latency = started.elapsed();
        let generated = model.generate(&params, &mut |_| true)?;
        let t = &generated.timings;
        tracing::info!(
            iteration = index + 1,
            of = options.warmup + options.iterations,
            warmup = index < options.warmup,
            job_ms = millis(latency),
            denoise_ms = millis(t.denoise),
            "benchmark iteration"
        );
        if index >= options.warmup {
            samples.text_encode_ms.push(millis(t.text_encode));
            samples.unet_step_ms.push(millis(t.denoise) / params.steps as f64);
            samples.vae_decode_ms.push(millis(t.vae_decode));
            samples.job_latency_ms.push(millis(latency));
        }
    }
    let gpu = gpu_sampler.finish();
    let results = results(&model, &params, &summary, samples, gpu)?;
    Ok(report(None, Some(results)))
}

/// One job as the worker runs it, from the message bytes to encoded images.
fn run_job(engine: &Engine, message: &[u8], limits: &JobLimits) -> Result<(), JobError> {
    let spec = validate(parse(message)?, limits)?;
    engine.run(&spec, &JobInputs::default(), &JobControl::default(), &mut |_| {})?;
    Ok(())
}

fn summarize(workload: &Workload, model: &DiffusionModel, params: &GenerateParams) -> WorkloadSummary {
    let device = &workload.load.device;
    WorkloadSummary {
        model: workload.model.to_string(),
        family: model.defaults.family.clone(),
        width: params.width,
        height: params.height,
        steps: params.steps,
        guidance: params.guidance,
        batch: params.batch,
        scheduler: params.scheduler.name().to_string(),
        unet_rows_per_step: unet_rows(params),
        private: workload.private,
        device: match device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        },
        device_name: device_name(device),
        dtype: workload.load.dtype.as_str().to_string(),
        cpu_threads: candle_core::utils::get_num_threads(),
    }
}

/// Rows of each UNet call: guidance (> 1) runs the unconditional and conditional halves together.
fn unet_rows(params: &GenerateParams) -> usize {
    if params.guidance > 1.0 {
        2 * params.batch
    } else {
        params.batch
    }
}

fn results(
    model: &DiffusionModel,
    params: &GenerateParams,
    summary: &WorkloadSummary,
    samples: Samples,
    gpu: Option<GpuMemory>,
) -> Result<Results, BenchError> {
    let factor = model.vae_scale_factor();
    let context_tokens = model.text_encoders.first().map_or(77, |t| t.model.config().max_position_embeddings);
    let input = UNetInput {
        latent_height: params.height / factor,
        latent_width: params.width / factor,
        rows: unet_rows(params),
        context_tokens,
    };
    let flops_per_step = unet_flops(model.unet.config(), input)? as f64;
    let unet_step_ms = StageStats::of(&samples.unet_step_ms);
    let achieved_tflops = flops_per_step / (unet_step_ms.median / 1e3) / 1e12;
    let device_peak_tflops = device_peak_tflops(&summary.device_name, model.dtype);
    let total_seconds: f64 = samples.job_latency_ms.iter().sum::<f64>() / 1e3;
    let images = (params.batch * samples.job_latency_ms.len()) as f64;
    Ok(Results {
        steps_per_second: 1e3 / unet_step_ms.median,
        images_per_second: images / total_seconds,
        text_encode_ms: StageStats::of(&samples.text_encode_ms),
        unet_step_ms,
        vae_decode_ms: StageStats::of(&samples.vae_decode_ms),
        job_latency_ms: LatencyStats::of(&samples.job_latency_ms),
        peak_host_rss_bytes: peak_rss_bytes(),
        peak_gpu_memory_bytes: gpu.map(|g| g.peak_used_bytes),
        gpu_memory_total_bytes: gpu.map(|g| g.total_bytes),
        unet_gflop_per_step: flops_per_step / 1e9,
        achieved_tflops,
        device_peak_tflops,
        percent_of_peak: device_peak_tflops.map(|peak| 100.0 * achieved_tflops / peak),
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::{ModelSource, Preset};
    use crate::diffusion::model::LoadOptions;

    fn workload() -> Workload {
        Workload {
            model: ModelSource::Preset(Preset::Default),
            width: None,
            height: None,
            steps: Some(2),
            guidance: None,
            scheduler: None,
            batch: 2,
            seed: 0,
            prompt: "a red circle".into(),
            private: false,
            load: LoadOptions::cpu(),
        }
    }

    #[test]
    fn the_default_model_is_measured_through_engine_and_pipeline() {
        let report = run(&workload(), BenchOptions { iterations: 2, warmup: 1 }).unwrap();
        assert_eq!(report.failure, None);
        let w = &report.workload;
        // the embedded model's defaults: 32×32, with guidance (so two UNet rows per image)
        assert_eq!((w.width, w.height, w.steps, w.batch, w.unet_rows_per_step), (32, 32, 2, 2, 4));
        let r = report.results.unwrap();
        assert_eq!(r.samples.job_latency_ms.len(), 2);
        assert_eq!(r.samples.unet_step_ms.len(), 2);
        assert!(r.samples.unet_step_ms.iter().all(|ms| *ms > 0.0));
        assert!((r.steps_per_second - 1e3 / r.unet_step_ms.median).abs() < 1e-9);
        // each job does at least the work of the pipeline run beside it
        assert!(r.job_latency_ms.p50 > r.unet_step_ms.median * 2.0);
        assert!(r.unet_gflop_per_step > 0.0 && r.peak_host_rss_bytes.is_some());
        assert_eq!((r.device_peak_tflops, r.percent_of_peak, r.peak_gpu_memory_bytes), (None, None, None));
    }

    #[test]
    fn a_job_the_engine_refuses_ends_the_run_with_its_code_instead_of_an_error() {
        // The pipeline would truncate this prompt; the job protocol refuses it, as it refuses Private Mode jobs on
        // a worker without Private Mode.
        let mut refused = workload();
        refused.prompt = "a".repeat(JobLimits::default().max_prompt_chars + 1);
        let report = run(&refused, BenchOptions { iterations: 2, warmup: 1 }).unwrap();
        let failure = report.failure.unwrap();
        assert_eq!(failure.code, crate::job::ErrorCode::InvalidPrompt);
        assert!(failure.message.contains("prompt"), "{}", failure.message);
        assert_eq!(report.results, None);
    }

    #[test]
    fn a_workload_the_pipeline_cannot_run_is_an_error() {
        let mut too_big = workload();
        too_big.batch = MAX_BATCH + 1;
        let err = run(&too_big, BenchOptions { iterations: 1, warmup: 0 }).unwrap_err();
        assert!(err.to_string().contains("batch 17"), "{err}");
    }

    #[test]
    fn zero_iterations_is_an_error() {
        let err = run(&workload(), BenchOptions { iterations: 0, warmup: 1 }).unwrap_err();
        assert!(matches!(err, BenchError::NoIterations), "{err}");
    }
}
