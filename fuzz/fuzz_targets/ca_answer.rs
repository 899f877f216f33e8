//! `cargo xtask fuzz --target ca_answer`: see `ztunnel::fuzzing::ca_answer`.
#![no_main]

#[global_allocator]
static ALLOCATOR: ztunnel::fuzzing::CappedAllocator = ztunnel::fuzzing::CappedAllocator;

libfuzzer_sys::fuzz_target!(init: ztunnel::fuzzing::init("ca_answer"), |data: &[u8]| {
    ztunnel::fuzzing::ca_answer::run(data)
});
