//! Parity with HF diffusers: every stage of every family's miniature against reference tensors that
//! `tools/parity/models.py` computed with diffusers 0.42.1 / transformers 5.23 / torch 2.15 (CPU, f32) from the same
//! folders (`imago dev tiny-model --family F --seed 0`). Regenerate with `tools/parity/run.sh`.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{load, max_abs_diff, tiny_model_dir};
use imago::diffusion::model::DiffusionModel;
use imago::diffusion::pipeline::{BatchNoise, GenerateParams};
use imago::diffusion::tiny::TinyFamily;
use imago::diffusion::unet::TextTimeConditioning;
use serde::Deserialize;

/// Largest error accepted anywhere, f32 against f32. Measured maxima are printed by each test (`--nocapture`).
const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Settings {
    prompt: String,
    negative_prompt: String,
    scheduler: String,
    steps: usize,
    guidance: f64,
}

struct Reference {
    tensors: HashMap<String, Tensor>,
    settings: Settings,
}

impl Reference {
    fn load(family: TinyFamily) -> Self {
        let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/parity/models").join(family.name());
        let tensors = candle_core::safetensors::load(base.with_extension("safetensors"), &Device::Cpu).unwrap();
        let settings = serde_json::from_str(&std::fs::read_to_string(base.with_extension("json")).unwrap()).unwrap();
        Self { tensors, settings }
    }

    fn get(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("reference has no {name}"))
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

fn check(family: TinyFamily, what: &str, ours: &Tensor, reference: &Tensor, worst: &mut f32) {
    let diff = max_abs_diff(ours, reference);
    assert!(diff <= TOLERANCE, "{family} {what}: max abs error {diff} > {TOLERANCE}");
    *worst = worst.max(diff);
}

fn check_text_encoders(family: TinyFamily, model: &DiffusionModel, r: &Reference, worst: &mut f32) {
    for (i, encoder) in model.text_encoders.iter().enumerate() {
        let name = format!("te{}", i + 1);
        let tokens = encoder.tokenizer.encode(&r.settings.prompt, encoder.pad_id).unwrap();
        let expected: Vec<u32> =
            r.get(&format!("{name}/ids")).flatten_all().unwrap().to_dtype(DType::U32).unwrap().to_vec1().unwrap();
        assert_eq!(tokens.ids, expected, "{family} {name} token ids");
        let ids = Tensor::new(tokens.ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let out = encoder.model.forward(&ids, &[tokens.eos_position]).unwrap();
        check(family, &format!("{name} last hidden"), &out.last_hidden, r.get(&format!("{name}/last_hidden")), worst);
        check(
            family,
            &format!("{name} penultimate"),
            &out.penultimate_hidden,
            r.get(&format!("{name}/penultimate_hidden")),
            worst,
        );
        if r.has(&format!("{name}/pooled")) {
            check(
                family,
                &format!("{name} pooled"),
                out.pooled.as_ref().unwrap(),
                r.get(&format!("{name}/pooled")),
                worst,
            );
        }
    }
}

fn check_prompt_embeddings(family: TinyFamily, model: &DiffusionModel, r: &Reference, worst: &mut f32) {
    let cond = model.encode_prompt(&r.settings.prompt, 1, false).unwrap();
    let uncond = model.encode_prompt(&r.settings.negative_prompt, 1, true).unwrap();
    check(family, "prompt embeds", &cond.context, r.get("prompt_embeds"), worst);
    check(family, "negative embeds", &uncond.context, r.get("negative_embeds"), worst);
    if r.has("pooled") {
        check(family, "pooled", cond.pooled.as_ref().unwrap(), r.get("pooled"), worst);
        check(family, "negative pooled", uncond.pooled.as_ref().unwrap(), r.get("negative_pooled"), worst);
    }
}

fn check_unet(family: TinyFamily, model: &DiffusionModel, r: &Reference, worst: &mut f32) {
    let context = Tensor::cat(&[r.get("negative_embeds"), r.get("prompt_embeds")], 0).unwrap();
    let added = r.has("pooled").then(|| TextTimeConditioning {
        text_embeds: Tensor::cat(&[r.get("negative_pooled"), r.get("pooled")], 0).unwrap(),
        time_ids: r.get("unet/time_ids").clone(),
    });
    for t in [999, 500, 1] {
        let out = model.unet.forward(r.get("unet/sample"), t as f64, &context, added.as_ref()).unwrap();
        check(family, &format!("unet t={t}"), &out, r.get(&format!("unet/out_t{t}")), worst);
    }
}

fn check_vae(family: TinyFamily, model: &DiffusionModel, r: &Reference, worst: &mut f32) {
    let decoded = model.vae.decode(r.get("vae/latents")).unwrap();
    check(family, "vae decode", &decoded, r.get("vae/decoded"), worst);
    let encoded = model.vae.encode(r.get("vae/image")).unwrap();
    check(family, "vae encode mean", &encoded.mean, r.get("vae/encoded_mean"), worst);
}

fn check_txt2img(family: TinyFamily, model: &DiffusionModel, r: &Reference) {
    let s = &r.settings;
    let params = GenerateParams {
        prompt: s.prompt.clone(),
        negative_prompt: s.negative_prompt.clone(),
        width: 64,
        height: 64,
        steps: s.steps,
        guidance: s.guidance,
        seed: 0,
        scheduler: s.scheduler.parse().unwrap(),
        batch: 1,
    };
    let mut unused_noise = BatchNoise::new(0, 1);
    let out =
        model.generate_from_noise(&params, r.get("txt2img/noise").clone(), &mut unused_noise, &mut |_| true).unwrap();
    // Guidance multiplies the cond−uncond difference and errors accumulate over steps, so the whole loop is held to
    // a relative bound: max error over the latents' largest magnitude.
    let reference = r.get("txt2img/final_latents");
    let scale = reference.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let relative = max_abs_diff(&out.final_latents, reference) / scale;
    println!("{family} txt2img: relative error {relative:e} (latents up to {scale})");
    assert!(relative <= TOLERANCE, "{family} txt2img final latents: relative error {relative}");
    // diffusers returns floats in [0, 1]; we round to u8 as its PIL conversion does: at most one level apart.
    let reference_u8 = (r.get("txt2img/image") * 255.0).unwrap().round().unwrap();
    let diff = max_abs_diff(&out.images.to_dtype(DType::F32).unwrap(), &reference_u8);
    assert!(diff <= 1.0, "{family} txt2img pixels differ by {diff} levels");
}

fn parity(family: TinyFamily) {
    let model = load(&tiny_model_dir(family));
    let r = Reference::load(family);
    let mut worst = 0f32;
    check_text_encoders(family, &model, &r, &mut worst);
    check_prompt_embeddings(family, &model, &r, &mut worst);
    check_unet(family, &model, &r, &mut worst);
    check_vae(family, &model, &r, &mut worst);
    check_txt2img(family, &model, &r);
    println!("{family}: max abs error vs diffusers {worst:e}");
}

#[test]
fn sd15_matches_diffusers() {
    parity(TinyFamily::Sd15);
}

#[test]
fn sd21_v_prediction_matches_diffusers() {
    parity(TinyFamily::Sd21);
}

#[test]
fn sd_turbo_matches_diffusers() {
    parity(TinyFamily::SdTurbo);
}

#[test]
fn sdxl_matches_diffusers() {
    parity(TinyFamily::Sdxl);
}

#[test]
fn sdxl_turbo_matches_diffusers() {
    parity(TinyFamily::SdxlTurbo);
}
