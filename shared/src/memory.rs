//! How the process's allocator treats the large temporaries of a forward pass.
//!
//! A batched forward allocates megabytes per layer (Qwen2.5-0.5B, 12 packed requests: a
//! 360 x 4864 f32 MLP activation is 7 MiB, three per layer, 24 layers) and frees them a moment
//! later. glibc serves a thread other than the main one from a per-thread arena made of 64 MiB
//! heaps, and frees a heap back to the kernel as soon as it is empty, whatever the trim
//! threshold says (`heap_trim` in malloc/arena.c); the next forward then takes every page
//! fresh from the kernel: 2.6 million page faults over 200 requests at 32 clients, and packed
//! batches slower per input than one request at a time (docs/benchmarks.md, Zen 4). With one
//! arena (the main one, which honours the thresholds), a fixed mmap threshold and a trim
//! threshold far above any forward, freed temporaries stay mapped and are reused: 66
//! thousand faults over the same run. [`release_free_pages`] hands them back when the work is
//! done (after loading, when a server goes idle).
//!
//! Only glibc on Linux is tuned; elsewhere both calls do nothing. A `GLIBC_TUNABLES` naming a
//! `glibc.malloc` setting is the user's choice and is left alone.

/// Largest allocation served from the arena instead of its own mapping: glibc's maximum
/// for this setting (half of a 64 MiB heap).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// Free memory at the top of the arena kept mapped (1 GiB): more than any forward's
/// temporaries; [`release_free_pages`] returns it when the process is idle.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Keep freed forward temporaries mapped for reuse (see the module). Call first thing in
/// `main`, before other threads start. Returns what it set, for the log, or `None` where
/// nothing was changed.
pub fn reuse_freed_memory() -> Option<String> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if user_tuned() {
            return None;
        }
        // SAFETY: mallopt only changes the allocator's parameters; these values are within
        // the ranges glibc accepts (it returns 0 and keeps the old value otherwise).
        let set = unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        };
        set.then(|| {
            format!(
                "glibc malloc: one arena, mmap threshold {} MiB, trim threshold {} MiB",
                MMAP_THRESHOLD >> 20,
                TRIM_THRESHOLD >> 20
            )
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Whether `GLIBC_TUNABLES` sets malloc options: the user's choice, left alone.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn user_tuned() -> bool {
    std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc"))
}

/// Give the allocator's free pages back to the kernel (glibc's `malloc_trim`).
pub fn release_free_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    fn thread_faults() -> i64 {
        // SAFETY: getrusage writes into the struct it is given.
        unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut u);
            u.ru_minflt
        }
    }

    #[test]
    fn a_thread_reuses_freed_large_buffers_instead_of_faulting_them_in_again() {
        if user_tuned() {
            return;
        }
        assert!(reuse_freed_memory().is_some(), "glibc accepts the settings");
        // A forward's pattern on a thread other than the main one: 24 rounds of three 8 MiB
        // temporaries, each written, all freed.
        let faults = std::thread::spawn(|| {
            let round = || {
                let bufs: Vec<Vec<f32>> = (0..3).map(|i| vec![i as f32 + 1.0; 2 << 20]).collect();
                std::hint::black_box(&bufs);
            };
            round();
            let before = thread_faults();
            for _ in 0..24 {
                round();
            }
            thread_faults() - before
        })
        .join()
        .unwrap();
        // Taking the pages fresh each round would fault 24 x 6144 = 147,456 times (without
        // reuse_freed_memory this test counted 146,720 on Zen 4); reused, they fault not at
        // all (a margin left for the allocator's own bookkeeping).
        assert!(faults < 6144, "{faults} page faults over 24 rounds of reused buffers");
    }
}
