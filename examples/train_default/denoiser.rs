//! Stage 2: the text encoder and UNet, trained jointly on the frozen VAE's latents with Stable Diffusion's
//! objective: DDPM noise (scaled-linear betas 0.00085–0.012 over 1000 steps), epsilon prediction, and 10% empty
//! captions so classifier-free guidance works.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use imago::diffusion::clip::ClipTextModel;
use imago::diffusion::config::{ClipActivation, ClipTextConfig, PerBlock, UNetConfig};
use imago::diffusion::noise::NoiseSource;
use imago::diffusion::tokenizer::ClipTokenizer;
use imago::diffusion::unet::UNet;
use indicatif::ProgressBar;

use crate::autoencoder::{sample_latents, scene_batch, TrainedAutoencoder, IMAGE_SIDE};
use crate::params::{frozen_builder, learning_rate, tail_mean, Ema, TrainableWeights};
use crate::scenes::{CaptionParts, Position, Scene, Shape, Size, BACKGROUNDS, SHAPE_COLOURS};

/// `<|endoftext|>`: end of prompt and, as in SD 1.x, the padding token.
pub const END_OF_TEXT: u32 = 49407;
const START_OF_TEXT: u32 = 49406;
const TOKEN_EMBEDDING: &str = "text_model.embeddings.token_embedding.weight";
const TRAIN_TIMESTEPS: usize = 1000;
const EVAL_SALT: u64 = 0xe7a1_0002;

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
    /// Min-SNR-γ loss weighting (Hang et al. 2023): nearly noise-free timesteps stop dominating the gradient.
    pub min_snr_gamma: f64,
    pub seed: u64,
}

/// The trained (averaged) weights and what the run measured.
pub struct TrainedDenoiser {
    pub unet_config: UNetConfig,
    pub text_config: ClipTextConfig,
    pub unet_weights: BTreeMap<String, Tensor>,
    pub text_weights: BTreeMap<String, Tensor>,
    pub unet_parameters: usize,
    pub text_parameters: usize,
    /// Unweighted epsilon MSE of every step.
    pub losses: Vec<f32>,
    /// Epsilon MSE of the averaged weights on held-out scenes, fixed timesteps and noise.
    pub eval_loss: f32,
    pub seconds: f64,
}

/// CLIP's vocabulary size is kept (the tokenizer is CLIP's); only our words get non-zero rows.
pub fn text_config() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        hidden_size: 32,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 77,
        hidden_act: ClipActivation::QuickGelu,
        layer_norm_eps: 1e-5,
        projection_dim: None,
        architectures: vec!["CLIPTextModel".into()],
        eos_token_id: END_OF_TEXT,
    }
}

/// Two levels (8×8 and 4×4 latents); text cross-attention at 4×4 and in the middle block, where it is cheap.
pub fn unet_config() -> UNetConfig {
    let names = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    UNetConfig {
        in_channels: 4,
        out_channels: 4,
        block_out_channels: vec![32, 64],
        down_block_types: names(&["DownBlock2D", "CrossAttnDownBlock2D"]),
        up_block_types: names(&["CrossAttnUpBlock2D", "UpBlock2D"]),
        layers_per_block: 1,
        attention_head_dim: Some(PerBlock::All(4)),
        num_attention_heads: None,
        cross_attention_dim: 32,
        transformer_layers_per_block: PerBlock::All(1),
        norm_num_groups: 8,
        norm_eps: 1e-5,
        flip_sin_to_cos: true,
        freq_shift: 0,
        downsample_padding: 1,
        use_linear_projection: true,
        upcast_attention: false,
        sample_size: IMAGE_SIDE / 4,
        addition_embed_type: None,
        addition_time_embed_dim: None,
        projection_class_embeddings_input_dim: None,
        center_input_sample: false,
        act_fn: "silu".into(),
        mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
    }
}

/// Every token id our captions can produce, plus BOS and EOS.
pub fn caption_token_ids(tokenizer: &ClipTokenizer) -> Result<BTreeSet<u32>> {
    let mut words: Vec<&str> = vec!["a", "on", "background"];
    words.extend(SHAPE_COLOURS.iter().map(|c| c.0));
    words.extend(BACKGROUNDS.iter().map(|c| c.0));
    words.extend(Shape::ALL.iter().map(|s| s.word()));
    words.extend(Size::ALL.iter().map(|s| s.word()));
    words.extend(Position::ALL.iter().map(|p| p.phrase()));
    let mut ids = BTreeSet::from([START_OF_TEXT, END_OF_TEXT]);
    for word in words {
        ids.extend(tokenizer.encode(word, END_OF_TEXT)?.ids);
    }
    Ok(ids)
}

/// Fixed token embeddings: seeded unit-normal rows for our tokens, zeros for the rest of CLIP's vocabulary. The
/// transformer learns to read them; words the model never saw all map to the same neutral zero vector, and the
/// mostly-zero table compresses to almost nothing in git.
fn token_embedding(tokenizer: &ClipTokenizer, config: &ClipTextConfig, seed: u64) -> Result<Tensor> {
    let width = config.hidden_size;
    let mut table = vec![0f32; config.vocab_size * width];
    for id in caption_token_ids(tokenizer)? {
        let mut rng = NoiseSource::new(seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let row = &mut table[id as usize * width..(id as usize + 1) * width];
        row.iter_mut().for_each(|v| *v = rng.next_normal());
    }
    Ok(Tensor::from_vec(table, (config.vocab_size, width), &Device::Cpu)?)
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

/// Token ids of captions, cached (the grammar has a few thousand distinct captions).
struct Captions {
    tokenizer: ClipTokenizer,
    cache: HashMap<String, (Vec<u32>, usize)>,
}

impl Captions {
    /// (batch, 77) ids and each row's EOS position.
    fn encode(&mut self, captions: &[String]) -> Result<(Tensor, Vec<usize>)> {
        let mut ids = Vec::new();
        let mut eos = Vec::new();
        for caption in captions {
            if !self.cache.contains_key(caption) {
                let t = self.tokenizer.encode(caption, END_OF_TEXT)?;
                self.cache.insert(caption.clone(), (t.ids, t.eos_position));
            }
            let (row, position) = &self.cache[caption];
            ids.extend_from_slice(row);
            eos.push(*position);
        }
        let len = ids.len() / captions.len().max(1);
        Ok((Tensor::from_vec(ids, (captions.len(), len), &Device::Cpu)?, eos))
    }
}

/// Caption of a training scene: each optional part spelled half the time, or empty with `dropout` probability.
fn training_caption(scene: &Scene, rng: &mut NoiseSource, dropout: f64) -> String {
    if (rng.next_uniform() as f64) < dropout {
        return String::new();
    }
    let parts = CaptionParts { size: rng.next_uniform() < 0.5, position: rng.next_uniform() < 0.5 };
    scene.caption(parts)
}

/// Epsilon MSE per group of `group` rows, each group at its own timestep.
#[allow(clippy::too_many_arguments)]
fn group_losses(
    unet: &UNet,
    latents: &Tensor,
    context: &Tensor,
    timesteps: &[usize],
    noise: &Tensor,
    group: usize,
    alphas: &[f64],
) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(timesteps.len());
    for (g, &t) in timesteps.iter().enumerate() {
        let x0 = latents.narrow(0, g * group, group)?;
        let eps = noise.narrow(0, g * group, group)?;
        let noisy = (x0.affine(alphas[t].sqrt(), 0.0)? + eps.affine((1.0 - alphas[t]).sqrt(), 0.0)?)?;
        let prediction = unet.forward(&noisy, t as f64, &context.narrow(0, g * group, group)?, None)?;
        out.push((prediction - eps)?.sqr()?.mean_all()?);
    }
    Ok(out)
}

pub fn train_denoiser(
    settings: DenoiserSettings,
    autoencoder: &TrainedAutoencoder,
    bar: &ProgressBar,
) -> Result<TrainedDenoiser> {
    let started = Instant::now();
    if settings.group == 0 || settings.batch % settings.group != 0 {
        anyhow::bail!("--batch {} is not a multiple of --group {}", settings.batch, settings.group);
    }
    let tokenizer = ClipTokenizer::embedded()?;
    let text_config = text_config();
    let frozen =
        HashMap::from([(TOKEN_EMBEDDING.to_string(), token_embedding(&tokenizer, &text_config, settings.seed)?)]);
    let text_weights = TrainableWeights::new(settings.seed ^ 0x7e47, frozen);
    let text = ClipTextModel::new(text_weights.var_builder(), text_config.clone(), Path::new("text_encoder"))?;
    let unet_weights = TrainableWeights::new(settings.seed ^ 0x0e7, Default::default());
    let unet = UNet::new(unet_weights.var_builder(), unet_config(), Path::new("unet/config.json"))?;
    let (text_parameters, unet_parameters) = (text_weights.trainable_count(), unet_weights.trainable_count());
    bar.println(format!("text encoder: {text_parameters} trainable parameters; UNet: {unet_parameters}"));

    let mut vars = text_weights.vars();
    vars.extend(unet_weights.vars());
    let mut optimizer =
        AdamW::new(vars, ParamsAdamW { lr: settings.learning_rate, weight_decay: 0.01, ..Default::default() })?;
    let mut text_ema = Ema::new(&text_weights, settings.ema_decay);
    let mut unet_ema = Ema::new(&unet_weights, settings.ema_decay);
    let alphas = alphas_cumprod();
    let mut captions = Captions { tokenizer, cache: HashMap::new() };
    let mut data = NoiseSource::new(settings.seed ^ 0xda7a);
    let mut noise = NoiseSource::new(settings.seed ^ 0x401e);
    let groups = settings.batch / settings.group;
    let scale = autoencoder.config.scaling_factor;
    let mut losses = Vec::with_capacity(settings.steps);
    bar.set_length(settings.steps as u64);

    for step in 0..settings.steps {
        optimizer.set_learning_rate(learning_rate(settings.learning_rate, step, settings.steps, settings.steps / 25));
        let (images, scenes) = scene_batch(&mut data, settings.batch)?;
        let latents = sample_latents(&autoencoder.vae, &images, &mut noise)?.affine(scale, 0.0)?;
        let texts: Vec<String> =
            scenes.iter().map(|s| training_caption(s, &mut data, settings.caption_dropout)).collect();
        let (ids, eos) = captions.encode(&texts)?;
        let context = text.forward(&ids, &eos)?.last_hidden;
        // Stratified timesteps: one per equal slice of [0, 1000), so every batch spans the whole schedule.
        let timesteps: Vec<usize> = (0..groups)
            .map(|g| (((g as f32 + data.next_uniform()) / groups as f32 * TRAIN_TIMESTEPS as f32) as usize).min(999))
            .collect();
        let eps = noise.tensor(latents.shape().clone(), DType::F32, &Device::Cpu)?;
        let per_group = group_losses(&unet, &latents, &context, &timesteps, &eps, settings.group, &alphas)?;
        let mut weighted = Vec::with_capacity(groups);
        for (mse, &t) in per_group.iter().zip(&timesteps) {
            let snr = alphas[t] / (1.0 - alphas[t]);
            weighted.push(mse.affine(snr.min(settings.min_snr_gamma) / snr / groups as f64, 0.0)?);
        }
        let loss = Tensor::stack(&weighted, 0)?.sum_all()?;
        optimizer.backward_step(&loss)?;
        text_ema.update()?;
        unet_ema.update()?;
        let plain = Tensor::stack(&per_group, 0)?.mean_all()?.to_scalar::<f32>()?;
        if !plain.is_finite() {
            anyhow::bail!("diffusion loss became {plain} at step {step}: lower --lr");
        }
        losses.push(plain);
        bar.set_message(format!("loss {:.4}", tail_mean(&losses, 0.02)));
        bar.inc(1);
    }

    let unet_weights_avg = unet_ema.weights(&unet_weights);
    let text_weights_avg = text_ema.weights(&text_weights);
    let eval_loss = evaluate(&unet_weights_avg, &text_weights_avg, autoencoder, settings.seed)
        .context("evaluating the averaged weights")?;
    bar.finish_with_message(format!("loss {:.4}, held-out loss {eval_loss:.4}", tail_mean(&losses, 0.05)));
    Ok(TrainedDenoiser {
        unet_config: unet_config(),
        text_config,
        unet_weights: unet_weights_avg,
        text_weights: text_weights_avg,
        unet_parameters,
        text_parameters,
        losses,
        eval_loss,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Held-out epsilon MSE: 256 fixed scenes with full captions, 32 timesteps spread evenly, fixed noise. Unlike the
/// training loss it has no sampling noise, so two runs can be compared by it.
pub fn evaluate(
    unet_weights: &BTreeMap<String, Tensor>,
    text_weights: &BTreeMap<String, Tensor>,
    autoencoder: &TrainedAutoencoder,
    seed: u64,
) -> Result<f32> {
    const SAMPLES: usize = 256;
    const GROUP: usize = 8;
    let unet = UNet::new(frozen_builder(unet_weights), unet_config(), Path::new("unet/config.json"))?;
    let text = ClipTextModel::new(frozen_builder(text_weights), text_config(), Path::new("text_encoder"))?;
    let mut rng = NoiseSource::new(seed ^ EVAL_SALT);
    let (images, scenes) = scene_batch(&mut rng, SAMPLES)?;
    let latents =
        sample_latents(&autoencoder.vae, &images, &mut rng)?.affine(autoencoder.config.scaling_factor, 0.0)?;
    let texts: Vec<String> = scenes.iter().map(|s| s.caption(CaptionParts { size: true, position: true })).collect();
    let mut captions = Captions { tokenizer: ClipTokenizer::embedded()?, cache: HashMap::new() };
    let (ids, eos) = captions.encode(&texts)?;
    let context = text.forward(&ids, &eos)?.last_hidden;
    let groups = SAMPLES / GROUP;
    let timesteps: Vec<usize> = (0..groups).map(|g| (2 * g + 1) * TRAIN_TIMESTEPS / (2 * groups)).collect();
    let eps = rng.tensor(latents.shape().clone(), DType::F32, &Device::Cpu)?;
    let losses = group_losses(&unet, &latents, &context, &timesteps, &eps, GROUP, &alphas_cumprod())?;
    Ok(Tensor::stack(&losses, 0)?.mean_all()?.to_scalar::<f32>()?)
}
