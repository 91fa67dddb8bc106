//! Building blocks shared by the UNet and the VAE, named as in diffusers so that `vb.pp(...)` paths are the
//! safetensors tensor names.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::conv::{conv2d, Conv2d};
use super::few_columns;
use super::norm::{group_norm, GroupNorm};

/// A linear layer whose result for one image never depends on the other images of its batch.
///
/// candle's CPU matmul folds a batch into the rows of one product, and gemm chooses its kernel by the row count, so
/// an image alone and the same image in company round differently. On the CPU each image therefore gets its own
/// product, the one it would get alone: jobs run together give exactly the images they give alone. A few rows per
/// image (time embeddings, the lowest resolutions' tokens) take one few-column product for the whole batch, which
/// is batch-independent by construction. (Not while gradients are tracked: training has no use for it.)
#[derive(Debug, Clone)]
pub struct Linear(candle_nn::Linear);

/// [`Linear`] with a bias, from `weight` and `bias` under `vb`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb).map(Linear)
}

/// [`Linear`] without a bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb).map(Linear)
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let batch = xs.dims().first().copied().unwrap_or(1);
        let in_dim = xs.dim(D::Minus1)?;
        let weight = self.0.weight();
        if xs.rank() >= 2 && few_columns::applies(weight, xs, xs.elem_count() / (batch * in_dim).max(1)) {
            let rows = xs.reshape(((), in_dim))?;
            let out = few_columns::rows_times(weight, &rows)?;
            let out = match self.0.bias() {
                Some(bias) => out.broadcast_add(bias)?,
                None => out,
            };
            let mut dims = xs.dims()[..xs.rank() - 1].to_vec();
            dims.push(weight.dim(0)?);
            return out.reshape(dims);
        }
        if batch <= 1 || !xs.device().is_cpu() || xs.track_op() {
            return self.0.forward(xs);
        }
        let images =
            (0..batch).map(|i| self.0.forward(&xs.narrow(0, i, 1)?)).collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&images, 0)
    }
}

/// Softmax over the last dimension: candle's fused kernel for inference, the differentiable composition while
/// gradients are tracked (training the embedded model), since the fused kernel has no backward pass.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        Ok(candle_nn::ops::softmax(xs, D::Minus1)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(xs)?)
    }
}

/// Layer norm with weight and bias (`torch.nn.LayerNorm`), fused for inference and differentiable in training.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if !xs.track_op() && !self.weight.track_op() && xs.is_contiguous() {
            return Ok(candle_nn::ops::layer_norm(xs, &self.weight, &self.bias, self.eps as f32)?);
        }
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let centered = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
        let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(variance + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        Ok(normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

use super::Result;

/// `diffusers.models.resnet.ResnetBlock2D`: two 3×3 convolutions with group norm and SiLU, an optional timestep
/// projection added between them, and a 1×1 shortcut when the channel count changes.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

/// Shape parameters of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the timestep embedding; `None` in the VAE, which has no timestep.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: ResnetConfig) -> Result<Self> {
        let conv3 = Conv2dConfig { padding: 1, ..Default::default() };
        let norm1 = group_norm(cfg.groups, cfg.in_channels, cfg.eps, vb.pp("norm1"))?;
        let conv1 = conv2d(cfg.in_channels, cfg.out_channels, 3, conv3, vb.pp("conv1"))?;
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(linear(t, cfg.out_channels, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let norm2 = group_norm(cfg.groups, cfg.out_channels, cfg.eps, vb.pp("norm2"))?;
        let conv2 = conv2d(cfg.out_channels, cfg.out_channels, 3, conv3, vb.pp("conv2"))?;
        let conv_shortcut = if cfg.in_channels != cfg.out_channels {
            Some(conv2d(cfg.in_channels, cfg.out_channels, 1, Default::default(), vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self { norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        Ok((shortcut + h)?)
    }
}

/// `Downsample2D`: a stride-2 3×3 convolution. The VAE pads asymmetrically (right/bottom by one) with padding 0,
/// the UNet pads symmetrically with `downsample_padding`.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let cfg = Conv2dConfig { padding, stride: 2, ..Default::default() };
        let conv = conv2d(channels, channels, 3, cfg, vb.pp("conv"))?;
        Ok(Self { conv, pad_right_bottom: padding == 0 })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let xs = xs.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?;
            Ok(self.conv.forward(&xs)?)
        } else {
            Ok(self.conv.forward(xs)?)
        }
    }
}

/// `Upsample2D`: nearest-neighbour 2× (or to an explicit size, for odd skip-connection sizes) then a 3×3 convolution.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let cfg = Conv2dConfig { padding: 1, ..Default::default() };
        Ok(Self { conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))? })
    }

    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let up = xs.upsample_nearest2d(th, tw)?;
        Ok(self.conv.forward(&up)?)
    }
}

/// Multi-head attention (`diffusers.models.attention_processor.Attention`): self-attention when `context` is
/// `None`, cross-attention otherwise.
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    upcast: bool,
}

/// Shape parameters of an [`Attention`] layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    pub query_dim: usize,
    /// Width of the cross-attention context; `None` for self-attention.
    pub context_dim: Option<usize>,
    pub heads: usize,
    pub head_dim: usize,
    /// The VAE's attention has biases on q/k/v, the UNet's does not.
    pub qkv_bias: bool,
    /// Compute scores and softmax in f32 even when the weights are f16 (SD 2.x sets `upcast_attention`).
    pub upcast: bool,
}

/// Above this many score elements (batch × heads × queries × keys) attention is computed in slices of heads, so a
/// large image does not need the full score matrix at once.
const MAX_SCORE_ELEMENTS: usize = 1 << 27;

impl Attention {
    pub fn new(vb: VarBuilder, cfg: AttentionConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.head_dim;
        let context_dim = cfg.context_dim.unwrap_or(cfg.query_dim);
        let proj = |i, o, vb| if cfg.qkv_bias { linear(i, o, vb) } else { linear_no_bias(i, o, vb) };
        Ok(Self {
            to_q: proj(cfg.query_dim, inner, vb.pp("to_q"))?,
            to_k: proj(context_dim, inner, vb.pp("to_k"))?,
            to_v: proj(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, cfg.query_dim, vb.pp("to_out").pp("0"))?,
            heads: cfg.heads,
            scale: 1.0 / (cfg.head_dim as f64).sqrt(),
            upcast: cfg.upcast,
        })
    }

    /// `xs`: (batch, queries, query_dim); `context`: (batch, keys, context_dim).
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_sliced(xs, context, MAX_SCORE_ELEMENTS)
    }

    fn forward_sliced(&self, xs: &Tensor, context: Option<&Tensor>, max_score_elements: usize) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let q = self.split_heads(&self.to_q.forward(xs)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let (bh, n, _) = q.dims3()?;
        let m = k.dim(1)?;
        let slice = (max_score_elements / (n * m).max(1)).clamp(1, bh);
        let mut outs = Vec::with_capacity(bh.div_ceil(slice));
        for start in (0..bh).step_by(slice) {
            let len = slice.min(bh - start);
            outs.push(self.attend(&q.narrow(0, start, len)?, &k.narrow(0, start, len)?, &v.narrow(0, start, len)?)?);
        }
        let out = if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(&outs, 0)? };
        Ok(self.to_out.forward(&self.merge_heads(&out)?)?)
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let dtype = q.dtype();
        let (q, k) = if self.upcast && dtype != DType::F32 {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q.clone(), k.clone())
        };
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
        Ok(probs.matmul(v)?)
    }

    /// (b, n, heads·d) → (b·heads, n, d)
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let d = c / self.heads;
        Ok(xs.reshape((b, n, self.heads, d))?.transpose(1, 2)?.reshape((b * self.heads, n, d))?)
    }

    /// (b·heads, n, d) → (b, n, heads·d)
    fn merge_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (bh, n, d) = xs.dims3()?;
        let b = bh / self.heads;
        Ok(xs.reshape((b, self.heads, n, d))?.transpose(1, 2)?.reshape((b, n, self.heads * d))?)
    }
}

/// Sinusoidal timestep embedding (`diffusers.models.embeddings.get_timestep_embedding`), for a 1-D tensor of
/// timesteps → (len, dim).
pub fn timestep_embedding(timesteps: &Tensor, dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    let device = timesteps.device();
    let exponent: Vec<f32> =
        (0..half).map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - freq_shift)).exp() as f32).collect();
    let freqs = Tensor::from_vec(exponent, (1, half), device)?;
    let args = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
    if dim % 2 == 1 {
        return Ok(emb.pad_with_zeros(1, 0, 1)?);
    }
    Ok(emb)
}

/// `TimestepEmbedding`: linear → SiLU → linear.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn timestep_embedding_matches_the_closed_form() {
        let t = Tensor::new(&[0f32, 500.0], &Device::Cpu).unwrap();
        let emb = timestep_embedding(&t, 4, true, 0.0).unwrap().to_vec2::<f32>().unwrap();
        // half = 2: freqs = [1, 10000^(-1/2) = 0.01]; flip puts cos first.
        let expect = [[1.0, 1.0, 0.0, 0.0], [500f32.cos(), 5f32.cos(), 500f32.sin(), 5f32.sin()]];
        for (row, want) in emb.iter().zip(expect) {
            for (g, w) in row.iter().zip(want) {
                assert!((g - w).abs() < 1e-4, "{emb:?}");
            }
        }
    }

    #[test]
    fn training_paths_equal_the_fused_inference_kernels() {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 2.0, (2, 5, 8), &dev).unwrap();
        let tracked = candle_core::Var::from_tensor(&xs).unwrap();
        let fused = softmax_last_dim(&xs).unwrap();
        let composed = softmax_last_dim(tracked.as_tensor()).unwrap();
        assert!(max_diff(&fused, &composed) < 1e-6);

        let vm = candle_nn::VarMap::new();
        let norm = LayerNorm::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), 8, 1e-5).unwrap();
        let inference = LayerNorm { weight: norm.weight.detach(), bias: norm.bias.detach(), eps: 1e-5 };
        assert!(max_diff(&inference.forward(&xs).unwrap(), &norm.forward(tracked.as_tensor()).unwrap()) < 1e-5);
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn a_linear_gives_each_image_exactly_what_it_gives_alone() {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let lin = linear(16, 64, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        // Row counts where gemm's kernel choice changes with the batch (2-D: one row per image; 3-D: 16 tokens),
        // and few rows per image (one few-column product for the batch).
        for xs in [
            Tensor::randn(0f32, 1.0, (8, 16), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (8, 16, 16), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (8, 4, 16), &dev).unwrap(),
        ] {
            let batched = lin.forward(&xs).unwrap();
            let plain = lin.0.forward(&xs).unwrap();
            assert!(max_diff(&batched, &plain) < 1e-5, "the same product as candle's for {:?}", xs.shape());
            for i in 0..8 {
                let alone = lin.forward(&xs.narrow(0, i, 1).unwrap()).unwrap();
                assert_eq!(max_diff(&batched.narrow(0, i, 1).unwrap(), &alone), 0.0, "image {i} of {:?}", xs.shape());
            }
        }
        // A transposed batch (as attention over pixels produces) is read as what it is.
        let channels_first = Tensor::randn(0f32, 1.0, (2, 16, 5), &dev).unwrap();
        let tokens = channels_first.transpose(1, 2).unwrap();
        let expected = lin.forward(&tokens.contiguous().unwrap()).unwrap();
        assert_eq!(max_diff(&lin.forward(&tokens).unwrap(), &expected), 0.0);
    }

    #[test]
    fn sliced_attention_equals_unsliced() {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let cfg =
            AttentionConfig { query_dim: 8, context_dim: None, heads: 2, head_dim: 4, qkv_bias: true, upcast: false };
        let attn = Attention::new(vb, cfg).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (3, 10, 8), &dev).unwrap();
        let full = attn.forward(&xs, None).unwrap();
        // One (batch·head) slice at a time: 6 slices.
        let sliced = attn.forward_sliced(&xs, None, 1).unwrap();
        let diff = (full - sliced).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
    }
}
