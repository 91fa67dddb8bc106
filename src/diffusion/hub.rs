//! Finding a model: a local diffusers folder, a repo id in the Hugging Face cache (offline), or a download with
//! `hf-hub` into that cache where a network exists.

use std::path::{Path, PathBuf};

use super::config::ModelIndex;
use super::{Error, Result};

/// How to resolve repo ids.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The `hub` cache folder (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Never touch the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    pub revision: String,
    /// Download `*.fp16.safetensors` where a repo has them (for f16 inference).
    pub prefer_fp16: bool,
}

impl HubOptions {
    /// Options from the standard Hugging Face environment variables.
    pub fn from_env() -> Self {
        let offline =
            std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
        Self { cache_dir: default_cache_dir(), offline, revision: "main".into(), prefer_fp16: false }
    }
}

fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether `spec` has the shape of a hub repo id (`owner/name`).
pub fn is_repo_id(spec: &str) -> bool {
    let valid = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(spec.split_once('/'), Some((owner, name)) if valid(owner) && valid(name))
}

/// The folder holding `model_index.json` for `spec`: a path, or a repo id found in the cache or downloaded.
pub fn resolve_model(spec: &str, options: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.join("model_index.json").is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        return Err(Error::MissingFile { path: path.join("model_index.json") });
    }
    if !is_repo_id(spec) {
        return Err(Error::ModelNotFound {
            model: spec.into(),
            message: "not a folder with model_index.json, nor a hub repo id (owner/name)".into(),
        });
    }
    if let Some(snapshot) = cached_snapshot(&options.cache_dir, spec, &options.revision) {
        return Ok(snapshot);
    }
    if options.offline {
        return Err(Error::ModelNotFound {
            model: spec.into(),
            message: format!("not in the hub cache {} and offline mode is on", options.cache_dir.display()),
        });
    }
    download(spec, options)
}

/// `models--owner--name/snapshots/<commit>` for the commit `refs/<revision>` names (or `revision` itself when it is a
/// commit hash), if it holds a `model_index.json`.
fn cached_snapshot(cache: &Path, repo_id: &str, revision: &str) -> Option<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let snapshot = repo_dir.join("snapshots").join(commit);
    snapshot.join("model_index.json").is_file().then_some(snapshot)
}

/// Downloads what inference needs (configs, tokenizers, safetensors weights) into the hub cache.
fn download(repo_id: &str, options: &HubOptions) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};
    let not_found = |message: String| Error::ModelNotFound { model: repo_id.into(), message };
    let api = ApiBuilder::new()
        .with_cache_dir(options.cache_dir.clone())
        .with_progress(true)
        .build()
        .map_err(|e| not_found(format!("hub client: {e}")))?;
    let repo = api.repo(Repo::with_revision(repo_id.into(), RepoType::Model, options.revision.clone()));
    let index_path = repo.get("model_index.json").map_err(|e| not_found(format!("model_index.json: {e}")))?;
    let index = ModelIndex::from_file(&index_path)?;
    let variants: &[&str] = if options.prefer_fp16 { &[".fp16", ""] } else { &["", ".fp16"] };
    let first_of = |candidates: Vec<String>| -> Result<()> {
        let mut last_error = String::new();
        for name in &candidates {
            match repo.get(name) {
                Ok(_) => return Ok(()),
                Err(e) => last_error = format!("{name}: {e}"),
            }
        }
        Err(not_found(last_error))
    };
    for (component, _) in index.components.iter().filter(|(name, _)| index.has_component(name)) {
        let weights = |stem: &str| -> Vec<String> {
            variants
                .iter()
                .flat_map(|v| {
                    [
                        format!("{component}/{stem}{v}.safetensors"),
                        format!("{component}/{stem}{v}.safetensors.index.json"),
                    ]
                })
                .collect()
        };
        match component.as_str() {
            "scheduler" => first_of(vec![format!("{component}/scheduler_config.json")])?,
            c if c.starts_with("tokenizer") => {
                for file in ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"] {
                    first_of(vec![format!("{component}/{file}")])?;
                }
            }
            c if c.starts_with("text_encoder") => {
                first_of(vec![format!("{component}/config.json")])?;
                first_of(weights("model"))?;
            }
            "unet" | "vae" => {
                first_of(vec![format!("{component}/config.json")])?;
                first_of(weights("diffusion_pytorch_model"))?;
            }
            _ => {} // safety checker, feature extractor, image encoder: not used for generation
        }
    }
    // Shards named by an index are fetched after it.
    for index_file in walk_shard_indexes(index_path.parent().unwrap_or(Path::new(".")))? {
        let component = index_file.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).unwrap_or_default();
        let text = std::fs::read_to_string(&index_file).map_err(|e| Error::io(&index_file, e))?;
        let shards: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::config(&index_file, e))?;
        if let Some(map) = shards["weight_map"].as_object() {
            let files: std::collections::BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            for file in files {
                first_of(vec![format!("{component}/{file}")])?;
            }
        }
    }
    index_path.parent().map(Path::to_path_buf).ok_or_else(|| not_found("download produced no snapshot folder".into()))
}

fn walk_shard_indexes(root: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(root).map_err(|e| Error::io(root, e))?;
    for entry in entries.flatten() {
        if let Ok(files) = std::fs::read_dir(entry.path()) {
            found.extend(
                files.flatten().map(|f| f.path()).filter(|p| p.to_string_lossy().ends_with(".safetensors.index.json")),
            );
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_told_apart_from_paths() {
        assert!(is_repo_id("stabilityai/sd-turbo"));
        assert!(is_repo_id("runwayml/stable-diffusion-v1-5"));
        assert!(!is_repo_id("./models/x"));
        assert!(!is_repo_id("/abs/path"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("noslash"));
    }

    #[test]
    fn cached_snapshot_follows_the_ref() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--acme--tiny");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        assert_eq!(cached_snapshot(cache.path(), "acme/tiny", "main"), None, "no model_index.json yet");
        std::fs::write(snap.join("model_index.json"), "{}").unwrap();
        assert_eq!(cached_snapshot(cache.path(), "acme/tiny", "main"), Some(snap.clone()));
        assert_eq!(cached_snapshot(cache.path(), "acme/tiny", "abc123"), Some(snap));
        assert_eq!(cached_snapshot(cache.path(), "acme/other", "main"), None);
    }

    #[test]
    fn offline_miss_is_a_model_not_found_error_naming_the_cache() {
        let cache = tempfile::tempdir().unwrap();
        let options =
            HubOptions { cache_dir: cache.path().into(), offline: true, revision: "main".into(), prefer_fp16: false };
        let err = resolve_model("acme/missing", &options).unwrap_err();
        assert!(matches!(&err, Error::ModelNotFound { model, .. } if model == "acme/missing"), "{err}");
        assert!(err.to_string().contains("offline"), "{err}");
    }
}
