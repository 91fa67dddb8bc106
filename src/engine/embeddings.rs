//! Reuse of encoded prompts: a job repeating a (model, prompt, negative prompt) that an earlier job encoded gets
//! the stored embeddings instead of running the text encoders again. Bounded by the bytes of the tensors kept,
//! least recently used first out.
//!
//! Private jobs never touch it: they neither read it (whether a prompt was seen before must not show) nor write it
//! (nothing of theirs may outlive them). Keys hold a SHA-256 of the prompts, never their text.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::Digest as _;

use super::lru::SizedLru;
use crate::diffusion::batch::PromptEmbeddings;
use crate::diffusion::model::DiffusionModel;
use crate::diffusion::Result as DiffusionResult;

/// Which encoding an entry holds: the model folder, the prompts' digest, and whether the negative was encoded.
#[derive(Clone, PartialEq, Eq, Hash)]
struct EmbeddingKey {
    model: PathBuf,
    prompts: [u8; 32],
    guided: bool,
}

impl EmbeddingKey {
    fn new(model: &Path, prompt: &str, negative_prompt: &str, guided: bool) -> Self {
        // Unguided runs never read the negative prompt, so it does not tell their encodings apart.
        let negative_prompt = if guided { negative_prompt } else { "" };
        let mut hasher = sha2::Sha256::new();
        // Length-prefixed, so that no two (prompt, negative) pairs hash the same bytes.
        hasher.update((prompt.len() as u64).to_le_bytes());
        hasher.update(prompt.as_bytes());
        hasher.update(negative_prompt.as_bytes());
        Self { model: model.to_path_buf(), prompts: hasher.finalize().into(), guided }
    }
}

/// What the cache did so far and holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmbeddingCacheStats {
    pub entries: usize,
    pub bytes: u64,
    pub hits: u64,
    pub misses: u64,
}

struct CacheState {
    entries: SizedLru<EmbeddingKey, Arc<PromptEmbeddings>>,
    hits: u64,
    misses: u64,
}

/// Encoded prompts of ordinary jobs, shared by all of an engine's jobs.
pub struct EmbeddingCache {
    /// 0: the cache is off.
    budget: u64,
    state: Mutex<CacheState>,
}

impl EmbeddingCache {
    /// A cache keeping up to `budget_bytes` of embeddings; 0 turns it off.
    pub fn new(budget_bytes: u64) -> Self {
        let entries = SizedLru::new(Some(budget_bytes));
        Self { budget: budget_bytes, state: Mutex::new(CacheState { entries, hits: 0, misses: 0 }) }
    }

    /// A job's prompts encoded by `model` (the negative only when `guided`): from the cache when an ordinary job
    /// encoded them before, else encoded now (and kept unless `private`).
    pub fn embeddings(
        &self,
        model: &DiffusionModel,
        prompt: &str,
        negative_prompt: &str,
        guided: bool,
        private: bool,
    ) -> DiffusionResult<Arc<PromptEmbeddings>> {
        if private || self.budget == 0 {
            return Ok(Arc::new(model.encode_prompts(prompt, negative_prompt, guided)?));
        }
        let key = EmbeddingKey::new(&model.root, prompt, negative_prompt, guided);
        {
            let mut state = self.lock();
            if let Some(found) = state.entries.get(&key) {
                state.hits += 1;
                return Ok(found);
            }
        }
        // Encoded outside the lock: other jobs' lookups do not wait for it.
        let encoded = Arc::new(model.encode_prompts(prompt, negative_prompt, guided)?);
        let bytes = encoded.byte_size();
        let mut state = self.lock();
        state.misses += 1;
        if state.entries.fits(bytes) {
            state.entries.insert(key, encoded.clone(), bytes);
        }
        Ok(encoded)
    }

    pub fn stats(&self) -> EmbeddingCacheStats {
        let state = self.lock();
        EmbeddingCacheStats {
            entries: state.entries.len(),
            bytes: state.entries.total(),
            hits: state.hits,
            misses: state.misses,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::model::LoadOptions;
    use crate::diffusion::tiny::{write_tiny_model, TinyFamily, TinyOptions};

    fn tiny_model() -> (tempfile::TempDir, DiffusionModel) {
        let dir = tempfile::tempdir().unwrap();
        let options = TinyOptions { family: TinyFamily::Sd15, seed: 0, fp16_variant: false };
        write_tiny_model(dir.path(), options).unwrap();
        let model = DiffusionModel::load(dir.path(), &LoadOptions::cpu()).unwrap();
        (dir, model)
    }

    fn context_values(e: &PromptEmbeddings) -> Vec<f32> {
        e.cond.context.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn a_repeated_prompt_is_served_from_the_cache() {
        let (_dir, model) = tiny_model();
        let cache = EmbeddingCache::new(64 << 20);
        let first = cache.embeddings(&model, "a red circle", "blurry", true, false).unwrap();
        let again = cache.embeddings(&model, "a red circle", "blurry", true, false).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.hits, stats.misses), (1, 1, 1));
        assert_eq!(stats.bytes, first.byte_size());
        let fresh = model.encode_prompts("a red circle", "blurry", true).unwrap();
        assert_eq!(context_values(&again), context_values(&fresh), "the stored encoding is the encoding");
        // Another negative prompt, or the same prompts without guidance, is another encoding.
        cache.embeddings(&model, "a red circle", "sharp", true, false).unwrap();
        let unguided = cache.embeddings(&model, "a red circle", "blurry", false, false).unwrap();
        assert!(unguided.uncond.is_none());
        assert_eq!(cache.stats().misses, 3);
    }

    #[test]
    fn private_jobs_neither_read_nor_write_the_cache() {
        let (_dir, model) = tiny_model();
        let cache = EmbeddingCache::new(64 << 20);
        let public = cache.embeddings(&model, "a red circle", "", true, false).unwrap();
        let before = cache.stats();
        let private = cache.embeddings(&model, "a red circle", "", true, true).unwrap();
        assert!(!Arc::ptr_eq(&public, &private), "a private job encodes its own prompts");
        cache.embeddings(&model, "a private prompt", "", true, true).unwrap();
        assert_eq!(cache.stats(), before, "private jobs leave the cache as it was");
        cache.embeddings(&model, "a private prompt", "", true, false).unwrap();
        assert_eq!(cache.stats().misses, before.misses + 1, "the private prompt was not stored");
    }

    #[test]
    fn the_byte_budget_evicts_the_least_recently_used_prompt() {
        let (_dir, model) = tiny_model();
        let one = model.encode_prompts("x", "", false).unwrap().byte_size();
        let cache = EmbeddingCache::new(2 * one);
        for prompt in ["first", "second", "first", "third"] {
            cache.embeddings(&model, prompt, "", false, false).unwrap();
        }
        assert_eq!(cache.stats().entries, 2);
        cache.embeddings(&model, "first", "", false, false).unwrap();
        assert_eq!(cache.stats().hits, 2, "first was touched after second, so second went");
        cache.embeddings(&model, "second", "", false, false).unwrap();
        assert_eq!(cache.stats().misses, 4);
    }

    #[test]
    fn a_zero_budget_turns_the_cache_off() {
        let (_dir, model) = tiny_model();
        let cache = EmbeddingCache::new(0);
        cache.embeddings(&model, "a", "", false, false).unwrap();
        cache.embeddings(&model, "a", "", false, false).unwrap();
        assert_eq!(cache.stats(), EmbeddingCacheStats::default());
    }
}
