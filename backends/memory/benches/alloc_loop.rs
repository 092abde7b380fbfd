//! onsite's allocator over `System`; the loop, the setups and the method are in `common`.

mod common;

use std::alloc::System;

use onsite_memory::Allocator;

#[global_allocator]
static ALLOC: Allocator = Allocator::new();

static SUBJECT: common::Subject<System> =
    common::Subject { name: "System", bare: &System, onsite: &ALLOC, dhat: true, profiler: None };

fn main() {
    common::main(&SUBJECT);
}
