//! Several prompts in one denoising loop: each prompt is encoded once (for one image) and conditions its own images,
//! each image draws its noise from its own seed, so every image is the one its prompt and seed give alone.

use std::time::Instant;

use candle_core::{DType, Tensor};

use super::model::{DiffusionModel, TextConditioning};
use super::pipeline::{stage_time, BatchNoise, GenerateParams, Generated, StepProgress};
use super::schedulers::StepNoise;
use super::{Error, Result};

/// A prompt and its negative encoded for one image: what a batch repeats per image, and what a cache may keep.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// The prompt.
    pub cond: TextConditioning,
    /// The negative prompt; only encoded when guidance is on (> 1).
    pub uncond: Option<TextConditioning>,
}

impl PromptEmbeddings {
    /// Bytes held by the tensors.
    pub fn byte_size(&self) -> u64 {
        let tensor_bytes = |t: &Tensor| t.elem_count() as u64 * t.dtype().size_in_bytes() as u64;
        let conditioning_bytes =
            |c: &TextConditioning| tensor_bytes(&c.context) + c.pooled.as_ref().map_or(0, tensor_bytes);
        conditioning_bytes(&self.cond) + self.uncond.as_ref().map_or(0, conditioning_bytes)
    }
}

/// One prompt's share of a batched generation.
#[derive(Clone, Copy)]
pub struct BatchPart<'a> {
    pub prompts: &'a PromptEmbeddings,
    /// Seed of the part's first image; its image `i` uses `seed + i`.
    pub seed: u64,
    pub images: usize,
}

impl DiffusionModel {
    /// Encodes a prompt, and its negative when `guided`, for one image.
    pub fn encode_prompts(&self, prompt: &str, negative_prompt: &str, guided: bool) -> Result<PromptEmbeddings> {
        let cond = self.encode_prompt(prompt, 1, false)?;
        let uncond = if guided { Some(self.encode_prompt(negative_prompt, 1, true)?) } else { None };
        Ok(PromptEmbeddings { cond, uncond })
    }

    /// Text-to-image for several prompts in one denoising loop. `params` holds what the parts share (size, steps,
    /// guidance, scheduler); its `batch` must be the parts' total images, its prompts and seed are not used. The
    /// images come out in the order of the parts.
    pub fn generate_batch(
        &self,
        params: &GenerateParams,
        parts: &[BatchPart],
        on_step: &mut dyn FnMut(StepProgress) -> bool,
    ) -> Result<Generated> {
        self.validate(params)?;
        let images: usize = parts.iter().map(|p| p.images).sum();
        if images != params.batch {
            return Err(Error::InvalidRequest(format!(
                "the parts hold {images} images but the batch is {}",
                params.batch
            )));
        }
        let started = Instant::now();
        let rows: Vec<(&PromptEmbeddings, usize)> = parts.iter().map(|p| (p.prompts, p.images)).collect();
        let text = self.batch_text(params, &rows)?;
        let text_encode = stage_time(&self.device, started)?;
        let seeds = parts.iter().flat_map(|p| (0..p.images as u64).map(move |i| p.seed.wrapping_add(i)));
        let mut noise = BatchNoise::from_seeds(seeds);
        let initial = noise.sample(&self.latent_shape(params).into(), DType::F32, &self.device)?;
        self.generate_from_text(params, initial, &text, text_encode, &mut noise, on_step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::model::LoadOptions;
    use crate::diffusion::pipeline::GenerateRequest;
    use crate::diffusion::schedulers::SchedulerKind;
    use crate::diffusion::tiny::{write_tiny_model, TinyFamily, TinyOptions};

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn each_part_of_a_batch_is_exactly_its_prompt_and_seeds_alone() {
        // SDXL: two text encoders, pooled text and size ids, all of which must follow their images.
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), TinyOptions { family: TinyFamily::Sdxl, seed: 0, fp16_variant: false }).unwrap();
        let model = DiffusionModel::load(dir.path(), &LoadOptions::cpu()).unwrap();
        let request = GenerateRequest {
            steps: Some(2),
            guidance: Some(5.0),
            scheduler: Some(SchedulerKind::EulerAncestral),
            ..Default::default()
        };
        let jobs = [("a red circle", "", 7u64, 2usize), ("a blue square", "blurry", 40, 1)];
        let prompts: Vec<PromptEmbeddings> =
            jobs.iter().map(|(p, n, _, _)| model.encode_prompts(p, n, true).unwrap()).collect();
        let parts: Vec<BatchPart> = jobs
            .iter()
            .zip(&prompts)
            .map(|((_, _, seed, images), prompts)| BatchPart { prompts, seed: *seed, images: *images })
            .collect();
        let shared = model.params(GenerateRequest { batch: 3, ..request.clone() }).unwrap();
        let batch = model.generate_batch(&shared, &parts, &mut |_| true).unwrap();
        let mut offset = 0;
        for (prompt, negative, seed, images) in jobs {
            let alone = GenerateRequest {
                prompt: prompt.into(),
                negative_prompt: negative.into(),
                seed,
                batch: images,
                ..request.clone()
            };
            let alone = model.generate(&model.params(alone).unwrap(), &mut |_| true).unwrap();
            let rows = |t: &Tensor| values(&t.narrow(0, offset, images).unwrap());
            assert_eq!(rows(&batch.final_latents), values(&alone.final_latents), "{prompt}: latents");
            assert_eq!(rows(&batch.images), values(&alone.images), "{prompt}: pixels");
            offset += images;
        }
    }

    #[test]
    fn the_parts_must_add_up_to_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), TinyOptions { family: TinyFamily::SdTurbo, seed: 0, fp16_variant: false })
            .unwrap();
        let model = DiffusionModel::load(dir.path(), &LoadOptions::cpu()).unwrap();
        let prompts = model.encode_prompts("x", "", false).unwrap();
        let params = model.params(GenerateRequest { batch: 2, ..Default::default() }).unwrap();
        let parts = [BatchPart { prompts: &prompts, seed: 1, images: 1 }];
        let err = model.generate_batch(&params, &parts, &mut |_| true).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("1 images but the batch is 2")));
    }
}
