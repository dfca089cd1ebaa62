//! The host's one clock: microseconds since the Unix epoch, monotonic within
//! a process (a wall-clock anchor taken once plus a monotonic offset), so
//! engine steps never see time go backwards and snapshots in sled carry
//! comparable timestamps across restarts. Owns nothing else.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn anchor() -> &'static (Instant, u64) {
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    ANCHOR.get_or_init(|| {
        let unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        (Instant::now(), unix_us)
    })
}

/// Now, in microseconds since the Unix epoch (monotonic in this process).
pub fn now_us() -> u64 {
    let (at, unix_us) = anchor();
    unix_us + at.elapsed().as_micros() as u64
}
