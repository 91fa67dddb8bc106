//! Which model a job's `model` name means on this worker, and the loaded models kept in memory (least recently
//! used ones dropped beyond a memory budget).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use super::lru::SizedLru;
use crate::diffusion::hub::{is_repo_id, resolve_model, HubOptions};
use crate::diffusion::model::{DiffusionModel, LoadOptions};
use crate::job::{ErrorCode, JobError};

/// Where model names point: `default` (the embedded model), a folder under `models_dir`, or a hub repo id already
/// in the local cache (workers never download while serving).
#[derive(Debug, Clone)]
pub struct ModelDirectory {
    pub models_dir: Option<PathBuf>,
    pub default_model: Option<PathBuf>,
    pub hub: HubOptions,
}

impl ModelDirectory {
    pub fn resolve(&self, name: &str) -> Result<PathBuf, JobError> {
        let unknown = |why: &str| JobError::new(ErrorCode::UnknownModel, format!("model {name:?}: {why}"));
        if name == "default" {
            return self.default_model.clone().ok_or_else(|| unknown("this worker has no default model"));
        }
        if let Some(dir) = &self.models_dir {
            let candidate = dir.join(name);
            if candidate.join("model_index.json").is_file() {
                return Ok(candidate);
            }
        }
        if is_repo_id(name) {
            let offline = HubOptions { offline: true, ..self.hub.clone() };
            return resolve_model(name, &offline).map_err(|e| unknown(&e.to_string()));
        }
        Err(unknown("not in the models directory"))
    }
}

/// What the model cache did so far and holds now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelCacheStats {
    /// Models read from disk (a model evicted and needed again counts twice).
    pub loads: u64,
    pub evictions: u64,
    /// Model folders in memory, least recently used first.
    pub resident: Vec<PathBuf>,
    /// Bytes of their weights.
    pub resident_bytes: u64,
}

/// Loaded models by folder, loaded on first use. With a memory budget, loading a model that would exceed it
/// evicts the least recently used others; eviction only drops the cache's reference, so a job still running on
/// an evicted model keeps it until it finishes (and a job asking for it meanwhile gets that copy back instead of
/// a second one).
pub struct ModelCache {
    directory: ModelDirectory,
    load: LoadOptions,
    state: Mutex<CacheState>,
}

struct CacheState {
    loaded: SizedLru<PathBuf, Arc<DiffusionModel>>,
    /// Evicted models, alive for as long as some job holds them.
    evicted: HashMap<PathBuf, Weak<DiffusionModel>>,
    loads: u64,
    evictions: u64,
}

impl ModelCache {
    /// `memory_budget`: bytes of weights kept loaded; `None` keeps every model loaded once.
    pub fn new(directory: ModelDirectory, load: LoadOptions, memory_budget: Option<u64>) -> Self {
        let state =
            CacheState { loaded: SizedLru::new(memory_budget), evicted: HashMap::new(), loads: 0, evictions: 0 };
        Self { directory, load, state: Mutex::new(state) }
    }

    /// The model a job names, loading it if needed. Loading happens under the lock: two jobs asking for the same
    /// new model load it once.
    pub fn get(&self, name: &str) -> Result<Arc<DiffusionModel>, JobError> {
        let root = self.directory.resolve(name)?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(model) = state.loaded.get(&root) {
            return Ok(model);
        }
        state.evicted.retain(|_, model| model.strong_count() > 0);
        let model = match state.evicted.remove(&root).and_then(|m| m.upgrade()) {
            Some(in_use) => in_use,
            None => {
                let model = Arc::new(load(&root, &self.load)?);
                state.loads += 1;
                tracing::info!(model = name, path = %root.display(), bytes = model.weight_bytes, "model loaded");
                model
            }
        };
        let bytes = model.weight_bytes;
        if !state.loaded.fits(bytes) {
            tracing::warn!(model = name, bytes, "the model alone exceeds the model memory budget; keeping it anyway");
        }
        for (path, evicted) in state.loaded.insert(root, model.clone(), bytes) {
            tracing::info!(path = %path.display(), bytes = evicted.weight_bytes, "model evicted (least recently used)");
            state.evictions += 1;
            state.evicted.insert(path, Arc::downgrade(&evicted));
        }
        Ok(model)
    }

    pub fn stats(&self) -> ModelCacheStats {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        ModelCacheStats {
            loads: state.loads,
            evictions: state.evictions,
            resident: state.loaded.keys_by_use(),
            resident_bytes: state.loaded.total(),
        }
    }
}

fn load(root: &Path, options: &LoadOptions) -> Result<DiffusionModel, JobError> {
    DiffusionModel::load(root, options)
        .map_err(|e| JobError::new(ErrorCode::Internal, format!("model at {} failed to load: {e}", root.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::tiny::{write_tiny_model, TinyFamily, TinyOptions};

    /// Three miniatures (same family, different seeds: equal sizes) in one models folder.
    fn three_models() -> (tempfile::TempDir, ModelDirectory) {
        let dir = tempfile::tempdir().unwrap();
        for (seed, name) in ["a", "b", "c"].into_iter().enumerate() {
            let options = TinyOptions { family: TinyFamily::SdTurbo, seed: seed as u64, fp16_variant: false };
            write_tiny_model(&dir.path().join(name), options).unwrap();
        }
        let hub = HubOptions { offline: true, ..HubOptions::from_env() };
        let directory = ModelDirectory { models_dir: Some(dir.path().to_path_buf()), default_model: None, hub };
        (dir, directory)
    }

    fn resident_names(cache: &ModelCache) -> Vec<String> {
        let resident = cache.stats().resident;
        resident.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
    }

    /// Bytes of tensor data in the safetensors files under `dir` (file size less the 8-byte length and the header).
    fn stored_tensor_bytes(dir: &Path) -> u64 {
        let mut total = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                total += stored_tensor_bytes(&path);
            } else if path.extension().is_some_and(|e| e == "safetensors") {
                let bytes = std::fs::read(&path).unwrap();
                let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                total += bytes.len() as u64 - 8 - header;
            }
        }
        total
    }

    #[test]
    fn a_model_is_sized_by_its_loaded_tensors() {
        let (dir, _) = three_models();
        let model = DiffusionModel::load(&dir.path().join("a"), &LoadOptions::cpu()).unwrap();
        // The miniature stores exactly the tensors the model reads, in f32 as loaded.
        assert_eq!(model.weight_bytes, stored_tensor_bytes(&dir.path().join("a")));
        let half = LoadOptions { dtype: candle_core::DType::F16, ..LoadOptions::cpu() };
        let f16 = DiffusionModel::load(&dir.path().join("a"), &half).unwrap();
        assert_eq!(2 * f16.weight_bytes, model.weight_bytes, "sizes are counted in the loaded dtype");
    }

    #[test]
    fn loading_past_the_budget_evicts_the_least_recently_used_model() {
        let (_dir, directory) = three_models();
        let size = {
            let unbounded = ModelCache::new(directory.clone(), LoadOptions::cpu(), None);
            unbounded.get("a").unwrap().weight_bytes
        };
        let cache = ModelCache::new(directory, LoadOptions::cpu(), Some(2 * size + size / 2));
        cache.get("a").unwrap();
        cache.get("b").unwrap();
        cache.get("a").unwrap(); // touched: b is now the least recently used
        assert_eq!(cache.stats().loads, 2);
        cache.get("c").unwrap();
        let stats = cache.stats();
        assert_eq!((stats.loads, stats.evictions, stats.resident_bytes), (3, 1, 2 * size));
        assert_eq!(resident_names(&cache), ["a", "c"]);
        cache.get("a").unwrap();
        cache.get("c").unwrap();
        assert_eq!(cache.stats().loads, 3, "resident models are not loaded again");
        cache.get("b").unwrap(); // a was used before c: a goes
        assert_eq!(cache.stats().loads, 4);
        assert_eq!(resident_names(&cache), ["c", "b"]);
    }

    #[test]
    fn an_evicted_model_in_use_stays_alive_and_is_taken_back_without_a_load() {
        let (_dir, directory) = three_models();
        let cache = ModelCache::new(directory, LoadOptions::cpu(), Some(1));
        let running = cache.get("a").unwrap();
        cache.get("b").unwrap(); // budget for none: a is evicted, b kept alone
        assert_eq!(resident_names(&cache), ["b"]);
        assert_eq!(Arc::strong_count(&running), 1, "the cache dropped its reference, the job kept its own");
        let again = cache.get("a").unwrap();
        assert!(Arc::ptr_eq(&running, &again));
        assert_eq!(cache.stats().loads, 2);
        drop((running, again));
        cache.get("b").unwrap(); // evicted while nobody held it: loaded afresh, and a is evicted in turn
        cache.get("a").unwrap();
        assert_eq!(cache.stats().loads, 4);
    }
}
