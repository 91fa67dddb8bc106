//! `AutoencoderKL`: maps images to the latent space the UNet works in, and back.

use std::path::Path;

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::config::VaeConfig;
use super::conv::{conv2d, Conv2d};
use super::layers::{Attention, AttentionConfig, Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::norm::{group_norm, GroupNorm};
use super::Result;

const VAE_EPS: f64 = 1e-6;

fn resnet(cfg: &VaeConfig, in_channels: usize, out_channels: usize) -> ResnetConfig {
    ResnetConfig { in_channels, out_channels, temb_channels: None, groups: cfg.norm_num_groups, eps: VAE_EPS }
}

/// Single-head self-attention over all pixels, with its own group norm and residual (`UNetMidBlock2D`'s attention).
#[derive(Debug)]
struct PixelAttention {
    group_norm: GroupNorm,
    attention: Attention,
}

impl PixelAttention {
    fn new(vb: VarBuilder, cfg: &VaeConfig, channels: usize) -> Result<Self> {
        let attn = AttentionConfig {
            query_dim: channels,
            context_dim: None,
            heads: 1,
            head_dim: channels,
            qkv_bias: true,
            upcast: true,
        };
        Ok(Self {
            group_norm: group_norm(cfg.norm_num_groups, channels, VAE_EPS, vb.pp("group_norm"))?,
            attention: Attention::new(vb, attn)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        // Contiguous before the projections: candle 0.11's CPU matmul folds a batch of transposed inputs into one
        // matrix as if it were row-major, which mixes up the images of a batch larger than one.
        let tokens = self.group_norm.forward(xs)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let out = self.attention.forward(&tokens, None)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((out + xs)?)
    }
}

/// `UNetMidBlock2D` without timestep: resnet, attention (unless disabled), resnet.
#[derive(Debug)]
struct MidBlock {
    first: ResnetBlock2D,
    attention: Option<PixelAttention>,
    second: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, cfg: &VaeConfig, channels: usize) -> Result<Self> {
        let attention = if cfg.mid_block_add_attention {
            Some(PixelAttention::new(vb.pp("attentions").pp(0), cfg, channels)?)
        } else {
            None
        };
        Ok(Self {
            first: ResnetBlock2D::new(vb.pp("resnets").pp(0), resnet(cfg, channels, channels))?,
            attention,
            second: ResnetBlock2D::new(vb.pp("resnets").pp(1), resnet(cfg, channels, channels))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.first.forward(xs, None)?;
        if let Some(attn) = &self.attention {
            xs = attn.forward(&xs)?;
        }
        self.second.forward(&xs, None)
    }
}

#[derive(Debug)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug)]
struct DecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<EncoderBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let conv3 = Conv2dConfig { padding: 1, ..Default::default() };
        let mut blocks = Vec::with_capacity(ch.len());
        for (i, &out) in ch.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let input = if j > 0 {
                        out
                    } else if i == 0 {
                        ch[0]
                    } else {
                        ch[i - 1]
                    };
                    ResnetBlock2D::new(vb.pp("resnets").pp(j), resnet(cfg, input, out))
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler =
                if i + 1 < ch.len() { Some(Downsample2D::new(vb.pp("downsamplers").pp(0), out, 0)?) } else { None };
            blocks.push(EncoderBlock { resnets, downsampler });
        }
        let last = ch[ch.len() - 1];
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, ch[0], 3, conv3, vb.pp("conv_in"))?,
            blocks,
            mid: MidBlock::new(vb.pp("mid_block"), cfg, last)?,
            norm_out: group_norm(cfg.norm_num_groups, last, VAE_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(last, 2 * cfg.latent_channels, 3, conv3, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for block in &self.blocks {
            for r in &block.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(d) = &block.downsampler {
                xs = d.forward(&xs)?;
            }
        }
        let xs = self.mid.forward(&xs)?;
        Ok(self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)?)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<DecoderBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let conv3 = Conv2dConfig { padding: 1, ..Default::default() };
        let last = ch[ch.len() - 1];
        let mut blocks = Vec::with_capacity(ch.len());
        let mut prev = last;
        for (i, &out) in ch.iter().rev().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| ResnetBlock2D::new(vb.pp("resnets").pp(j), resnet(cfg, if j == 0 { prev } else { out }, out)))
                .collect::<Result<Vec<_>>>()?;
            let upsampler =
                if i + 1 < ch.len() { Some(Upsample2D::new(vb.pp("upsamplers").pp(0), out)?) } else { None };
            blocks.push(DecoderBlock { resnets, upsampler });
            prev = out;
        }
        Ok(Self {
            conv_in: conv2d(cfg.latent_channels, last, 3, conv3, vb.pp("conv_in"))?,
            mid: MidBlock::new(vb.pp("mid_block"), cfg, last)?,
            blocks,
            norm_out: group_norm(cfg.norm_num_groups, ch[0], VAE_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(ch[0], cfg.out_channels, 3, conv3, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.conv_in.forward(xs)?;
        let mut xs = self.mid.forward(&xs)?;
        for block in &self.blocks {
            for r in &block.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(u) = &block.upsampler {
                xs = u.forward(&xs, None)?;
            }
        }
        Ok(self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)?)
    }
}

/// A loaded VAE.
#[derive(Debug)]
pub struct Vae {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

/// The encoder's output distribution over latents (diagonal Gaussian).
#[derive(Debug)]
pub struct LatentDistribution {
    pub mean: Tensor,
    pub std: Tensor,
}

impl Vae {
    pub fn new(vb: VarBuilder, config: VaeConfig, origin: &Path) -> Result<Self> {
        config.validate(origin)?;
        let l2 = 2 * config.latent_channels;
        let l = config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(conv2d(l2, l2, 1, Default::default(), vb.pp("quant_conv"))?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv2d(l, l, 1, Default::default(), vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), &config)?,
            decoder: Decoder::new(vb.pp("decoder"), &config)?,
            quant_conv,
            post_quant_conv,
            config,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Images in [-1, 1], (batch, 3, h, w) → latent distribution (unscaled).
    pub fn encode(&self, images: &Tensor) -> Result<LatentDistribution> {
        let mut moments = self.encoder.forward(images)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let halves = moments.chunk(2, 1)?;
        let logvar = halves[1].clamp(-30f32, 20f32)?;
        Ok(LatentDistribution { mean: halves[0].clone(), std: (logvar * 0.5)?.exp()? })
    }

    /// Scaled latents (what the UNet sees) → images in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        let mut xs = latents.affine(1.0 / self.config.scaling_factor, shift)?;
        if let Some(pq) = &self.post_quant_conv {
            xs = pq.forward(&xs)?;
        }
        self.decoder.forward(&xs)
    }

    /// Unscaled latents from the encoder → the scaled space the UNet works in.
    pub fn scale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        Ok(latents.affine(self.config.scaling_factor, -shift * self.config.scaling_factor)?)
    }
}
