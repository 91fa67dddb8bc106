//! Writes the trained model as a standard diffusers folder (the layout `DiffusionModel::load` and diffusers'
//! `StableDiffusionPipeline` read), weights in f16 to keep the committed files small.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use imago::diffusion::model::ModelDefaults;
use imago::diffusion::tokenizer::ClipTokenizer;
use serde::Serialize;
use serde_json::{json, Value};

use crate::autoencoder::TrainedAutoencoder;
use crate::denoiser::TrainedDenoiser;
use crate::text::text_configs;

const DIFFUSERS_VERSION: &str = "0.42.1";

fn write_json(path: &Path, value: &Value) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// A config struct as JSON plus diffusers' bookkeeping keys.
fn config_json<T: Serialize>(config: &T, extra: Value) -> Result<Value> {
    let mut value = serde_json::to_value(config)?;
    if let (Value::Object(map), Value::Object(extra)) = (&mut value, extra) {
        map.extend(extra);
    }
    Ok(value)
}

fn write_weights(dir: &Path, stem: &str, weights: &BTreeMap<String, Tensor>) -> Result<()> {
    let half = weights
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F16)?)))
        .collect::<Result<HashMap<String, Tensor>>>()?;
    let path = dir.join(format!("{stem}.fp16.safetensors"));
    candle_core::safetensors::save(&half, &path).with_context(|| format!("writing {}", path.display()))
}

/// The noise schedule the model was trained with (SD's DDPM betas, v-prediction) as a DDIM config; "trailing" spacing makes short
/// samplers start from pure noise (t = 999).
fn scheduler_config() -> Value {
    json!({
        "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "trained_betas": null,
        "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1, "prediction_type": "v_prediction",
        "timestep_spacing": "trailing"
    })
}

fn write_tokenizer(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tokenizer = ClipTokenizer::embedded()?;
    std::fs::write(dir.join("vocab.json"), tokenizer.vocab_json()?)?;
    std::fs::write(dir.join("merges.txt"), tokenizer.merges_txt()?)?;
    let special = json!({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"});
    write_json(&dir.join("special_tokens_map.json"), &special)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": true,
                "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"}),
    )
}

/// Writes every component of the trained model into `out`.
pub fn write_model_folder(
    out: &Path,
    autoencoder: &TrainedAutoencoder,
    denoiser: &TrainedDenoiser,
    defaults: &ModelDefaults,
) -> Result<()> {
    write_json(
        &out.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "feature_extractor": [null, null], "image_encoder": [null, null],
            // Trained with empty captions as the unconditional input, not zeros.
            "force_zeros_for_empty_prompt": false
        }),
    )?;
    write_json(&out.join("scheduler/scheduler_config.json"), &scheduler_config())?;
    write_json(&out.join("imago.json"), &serde_json::to_value(defaults)?)?;

    let text_keys = json!({"model_type": "clip_text_model", "bos_token_id": 49406, "pad_token_id": 1,
        "torch_dtype": "float16", "initializer_range": 0.02, "initializer_factor": 1.0, "attention_dropout": 0.0});
    for (i, (config, weights)) in text_configs().iter().zip(&denoiser.text_weights).enumerate() {
        let suffix = if i == 0 { String::new() } else { format!("_{}", i + 1) };
        write_tokenizer(&out.join(format!("tokenizer{suffix}")))?;
        let dir = out.join(format!("text_encoder{suffix}"));
        write_json(&dir.join("config.json"), &config_json(config, text_keys.clone())?)?;
        write_weights(&dir, "model", weights)?;
    }

    let diffusers_keys = |class: &str| json!({"_class_name": class, "_diffusers_version": DIFFUSERS_VERSION});
    let unet_dir = out.join("unet");
    let unet_config = config_json(&denoiser.unet_config, diffusers_keys("UNet2DConditionModel"))?;
    write_json(&unet_dir.join("config.json"), &unet_config)?;
    write_weights(&unet_dir, "diffusion_pytorch_model", &denoiser.unet_weights)?;

    let vae_dir = out.join("vae");
    write_json(&vae_dir.join("config.json"), &config_json(&autoencoder.config, diffusers_keys("AutoencoderKL"))?)?;
    write_weights(&vae_dir, "diffusion_pytorch_model", &autoencoder.weights)
}
