//! Shared test fixtures: miniature model folders written once per test binary.

#![allow(dead_code)]

pub mod nats;
pub mod stress;
pub mod workers;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use imago::diffusion::model::{DiffusionModel, LoadOptions};
use imago::diffusion::tiny::{write_tiny_model, TinyFamily, TinyOptions};

/// The miniature of `family` written with seed 0 (and fp16 variants), shared by all tests of a binary.
pub fn tiny_model_dir(family: TinyFamily) -> PathBuf {
    static DIRS: OnceLock<tempfile::TempDir> = OnceLock::new();
    let root = DIRS.get_or_init(|| tempfile::tempdir().expect("temp dir"));
    let dir = root.path().join(family.name());
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !dir.join("model_index.json").is_file() {
        write_tiny_model(&dir, TinyOptions { family, seed: 0, fp16_variant: true }).expect("tiny model");
    }
    dir
}

pub fn load(dir: &Path) -> DiffusionModel {
    DiffusionModel::load(dir, &LoadOptions::cpu()).expect("load tiny model")
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    let a = a.to_dtype(candle_core::DType::F32).unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// [`max_abs_diff`] relative to the largest magnitude in `reference`: random miniatures produce latents in the
/// tens, so absolute float error scales with them.
pub fn max_rel_diff(a: &candle_core::Tensor, reference: &candle_core::Tensor) -> f32 {
    let scale = reference
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    max_abs_diff(a, reference) / scale.max(f32::MIN_POSITIVE)
}
