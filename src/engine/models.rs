//! Which model a job's `model` name means on this worker, and the loaded models kept in memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

/// Loaded models by folder, loaded on first use and kept.
pub struct ModelCache {
    directory: ModelDirectory,
    load: LoadOptions,
    loaded: Mutex<HashMap<PathBuf, Arc<DiffusionModel>>>,
}

impl ModelCache {
    pub fn new(directory: ModelDirectory, load: LoadOptions) -> Self {
        Self { directory, load, loaded: Mutex::new(HashMap::new()) }
    }

    /// The model a job names, loading it if needed. Loading happens under the lock: two jobs asking for the same
    /// new model load it once.
    pub fn get(&self, name: &str) -> Result<Arc<DiffusionModel>, JobError> {
        let root = self.directory.resolve(name)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(model) = loaded.get(&root) {
            return Ok(model.clone());
        }
        let model = Arc::new(load(&root, &self.load)?);
        tracing::info!(model = name, path = %root.display(), "model loaded");
        loaded.insert(root, model.clone());
        Ok(model)
    }
}

fn load(root: &Path, options: &LoadOptions) -> Result<DiffusionModel, JobError> {
    DiffusionModel::load(root, options)
        .map_err(|e| JobError::new(ErrorCode::Internal, format!("model at {} failed to load: {e}", root.display())))
}
