//! Claiming every free byte of a device memory pool so that it can be zeroed.
//!
//! A stream-ordered memory pool keeps the blocks a job freed, unwiped, for its next allocations, and offers no way
//! to address free memory except by allocating it. So the sweep allocates from the pool until nothing free is left:
//! it starts with one request the size of all free memory and halves the request whenever it does not fit a free
//! block (the pool then grows instead, or the device is out of memory), down to [`SWEEP_GRANULE`]. The caller
//! zeroes and frees the blocks. Kept apart from the driver calls so the search itself is tested on the CPU.

/// Smallest request, and the step of every request: the pool hands out memory in multiples of it, so a free
/// fragment is never smaller (allocation sizes are rounded up by the driver).
pub(crate) const SWEEP_GRANULE: u64 = 512;

/// Bound on the blocks one sweep takes, so a pathological pool cannot make it run without end.
pub(crate) const MAX_SWEEP_BLOCKS: usize = 1 << 16;

/// How much memory a pool holds from the device and how much of it is handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolUsage {
    /// Bytes the pool holds from the device.
    pub reserved: u64,
    /// Bytes of those currently allocated.
    pub used: u64,
}

impl PoolUsage {
    /// Bytes the pool holds but has not handed out: what a later allocation could receive unwiped.
    pub fn free(&self) -> u64 {
        self.reserved.saturating_sub(self.used)
    }
}

/// A memory pool the sweep allocates from.
pub(crate) trait SweepTarget {
    /// An allocation, as the caller needs it to zero and free it.
    type Block;
    /// Why the pool could not answer.
    type Error;

    /// The pool's current usage.
    fn usage(&self) -> Result<PoolUsage, Self::Error>;

    /// Allocates `bytes` from the pool (growing it if no free block fits); `Ok(None)` when the device is out of
    /// memory.
    fn allocate(&mut self, bytes: u64) -> Result<Option<Self::Block>, Self::Error>;
}

/// Allocates from `target` until it has no free memory left, appending each block and its size to `blocks` (also
/// when it fails halfway, so the caller can still release them). Returns the free bytes it could not claim: the
/// fragments smaller than [`SWEEP_GRANULE`], or an upper bound if [`MAX_SWEEP_BLOCKS`] was reached first.
pub(crate) fn claim_free_memory<T: SweepTarget>(
    target: &mut T,
    blocks: &mut Vec<(T::Block, u64)>,
) -> Result<u64, T::Error> {
    let mut usage = target.usage()?;
    let mut request = granular(usage.free());
    loop {
        let free = usage.free();
        if free == 0 {
            return Ok(0);
        }
        if blocks.len() >= MAX_SWEEP_BLOCKS {
            return Ok(free);
        }
        request = granular(request.min(free));
        let Some(block) = target.allocate(request)? else {
            if request == SWEEP_GRANULE {
                return Ok(free);
            }
            request = granular(request / 2);
            continue;
        };
        blocks.push((block, request));
        let after = target.usage()?;
        // A pool that had to grow had no free block of this size: what is left is in smaller pieces. (The fresh
        // memory it took is zeroed along with the rest, which costs little.)
        let grew = after.reserved > usage.reserved;
        usage = after;
        if grew {
            if request == SWEEP_GRANULE {
                return Ok(free);
            }
            request = granular(request / 2);
        }
    }
}

/// `bytes` rounded down to a multiple of [`SWEEP_GRANULE`], at least one granule.
fn granular(bytes: u64) -> u64 {
    (bytes / SWEEP_GRANULE * SWEEP_GRANULE).max(SWEEP_GRANULE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A pool in the image of the driver's: first fit among free ranges, growing by whole chunks when nothing fits,
    /// up to a device capacity.
    struct SimulatedPool {
        /// Free ranges as (start, length).
        free: Vec<(u64, u64)>,
        reserved: u64,
        used: u64,
        capacity: u64,
        chunk: u64,
        claimed: Vec<(u64, u64)>,
    }

    impl SimulatedPool {
        /// A pool of one reserved range `0..reserved` with `free` ranges in it (the rest allocated).
        fn with_free_ranges(reserved: u64, free: &[(u64, u64)], capacity: u64) -> Self {
            let free_bytes: u64 = free.iter().map(|r| r.1).sum();
            Self {
                free: free.to_vec(),
                reserved,
                used: reserved - free_bytes,
                capacity,
                chunk: 2 * MIB,
                claimed: vec![],
            }
        }

        fn covers(&self, range: (u64, u64)) -> bool {
            let mut covered: Vec<(u64, u64)> = self.claimed.clone();
            covered.sort();
            let mut cursor = range.0;
            for (start, len) in covered {
                if start <= cursor && start + len > cursor {
                    cursor = start + len;
                }
            }
            cursor >= range.0 + range.1
        }
    }

    impl SweepTarget for SimulatedPool {
        type Block = u64;
        type Error = std::convert::Infallible;

        fn usage(&self) -> Result<PoolUsage, Self::Error> {
            Ok(PoolUsage { reserved: self.reserved, used: self.used })
        }

        fn allocate(&mut self, bytes: u64) -> Result<Option<u64>, Self::Error> {
            if let Some(i) = self.free.iter().position(|r| r.1 >= bytes) {
                let (start, len) = self.free[i];
                if len == bytes {
                    self.free.remove(i);
                } else {
                    self.free[i] = (start + bytes, len - bytes);
                }
                self.used += bytes;
                self.claimed.push((start, bytes));
                return Ok(Some(start));
            }
            let grow = bytes.div_ceil(self.chunk) * self.chunk;
            if self.reserved + grow > self.capacity {
                return Ok(None);
            }
            let start = self.reserved;
            self.reserved += grow;
            self.used += bytes;
            if grow > bytes {
                self.free.push((start + bytes, grow - bytes));
            }
            self.claimed.push((start, bytes));
            Ok(Some(start))
        }
    }

    #[test]
    fn every_free_fragment_of_a_fragmented_pool_is_claimed() {
        let fragments = [(0, 3 * MIB), (5 * MIB, 1536 * 1024), (8 * MIB, 700 * 1024), (9 * MIB, 4096), (10 * MIB, 512)];
        let mut pool = SimulatedPool::with_free_ranges(12 * MIB, &fragments, 64 * MIB);
        let mut blocks = Vec::new();
        let unreached = claim_free_memory(&mut pool, &mut blocks).unwrap();
        assert_eq!(unreached, 0);
        for fragment in fragments {
            assert!(pool.covers(fragment), "fragment {fragment:?} was not claimed");
        }
        assert_eq!(blocks.len(), pool.claimed.len());
        assert!(blocks.iter().all(|(_, len)| len % SWEEP_GRANULE == 0));
    }

    #[test]
    fn a_full_device_still_gets_its_fragments_claimed() {
        // No room to grow: every request that does not fit fails as out of memory.
        let fragments = [(MIB, 3 * MIB), (6 * MIB, 96 * 1024), (7 * MIB, 1024)];
        let mut pool = SimulatedPool::with_free_ranges(8 * MIB, &fragments, 8 * MIB);
        let mut blocks = Vec::new();
        assert_eq!(claim_free_memory(&mut pool, &mut blocks).unwrap(), 0);
        for fragment in fragments {
            assert!(pool.covers(fragment), "fragment {fragment:?} was not claimed");
        }
        assert_eq!(pool.reserved, 8 * MIB, "a full device cannot have grown the pool");
    }

    #[test]
    fn fragments_below_the_granule_are_reported_unreached() {
        let mut pool = SimulatedPool::with_free_ranges(4 * MIB, &[(0, 2 * MIB), (3 * MIB, 256)], 64 * MIB);
        let mut blocks = Vec::new();
        assert_eq!(claim_free_memory(&mut pool, &mut blocks).unwrap(), 256);
        assert!(pool.covers((0, 2 * MIB)));
    }

    #[test]
    fn a_pool_with_nothing_free_takes_no_block() {
        let mut pool = SimulatedPool::with_free_ranges(4 * MIB, &[], 64 * MIB);
        let mut blocks = Vec::new();
        assert_eq!(claim_free_memory(&mut pool, &mut blocks).unwrap(), 0);
        assert!(blocks.is_empty());
    }

    #[test]
    fn the_extra_memory_a_sweep_takes_is_bounded_by_twice_the_free_memory_plus_chunks() {
        // Many equal fragments: the first requests do not fit and grow the pool before the halving finds the size.
        let fragments: Vec<(u64, u64)> = (0..64).map(|i| (i * 2 * MIB, MIB)).collect();
        let free: u64 = fragments.iter().map(|r| r.1).sum();
        let mut pool = SimulatedPool::with_free_ranges(128 * MIB, &fragments, 1024 * MIB);
        let mut blocks = Vec::new();
        assert_eq!(claim_free_memory(&mut pool, &mut blocks).unwrap(), 0);
        let grown = pool.reserved - 128 * MIB;
        assert!(grown <= 2 * free + 16 * pool.chunk, "the sweep grew the pool by {grown} bytes for {free} free");
        assert!(fragments.iter().all(|f| pool.covers(*f)));
    }
}
