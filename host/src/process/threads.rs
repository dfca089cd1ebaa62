//! Scheduling hints for the host's own threads: which ones must answer
//! promptly while the engines compute.
//!
//! On a CPU host the engines' decode work (candle's worker pool) keeps every
//! core busy, and the kernel's scheduler lets a running thread finish its
//! time slice (Linux 6.6+ EEVDF: several hundred µs) before a thread it
//! has just woken gets the core. The threads that carry a live migration's
//! last stage and the clients' tokens (the tokio workers: QUIC; a waiting
//! llumlet: the destination's commit) then sit out that slice at every hop.
//! A thread marked [`latency_critical`] asks for a short slice (Linux's
//! per-task `sched_runtime` for normal threads, 6.12+), which makes the
//! kernel run it as soon as it wakes; its share of the CPU (its weight) is
//! unchanged. A llumlet marks itself [`compute`] again before it steps, so
//! its steps do not pre-empt the I/O threads in turn. The tokio runtime
//! marks every thread it starts, its blocking pool's included: there a
//! CPU-bound job (a policy's compilation) only pays some more context
//! switches.
//!
//! Best effort: older kernels ignore the slice, other systems have no such
//! call, a failure is logged once and changes nothing else. The policy
//! (normal threads only) and the nice value are kept. `LLUMEN_SHORT_SLICE_US`
//! sets the slice (default 100, the kernel's minimum; `0` turns the hints
//! off, for comparisons).
//!
//! Owns nothing but the calling thread's slice: it must never change
//! priorities, policies or CPU affinity.

use std::cell::Cell;
use std::sync::OnceLock;

/// The default short slice, µs (the least Linux accepts).
pub const DEFAULT_SHORT_SLICE_US: u64 = 100;

/// The short slice in use, µs; 0 when the hints are off.
pub fn short_slice_us() -> u64 {
    static SLICE: OnceLock<u64> = OnceLock::new();
    *SLICE.get_or_init(|| match std::env::var("LLUMEN_SHORT_SLICE_US") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(0) => 0,
            // Linux accepts 100 µs … 100 ms.
            Ok(us) => us.clamp(100, 100_000),
            Err(_) => {
                tracing::warn!(value = %v, "LLUMEN_SHORT_SLICE_US is not a number of µs: using the default");
                DEFAULT_SHORT_SLICE_US
            }
        },
        Err(_) => DEFAULT_SHORT_SLICE_US,
    })
}

thread_local! {
    /// The slice this thread last asked for (µs; 0: the kernel's default).
    static CURRENT: Cell<Option<u64>> = const { Cell::new(None) };
}

/// The calling thread waits for I/O or commands and must answer at once
/// (tokio workers; a llumlet between steps).
pub fn latency_critical() {
    let us = short_slice_us();
    if us != 0 {
        set_slice_us(us);
    }
}

/// The calling thread is about to compute (a llumlet's engine step): the
/// kernel's default slice.
pub fn compute() {
    if short_slice_us() != 0 {
        set_slice_us(0);
    }
}

fn set_slice_us(us: u64) {
    if CURRENT.with(Cell::get) == Some(us) {
        return;
    }
    CURRENT.with(|c| c.set(Some(us)));
    if let Err(e) = sys::set_slice_ns(us * 1_000) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::info!(error = %e, "threads: the kernel took no slice hint (latency under CPU load may be higher)");
        });
    }
}

#[cfg(target_os = "linux")]
mod sys {
    /// `struct sched_attr` up to `sched_period` (`SCHED_ATTR_SIZE_VER0`),
    /// which every kernel with `sched_setattr` accepts.
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
    }

    /// Sets the calling thread's slice (`sched_runtime` of a normal
    /// thread; 0: the default), keeping its policy and nice value. Threads
    /// of any other policy are left alone.
    pub fn set_slice_ns(ns: u64) -> std::io::Result<()> {
        // SAFETY: plain syscalls on the calling thread (tid 0) with a
        // pointer to a live, correctly sized struct.
        unsafe {
            if libc::sched_getscheduler(0) != libc::SCHED_OTHER {
                return Ok(());
            }
            *libc::__errno_location() = 0;
            let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
            if nice == -1 && *libc::__errno_location() != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let attr = SchedAttr {
                size: std::mem::size_of::<SchedAttr>() as u32,
                policy: libc::SCHED_OTHER as u32,
                flags: 0,
                nice,
                priority: 0,
                runtime: ns,
                deadline: 0,
                period: 0,
            };
            if libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    pub fn set_slice_ns(_ns: u64) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's slice as the kernel reports it, ns.
    fn slice_ns() -> Option<u64> {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = sched.lines().find(|l| l.starts_with("se.slice"))?;
        line.rsplit(':').next()?.trim().parse().ok()
    }

    /// Linux 6.12 and later honour a normal thread's `sched_runtime`.
    fn kernel_takes_slices() -> bool {
        let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
            return false;
        };
        let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
        let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (major, minor) >= (6, 12)
    }

    /// The hints change the calling thread's slice (where the kernel takes
    /// one) and nothing else: its nice value and policy survive both
    /// directions.
    #[test]
    fn hints_set_the_slice_and_keep_the_policy_and_the_nice_value() {
        std::thread::spawn(|| {
            let short = short_slice_us();
            let checks_slice = short != 0 && kernel_takes_slices() && slice_ns().is_some();
            // SAFETY: reads/sets the calling thread's own nice value.
            let nice = |set: Option<i32>| unsafe {
                if let Some(n) = set {
                    libc::setpriority(libc::PRIO_PROCESS, 0, n);
                }
                libc::getpriority(libc::PRIO_PROCESS, 0)
            };
            let before = nice(Some(3));
            latency_critical();
            assert_eq!(nice(None), before);
            if checks_slice {
                assert_eq!(slice_ns(), Some(short * 1_000));
            }
            compute();
            assert_eq!(nice(None), before);
            if checks_slice {
                assert_ne!(slice_ns(), Some(short * 1_000));
            }
            // SAFETY: reads the calling thread's policy.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
            // Asking again is free (no syscall) and harmless; with the
            // hints off nothing is ever asked.
            latency_critical();
            latency_critical();
            assert_eq!(CURRENT.with(Cell::get), (short != 0).then_some(short));
        })
        .join()
        .unwrap();
    }
}
