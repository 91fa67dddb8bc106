//! Stage 2: the text encoders and UNet, trained jointly on the frozen VAE's latents with Stable Diffusion's
//! noise schedule (DDPM, scaled-linear betas 0.00085–0.012 over 1000 steps) and 10% empty captions so
//! classifier-free guidance works.
//!
//! The UNet predicts v = √ᾱ·ε − √(1−ᾱ)·x₀ (SD 2.x's objective) rather than ε: at high noise an ε-prediction loss
//! barely depends on the clean image, so a short run never learns the caption's colours and shapes, while the
//! v-loss there is the error of the predicted image itself.
//!
//! The architecture is SDXL's in miniature: besides cross-attention, the pooled caption embedding is added to the
//! timestep embedding of every block. That global path learns colour, shape and background within a short CPU
//! run; cross-attention alone (SD 1.x) barely used the caption after the same number of steps.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use imago::diffusion::config::{PerBlock, UNetConfig};
use imago::diffusion::noise::NoiseSource;
use imago::diffusion::unet::{TextTimeConditioning, UNet};

use crate::autoencoder::{sample_latents, scene_batch, TrainedAutoencoder, IMAGE_SIDE};
use crate::params::{frozen_builder, learning_rate, tail_mean, Ema, TrainableWeights};
use crate::progress::Progress;
use crate::scenes::{CaptionParts, Position, Scene, Size};
use crate::text::{context_dim, trainable_text_weights, Captions, Conditioning, TextEncoders, POOLED_DIM};

const TRAIN_TIMESTEPS: usize = 1000;
const EVAL_SALT: u64 = 0xe7a1_0002;
/// Width of the sinusoidal embedding of each of SDXL's six size/crop numbers.
const TIME_ID_DIM: usize = 8;

/// How stage 2 runs.
#[derive(Debug, Clone, Copy)]
pub struct DenoiserSettings {
    pub steps: usize,
    pub batch: usize,
    /// Samples sharing one timestep: our UNet takes one timestep per call, so a batch is split into groups.
    pub group: usize,
    pub learning_rate: f64,
    pub caption_dropout: f64,
    pub ema_decay: f64,
    /// Loss weight per timestep, as a weight on the clean-image error: the SNR clamped to
    /// [`snr_floor`, `min_snr_gamma`]. The ceiling (Min-SNR-γ, Hang et al. 2023) stops nearly noise-free steps
    /// dominating the gradient; the floor (truncated SNR, Salimans & Ho 2022) keeps the noisiest steps, where
    /// colour and shape are decided, from fading out.
    pub min_snr_gamma: f64,
    pub snr_floor: f64,
    /// UNet channels at the 8×8 and the 4×4 latent level.
    pub unet_channels: [usize; 2],
    /// Cross-attention at the 8×8 level too, not only at 4×4 and in the middle.
    pub attention_at_8x8: bool,
    pub seed: u64,
}

/// The trained (averaged) weights and what the run measured.
pub struct TrainedDenoiser {
    pub unet_config: UNetConfig,
    pub unet_weights: BTreeMap<String, Tensor>,
    /// Text encoder 1 and 2.
    pub text_weights: [BTreeMap<String, Tensor>; 2],
    pub unet_parameters: usize,
    pub text_parameters: usize,
    /// Unweighted v-prediction MSE of every step.
    pub losses: Vec<f32>,
    pub eval_loss: HeldOutLoss,
    pub seconds: f64,
}

/// Two levels (8×8 and 4×4 latents); cross-attention at 4×4 and in the middle, where it is cheap (SDXL also has
/// none at its highest resolution), and optionally at 8×8; SDXL's text_time embedding everywhere.
pub fn unet_config(latent_channels: usize, channels: [usize; 2], attention_at_8x8: bool) -> UNetConfig {
    let names = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (outer_down, outer_up) =
        if attention_at_8x8 { ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") } else { ("DownBlock2D", "UpBlock2D") };
    UNetConfig {
        in_channels: latent_channels,
        out_channels: latent_channels,
        block_out_channels: channels.to_vec(),
        down_block_types: names(&[outer_down, "CrossAttnDownBlock2D"]),
        up_block_types: names(&["CrossAttnUpBlock2D", outer_up]),
        layers_per_block: 1,
        attention_head_dim: Some(PerBlock::All(4)),
        num_attention_heads: None,
        cross_attention_dim: context_dim(),
        transformer_layers_per_block: PerBlock::All(1),
        norm_num_groups: 8,
        norm_eps: 1e-5,
        flip_sin_to_cos: true,
        freq_shift: 0,
        downsample_padding: 1,
        use_linear_projection: true,
        upcast_attention: false,
        sample_size: IMAGE_SIDE / 4,
        addition_embed_type: Some("text_time".into()),
        addition_time_embed_dim: Some(TIME_ID_DIM),
        projection_class_embeddings_input_dim: Some(POOLED_DIM + 6 * TIME_ID_DIM),
        center_input_sample: false,
        act_fn: "silu".into(),
        mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
    }
}

/// ᾱ_t of SD's scaled-linear schedule.
pub fn alphas_cumprod() -> Vec<f64> {
    let (lo, hi) = (0.00085f64.sqrt(), 0.012f64.sqrt());
    let mut product = 1.0;
    (0..TRAIN_TIMESTEPS)
        .map(|i| {
            let beta = (lo + (hi - lo) * i as f64 / (TRAIN_TIMESTEPS - 1) as f64).powi(2);
            product *= 1.0 - beta;
            product
        })
        .collect()
}

/// Caption of a training scene, or empty with `dropout` probability. Size and position are spelled always when they
/// differ from a large shape in the center and half the time otherwise, so a caption naming only colour, shape and
/// background means a large centred shape: one clear picture to draw rather than a blur of sizes and places, and at
/// 32×32 pixels a small shape is too few pixels to keep its outline.
fn training_caption(scene: &Scene, rng: &mut NoiseSource, dropout: f64) -> String {
    if (rng.next_uniform() as f64) < dropout {
        return String::new();
    }
    let size = rng.next_uniform() < 0.5 || scene.size != Size::Large;
    let position = rng.next_uniform() < 0.5 || scene.position != Position::Center;
    scene.caption(CaptionParts { size, position })
}

/// SDXL's size/crop ids as the pipeline sends them for a native-size image: (h, w, 0, 0, h, w).
fn time_ids(rows: usize) -> Result<Tensor> {
    let side = IMAGE_SIDE as f32;
    let ids: Vec<f32> = (0..rows).flat_map(|_| [side, side, 0.0, 0.0, side, side]).collect();
    Ok(Tensor::from_vec(ids, (rows, 6), &Device::Cpu)?)
}

/// Noisy latents of one step, split into groups that each share a timestep.
struct NoisedBatch<'a> {
    latents: &'a Tensor,
    noise: &'a Tensor,
    timesteps: &'a [usize],
    group: usize,
}

/// Squared v-prediction error per group, (group, channels, h, w) each.
fn group_errors(unet: &UNet, batch: &NoisedBatch, text: &Conditioning, alphas: &[f64]) -> Result<Vec<Tensor>> {
    let group = batch.group;
    let ids = time_ids(group)?;
    let mut out = Vec::with_capacity(batch.timesteps.len());
    for (g, &t) in batch.timesteps.iter().enumerate() {
        let x0 = batch.latents.narrow(0, g * group, group)?;
        let eps = batch.noise.narrow(0, g * group, group)?;
        let (signal, noise) = (alphas[t].sqrt(), (1.0 - alphas[t]).sqrt());
        let noisy = (x0.affine(signal, 0.0)? + eps.affine(noise, 0.0)?)?;
        let target = (eps.affine(signal, 0.0)? - x0.affine(noise, 0.0)?)?;
        let added =
            TextTimeConditioning { text_embeds: text.pooled.narrow(0, g * group, group)?, time_ids: ids.clone() };
        let context = text.context.narrow(0, g * group, group)?;
        let prediction = unet.forward(&noisy, t as f64, &context, Some(&added))?;
        out.push((prediction - target)?.sqr()?);
    }
    Ok(out)
}

pub fn train_denoiser(settings: DenoiserSettings, autoencoder: &TrainedAutoencoder) -> Result<TrainedDenoiser> {
    let started = Instant::now();
    let mut bar = Progress::new("unet", settings.steps);
    if settings.group == 0 || !settings.batch.is_multiple_of(settings.group) {
        anyhow::bail!("--batch {} is not a multiple of --group {}", settings.batch, settings.group);
    }
    let text_weights = trainable_text_weights(settings.seed)?;
    let text = TextEncoders::new(text_weights[0].var_builder(), text_weights[1].var_builder())?;
    let unet_weights = TrainableWeights::new(settings.seed ^ 0x0e7, Default::default());
    let unet_config =
        unet_config(autoencoder.config.latent_channels, settings.unet_channels, settings.attention_at_8x8);
    let unet = UNet::new(unet_weights.var_builder(), unet_config.clone(), Path::new("unet/config.json"))?;
    let text_parameters = text_weights.iter().map(|w| w.trainable_count()).sum();
    let unet_parameters = unet_weights.trainable_count();
    bar.println(format!("text encoders: {text_parameters} trainable parameters; UNet: {unet_parameters}"));

    let mut vars = unet_weights.vars();
    text_weights.iter().for_each(|w| vars.extend(w.vars()));
    let mut optimizer =
        AdamW::new(vars, ParamsAdamW { lr: settings.learning_rate, weight_decay: 0.01, ..Default::default() })?;
    let mut emas: Vec<Ema> =
        text_weights.iter().chain([&unet_weights]).map(|w| Ema::new(w, settings.ema_decay)).collect();
    let alphas = alphas_cumprod();
    let mut captions = Captions::new()?;
    let mut data = NoiseSource::new(settings.seed ^ 0xda7a);
    let mut noise = NoiseSource::new(settings.seed ^ 0x401e);
    let groups = settings.batch / settings.group;
    let scale = autoencoder.config.scaling_factor;
    let mut losses = Vec::with_capacity(settings.steps);

    for step in 0..settings.steps {
        optimizer.set_learning_rate(learning_rate(settings.learning_rate, step, settings.steps, settings.steps / 25));
        let (images, scenes) = scene_batch(&mut data, settings.batch)?;
        let latents = sample_latents(&autoencoder.vae, &images, &mut noise)?.affine(scale, 0.0)?;
        let texts: Vec<String> =
            scenes.iter().map(|s| training_caption(s, &mut data, settings.caption_dropout)).collect();
        let (ids, eos) = captions.encode(&texts)?;
        let conditioning = text.encode(&ids, &eos)?;
        // Stratified timesteps: one per equal slice of [0, 1000), so every batch spans the whole schedule.
        let timesteps: Vec<usize> = (0..groups)
            .map(|g| (((g as f32 + data.next_uniform()) / groups as f32 * TRAIN_TIMESTEPS as f32) as usize).min(999))
            .collect();
        let eps = noise.tensor(latents.shape().clone(), DType::F32, &Device::Cpu)?;
        let batch = NoisedBatch { latents: &latents, noise: &eps, timesteps: &timesteps, group: settings.group };
        let errors = group_errors(&unet, &batch, &conditioning, &alphas)?;
        let mut weighted = Vec::with_capacity(groups);
        let mut per_group = Vec::with_capacity(groups);
        for (error, &t) in errors.iter().zip(&timesteps) {
            // The v-loss is (SNR + 1) times the clean-image loss, so divide that out.
            let snr = alphas[t] / (1.0 - alphas[t]);
            let weight = snr.clamp(settings.snr_floor, settings.min_snr_gamma) / (snr + 1.0);
            let mse = error.mean_all()?;
            weighted.push(mse.affine(weight / groups as f64, 0.0)?);
            per_group.push(mse);
        }
        let loss = Tensor::stack(&weighted, 0)?.sum_all()?;
        optimizer.backward_step(&loss)?;
        for ema in &mut emas {
            ema.update()?;
        }
        let plain = Tensor::stack(&per_group, 0)?.mean_all()?.to_scalar::<f32>()?;
        if !plain.is_finite() {
            anyhow::bail!("diffusion loss became {plain} at step {step}: lower --lr");
        }
        losses.push(plain);
        bar.step(|| format!("loss {:.4}", tail_mean(&losses, 0.02)));
    }

    let text_averaged = [emas[0].weights(&text_weights[0]), emas[1].weights(&text_weights[1])];
    let unet_averaged = emas[2].weights(&unet_weights);
    let eval_loss = evaluate(&unet_config, &unet_averaged, &text_averaged, autoencoder, settings.seed)
        .context("evaluating the averaged weights")?;
    bar.finish(format!(
        "loss {:.4}, held-out loss {:.4} ({:.4} without captions)",
        tail_mean(&losses, 0.05),
        eval_loss.captioned,
        eval_loss.uncaptioned
    ));
    Ok(TrainedDenoiser {
        unet_config,
        unet_weights: unet_averaged,
        text_weights: text_averaged,
        unet_parameters,
        text_parameters,
        losses,
        eval_loss,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Held-out v-prediction MSE of the same noisy latents with and without their captions.
#[derive(Debug, Clone, Copy)]
pub struct HeldOutLoss {
    pub captioned: f32,
    /// With empty captions: the gap to `captioned` is what the text contributes.
    pub uncaptioned: f32,
}

/// Held-out v-prediction MSE: 256 fixed scenes with full captions, 32 timesteps spread evenly, fixed noise. Unlike the
/// training loss it has no sampling noise, so two runs can be compared by it.
pub fn evaluate(
    config: &UNetConfig,
    unet_weights: &BTreeMap<String, Tensor>,
    text_weights: &[BTreeMap<String, Tensor>; 2],
    autoencoder: &TrainedAutoencoder,
    seed: u64,
) -> Result<HeldOutLoss> {
    const SAMPLES: usize = 256;
    const GROUP: usize = 8;
    let unet = UNet::new(frozen_builder(unet_weights), config.clone(), Path::new("unet/config.json"))?;
    let text = TextEncoders::new(frozen_builder(&text_weights[0]), frozen_builder(&text_weights[1]))?;
    let mut rng = NoiseSource::new(seed ^ EVAL_SALT);
    let (images, scenes) = scene_batch(&mut rng, SAMPLES)?;
    let latents =
        sample_latents(&autoencoder.vae, &images, &mut rng)?.affine(autoencoder.config.scaling_factor, 0.0)?;
    let groups = SAMPLES / GROUP;
    let timesteps: Vec<usize> = (0..groups).map(|g| (2 * g + 1) * TRAIN_TIMESTEPS / (2 * groups)).collect();
    let eps = rng.tensor(latents.shape().clone(), DType::F32, &Device::Cpu)?;
    let batch = NoisedBatch { latents: &latents, noise: &eps, timesteps: &timesteps, group: GROUP };
    let alphas = alphas_cumprod();
    let mut captions = Captions::new()?;
    let mut loss = |texts: Vec<String>| -> Result<f32> {
        let (ids, eos) = captions.encode(&texts)?;
        let errors = group_errors(&unet, &batch, &text.encode(&ids, &eos)?, &alphas)?;
        let means = errors.iter().map(|e| e.mean_all()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&means, 0)?.mean_all()?.to_scalar::<f32>()?)
    };
    let captioned = loss(scenes.iter().map(|s| s.caption(CaptionParts { size: true, position: true })).collect())?;
    let uncaptioned = loss(vec![String::new(); SAMPLES])?;
    Ok(HeldOutLoss { captioned, uncaptioned })
}
