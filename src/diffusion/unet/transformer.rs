//! `Transformer2DModel`: the spatial transformer inside the UNet's cross-attention blocks. Image features become a
//! sequence of tokens that attend to each other and to the text embedding.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::diffusion::activation::geglu;
use crate::diffusion::conv::{conv2d, Conv2d};
use crate::diffusion::layers::{linear, Attention, AttentionConfig, LayerNorm, Linear};
use crate::diffusion::norm::{group_norm, GroupNorm};
use crate::diffusion::Result;

/// Shape parameters of a [`Transformer2D`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    /// SD 2.x and SDXL project in/out with linear layers, SD 1.x with 1×1 convolutions.
    pub linear_projection: bool,
    pub upcast_attention: bool,
}

#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(vb: VarBuilder, channels: usize, linear_projection: bool) -> Result<Self> {
        Ok(if linear_projection {
            Projection::Linear(linear(channels, channels, vb)?)
        } else {
            Projection::Conv(conv2d(channels, channels, 1, Default::default(), vb)?)
        })
    }
}

/// `GEGLU` feed-forward: a projection to twice the hidden width, one half gating the other through GELU.
#[derive(Debug)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj_in: linear(dim, inner * 2, vb.pp("net").pp("0").pp("proj"))?,
            proj_out: linear(inner, dim, vb.pp("net").pp("2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gated = geglu(&self.proj_in.forward(xs)?)?;
        Ok(self.proj_out.forward(&gated)?)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention to the text, feed-forward; each pre-normed and residual.
#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(vb: VarBuilder, cfg: &TransformerConfig) -> Result<Self> {
        let head_dim = cfg.channels / cfg.heads;
        let attn = |context_dim| AttentionConfig {
            query_dim: cfg.channels,
            context_dim,
            heads: cfg.heads,
            head_dim,
            qkv_bias: false,
            upcast: cfg.upcast_attention,
        };
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), cfg.channels, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), attn(None))?,
            norm2: LayerNorm::new(vb.pp("norm2"), cfg.channels, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), attn(Some(cfg.context_dim)))?,
            norm3: LayerNorm::new(vb.pp("norm3"), cfg.channels, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), cfg.channels)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self.attn2.forward(&self.norm2.forward(&xs)?, Some(context))? + &xs)?;
        Ok((self.ff.forward(&self.norm3.forward(&xs)?)? + &xs)?)
    }
}

/// `Transformer2DModel` with continuous (image) input.
#[derive(Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    pub fn new(vb: VarBuilder, cfg: TransformerConfig) -> Result<Self> {
        let blocks = (0..cfg.layers)
            .map(|i| TransformerBlock::new(vb.pp("transformer_blocks").pp(i), &cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(cfg.groups, cfg.channels, 1e-6, vb.pp("norm"))?,
            proj_in: Projection::new(vb.pp("proj_in"), cfg.channels, cfg.linear_projection)?,
            blocks,
            proj_out: Projection::new(vb.pp("proj_out"), cfg.channels, cfg.linear_projection)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        // 1. image → token sequence (b, h·w, c), projecting before or after the reshape as the weights require
        let tokens_of = |t: &Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, t.dim(1)?))?) };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => tokens_of(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&tokens_of(&normed)?)?,
        };
        // 2. transformer blocks
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        // 3. back to an image and add the residual
        let image_of =
            |t: &Tensor| -> Result<Tensor> { Ok(t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()?) };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&image_of(&tokens)?)?,
            Projection::Linear(lin) => image_of(&lin.forward(&tokens)?)?,
        };
        Ok((out + xs)?)
    }
}
