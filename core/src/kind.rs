//! The kinds of profile onsite captures, and the names they carry in dump files.

use std::fmt;
use std::str::FromStr;

/// One kind of evidence a capture can produce. The string form (`as_str`) is the `{kind}` part
/// of a dump file name and the word used in `ONSITE_KINDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProfileKind {
    /// CPU samples (pprof-rs), `samples/count` and `cpu/nanoseconds`.
    Cpu,
    /// Heap allocations still live at the end of a capture.
    Memory,
    /// Lock contention charged to the thread that unlocks (Go's mutex profile).
    Mutex,
    /// Time threads spent waiting, charged to the waiter (Go's block profile).
    Block,
    /// A timeline of `tracing` spans (Chrome Trace Event JSON).
    Trace,
    /// Threads created during the capture, by creating stack.
    ThreadCreate,
    /// CPU samples of the minutes before a capture began, from the always-on CPU flight
    /// recorder (written at a capture's start when the recorder runs).
    CpuBefore,
    /// Every thread's stack right now (SIGUSR1), not part of a toggled capture.
    Threads,
    /// The per-capture manifest: why it started, which files it wrote.
    Manifest,
}

impl ProfileKind {
    /// The kinds a SIGUSR2 capture can contain, in the order their files are written.
    pub const CAPTURED: [ProfileKind; 6] = [
        ProfileKind::Cpu,
        ProfileKind::Memory,
        ProfileKind::Mutex,
        ProfileKind::Block,
        ProfileKind::Trace,
        ProfileKind::ThreadCreate,
    ];

    /// Every kind of file onsite writes, in the order a capture's files are listed.
    pub const FILES: [ProfileKind; 9] = [
        ProfileKind::Cpu,
        ProfileKind::CpuBefore,
        ProfileKind::Memory,
        ProfileKind::Mutex,
        ProfileKind::Block,
        ProfileKind::Trace,
        ProfileKind::ThreadCreate,
        ProfileKind::Threads,
        ProfileKind::Manifest,
    ];

    /// The name used in file names and in configuration.
    pub const fn as_str(self) -> &'static str {
        match self {
            ProfileKind::Cpu => "cpu",
            ProfileKind::CpuBefore => "cpu-before",
            ProfileKind::Memory => "memory",
            ProfileKind::Mutex => "mutex",
            ProfileKind::Block => "block",
            ProfileKind::Trace => "trace",
            ProfileKind::ThreadCreate => "threadcreate",
            ProfileKind::Threads => "threads",
            ProfileKind::Manifest => "manifest",
        }
    }
}

impl fmt::Display for ProfileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a word that names no profile kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKind(pub String);

impl fmt::Display for UnknownKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known: Vec<&str> = ProfileKind::CAPTURED.iter().map(|k| k.as_str()).collect();
        write!(f, "unknown profile kind {:?} (known: {})", self.0, known.join(", "))
    }
}

impl std::error::Error for UnknownKind {}

impl FromStr for ProfileKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let word = s.trim();
        ProfileKind::FILES
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(word))
            .ok_or_else(|| UnknownKind(word.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_name() {
        for kind in ProfileKind::CAPTURED {
            assert_eq!(kind.as_str().parse::<ProfileKind>(), Ok(kind));
        }
        for kind in ProfileKind::FILES {
            assert_eq!(kind.as_str().parse::<ProfileKind>(), Ok(kind));
        }
        assert_eq!(" CPU ".parse::<ProfileKind>(), Ok(ProfileKind::Cpu));
        let err = "heap".parse::<ProfileKind>().unwrap_err();
        assert!(err.to_string().contains("\"heap\""), "{err}");
    }
}
