//! onsite's allocator over jemalloc, and jemalloc's own heap profiler at the same mean (the
//! anchor: `prof:true`, `lg_prof_sample:19` = 512 KiB, switched on per slice through
//! `prof.active`); the loop, the setups and the method are in `common`.

mod common;

use onsite_memory::Allocator;
use tikv_jemallocator::Jemalloc;

#[global_allocator]
static ALLOC: Allocator<Jemalloc> = Allocator::wrapping(Jemalloc);

static SUBJECT: common::Subject = common::Subject {
    name: "jemalloc",
    bare: common::loop_over::<Bare>,
    onsite: common::loop_over::<Onsite>,
    dhat: false,
    profiler: Some(common::InnerProfiler {
        name: "jemalloc's own profiler (lg_prof_sample:19)",
        // tikv-jemallocator's jemalloc reads its options from `_RJEM_MALLOC_CONF` (its symbols
        // carry the `_rjem_` prefix).
        conf: ("_RJEM_MALLOC_CONF", "prof:true,prof_active:false,lg_prof_sample:19"),
        check: profiler_configured,
        activate: activate_profiler,
    }),
};

/// Panics unless jemalloc runs with its profiler built, configured and sampling every 2^19 bytes.
fn profiler_configured() {
    // SAFETY: the names are jemalloc's, with the types its documentation gives them.
    let (prof, lg_sample) = unsafe {
        (
            tikv_jemalloc_ctl::raw::read::<bool>(b"opt.prof\0").expect("jemalloc built with profiling"),
            tikv_jemalloc_ctl::raw::read::<usize>(b"opt.lg_prof_sample\0").expect("opt.lg_prof_sample"),
        )
    };
    assert!(prof && lg_sample == 19, "jemalloc's profiler is not configured: prof {prof}, lg_prof_sample {lg_sample}");
}

fn activate_profiler(active: bool) {
    // SAFETY: `prof.active` is a bool, writable when `opt.prof` is on.
    unsafe { tikv_jemalloc_ctl::raw::write(b"prof.active\0", active) }.expect("prof.active is writable");
}

common::reaches!(Jemalloc = Jemalloc, ALLOC);

fn main() {
    common::main(&SUBJECT);
}
