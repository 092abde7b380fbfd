//! Go's heap profile layout, shared by both modes, and the conversion from dhat's JSON.

use std::time::{Duration, SystemTime};

use onsite_core::pprof::{Frame, PprofBuilder};

/// Go's heap sample types, in Go's order; `inuse_space` is the default view.
pub(crate) const SAMPLE_TYPES: [(&str, &str); 4] =
    [("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"), ("inuse_space", "bytes")];

/// Allocation machinery, as the `drop_frames` of the profile: a reader that names a stripped
/// service's frames later (`go tool pprof` with `PPROF_BINARY_PATH`) drops these and whatever
/// they called, as [`is_allocator_frame`] does here. Narrower than it: pprof drops from the
/// first match below the service's frames, so only functions that are never on the way back
/// into service code are listed.
const ALLOCATOR_FRAMES_REGEX: &str = "onsite_memory::.*|<onsite_memory::.*|__rustc::.*|__rust_(alloc|alloc_zeroed|realloc)\
|__rdl_.*|__rg_.*|alloc::alloc::.*|alloc::raw_vec::.*|<alloc::raw_vec::.*|dhat::.*|<dhat::.*|backtrace::.*|<backtrace::.*\
|framehop::.*|<framehop::.*|onsite_core::stack_walk::.*|_Unwind_.*|malloc|calloc|realloc";

/// A heap profile builder: Go's sample types, `space/bytes` period of `period` (the sampling
/// mean, 1 when exact), and the allocator's own leaf frames dropped.
pub(crate) fn builder(started: SystemTime, duration: Duration, period: i64) -> PprofBuilder {
    PprofBuilder::new(&SAMPLE_TYPES, ("space", "bytes"), period)
        .default_sample_type("inuse_space")
        .time_range(started, duration)
        .skip_leaf_frames(is_allocator_frame)
        .drop_frames(ALLOCATOR_FRAMES_REGEX)
}

/// Whether a function is part of allocating rather than of the code that asked for memory:
/// the allocator, the profiler, the stack walker, and the standard library's containers. Only
/// a run of these at the leaf end of a stack is dropped, so the first frame left is the
/// service's own function (Go's heap profile shows the caller of `new`/`make` the same way).
pub(crate) fn is_allocator_frame(function: &str) -> bool {
    const PREFIXES: [&str; 15] = [
        "alloc::",
        "core::",
        "std::",
        "hashbrown::",
        "onsite_memory::",
        "onsite_core::stack_walk::",
        "onsite_core::stack_walk::",
        "dhat::",
        "backtrace::",
        "__rust",
        "__rg_",
        "__rdl_",
        "_Unwind_",
        "malloc",
        "realloc",
    ];
    let name = function.strip_prefix('<').unwrap_or(function);
    // A new thread's entry (std's `thread_start`, the spawn closure that calls the thread's
    // function) is where a thread's own start-up allocations are made: named as such, they are
    // the thread machinery's, not charged to a bare `start_thread` of the C library.
    const THREAD_ENTRY: [&str; 3] = ["thread_start", "spawn_unchecked", "__rust_begin_short_backtrace"];
    if THREAD_ENTRY.iter().any(|entry| name.contains(entry)) {
        return false;
    }
    if PREFIXES.iter().any(|p| name.starts_with(p)) {
        return true;
    }
    // `<T as alloc::slice::hack::ConvertVec>::to_vec` and friends: a bare type parameter
    // implementing a standard trait is still the standard library at work.
    if let Some((self_type, rest)) = name.split_once(" as ") {
        let bare = !self_type.contains("::");
        return bare && ["alloc::", "core::", "std::"].iter().any(|p| rest.starts_with(p));
    }
    false
}

/// Converts dhat's JSON report to pprof samples: one per program point, its frames as dhat
/// symbolised them (innermost first; frames sharing an address are one inlined location), each
/// location at its address, in its real mapping.
pub(crate) fn add_dhat_report(json: &serde_json::Value, builder: &mut PprofBuilder) -> Result<(), String> {
    let table: Vec<&str> = json
        .get("ftbl")
        .and_then(|t| t.as_array())
        .ok_or("no frame table (ftbl)")?
        .iter()
        .map(|v| v.as_str().unwrap_or("???"))
        .collect();
    let points = json.get("pps").and_then(|p| p.as_array()).ok_or("no program points (pps)")?;
    for point in points {
        let number = |key: &str| point.get(key).and_then(|v| v.as_i64()).unwrap_or(0);
        let mut stack: Vec<(String, Vec<Frame>)> = Vec::new();
        for index in point.get("fs").and_then(|f| f.as_array()).into_iter().flatten() {
            let text = index.as_u64().and_then(|i| table.get(i as usize)).copied().unwrap_or("???");
            let (address, frame) = parse_dhat_frame(text);
            match stack.last_mut() {
                Some((last, frames)) if *last == address && address != "0x0" => frames.push(frame),
                _ => stack.push((address, vec![frame])),
            }
        }
        // dhat's own end-of-stack marker (address 0) is no frame.
        let stack: Vec<(usize, Vec<Frame>)> = stack
            .into_iter()
            .map(|(address, frames)| (parse_address(&address), frames))
            .filter(|(address, _)| *address != 0)
            .collect();
        builder.add_frames_at(&stack, &[number("tbk"), number("tb"), number("ebk"), number("eb")], &[]);
    }
    Ok(())
}

/// `0x55d0c1a2b3c4` → the address; 0 for anything else.
fn parse_address(text: &str) -> usize {
    text.strip_prefix("0x").and_then(|hex| usize::from_str_radix(hex, 16).ok()).unwrap_or(0)
}

/// Parses one of dhat's frame strings, `0x55d0c1a2b3c4: crate::function (src/file.rs:12:5)`.
fn parse_dhat_frame(text: &str) -> (String, Frame) {
    let (address, rest) = text.split_once(": ").unwrap_or(("0x0", text));
    let (function, location) = match rest.rfind(" (") {
        Some(i) if rest.ends_with(')') => (&rest[..i], &rest[i + 2..rest.len() - 1]),
        _ => (rest, ""),
    };
    // `file:line:column`; the file itself may contain colons, so split from the right.
    let mut parts = location.rsplitn(3, ':');
    let (_column, line, file) = (parts.next(), parts.next(), parts.next());
    let line = line.and_then(|l| l.parse().ok()).unwrap_or(0);
    let file = file.filter(|f| !f.is_empty() && *f != "???").map(str::to_owned);
    (address.to_owned(), Frame { function: function.to_owned(), system_name: None, file, line })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_frames_are_recognised_and_service_frames_are_not() {
        for own in [
            "alloc::raw_vec::finish_grow",
            "<alloc::vec::Vec<T,A> as core::ops::Drop>::drop",
            "<onsite_memory::Allocator as core::alloc::global::GlobalAlloc>::alloc",
            "__rustc::__rust_alloc",
            "<T as alloc::slice::hack::ConvertVec>::to_vec",
            "std::collections::hash::map::HashMap<K,V,S>::insert",
        ] {
            assert!(is_allocator_frame(own), "{own}");
        }
        for service in [
            "demo_mq::store::remember",
            "<demo_mq::Queue as core::clone::Clone>::clone",
            "main",
            "<std::sys::thread::unix::Thread>::new::thread_start",
        ] {
            assert!(!is_allocator_frame(service), "{service}");
        }
    }

    #[test]
    fn dhat_frames_parse_into_function_file_and_line() {
        let (address, frame) = parse_dhat_frame("0x55d0c1a2b3c4: demo::leak::keep (src/leak.rs:12:5)");
        assert_eq!(address, "0x55d0c1a2b3c4");
        assert_eq!(parse_address(&address), 0x55d0c1a2b3c4);
        assert_eq!(parse_address("???"), 0);
        assert_eq!(frame.function, "demo::leak::keep");
        assert_eq!(frame.file.as_deref(), Some("src/leak.rs"));
        assert_eq!(frame.line, 12);
        let (_, frame) = parse_dhat_frame("0x1: ??? (???:0:0)");
        assert_eq!(frame.function, "???");
        assert_eq!(frame.file, None);
    }
}
