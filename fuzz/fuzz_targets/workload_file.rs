//! `cargo xtask fuzz --target workload_file`: see `ztunnel::fuzzing::workload_file`.
#![no_main]

#[global_allocator]
static ALLOCATOR: ztunnel::fuzzing::CappedAllocator = ztunnel::fuzzing::CappedAllocator;

libfuzzer_sys::fuzz_target!(init: ztunnel::fuzzing::init("workload_file"), |data: &[u8]| {
    ztunnel::fuzzing::workload_file::run(data)
});
