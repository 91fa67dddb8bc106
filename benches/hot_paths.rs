//! Criterion micro-benchmarks of the hot paths, on the CPU: one UNet call and one VAE decode of the SD 1.5
//! miniature, a scheduler run, PNG encoding and job parsing + validation. Sizes are picked so that each takes
//! milliseconds or less; `imago bench` measures whole generations.
//!
//!     cargo bench --bench hot_paths [-- FILTER]

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use image::RgbImage;
use imago::diffusion::image_io::encode_png;
use imago::diffusion::model::{DiffusionModel, LoadOptions};
use imago::diffusion::noise::NoiseSource;
use imago::diffusion::on_compute_pool;
use imago::diffusion::schedulers::{self, SchedulerKind};
use imago::diffusion::tiny::{write_tiny_model, TinyFamily, TinyOptions};
use imago::job::{parse, validate, JobLimits, JobMessage};

const PROMPT: &str = "a photograph of an astronaut riding a horse";

fn tiny_sd15() -> (tempfile::TempDir, DiffusionModel) {
    let dir = tempfile::tempdir().expect("temp dir");
    write_tiny_model(dir.path(), TinyOptions { family: TinyFamily::Sd15, seed: 0, fp16_variant: false })
        .expect("tiny model");
    let model = DiffusionModel::load(dir.path(), &LoadOptions::cpu()).expect("load tiny model");
    (dir, model)
}

/// Seeded standard normal noise of `shape` on the CPU.
fn noise(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
    NoiseSource::new(seed).tensor(shape, DType::F32, &Device::Cpu).expect("noise")
}

fn model_paths(c: &mut Criterion) {
    let (_dir, model) = tiny_sd15();
    // A guided step of a 128×128 image: conditional and unconditional rows together.
    let context = model.encode_prompt(PROMPT, 2, false).expect("prompt").context;
    let latents = noise((2, 4, 16, 16), 1);
    // On a compute-pool thread, as the pipeline calls the models.
    c.bench_function("unet step: tiny sd15, 2x4x16x16 latents", |b| {
        b.iter(|| {
            on_compute_pool(&Device::Cpu, || model.unet.forward(black_box(&latents), 500.0, &context, None))
                .expect("unet")
        })
    });
    let latents = noise((1, 4, 16, 16), 2);
    c.bench_function("vae decode: tiny sd15, 1x4x16x16 latents to 128x128", |b| {
        b.iter(|| on_compute_pool(&Device::Cpu, || model.vae.decode(black_box(&latents))).expect("decode"))
    });
}

fn scheduler(c: &mut Criterion) {
    let (_dir, model) = tiny_sd15();
    let sample = noise((1, 4, 64, 64), 3);
    let prediction = noise((1, 4, 64, 64), 4);
    c.bench_function("scheduler: dpm++2m, 20 steps over 1x4x64x64", |b| {
        b.iter(|| {
            let mut scheduler = schedulers::build(SchedulerKind::DpmPp2m, &model.scheduler_config, 20).expect("build");
            let mut step_noise = NoiseSource::new(5);
            let mut x = sample.clone();
            for i in 0..20 {
                x = scheduler.step(black_box(&prediction), i, &x, &mut step_noise).expect("step");
            }
            x
        })
    });
}

fn png(c: &mut Criterion) {
    let image = RgbImage::from_fn(512, 512, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]));
    let text = vec![("prompt", PROMPT.to_string()), ("seed", "7".to_string())];
    c.bench_function("png encode: 512x512 rgb with parameters", |b| {
        b.iter(|| encode_png(black_box(&image), &text).expect("png"))
    });
}

fn job(c: &mut Criterion) {
    let message = JobMessage {
        width: Some(512),
        height: Some(512),
        steps: Some(30),
        seed: Some(7),
        scheduler: Some("dpm++2m-karras".into()),
        negative_prompt: "blurry, low quality".into(),
        ..JobMessage::generate("job-0123456789", PROMPT)
    };
    let bytes = serde_json::to_vec(&message).expect("json");
    let limits = JobLimits::default();
    c.bench_function("job: parse + validate", |b| {
        b.iter(|| validate(parse(black_box(&bytes)).expect("parse"), &limits).expect("valid"))
    });
}

fn config() -> Criterion {
    // Short runs: these are for comparing before and after a change on one machine, not for publication.
    Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = hot_paths;
    config = config();
    targets = model_paths, scheduler, png, job
}
criterion_main!(hot_paths);
