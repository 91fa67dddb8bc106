//! The config files of a diffusers model folder, read into plain structs.
//!
//! The architecture comes from these files, never from presets: fine-tunes, miniatures and new variants load the same
//! way as the published checkpoints. Keys and defaults follow diffusers / transformers; unknown keys are ignored.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Error, Result};

/// Reads and parses a JSON config file, with errors that name the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile { path: path.to_path_buf() },
        _ => Error::io(path, e),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e))
}

/// A value that diffusers accepts either as one number for all blocks or as a list with one entry per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    All(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// Expands to one value per block, checking the list length.
    pub fn expand(&self, blocks: usize, key: &str, path: &Path) -> Result<Vec<usize>> {
        match self {
            PerBlock::All(v) => Ok(vec![*v; blocks]),
            PerBlock::Each(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::config(path, format!("{key} has {} entries for {blocks} blocks", v.len()))),
        }
    }
}

fn one() -> usize {
    1
}
fn default_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_sample_size() -> usize {
    64
}
fn default_latent_channels() -> usize {
    4
}
fn default_scaling_factor() -> f64 {
    0.18215
}

/// `unet/config.json` of a `UNet2DConditionModel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    /// Despite its name, diffusers uses this as the number of heads when `num_attention_heads` is absent.
    #[serde(default)]
    pub attention_head_dim: Option<PerBlock>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: usize,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    /// `"text_time"` for SDXL's size/crop micro-conditioning.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_mid_block_type")]
    pub mid_block_type: Option<String>,
}

fn default_layers_per_block() -> usize {
    2
}
fn one_per_block() -> PerBlock {
    PerBlock::All(1)
}
fn default_act_fn() -> String {
    "silu".to_string()
}
fn default_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".to_string())
}

/// A UNet down or up block kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Plain,
    CrossAttn,
}

/// The per-block facts the UNet builder needs, derived and checked once.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetBlockPlan {
    pub down: Vec<BlockKind>,
    pub up: Vec<BlockKind>,
    pub heads: Vec<usize>,
    pub transformer_layers: Vec<usize>,
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        config.plan(path)?;
        Ok(config)
    }

    /// Whether this UNet takes SDXL's pooled text embedding and size/crop ids.
    pub fn has_text_time_embedding(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// Checks the config's internal consistency and derives per-block values.
    pub fn plan(&self, path: &Path) -> Result<UNetBlockPlan> {
        let blocks = self.block_out_channels.len();
        if blocks == 0 {
            return Err(Error::config(path, "block_out_channels is empty"));
        }
        if self.down_block_types.len() != blocks || self.up_block_types.len() != blocks {
            return Err(Error::config(
                path,
                format!(
                    "{} down and {} up block types for {blocks} block_out_channels",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
            ));
        }
        let kind = |name: &str| match name {
            "DownBlock2D" | "UpBlock2D" => Ok(BlockKind::Plain),
            "CrossAttnDownBlock2D" | "CrossAttnUpBlock2D" => Ok(BlockKind::CrossAttn),
            other => Err(Error::config(path, format!("unsupported UNet block type {other:?}"))),
        };
        let down = self.down_block_types.iter().map(|n| kind(n)).collect::<Result<Vec<_>>>()?;
        let up = self.up_block_types.iter().map(|n| kind(n)).collect::<Result<Vec<_>>>()?;
        let heads_source = self
            .num_attention_heads
            .as_ref()
            .or(self.attention_head_dim.as_ref())
            .ok_or_else(|| Error::config(path, "neither num_attention_heads nor attention_head_dim is set"))?;
        let heads = heads_source.expand(blocks, "attention heads", path)?;
        let transformer_layers =
            self.transformer_layers_per_block.expand(blocks, "transformer_layers_per_block", path)?;
        for (i, (&channels, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || channels % h != 0 {
                return Err(Error::config(path, format!("block {i}: {channels} channels not divisible by {h} heads")));
            }
            if channels % self.norm_num_groups != 0 {
                return Err(Error::config(
                    path,
                    format!("block {i}: {channels} channels not divisible by {} groups", self.norm_num_groups),
                ));
            }
        }
        if self.act_fn != "silu" {
            return Err(Error::config(path, format!("unsupported act_fn {:?} (only silu)", self.act_fn)));
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => return Err(Error::config(path, format!("unsupported mid_block_type {other:?}"))),
        }
        if let Some(kind) = &self.addition_embed_type {
            if kind != "text_time" {
                return Err(Error::config(path, format!("unsupported addition_embed_type {kind:?}")));
            }
            if self.addition_time_embed_dim.is_none() || self.projection_class_embeddings_input_dim.is_none() {
                return Err(Error::config(
                    path,
                    "text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim",
                ));
            }
        }
        Ok(UNetBlockPlan { down, up, heads, transformer_layers })
    }
}

/// `vae/config.json` of an `AutoencoderKL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// SDXL's VAE overflows in f16; diffusers decodes it in f32 when this is set.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
}

fn three() -> usize {
    3
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        config.validate(path)?;
        Ok(config)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.block_out_channels.is_empty() {
            return Err(Error::config(path, "block_out_channels is empty"));
        }
        if let Some(c) = self.block_out_channels.iter().find(|c| **c % self.norm_num_groups != 0) {
            return Err(Error::config(path, format!("{c} channels not divisible by {} groups", self.norm_num_groups)));
        }
        let known = |t: &String| t == "DownEncoderBlock2D" || t == "UpDecoderBlock2D";
        if let Some(t) = self.down_block_types.iter().chain(&self.up_block_types).find(|t| !known(t)) {
            return Err(Error::config(path, format!("unsupported VAE block type {t:?}")));
        }
        if self.act_fn != "silu" {
            return Err(Error::config(path, format!("unsupported act_fn {:?} (only silu)", self.act_fn)));
        }
        Ok(())
    }

    /// Pixels per latent cell along each side: 8 for every published SD VAE.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The activation of a CLIP text encoder's MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    QuickGelu,
    Gelu,
}

fn default_clip_activation() -> ClipActivation {
    ClipActivation::QuickGelu
}

/// `text_encoder/config.json` (transformers' `CLIPTextConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_clip_activation")]
    pub hidden_act: ClipActivation,
    #[serde(default = "default_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_eos() -> u32 {
    49407
}

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(Error::config(
                path,
                format!("hidden_size {} not divisible by {} heads", config.hidden_size, config.num_attention_heads),
            ));
        }
        Ok(config)
    }

    /// `CLIPTextModelWithProjection` (SDXL's second encoder) adds `text_projection` for the pooled embedding.
    pub fn has_projection(&self) -> bool {
        self.architectures.iter().any(|a| a == "CLIPTextModelWithProjection")
    }
}

/// `model_index.json`: which pipeline and components a folder holds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(default)]
    pub force_zeros_for_empty_prompt: Option<bool>,
    #[serde(default)]
    pub requires_aesthetics_score: Option<bool>,
    #[serde(flatten)]
    pub components: std::collections::BTreeMap<String, serde_json::Value>,
}

impl ModelIndex {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_json(path)
    }

    /// Whether the folder declares a component (`["diffusers", "UNet2DConditionModel"]`, not `[null, null]`).
    pub fn has_component(&self, name: &str) -> bool {
        matches!(self.components.get(name), Some(serde_json::Value::Array(v)) if v.iter().all(|x| !x.is_null()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SDXL_UNET: &str = r#"{
        "_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
        "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
        "UpBlock2D"], "use_linear_projection": true, "some_future_key": 3 }"#;

    #[test]
    fn sdxl_unet_config_reads_per_block_heads_and_depths() {
        let config: UNetConfig = serde_json::from_str(SDXL_UNET).unwrap();
        let plan = config.plan(Path::new("unet/config.json")).unwrap();
        assert_eq!(plan.heads, vec![5, 10, 20]);
        assert_eq!(plan.transformer_layers, vec![1, 2, 10]);
        assert_eq!(plan.down, vec![BlockKind::Plain, BlockKind::CrossAttn, BlockKind::CrossAttn]);
        assert!(config.has_text_time_embedding());
        assert_eq!(config.layers_per_block, 2);
    }

    #[test]
    fn mismatched_per_block_list_is_a_config_error_naming_the_key() {
        let text = SDXL_UNET.replace("[1, 2, 10]", "[1, 2]");
        let config: UNetConfig = serde_json::from_str(&text).unwrap();
        let err = config.plan(Path::new("unet/config.json")).unwrap_err().to_string();
        assert!(err.contains("transformer_layers_per_block has 2 entries for 3 blocks"), "{err}");
        assert!(err.contains("unet/config.json"), "{err}");
    }

    #[test]
    fn unknown_block_type_is_rejected() {
        let text = SDXL_UNET.replace("\"DownBlock2D\"", "\"AttnDownBlock2D\"");
        let config: UNetConfig = serde_json::from_str(&text).unwrap();
        let err = config.plan(Path::new("c.json")).unwrap_err().to_string();
        assert!(err.contains("unsupported UNet block type \"AttnDownBlock2D\""), "{err}");
    }

    #[test]
    fn missing_config_file_is_reported_as_missing() {
        let err = UNetConfig::from_file(Path::new("/nonexistent/unet/config.json")).unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }), "{err}");
    }

    #[test]
    fn vae_downscale_factor_follows_block_count() {
        let config: VaeConfig = serde_json::from_str(r#"{"block_out_channels": [128, 256, 512, 512]}"#).unwrap();
        assert_eq!(config.downscale_factor(), 8);
        assert_eq!(config.scaling_factor, 0.18215);
        assert!(config.force_upcast);
    }

    #[test]
    fn model_index_distinguishes_present_and_null_components() {
        let index: ModelIndex = serde_json::from_str(
            r#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                "safety_checker": [null, null], "_diffusers_version": "0.42.1"}"#,
        )
        .unwrap();
        assert!(index.has_component("unet"));
        assert!(!index.has_component("safety_checker"));
        assert!(!index.has_component("text_encoder_2"));
    }
}
