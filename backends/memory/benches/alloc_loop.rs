//! onsite's allocator over `System`; the loop, the setups and the method are in `common`.

mod common;

use std::alloc::System;

use onsite_memory::Allocator;

#[global_allocator]
static ALLOC: Allocator = Allocator::new();

static SUBJECT: common::Subject = common::Subject {
    name: "System",
    bare: common::loop_over::<Bare>,
    onsite: common::loop_over::<Onsite>,
    dhat: true,
    profiler: None,
};

common::reaches!(System = System, ALLOC);

fn main() {
    common::main(&SUBJECT);
}
