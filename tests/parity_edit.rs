//! Parity with HF diffusers for image-to-image and both inpainting modes, against references computed by
//! `tools/parity/edit.py` from the same miniature folders (noise pinned, VAE posterior read at its mean).

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{load, max_rel_diff, tiny_model_dir};
use image::{GrayImage, RgbImage};
use imago::diffusion::edit::{EditInputs, EditParams};
use imago::diffusion::pipeline::{BatchNoise, GenerateParams};
use imago::diffusion::tiny::TinyFamily;
use serde::Deserialize;

/// Relative to the latents' largest magnitude, as in the txt2img parity test.
const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Case {
    folder: String,
    prompt: String,
    negative_prompt: String,
    scheduler: String,
    steps: usize,
    guidance: f64,
    strength: f64,
}

fn u8_plane(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_dtype(DType::U8).unwrap().to_vec1().unwrap()
}

fn parity(case_name: &str) {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/parity/edit").join(case_name);
    let r = candle_core::safetensors::load(base.with_extension("safetensors"), &Device::Cpu).unwrap();
    let case: Case = serde_json::from_str(&std::fs::read_to_string(base.with_extension("json")).unwrap()).unwrap();
    let family: TinyFamily = case.folder.parse().unwrap();
    let model = load(&tiny_model_dir(family));

    let image = RgbImage::from_raw(64, 64, u8_plane(&r["image"])).unwrap();
    let mask = r.get("mask").map(|m| GrayImage::from_raw(64, 64, u8_plane(m)).unwrap());
    let params = EditParams {
        generate: GenerateParams {
            prompt: case.prompt,
            negative_prompt: case.negative_prompt,
            width: 64,
            height: 64,
            steps: case.steps,
            guidance: case.guidance,
            seed: 0,
            scheduler: case.scheduler.parse().unwrap(),
            batch: 1,
        },
        strength: case.strength,
        mask_blur: 0.0,
    };
    let inputs = EditInputs { image: &image, mask: mask.as_ref() };
    let out =
        model.edit_from_noise(&params, &inputs, r["noise"].clone(), &mut BatchNoise::new(0, 1), &mut |_| true).unwrap();
    let diff = max_rel_diff(&out.final_latents, &r["final_latents"]);
    println!("{case_name}: relative error vs diffusers {diff:e}");
    assert!(diff <= TOLERANCE, "{case_name}: final latents differ by {diff} (relative)");
}

#[test]
fn sd15_img2img_matches_diffusers() {
    parity("sd15-img2img");
}

#[test]
fn sd_turbo_img2img_matches_diffusers() {
    parity("sd-turbo-img2img");
}

#[test]
fn sdxl_img2img_matches_diffusers() {
    parity("sdxl-img2img");
}

#[test]
fn latent_blend_inpainting_on_a_regular_model_matches_diffusers() {
    parity("sd15-blend-inpaint");
}

#[test]
fn sd15_inpainting_unet_matches_diffusers() {
    parity("sd15-inpaint");
}

#[test]
fn sdxl_inpainting_unet_matches_diffusers() {
    parity("sdxl-inpaint");
}
