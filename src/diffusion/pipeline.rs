//! Text-to-image: the denoising loop shared by every family and scheduler.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Shape, Tensor};
use serde::Serialize;

use super::batch::PromptEmbeddings;
use super::compute_pool::on_compute_pool;
use super::model::{Architecture, DiffusionModel, TextConditioning};
use super::noise::NoiseSource;
use super::schedulers::{self, Scheduler, SchedulerKind, StepNoise};
use super::unet::TextTimeConditioning;
use super::{Error, Result};

/// Largest image side accepted, in pixels: beyond it attention memory grows past any GPU we target.
pub const MAX_IMAGE_SIDE: usize = 2048;
/// Most images generated from one prompt in one call.
pub const MAX_BATCH: usize = 16;
/// Most denoising steps accepted (schedulers are trained on 1000 timesteps).
pub const MAX_STEPS: usize = 1000;

/// A fully specified generation; [`DiffusionModel::params`] fills in a model's defaults.
#[derive(Clone, Serialize)]
pub struct GenerateParams {
    #[serde(skip)]
    pub prompt: String,
    #[serde(skip)]
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; ≤ 1 runs the UNet once per step without guidance.
    pub guidance: f64,
    /// Image `i` of a batch uses seed `seed + i`, so any image can be reproduced alone.
    pub seed: u64,
    pub scheduler: SchedulerKind,
    pub batch: usize,
}

/// What a caller may leave to the model's defaults.
#[derive(Clone, Default)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub size: Option<(usize, usize)>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub seed: u64,
    pub scheduler: Option<SchedulerKind>,
    pub batch: usize,
}

/// Reported after every denoising step; the callback returns `false` to cancel.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress {
    pub step: usize,
    pub total: usize,
}

/// Wall time per stage of one generation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageTimings {
    pub text_encode: Duration,
    pub denoise: Duration,
    pub vae_decode: Duration,
}

/// The result of a generation.
pub struct Generated {
    /// RGB pixels, (batch, 3, height, width), u8.
    pub images: Tensor,
    /// The initial noise before scaling by the scheduler's sigma, (batch, channels, h/8, w/8), f32.
    pub initial_noise: Tensor,
    /// The denoised latents handed to the VAE (scaled space), f32.
    pub final_latents: Tensor,
    pub truncated_tokens: usize,
    pub timings: StageTimings,
}

/// Per-image noise streams: row `i` of every draw comes from image `i`'s own seed.
pub struct BatchNoise {
    sources: Vec<NoiseSource>,
}

impl BatchNoise {
    /// Images `seed`, `seed + 1`, … `seed + batch - 1`.
    pub fn new(seed: u64, batch: usize) -> Self {
        Self::from_seeds((0..batch as u64).map(|i| seed.wrapping_add(i)))
    }

    /// One image per seed, in order.
    pub fn from_seeds(seeds: impl IntoIterator<Item = u64>) -> Self {
        Self { sources: seeds.into_iter().map(NoiseSource::new).collect() }
    }
}

impl StepNoise for BatchNoise {
    fn sample(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let dims = shape.dims();
        if dims.first() != Some(&self.sources.len()) {
            return Err(Error::InvalidRequest(format!("noise for shape {shape:?} but {} images", self.sources.len())));
        }
        let row: Vec<usize> = std::iter::once(1).chain(dims[1..].iter().copied()).collect();
        let rows =
            self.sources.iter_mut().map(|s| s.tensor(row.as_slice(), dtype, device)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }
}

impl DiffusionModel {
    /// Fills in defaults and validates a request against this model.
    pub fn params(&self, request: GenerateRequest) -> Result<GenerateParams> {
        let (default_w, default_h) = self.default_size();
        let (width, height) = request.size.unwrap_or((default_w, default_h));
        let params = GenerateParams {
            width,
            height,
            steps: request.steps.or(self.defaults.steps).unwrap_or(30),
            guidance: request.guidance.or(self.defaults.guidance).unwrap_or(7.5),
            seed: request.seed,
            scheduler: match request.scheduler {
                Some(s) => s,
                None => self.default_scheduler()?,
            },
            batch: request.batch.max(1),
            prompt: request.prompt,
            negative_prompt: request.negative_prompt,
        };
        self.validate(&params)?;
        Ok(params)
    }

    /// Rejects parameters this model cannot run, naming the parameter.
    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        let factor = self.vae_scale_factor();
        for (name, side) in [("width", p.width), ("height", p.height)] {
            if side == 0 || side % factor != 0 {
                return Err(Error::InvalidRequest(format!("{name} {side} is not a positive multiple of {factor}")));
            }
            if side > MAX_IMAGE_SIDE {
                return Err(Error::InvalidRequest(format!("{name} {side} exceeds the limit of {MAX_IMAGE_SIDE}")));
            }
        }
        if p.steps == 0 || p.steps > MAX_STEPS {
            return Err(Error::InvalidRequest(format!("steps {} is outside 1..={MAX_STEPS}", p.steps)));
        }
        if p.batch == 0 || p.batch > MAX_BATCH {
            return Err(Error::InvalidRequest(format!("batch {} is outside 1..={MAX_BATCH}", p.batch)));
        }
        if !p.guidance.is_finite() || p.guidance < 0.0 {
            return Err(Error::InvalidRequest(format!("guidance {} must be a finite number ≥ 0", p.guidance)));
        }
        Ok(())
    }

    /// Generates `params.batch` images from seeded noise.
    ///
    /// Inpainting models (9-channel UNets) need an image and a mask: use [`DiffusionModel::edit`].
    pub fn generate(
        &self,
        params: &GenerateParams,
        on_step: &mut dyn FnMut(StepProgress) -> bool,
    ) -> Result<Generated> {
        self.validate(params)?;
        let mut noise = BatchNoise::new(params.seed, params.batch);
        let initial = noise.sample(&self.latent_shape(params).into(), DType::F32, &self.device)?;
        self.generate_from_noise(params, initial, &mut noise, on_step)
    }

    /// (batch, latent channels, height / 8, width / 8)
    pub fn latent_shape(&self, p: &GenerateParams) -> (usize, usize, usize, usize) {
        let f = self.vae_scale_factor();
        (p.batch, self.vae.config().latent_channels, p.height / f, p.width / f)
    }

    /// Text-to-image from given initial noise; `step_noise` feeds ancestral schedulers.
    pub fn generate_from_noise(
        &self,
        params: &GenerateParams,
        initial_noise: Tensor,
        step_noise: &mut dyn StepNoise,
        on_step: &mut dyn FnMut(StepProgress) -> bool,
    ) -> Result<Generated> {
        self.validate(params)?;
        let started = Instant::now();
        let text = self.prepare_text(params)?;
        let text_encode = stage_time(&self.device, started)?;
        self.generate_from_text(params, initial_noise, &text, text_encode, step_noise, on_step)
    }

    /// Text-to-image from given initial noise and prepared text; `text_encode` is the time the text took.
    pub(crate) fn generate_from_text(
        &self,
        params: &GenerateParams,
        initial_noise: Tensor,
        text: &PreparedText,
        text_encode: Duration,
        step_noise: &mut dyn StepNoise,
        on_step: &mut dyn FnMut(StepProgress) -> bool,
    ) -> Result<Generated> {
        self.validate(params)?;
        let channels = self.unet.config().in_channels;
        if channels != self.vae.config().latent_channels {
            return Err(Error::InvalidRequest(format!(
                "this UNet takes {channels} input channels (an inpainting model): give an image and a mask"
            )));
        }
        let initial_noise = self.check_noise(params, initial_noise)?;
        let mut timings = StageTimings { text_encode, ..Default::default() };

        let started = Instant::now();
        let mut scheduler = schedulers::build(params.scheduler, &self.scheduler_config, params.steps)?;
        let latents = (&initial_noise * scheduler.init_noise_sigma())?;
        let start = DenoiseStart { latents, first_step: 0, inpaint: None };
        let final_latents = self.denoise(params, scheduler.as_mut(), text, start, step_noise, on_step)?;
        timings.denoise = stage_time(&self.device, started)?;

        let started = Instant::now();
        let images = to_u8_pixels(&self.decode(&final_latents)?)?;
        timings.vae_decode = stage_time(&self.device, started)?;
        Ok(Generated { images, initial_noise, final_latents, truncated_tokens: text.truncated_tokens, timings })
    }

    /// Checks the shape of caller-provided noise and moves it to the model's device as f32.
    pub(crate) fn check_noise(&self, params: &GenerateParams, noise: Tensor) -> Result<Tensor> {
        let expected = self.latent_shape(params);
        if noise.dims4()? != expected {
            return Err(Error::InvalidRequest(format!("initial noise {:?} but expected {expected:?}", noise.shape())));
        }
        Ok(noise.to_dtype(DType::F32)?.to_device(&self.device)?)
    }

    /// Text conditioning for the whole batch (one prompt); with guidance, the unconditional half goes first.
    pub(crate) fn prepare_text(&self, params: &GenerateParams) -> Result<PreparedText> {
        let prompts = self.encode_prompts(&params.prompt, &params.negative_prompt, params.guidance > 1.0)?;
        self.batch_text(params, &[(&prompts, params.batch)])
    }

    /// Text conditioning from encoded prompts, each repeated for its number of images; with guidance, the
    /// unconditional rows of every image go first, in the same order as the conditional ones.
    pub(crate) fn batch_text(
        &self,
        params: &GenerateParams,
        parts: &[(&PromptEmbeddings, usize)],
    ) -> Result<PreparedText> {
        let guided = params.guidance > 1.0;
        let mut rows: Vec<(&TextConditioning, usize)> = Vec::with_capacity(2 * parts.len());
        if guided {
            for (prompts, images) in parts {
                let uncond = prompts.uncond.as_ref();
                rows.push((
                    uncond.ok_or_else(|| Error::InvalidRequest("guidance needs an encoded negative".into()))?,
                    *images,
                ));
            }
        }
        rows.extend(parts.iter().map(|(prompts, images)| (&prompts.cond, *images)));
        let contexts = rows.iter().map(|(t, n)| repeat_rows(&t.context, *n)).collect::<Result<Vec<_>>>()?;
        let context = Tensor::cat(&contexts, 0)?;
        let pooled =
            match rows.iter().map(|(t, n)| t.pooled.as_ref().map(|p| repeat_rows(p, *n))).collect::<Option<Vec<_>>>() {
                Some(pooled) => Some(Tensor::cat(&pooled.into_iter().collect::<Result<Vec<_>>>()?, 0)?),
                None => None,
            };
        let truncated_tokens = parts.iter().map(|(p, _)| p.cond.truncated_tokens).max().unwrap_or(0);
        let context = context.to_dtype(self.dtype)?;
        let rows = context.dim(0)?;
        // SDXL micro-conditioning: original size = target size = the requested size, no crop.
        let added = match (self.architecture, pooled) {
            (Architecture::StableDiffusionXl, Some(pooled)) => {
                let (h, w) = (params.height as f32, params.width as f32);
                let ids: Vec<f32> = (0..rows).flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
                Some(TextTimeConditioning {
                    text_embeds: pooled.to_dtype(self.dtype)?,
                    time_ids: Tensor::from_vec(ids, (rows, 6), &self.device)?,
                })
            }
            _ => None,
        };
        Ok(PreparedText { context, added, guided, truncated_tokens })
    }

    /// The denoising loop shared by text-to-image, image-to-image and both kinds of inpainting.
    pub(crate) fn denoise(
        &self,
        params: &GenerateParams,
        scheduler: &mut dyn Scheduler,
        text: &PreparedText,
        start: DenoiseStart,
        step_noise: &mut dyn StepNoise,
        on_step: &mut dyn FnMut(StepProgress) -> bool,
    ) -> Result<Tensor> {
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len() - start.first_step.min(timesteps.len());
        let mut latents = start.latents;
        for (i, &t) in timesteps.iter().enumerate().skip(start.first_step) {
            // 1. model input: doubled for guidance, scaled by the scheduler, inpaint channels appended
            let input = if text.guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let mut input = scheduler.scale_model_input(&input, i)?;
            if let Some(InpaintInputs::Channels { mask, masked_image_latents }) = &start.inpaint {
                let extra = Tensor::cat(&[mask, masked_image_latents], 1)?;
                let extra = if text.guided { Tensor::cat(&[&extra, &extra], 0)? } else { extra };
                input = Tensor::cat(&[&input, &extra], 1)?;
            }
            // 2. predict noise (or v), then apply guidance
            let prediction = on_compute_pool(&self.device, || -> Result<Tensor> {
                let prediction = self
                    .unet
                    .forward(&input.to_dtype(self.dtype)?, t, &text.context, text.added.as_ref())?
                    .to_dtype(DType::F32)?;
                Ok(if text.guided {
                    let halves = prediction.chunk(2, 0)?;
                    (&halves[0] + ((&halves[1] - &halves[0])? * params.guidance)?)?
                } else {
                    prediction
                })
            })?;
            // 3. scheduler step
            latents = scheduler.step(&prediction, i, &latents, step_noise)?;
            // 4. regular models inpaint by restoring the unmasked region, noised to the next step's level
            if let Some(InpaintInputs::Blend { mask, image_latents, noise }) = &start.inpaint {
                let original = if i + 1 < timesteps.len() {
                    scheduler.add_noise(image_latents, noise, i + 1)?
                } else {
                    image_latents.clone()
                };
                latents = (original.broadcast_mul(&mask.affine(-1.0, 1.0)?)? + latents.broadcast_mul(mask)?)?;
            }
            // 5. report progress; the caller may cancel
            if !on_step(StepProgress { step: i + 1 - start.first_step, total }) {
                return Err(Error::Cancelled);
            }
        }
        Ok(latents)
    }

    /// Scaled latents → images in [-1, 1], (batch, 3, h, w), f32.
    pub(crate) fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        on_compute_pool(&self.device, || {
            Ok(self.vae.decode(&latents.to_dtype(self.vae_dtype)?)?.to_dtype(DType::F32)?)
        })
    }
}

/// `t` (one row) repeated `n` times along the batch axis.
fn repeat_rows(t: &Tensor, n: usize) -> Result<Tensor> {
    let mut dims = vec![1; t.rank()];
    dims[0] = n;
    Ok(t.repeat(dims)?)
}

/// The text side of a generation, computed once per call.
pub(crate) struct PreparedText {
    pub context: Tensor,
    pub added: Option<TextTimeConditioning>,
    pub guided: bool,
    pub truncated_tokens: usize,
}

/// What an inpainting run adds to the loop.
pub(crate) enum InpaintInputs {
    /// Dedicated inpainting UNets (9 input channels) read the mask and the masked image's latents.
    Channels { mask: Tensor, masked_image_latents: Tensor },
    /// Regular UNets: after each step the unmasked region is reset to the original, noised to the next level.
    Blend { mask: Tensor, image_latents: Tensor, noise: Tensor },
}

/// Where the loop starts: the latents, the first step index (img2img skips the first ones), and inpainting.
pub(crate) struct DenoiseStart {
    pub latents: Tensor,
    pub first_step: usize,
    pub inpaint: Option<InpaintInputs>,
}

/// Time since `started` once `device` has finished the work queued so far. CUDA runs kernels asynchronously: without
/// the wait a stage's time would be the time to queue it, and its work would be charged to a later stage.
pub(crate) fn stage_time(device: &Device, started: Instant) -> Result<Duration> {
    device.synchronize()?;
    Ok(started.elapsed())
}

/// Images in [-1, 1] → u8 pixels, rounding as diffusers' PIL conversion does.
pub(crate) fn to_u8_pixels(images: &Tensor) -> Result<Tensor> {
    Ok(((images * 0.5)? + 0.5)?.clamp(0f32, 1f32)?.affine(255.0, 0.0)?.round()?.to_dtype(DType::U8)?)
}
