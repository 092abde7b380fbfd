//! onsite's allocator over mimalloc; the loop, the setups and the method are in `common`.

mod common;

use mimalloc::MiMalloc;
use onsite_memory::Allocator;

#[global_allocator]
static ALLOC: Allocator<MiMalloc> = Allocator::wrapping(MiMalloc);

static SUBJECT: common::Subject<MiMalloc> =
    common::Subject { name: "mimalloc", bare: &MiMalloc, onsite: &ALLOC, dhat: false, profiler: None };

fn main() {
    common::main(&SUBJECT);
}
