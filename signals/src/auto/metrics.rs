//! The process's own metrics, read on the control thread once per interval: CPU against what
//! it may use, RSS against its memory limit, and live threads. Each read is a syscall or a
//! small `/proc` or cgroup file; nothing is read for a metric no rule watches.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use super::cgroup::Cgroups;

/// One reading of every watched metric. A metric that could not be read (or is not watched,
/// or, for CPU, has no previous reading to compare with yet) is `None`.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// When it was taken, on the clock rules measure durations with.
    pub(crate) at: Instant,
    /// The same moment on the wall clock, for manifests.
    pub(crate) wall: SystemTime,
    /// CPU used since the previous sample, in percent of `cpus`.
    pub(crate) cpu_percent: Option<f64>,
    /// The CPUs the process may use: its cgroup quota, or the CPUs in its affinity mask.
    pub(crate) cpus: Option<f64>,
    /// Resident set size in bytes.
    pub(crate) rss: Option<u64>,
    /// The memory the process may use: its cgroup limit, or physical memory.
    pub(crate) memory_limit: Option<u64>,
    /// Live threads.
    pub(crate) threads: Option<u64>,
}

impl Sample {
    /// An empty sample taken at `at` (tests fill in the metrics they need).
    pub(crate) fn empty(at: Instant, wall: SystemTime) -> Sample {
        Sample { at, wall, cpu_percent: None, cpus: None, rss: None, memory_limit: None, threads: None }
    }
}

/// Which metrics the rules need.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Needs {
    pub(crate) cpu: bool,
    pub(crate) memory: bool,
    pub(crate) threads: bool,
}

/// Where samples come from: the process itself, or a script in tests.
pub(crate) trait MetricSource: Send {
    fn sample(&mut self, at: Instant) -> Sample;
}

/// The real process.
pub(crate) struct ProcessMetrics {
    needs: Needs,
    cgroups: Cgroups,
    previous_cpu: Option<(Instant, Duration)>,
}

impl ProcessMetrics {
    pub(crate) fn new(needs: Needs) -> ProcessMetrics {
        let cgroups = Cgroups::discover(Path::new("/"));
        tracing::debug!(cgroups = %cgroups.describe(), "onsite: automatic capture reads limits from here");
        ProcessMetrics { needs, cgroups, previous_cpu: None }
    }

    /// The CPUs this process may use now; a cgroup quota smaller than the affinity mask wins.
    fn cpus(&self) -> Option<f64> {
        let affinity = affinity_cpus();
        match (self.cgroups.cpu_limit(), affinity) {
            (Some(quota), Some(mask)) => Some(quota.min(mask as f64)),
            (Some(quota), None) => Some(quota),
            (None, Some(mask)) => Some(mask as f64),
            (None, None) => None,
        }
    }

    /// The memory this process may use now: its cgroup's limit, but never more than exists.
    fn memory_limit(&self) -> Option<u64> {
        match (self.cgroups.memory_limit(), physical_memory()) {
            (Some(limit), Some(physical)) => Some(limit.min(physical)),
            (limit, physical) => limit.or(physical),
        }
    }
}

impl MetricSource for ProcessMetrics {
    fn sample(&mut self, at: Instant) -> Sample {
        let mut sample = Sample::empty(at, SystemTime::now());
        if self.needs.cpu {
            let cpus = self.cpus();
            // The real moment of the reading, not the sample's scheduled time: the CPU time
            // is read now, so the wall time it is divided by must be too.
            let at = Instant::now();
            let used = process_cpu_time();
            if let (Some((then, used_then)), Some(used), Some(cpus)) = (self.previous_cpu, used, cpus) {
                let wall = at.saturating_duration_since(then).as_secs_f64();
                if wall > 0.0 && cpus > 0.0 {
                    let busy = used.saturating_sub(used_then).as_secs_f64();
                    sample.cpu_percent = Some(100.0 * busy / (wall * cpus));
                }
            }
            self.previous_cpu = used.map(|u| (at, u));
            sample.cpus = cpus;
        }
        if self.needs.memory {
            sample.rss = resident_bytes();
            sample.memory_limit = self.memory_limit();
        }
        if self.needs.threads {
            sample.threads = live_threads();
        }
        sample
    }
}

/// CPU time used by every thread of the process so far.
fn process_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return None;
    }
    Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// The CPUs in this process's affinity mask (what `taskset`/cpusets allow).
fn affinity_cpus() -> Option<usize> {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        match libc::CPU_COUNT(&set) {
            n if n > 0 => Some(n as usize),
            _ => None,
        }
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    }
}

fn physical_memory() -> Option<u64> {
    // SAFETY: as above.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    (pages > 0).then(|| pages as u64 * page_size())
}

/// RSS from `/proc/self/statm` (its second field, in pages).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// The `Threads:` line of `/proc/self/status`.
fn live_threads() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_reads_its_own_metrics() {
        let mut metrics = ProcessMetrics::new(Needs { cpu: true, memory: true, threads: true });
        let first = metrics.sample(Instant::now());
        assert_eq!(first.cpu_percent, None, "CPU needs a previous reading");
        assert!(first.cpus.is_some_and(|c| c > 0.0));
        assert!(first.rss.is_some_and(|r| r > 0));
        assert!(first.memory_limit.is_some_and(|l| l >= first.rss.unwrap()));
        assert!(first.threads.is_some_and(|t| t >= 1));
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(spin.elapsed());
        }
        let second = metrics.sample(Instant::now());
        assert!(second.cpu_percent.is_some_and(|p| p > 0.0), "{:?}", second.cpu_percent);
    }

    #[test]
    fn unwatched_metrics_are_not_read() {
        let mut metrics = ProcessMetrics::new(Needs { threads: true, ..Needs::default() });
        let s = metrics.sample(Instant::now());
        assert!(s.threads.is_some());
        assert!(s.rss.is_none() && s.cpus.is_none() && s.memory_limit.is_none());
    }
}
