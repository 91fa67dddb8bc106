//! The UNet's down, mid and up blocks: resnets, optional spatial transformers, and resampling.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::transformer::{Transformer2D, TransformerConfig};
use crate::diffusion::layers::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::diffusion::Result;

/// What every block of one UNet shares.
#[derive(Debug, Clone, Copy)]
pub struct BlockContext {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub context_dim: usize,
    pub linear_projection: bool,
    pub upcast_attention: bool,
}

impl BlockContext {
    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
        }
    }

    fn transformer(&self, channels: usize, a: BlockAttention) -> TransformerConfig {
        TransformerConfig {
            channels,
            heads: a.heads,
            layers: a.layers,
            context_dim: self.context_dim,
            groups: self.groups,
            linear_projection: self.linear_projection,
            upcast_attention: self.upcast_attention,
        }
    }
}

/// Cross-attention inside a block: heads and transformer depth.
#[derive(Debug, Clone, Copy)]
pub struct BlockAttention {
    pub heads: usize,
    pub layers: usize,
}

/// One resnet with its optional transformer, the repeating unit of every block.
#[derive(Debug)]
struct Layer {
    resnet: ResnetBlock2D,
    attention: Option<Transformer2D>,
}

impl Layer {
    fn new(vb: &VarBuilder, i: usize, resnet: ResnetConfig, transformer: Option<TransformerConfig>) -> Result<Self> {
        let attention = match transformer {
            Some(cfg) => Some(Transformer2D::new(vb.pp("attentions").pp(i), cfg)?),
            None => None,
        };
        Ok(Self { resnet: ResnetBlock2D::new(vb.pp("resnets").pp(i), resnet)?, attention })
    }

    fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = self.resnet.forward(xs, Some(temb))?;
        match &self.attention {
            Some(attn) => attn.forward(&xs, context),
            None => Ok(xs),
        }
    }
}

/// `DownBlock2D` / `CrossAttnDownBlock2D`.
#[derive(Debug)]
pub struct DownBlock {
    layers: Vec<Layer>,
    downsampler: Option<Downsample2D>,
}

/// Shape of one down or up block.
#[derive(Debug, Clone, Copy)]
pub struct BlockShape {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Up blocks only: channels of the previous up block's output.
    pub prev_out_channels: usize,
    pub layers: usize,
    pub attention: Option<BlockAttention>,
    pub resample: bool,
    pub downsample_padding: usize,
}

impl DownBlock {
    pub fn new(vb: VarBuilder, ctx: &BlockContext, shape: BlockShape) -> Result<Self> {
        let layers = (0..shape.layers)
            .map(|i| {
                let in_ch = if i == 0 { shape.in_channels } else { shape.out_channels };
                Layer::new(
                    &vb,
                    i,
                    ctx.resnet(in_ch, shape.out_channels),
                    shape.attention.map(|a| ctx.transformer(shape.out_channels, a)),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let downsampler = if shape.resample {
            Some(Downsample2D::new(vb.pp("downsamplers").pp("0"), shape.out_channels, shape.downsample_padding)?)
        } else {
            None
        };
        Ok(Self { layers, downsampler })
    }

    /// Returns the block output and pushes every intermediate the up path will concatenate onto `skips`.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut xs = xs.clone();
        for layer in &self.layers {
            xs = layer.forward(&xs, temb, context)?;
            skips.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok(xs)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, transformer(s), resnet.
#[derive(Debug)]
pub struct MidBlock {
    first: ResnetBlock2D,
    attention: Transformer2D,
    second: ResnetBlock2D,
}

impl MidBlock {
    pub fn new(vb: VarBuilder, ctx: &BlockContext, channels: usize, attention: BlockAttention) -> Result<Self> {
        let transformer = ctx.transformer(channels, attention);
        Ok(Self {
            first: ResnetBlock2D::new(vb.pp("resnets").pp(0), ctx.resnet(channels, channels))?,
            attention: Transformer2D::new(vb.pp("attentions").pp(0), transformer)?,
            second: ResnetBlock2D::new(vb.pp("resnets").pp(1), ctx.resnet(channels, channels))?,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = self.first.forward(xs, Some(temb))?;
        let xs = self.attention.forward(&xs, context)?;
        self.second.forward(&xs, Some(temb))
    }
}

/// `UpBlock2D` / `CrossAttnUpBlock2D`.
#[derive(Debug)]
pub struct UpBlock {
    layers: Vec<Layer>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    pub fn new(vb: VarBuilder, ctx: &BlockContext, shape: BlockShape) -> Result<Self> {
        let layers = (0..shape.layers)
            .map(|i| {
                // The last resnet of an up block receives the skip from the down block's input side.
                let skip = if i + 1 == shape.layers { shape.in_channels } else { shape.out_channels };
                let input = if i == 0 { shape.prev_out_channels } else { shape.out_channels };
                let resnet = ctx.resnet(input + skip, shape.out_channels);
                Layer::new(&vb, i, resnet, shape.attention.map(|a| ctx.transformer(shape.out_channels, a)))
            })
            .collect::<Result<Vec<_>>>()?;
        let upsampler =
            if shape.resample { Some(Upsample2D::new(vb.pp("upsamplers").pp("0"), shape.out_channels)?) } else { None };
        Ok(Self { layers, upsampler })
    }

    /// Consumes this block's skips from the end of `skips`; upsamples to the size of the next skip, so odd latent
    /// sizes (image sides not a multiple of 64) come back to the exact size they had on the way down.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut xs = xs.clone();
        for layer in &self.layers {
            let skip = skips.pop().ok_or_else(|| candle_core::Error::Msg("UNet skip connections exhausted".into()))?;
            xs = Tensor::cat(&[&xs, &skip], 1)?;
            xs = layer.forward(&xs, temb, context)?;
        }
        if let Some(up) = &self.upsampler {
            let size = match skips.last() {
                Some(next) => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                None => None,
            };
            xs = up.forward(&xs, size)?;
        }
        Ok(xs)
    }
}
