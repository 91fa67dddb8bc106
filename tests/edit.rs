//! Editing real photos (tests/data/photos: public-domain / CC0, PNG, JPEG and WebP) on miniature models:
//! inpainting preserves unmasked pixels exactly, strength 0 returns the VAE round trip of the input, strength 1
//! all but ignores the input, and edits are deterministic per seed.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use common::{load, tiny_model_dir};
use image::{GrayImage, RgbImage};
use imago::diffusion::edit::{EditInputs, EditParams};
use imago::diffusion::input::{decode_image, fit_image, InputLimits};
use imago::diffusion::model::DiffusionModel;
use imago::diffusion::pipeline::{GenerateRequest, Generated};
use imago::diffusion::tiny::TinyFamily;

fn photo(name: &str) -> RgbImage {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/photos").join(name);
    let image = decode_image(&std::fs::read(path).unwrap(), &InputLimits::default()).unwrap();
    fit_image(&image, 64, 64)
}

/// Repaint the right half.
fn right_half_mask() -> GrayImage {
    GrayImage::from_fn(64, 64, |x, _| image::Luma([if x >= 32 { 255 } else { 0 }]))
}

fn params(model: &DiffusionModel, strength: f64, steps: usize, mask_blur: f32) -> EditParams {
    let request = GenerateRequest {
        prompt: "a cat in space".into(),
        size: Some((64, 64)),
        steps: Some(steps),
        seed: 11,
        batch: 1,
        ..Default::default()
    };
    EditParams { generate: model.params(request).unwrap(), strength, mask_blur }
}

fn edit(model: &DiffusionModel, p: &EditParams, image: &RgbImage, mask: Option<&GrayImage>) -> Generated {
    model.edit(p, &EditInputs { image, mask }, &mut |_| true).unwrap()
}

fn pixels(g: &Generated) -> RgbImage {
    imago::diffusion::image_io::tensor_to_images(&g.images).unwrap().remove(0)
}

#[test]
fn inpainting_leaves_unmasked_pixels_exactly_as_they_were() {
    let image = photo("astronaut.png");
    let mask = right_half_mask();
    for family in [TinyFamily::Sd15, TinyFamily::Sd15Inpaint, TinyFamily::SdxlInpaint] {
        let model = load(&tiny_model_dir(family));
        let out = pixels(&edit(&model, &params(&model, 1.0, 3, 0.0), &image, Some(&mask)));
        let mut changed_inside = 0;
        for (x, y, p) in out.enumerate_pixels() {
            if x < 32 {
                assert_eq!(p, image.get_pixel(x, y), "{family}: kept pixel ({x}, {y}) changed");
            } else if p != image.get_pixel(x, y) {
                changed_inside += 1;
            }
        }
        assert!(changed_inside > 32 * 64 / 2, "{family}: only {changed_inside} masked pixels were repainted");
    }
}

#[test]
fn a_blurred_mask_keeps_pixels_beyond_the_blur_reach() {
    let image = photo("coffee.jpg");
    let model = load(&tiny_model_dir(TinyFamily::Sd15));
    let out = pixels(&edit(&model, &params(&model, 1.0, 2, 2.0), &image, Some(&right_half_mask())));
    // A Gaussian of sigma 2 reaches ~3 sigma: columns left of 26 are untouched, the seam itself is blended.
    for (x, y, p) in out.enumerate_pixels().filter(|(x, _, _)| *x < 26) {
        assert_eq!(p, image.get_pixel(x, y), "pixel ({x}, {y})");
    }
    let seam_blended = (0..64).any(|y| out.get_pixel(31, y) != image.get_pixel(31, y));
    assert!(seam_blended, "the seam should mix old and new pixels");
}

#[test]
fn strength_zero_returns_the_vae_round_trip_of_the_input() {
    let image = photo("chelsea.webp");
    let model = load(&tiny_model_dir(TinyFamily::Sd15));
    let out = edit(&model, &params(&model, 0.0, 4, 0.0), &image, None);
    // The round trip computed independently: encode (posterior mean), decode, round to pixels.
    let (w, h) = image.dimensions();
    let t = Tensor::from_vec(image.as_raw().clone(), (h as usize, w as usize, 3), &model.device).unwrap();
    let t = t.permute((2, 0, 1)).unwrap().unsqueeze(0).unwrap().to_dtype(DType::F32).unwrap();
    let latents = model.encode_latents(&t.affine(2.0 / 255.0, -1.0).unwrap()).unwrap();
    let decoded = model.vae.decode(&latents).unwrap();
    let expected = ((decoded * 127.5).unwrap() + 127.5).unwrap().clamp(0f32, 255f32).unwrap().round().unwrap();
    let got = out.images.to_dtype(DType::F32).unwrap();
    let diff = common::max_abs_diff(&got, &expected);
    assert!(diff <= 1.0, "strength 0 differs from the VAE round trip by {diff} levels");
}

#[test]
fn strength_one_all_but_ignores_the_input_and_half_strength_does_not() {
    let model = load(&tiny_model_dir(TinyFamily::SdTurbo));
    let (a, b) = (photo("astronaut.png"), photo("coffee.jpg"));
    let spread = |strength: f64| {
        let p = params(&model, strength, 2, 0.0);
        let (x, y) = (edit(&model, &p, &a, None), edit(&model, &p, &b, None));
        common::max_rel_diff(&x.final_latents, &y.final_latents)
    };
    let (full, half) = (spread(1.0), spread(0.5));
    println!("two photos' latents differ by {full:.4} at strength 1, {half:.4} at strength 0.5 (relative)");
    assert!(full < 0.25 * half, "strength 1 kept too much of the input: {full} vs {half}");
}

#[test]
fn edits_are_deterministic_per_seed() {
    let image = photo("astronaut.png");
    let model = load(&tiny_model_dir(TinyFamily::Sdxl));
    let p = params(&model, 0.6, 3, 0.0);
    let (x, y) = (edit(&model, &p, &image, None), edit(&model, &p, &image, None));
    assert_eq!(common::max_abs_diff(&x.images, &y.images), 0.0);
}
