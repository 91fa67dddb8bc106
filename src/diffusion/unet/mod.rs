//! `UNet2DConditionModel`: the noise predictor of every Stable Diffusion family, built from its `config.json`.
//!
//! The struct tree mirrors diffusers' module tree, so the safetensors names of a published checkpoint load as they
//! are. SDXL's micro-conditioning (`addition_embed_type: "text_time"`: pooled text embedding + size/crop ids) is
//! part of the same model, switched on by the config.

mod blocks;
mod transformer;

use std::path::Path;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use self::blocks::{BlockAttention, BlockContext, BlockShape, DownBlock, MidBlock, UpBlock};
use super::config::{BlockKind, UNetConfig};
use super::conv::{conv2d, Conv2d};
use super::layers::{timestep_embedding, TimestepEmbedding};
use super::norm::{group_norm, GroupNorm};
use super::Result;

/// SDXL's extra conditioning: the pooled embedding of the second text encoder and six size/crop numbers
/// (original height, width, crop top, left, target height, width) per batch entry.
#[derive(Debug, Clone)]
pub struct TextTimeConditioning {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

#[derive(Debug)]
struct AddedEmbedding {
    time_dim: usize,
    embedding: TimestepEmbedding,
}

/// A loaded UNet.
#[derive(Debug)]
pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<AddedEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Builds the model from its config; `origin` names the config file in errors.
    pub fn new(vb: VarBuilder, config: UNetConfig, origin: &Path) -> Result<Self> {
        let plan = config.plan(origin)?;
        let channels = &config.block_out_channels;
        let blocks = channels.len();
        let temb_channels = channels[0] * 4;
        let ctx = BlockContext {
            temb_channels,
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            context_dim: config.cross_attention_dim,
            linear_projection: config.use_linear_projection,
            upcast_attention: config.upcast_attention,
        };
        let attention = |i: usize, kind: BlockKind| {
            (kind == BlockKind::CrossAttn)
                .then(|| BlockAttention { heads: plan.heads[i], layers: plan.transformer_layers[i] })
        };

        let conv3 = Conv2dConfig { padding: 1, ..Default::default() };
        let conv_in = conv2d(config.in_channels, channels[0], 3, conv3, vb.pp("conv_in"))?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), channels[0], temb_channels)?;
        let add_embedding = match (config.addition_time_embed_dim, config.projection_class_embeddings_input_dim) {
            (Some(time_dim), Some(input_dim)) if config.has_text_time_embedding() => Some(AddedEmbedding {
                time_dim,
                embedding: TimestepEmbedding::new(vb.pp("add_embedding"), input_dim, temb_channels)?,
            }),
            _ => None,
        };

        let mut down_blocks = Vec::with_capacity(blocks);
        for (i, &kind) in plan.down.iter().enumerate() {
            let shape = BlockShape {
                in_channels: if i == 0 { channels[0] } else { channels[i - 1] },
                out_channels: channels[i],
                prev_out_channels: 0,
                layers: config.layers_per_block,
                attention: attention(i, kind),
                resample: i + 1 < blocks,
                downsample_padding: config.downsample_padding,
            };
            down_blocks.push(DownBlock::new(vb.pp("down_blocks").pp(i), &ctx, shape)?);
        }

        let last = blocks - 1;
        let mid_attention = BlockAttention { heads: plan.heads[last], layers: plan.transformer_layers[last] };
        let mid_block = MidBlock::new(vb.pp("mid_block"), &ctx, channels[last], mid_attention)?;

        let mut up_blocks = Vec::with_capacity(blocks);
        let mut prev_out = channels[last];
        for (i, &kind) in plan.up.iter().enumerate() {
            let level = last - i; // the down level this up block mirrors
            let shape = BlockShape {
                in_channels: channels[level.saturating_sub(1)],
                out_channels: channels[level],
                prev_out_channels: prev_out,
                layers: config.layers_per_block + 1,
                attention: attention(level, kind),
                resample: i < last,
                downsample_padding: 0,
            };
            up_blocks.push(UpBlock::new(vb.pp("up_blocks").pp(i), &ctx, shape)?);
            prev_out = channels[level];
        }

        let conv_norm_out = group_norm(config.norm_num_groups, channels[0], config.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out = conv2d(channels[0], config.out_channels, 3, conv3, vb.pp("conv_out"))?;
        Ok(Self {
            config,
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predicts noise (or v) for `sample` (batch, in_channels, h, w) at `timestep`, conditioned on the text
    /// embedding `context` (batch, tokens, cross_attention_dim) and, for SDXL, on `added`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&TextTimeConditioning>,
    ) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let dtype = sample.dtype();
        let device = sample.device();

        // 1. timestep (and SDXL size/crop) embedding
        let timesteps = Tensor::full(timestep as f32, batch, device)?;
        let t_emb = timestep_embedding(
            &timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift as f64,
        )?;
        let mut emb = self.time_embedding.forward(&t_emb.to_dtype(dtype)?)?;
        if let Some(add) = &self.add_embedding {
            let added = added.ok_or_else(|| {
                candle_core::Error::Msg("this UNet (text_time) needs pooled text embeddings and time ids".into())
            })?;
            let ids = added.time_ids.flatten_all()?;
            let time_embeds =
                timestep_embedding(&ids, add.time_dim, self.config.flip_sin_to_cos, self.config.freq_shift as f64)?
                    .reshape((batch, ()))?;
            let input = Tensor::cat(&[added.text_embeds.to_dtype(DType::F32)?, time_embeds], 1)?.to_dtype(dtype)?;
            emb = (emb + add.embedding.forward(&input)?)?;
        }

        // 2. down path, collecting skip connections
        let sample = if self.config.center_input_sample { sample.affine(2.0, -1.0)? } else { sample.clone() };
        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            xs = block.forward(&xs, &emb, context, &mut skips)?;
        }

        // 3. middle
        xs = self.mid_block.forward(&xs, &emb, context)?;

        // 4. up path, consuming the skips in reverse
        for block in &self.up_blocks {
            xs = block.forward(&xs, &emb, context, &mut skips)?;
        }

        // 5. output projection
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        Ok(self.conv_out.forward(&xs)?)
    }
}
