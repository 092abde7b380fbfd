//! Rule evaluation: one sample per interval in, at most one firing out. Pure logic over the
//! samples it is given and the instants they carry, so tests drive it with a scripted metric
//! source and a made-up clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant, UNIX_EPOCH};

use onsite_core::ProfileKind;

use super::metrics::{MetricSource, Sample};
use super::rule::{Condition, DEFAULT_JUMP_WINDOW_SAMPLES, Metric, Rule, Unit, human_bytes};
use crate::env;

/// The most history points a rule keeps for its manifest.
const MAX_HISTORY: usize = 600;

/// A metric value at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Point {
    pub(crate) at: Instant,
    /// Wall clock, milliseconds since the Unix epoch.
    pub(crate) unix_ms: u64,
    pub(crate) value: f64,
}

/// A rule that fired: what the capture it starts needs, and what its manifest records.
#[derive(Debug, Clone)]
pub(crate) struct Firing {
    /// Which rule (its index), to start its cooldown when the capture ends.
    pub(crate) rule: usize,
    pub(crate) text: String,
    pub(crate) metric: Metric,
    pub(crate) unit: Unit,
    pub(crate) value: f64,
    /// Why, in words: the condition and the values that met it.
    pub(crate) reason: String,
    /// The rule's recent samples, oldest first, ending with the one that fired it.
    pub(crate) history: Vec<Point>,
    /// What the metric was measured against (the memory limit in bytes, or the CPUs allowed).
    pub(crate) limit: Option<f64>,
    pub(crate) kinds: Option<Vec<ProfileKind>>,
    pub(crate) capture: Duration,
    pub(crate) cooldown: Duration,
}

struct RuleState {
    rule: Rule,
    unit: Unit,
    /// Sustained: the first sample of the current run above the level.
    above_since: Option<Instant>,
    /// Jump: the values the moving average is taken over (the samples before the current one).
    window: VecDeque<f64>,
    window_samples: usize,
    /// For the manifest.
    history: VecDeque<Point>,
    lookback: Duration,
    capturing: bool,
    cooldown_until: Option<Instant>,
    /// Whether "holds but cooling down" was logged in this cooldown (once is enough).
    told_cooling: bool,
    /// Whether "holds but another capture runs" was logged during the current capture.
    told_busy: bool,
}

/// Every rule's state, the metric source, and when the next sample is due.
pub(crate) struct Watch {
    interval: Duration,
    source: Box<dyn MetricSource>,
    rules: Vec<RuleState>,
    next_due: Instant,
}

impl Watch {
    /// Watches `rules`, sampling `source` every `interval`; the first sample is due at `start`.
    pub(crate) fn new(rules: Vec<Rule>, interval: Duration, source: Box<dyn MetricSource>, start: Instant) -> Watch {
        let rules = rules
            .into_iter()
            .map(|rule| {
                let samples_in = |d: Duration| (d.as_secs_f64() / interval.as_secs_f64()).round() as usize;
                let (window_samples, lookback) = match &rule.condition {
                    // Saturating: `Builder::auto_interval` takes any duration, and a lookback of
                    // `Duration::MAX` only means all of the (capped) history is kept.
                    Condition::Absolute(_) => (0, interval.saturating_mul(10)),
                    Condition::Sustained(_, d) => (0, d.saturating_add(interval.saturating_mul(3))),
                    Condition::Jump { window, .. } => {
                        let n = window.map_or(DEFAULT_JUMP_WINDOW_SAMPLES, samples_in).max(2);
                        (n, interval.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX).saturating_add(3)))
                    }
                };
                RuleState {
                    unit: rule.unit(),
                    rule,
                    above_since: None,
                    window: VecDeque::new(),
                    window_samples,
                    history: VecDeque::new(),
                    lookback,
                    capturing: false,
                    cooldown_until: None,
                    told_cooling: false,
                    told_busy: false,
                }
            })
            .collect();
        Watch { interval, source, rules, next_due: start }
    }

    /// When the control thread must wake for the next sample.
    pub(crate) fn next_due(&self) -> Instant {
        self.next_due
    }

    /// Takes a sample if one is due at `now` and evaluates every rule on it. Returns the first
    /// rule that fires; none fires while `capture_running` (a capture, manual or automatic,
    /// owns the profilers), but every rule still sees the sample.
    pub(crate) fn tick(&mut self, now: Instant, capture_running: bool) -> Option<Firing> {
        if now < self.next_due {
            return None;
        }
        // On schedule, the sample counts as taken when it was due, so a `for 10s` at a 1 s
        // interval needs ten intervals, not ten plus the wake-up jitter. If the thread was held
        // up for longer than an interval (a capture writing its files), the missed samples are
        // skipped, not bunched, and the sample is dated now.
        let due = self.next_due;
        self.next_due = env::instant_after(due, self.interval);
        let at = if self.next_due <= now {
            self.next_due = env::instant_after(now, self.interval);
            now
        } else {
            due
        };
        let sample = self.source.sample(at);
        self.observe(&sample, capture_running)
    }

    /// Evaluates every rule on `sample`.
    pub(crate) fn observe(&mut self, sample: &Sample, capture_running: bool) -> Option<Firing> {
        let mut fired = None;
        for (index, state) in self.rules.iter_mut().enumerate() {
            if !capture_running {
                state.told_busy = false;
            }
            let Some((holds, reason)) = state.evaluate(sample) else { continue };
            if !holds {
                continue;
            }
            if let Some(until) = state.cooldown_until {
                if sample.at < until {
                    if !state.told_cooling {
                        state.told_cooling = true;
                        tracing::info!(
                            rule = %state.rule.text,
                            %reason,
                            cooldown_left = ?until.saturating_duration_since(sample.at),
                            "onsite: rule holds again but is cooling down"
                        );
                    }
                    continue;
                }
                state.cooldown_until = None;
                state.told_cooling = false;
            }
            if capture_running || fired.is_some() {
                if !state.told_busy {
                    state.told_busy = true;
                    tracing::info!(
                        rule = %state.rule.text,
                        %reason,
                        "onsite: rule holds but another capture is running; it fires once that one ends, if it still holds"
                    );
                }
                continue;
            }
            state.capturing = true;
            // A new firing needs a new run of excess: the run that fired this one is spent.
            state.above_since = None;
            fired = Some(Firing {
                rule: index,
                text: state.rule.text.clone(),
                metric: state.rule.metric,
                unit: state.unit,
                value: state.history.back().map_or(0.0, |p| p.value),
                reason,
                history: state.history.iter().copied().collect(),
                limit: match state.rule.metric {
                    Metric::Memory => sample.memory_limit.map(|l| l as f64),
                    Metric::Cpu => sample.cpus,
                    Metric::Threads => None,
                },
                kinds: state.rule.kinds.clone(),
                capture: state.rule.capture,
                cooldown: state.rule.cooldown,
            });
        }
        fired
    }

    /// The capture `rule` started has ended at `at`: its cooldown starts now.
    pub(crate) fn capture_ended(&mut self, rule: usize, at: Instant) {
        if let Some(state) = self.rules.get_mut(rule) {
            state.capturing = false;
            state.cooldown_until = Some(env::instant_after(at, state.rule.cooldown));
            state.told_cooling = false;
        }
    }
}

impl RuleState {
    /// Records the sample and says whether the condition holds (and why); `None` when the
    /// sample lacks this rule's metric.
    fn evaluate(&mut self, sample: &Sample) -> Option<(bool, String)> {
        let Some(value) = read(sample, self.rule.metric, self.unit) else {
            // Unknown is not above: a run of excess needs every sample.
            self.above_since = None;
            return None;
        };
        self.remember(sample, value);
        let metric = self.rule.metric.as_str();
        let shown = show(value, self.unit);
        match self.rule.condition.clone() {
            Condition::Absolute(level) => Some((value > level.value(), format!("{metric} at {shown}, above {level}"))),
            Condition::Sustained(level, d) => {
                if value > level.value() {
                    let since = *self.above_since.get_or_insert(sample.at);
                    let run = sample.at.saturating_duration_since(since);
                    Some((
                        run >= d,
                        format!("{metric} above {level} in every sample for {run:.1?} (now {shown}; rule: for {d:?})"),
                    ))
                } else {
                    self.above_since = None;
                    Some((false, String::new()))
                }
            }
            Condition::Jump { percent, min, .. } => {
                let warmed_up = self.window.len() >= self.window_samples;
                let average = self.window.iter().sum::<f64>() / self.window.len().max(1) as f64;
                self.window.push_back(value);
                while self.window.len() > self.window_samples {
                    self.window.pop_front();
                }
                if !warmed_up {
                    return Some((false, String::new()));
                }
                let above_min =
                    min.is_none_or(|m| read(sample, self.rule.metric, m.unit()).is_some_and(|v| v > m.value()));
                let jumped = value > average && value >= average * (1.0 + percent / 100.0);
                let floor = min.map(|m| format!(", above min {m}")).unwrap_or_default();
                Some((
                    jumped && above_min,
                    format!(
                        "{metric} at {shown}, at least {percent}% above its average of {} over the previous {} samples{floor}",
                        show(average, self.unit),
                        self.window_samples
                    ),
                ))
            }
        }
    }

    fn remember(&mut self, sample: &Sample, value: f64) {
        let unix_ms = sample.wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.history.push_back(Point { at: sample.at, unix_ms, value });
        while self.history.len() > MAX_HISTORY
            || self.history.front().is_some_and(|p| sample.at.saturating_duration_since(p.at) > self.lookback)
        {
            self.history.pop_front();
        }
    }
}

/// `metric` from `sample` in `unit`.
fn read(sample: &Sample, metric: Metric, unit: Unit) -> Option<f64> {
    match (metric, unit) {
        (Metric::Cpu, _) => sample.cpu_percent,
        (Metric::Memory, Unit::Bytes) => sample.rss.map(|r| r as f64),
        (Metric::Memory, _) => match (sample.rss, sample.memory_limit) {
            (Some(rss), Some(limit)) if limit > 0 => Some(100.0 * rss as f64 / limit as f64),
            _ => None,
        },
        (Metric::Threads, _) => sample.threads.map(|t| t as f64),
    }
}

/// A value the way logs show it.
pub(crate) fn show(value: f64, unit: Unit) -> String {
    match unit {
        Unit::Percent => format!("{value:.1}%"),
        Unit::Bytes => human_bytes(value),
        Unit::Count => format!("{value:.0}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auto::rule::parse_rule;
    use std::sync::{Arc, Mutex};
    use std::time::SystemTime;

    const INTERVAL: Duration = Duration::from_secs(5);

    /// A metric source that plays back a script of thread counts (tests use the threads metric
    /// for counts, mem for percentages), one value per sample; the clock is whatever `tick` is
    /// given.
    #[derive(Clone, Default)]
    struct Script {
        threads: Arc<Mutex<VecDeque<Option<u64>>>>,
        mem_percent: Arc<Mutex<VecDeque<f64>>>,
    }

    impl MetricSource for Script {
        fn sample(&mut self, at: Instant) -> Sample {
            let mut s = Sample::empty(at, SystemTime::now());
            s.threads = self.threads.lock().unwrap().pop_front().flatten();
            if let Some(p) = self.mem_percent.lock().unwrap().pop_front() {
                s.rss = Some((p * 10.0) as u64);
                s.memory_limit = Some(1000);
            }
            s
        }
    }

    /// Drives `rules` over `values` (one per interval, from a made-up start), with captures
    /// lasting `capture_samples` samples; returns the sample indexes at which a rule fired.
    fn fired_at(rules: &str, threads: &[Option<u64>], capture_samples: usize) -> Vec<usize> {
        let script = Script::default();
        script.threads.lock().unwrap().extend(threads.iter().copied());
        let rules = rules.split(';').map(|r| parse_rule(r).unwrap()).collect();
        let start = Instant::now();
        let mut watch = Watch::new(rules, INTERVAL, Box::new(script), start);
        let mut fired = Vec::new();
        let mut capture: Option<(usize, usize)> = None; // (rule, ends at sample)
        for i in 0..threads.len() {
            let now = start + INTERVAL * i as u32;
            if let Some((rule, ends)) = capture
                && i >= ends
            {
                watch.capture_ended(rule, now);
                capture = None;
            }
            if let Some(f) = watch.tick(now, capture.is_some()) {
                fired.push(i);
                capture = Some((f.rule, i + capture_samples));
            }
        }
        fired
    }

    fn all(n: usize, v: u64) -> Vec<Option<u64>> {
        vec![Some(v); n]
    }

    #[test]
    fn sustained_fires_only_after_the_whole_duration_of_excess() {
        // Above from sample 2 on; `for 20s` = 4 intervals after the first sample above.
        let mut values = all(2, 10);
        values.extend(all(10, 100));
        assert_eq!(fired_at("threads>50for20s", &values, 1), vec![6]);
    }

    #[test]
    fn sustained_resets_when_the_value_dips() {
        let mut values = all(4, 100); // samples 0..=3 above: 15 s, not yet 20 s
        values.push(Some(50)); // at the level is not above it: the run ends
        values.extend(all(4, 100)); // 5..=8: 15 s again
        assert_eq!(fired_at("threads>50for20s", &values, 1), Vec::<usize>::new());
        values.push(Some(100)); // 9: 20 s since sample 5
        assert_eq!(fired_at("threads>50for20s", &values, 1), vec![9]);
    }

    #[test]
    fn a_missing_sample_breaks_a_sustained_run() {
        let mut values = all(4, 100);
        values.push(None);
        values.extend(all(4, 100));
        assert_eq!(fired_at("threads>50for20s", &values, 1), Vec::<usize>::new());
    }

    #[test]
    fn a_flapping_metric_never_fires_a_sustained_rule() {
        let values: Vec<Option<u64>> = (0..200).map(|i| Some(if i % 3 == 2 { 10 } else { 1000 })).collect();
        assert_eq!(fired_at("threads>50for20s", &values, 1), Vec::<usize>::new());
        // The same values fire an absolute rule at once: the difference is the `for`.
        assert_eq!(fired_at("threads>50", &values, 1)[0], 0);
    }

    #[test]
    fn cooldown_holds_then_lets_the_rule_fire_again() {
        // Always above; capture 2 samples (10 s), cooldown 1m = 12 samples after it ends.
        let fired = fired_at("threads>50 cooldown=1m", &all(40, 100), 2);
        // Fires at 0, capture ends at 2, cooling until 2 + 12 = 14, fires at 14, ends 16, …
        assert_eq!(fired, vec![0, 14, 28]);
    }

    #[test]
    fn sustained_after_cooldown_needs_no_fresh_wait_if_the_problem_never_went_away() {
        // The run restarts at the firing; by the end of the cooldown it is long enough.
        let fired = fired_at("threads>50for20s cooldown=1m", &all(40, 100), 2);
        assert_eq!(fired, vec![4, 18, 32]);
    }

    #[test]
    fn jump_ignores_the_warm_up_and_fires_on_a_jump_over_the_average() {
        // 3-sample window: samples 0..=2 are the warm-up, so the jump at 1 does not fire.
        let values = [Some(10), Some(100), Some(100), Some(100), Some(100), Some(300), Some(300)];
        let fired = fired_at("threads+50% window=15s", &values, 1);
        // At 3 the average of (10,100,100) is 70, and 100 ≥ 105 is false; at 5, 300 ≥ 150.
        assert_eq!(fired, vec![5]);
    }

    #[test]
    fn jump_respects_min() {
        let values = [Some(1), Some(1), Some(1), Some(5)];
        assert_eq!(fired_at("threads+50% window=15s", &values, 1), vec![3]);
        assert_eq!(fired_at("threads+50% window=15s min=100", &values, 1), Vec::<usize>::new());
    }

    #[test]
    fn no_rule_fires_during_a_capture_and_one_fires_at_a_time() {
        // Two rules hold at once: the first fires; the second waits for the capture to end.
        let fired = fired_at("threads>50; threads>60", &all(6, 100), 3);
        assert_eq!(fired, vec![0, 3]);
    }

    #[test]
    fn a_firing_carries_the_history_that_fired_it() {
        let script = Script::default();
        script.mem_percent.lock().unwrap().extend([10.0, 90.0, 91.0, 92.0, 93.0]);
        let start = Instant::now();
        let rule = parse_rule("mem>80%for10s kinds=memory capture=20s").unwrap();
        let mut watch = Watch::new(vec![rule], INTERVAL, Box::new(script), start);
        let mut firing = None;
        for i in 0..5u32 {
            firing = firing.or(watch.tick(start + INTERVAL * i, false));
        }
        let f = firing.expect("fires at the 4th sample");
        assert_eq!(f.metric, Metric::Memory);
        assert_eq!(f.unit, Unit::Percent);
        assert_eq!(f.value, 92.0);
        let values: Vec<f64> = f.history.iter().map(|p| p.value).collect();
        assert_eq!(values, [10.0, 90.0, 91.0, 92.0]);
        assert_eq!(f.kinds, Some(vec![ProfileKind::Memory]));
        assert_eq!(f.capture, Duration::from_secs(20));
        assert_eq!(f.limit, Some(1000.0));
        assert!(f.reason.contains("for 10.0s"), "{}", f.reason);
    }

    #[test]
    fn samples_are_taken_once_per_interval_and_a_late_wake_skips_missed_ones() {
        let script = Script::default();
        script.threads.lock().unwrap().extend(all(10, 1));
        let start = Instant::now();
        let mut watch = Watch::new(vec![parse_rule("threads>50").unwrap()], INTERVAL, Box::new(script.clone()), start);
        watch.tick(start, false);
        assert_eq!(watch.next_due(), start + INTERVAL);
        watch.tick(start + Duration::from_secs(1), false); // not due: no sample taken
        assert_eq!(script.threads.lock().unwrap().len(), 9);
        watch.tick(start + Duration::from_secs(23), false); // late: one sample, next due 5 s on
        assert_eq!(script.threads.lock().unwrap().len(), 8);
        assert_eq!(watch.next_due(), start + Duration::from_secs(28));
    }

    #[test]
    fn a_builder_interval_or_cooldown_no_clock_can_add_never_panics() {
        let script = Script::default();
        script.threads.lock().unwrap().extend(all(3, 100));
        let mut rule = parse_rule("threads>50").unwrap();
        rule.cooldown = Duration::MAX;
        let rules = vec![rule, parse_rule("threads>50for1h").unwrap(), parse_rule("threads+50%").unwrap()];
        let start = Instant::now();
        let mut watch = Watch::new(rules, Duration::MAX, Box::new(script), start);
        let fired = watch.tick(start, false).expect("fires on the first sample");
        assert_eq!(watch.next_due(), start + crate::env::LONGEST);
        watch.capture_ended(fired.rule, start);
        watch.tick(start + crate::env::LONGEST, false);
        assert!(watch.next_due() > start + crate::env::LONGEST);
    }
}
