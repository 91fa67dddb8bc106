//! Image-to-image and inpainting on top of the shared denoising loop.
//!
//! - img2img: the input is encoded by the VAE (posterior mean), noised to the level `strength` implies, and only the
//!   remaining `steps × strength` steps run (diffusers' semantics). Strength 0 returns the VAE round trip.
//! - Inpainting with a dedicated UNet (9 input channels): the UNet also reads the mask and the masked image's
//!   latents, as diffusers' inpaint pipelines do.
//! - Inpainting with any other model: latent blending — after every step the unmasked region is reset to the
//!   original latents noised to the next step's level.
//!
//! In both inpainting modes the decoded result is composited with the input through the (optionally blurred) mask,
//! so unmasked pixels come back exactly as they were.

use std::time::Instant;

use candle_core::{DType, Tensor};
use image::{GrayImage, RgbImage};

use super::compute_pool::on_compute_pool;
use super::model::DiffusionModel;
use super::pipeline::{
    stage_time, to_u8_pixels, BatchNoise, DenoiseStart, GenerateParams, Generated, InpaintInputs, StageTimings,
    StepProgress,
};
use super::schedulers::{self, StepNoise};
use super::{Error, Result};

/// An edit: the generation parameters plus how much of the input to keep.
#[derive(Clone)]
pub struct EditParams {
    pub generate: GenerateParams,
    /// 0 keeps the input, 1 replaces it entirely; runs `steps × strength` denoising steps.
    pub strength: f64,
    /// Gaussian blur (sigma, pixels) applied to the mask before compositing; 0 for a hard edge.
    pub mask_blur: f32,
}

/// The user's picture (and mask) already fitted to the generation size.
pub struct EditInputs<'a> {
    pub image: &'a RgbImage,
    /// White = repaint. Must have the image's size.
    pub mask: Option<&'a GrayImage>,
}

/// The first step an edit runs: diffusers' `init_timestep = min(int(steps × strength), steps)`.
pub fn first_step(steps: usize, strength: f64) -> usize {
    let kept = ((steps as f64 * strength) as usize).min(steps);
    steps - kept
}

/// The size an edit runs at when the request gives none: the input's aspect, scaled down to the model's native
/// side if larger, in multiples of the VAE factor.
pub fn default_edit_size((w, h): (u32, u32), native: usize, factor: usize) -> (usize, usize) {
    let scale = (native as f64 / w.max(h).max(1) as f64).min(1.0);
    let round = |v: u32| (((v as f64 * scale) as usize) / factor * factor).max(factor);
    (round(w), round(h))
}

/// RGB u8 → (1, 3, h, w) in [-1, 1].
fn image_tensor(image: &RgbImage, device: &candle_core::Device) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    let t = Tensor::from_vec(image.as_raw().clone(), (h as usize, w as usize, 3), device)?;
    Ok(t.permute((2, 0, 1))?.unsqueeze(0)?.to_dtype(DType::F32)?.affine(2.0 / 255.0, -1.0)?)
}

/// Luma u8 → (1, 1, h, w) in {0, 1}: binarized at one half, as diffusers does.
fn binary_mask(mask: &GrayImage, device: &candle_core::Device) -> Result<Tensor> {
    let (w, h) = mask.dimensions();
    let values: Vec<f32> = mask.as_raw().iter().map(|&v| if v >= 128 { 1.0 } else { 0.0 }).collect();
    Ok(Tensor::from_vec(values, (1, 1, h as usize, w as usize), device)?)
}

impl DiffusionModel {
    /// Whether the UNet is a dedicated inpainting one: its input is the noisy latents, the mask and the masked
    /// image's latents (9 channels with SD's 4-channel VAE).
    fn is_inpainting_model(&self) -> bool {
        self.unet.config().in_channels == 2 * self.vae.config().latent_channels + 1
    }

    /// Checks an edit's parameters and inputs against this model.
    pub fn validate_edit(&self, params: &EditParams, inputs: &EditInputs) -> Result<()> {
        self.validate(&params.generate)?;
        if !(0.0..=1.0).contains(&params.strength) {
            return Err(Error::InvalidRequest(format!("strength {} is outside 0..=1", params.strength)));
        }
        if !(0.0..=64.0).contains(&params.mask_blur) {
            return Err(Error::InvalidRequest(format!("mask blur {} is outside 0..=64", params.mask_blur)));
        }
        let size = (params.generate.width as u32, params.generate.height as u32);
        if inputs.image.dimensions() != size || inputs.mask.is_some_and(|m| m.dimensions() != size) {
            return Err(Error::InvalidRequest(format!("edit inputs must be fitted to {}x{} first", size.0, size.1)));
        }
        let (unet_in, latent) = (self.unet.config().in_channels, self.vae.config().latent_channels);
        if self.is_inpainting_model() {
            match inputs.mask {
                Some(_) => Ok(()),
                None => Err(Error::InvalidRequest("this is an inpainting model: a mask is required".into())),
            }
        } else if unet_in == latent {
            Ok(())
        } else {
            Err(Error::InvalidRequest(format!(
                "UNet with {unet_in} input channels cannot edit images with a {latent}-channel VAE"
            )))
        }
    }

    /// Edits an image from seeded noise.
    pub fn edit(
        &self,
        params: &EditParams,
        inputs: &EditInputs,
        on_step: &mut dyn FnMut(StepProgress) -> bool,
    ) -> Result<Generated> {
        self.validate_edit(params, inputs)?;
        let mut noise = BatchNoise::new(params.generate.seed, params.generate.batch);
        let initial = noise.sample(&self.latent_shape(&params.generate).into(), DType::F32, &self.device)?;
        self.edit_from_noise(params, inputs, initial, &mut noise, on_step)
    }

    /// Edits an image from given noise; `step_noise` feeds ancestral schedulers.
    pub fn edit_from_noise(
        &self,
        params: &EditParams,
        inputs: &EditInputs,
        noise: Tensor,
        step_noise: &mut dyn StepNoise,
        on_step: &mut dyn FnMut(StepProgress) -> bool,
    ) -> Result<Generated> {
        self.validate_edit(params, inputs)?;
        let p = &params.generate;
        let noise = self.check_noise(p, noise)?;
        let mut timings = StageTimings::default();

        let started = Instant::now();
        let text = self.prepare_text(p)?;
        timings.text_encode = stage_time(&self.device, started)?;

        // 1. the input in latent space, repeated for the batch
        let started = Instant::now();
        let pixels = image_tensor(inputs.image, &self.device)?;
        let image_latents = self.encode_latents(&pixels)?.repeat((p.batch, 1, 1, 1))?;
        let mask = inputs.mask.map(|m| binary_mask(m, &self.device)).transpose()?;

        // 2. where the schedule starts
        let mut scheduler = schedulers::build(p.scheduler, &self.scheduler_config, p.steps)?;
        let first = first_step(p.steps, params.strength);
        let dedicated_inpaint = self.is_inpainting_model();
        let latents = if first == p.steps {
            image_latents.clone()
        } else if mask.is_some() && params.strength >= 1.0 {
            // diffusers' inpaint pipelines start from pure noise at full strength
            (&noise * scheduler.init_noise_sigma())?
        } else {
            scheduler.add_noise(&image_latents, &noise, first)?
        };

        // 3. inpainting inputs at latent resolution
        let inpaint = match &mask {
            None => None,
            Some(mask) => {
                let (_, _, lh, lw) = image_latents.dims4()?;
                let latent_mask = mask.upsample_nearest2d(lh, lw)?.repeat((p.batch, 1, 1, 1))?;
                Some(if dedicated_inpaint {
                    let keep = mask.affine(-1.0, 1.0)?;
                    let masked = self.encode_latents(&pixels.broadcast_mul(&keep)?)?.repeat((p.batch, 1, 1, 1))?;
                    InpaintInputs::Channels { mask: latent_mask, masked_image_latents: masked }
                } else {
                    InpaintInputs::Blend {
                        mask: latent_mask,
                        image_latents: image_latents.clone(),
                        noise: noise.clone(),
                    }
                })
            }
        };

        // 4. denoise the remaining steps
        let start = DenoiseStart { latents, first_step: first, inpaint };
        let final_latents = self.denoise(p, scheduler.as_mut(), &text, start, step_noise, on_step)?;
        timings.denoise = stage_time(&self.device, started)?;

        // 5. decode, and put the unmasked pixels back
        let started = Instant::now();
        let mut decoded = self.decode(&final_latents)?;
        if let (Some(mask), Some(gray)) = (&mask, inputs.mask) {
            let soft = if params.mask_blur > 0.0 {
                let blurred = image::imageops::blur(gray, params.mask_blur);
                Tensor::from_vec(
                    blurred.as_raw().iter().map(|&v| v as f32 / 255.0).collect::<Vec<_>>(),
                    mask.shape(),
                    &self.device,
                )?
            } else {
                mask.clone()
            };
            decoded = (pixels.broadcast_mul(&soft.affine(-1.0, 1.0)?)?.broadcast_add(&decoded.broadcast_mul(&soft)?))?;
        }
        let images = to_u8_pixels(&decoded)?;
        timings.vae_decode = stage_time(&self.device, started)?;
        Ok(Generated { images, initial_noise: noise, final_latents, truncated_tokens: text.truncated_tokens, timings })
    }

    /// Pixels in [-1, 1] → scaled latents, using the posterior mean (deterministic; the SD VAE's posterior spread is
    /// far below what the added noise contributes).
    pub fn encode_latents(&self, pixels: &Tensor) -> Result<Tensor> {
        on_compute_pool(&self.device, || {
            let posterior = self.vae.encode(&pixels.to_dtype(self.vae_dtype)?)?;
            self.vae.scale_latents(&posterior.mean.to_dtype(DType::F32)?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_edit_size_keeps_aspect_within_the_native_side() {
        assert_eq!(default_edit_size((1024, 768), 512, 8), (512, 384));
        assert_eq!(default_edit_size((300, 200), 512, 8), (296, 200));
        assert_eq!(default_edit_size((4, 4), 512, 8), (8, 8));
    }

    #[test]
    fn strength_sets_the_first_step_like_diffusers() {
        assert_eq!(first_step(50, 0.6), 20);
        assert_eq!(first_step(10, 1.0), 0);
        assert_eq!(first_step(10, 0.0), 10);
        assert_eq!(first_step(4, 0.3), 3); // int(1.2) = 1 step runs
        assert_eq!(first_step(1, 0.5), 1); // Turbo at half strength: int(0.5) = 0 steps, the input comes back
    }
}
