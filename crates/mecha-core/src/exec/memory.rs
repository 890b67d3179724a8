//! Process memory readings for merge reports and benchmarks.

/// Resets the kernel's peak-RSS counter so the next reading covers only what follows
/// (Linux ≥ 4.0; elsewhere the reading covers the whole process lifetime).
pub fn reset_peak_rss() {
    #[cfg(target_os = "linux")]
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size of this process in bytes.
pub fn peak_rss_bytes() -> u64 {
    #[cfg(target_os = "linux")]
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(kb) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            return kb * 1024;
        }
    }
    #[cfg(unix)]
    {
        // SAFETY: getrusage only writes into the struct we pass.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
            // Linux reports kilobytes, macOS bytes.
            let scale = if cfg!(target_os = "macos") { 1 } else { 1024 };
            return usage.ru_maxrss as u64 * scale;
        }
    }
    0
}

/// Resident set size of this process now, in bytes (0 where it cannot be read).
pub fn current_rss_bytes() -> u64 {
    #[cfg(target_os = "linux")]
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        if let Some(pages) = statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()) {
            return pages * page_size();
        }
    }
    0
}

#[cfg(unix)]
fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

#[cfg(not(unix))]
fn page_size() -> u64 {
    4096
}

/// Physical memory of the machine in bytes (8 GiB assumed where it cannot be read).
pub fn physical_memory_bytes() -> u64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
        if pages > 0 {
            return pages as u64 * page_size();
        }
    }
    8 << 30
}

/// The default memory budget: a quarter of physical memory, at most 4 GiB.
pub fn default_budget() -> u64 {
    (physical_memory_bytes() / 4).min(4 << 30)
}

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Merges running now, and a count of merges started, so each can tell whether another ran
/// beside it.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static STARTED: AtomicU64 = AtomicU64::new(0);

/// Measures the process's peak resident memory over one merge. When no other merge runs in the
/// process meanwhile, the kernel's high-water mark is reset at the start and read at the end
/// (exact); otherwise resetting it would disturb the others, so a sampler thread records the
/// highest reading while this merge runs.
pub struct PeakWatch {
    alone_from: u64,
    sampler: Option<(std::thread::JoinHandle<u64>, std::sync::Arc<std::sync::atomic::AtomicBool>)>,
}

impl PeakWatch {
    pub fn start() -> PeakWatch {
        let was_active = ACTIVE.fetch_add(1, Ordering::SeqCst);
        let alone_from = STARTED.fetch_add(1, Ordering::SeqCst) + 1;
        if was_active == 0 {
            reset_peak_rss();
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::Builder::new()
            .name("mecha-rss".into())
            .spawn(move || {
                let mut peak = current_rss_bytes();
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    peak = peak.max(current_rss_bytes());
                }
                peak.max(current_rss_bytes())
            })
            .ok()
            .map(|h| (h, stop));
        PeakWatch { alone_from: if was_active == 0 { alone_from } else { 0 }, sampler }
    }

    /// The peak, in bytes.
    pub fn finish(mut self) -> u64 {
        let sampled = match self.sampler.take() {
            Some((handle, stop)) => {
                stop.store(true, Ordering::Relaxed);
                handle.join().unwrap_or(0)
            }
            None => 0,
        };
        let alone = self.alone_from != 0 && STARTED.load(Ordering::SeqCst) == self.alone_from;
        if alone {
            peak_rss_bytes().max(sampled)
        } else {
            sampled
        }
    }
}

impl Drop for PeakWatch {
    fn drop(&mut self) {
        if let Some((_, stop)) = &self.sampler {
            stop.store(true, Ordering::Relaxed);
        }
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}
