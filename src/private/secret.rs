//! Buffers for user content of private jobs: page-aligned allocations of their own, locked in RAM (never swapped),
//! excluded from core dumps, and overwritten with zeros before they are freed.
//!
//! Page alignment matters for two reasons: `madvise`/`mlock` work on whole pages, and a page shared with an
//! unrelated allocation would be unlocked when that neighbour's lock is released (locks do not nest).

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;

use super::wipe_bytes;

/// Owned bytes of user content. Zeroed on drop; locked and kept out of core dumps where the OS allows.
pub struct SecretBytes {
    ptr: NonNull<u8>,
    len: usize,
    /// The allocation: `len` rounded up to whole pages (at least one).
    layout: Layout,
    locked: bool,
}

// SAFETY: SecretBytes owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for SecretBytes {}
unsafe impl Sync for SecretBytes {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}

impl SecretBytes {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let page = page_size();
        let size = len.div_ceil(page).max(1) * page;
        let Ok(layout) = Layout::from_size_align(size, page) else {
            // Only reachable with len near usize::MAX, which no input can ask for (inputs are size-checked first).
            alloc::handle_alloc_error(Layout::new::<u8>())
        };
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        let locked = protect(ptr, size);
        Self { ptr, len, layout, locked }
    }

    /// A copy of `bytes`. The caller still owns (and should wipe) the original.
    pub fn copy_from(bytes: &[u8]) -> Self {
        let mut secret = Self::zeroed(bytes.len());
        secret.expose_mut().copy_from_slice(bytes);
        secret
    }

    /// Moves `bytes` into a secret buffer and wipes the vector's whole allocation (spare capacity included).
    pub fn from_vec(mut bytes: Vec<u8>) -> Self {
        let secret = Self::copy_from(&bytes);
        wipe_vec(&mut bytes);
        secret
    }

    pub fn expose(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialized bytes for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn expose_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shortens the buffer to `len` bytes (no effect if it is not longer), wiping the bytes cut off.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.expose_mut()[len..].fill(0);
            self.len = len;
        }
    }

    /// Whether the pages are locked in RAM (false when the process may not lock more memory).
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        // SAFETY: the allocation is ours, `layout.size()` bytes long, and is freed right after.
        unsafe {
            wipe_bytes(self.ptr.as_ptr(), self.layout.size());
            if self.locked {
                libc::munlock(self.ptr.as_ptr().cast(), self.layout.size());
            }
            // Ordinary (zeroed) pages again: left marked, every freed buffer would keep its pages split from their
            // neighbours into mappings of their own, and a long run of jobs could exhaust the map count.
            libc::madvise(self.ptr.as_ptr().cast(), self.layout.size(), libc::MADV_DODUMP);
            alloc::dealloc(self.ptr.as_ptr(), self.layout);
        }
    }
}

impl Clone for SecretBytes {
    fn clone(&self) -> Self {
        Self::copy_from(self.expose())
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes({} bytes)", self.len)
    }
}

impl PartialEq for SecretBytes {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

/// Locks the pages and excludes them from core dumps; returns whether the lock was granted. A refused lock is not
/// an error: the worker's startup report says whether memory can be locked at all.
fn protect(ptr: NonNull<u8>, size: usize) -> bool {
    // SAFETY: [ptr, ptr + size) is one page-aligned allocation we own.
    unsafe {
        libc::madvise(ptr.as_ptr().cast(), size, libc::MADV_DONTDUMP);
        libc::mlock(ptr.as_ptr().cast(), size) == 0
    }
}

/// Zeroes a vector's whole allocation, spare capacity included, then empties it.
pub fn wipe_vec(bytes: &mut Vec<u8>) {
    // SAFETY: the allocation is `capacity` bytes long and owned by the vector.
    unsafe { wipe_bytes(bytes.as_mut_ptr(), bytes.capacity()) };
    bytes.clear();
}

/// UTF-8 text of user content (a prompt), in a [`SecretBytes`].
#[derive(Clone, PartialEq)]
pub struct SecretString(SecretBytes);

impl SecretString {
    /// Moves `text` into secret memory and wipes the string's allocation.
    pub fn from_string(text: String) -> Self {
        Self(SecretBytes::from_vec(text.into_bytes()))
    }

    /// Takes secret bytes that should be UTF-8 text (a prompt opened from a sealed job) without copying them out of
    /// secret memory. On failure the bytes are dropped, and so wiped.
    pub fn from_utf8(bytes: SecretBytes) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(bytes.expose())?;
        Ok(Self(bytes))
    }

    pub fn expose(&self) -> &str {
        // SAFETY: only ever built from a String or from bytes checked to be UTF-8, and never exposed mutably.
        unsafe { std::str::from_utf8_unchecked(self.0.expose()) }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for SecretString {
    fn from(text: String) -> Self {
        Self::from_string(text)
    }
}

impl Default for SecretString {
    fn default() -> Self {
        Self::from_string(String::new())
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretString({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_bytes_hold_their_content_on_whole_pages_of_their_own() {
        let secret = SecretBytes::copy_from(b"canary-4f1c");
        assert_eq!(secret.expose(), b"canary-4f1c");
        assert_eq!(secret.ptr.as_ptr() as usize % page_size(), 0);
        assert_eq!(secret.layout.size() % page_size(), 0);
        assert_eq!(format!("{secret:?}"), "SecretBytes(11 bytes)");
    }

    #[test]
    fn secret_pages_are_excluded_from_core_dumps() {
        let secret = SecretBytes::copy_from(&[7u8; 100]);
        let start = secret.ptr.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        // The mapping holding the buffer lists "dd" (do not dump) among its VmFlags.
        let mut inside = false;
        let mut flags = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ').filter(|(r, _)| r.contains('-') && !r.ends_with(':')) {
                let (lo, hi) = range.split_once('-').unwrap();
                let (lo, hi) = (usize::from_str_radix(lo, 16).unwrap(), usize::from_str_radix(hi, 16).unwrap());
                inside = (lo..hi).contains(&start);
            } else if inside && line.starts_with("VmFlags:") {
                flags = Some(line.to_string());
            }
        }
        let flags = flags.expect("the buffer's mapping is listed");
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }

    #[test]
    fn from_vec_wipes_the_source_allocation() {
        let mut source = Vec::with_capacity(64);
        source.extend_from_slice(b"prompt text");
        let ptr = source.as_ptr();
        // Keep the allocation alive to inspect it: wipe_vec is what from_vec calls on it.
        let copy = SecretBytes::copy_from(&source);
        wipe_vec(&mut source);
        assert!(source.is_empty());
        assert_eq!(source.as_ptr(), ptr);
        // SAFETY: the vector still owns its 64-byte allocation.
        let after = unsafe { std::slice::from_raw_parts(ptr, 64) };
        assert!(after.iter().all(|&b| b == 0));
        assert_eq!(copy.expose(), b"prompt text");
    }

    #[test]
    fn secret_strings_never_print_their_text() {
        let prompt = SecretString::from("a red circle".to_string());
        assert_eq!(prompt.expose(), "a red circle");
        assert_eq!(format!("{prompt:?}"), "SecretString(12 bytes)");
    }

    #[test]
    fn freed_secret_buffers_give_back_the_mappings_they_split() {
        let mappings = || std::fs::read_to_string("/proc/self/maps").unwrap().lines().count();
        let before = mappings();
        let buffers: Vec<SecretBytes> = (0..1000).map(|_| SecretBytes::zeroed(100)).collect();
        let alive = mappings();
        drop(buffers);
        let after = mappings();
        // Each live buffer's pages are marked (and locked), which splits them off their neighbours.
        assert!(alive >= before + 500, "{before} mappings, {alive} with the buffers");
        assert!(after <= before + 50, "{before} mappings before, {after} after freeing the buffers");
    }
}
