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

common::reaches!(MiMalloc = MiMalloc, ALLOC);

fn main() {
    common::main(&SUBJECT);
}
