//! The sync backend's settings and profilers (see `onsite-sync`): Go's mutex profile (feature
//! `mutex`) and block profile (feature `block`) of `onsite::sync`'s locks.
//!
//! - `ONSITE_MUTEX_FRACTION=N`: record 1 in N contention events, scaled by N (default
//!   [`onsite_sync::DEFAULT_MUTEX_FRACTION`], 5; 1 records every event).
//! - `ONSITE_BLOCK_RATE=D`: waits of at least D are always recorded, shorter ones sampled
//!   (default [`onsite_sync::DEFAULT_BLOCK_RATE`], 10us). D is a duration with a unit (`ns`,
//!   `us`, `ms`, `s`, e.g. `10us`), or a bare number of nanoseconds as Go's
//!   `runtime.SetBlockProfileRate` takes it; `0` records every wait.

use std::time::Duration;

use onsite_core::Profiler;

use crate::env;

/// Variable for [`Settings::mutex_fraction`].
const FRACTION_ENV: &str = "ONSITE_MUTEX_FRACTION";
/// Variable for [`Settings::block_rate`].
const RATE_ENV: &str = "ONSITE_BLOCK_RATE";

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// 1 in this many contention events is recorded (and scaled by it).
    pub(crate) mutex_fraction: u32,
    /// Waits at least this long are always recorded; shorter ones are sampled.
    pub(crate) block_rate: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { mutex_fraction: onsite_sync::DEFAULT_MUTEX_FRACTION, block_rate: onsite_sync::DEFAULT_BLOCK_RATE }
    }
}

impl Settings {
    pub(crate) fn apply_env(&mut self, env: &mut env::Reader) {
        env.set(FRACTION_ENV, &mut self.mutex_fraction, env::parse_in_range(1..=1_000_000u32));
        env.set(RATE_ENV, &mut self.block_rate, parse_rate);
    }

    pub(crate) fn profilers(&self) -> Vec<Box<dyn Profiler>> {
        let mut profilers: Vec<Box<dyn Profiler>> = Vec::new();
        if cfg!(feature = "mutex") {
            profilers.push(Box::new(onsite_sync::MutexProfiler::new(self.mutex_fraction)));
        }
        if cfg!(feature = "block") {
            profilers.push(Box::new(onsite_sync::BlockProfiler::new(self.block_rate)));
        }
        profilers
    }
}

/// A block rate: a bare number of nanoseconds (Go's unit), or a number with `ns`, `us`/`µs`,
/// `ms`, `s`, `m` or `h`.
fn parse_rate(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(nanos) = text.parse::<u64>() {
        return Ok(Duration::from_nanos(nanos));
    }
    let small_unit = [("ns", 1.0), ("us", 1e3), ("µs", 1e3)]
        .into_iter()
        .find(|(unit, _)| text.ends_with(unit) && text[..text.len() - unit.len()].parse::<f64>().is_ok());
    match small_unit {
        Some((unit, nanos_per_unit)) => {
            let number: f64 = text[..text.len() - unit.len()].parse().map_err(|_| "not a number".to_owned())?;
            Duration::try_from_secs_f64(number * nanos_per_unit / 1e9).map_err(|e| e.to_string())
        }
        None => env::parse_duration(text)
            .map_err(|reason| format!("{reason} (or a number of nanoseconds, or a duration in ns or us)")),
    }
}

impl crate::Builder {
    /// Records 1 in `fraction` lock contention events in the mutex profile, scaled by
    /// `fraction` (default 5; 1 records all). `ONSITE_MUTEX_FRACTION` overrides it.
    pub fn mutex_fraction(mut self, fraction: u32) -> Self {
        self.backends.sync.mutex_fraction = fraction.max(1);
        self
    }

    /// Waits at least `rate` long are always in the block profile; shorter ones are sampled
    /// with probability wait/rate and debiased (default 10 µs; zero records every wait).
    /// `ONSITE_BLOCK_RATE` overrides it.
    pub fn block_rate(mut self, rate: Duration) -> Self {
        self.backends.sync.block_rate = rate;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_rates_as_people_type_them() {
        assert_eq!(parse_rate("10us"), Ok(Duration::from_micros(10)));
        assert_eq!(parse_rate("2.5µs"), Ok(Duration::from_nanos(2500)));
        assert_eq!(parse_rate("500ns"), Ok(Duration::from_nanos(500)));
        assert_eq!(parse_rate("10000"), Ok(Duration::from_micros(10)));
        assert_eq!(parse_rate("0"), Ok(Duration::ZERO));
        assert_eq!(parse_rate("1ms"), Ok(Duration::from_millis(1)));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("-5us").is_err());
    }

    #[test]
    fn profilers_follow_the_features() {
        let kinds: Vec<_> = Settings::default().profilers().iter().map(|p| p.kind()).collect();
        assert_eq!(kinds.contains(&onsite_core::ProfileKind::Mutex), cfg!(feature = "mutex"));
        assert_eq!(kinds.contains(&onsite_core::ProfileKind::Block), cfg!(feature = "block"));
    }
}
