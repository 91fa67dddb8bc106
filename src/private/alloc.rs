//! The zero-on-free global allocator. Libraries copy user content into buffers we never see (JSON scratch, image
//! codecs, base64, the NATS client's read buffers, tensors freed inside the pipeline); wiping every block as it is
//! freed is the one mechanism that reaches all of them. Blocks still alive are the job's own buffers, which the
//! private path drops (or wipes) when the result is out.
//!
//! Cost: one memset per free, measured in the benchmark (`imago bench --private`); matmul-heavy work barely
//! notices, allocation-heavy elementwise work a little more.

use std::alloc::{GlobalAlloc, Layout, System};

use super::wipe_bytes;

/// Wraps an allocator so every block is overwritten with zeros before it is returned. Installed by the `imago`
/// binary:
///
/// ```ignore
/// #[global_allocator]
/// static ALLOCATOR: imago::private::ZeroOnFree<std::alloc::System> = imago::private::ZeroOnFree(std::alloc::System);
/// ```
pub struct ZeroOnFree<A = System>(pub A);

// SAFETY: every method forwards to the inner allocator with the caller's arguments; dealloc only writes inside the
// block being freed before handing it back.
unsafe impl<A: GlobalAlloc> GlobalAlloc for ZeroOnFree<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.0.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        wipe_bytes(ptr, layout.size());
        self.0.dealloc(ptr, layout)
    }

    // No in-place growth: the inner realloc could move the block and free the old one unwiped. A new block, a
    // copy and a wiping dealloc is what realloc does when it moves anyway.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees new_size > 0 and a valid layout for it (GlobalAlloc::realloc's contract).
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let new_ptr = self.0.alloc(new_layout);
        if !new_ptr.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new_ptr, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new_ptr
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// Records the bytes of each block at the moment it reaches the inner allocator's dealloc.
    struct Recording {
        freed: RefCell<Vec<Vec<u8>>>,
    }

    // SAFETY: the tests use it from one thread only.
    unsafe impl Sync for Recording {}

    unsafe impl GlobalAlloc for Recording {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            System.alloc(layout)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            let bytes = std::slice::from_raw_parts(ptr, layout.size()).to_vec();
            self.freed.borrow_mut().push(bytes);
            System.dealloc(ptr, layout)
        }
    }

    #[test]
    fn freed_blocks_reach_the_inner_allocator_zeroed() {
        let allocator = ZeroOnFree(Recording { freed: RefCell::new(Vec::new()) });
        let layout = Layout::from_size_align(32, 8).unwrap();
        unsafe {
            let block = allocator.alloc(layout);
            std::ptr::copy_nonoverlapping(b"the prompt, 32 bytes long.......".as_ptr(), block, 32);
            allocator.dealloc(block, layout);
        }
        let freed = allocator.0.freed.borrow();
        assert_eq!(freed.len(), 1);
        assert_eq!(freed[0], vec![0u8; 32]);
    }

    #[test]
    fn realloc_keeps_the_content_and_wipes_the_old_block() {
        let allocator = ZeroOnFree(Recording { freed: RefCell::new(Vec::new()) });
        let layout = Layout::from_size_align(16, 8).unwrap();
        let moved = unsafe {
            let block = allocator.alloc(layout);
            std::ptr::copy_nonoverlapping(b"0123456789abcdef".as_ptr(), block, 16);
            let grown = allocator.realloc(block, layout, 64);
            let moved = std::slice::from_raw_parts(grown, 16).to_vec();
            allocator.dealloc(grown, Layout::from_size_align(64, 8).unwrap());
            moved
        };
        assert_eq!(moved, b"0123456789abcdef");
        let freed = allocator.0.freed.borrow();
        assert_eq!(freed.len(), 2);
        assert!(freed.iter().all(|block| block.iter().all(|&b| b == 0)));
    }
}
