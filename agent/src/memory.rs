//! Gives memory freed after a burst back to the system.
//!
//! glibc's allocator keeps what a burst freed: each thread that allocates may get an arena of
//! its own (up to eight per core), and freed pages inside an arena stay resident until the
//! top of its heap is free. After thousands of containers appear at once (a reader buffer
//! per opened file, scans, checkpoints), the agent stayed at the burst's peak while idle. Two
//! arenas serve the agent's threads (the tailer, the encoder, the runtime's two workers, and a
//! few that wait most of the time) without contention worth having, and a periodic trim
//! returns the free pages inside the heaps, so memory follows what is live.

use std::time::Duration;

use crate::shutdown::Shutdown;

/// How often freed memory is given back. A trim walks the free lists (well under a
/// millisecond for the agent's heap), and memory freed after a burst is back within this.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Blocks from this size up are mapped on their own and unmapped when freed. Left to itself,
/// glibc raises the threshold to the largest block freed (up to 32 MiB), after which a
/// request body or a batch's buffers come from the heap and their pages stay when freed.
const MMAP_THRESHOLD: libc::c_int = 1024 * 1024;

/// Free memory at the top of a heap is given back once it passes this. glibc moves this bound
/// with its threshold for mapped blocks, to twice that; a fixed threshold leaves it at 128 KiB,
/// and a heap then shrinks and grows again with nearly every batch, each page faulted in anew
/// (a tenth of the agent's CPU at full speed). Whatever stays is returned by the periodic trim.
const TRIM_THRESHOLD: libc::c_int = 2 * MMAP_THRESHOLD;

/// Bounds the allocator's arenas, fixes the size from which blocks are mapped on their own
/// and how much free memory a heap keeps. Call before any thread is started.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Returns freed memory to the system once; true when some was returned.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory held by the allocator.
    unsafe {
        libc::malloc_trim(0) == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Trims every [`TRIM_INTERVAL`] until shutdown.
pub async fn run(shutdown: Shutdown) {
    crate::periodic::every(TRIM_INTERVAL, "memory trim", shutdown, |()| {
        trim();
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_goes_back_to_the_system() {
        fn resident() -> u64 {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            statm.split_ascii_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
        }
        // Many small blocks (below the mmap threshold), then every other one kept: the freed
        // ones sit between live ones, where only a trim gives their pages back.
        let mut blocks: Vec<Vec<u8>> = (0..2048).map(|_| vec![1u8; 64 * 1024]).collect();
        let keep: Vec<Vec<u8>> = blocks.iter_mut().step_by(64).map(std::mem::take).collect();
        drop(blocks);
        let before = resident();
        trim();
        let after = resident();
        assert!(keep.iter().all(|b| b.len() == 64 * 1024));
        assert!(before - after > 64 << 20, "{} MiB before the trim, {} MiB after", before >> 20, after >> 20);
    }
}
