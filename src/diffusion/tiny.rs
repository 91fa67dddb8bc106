//! Miniature model folders: the exact diffusers layout, config keys and tensor names of a real family, with a few
//! MB of seeded random weights. Every test, example and parity check runs on these, since no real weights can be
//! downloaded where they run.
//!
//! Weights are produced by building our own model structs against a recording [`SimpleBackend`], so the tensor tree
//! written is exactly the tree the loader reads; the parity script then loads the same folder with diffusers, which
//! proves it is also diffusers' tree. Each tensor's values depend only on the seed and the tensor's name.
//!
//! [`write_model`] with [`ModelScale::FullSize`] writes a family's published architecture the same way (gigabytes),
//! for measuring speed and memory where real weights cannot be downloaded.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use serde_json::{json, Value};

use super::clip::ClipTextModel;
use super::config::{ClipActivation, ClipTextConfig, PerBlock, UNetConfig, VaeConfig};
use super::full_size;
use super::model::ModelDefaults;
use super::noise::NoiseSource;
use super::tokenizer::ClipTokenizer;
use super::unet::UNet;
use super::vae::Vae;
use super::{Error, Result};

/// The families a miniature can imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyFamily {
    Sd15,
    Sd21,
    SdTurbo,
    Sdxl,
    SdxlTurbo,
    /// SD 1.5 inpainting: a 9-channel UNet (latents + mask + masked-image latents).
    Sd15Inpaint,
    /// SDXL inpainting, 9 channels.
    SdxlInpaint,
}

impl TinyFamily {
    pub const ALL: [TinyFamily; 7] = [
        TinyFamily::Sd15,
        TinyFamily::Sd21,
        TinyFamily::SdTurbo,
        TinyFamily::Sdxl,
        TinyFamily::SdxlTurbo,
        TinyFamily::Sd15Inpaint,
        TinyFamily::SdxlInpaint,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TinyFamily::Sd15 => "sd15",
            TinyFamily::Sd21 => "sd21",
            TinyFamily::SdTurbo => "sd-turbo",
            TinyFamily::Sdxl => "sdxl",
            TinyFamily::SdxlTurbo => "sdxl-turbo",
            TinyFamily::Sd15Inpaint => "sd15-inpaint",
            TinyFamily::SdxlInpaint => "sdxl-inpaint",
        }
    }

    fn is_xl(self) -> bool {
        matches!(self, TinyFamily::Sdxl | TinyFamily::SdxlTurbo | TinyFamily::SdxlInpaint)
    }

    pub fn is_inpaint(self) -> bool {
        matches!(self, TinyFamily::Sd15Inpaint | TinyFamily::SdxlInpaint)
    }

    /// SD 2.x and SDXL use OpenCLIP encoders (GELU, "!" padding, linear projections in the UNet).
    fn is_open_clip(self) -> bool {
        !matches!(self, TinyFamily::Sd15 | TinyFamily::Sd15Inpaint)
    }
}

impl fmt::Display for TinyFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TinyFamily {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TinyFamily::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let known: Vec<&str> = TinyFamily::ALL.iter().map(|f| f.name()).collect();
            Error::InvalidRequest(format!("unknown family {s:?} (known: {})", known.join(", ")))
        })
    }
}

/// How large a written model is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ModelScale {
    /// A few MB (channel widths of 32 and 64): tests, examples and parity checks.
    #[default]
    Miniature,
    /// The family's published architecture with random weights: SD 1.5 is 4.3 GB of f32, SDXL 14 GB.
    FullSize,
}

/// Options of [`write_tiny_model`] and [`write_model`].
#[derive(Debug, Clone, Copy)]
pub struct TinyOptions {
    pub family: TinyFamily,
    pub seed: u64,
    /// Also write `*.fp16.safetensors` next to the f32 weights.
    pub fp16_variant: bool,
}

/// Records every tensor a model constructor asks for; [`RecordingBackend::save`] creates each from the seed and its
/// name. Constructors only check shapes, so they get a zero-strided stand-in and nothing large is allocated twice.
#[derive(Clone, Default)]
struct RecordingBackend {
    seed: u64,
    tensors: Arc<Mutex<BTreeMap<String, (Shape, Init)>>>,
}

/// FNV-1a: a stable hash, so a tensor's values never change with the standard library's hasher.
fn stable_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl RecordingBackend {
    fn sample(&self, shape: &Shape, name: &str, init: Init) -> Vec<f32> {
        let mut rng = NoiseSource::new(self.seed ^ stable_hash(name));
        let n = shape.elem_count();
        let mut uniform = |lo: f64, up: f64| -> Vec<f32> {
            (0..n).map(|_| (lo + (up - lo) * rng.next_uniform() as f64) as f32).collect()
        };
        match init {
            // Norm weights (1) and biases (0) are perturbed so that a swapped or missing tensor changes outputs.
            Init::Const(c) => {
                let mut rng = NoiseSource::new(self.seed ^ stable_hash(name));
                (0..n).map(|_| c as f32 + 0.1 * rng.next_normal()).collect()
            }
            Init::Randn { mean, stdev } => {
                let mut rng = NoiseSource::new(self.seed ^ stable_hash(name));
                (0..n).map(|_| (mean + stdev * rng.next_normal() as f64) as f32).collect()
            }
            Init::Uniform { lo, up } => uniform(lo, up),
            Init::Kaiming { dist, fan, non_linearity } => {
                let fan = fan.for_shape(shape).max(1) as f64;
                let std = non_linearity.gain() / fan.sqrt();
                match dist {
                    NormalOrUniform::Uniform => uniform(-(3f64.sqrt()) * std, 3f64.sqrt() * std),
                    NormalOrUniform::Normal => {
                        let mut rng = NoiseSource::new(self.seed ^ stable_hash(name));
                        (0..n).map(|_| (std * rng.next_normal() as f64) as f32).collect()
                    }
                }
            }
        }
    }
}

impl SimpleBackend for RecordingBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut tensors = self.tensors.lock().map_err(|_| candle_core::Error::Msg("recorder poisoned".into()))?;
        let (shape, _) = tensors.entry(name.to_string()).or_insert((s, h));
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape.clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!("recording backend cannot create {name} without a shape")))
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

impl RecordingBackend {
    fn new(seed: u64) -> Self {
        Self { seed, tensors: Default::default() }
    }

    fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, Device::Cpu)
    }

    /// Creates every recorded tensor, spread over all cores (a full-size UNet is about a billion samples).
    fn create_all(&self) -> Result<HashMap<String, Tensor>> {
        let specs: Vec<(String, Shape, Init)> = self
            .tensors
            .lock()
            .map_err(|_| Error::InvalidRequest("recorder poisoned".into()))?
            .iter()
            .map(|(name, (shape, init))| (name.clone(), shape.clone(), *init))
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(specs.len().max(1));
        let worker = || -> Result<Vec<(String, Tensor)>> {
            let mut made = Vec::new();
            while let Some((name, shape, init)) = specs.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                let values = self.sample(shape, name, *init);
                made.push((name.clone(), Tensor::from_vec(values, shape.clone(), &Device::Cpu)?));
            }
            Ok(made)
        };
        let parts: Vec<Result<Vec<(String, Tensor)>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads).map(|_| scope.spawn(worker)).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| Err(Error::InvalidRequest("weight sampling thread failed".into())))
                })
                .collect()
        });
        let mut tensors = HashMap::with_capacity(specs.len());
        for part in parts {
            tensors.extend(part?);
        }
        Ok(tensors)
    }

    fn save(&self, dir: &Path, stem: &str, fp16_variant: bool) -> Result<()> {
        let tensors = self.create_all()?;
        let path = dir.join(format!("{stem}.safetensors"));
        candle_core::safetensors::save(&tensors, &path).map_err(|e| Error::Weights { path, message: e.to_string() })?;
        if fp16_variant {
            let half = tensors
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F16)?)))
                .collect::<Result<HashMap<_, _>>>()?;
            let path = dir.join(format!("{stem}.fp16.safetensors"));
            candle_core::safetensors::save(&half, &path)
                .map_err(|e| Error::Weights { path, message: e.to_string() })?;
        }
        Ok(())
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::config(path, e))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// `serde_json::to_value` of a config plus diffusers' bookkeeping keys.
fn with_keys<T: serde::Serialize>(config: &T, extra: Value) -> Result<Value> {
    let mut value = serde_json::to_value(config).map_err(|e| Error::InvalidRequest(e.to_string()))?;
    if let (Value::Object(map), Value::Object(extra)) = (&mut value, extra) {
        map.extend(extra);
    }
    Ok(value)
}

const TEXT_HIDDEN: usize = 32;

fn clip_config(family: TinyFamily, with_projection: bool) -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        hidden_size: TEXT_HIDDEN,
        intermediate_size: 64,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        max_position_embeddings: 77,
        hidden_act: if family.is_open_clip() { ClipActivation::Gelu } else { ClipActivation::QuickGelu },
        layer_norm_eps: 1e-5,
        projection_dim: with_projection.then_some(TEXT_HIDDEN),
        architectures: vec![if with_projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }.to_string()],
        eos_token_id: 49407,
    }
}

/// The text encoders of a miniature, in folder order (SDXL's second one has the pooled projection).
fn clip_configs(family: TinyFamily) -> Vec<ClipTextConfig> {
    let mut configs = vec![clip_config(family, false)];
    if family.is_xl() {
        configs.push(clip_config(family, true));
    }
    configs
}

fn unet_config(family: TinyFamily) -> UNetConfig {
    let xl = family.is_xl();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    UNetConfig {
        in_channels: if family.is_inpaint() { 9 } else { 4 },
        out_channels: 4,
        block_out_channels: vec![32, 64],
        down_block_types: if xl {
            s(&["DownBlock2D", "CrossAttnDownBlock2D"])
        } else {
            s(&["CrossAttnDownBlock2D", "DownBlock2D"])
        },
        up_block_types: if xl {
            s(&["CrossAttnUpBlock2D", "UpBlock2D"])
        } else {
            s(&["UpBlock2D", "CrossAttnUpBlock2D"])
        },
        layers_per_block: 2,
        attention_head_dim: Some(if family.is_open_clip() { PerBlock::Each(vec![2, 4]) } else { PerBlock::All(4) }),
        num_attention_heads: None,
        cross_attention_dim: if xl { 2 * TEXT_HIDDEN } else { TEXT_HIDDEN },
        transformer_layers_per_block: if xl { PerBlock::Each(vec![1, 2]) } else { PerBlock::All(1) },
        norm_num_groups: 8,
        norm_eps: 1e-5,
        flip_sin_to_cos: true,
        freq_shift: 0,
        downsample_padding: 1,
        use_linear_projection: family.is_open_clip(),
        upcast_attention: family == TinyFamily::Sd21,
        sample_size: 8,
        addition_embed_type: xl.then(|| "text_time".to_string()),
        addition_time_embed_dim: xl.then_some(8),
        projection_class_embeddings_input_dim: xl.then_some(TEXT_HIDDEN + 6 * 8),
        center_input_sample: false,
        act_fn: "silu".into(),
        mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
    }
}

fn vae_config(family: TinyFamily) -> VaeConfig {
    VaeConfig {
        in_channels: 3,
        out_channels: 3,
        block_out_channels: vec![16, 16, 32, 32],
        layers_per_block: 1,
        latent_channels: 4,
        norm_num_groups: 8,
        scaling_factor: if family.is_xl() { 0.13025 } else { 0.18215 },
        shift_factor: None,
        force_upcast: family.is_xl(),
        use_quant_conv: true,
        use_post_quant_conv: true,
        mid_block_add_attention: true,
        down_block_types: vec!["DownEncoderBlock2D".into(); 4],
        up_block_types: vec!["UpDecoderBlock2D".into(); 4],
        act_fn: "silu".into(),
        sample_size: 64,
    }
}

/// The published scheduler config of each family (betas, spacing, prediction type).
fn scheduler_config(family: TinyFamily) -> Value {
    let common = json!({
        "_diffusers_version": "0.42.1", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "steps_offset": 1, "trained_betas": null, "clip_sample": false,
        "set_alpha_to_one": false
    });
    let specific = match family {
        TinyFamily::Sd15 | TinyFamily::Sd15Inpaint => {
            json!({"_class_name": "PNDMScheduler", "skip_prk_steps": true, "prediction_type": "epsilon"})
        }
        TinyFamily::Sd21 => json!({"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}),
        TinyFamily::SdTurbo => json!({"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon",
            "timestep_spacing": "trailing", "interpolation_type": "linear", "use_karras_sigmas": false}),
        TinyFamily::Sdxl | TinyFamily::SdxlInpaint => {
            json!({"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon",
            "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": false})
        }
        TinyFamily::SdxlTurbo => json!({"_class_name": "EulerAncestralDiscreteScheduler",
            "prediction_type": "epsilon", "timestep_spacing": "trailing"}),
    };
    let mut merged = common;
    if let (Value::Object(m), Value::Object(s)) = (&mut merged, specific) {
        m.extend(s);
    }
    merged
}

fn defaults(family: TinyFamily, scale: ModelScale) -> ModelDefaults {
    let turbo = matches!(family, TinyFamily::SdTurbo | TinyFamily::SdxlTurbo);
    match scale {
        ModelScale::Miniature => ModelDefaults {
            steps: Some(if turbo { 1 } else { 4 }),
            guidance: Some(if turbo { 0.0 } else { 7.5 }),
            width: Some(64),
            height: Some(64),
            scheduler: None,
            family: Some(format!("tiny-{family}")),
        },
        // The native size follows from the UNet's sample size, as for the published folders.
        ModelScale::FullSize => ModelDefaults {
            steps: Some(if turbo { 1 } else { 30 }),
            guidance: Some(if turbo { 0.0 } else { 7.5 }),
            family: Some(format!("random-{family}")),
            ..ModelDefaults::default()
        },
    }
}

fn write_tokenizer(dir: &Path, pad_token: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tokenizer = ClipTokenizer::embedded()?;
    let write =
        |name: &str, text: String| std::fs::write(dir.join(name), text).map_err(|e| Error::io(dir.join(name), e));
    write("vocab.json", tokenizer.vocab_json()?)?;
    write("merges.txt", tokenizer.merges_txt()?)?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &json!({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
                "unk_token": "<|endoftext|>"}),
    )?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": true,
                "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
                "unk_token": "<|endoftext|>"}),
    )
}

fn write_text_encoder(dir: &Path, config: ClipTextConfig, options: &TinyOptions, salt: u64) -> Result<()> {
    let recorder = RecordingBackend::new(options.seed ^ salt);
    let value = with_keys(
        &config,
        json!({"model_type": "clip_text_model", "bos_token_id": 49406, "pad_token_id": 1,
        "torch_dtype": "float32", "initializer_range": 0.02, "initializer_factor": 1.0, "attention_dropout": 0.0}),
    )?;
    let path = dir.join("config.json");
    write_json(&path, &value)?;
    ClipTextModel::new(recorder.var_builder(), config, &path)?;
    recorder.save(dir, "model", options.fp16_variant)
}

/// Writes a complete miniature diffusers folder for `options.family` into `out`.
pub fn write_tiny_model(out: &Path, options: TinyOptions) -> Result<()> {
    write_model(out, options, ModelScale::Miniature)
}

/// Writes a complete diffusers folder for `options.family` at `scale` into `out`.
pub fn write_model(out: &Path, options: TinyOptions, scale: ModelScale) -> Result<()> {
    let family = options.family;
    let full_size = scale == ModelScale::FullSize;
    // 1. model_index.json
    let mut index = json!({
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", scheduler_config(family)["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    if family.is_xl() {
        let class = if family.is_inpaint() { "StableDiffusionXLInpaintPipeline" } else { "StableDiffusionXLPipeline" };
        index["_class_name"] = json!(class);
        index["requires_aesthetics_score"] = json!(false);
        index["text_encoder_2"] = json!(["transformers", "CLIPTextModelWithProjection"]);
        index["tokenizer_2"] = json!(["transformers", "CLIPTokenizer"]);
        index["force_zeros_for_empty_prompt"] = json!(true);
        index["feature_extractor"] = json!([null, null]);
        index["image_encoder"] = json!([null, null]);
    } else {
        let class = if family.is_inpaint() { "StableDiffusionInpaintPipeline" } else { "StableDiffusionPipeline" };
        index["_class_name"] = json!(class);
        index["safety_checker"] = json!([null, null]);
        index["feature_extractor"] = json!([null, null]);
        index["image_encoder"] = json!([null, null]);
        index["requires_safety_checker"] = json!(false);
    }
    write_json(&out.join("model_index.json"), &index)?;
    write_json(&out.join("scheduler/scheduler_config.json"), &scheduler_config(family))?;
    write_json(
        &out.join("imago.json"),
        &serde_json::to_value(defaults(family, scale)).map_err(|e| Error::config(out, e))?,
    )?;

    // 2. tokenizers and text encoders
    let first_pad = if family.is_open_clip() && !family.is_xl() { "!" } else { "<|endoftext|>" };
    write_tokenizer(&out.join("tokenizer"), first_pad)?;
    let encoders = if full_size { full_size::text_encoder_configs(family) } else { clip_configs(family) };
    for (config, number) in encoders.into_iter().zip(1u64..) {
        let suffix = if number == 1 { String::new() } else { format!("_{number}") };
        if number > 1 {
            write_tokenizer(&out.join(format!("tokenizer{suffix}")), "!")?;
        }
        write_text_encoder(&out.join(format!("text_encoder{suffix}")), config, &options, number)?;
    }

    // 3. UNet and VAE
    let unet_config = if full_size { full_size::unet_config(family) } else { unet_config(family) };
    let unet_dir = out.join("unet");
    let path = unet_dir.join("config.json");
    write_json(
        &path,
        &with_keys(&unet_config, json!({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1"}))?,
    )?;
    let recorder = RecordingBackend::new(options.seed ^ 3);
    UNet::new(recorder.var_builder(), unet_config, &path)?;
    recorder.save(&unet_dir, "diffusion_pytorch_model", options.fp16_variant)?;

    let vae_config = if full_size { full_size::vae_config(family) } else { vae_config(family) };
    let vae_dir = out.join("vae");
    let path = vae_dir.join("config.json");
    write_json(
        &path,
        &with_keys(&vae_config, json!({"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1"}))?,
    )?;
    let recorder = RecordingBackend::new(options.seed ^ 4);
    Vae::new(recorder.var_builder(), vae_config, &path)?;
    recorder.save(&vae_dir, "diffusion_pytorch_model", options.fp16_variant)
}
