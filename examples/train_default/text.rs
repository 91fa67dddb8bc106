//! The two CLIP text encoders of the SDXL-style model: their configs, their fixed token embeddings, caption
//! tokenization, and the conditioning they produce (per-token context for cross-attention, and the pooled
//! embedding the UNet adds to its timestep embedding, which carries colour, shape and background to every block).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use imago::diffusion::clip::ClipTextModel;
use imago::diffusion::config::{ClipActivation, ClipTextConfig};
use imago::diffusion::noise::NoiseSource;
use imago::diffusion::tokenizer::ClipTokenizer;

use crate::params::TrainableWeights;
use crate::scenes::{Position, Shape, Size, BACKGROUNDS, SHAPE_COLOURS};

/// `<|endoftext|>`: end of prompt and, as in SD 1.x, the padding token of both tokenizers.
pub const END_OF_TEXT: u32 = 49407;
const START_OF_TEXT: u32 = 49406;
/// The safetensors name of a CLIP text model's token table.
pub const TOKEN_EMBEDDING: &str = "text_model.embeddings.token_embedding.weight";
/// Width of the pooled embedding of the second encoder.
pub const POOLED_DIM: usize = 32;

/// Encoder 1 (`CLIPTextModel`) and encoder 2 (`CLIPTextModelWithProjection`). CLIP's vocabulary size is kept,
/// since the tokenizer is CLIP's; only our words get non-zero rows.
pub fn text_configs() -> [ClipTextConfig; 2] {
    let config = |hidden: usize, projection: Option<usize>, class: &str| ClipTextConfig {
        vocab_size: 49408,
        hidden_size: hidden,
        intermediate_size: 4 * hidden,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 77,
        hidden_act: ClipActivation::QuickGelu,
        layer_norm_eps: 1e-5,
        projection_dim: projection,
        architectures: vec![class.to_string()],
        eos_token_id: END_OF_TEXT,
    };
    [config(16, None, "CLIPTextModel"), config(32, Some(POOLED_DIM), "CLIPTextModelWithProjection")]
}

/// Width of the cross-attention context: both encoders' hidden states side by side.
pub fn context_dim() -> usize {
    text_configs().iter().map(|c| c.hidden_size).sum()
}

/// Every token id our captions can produce, plus BOS and EOS.
pub fn caption_token_ids(tokenizer: &ClipTokenizer) -> Result<BTreeSet<u32>> {
    let mut words: Vec<&str> = vec!["a", "on", "background"];
    words.extend(SHAPE_COLOURS.iter().map(|c| c.0));
    words.extend(BACKGROUNDS.iter().map(|c| c.0));
    words.extend(Shape::ALL.iter().map(|s| s.word()));
    words.extend(Size::ALL.iter().map(|s| s.word()));
    words.extend(Position::ALL.iter().map(|p| p.phrase()));
    let mut ids = BTreeSet::from([START_OF_TEXT, END_OF_TEXT]);
    for word in words {
        ids.extend(tokenizer.encode(word, END_OF_TEXT)?.ids);
    }
    Ok(ids)
}

/// Fixed token embeddings: seeded unit-normal rows for our tokens, zeros for the rest of CLIP's vocabulary. The
/// transformer learns to read them; words the model never saw all map to the same neutral zero vector, and the
/// mostly-zero table compresses to almost nothing in git.
fn token_embedding(tokenizer: &ClipTokenizer, config: &ClipTextConfig, seed: u64) -> Result<Tensor> {
    let width = config.hidden_size;
    let mut table = vec![0f32; config.vocab_size * width];
    for id in caption_token_ids(tokenizer)? {
        let mut rng = NoiseSource::new(seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let row = &mut table[id as usize * width..(id as usize + 1) * width];
        row.iter_mut().for_each(|v| *v = rng.next_normal());
    }
    Ok(Tensor::from_vec(table, (config.vocab_size, width), &Device::Cpu)?)
}

/// Both encoders, built from weights of any origin.
pub struct TextEncoders {
    first: ClipTextModel,
    second: ClipTextModel,
}

/// What the UNet reads from a caption batch.
pub struct Conditioning {
    /// (batch, 77, context_dim): both encoders' penultimate hidden states, concatenated (as SDXL).
    pub context: Tensor,
    /// (batch, POOLED_DIM): the second encoder's projected EOS state.
    pub pooled: Tensor,
}

impl TextEncoders {
    pub fn new(first: VarBuilder, second: VarBuilder) -> Result<Self> {
        let [c1, c2] = text_configs();
        Ok(Self {
            first: ClipTextModel::new(first, c1, Path::new("text_encoder"))?,
            second: ClipTextModel::new(second, c2, Path::new("text_encoder_2"))?,
        })
    }

    /// Encodes token ids (batch, 77) whose EOS tokens sit at `eos`.
    pub fn encode(&self, ids: &Tensor, eos: &[usize]) -> Result<Conditioning> {
        let first = self.first.forward(ids, eos)?;
        let second = self.second.forward(ids, eos)?;
        let context = Tensor::cat(&[first.penultimate_hidden, second.penultimate_hidden], 2)?;
        let pooled = second.pooled.ok_or_else(|| anyhow::anyhow!("text encoder 2 has no projection"))?;
        Ok(Conditioning { context, pooled })
    }
}

/// Trainable weights of both encoders, each with its fixed token table.
pub fn trainable_text_weights(seed: u64) -> Result<[TrainableWeights; 2]> {
    let tokenizer = ClipTokenizer::embedded()?;
    let [c1, c2] = text_configs();
    let weights = |config: &ClipTextConfig, salt: u64| -> Result<TrainableWeights> {
        let table = token_embedding(&tokenizer, config, seed ^ salt)?;
        Ok(TrainableWeights::new(seed ^ salt ^ 0x7e47, HashMap::from([(TOKEN_EMBEDDING.to_string(), table)])))
    };
    Ok([weights(&c1, 1)?, weights(&c2, 2)?])
}

/// Token ids of captions, cached (the grammar has a few thousand distinct captions).
pub struct Captions {
    tokenizer: ClipTokenizer,
    cache: HashMap<String, (Vec<u32>, usize)>,
}

impl Captions {
    pub fn new() -> Result<Self> {
        Ok(Self { tokenizer: ClipTokenizer::embedded()?, cache: HashMap::new() })
    }

    /// (batch, 77) ids and each row's EOS position.
    pub fn encode(&mut self, captions: &[String]) -> Result<(Tensor, Vec<usize>)> {
        let mut ids = Vec::new();
        let mut eos = Vec::new();
        for caption in captions {
            if !self.cache.contains_key(caption) {
                let t = self.tokenizer.encode(caption, END_OF_TEXT)?;
                self.cache.insert(caption.clone(), (t.ids, t.eos_position));
            }
            let (row, position) = &self.cache[caption];
            ids.extend_from_slice(row);
            eos.push(*position);
        }
        let len = ids.len() / captions.len().max(1);
        Ok((Tensor::from_vec(ids, (captions.len(), len), &Device::Cpu)?, eos))
    }
}
