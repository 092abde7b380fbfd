//! Deadlines that cannot overflow: "now plus a duration" for any duration a setting can hold.

use std::time::{Duration, Instant};

/// The longest duration any onsite setting takes: a year. No capture, budget, interval or
/// cooldown needs more, and a ceiling this far below `Duration::MAX` keeps every "now plus
/// this" representable. (`onsite`'s parser refuses longer values.)
pub const LONGEST_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// `now + after`, or (for a duration no clock can add, which only a builder setting can give)
/// `now + LONGEST_DURATION`: as good as never for a capture, a budget or a cooldown, and never
/// a panic.
pub fn instant_after(now: Instant, after: Duration) -> Instant {
    now.checked_add(after).or_else(|| now.checked_add(LONGEST_DURATION)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_after_never_overflow() {
        let now = Instant::now();
        assert_eq!(instant_after(now, Duration::from_secs(3)), now + Duration::from_secs(3));
        assert_eq!(instant_after(now, Duration::MAX), now + LONGEST_DURATION);
    }
}
