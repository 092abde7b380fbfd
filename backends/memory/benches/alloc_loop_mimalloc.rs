//! onsite's allocator over mimalloc; the loop, the setups and the method are in `common`.

mod common;

use mimalloc::MiMalloc;
use onsite_memory::Allocator;

#[global_allocator]
static ALLOC: Allocator<MiMalloc> = Allocator::wrapping(MiMalloc);

static SUBJECT: common::Subject = common::Subject {
    name: "mimalloc",
    bare: common::loop_over::<Bare>,
    onsite: common::loop_over::<Onsite>,
    dhat: false,
    profiler: None,
};

/// The bare inner allocator, and onsite's over it, for `common::loop_over`.
struct Bare;
struct Onsite;

impl common::Reach for Bare {
    type Alloc = MiMalloc;
    const ALLOC: &'static MiMalloc = &MiMalloc;
}

impl common::Reach for Onsite {
    type Alloc = Allocator<MiMalloc>;
    const ALLOC: &'static Allocator<MiMalloc> = &ALLOC;
}

fn main() {
    common::main(&SUBJECT);
}
