//! A global allocator that keeps large freed blocks while a merge runs, for the next allocation
//! of the same size.
//!
//! Whole-tensor methods allocate several buffers per key (the inputs read, their f32 copies,
//! the deltas, the result) and free them after it. The system allocator hands blocks this large
//! back to the kernel at once, so the next key of the same shape faults in and zeroes fresh
//! pages: on SD 1.5 TIES that was a fifth of the merge. Consecutive keys very often share a
//! shape, so an exact-size cache serves most of them.
//!
//! Only blocks of at least [`MIN_BLOCK`] bytes are kept, in at most [`SLOTS`] slots, up to an
//! eighth of the smallest memory budget of the merges running (the oldest freed first), and only while at least one
//! merge runs ([`merge_scope`]); when the last one ends every kept block is freed, so an
//! application embedding the engine gets its memory back. Outside merges, and for small or
//! unusual blocks, this is the system allocator. `mecha-napi` installs it:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: mecha_core::block_cache::BlockCache = mecha_core::block_cache::BlockCache;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Blocks smaller than this are left to the system allocator (which reuses them well).
pub const MIN_BLOCK: usize = 1 << 20;
/// How many free blocks are kept at most.
pub const SLOTS: usize = 64;

/// The system allocator, with large freed blocks kept for reuse during merges.
pub struct BlockCache;

#[derive(Clone, Copy)]
struct Block {
    /// The address (0 for an empty slot), as an integer so the table is `Send`.
    addr: usize,
    size: usize,
    align: usize,
    /// When it was kept (a counter): the oldest is freed first.
    age: u64,
}

const EMPTY: Block = Block { addr: 0, size: 0, align: 0, age: 0 };

struct Kept {
    blocks: [Block; SLOTS],
    bytes: usize,
    clock: u64,
}

// The lock is never held across an allocation, so the allocator cannot re-enter it.
static KEPT: Mutex<Kept> = Mutex::new(Kept { blocks: [EMPTY; SLOTS], bytes: 0, clock: 0 });
static ACTIVE_MERGES: AtomicUsize = AtomicUsize::new(0);
/// Bytes that may be kept (0 when no merge runs).
static LIMIT: AtomicU64 = AtomicU64::new(0);

fn kept() -> std::sync::MutexGuard<'static, Kept> {
    // A poisoned lock still holds a consistent table: every update is a plain store.
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

/// A kept block of exactly this layout, removed from the table.
fn take(layout: Layout) -> Option<*mut u8> {
    let mut kept = kept();
    let slot = kept.blocks.iter().position(|b| b.addr != 0 && b.size == layout.size() && b.align == layout.align())?;
    let block = std::mem::replace(&mut kept.blocks[slot], EMPTY);
    kept.bytes -= block.size;
    Some(block.addr as *mut u8)
}

/// Keeps a freed block if a merge runs and it fits the limit (freeing older ones for room);
/// false when the caller must free it.
fn put(ptr: *mut u8, layout: Layout) -> bool {
    if ACTIVE_MERGES.load(Ordering::Acquire) == 0 {
        return false;
    }
    let limit = LIMIT.load(Ordering::Relaxed) as usize;
    if layout.size() > limit {
        return false;
    }
    let mut kept = kept();
    // The newest blocks are the likeliest to fit the next key: make room by freeing the oldest.
    while kept.bytes + layout.size() > limit || kept.blocks.iter().all(|b| b.addr != 0) {
        let oldest = (0..SLOTS).filter(|&i| kept.blocks[i].addr != 0).min_by_key(|&i| kept.blocks[i].age);
        let Some(oldest) = oldest else { break };
        let b = std::mem::replace(&mut kept.blocks[oldest], EMPTY);
        kept.bytes -= b.size;
        // SAFETY: a kept block came from `System` with this layout; System never calls back here.
        unsafe { System.dealloc(b.addr as *mut u8, Layout::from_size_align_unchecked(b.size, b.align)) };
    }
    let Some(slot) = kept.blocks.iter().position(|b| b.addr == 0) else { return false };
    kept.clock += 1;
    kept.blocks[slot] = Block { addr: ptr as usize, size: layout.size(), align: layout.align(), age: kept.clock };
    kept.bytes += layout.size();
    true
}

/// Frees every kept block.
fn trim() {
    let blocks = {
        let mut kept = kept();
        kept.bytes = 0;
        std::mem::replace(&mut kept.blocks, [EMPTY; SLOTS])
    };
    for b in blocks.iter().filter(|b| b.addr != 0) {
        // SAFETY: each kept block came from `System` with this layout and is owned by the table.
        unsafe { System.dealloc(b.addr as *mut u8, Layout::from_size_align_unchecked(b.size, b.align)) };
    }
}

/// Bytes kept right now (for tests and diagnostics).
pub fn kept_bytes() -> usize {
    kept().bytes
}

/// While alive, freed large blocks are kept (up to `memory_budget / 8`, the smallest of the
/// merges running); when the last scope ends they are freed.
pub struct MergeScope(());

pub fn merge_scope(memory_budget: u64) -> MergeScope {
    let share = memory_budget / 8;
    if ACTIVE_MERGES.fetch_add(1, Ordering::AcqRel) == 0 {
        LIMIT.store(share, Ordering::Relaxed);
    } else {
        LIMIT.fetch_min(share, Ordering::Relaxed);
    }
    MergeScope(())
}

impl Drop for MergeScope {
    fn drop(&mut self) {
        if ACTIVE_MERGES.fetch_sub(1, Ordering::AcqRel) == 1 {
            LIMIT.store(0, Ordering::Relaxed);
            trim();
        }
    }
}

// SAFETY: every block handed out is a `System` block of the requested layout (kept blocks
// match size and alignment exactly), and every block kept is owned by the table until handed
// out again or freed with its own layout.
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_BLOCK {
            if let Some(ptr) = take(layout) {
                return ptr;
            }
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_BLOCK {
            if let Some(ptr) = take(layout) {
                // Zeroing pages already mapped is cheaper than faulting in new zero pages.
                std::ptr::write_bytes(ptr, 0, layout.size());
                return ptr;
            }
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= MIN_BLOCK && put(ptr, layout) {
            return;
        }
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Every block is a System block, so System can grow it (in place or by remapping).
        System.realloc(ptr, layout, new_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_reused_during_a_merge_and_freed_after() {
        // An odd size no other test allocates, so parallel tests cannot take the block.
        let layout = Layout::from_size_align(3 * MIN_BLOCK + 4096 * 7 + 24, 64).unwrap();
        let a = BlockCache;
        unsafe {
            let scope = merge_scope(1 << 30);
            let p = a.alloc(layout);
            p.write_bytes(0xAB, layout.size());
            a.dealloc(p, layout);
            assert!(kept_bytes() >= layout.size());
            let q = a.alloc_zeroed(layout);
            assert_eq!(p, q, "the kept block is handed out again");
            assert!(std::slice::from_raw_parts(q, layout.size()).iter().all(|&b| b == 0));
            // another alignment is another layout: not served from the kept block
            a.dealloc(q, layout);
            let other = Layout::from_size_align(layout.size(), 8).unwrap();
            let r = a.alloc(other);
            assert_ne!(r, q);
            a.dealloc(r, other);
            drop(scope);
            // no merge running: nothing of ours is kept (other tests may run merges meanwhile)
            let s = a.alloc(layout);
            a.dealloc(s, layout);
        }
        if ACTIVE_MERGES.load(Ordering::Acquire) == 0 {
            assert_eq!(kept_bytes(), 0);
        }
    }

    #[test]
    fn the_budget_bounds_what_is_kept() {
        let layout = Layout::from_size_align(5 * MIN_BLOCK + 4096 * 3 + 8, 16).unwrap();
        let scope = merge_scope(8 * 4 * MIN_BLOCK as u64); // keeps at most 4 MiB
        unsafe {
            let p = System.alloc(layout);
            assert!(!put(p, layout), "a 5 MiB block is not kept under a 4 MiB limit");
            System.dealloc(p, layout);
        }
        drop(scope);
    }
}
