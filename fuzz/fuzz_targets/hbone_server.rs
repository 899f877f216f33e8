//! `cargo xtask fuzz --target hbone_server`: see `ztunnel::fuzzing::hbone_server`.
#![no_main]

#[global_allocator]
static ALLOCATOR: ztunnel::fuzzing::CappedAllocator = ztunnel::fuzzing::CappedAllocator;

libfuzzer_sys::fuzz_target!(init: ztunnel::fuzzing::init("hbone_server"), |data: &[u8]| {
    ztunnel::fuzzing::hbone_server::run(data)
});
