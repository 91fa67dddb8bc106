//! Content tests of the embedded default model (`models/default`): for a grid of captions (colours × shapes ×
//! backgrounds) and several seeds, a classifier written here (border colour, colour of the pixels far from it,
//! fill ratio and vertical skewness of the shape) must agree with the caption. The classifier is first checked on
//! the training pictures themselves, so a failure points at the model, not at the classifier.
//!
//! `cargo test --test default_model -- --nocapture` prints the per-caption table;
//! `IMAGO_CONTENT_TEST_FIRST_SEED=7000000` draws the grid from other seeds.

#[path = "default_model/classify.rs"]
mod classify;
#[path = "../examples/train_default/scenes.rs"]
#[allow(dead_code)]
mod scenes;

use std::sync::OnceLock;

use candle_core::Tensor;
use classify::{classify, Reading};
use imago::diffusion::default_model::default_model_dir;
use imago::diffusion::edit::{EditInputs, EditParams};
use imago::diffusion::model::{DiffusionModel, LoadOptions};
use imago::diffusion::noise::NoiseSource;
use imago::diffusion::pipeline::GenerateRequest;
use scenes::{CaptionParts, Scene, Shape, BACKGROUNDS, SHAPE_COLOURS};

/// Seeds per caption.
const SEEDS: usize = 8;
/// Shape colours of the grid (all of them).
const GRID_COLOURS: [usize; 6] = [0, 1, 2, 3, 4, 5];
/// Backgrounds of the grid: white and black.
const GRID_BACKGROUNDS: [usize; 2] = [0, 1];

fn model() -> &'static DiffusionModel {
    static MODEL: OnceLock<DiffusionModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = default_model_dir().expect("models/default is committed with the source");
        DiffusionModel::load(&dir, &LoadOptions::cpu()).expect("the default model loads")
    })
}

/// RGB bytes (row-major, 3 per pixel) of image `i` of a (batch, 3, h, w) u8 tensor.
fn image_bytes(images: &Tensor, i: usize) -> Vec<u8> {
    images.get(i).unwrap().permute((1, 2, 0)).unwrap().flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn rendered_bytes(scene: &Scene, side: usize) -> Vec<u8> {
    let chw = scene.render(side);
    (0..side * side)
        .flat_map(|p| (0..3).map(move |c| c * side * side + p))
        .map(|i| ((chw[i] + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
        .collect()
}

#[test]
fn classifier_reads_the_training_pictures() {
    let mut rng = NoiseSource::new(12345);
    let (mut colour_ok, mut background_ok, mut shape_misreads) = (0, 0, Vec::new());
    let n = 400;
    for _ in 0..n {
        let scene = Scene::sample(&mut rng);
        let reading = classify(&rendered_bytes(&scene, 32), 32);
        colour_ok += (reading.colour == Some(scene.colour)) as usize;
        background_ok += (reading.background == Some(scene.background)) as usize;
        if reading.shape != Some(scene.shape) {
            shape_misreads.push(format!("{scene:?} read as {reading:?}"));
        }
    }
    assert_eq!((colour_ok, background_ok), (n, n), "colours misread on clean renders");
    assert!(shape_misreads.len() * 100 <= n, "shapes misread on clean renders:\n{}", shape_misreads.join("\n"));
}

#[test]
fn the_default_model_loads_with_its_declared_defaults() {
    let model = model();
    let params = model
        .params(GenerateRequest { prompt: "a red star on a white background".into(), ..Default::default() })
        .unwrap();
    assert_eq!((params.width, params.height), (32, 32));
    assert_eq!(params.steps, model.defaults.steps.unwrap());
    assert_eq!(model.vae_scale_factor(), 4);
}

/// Per-caption agreement counts.
#[derive(Default, Clone, Copy)]
struct Tally {
    colour: usize,
    colour_and_background: usize,
    shape: usize,
    all: usize,
    images: usize,
}

impl Tally {
    fn add(&mut self, reading: &Reading, scene: &Scene) {
        let colour = reading.colour == Some(scene.colour);
        let background = reading.background == Some(scene.background);
        let shape = reading.shape == Some(scene.shape);
        self.colour += colour as usize;
        self.colour_and_background += (colour && background) as usize;
        self.shape += shape as usize;
        self.all += (colour && background && shape) as usize;
        self.images += 1;
    }

    fn merge(&mut self, other: &Tally) {
        self.colour += other.colour;
        self.colour_and_background += other.colour_and_background;
        self.shape += other.shape;
        self.all += other.all;
        self.images += other.images;
    }

    fn rate(&self, count: usize) -> f64 {
        count as f64 / self.images.max(1) as f64
    }
}

#[test]
fn the_default_model_draws_what_the_caption_says() {
    let model = model();
    // Another seed range draws the same grid from other noise, to check that settings chosen on this test are not
    // fitted to its seeds (models/default/README.md, "shape on held-out seeds").
    let first_seed = match std::env::var("IMAGO_CONTENT_TEST_FIRST_SEED") {
        Ok(value) => value.parse::<u64>().expect("IMAGO_CONTENT_TEST_FIRST_SEED is a whole number"),
        Err(_) => 1000,
    };
    let mut total = Tally::default();
    let mut by_shape = [Tally::default(); 4];
    for (s, &shape) in Shape::ALL.iter().enumerate() {
        for &colour in &GRID_COLOURS {
            for &background in &GRID_BACKGROUNDS {
                // Only the named attributes matter to the classifier; size and position are left to the model.
                let scene = Scene {
                    shape,
                    colour,
                    background,
                    size: scenes::Size::Large,
                    position: scenes::Position::Center,
                    radius: 0.0,
                    centre: (0.5, 0.5),
                };
                let prompt = scene.caption(CaptionParts { size: false, position: false });
                let seed = first_seed + 100 * (s * 100 + colour * 10 + background) as u64;
                let request = GenerateRequest { prompt: prompt.clone(), seed, batch: SEEDS, ..Default::default() };
                let params = model.params(request).unwrap();
                let images = model.generate(&params, &mut |_| true).unwrap().images;
                let mut tally = Tally::default();
                let mut misreads = Vec::new();
                for i in 0..SEEDS {
                    let reading = classify(&image_bytes(&images, i), params.width);
                    tally.add(&reading, &scene);
                    if reading.shape != Some(shape) || reading.colour != Some(colour) {
                        misreads.push(format!(
                            "seed {}: {:?} {:?} fill {:.2} skew {:.2}",
                            seed + i as u64,
                            reading.colour.map(|c| SHAPE_COLOURS[c].0),
                            reading.shape,
                            reading.fill,
                            reading.skew
                        ));
                    }
                }
                println!(
                    "{prompt:45} colour {}/{SEEDS} +background {}/{SEEDS} shape {}/{SEEDS} {}",
                    tally.colour,
                    tally.colour_and_background,
                    tally.shape,
                    misreads.join("; ")
                );
                total.merge(&tally);
                by_shape[s].merge(&tally);
            }
        }
    }
    for (shape, tally) in Shape::ALL.iter().zip(&by_shape) {
        println!("{:8} shape accuracy {:.1}%", shape.word(), 100.0 * tally.rate(tally.shape));
    }
    let (colour, pair, shape, all) = (
        total.rate(total.colour),
        total.rate(total.colour_and_background),
        total.rate(total.shape),
        total.rate(total.all),
    );
    println!(
        "{} images: colour {:.1}%, colour+background {:.1}%, shape {:.1}%, all three {:.1}% (backgrounds: {})",
        total.images,
        100.0 * colour,
        100.0 * pair,
        100.0 * shape,
        100.0 * all,
        GRID_BACKGROUNDS.map(|b| BACKGROUNDS[b].0).join(", ")
    );
    assert!(colour >= 0.9, "colour agrees for {:.1}% of images", 100.0 * colour);
    assert!(pair >= 0.9, "colour and background agree for {:.1}% of images", 100.0 * pair);
    // Squares are the hard shape: the model rounds their corners, and a square whose bounding box it fills less
    // than a square's is read as a circle. The shipped model reads 85 % of them here (see
    // models/default/README.md); the bar leaves a margin for rounding differences between machines.
    for (shape, tally) in Shape::ALL.iter().zip(&by_shape) {
        let bar = if *shape == Shape::Square { 0.8 } else { 0.9 };
        let rate = tally.rate(tally.shape);
        assert!(rate >= bar, "{} agrees for {:.1}%", shape.word(), 100.0 * rate);
    }
    assert!(shape >= 0.9, "shape agrees for {:.1}% of images", 100.0 * shape);
}

/// The default model edits too (its VAE has 8 latent channels, not SD's 4): from a rendered picture and a caption
/// that changes only the colour, image-to-image keeps the shape and takes the new colour.
#[test]
fn the_default_model_recolours_a_picture_by_image_to_image() {
    let model = model();
    let (mut colour_ok, mut shape_ok, mut total) = (0, 0, 0);
    let mut misreads = Vec::new();
    for (s, &shape) in [Shape::Circle, Shape::Triangle, Shape::Star].iter().enumerate() {
        for (from, to) in [(0, 2), (2, 3)] {
            let scene = Scene {
                shape,
                colour: from,
                background: 0,
                size: scenes::Size::Large,
                position: scenes::Position::Center,
                radius: 0.0,
                centre: (0.5, 0.5),
            };
            let picture = image::RgbImage::from_raw(32, 32, rendered_bytes(&scene, 32)).unwrap();
            let target = Scene { colour: to, ..scene };
            let prompt = target.caption(CaptionParts { size: false, position: false });
            let seed = 5000 + 10 * (s * 10 + from) as u64;
            let request = GenerateRequest { prompt, seed, batch: 4, ..Default::default() };
            let params = EditParams { generate: model.params(request).unwrap(), strength: 0.8, mask_blur: 0.0 };
            let inputs = EditInputs { image: &picture, mask: None };
            let images = model.edit(&params, &inputs, &mut |_| true).unwrap().images;
            for i in 0..4 {
                let reading = classify(&image_bytes(&images, i), 32);
                total += 1;
                colour_ok += (reading.colour == Some(to)) as usize;
                shape_ok += (reading.shape == Some(shape)) as usize;
                if reading.colour != Some(to) || reading.shape != Some(shape) {
                    misreads.push(format!("{:?} {} -> {}: read {reading:?}", shape, from, to));
                }
            }
        }
    }
    println!("image-to-image: colour {colour_ok}/{total}, shape {shape_ok}/{total}\n{}", misreads.join("\n"));
    assert!(colour_ok * 10 >= total * 9, "new colour in {colour_ok}/{total}:\n{}", misreads.join("\n"));
    assert!(shape_ok * 10 >= total * 9, "shape kept in {shape_ok}/{total}:\n{}", misreads.join("\n"));
}
