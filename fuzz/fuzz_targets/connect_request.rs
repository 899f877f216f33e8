//! `cargo xtask fuzz --target connect_request`: see `ztunnel::fuzzing::connect_request`.
#![no_main]

#[global_allocator]
static ALLOCATOR: ztunnel::fuzzing::CappedAllocator = ztunnel::fuzzing::CappedAllocator;

libfuzzer_sys::fuzz_target!(init: ztunnel::fuzzing::init("connect_request"), |data: &[u8]| {
    ztunnel::fuzzing::connect_request::run(data)
});
