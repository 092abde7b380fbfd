//! The builder's output, decoded again: functions are symbolised from real addresses, values
//! and sample types survive, and the profiler's own leaf frames are dropped.

use onsite_core::pprof::{PprofBuilder, decode, function_totals};

#[inline(never)]
fn a_function_with_a_known_name() -> Vec<usize> {
    let mut ips = Vec::new();
    backtrace::trace(|frame| {
        ips.push(frame.ip() as usize);
        true
    });
    std::hint::black_box(ips)
}

#[test]
fn stacks_of_real_addresses_decode_to_named_functions() {
    let ips = a_function_with_a_known_name();
    let mut builder =
        PprofBuilder::new(&[("contentions", "count"), ("delay", "nanoseconds")], ("contentions", "count"), 1)
            .skip_leaf_frames(|f| f.starts_with("backtrace::"));
    builder.add_addresses(&ips, &[3, 3000], &[("thread", "main")]);
    builder.add_addresses(&ips, &[1, 1000], &[]);
    let mut bytes = Vec::new();
    builder.write_gzip(&mut bytes).unwrap();
    assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip'd like Go's");

    let profile = decode(&bytes).unwrap();
    assert_eq!(profile.sample.len(), 2);
    let top = function_totals(&profile, "delay").unwrap();
    assert!(
        top[0].function.ends_with("a_function_with_a_known_name"),
        "the backtrace frames are skipped and the caller is the leaf: {top:?}"
    );
    assert_eq!(top[0].flat, 4000);
    assert!(top.iter().any(|t| t.function.contains("stacks_of_real_addresses_decode_to_named_functions")));
    assert!(function_totals(&profile, "no_such_type").is_none());
}

#[test]
fn garbage_is_a_decode_error() {
    assert!(decode(b"not a profile at all").is_err());
}
