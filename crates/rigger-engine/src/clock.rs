//! Wall-clock time as rigger records it (Unix seconds: histories, lock expiries, release and
//! backup names), read in one place for both providers. (Timeouts and polling use tokio's
//! monotonic clock, which tests pause and advance; deciding code takes "now" as an argument,
//! as `rigger_plan::deploys` does, so a test can give it any moment.)

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds now, by the system's clock (0 if it is set before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    #[test]
    fn now_is_after_this_code_was_written() {
        // 2026-12-05T00:00:00Z.
        assert!(super::unix_now() >= 1_796_428_800);
    }
}
