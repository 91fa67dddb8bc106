//! A map that keeps the most recently used values within a budget on their total size, shared by the model cache
//! (sizes in bytes of weights) and the prompt-embedding cache (bytes of tensors).

use std::collections::HashMap;
use std::hash::Hash;

struct Entry<V> {
    value: V,
    size: u64,
    last_used: u64,
}

/// Values with sizes; inserting past the budget evicts the least recently used others. Eviction scans every
/// entry: the caches hold tens to hundreds of them.
pub(crate) struct SizedLru<K, V> {
    /// `None`: no limit.
    budget: Option<u64>,
    entries: HashMap<K, Entry<V>>,
    total: u64,
    clock: u64,
}

impl<K: Eq + Hash + Clone, V: Clone> SizedLru<K, V> {
    pub fn new(budget: Option<u64>) -> Self {
        Self { budget, entries: HashMap::new(), total: 0, clock: 0 }
    }

    /// The value under `key`, which becomes the most recently used.
    pub fn get(&mut self, key: &K) -> Option<V> {
        self.clock += 1;
        let entry = self.entries.get_mut(key)?;
        entry.last_used = self.clock;
        Some(entry.value.clone())
    }

    /// Stores `value` as the most recently used and evicts the least recently used others until the total fits
    /// the budget again; returns what was evicted, least recently used first. The new value itself is kept even
    /// when it alone exceeds the budget: callers that would rather not store it check [`SizedLru::fits`] first.
    pub fn insert(&mut self, key: K, value: V, size: u64) -> Vec<(K, V)> {
        self.clock += 1;
        if let Some(old) = self.entries.insert(key.clone(), Entry { value, size, last_used: self.clock }) {
            self.total -= old.size;
        }
        self.total += size;
        let mut evicted = Vec::new();
        while self.budget.is_some_and(|budget| self.total > budget) {
            let oldest = self.entries.iter().filter(|(k, _)| **k != key).min_by_key(|(_, e)| e.last_used);
            let Some(oldest) = oldest.map(|(k, _)| k.clone()) else { break };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.total -= entry.size;
                evicted.push((oldest, entry.value));
            }
        }
        evicted
    }

    /// Whether a value of `size` can be kept at all.
    pub fn fits(&self, size: u64) -> bool {
        self.budget.is_none_or(|budget| size <= budget)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Sum of the sizes of the values kept.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The keys, least recently used first.
    pub fn keys_by_use(&self) -> Vec<K> {
        let mut keys: Vec<(&K, u64)> = self.entries.iter().map(|(k, e)| (k, e.last_used)).collect();
        keys.sort_by_key(|(_, used)| *used);
        keys.into_iter().map(|(k, _)| k.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserting_past_the_budget_evicts_the_least_recently_used() {
        let mut lru = SizedLru::new(Some(10));
        assert!(lru.insert("a", 1, 4).is_empty());
        assert!(lru.insert("b", 2, 4).is_empty());
        assert_eq!(lru.get(&"a"), Some(1)); // a is now more recent than b
        assert_eq!(lru.insert("c", 3, 4), vec![("b", 2)]);
        assert_eq!(lru.keys_by_use(), vec!["a", "c"]);
        assert_eq!((lru.len(), lru.total()), (2, 8));
    }

    #[test]
    fn an_oversized_value_is_kept_alone_and_reinserting_replaces_its_size() {
        let mut lru = SizedLru::new(Some(10));
        lru.insert("a", 1, 4);
        lru.insert("b", 2, 4);
        assert!(!lru.fits(11));
        assert_eq!(lru.insert("big", 3, 11), vec![("a", 1), ("b", 2)]);
        assert_eq!(lru.keys_by_use(), vec!["big"]);
        lru.insert("big", 4, 2);
        assert_eq!((lru.get(&"big"), lru.total()), (Some(4), 2));
    }

    #[test]
    fn without_a_budget_nothing_is_evicted() {
        let mut lru = SizedLru::new(None);
        for i in 0..100u64 {
            assert!(lru.insert(i, i, u64::MAX / 200).is_empty());
        }
        assert_eq!(lru.len(), 100);
        assert!(lru.fits(u64::MAX));
    }
}
