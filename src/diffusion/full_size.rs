//! The published architectures of each family, as their released `config.json` files declare them: SD 1.5's
//! 860M-parameter UNet and CLIP ViT-L/14 encoder, SD 2.x's OpenCLIP-H, SDXL's three-level UNet with OpenCLIP-bigG.
//! [`super::tiny::write_model`] writes these with random weights, so speed and memory can be measured on hardware
//! where the real weights cannot be downloaded (how fast a model runs does not depend on its weight values).

use super::config::{ClipActivation, ClipTextConfig, PerBlock, UNetConfig, VaeConfig};
use super::tiny::TinyFamily;

/// CLIP ViT-L/14: SD 1.x's encoder and SDXL's first.
fn clip_l() -> ClipTextConfig {
    clip(768, 3072, 12, 12, ClipActivation::QuickGelu, 768, false)
}

/// OpenCLIP ViT-H/14: SD 2.x (and SD-Turbo).
fn open_clip_h() -> ClipTextConfig {
    clip(1024, 4096, 23, 16, ClipActivation::Gelu, 512, false)
}

/// OpenCLIP ViT-bigG/14 with its projection: SDXL's second encoder.
fn open_clip_big_g() -> ClipTextConfig {
    clip(1280, 5120, 32, 20, ClipActivation::Gelu, 1280, true)
}

fn clip(
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    hidden_act: ClipActivation,
    projection_dim: usize,
    with_projection: bool,
) -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        max_position_embeddings: 77,
        hidden_act,
        layer_norm_eps: 1e-5,
        projection_dim: Some(projection_dim),
        architectures: vec![if with_projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }.to_string()],
        eos_token_id: 49407,
    }
}

/// The text encoders of `family`, in folder order (`text_encoder`, then `text_encoder_2` for SDXL).
pub(crate) fn text_encoder_configs(family: TinyFamily) -> Vec<ClipTextConfig> {
    match family {
        TinyFamily::Sd15 | TinyFamily::Sd15Inpaint => vec![clip_l()],
        TinyFamily::Sd21 | TinyFamily::SdTurbo => vec![open_clip_h()],
        TinyFamily::Sdxl | TinyFamily::SdxlTurbo | TinyFamily::SdxlInpaint => vec![clip_l(), open_clip_big_g()],
    }
}

pub(crate) fn unet_config(family: TinyFamily) -> UNetConfig {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let in_channels = if family.is_inpaint() { 9 } else { 4 };
    let sd = UNetConfig {
        in_channels,
        out_channels: 4,
        block_out_channels: vec![320, 640, 1280, 1280],
        down_block_types: s(&["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
        up_block_types: s(&["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
        layers_per_block: 2,
        attention_head_dim: Some(PerBlock::All(8)),
        num_attention_heads: None,
        cross_attention_dim: 768,
        transformer_layers_per_block: PerBlock::All(1),
        norm_num_groups: 32,
        norm_eps: 1e-5,
        flip_sin_to_cos: true,
        freq_shift: 0,
        downsample_padding: 1,
        use_linear_projection: false,
        upcast_attention: false,
        sample_size: 64,
        addition_embed_type: None,
        addition_time_embed_dim: None,
        projection_class_embeddings_input_dim: None,
        center_input_sample: false,
        act_fn: "silu".into(),
        mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
    };
    match family {
        TinyFamily::Sd15 | TinyFamily::Sd15Inpaint => sd,
        // SD 2.1 is the 768-pixel v-prediction model; SD-Turbo is distilled from the 512-pixel base.
        TinyFamily::Sd21 | TinyFamily::SdTurbo => UNetConfig {
            attention_head_dim: Some(PerBlock::Each(vec![5, 10, 20, 20])),
            cross_attention_dim: 1024,
            use_linear_projection: true,
            upcast_attention: family == TinyFamily::Sd21,
            sample_size: if family == TinyFamily::Sd21 { 96 } else { 64 },
            ..sd
        },
        TinyFamily::Sdxl | TinyFamily::SdxlTurbo | TinyFamily::SdxlInpaint => UNetConfig {
            block_out_channels: vec![320, 640, 1280],
            down_block_types: s(&["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]),
            up_block_types: s(&["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
            attention_head_dim: Some(PerBlock::Each(vec![5, 10, 20])),
            cross_attention_dim: 2048,
            transformer_layers_per_block: PerBlock::Each(vec![1, 2, 10]),
            use_linear_projection: true,
            // SDXL-Turbo generates at 512 pixels, the others at 1024.
            sample_size: if family == TinyFamily::SdxlTurbo { 64 } else { 128 },
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            ..sd
        },
    }
}

/// The published VAE folders declare no `force_upcast` except SDXL's, whose value is true: diffusers' default
/// (true) applies to all of them, so every family decodes in f32.
pub(crate) fn vae_config(family: TinyFamily) -> VaeConfig {
    let xl = matches!(family, TinyFamily::Sdxl | TinyFamily::SdxlTurbo | TinyFamily::SdxlInpaint);
    VaeConfig {
        in_channels: 3,
        out_channels: 3,
        block_out_channels: vec![128, 256, 512, 512],
        layers_per_block: 2,
        latent_channels: 4,
        norm_num_groups: 32,
        scaling_factor: if xl { 0.13025 } else { 0.18215 },
        shift_factor: None,
        force_upcast: true,
        use_quant_conv: true,
        use_post_quant_conv: true,
        mid_block_add_attention: true,
        down_block_types: vec!["DownEncoderBlock2D".into(); 4],
        up_block_types: vec!["UpDecoderBlock2D".into(); 4],
        act_fn: "silu".into(),
        sample_size: if xl { 1024 } else { 512 },
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn every_family_has_a_consistent_published_unet() {
        for family in TinyFamily::ALL {
            let config = unet_config(family);
            let plan = config.plan(Path::new("unet/config.json")).unwrap();
            let context: usize = text_encoder_configs(family).iter().map(|c| c.hidden_size).sum();
            assert_eq!(config.cross_attention_dim, context, "{family}");
            assert_eq!(config.in_channels, if family.is_inpaint() { 9 } else { 4 }, "{family}");
            assert_eq!(plan.heads.len(), config.block_out_channels.len(), "{family}");
        }
    }

    #[test]
    fn sdxl_pooled_embedding_width_matches_the_added_conditioning() {
        let unet = unet_config(TinyFamily::Sdxl);
        let pooled = text_encoder_configs(TinyFamily::Sdxl)[1].projection_dim.unwrap();
        // pooled text embedding + six size/crop numbers embedded at addition_time_embed_dim each
        assert_eq!(unet.projection_class_embeddings_input_dim, Some(pooled + 6 * 256));
        assert!(text_encoder_configs(TinyFamily::Sdxl)[1].has_projection());
    }
}
