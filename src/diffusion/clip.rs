//! The CLIP text encoder (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`), built from its
//! `config.json`: CLIP-L (SD 1.x), OpenCLIP-H (SD 2.x) and OpenCLIP-bigG (SDXL's second encoder) are all this model.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, linear, linear_no_bias, Embedding, Linear, VarBuilder};

use super::activation::gelu;
use super::config::{ClipActivation, ClipTextConfig};
use super::layers::{softmax_last_dim, LayerNorm};
use super::{Error, Result};

#[derive(Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    scale: f64,
}

impl ClipAttention {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            q_proj: linear(h, h, vb.pp("q_proj"))?,
            k_proj: linear(h, h, vb.pp("k_proj"))?,
            v_proj: linear(h, h, vb.pp("v_proj"))?,
            out_proj: linear(h, h, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            scale: 1.0 / ((h / c.num_attention_heads) as f64).sqrt(),
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let d = c / self.heads;
        let split =
            |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, n, self.heads, d))?.transpose(1, 2)?.contiguous()?) };
        let q = split(self.q_proj.forward(xs)?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let dtype = q.dtype();
        let scores = (q.to_dtype(DType::F32)?.matmul(&k.to_dtype(DType::F32)?.t()?)? * self.scale)?;
        let scores = scores.broadcast_add(causal_mask)?;
        let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        Ok(self.out_proj.forward(&out)?)
    }
}

#[derive(Debug)]
struct ClipLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: ClipActivation,
}

impl ClipLayer {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), c.hidden_size, c.layer_norm_eps)?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), c)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), c.hidden_size, c.layer_norm_eps)?,
            fc1: linear(c.hidden_size, c.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(c.intermediate_size, c.hidden_size, vb.pp("mlp").pp("fc2"))?,
            activation: c.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let xs = (self.self_attn.forward(&self.layer_norm1.forward(xs)?, causal_mask)? + xs)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let h = match self.activation {
            ClipActivation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            ClipActivation::Gelu => gelu(&h)?,
        };
        Ok((self.fc2.forward(&h)? + xs)?)
    }
}

/// What a text encoder hands to the pipeline.
#[derive(Debug)]
pub struct TextEncoding {
    /// After the final layer norm (SD 1.x / 2.x condition on this).
    pub last_hidden: Tensor,
    /// Output of the second-to-last layer, without final norm (SDXL conditions on this).
    pub penultimate_hidden: Tensor,
    /// `text_projection` of the final-normed EOS token; only for `CLIPTextModelWithProjection`.
    pub pooled: Option<Tensor>,
}

/// A loaded CLIP text encoder.
#[derive(Debug)]
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    pub fn new(vb: VarBuilder, config: ClipTextConfig, origin: &Path) -> Result<Self> {
        if config.num_hidden_layers < 2 {
            return Err(Error::config(
                origin,
                "num_hidden_layers must be at least 2 (SDXL reads the penultimate layer)",
            ));
        }
        let text = vb.pp("text_model");
        let emb = text.pp("embeddings");
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipLayer::new(text.pp("encoder").pp("layers").pp(i), &config))
            .collect::<Result<Vec<_>>>()?;
        let text_projection = match (config.has_projection(), config.projection_dim) {
            (true, Some(dim)) => Some(linear_no_bias(config.hidden_size, dim, vb.pp("text_projection"))?),
            (true, None) => return Err(Error::config(origin, "CLIPTextModelWithProjection without projection_dim")),
            (false, _) => None,
        };
        Ok(Self {
            token_embedding: embedding(config.vocab_size, config.hidden_size, emb.pp("token_embedding"))?,
            position_embedding: embedding(
                config.max_position_embeddings,
                config.hidden_size,
                emb.pp("position_embedding"),
            )?,
            layers,
            final_layer_norm: LayerNorm::new(text.pp("final_layer_norm"), config.hidden_size, config.layer_norm_eps)?,
            text_projection,
            config,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Encodes token ids (batch, tokens); `eos_positions[i]` is where row i's EOS token is (for pooling).
    pub fn forward(&self, ids: &Tensor, eos_positions: &[usize]) -> Result<TextEncoding> {
        let (batch, tokens) = ids.dims2()?;
        if tokens > self.config.max_position_embeddings {
            return Err(Error::InvalidRequest(format!(
                "{tokens} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let device = ids.device();
        let positions = Tensor::arange(0u32, tokens as u32, device)?.unsqueeze(0)?;
        let mut xs = self.token_embedding.forward(ids)?.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(tokens, device)?;
        let mut penultimate = None;
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, &mask)?;
            if i + 2 == self.layers.len() {
                penultimate = Some(xs.clone());
            }
        }
        let last_hidden = self.final_layer_norm.forward(&xs)?;
        let pooled = match &self.text_projection {
            Some(proj) => {
                let rows = (0..batch)
                    .map(|b| {
                        let pos = eos_positions.get(b).copied().unwrap_or(tokens - 1).min(tokens - 1);
                        last_hidden.get(b)?.get(pos)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Some(proj.forward(&Tensor::stack(&rows, 0)?)?)
            }
            None => None,
        };
        let penultimate_hidden = penultimate.unwrap_or_else(|| last_hidden.clone());
        Ok(TextEncoding { last_hidden, penultimate_hidden, pooled })
    }
}

/// Additive mask that stops each token attending to later ones: (1, 1, n, n) with -inf above the diagonal.
fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> =
        (0..n).flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(values, (1, 1, n, n), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_blocks_only_future_tokens() {
        let m = causal_mask(3, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let blocked: Vec<bool> = m.iter().map(|v| v.is_infinite()).collect();
        assert_eq!(blocked, [false, true, true, false, false, true, false, false, false]);
    }
}
