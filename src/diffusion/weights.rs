//! Finding and memory-mapping a component's safetensors weights.
//!
//! A diffusers component folder holds `diffusion_pytorch_model[.fp16].safetensors` (UNet, VAE) or
//! `model[.fp16].safetensors` (text encoders), possibly sharded with an `.index.json`. PyTorch pickles (`.bin`) are
//! refused: unpickling runs code chosen by the file's author.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use serde::Deserialize;

use super::config::read_json;
use super::{Error, Result};

/// Which stored precision to prefer when a folder has both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `*.safetensors`
    Full,
    /// `*.fp16.safetensors`
    Fp16,
}

impl Variant {
    fn suffix(self) -> &'static str {
        match self {
            Variant::Full => "",
            Variant::Fp16 => ".fp16",
        }
    }

    fn other(self) -> Self {
        match self {
            Variant::Full => Variant::Fp16,
            Variant::Fp16 => Variant::Full,
        }
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The safetensors files of the component in `dir` whose files are named `stem` (e.g. `diffusion_pytorch_model`),
/// preferring `variant` and falling back to the other one.
pub fn find_weights(dir: &Path, stem: &str, variant: Variant) -> Result<Vec<PathBuf>> {
    for v in [variant, variant.other()] {
        let single = dir.join(format!("{stem}{}.safetensors", v.suffix()));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{stem}{}.safetensors.index.json", v.suffix()));
        if index.is_file() {
            let shards: ShardIndex = read_json(&index)?;
            let files: BTreeSet<&String> = shards.weight_map.values().collect();
            let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
            if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
                return Err(Error::MissingFile { path: missing.clone() });
            }
            return Ok(paths);
        }
    }
    let pickle = dir.join(format!("{stem}.bin"));
    if pickle.is_file() {
        return Err(Error::Weights {
            path: pickle,
            message: "only PyTorch pickle weights found; pickles are not loaded (they can run code): \
                      convert the folder to safetensors"
                .into(),
        });
    }
    Err(Error::MissingFile { path: dir.join(format!("{stem}.safetensors")) })
}

/// Bytes of the tensors that var builders handed out (in their loaded dtype, on their device): what a model
/// occupies once loaded. Clones share one count.
#[derive(Debug, Clone, Default)]
pub struct LoadedBytes(Arc<AtomicU64>);

impl LoadedBytes {
    /// Bytes counted so far.
    pub fn total(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, tensor: &Tensor) {
        let bytes = tensor.elem_count() as u64 * tensor.dtype().size_in_bytes() as u64;
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Memory-mapped safetensors that count every tensor they hand out.
struct CountingBackend {
    files: MmapedSafetensors,
    loaded: LoadedBytes,
}

impl SimpleBackend for CountingBackend {
    fn get(&self, shape: Shape, name: &str, hints: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = SimpleBackend::get(&self.files, shape, name, hints, dtype, dev)?;
        self.loaded.add(&tensor);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = SimpleBackend::get_unchecked(&self.files, name, dtype, dev)?;
        self.loaded.add(&tensor);
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        SimpleBackend::contains_tensor(&self.files, name)
    }
}

/// Memory-maps `files` as one weight tree, converting to `dtype` on `device` as tensors are read and adding their
/// size to `loaded`.
pub fn mmap_var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    loaded: &LoadedBytes,
) -> Result<VarBuilder<'static>> {
    // SAFETY: the files are mapped read-only; candle's contract is that they are not modified while mapped. Model
    // folders are read-only inputs of this process, and every tensor is copied (dtype/device conversion) on load.
    let mapped = unsafe { MmapedSafetensors::multi(files) }
        .map_err(|e| Error::Weights { path: files.first().cloned().unwrap_or_default(), message: e.to_string() })?;
    let backend = CountingBackend { files: mapped, loaded: loaded.clone() };
    Ok(VarBuilder::from_backend(Box::new(backend), dtype, device.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, name: &str) {
        std::fs::write(dir.join(name), b"x").unwrap();
    }

    #[test]
    fn prefers_the_requested_variant_and_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), "model.safetensors");
        touch(dir.path(), "model.fp16.safetensors");
        let full = find_weights(dir.path(), "model", Variant::Full).unwrap();
        let half = find_weights(dir.path(), "model", Variant::Fp16).unwrap();
        assert_eq!(full, vec![dir.path().join("model.safetensors")]);
        assert_eq!(half, vec![dir.path().join("model.fp16.safetensors")]);
        std::fs::remove_file(dir.path().join("model.fp16.safetensors")).unwrap();
        assert_eq!(find_weights(dir.path(), "model", Variant::Fp16).unwrap(), full);
    }

    #[test]
    fn sharded_weights_list_each_shard_once_and_report_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors", "c": "model-1.safetensors"}}"#,
        )
        .unwrap();
        touch(dir.path(), "model-1.safetensors");
        let err = find_weights(dir.path(), "model", Variant::Full).unwrap_err();
        assert!(matches!(&err, Error::MissingFile { path } if path.ends_with("model-2.safetensors")), "{err}");
        touch(dir.path(), "model-2.safetensors");
        assert_eq!(find_weights(dir.path(), "model", Variant::Full).unwrap().len(), 2);
    }

    #[test]
    fn pickle_only_folders_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), "diffusion_pytorch_model.bin");
        let err = find_weights(dir.path(), "diffusion_pytorch_model", Variant::Full).unwrap_err().to_string();
        assert!(err.contains("pickle"), "{err}");
    }

    #[test]
    fn empty_folder_names_the_expected_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_weights(dir.path(), "model", Variant::Full).unwrap_err();
        assert!(matches!(&err, Error::MissingFile { path } if path.ends_with("model.safetensors")), "{err}");
    }
}
