//! Shared test fixtures: miniature model folders written once per test binary.

#![allow(dead_code)]

pub mod nats;
pub mod stress;
pub mod workers;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use imago::diffusion::model::{DiffusionModel, LoadOptions};
use imago::diffusion::tiny::{write_tiny_model, TinyFamily, TinyOptions};

/// Where this test binary's miniatures live; removed when the process exits.
static FIXTURE_ROOT: OnceLock<PathBuf> = OnceLock::new();

/// A static is never dropped, so a `TempDir` held in one would leak its folder (tens of MB per test binary, per
/// run). The C library's exit handlers run when the test harness returns from `main`, whatever the tests did.
extern "C" fn remove_fixture_root() {
    if let Some(root) = FIXTURE_ROOT.get() {
        let _ = std::fs::remove_dir_all(root);
    }
}

fn fixture_root() -> &'static Path {
    FIXTURE_ROOT.get_or_init(|| {
        let root = tempfile::Builder::new().prefix("imago-test-models-").tempdir().expect("temp dir").keep();
        // SAFETY: registers a plain function with no arguments; when it runs, at exit, it only reads the static.
        let registered = unsafe { libc::atexit(remove_fixture_root) };
        assert_eq!(registered, 0, "atexit");
        root
    })
}

/// The miniature of `family` written with seed 0 (and fp16 variants), shared by all tests of a binary.
pub fn tiny_model_dir(family: TinyFamily) -> PathBuf {
    let dir = fixture_root().join(family.name());
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
