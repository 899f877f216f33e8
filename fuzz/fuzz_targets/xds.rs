//! `cargo xtask fuzz --target xds`: see `ztunnel::fuzzing::xds`.
#![no_main]

#[global_allocator]
static ALLOCATOR: ztunnel::fuzzing::CappedAllocator = ztunnel::fuzzing::CappedAllocator;

libfuzzer_sys::fuzz_target!(init: ztunnel::fuzzing::init("xds"), |data: &[u8]| {
    ztunnel::fuzzing::xds::run(data)
});
