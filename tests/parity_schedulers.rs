//! Parity of our schedulers with HF diffusers 0.42.1.
//!
//! `tests/parity/schedulers.safetensors` (+ `.json` manifest) holds diffusers' timesteps, initial sigma, whole
//! trajectories and `add_noise` results for every scheduler kind × model config × step count, recorded by
//! `tools/parity/schedulers.py`. We replay each case: same config JSON, same initial latent, same model outputs,
//! same ancestral noise, and compare every step's sample.
//!
//! Measured max error (CPU, diffusers 0.42.1), published configs (sd15, sd21, turbo, sdxl), absolute: timesteps 0
//! (identical), init_noise_sigma 1.9e-9, add_noise 4.8e-7, model inputs 3.8e-6, samples: ddim 5.7e-6, euler 3.8e-6,
//! euler-a 6.2e-6, dpm++2m 5.3e-6, dpm++2m-karras 7.6e-6. High-sigma synthetic configs, relative to the trajectory's
//! magnitude: samples ≤ 1.7e-6 (dpm++2m, dpm++2m-karras), ≤ 1.2e-7 (ddim, euler, euler-a).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Shape, Tensor};
use imago::diffusion::schedulers::{self, SchedulerConfig, SchedulerKind, StepNoise};
use serde::Deserialize;

/// Max abs error allowed against diffusers.
const TOLERANCE: f64 = 1e-5;

/// Synthetic configs whose largest sigma (157 for the default linear betas, 20291 for the cosine schedule) makes the
/// latents so large that float32 spacing alone exceeds [`TOLERANCE`]; their errors are measured relative to the
/// largest magnitude the reference trajectory has reached so far (a 1-ulp difference at 6e4 is 4e-3).
const HIGH_SIGMA_VARIANTS: [&str; 2] = ["defaults", "cosine"];

#[derive(Deserialize)]
struct Manifest {
    diffusers_version: String,
    variants: HashMap<String, serde_json::Value>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    kind: String,
    variant: String,
    steps: usize,
    prefix: String,
    add_noise_step: usize,
}

/// Replays the noise diffusers drew, one recorded tensor per step.
struct RecordedNoise {
    steps: Vec<Tensor>,
    next: usize,
}

impl StepNoise for RecordedNoise {
    fn sample(&mut self, shape: &Shape, dtype: DType, device: &Device) -> imago::diffusion::Result<Tensor> {
        let noise = self.steps[self.next].clone();
        self.next += 1;
        assert_eq!(noise.shape(), shape);
        Ok(noise.to_dtype(dtype)?.to_device(device)?)
    }
}

/// Largest error per (kind, quantity), for the report printed at the end; fails past the tolerance.
#[derive(Default)]
struct Errors {
    largest: BTreeMap<(String, &'static str), f64>,
    failures: Vec<String>,
}

impl Errors {
    /// Records `error`, an abs error divided by `scale` (1 unless the variant is in [`HIGH_SIGMA_VARIANTS`]).
    fn record(&mut self, kind: &str, quantity: &'static str, error: f64, scale: f64, context: &str) {
        let (quantity, error) = if scale == 1.0 { (quantity, error) } else { (relative_name(quantity), error / scale) };
        if error > TOLERANCE || error.is_nan() {
            self.failures.push(format!("{context}: {quantity} differs from diffusers by {error:e}"));
        }
        let entry = self.largest.entry((kind.to_string(), quantity)).or_insert(0.0);
        *entry = entry.max(error);
    }
}

/// The report label of an error measured relative to the trajectory's magnitude.
fn relative_name(quantity: &'static str) -> &'static str {
    match quantity {
        "samples" => "samples (rel)",
        "model input" => "model input (rel)",
        "add_noise" => "add_noise (rel)",
        "timesteps" => "timesteps (rel)",
        _ => "init sigma (rel)",
    }
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity")
}

#[test]
fn schedulers_match_diffusers_trajectories() {
    let device = Device::Cpu;
    let manifest_path = reference_dir().join("schedulers.json");
    let manifest: Manifest = serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    let reference = candle_core::safetensors::load(reference_dir().join("schedulers.safetensors"), &device).unwrap();
    let get = |name: &str| reference.get(name).unwrap_or_else(|| panic!("{name} missing from the reference file"));
    assert!(manifest.cases.len() >= 60, "only {} cases recorded", manifest.cases.len());

    let mut errors = Errors::default();
    let mut kinds_seen = Vec::new();
    for case in &manifest.cases {
        let context = format!("{} (diffusers {})", case.prefix, manifest.diffusers_version);
        let kind: SchedulerKind = case.kind.parse().unwrap();
        kinds_seen.push(kind);
        let high_sigma = HIGH_SIGMA_VARIANTS.contains(&case.variant.as_str());
        let config_json = manifest.variants[&case.variant].to_string();
        let config = SchedulerConfig::from_json_str(&config_json, &manifest_path).unwrap();
        let mut scheduler = schedulers::build(kind, &config, case.steps).unwrap();

        let expected_timesteps = get(&format!("{}/timesteps", case.prefix)).to_vec1::<f64>().unwrap();
        assert_eq!(scheduler.timesteps().len(), expected_timesteps.len(), "{context}: step count");
        let timestep_error =
            scheduler.timesteps().iter().zip(&expected_timesteps).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        errors.record(&case.kind, "timesteps", timestep_error, 1.0, &context);
        let expected_sigma = get(&format!("{}/init_noise_sigma", case.prefix)).to_vec1::<f64>().unwrap()[0];
        let sigma_error = (scheduler.init_noise_sigma() - expected_sigma).abs();
        errors.record(
            &case.kind,
            "init_noise_sigma",
            sigma_error,
            if high_sigma { expected_sigma } else { 1.0 },
            &context,
        );

        let model_outputs = get(&format!("{}/model_outputs", case.prefix));
        let samples = get(&format!("{}/samples", case.prefix));
        let mut noise = RecordedNoise { steps: Vec::new(), next: 0 };
        if kind == SchedulerKind::EulerAncestral {
            let recorded = get(&format!("{}/step_noise", case.prefix));
            noise.steps = (0..expected_timesteps.len()).map(|i| recorded.i(i).unwrap()).collect();
        }
        let mut sample = get("inputs/x").affine(scheduler.init_noise_sigma(), 0.0).unwrap();
        // Largest magnitude of the reference trajectory so far: the scale of float32 error it can carry.
        let mut magnitude = max_abs(&sample).max(1.0);
        for (i, &t) in scheduler.timesteps().to_vec().iter().enumerate() {
            let step_context = format!("{context} step {i}");
            let scale = if high_sigma { magnitude } else { 1.0 };
            // The script's stand-in model: checks scale_model_input (and the timestep) through its output.
            let scaled = scheduler.scale_model_input(&sample, i).unwrap();
            let our_output = scaled.affine(0.5, 0.1 * (t / 100.0).cos()).unwrap();
            let model_output = model_outputs.i(i).unwrap();
            errors.record(&case.kind, "model input", max_abs_diff(&our_output, &model_output), scale, &step_context);
            sample = scheduler.step(&model_output, i, &sample, &mut noise).unwrap();
            let expected = samples.i(i).unwrap();
            errors.record(&case.kind, "samples", max_abs_diff(&sample, &expected), scale, &step_context);
            magnitude = magnitude.max(max_abs(&expected));
        }

        let fresh = schedulers::build(kind, &config, case.steps).unwrap();
        let noisy = fresh.add_noise(get("inputs/clean"), get("inputs/noise"), case.add_noise_step).unwrap();
        let expected = get(&format!("{}/add_noise", case.prefix));
        let scale = if high_sigma { max_abs(expected).max(1.0) } else { 1.0 };
        errors.record(&case.kind, "add_noise", max_abs_diff(&noisy, expected), scale, &context);
    }
    for ((kind, quantity), error) in &errors.largest {
        println!("{kind:>15} {quantity:>18}: max error {error:.2e}");
    }
    assert!(
        errors.failures.is_empty(),
        "{} comparisons past {TOLERANCE:e}:\n{}",
        errors.failures.len(),
        errors.failures.join("\n")
    );
    for kind in SchedulerKind::ALL {
        assert!(kinds_seen.contains(&kind), "no reference case for {kind}");
    }
}
