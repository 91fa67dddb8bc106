//! Stage 1: the VAE. A small `AutoencoderKL` (32×32 RGB ↔ 8×8×8 latents) learns to reconstruct the shape
//! pictures; a light KL term keeps the latent space smooth enough for diffusion. Afterwards the latents' spread
//! gives `scaling_factor` (1 / std, as Stable Diffusion's VAE was calibrated).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use imago::diffusion::config::VaeConfig;
use imago::diffusion::noise::NoiseSource;
use imago::diffusion::vae::Vae;

use crate::params::{frozen_builder, learning_rate, tail_mean, TrainableWeights};
use crate::progress::Progress;
use crate::scenes::Scene;

/// Image side in pixels.
pub const IMAGE_SIDE: usize = 32;
/// Latent channels: 8 rather than SD's 4, so the 8×8 latents keep enough detail for star points.
pub const LATENT_CHANNELS: usize = 8;
/// Seed offsets, so the evaluation scenes never coincide with training scenes.
const EVAL_SALT: u64 = 0x5eed_e7a1;
const SCALE_SALT: u64 = 0x5ca1_e000;

/// How stage 1 runs.
#[derive(Debug, Clone, Copy)]
pub struct AutoencoderSettings {
    pub steps: usize,
    pub batch: usize,
    pub learning_rate: f64,
    pub kl_weight: f64,
    /// Extra loss weight on shape pixels, which are a fifth of the picture but all of its content.
    pub foreground_weight: f64,
    /// Weight of the edge term (L1 of pixel differences).
    pub edge_weight: f64,
    /// Noise added to the latents the decoder trains on, as a fraction of the latents' spread.
    pub latent_noise: f64,
    pub seed: u64,
}

/// The trained VAE, frozen, with its calibrated config and what the run measured.
pub struct TrainedAutoencoder {
    pub config: VaeConfig,
    pub weights: BTreeMap<String, Tensor>,
    pub vae: Vae,
    /// Reconstruction L1 (in [-1, 1] units) of every training step.
    pub losses: Vec<f32>,
    /// Reconstruction L1 of held-out scenes, decoding the latent means.
    pub eval_l1: f32,
    pub seconds: f64,
}

/// Three encoder levels (factor 4); narrow at full resolution, where convolutions cost the most on a CPU.
pub fn vae_config(scaling_factor: f64) -> VaeConfig {
    VaeConfig {
        in_channels: 3,
        out_channels: 3,
        block_out_channels: vec![8, 16, 64],
        layers_per_block: 1,
        latent_channels: LATENT_CHANNELS,
        // Group norm erases each group's mean and scale, so the absolute colour must survive as differences
        // between the channels of a group: at least 4 channels per group, as in SD's VAE.
        norm_num_groups: 2,
        scaling_factor,
        shift_factor: None,
        force_upcast: false,
        use_quant_conv: true,
        use_post_quant_conv: true,
        mid_block_add_attention: false,
        down_block_types: vec!["DownEncoderBlock2D".into(); 3],
        up_block_types: vec!["UpDecoderBlock2D".into(); 3],
        act_fn: "silu".into(),
        sample_size: IMAGE_SIDE,
    }
}

/// `n` random scenes rendered as a (n, 3, side, side) tensor in [-1, 1].
pub fn scene_batch(rng: &mut NoiseSource, n: usize) -> Result<(Tensor, Vec<Scene>)> {
    let scenes: Vec<Scene> = (0..n).map(|_| Scene::sample(rng)).collect();
    let pixels: Vec<f32> = scenes.iter().flat_map(|s| s.render(IMAGE_SIDE)).collect();
    Ok((Tensor::from_vec(pixels, (n, 3, IMAGE_SIDE, IMAGE_SIDE), &Device::Cpu)?, scenes))
}

/// L1 distance between the horizontal and vertical pixel differences of two image batches: pixel losses alone
/// settle for blurred edges long before they sharpen them.
fn edge_l1(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = a.dims4()?;
    let dx = |t: &Tensor| -> Result<Tensor> { Ok((t.narrow(3, 1, w - 1)? - t.narrow(3, 0, w - 1)?)?) };
    let dy = |t: &Tensor| -> Result<Tensor> { Ok((t.narrow(2, 1, h - 1)? - t.narrow(2, 0, h - 1)?)?) };
    let x = (dx(a)? - dx(b)?)?.abs()?.mean_all()?;
    let y = (dy(a)? - dy(b)?)?.abs()?.mean_all()?;
    Ok((x + y)?)
}

/// Per-pixel loss weights (n, 1, side, side): 1 on the background, 1 + `extra` where the shape covers a pixel.
fn pixel_weights(scenes: &[Scene], extra: f64) -> Result<Tensor> {
    let weights: Vec<f32> =
        scenes.iter().flat_map(|s| s.coverage(IMAGE_SIDE)).map(|c| 1.0 + extra as f32 * c).collect();
    Ok(Tensor::from_vec(weights, (scenes.len(), 1, IMAGE_SIDE, IMAGE_SIDE), &Device::Cpu)?)
}

/// Adds Gaussian noise of `fraction` times the batch's latent spread (measured, not trained through). The UNet's
/// output is never exact: with a KL weight this light, the encoder's own noise is tiny, and a decoder that never
/// saw imprecise latents turns a slightly-off square into a round blob. Relative noise also keeps the encoder from
/// escaping it by growing its latents: shape must be told apart by differences larger than the noise.
fn with_latent_noise(latents: &Tensor, fraction: f64, rng: &mut NoiseSource) -> Result<Tensor> {
    if fraction == 0.0 {
        return Ok(latents.clone());
    }
    let spread = latents.detach().sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt() as f64;
    let noise = rng.tensor(latents.shape().clone(), DType::F32, &Device::Cpu)?;
    Ok((latents + noise.affine(fraction * spread, 0.0)?)?)
}

/// Draws latents from the encoder's distribution (unscaled).
pub fn sample_latents(vae: &Vae, images: &Tensor, rng: &mut NoiseSource) -> Result<Tensor> {
    let dist = vae.encode(images)?;
    let noise = rng.tensor(dist.mean.shape().clone(), DType::F32, &Device::Cpu)?;
    Ok((&dist.mean + (&dist.std * noise)?)?)
}

pub fn train_autoencoder(settings: AutoencoderSettings) -> Result<TrainedAutoencoder> {
    let started = Instant::now();
    let mut bar = Progress::new("vae", settings.steps);
    let origin = Path::new("vae/config.json");
    let weights = TrainableWeights::new(settings.seed ^ 0x7ae, Default::default());
    // Trained unscaled (factor 1); the real factor is measured afterwards and only changes the config.
    let vae = Vae::new(weights.var_builder(), vae_config(1.0), origin)?;
    bar.println(format!("VAE: {} parameters", weights.trainable_count()));
    let mut optimizer = AdamW::new(
        weights.vars(),
        ParamsAdamW { lr: settings.learning_rate, weight_decay: 0.0, ..Default::default() },
    )?;
    let mut data = NoiseSource::new(settings.seed);
    let mut noise = NoiseSource::new(settings.seed ^ 0x401e);
    let mut losses = Vec::with_capacity(settings.steps);
    for step in 0..settings.steps {
        optimizer.set_learning_rate(learning_rate(settings.learning_rate, step, settings.steps, settings.steps / 20));
        let (images, scenes) = scene_batch(&mut data, settings.batch)?;
        let weights = pixel_weights(&scenes, settings.foreground_weight)?;
        let dist = vae.encode(&images)?;
        let eps = noise.tensor(dist.mean.shape().clone(), DType::F32, &Device::Cpu)?;
        let latents = (&dist.mean + (&dist.std * eps)?)?;
        let latents = with_latent_noise(&latents, settings.latent_noise, &mut noise)?;
        let reconstruction = vae.decode(&latents)?;
        let edges = edge_l1(&reconstruction, &images)?;
        let error = (reconstruction - &images)?.abs()?;
        let l1 = error.mean_all()?;
        let weighted = (error.broadcast_mul(&weights)?.mean_all()? / (1.0 + settings.foreground_weight / 5.0))?;
        let weighted = (weighted + edges.affine(settings.edge_weight, 0.0)?)?;
        // KL(q(z|x) ‖ N(0, 1)) per latent element: (μ² + σ² − 1 − ln σ²) / 2.
        let variance = dist.std.sqr()?;
        let kl = ((dist.mean.sqr()? + &variance)? - 1.0)?.sub(&variance.log()?)?.mean_all()?.affine(0.5, 0.0)?;
        let loss = (weighted + kl.affine(settings.kl_weight, 0.0)?)?;
        optimizer.backward_step(&loss)?;
        let value = l1.to_scalar::<f32>()?;
        if !value.is_finite() {
            anyhow::bail!("VAE loss became {value} at step {step}: lower --vae-lr");
        }
        losses.push(value);
        bar.step(|| format!("L1 {:.4}", tail_mean(&losses, 0.02)));
    }

    // Calibrate: the scaled latents the UNet sees should have unit variance.
    let trained = weights.snapshot();
    let unscaled = Vae::new(frozen_builder(&trained), vae_config(1.0), origin)?;
    let mut scale_rng = NoiseSource::new(settings.seed ^ SCALE_SALT);
    let mut values = Vec::new();
    for _ in 0..8 {
        let (images, _) = scene_batch(&mut scale_rng, 128)?;
        values.extend(sample_latents(&unscaled, &images, &mut scale_rng)?.flatten_all()?.to_vec1::<f32>()?);
    }
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
    let variance = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / values.len() as f64;
    // Rounded to 5 digits, as published configs are (0.18215), so the JSON reads cleanly.
    let scaling_factor = (1e5 / variance.sqrt()).round() / 1e5;

    let eval_l1 = held_out_l1(&unscaled, settings.seed)?;

    let config = vae_config(scaling_factor);
    let vae = Vae::new(frozen_builder(&trained), config.clone(), origin)?;
    bar.finish(format!(
        "L1 {:.4}, held-out L1 {eval_l1:.4}, scaling_factor {scaling_factor}",
        tail_mean(&losses, 0.05)
    ));
    Ok(TrainedAutoencoder { config, weights: trained, vae, losses, eval_l1, seconds: started.elapsed().as_secs_f64() })
}

/// Reconstruction L1 of 256 held-out scenes, decoding the latent means.
fn held_out_l1(vae: &Vae, seed: u64) -> Result<f32> {
    let mut rng = NoiseSource::new(seed ^ EVAL_SALT);
    let (images, _) = scene_batch(&mut rng, 256)?;
    let means = vae.scale_latents(&vae.encode(&images)?.mean)?;
    Ok((vae.decode(&means)? - &images)?.abs()?.mean_all()?.to_scalar::<f32>()?)
}

/// A VAE trained by an earlier run, read from its model folder (stage 1 skipped: `--vae-from`).
pub fn load_autoencoder(folder: &Path, seed: u64) -> Result<TrainedAutoencoder> {
    let config_path = folder.join("vae/config.json");
    let config = VaeConfig::from_file(&config_path)?;
    let weights_path = folder.join("vae/diffusion_pytorch_model.fp16.safetensors");
    let weights = candle_core::safetensors::load(&weights_path, &Device::Cpu)
        .with_context(|| format!("reading {}", weights_path.display()))?
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect::<Result<BTreeMap<String, Tensor>>>()?;
    let vae = Vae::new(frozen_builder(&weights), config.clone(), &config_path)?;
    let eval_l1 = held_out_l1(&vae, seed)?;
    Ok(TrainedAutoencoder { config, weights, vae, losses: Vec::new(), eval_l1, seconds: 0.0 })
}
