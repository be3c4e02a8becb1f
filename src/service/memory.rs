//! Giving memory the daemon freed back to the system.
//!
//! glibc keeps what a program frees for its next allocations, in arenas that threads
//! add as they contend (up to eight per core on 64-bit systems, two on 32-bit): after a
//! burst, a room of dashboards resuming from the start of the log or a thousand clients
//! that came and went, the daemon would stay near its peak for good while using a
//! fraction of it, and a 512 MB board needs that memory elsewhere. Every
//! [`GIVE_BACK_EVERY`] the free pages of every arena go back to the kernel, on a
//! blocking thread: the trim takes each arena's lock in turn, and tasks must not wait for
//! it. On a quiet daemon it finds little to do. Other C libraries (musl) get nothing
//! here.

use std::time::Duration;

use crate::shutdown::Shutdown;

/// How often freed memory is given back.
const GIVE_BACK_EVERY: Duration = Duration::from_secs(10);

/// Gives freed memory back every `GIVE_BACK_EVERY` until `shutdown`.
pub async fn give_back_periodically(mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(GIVE_BACK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tick.tick() => {
                // Only fails when the runtime shuts down.
                let _ = tokio::task::spawn_blocking(give_back).await;
            }
        }
    }
}

/// Has glibc give back the free top of every arena as it frees, instead of only when a
/// threshold it raises with every large block is passed. Call before any thread starts.
///
/// `malloc_trim` releases free pages inside an arena, but not the free space at the top
/// of the arenas other threads use: glibc keeps 128 KiB of padding there, and shrinks
/// them only when a free leaves more than its trim threshold on top, a threshold it
/// raises towards 64 MiB (on 64-bit systems) as large blocks come and go. Setting either
/// value also fixes the size from which blocks are mapped on their own at 128 KiB, so
/// they go back to the system as soon as they are freed. After a resume storm, with
/// the blocking threads that read the log each on an arena of their own, no padding and
/// a fixed 64 KiB threshold left 15.9 to 16.5 MiB resident instead of 16.2 to 18.1 MiB
/// once the clients had left, with the same fan-out and latency figures (README).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn give_back_promptly() {
    const TRIM_THRESHOLD: libc::c_int = 64 * 1024;
    // SAFETY: `mallopt` only sets glibc's own tuning values, under its lock; it takes
    // no pointer.
    unsafe {
        libc::mallopt(libc::M_TOP_PAD, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Other C libraries have no such tuning.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn give_back_promptly() {}

/// Returns the whole free pages of glibc's arenas to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn give_back() {
    // SAFETY: `malloc_trim` only walks and releases glibc's own free lists, under their
    // locks; it takes no pointer.
    unsafe { libc::malloc_trim(0) };
}

/// Other C libraries give memory back as they free it, or not at all.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn give_back() {}
