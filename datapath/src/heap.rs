//! The process heap's free pages, given back to the kernel. glibc's allocator keeps memory a
//! program freed in its arenas; pages in the middle of an arena (between live allocations) are
//! returned only by `malloc_trim`. A hub that sent 10,000 agents their route tables keeps ~5 KiB
//! per agent of such pages (measured in docs/performance.md), which counts against its cgroup
//! limit and its own memory budget like live memory. The policy (when to trim) is the caller's;
//! this module is the two libc calls, here because this crate is where Petrel's `unsafe` lives.
//! Other allocators (musl's, a static build) get `None` and `false`: nothing to give back this
//! way.

#![allow(unsafe_code)]

/// Bytes the allocator holds free (glibc `mallinfo2().fordblks`, all arenas); `None` where the
/// allocator cannot say.
pub fn free_heap_bytes() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; it only
        // reads the allocator's own bookkeeping under its locks.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Returns the heap's whole free pages to the kernel; `true` if any were returned. It walks
/// every arena under its lock, so a caller should do it seldom (seconds apart), not per request.
pub fn release_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim(0) has no preconditions; it only releases pages the allocator
        // holds free.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_pages_are_counted_and_given_back() {
        // Many small blocks, then all but one in sixteen freed: free runs of ~15 KiB between
        // live blocks hold whole pages that shrinking the heap's top cannot give back, and
        // only malloc_trim returns.
        let mut blocks: Vec<Vec<u8>> = (0..20_000).map(|i| vec![i as u8; 1024]).collect();
        let mut i = 0;
        blocks.retain(|_| {
            i += 1;
            i % 16 == 0
        });
        let free_before = free_heap_bytes().expect("glibc reports its free bytes");
        assert!(free_before >= 5 * 1024 * 1024, "free {free_before}");
        assert!(release_free_heap());
        assert!(blocks.iter().all(|b| b.len() == 1024));
        assert_eq!(blocks.len(), 1_250);
    }
}
