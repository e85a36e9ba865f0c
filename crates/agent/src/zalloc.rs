//! The agent's global allocator: the system allocator, but every block is
//! zeroed when freed. Secrets pass through the agent's heap (protocol
//! buffers, yamux frames, decoded requests); zeroing on free means no freed
//! block keeps a copy, so a memory snapshot taken after the secrets were
//! wiped carries none of them. The cost is one `memset` per free, small next
//! to the copies the agent makes of the same bytes anyway.

use std::alloc::{GlobalAlloc, Layout, System};

pub struct ZeroOnFree;

// SAFETY: delegates to `System`, which upholds the GlobalAlloc contract;
// `dealloc` only writes within the block it is handed back (`layout.size()`
// bytes at `ptr`, which the caller guarantees were allocated with `layout`)
// before returning it. `realloc` uses the trait's default (alloc, copy,
// dealloc), so a moved block is zeroed too.
unsafe impl GlobalAlloc for ZeroOnFree {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` points to a live block of `layout.size()` bytes
        // allocated by us with `layout` (the caller's contract); it is not
        // used by anyone else any more, so overwriting it is sound.
        unsafe {
            std::ptr::write_bytes(ptr, 0, layout.size());
            // Keep the zeroing: without this the stores right before `free`
            // are dead to the optimiser.
            let ptr = std::hint::black_box(ptr);
            System.dealloc(ptr, layout)
        }
    }
}
