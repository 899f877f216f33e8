//! Fuzz harnesses, one module per target of the `fuzz/` crate (`cargo xtask fuzz`): each
//! takes the fuzzer's bytes to one of the places where ztunnel reads what others wrote,
//! checks what must hold whatever the input, and has seeds built from the same values as
//! the unit tests (each module's tests run its seeds through the harness).
//!
//! Only built with the `fuzzing` feature, which only the `fuzz/` crate turns on, and in
//! unit tests: living here, the harnesses reach the crate's internals without making them
//! public. A panic, an arithmetic overflow (the fuzz build keeps debug assertions), a
//! stall or an oversized allocation is a finding; errors returned for bad input are not.
pub mod ca_answer;
pub mod connect_request;
pub mod hbone_server;
pub mod workload_file;
pub mod xds;
pub mod zds;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::policy;
use crate::state::{LocalConfig, Store};

/// How long a harness waits for what must happen at once (the HBONE server closing after
/// its client has, a ZDS request whose enrolment has answered): generous, so that a busy
/// machine is never mistaken for a finding; libFuzzer's own `-timeout` is longer still.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A runtime for one input: single-threaded, dropped with every task left on it.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime builds")
}

/// A fuzz target: the name of its `fuzz/` binary, its harness and its seeds.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<(&'static str, Vec<u8>)>,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "connect_request",
        run: connect_request::run,
        seeds: connect_request::seeds,
    },
    Target {
        name: "hbone_server",
        run: hbone_server::run,
        seeds: hbone_server::seeds,
    },
    Target {
        name: "workload_file",
        run: workload_file::run,
        seeds: workload_file::seeds,
    },
    Target {
        name: "zds",
        run: zds::run,
        seeds: zds::seeds,
    },
    Target {
        name: "xds",
        run: xds::run,
        seeds: xds::seeds,
    },
    Target {
        name: "ca_answer",
        run: ca_answer::run,
        seeds: ca_answer::seeds,
    },
];

/// Names the directory a fuzz binary writes its target's seeds to before libFuzzer reads
/// its corpus (`cargo xtask fuzz` points it at the corpus directory).
pub const SEEDS_DIR_ENV: &str = "ZTUNNEL_FUZZ_SEEDS";

/// The target called `name`.
pub fn target(name: &str) -> &'static Target {
    TARGETS
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}

/// Run once by each fuzz binary before fuzzing: writes the target's seeds into
/// `$ZTUNNEL_FUZZ_SEEDS`, when set.
pub fn init(name: &str) {
    if let Some(dir) = std::env::var_os(SEEDS_DIR_ENV) {
        write_seeds(name, Path::new(&dir));
    }
}

/// Writes target `name`'s seeds into `dir` as `seed-<seed name>`.
pub fn write_seeds(name: &str, dir: &Path) {
    let seeds = (target(name).seeds)();
    let written = std::fs::create_dir_all(dir).and_then(|()| {
        seeds
            .iter()
            .try_for_each(|(seed, data)| std::fs::write(dir.join(format!("seed-{seed}")), data))
    });
    if let Err(e) = written {
        panic!("failed to write the {name} seeds to {}: {e}", dir.display());
    }
}

/// Length-prefixed records, for targets fed a sequence of messages: each is a tag byte,
/// a little-endian u16 length and that many bytes; a short tail is dropped.
pub fn records(mut data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let [tag, lo, hi, rest @ ..] = data else {
            return None;
        };
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
        let (body, rest) = rest.split_at(len);
        data = rest;
        Some((*tag, body))
    })
}

/// One record of [`records`]' format.
pub fn record(tag: u8, body: &[u8]) -> Vec<u8> {
    let len = u16::try_from(body.len()).expect("a seed record fits a u16 length");
    let mut out = vec![tag];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// One allocation larger than this aborts the fuzz binary (see [`CappedAllocator`]).
pub const MAX_ALLOCATION: usize = 64 << 20;
/// More live heap than this aborts the fuzz binary (see [`CappedAllocator`]).
pub const MAX_LIVE: usize = 512 << 20;

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The fuzz binaries' global allocator: the system's, but one allocation over
/// [`MAX_ALLOCATION`] or live heap over [`MAX_LIVE`] aborts, which libFuzzer reports as a
/// crash and saves the input. Inputs are a few KiB (`-max_len`), so either is an input
/// that makes ztunnel allocate without bound. libFuzzer's own `-malloc_limit_mb` needs a
/// sanitizer's allocator hooks, which the fuzz build leaves out, and its RSS limit is only
/// sampled once a second.
pub struct CappedAllocator;

/// Why a block of `block` bytes, making `live` in all, is over a cap.
fn over_cap(block: usize, live: usize) -> Option<&'static str> {
    if block > MAX_ALLOCATION {
        Some("fuzz: one allocation over MAX_ALLOCATION (64 MiB)\n")
    } else if live > MAX_LIVE {
        Some("fuzz: live heap over MAX_LIVE (512 MiB)\n")
    } else {
        None
    }
}

/// Counts a block of `block` bytes that adds `added` live bytes; aborts when over a cap.
fn admit(block: usize, added: usize) {
    let live = LIVE
        .fetch_add(added, Ordering::Relaxed)
        .saturating_add(added);
    if let Some(why) = over_cap(block, live) {
        // Neither call allocates: stderr is unbuffered and the message is static.
        let _ = std::io::stderr().write_all(why.as_bytes());
        std::process::abort();
    }
}

fn release(size: usize) {
    LIVE.fetch_sub(size, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the contract; the
// counting around it never touches the memory.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        admit(layout.size(), layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract for `layout`.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            release(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        admit(layout.size(), layout.size());
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            release(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a block this allocator (so `System`) gave out.
        unsafe { System.dealloc(ptr, layout) };
        release(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old {
            admit(new_size, new_size - old);
        }
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        match (p.is_null(), new_size > old) {
            // Failed: the old block stays, so does its count.
            (true, true) => release(new_size - old),
            (true, false) => {}
            (false, true) => {}
            (false, false) => release(old - new_size),
        }
        p
    }
}

/// Uses a config the way the proxy does: indexes it, routes to every address it names
/// (and a few ports of each), authorizes plaintext and mTLS peers into every workload,
/// and renders it for `/config_dump`.
pub fn exercise_store(cfg: &LocalConfig, node: &str) {
    let store = Store::new(cfg.clone());
    let _ = cfg.local_enrolled(node);
    let addrs: Vec<IpAddr> = cfg
        .workloads
        .iter()
        .flat_map(|w| &w.addresses)
        .chain(cfg.services.iter().flat_map(|s| &s.addresses))
        .copied()
        .collect();
    let ports: Vec<u16> = cfg
        .services
        .iter()
        .flat_map(|s| s.ports.iter().map(|p| p.port))
        .chain([80, 15008])
        .collect();
    for ip in &addrs {
        for port in &ports {
            let _ = store.route(None, SocketAddr::new(*ip, *port));
        }
    }
    for w in &cfg.workloads {
        let dst = SocketAddr::new(
            w.addresses
                .first()
                .copied()
                .unwrap_or(IpAddr::from([0, 0, 0, 0])),
            ports[0],
        );
        for src_identity in [None, Some(store.identity(w))] {
            let conn = policy::Connection {
                src_ip: addrs.first().copied().unwrap_or(dst.ip()),
                src_identity,
                dst,
            };
            let _ = store.authorize(&w.key(), &conn);
        }
    }
    serde_json::to_string(cfg).expect("a config always renders as json");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_short_tails_are_cut() {
        let mut data = record(1, b"abc");
        data.extend(record(7, b""));
        data.extend([9, 10, 0, b'x']);
        let got: Vec<(u8, &[u8])> = records(&data).collect();
        assert_eq!(got, [(1, &b"abc"[..]), (7, &b""[..]), (9, &b"x"[..])]);
        assert_eq!(records(&[1, 2]).count(), 0);
    }

    #[test]
    fn caps_catch_one_huge_allocation_or_too_much_live_heap() {
        assert_eq!(over_cap(1024, 1 << 20), None);
        assert_eq!(over_cap(MAX_ALLOCATION, MAX_LIVE), None);
        assert!(
            over_cap(MAX_ALLOCATION + 1, MAX_ALLOCATION + 1)
                .is_some_and(|why| why.contains("one allocation"))
        );
        assert!(over_cap(1, MAX_LIVE + 1).is_some_and(|why| why.contains("live heap")));
    }

    #[test]
    fn every_target_has_seeds_and_they_are_written_by_name() {
        for t in TARGETS {
            assert!(!(t.seeds)().is_empty(), "{} has no seeds", t.name);
            assert_eq!(target(t.name).name, t.name);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        write_seeds("connect_request", dir.path());
        let mut written: Vec<String> = std::fs::read_dir(dir.path())
            .expect("seeds dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        written.sort();
        let mut want: Vec<String> = connect_request::seeds()
            .into_iter()
            .map(|(name, _)| format!("seed-{name}"))
            .collect();
        want.sort();
        assert_eq!(written, want);
    }
}
