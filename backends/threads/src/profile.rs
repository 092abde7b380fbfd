//! The threadcreate profile: threads created during a capture, and threads alive at its stop,
//! by creating stack.

use std::collections::{HashMap, HashSet};
use std::time::{Instant, SystemTime};

use onsite_core::pprof::{Frame, PprofBuilder};
use onsite_core::{CaptureError, CaptureOutput, ProfileKind, Profiler, Stopper};

use crate::hook::{self, HookStatus, NO_STACK};

/// The threads backend's [`Profiler`]: `…-threadcreate-….pprof` with sample types
/// `threadcreate/count` (created during the capture, Go's name) and `alive/count` (alive at
/// the stop), each by the stack that called `pthread_create`.
#[derive(Debug, Default)]
pub struct ThreadCreateProfiler {
    _private: (),
}

impl ThreadCreateProfiler {
    /// A profiler reading the process-wide `pthread_create` hook.
    pub fn new() -> Self {
        ThreadCreateProfiler { _private: () }
    }
}

impl Profiler for ThreadCreateProfiler {
    fn kind(&self) -> ProfileKind {
        ProfileKind::ThreadCreate
    }

    fn start(&mut self) -> Result<Box<dyn Stopper>, CaptureError> {
        if hook::hook_status() == HookStatus::StaticBuildWithoutWrap {
            return Err(CaptureError::new(
                ProfileKind::ThreadCreate,
                "this is a static build (crt-static/musl), where the pthread_create hook needs the linker: \
                 enable onsite-threads' `wrap` feature and link with `-C link-arg=-Wl,--wrap=pthread_create`",
            ));
        }
        crate::fork::register_child_handler();
        // Room for this capture's stacks; the counts below are read after it.
        hook::compact();
        Ok(Box::new(ThreadCreateStopper {
            started_at: SystemTime::now(),
            started: Instant::now(),
            created_before: hook::created_counts(),
            without_stack_before: hook::created_without_stack(),
        }))
    }
}

struct ThreadCreateStopper {
    started_at: SystemTime,
    started: Instant,
    created_before: Vec<u64>,
    without_stack_before: u64,
}

/// The same plumbing as the profile's `drop_frames`, for a reader that names a stripped
/// service's frames later (`pprof` with `PPROF_BINARY_PATH`, `symbolize_offline`). pprof drops
/// from the first match counted from the root, so only the functions that create a thread are
/// listed, never the ones every thread starts in (std's `thread_start`, onsite's trampoline).
/// A legacy symbol hash (`::h0123…`) may follow, as pprof's own demangler leaves it.
const HOOK_FRAMES_REGEX: &str = "(?:<?std::sys::thread::[a-z_]+::Thread>?::new|std::thread::lifecycle::spawn_unchecked\
|std::thread::Builder::spawn[a-z_]*|std::thread::spawn|pthread_create|__wrap_pthread_create)(?:<.*>)?(?:::h[0-9a-f]{16})?";

/// The hook's own frames, and std's thread-spawning plumbing, at the leaf end of a creating
/// stack: without them a stack's leaf is the code that asked for the thread.
fn is_hook_frame(function: &str) -> bool {
    const STD_SPAWN: [&str; 4] = ["std::thread::", "<std::thread::", "std::sys::thread::", "<std::sys::thread::"];
    STD_SPAWN.iter().any(|p| function.starts_with(p))
        || function.starts_with("backtrace::")
        || function.starts_with("onsite_threads::")
        || function.starts_with("onsite_core::stack_walk::")
        || function.starts_with("_Unwind_")
        || function == "pthread_create"
        || function == "__wrap_pthread_create"
}

fn pseudo_frame(name: &str) -> Vec<Vec<Frame>> {
    vec![vec![Frame { function: name.to_owned(), system_name: None, file: None, line: 0 }]]
}

/// The thread ids of this process right now.
pub(crate) fn task_ids() -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

impl Stopper for ThreadCreateStopper {
    fn stop(self: Box<Self>, out: &CaptureOutput) -> Result<(), CaptureError> {
        let created_now = hook::created_counts();
        let without_stack = hook::created_without_stack() - self.without_stack_before;
        let tasks: HashSet<i32> = task_ids().into_iter().collect();
        let live = hook::live_threads();
        let mut alive_by_stack: HashMap<u32, i64> = HashMap::new();
        let mut hooked: HashSet<i32> = HashSet::new();
        for &(tid, stack) in &live {
            if tasks.contains(&tid) {
                *alive_by_stack.entry(stack).or_default() += 1;
                hooked.insert(tid);
            }
        }
        let pid = std::process::id() as i32;
        let main_alive = i64::from(tasks.contains(&pid));
        let untracked = tasks.iter().filter(|&&t| t != pid && !hooked.contains(&t)).count() as i64;

        let mut builder =
            PprofBuilder::new(&[("threadcreate", "count"), ("alive", "count")], ("threadcreate", "count"), 1)
                .default_sample_type("threadcreate")
                .time_range(self.started_at, self.started.elapsed())
                .skip_leaf_frames(is_hook_frame)
                .drop_frames(HOOK_FRAMES_REGEX);
        let mut created_total = 0;
        for (index, (&now, &before)) in created_now.iter().zip(&self.created_before).enumerate() {
            let created = (now - before) as i64;
            let alive = alive_by_stack.get(&(index as u32)).copied().unwrap_or(0);
            if created == 0 && alive == 0 {
                continue;
            }
            if let Some(ips) = hook::stack(index) {
                builder.add_addresses(&ips, &[created, alive], &[]);
                created_total += created;
            }
        }
        let alive_unknown = alive_by_stack.get(&NO_STACK).copied().unwrap_or(0);
        if without_stack > 0 || alive_unknown > 0 {
            let frames = pseudo_frame("[onsite: creating stack not recorded, table full]");
            builder.add_frames(&frames, &[without_stack as i64, alive_unknown], &[]);
            created_total += without_stack as i64;
        }
        if main_alive > 0 {
            builder.add_frames(&pseudo_frame("[main thread]"), &[0, main_alive], &[]);
        }
        if untracked > 0 {
            let frames = pseudo_frame(
                "[not seen by the pthread_create hook: glibc-internal, raw clone, created before it, or exiting]",
            );
            builder.add_frames(&frames, &[0, untracked], &[]);
        }
        builder.comment(&format!(
            "threads created during the capture: {created_total}; alive at the stop: {}",
            tasks.len()
        ));
        out.write(ProfileKind::ThreadCreate, "pprof", |w| builder.write_gzip(w))?;
        Ok(())
    }
}
