//! `cargo xtask fuzz --target zds`: see `ztunnel::fuzzing::zds`.
#![no_main]

#[global_allocator]
static ALLOCATOR: ztunnel::fuzzing::CappedAllocator = ztunnel::fuzzing::CappedAllocator;

libfuzzer_sys::fuzz_target!(init: ztunnel::fuzzing::init("zds"), |data: &[u8]| {
    ztunnel::fuzzing::zds::run(data)
});
