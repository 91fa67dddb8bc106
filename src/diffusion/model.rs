//! A whole diffusers model folder loaded for inference: tokenizer(s), text encoder(s), UNet, VAE and the
//! scheduler config, plus what the folder implies about conditioning (SD 1/2 vs SDXL) and defaults.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::clip::ClipTextModel;
use super::compute_pool::on_compute_pool;
use super::config::{read_json, ClipTextConfig, ModelIndex, UNetConfig, VaeConfig};
use super::schedulers::{SchedulerConfig, SchedulerKind};
use super::tokenizer::{ClipTokenizer, TokenizedPrompt};
use super::unet::UNet;
use super::vae::Vae;
use super::weights::{find_weights, mmap_var_builder, LoadedBytes, Variant};
use super::{Error, Result};

/// How the UNet is conditioned on text, which decides how prompts are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Architecture {
    /// SD 1.x / 2.x (and SD-Turbo): one CLIP encoder, its final hidden states.
    StableDiffusion,
    /// SDXL (and SDXL-Turbo): two encoders' penultimate states concatenated, plus pooled text and size/crop ids.
    StableDiffusionXl,
}

/// Defaults a model folder may declare in an optional `imago.json` (our miniatures and the embedded model do);
/// absent values fall back to what the configs imply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelDefaults {
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub scheduler: Option<String>,
    /// Human-readable family, e.g. "sd-turbo".
    pub family: Option<String>,
}

/// Where to run a model and in which precision.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Precision of the UNet and text encoders (f32 on CPU; f16 on CUDA). The VAE runs in f32 when its config asks
    /// for `force_upcast`.
    pub dtype: DType,
}

impl LoadOptions {
    pub fn cpu() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32 }
    }
}

/// One tokenizer + text encoder pair.
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    pub pad_id: u32,
    pub model: ClipTextModel,
}

/// A loaded model, ready to generate.
pub struct DiffusionModel {
    pub root: PathBuf,
    pub architecture: Architecture,
    pub text_encoders: Vec<TextEncoder>,
    pub unet: UNet,
    pub vae: Vae,
    pub scheduler_config: SchedulerConfig,
    pub defaults: ModelDefaults,
    pub force_zeros_for_empty_prompt: bool,
    pub device: Device,
    pub dtype: DType,
    pub vae_dtype: DType,
    /// Bytes of the loaded weights (all components, in their loaded dtype): what the model occupies on its device.
    pub weight_bytes: u64,
}

/// Text conditioning for a batch: what the UNet reads besides the latents.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// (batch, tokens, cross_attention_dim)
    pub context: Tensor,
    /// SDXL only: (batch, pooled_dim)
    pub pooled: Option<Tensor>,
    /// Prompt tokens dropped because the prompt was longer than the encoder's window.
    pub truncated_tokens: usize,
}

impl DiffusionModel {
    /// Loads a diffusers folder (the one holding `model_index.json`).
    pub fn load(root: &Path, options: &LoadOptions) -> Result<Self> {
        let index = ModelIndex::from_file(&root.join("model_index.json"))?;
        let variant = if options.dtype == DType::F32 { Variant::Full } else { Variant::Fp16 };
        let dtype = options.dtype;
        let device = &options.device;
        let loaded = LoadedBytes::default();

        let unet_config_path = root.join("unet/config.json");
        let unet_config = UNetConfig::from_file(&unet_config_path)?;
        let architecture = if unet_config.has_text_time_embedding() {
            Architecture::StableDiffusionXl
        } else {
            Architecture::StableDiffusion
        };
        let encoder_names: &[(&str, &str)] = match architecture {
            Architecture::StableDiffusion => &[("tokenizer", "text_encoder")],
            Architecture::StableDiffusionXl => &[("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")],
        };
        let text_encoders = encoder_names
            .iter()
            .map(|(tok, enc)| load_text_encoder(&root.join(tok), &root.join(enc), variant, dtype, device, &loaded))
            .collect::<Result<Vec<_>>>()?;

        let unet_vb =
            component_var_builder(&root.join("unet"), "diffusion_pytorch_model", variant, dtype, device, &loaded)?;
        let unet =
            UNet::new(unet_vb, unet_config, &unet_config_path).map_err(|e| weights_error(&root.join("unet"), e))?;

        let vae_config_path = root.join("vae/config.json");
        let vae_config = VaeConfig::from_file(&vae_config_path)?;
        let vae_dtype = if vae_config.force_upcast { DType::F32 } else { dtype };
        let vae_vb =
            component_var_builder(&root.join("vae"), "diffusion_pytorch_model", variant, vae_dtype, device, &loaded)?;
        let vae = Vae::new(vae_vb, vae_config, &vae_config_path).map_err(|e| weights_error(&root.join("vae"), e))?;

        let context_width: usize = text_encoders.iter().map(|t| t.model.config().hidden_size).sum();
        if context_width != unet.config().cross_attention_dim {
            return Err(Error::config(
                &unet_config_path,
                format!(
                    "cross_attention_dim {} does not match the text encoders' width {context_width}",
                    unet.config().cross_attention_dim
                ),
            ));
        }

        let scheduler_config = SchedulerConfig::from_file(&root.join("scheduler/scheduler_config.json"))?;
        let defaults_path = root.join("imago.json");
        let defaults = if defaults_path.is_file() { read_json(&defaults_path)? } else { ModelDefaults::default() };
        Ok(Self {
            root: root.to_path_buf(),
            architecture,
            text_encoders,
            unet,
            vae,
            scheduler_config,
            defaults,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(false),
            device: device.clone(),
            dtype,
            vae_dtype,
            weight_bytes: loaded.total(),
        })
    }

    /// Pixels per latent cell (8 for every published family).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().downscale_factor()
    }

    /// The scheduler used when a request names none: the folder's `imago.json`, else the class its
    /// scheduler config names, else DPM++ 2M.
    pub fn default_scheduler(&self) -> Result<SchedulerKind> {
        if let Some(name) = &self.defaults.scheduler {
            return name.parse();
        }
        Ok(SchedulerKind::from_class_name(&self.scheduler_config).unwrap_or(SchedulerKind::DpmPp2m))
    }

    /// The native image side: the UNet's sample size times the VAE factor, unless `imago.json` says otherwise.
    pub fn default_size(&self) -> (usize, usize) {
        let side = self.unet.config().sample_size * self.vae_scale_factor();
        (self.defaults.width.unwrap_or(side), self.defaults.height.unwrap_or(side))
    }

    /// Encodes one prompt for `batch` images; SDXL's empty negative prompt becomes zeros when the folder asks for it.
    pub fn encode_prompt(&self, prompt: &str, batch: usize, is_negative: bool) -> Result<TextConditioning> {
        let zero = is_negative && prompt.is_empty() && self.force_zeros_for_empty_prompt;
        let mut contexts = Vec::with_capacity(self.text_encoders.len());
        let mut pooled = None;
        let mut truncated_tokens = 0;
        for encoder in &self.text_encoders {
            let tokens: TokenizedPrompt = encoder.tokenizer.encode(prompt, encoder.pad_id)?;
            truncated_tokens = truncated_tokens.max(tokens.truncated_tokens);
            let ids = Tensor::new(tokens.ids.as_slice(), &self.device)?.unsqueeze(0)?;
            let out = on_compute_pool(&self.device, || encoder.model.forward(&ids, &[tokens.eos_position]))?;
            contexts.push(match self.architecture {
                Architecture::StableDiffusion => out.last_hidden,
                Architecture::StableDiffusionXl => out.penultimate_hidden,
            });
            if out.pooled.is_some() {
                pooled = out.pooled;
            }
        }
        let mut context = Tensor::cat(&contexts, candle_core::D::Minus1)?;
        if zero {
            context = context.zeros_like()?;
            pooled = pooled.map(|p| p.zeros_like()).transpose()?;
        }
        let repeat = |t: Tensor| -> Result<Tensor> {
            let mut dims = vec![1; t.rank()];
            dims[0] = batch;
            Ok(t.repeat(dims)?)
        };
        let pooled = match (self.architecture, pooled) {
            (Architecture::StableDiffusionXl, Some(p)) => Some(repeat(p)?),
            (Architecture::StableDiffusionXl, None) => {
                return Err(Error::config(
                    self.root.join("text_encoder_2/config.json"),
                    "SDXL needs a CLIPTextModelWithProjection as text_encoder_2 (pooled embedding)",
                ))
            }
            (Architecture::StableDiffusion, _) => None,
        };
        Ok(TextConditioning { context: repeat(context)?, pooled, truncated_tokens })
    }
}

fn component_var_builder(
    dir: &Path,
    stem: &str,
    variant: Variant,
    dtype: DType,
    device: &Device,
    loaded: &LoadedBytes,
) -> Result<candle_nn::VarBuilder<'static>> {
    let files = find_weights(dir, stem, variant)?;
    mmap_var_builder(&files, dtype, device, loaded)
}

/// Missing or mis-shaped tensors surface as tensor errors while a component is built; name the component folder.
fn weights_error(dir: &Path, error: Error) -> Error {
    match error {
        Error::Tensor(e) => Error::Weights { path: dir.to_path_buf(), message: Error::tensor_message(&e) },
        other => other,
    }
}

fn load_text_encoder(
    tokenizer_dir: &Path,
    encoder_dir: &Path,
    variant: Variant,
    dtype: DType,
    device: &Device,
    loaded: &LoadedBytes,
) -> Result<TextEncoder> {
    let tokenizer = load_tokenizer(tokenizer_dir)?;
    let pad_token = pad_token(tokenizer_dir)?;
    let pad_id = tokenizer.token_id(&pad_token).ok_or_else(|| {
        Error::config(
            tokenizer_dir.join("special_tokens_map.json"),
            format!("pad token {pad_token:?} not in vocabulary"),
        )
    })?;
    let config_path = encoder_dir.join("config.json");
    let config = ClipTextConfig::from_file(&config_path)?;
    let vb = component_var_builder(encoder_dir, "model", variant, dtype, device, loaded)?;
    let model = ClipTextModel::new(vb, config, &config_path).map_err(|e| weights_error(encoder_dir, e))?;
    Ok(TextEncoder { tokenizer, pad_id, model })
}

/// A model folder's tokenizer: `tokenizer.json` when present, else the `vocab.json` + `merges.txt` pair.
fn load_tokenizer(dir: &Path) -> Result<ClipTokenizer> {
    let json = dir.join("tokenizer.json");
    if json.is_file() {
        return ClipTokenizer::from_file(&json);
    }
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    for path in [&vocab, &merges] {
        if !path.is_file() {
            return Err(Error::MissingFile { path: path.clone() });
        }
    }
    ClipTokenizer::from_vocab_merges(&vocab, &merges)
}

/// The padding token a tokenizer folder declares (`"<|endoftext|>"` for SD 1.x, `"!"` for SD 2.x / SDXL's second).
fn pad_token(dir: &Path) -> Result<String> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Token {
        Plain(String),
        Added { content: String },
    }
    #[derive(Deserialize)]
    struct Special {
        pad_token: Option<Token>,
    }
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(file);
        if path.is_file() {
            let special: Special = read_json(&path)?;
            match special.pad_token {
                Some(Token::Plain(s)) | Some(Token::Added { content: s }) => return Ok(s),
                None => {}
            }
        }
    }
    Ok("<|endoftext|>".to_string())
}
