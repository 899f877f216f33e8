//! Letting go of start-up's code once ztunnel is up.
//!
//! An idle ztunnel's resident memory is mostly its own executable's pages, and most of
//! those are code that only start-up ran (argument and config parsing, eBPF loading, the
//! first reconcile) or code that merely sits next to it: a fault on an executable's page
//! maps the 64 KiB around it (fault-around), and read-ahead brings the file into the page
//! cache in large pieces, from which later faults map. Once the first reconcile is done,
//! [`release_startup_code`] unmaps the executable's read-only segments (code and read-only
//! data), drops the file's pages no other process maps from the page cache, and asks for
//! no read-ahead on those segments (`MADV_RANDOM`). From then on a page comes back only
//! when something runs or reads it: the periodic work of an idle node and, with the first
//! connections, the data path. Read-only data comes back a page at a time; code 64 KiB
//! around each fault, as Linux (6.18) reads around a fault in an executable mapping
//! whatever the advice, and maps the cached pages around it (fault-around).
//!
//! Writable segments (data, the relocated read-only-after-relocation part) are never
//! touched: their pages may differ from the file's. Nor is a page of code that differs
//! from the file's (a debugger's breakpoint, a uprobe: written into a private copy of
//! the page): `/proc/self/pagemap` tells which, and unmapping it would undo the patch.

use std::io;
use std::ops::Range;

/// What a release did, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Bytes of the executable's read-only segments (what was unmapped).
    pub segment_bytes: usize,
    /// Pages of them kept because they are no longer the file's (a debugger's
    /// breakpoint, a uprobe): unmapping them would undo the patch.
    pub kept_pages: usize,
    /// The process's resident memory before and after, in KiB (`VmRSS`).
    pub rss_kib_before: u64,
    pub rss_kib_after: u64,
}

/// The executable's loaded segments without write permission, as the pages they are
/// mapped on: code and read-only data. A page any writable segment shares is left out,
/// and with it the part made read-only after relocation (it lies inside a writable load
/// segment). Every page of a read-only segment is covered, its first and last too.
pub fn readonly_segments() -> Vec<Range<usize>> {
    struct Found {
        readonly: Vec<Range<usize>>,
        writable: Vec<Range<usize>>,
    }
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        out: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: glibc passes a valid `dl_phdr_info` whose `dlpi_phdr` points at
        // `dlpi_phnum` program headers for the duration of the call; `out` is the
        // `Found` handed to `dl_iterate_phdr` below, alive and not otherwise borrowed.
        let (info, out) = unsafe { (&*info, &mut *(out as *mut Found)) };
        let headers =
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
        let page = page_size();
        for h in headers {
            if h.p_type != libc::PT_LOAD || h.p_memsz == 0 {
                continue;
            }
            let start = info.dlpi_addr as usize + h.p_vaddr as usize;
            let end = start + h.p_memsz as usize;
            let pages = start / page * page..end.next_multiple_of(page);
            if h.p_flags & libc::PF_W != 0 {
                out.writable.push(pages);
            } else {
                out.readonly.push(pages);
            }
        }
        // The first object glibc reports is the executable itself: stop there.
        1
    }
    let mut found = Found {
        readonly: Vec::new(),
        writable: Vec::new(),
    };
    // SAFETY: `each` only reads what glibc passes and writes to `found`.
    unsafe {
        libc::dl_iterate_phdr(Some(each), &mut found as *mut Found as *mut _);
    }
    let page = page_size();
    let shared = |p: usize| found.writable.iter().any(|w| w.contains(&p));
    let mut out = Vec::new();
    for mut r in found.readonly {
        while r.start < r.end && shared(r.start) {
            r.start += page;
        }
        while r.start < r.end && shared(r.end - page) {
            r.end -= page;
        }
        if r.start < r.end {
            out.push(r);
        }
    }
    out
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// # Safety
///
/// `r` is whole pages of mappings this process does not rely on the contents of beyond
/// what the advice keeps: for `MADV_DONTNEED` on a private file mapping, pages that are
/// the file's unmodified (the next access maps the file's page again).
unsafe fn madvise(r: &Range<usize>, advice: libc::c_int, name: &str) -> io::Result<()> {
    let len = r.end - r.start;
    // SAFETY: the caller's contract above.
    if unsafe { libc::madvise(r.start as *mut libc::c_void, len, advice) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("madvise {name} on {:#x}+{len:#x}: {e}", r.start),
        ));
    }
    Ok(())
}

/// The runs of `range`'s pages that are the file's as mapped (or not mapped at all), and
/// how many pages are not: present but anonymous, or swapped out, means written since
/// the mapping was made, as a debugger's breakpoint or a uprobe does to code
/// (`/proc/self/pagemap`: bit 63 present, 62 swapped, 61 file page).
fn file_page_runs(
    pagemap: &std::fs::File,
    range: &Range<usize>,
) -> io::Result<(Vec<Range<usize>>, usize)> {
    use std::os::unix::fs::FileExt as _;
    let page = page_size();
    let pages = (range.end - range.start) / page;
    let mut entries = vec![0u8; pages * 8];
    pagemap
        .read_exact_at(&mut entries, (range.start / page * 8) as u64)
        .map_err(|e| io::Error::new(e.kind(), format!("reading /proc/self/pagemap: {e}")))?;
    let mut runs: Vec<Range<usize>> = Vec::new();
    let mut kept = 0;
    for (i, e) in entries.chunks_exact(8).enumerate() {
        let e = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
        let (present, swapped, file) = (e >> 63 & 1 == 1, e >> 62 & 1 == 1, e >> 61 & 1 == 1);
        if swapped || (present && !file) {
            kept += 1;
            continue;
        }
        let at = range.start + i * page;
        match runs.last_mut() {
            Some(r) if r.end == at => r.end += page,
            _ => runs.push(at..at + page),
        }
    }
    Ok((runs, kept))
}

/// Unmaps the executable's read-only segments, asks for no read-ahead on them and drops
/// the executable's unmapped pages from the page cache (see the module's comment).
/// Nothing breaks if it fails half-way: every page is still in the file and comes back
/// on its next use.
pub fn release_startup_code() -> io::Result<Released> {
    let segments = readonly_segments();
    if segments.is_empty() {
        return Err(io::Error::other(
            "no read-only segment of the executable found",
        ));
    }
    let rss_kib_before = rss_kib();
    let pagemap = std::fs::File::open("/proc/self/pagemap")
        .map_err(|e| io::Error::new(e.kind(), format!("opening /proc/self/pagemap: {e}")))?;
    let mut segment_bytes = 0;
    let mut kept_pages = 0;
    for s in &segments {
        let len = s.end - s.start;
        segment_bytes += len;
        // SAFETY: MADV_RANDOM only changes read-ahead.
        unsafe { madvise(s, libc::MADV_RANDOM, "MADV_RANDOM")? };
        let (runs, kept) = file_page_runs(&pagemap, s)?;
        kept_pages += kept;
        for r in runs {
            // SAFETY: `r` holds only pages of a read-only segment that are the file's,
            // unmodified, or not mapped (`file_page_runs`); a page written since
            // (a breakpoint) is left out.
            unsafe { madvise(&r, libc::MADV_DONTNEED, "MADV_DONTNEED")? };
        }
    }
    // Pages still mapped (by this process's threads since, or by other processes) stay.
    let dropped = |e: &dyn std::fmt::Display| {
        io::Error::other(format!(
            "unmapped, but the executable's pages stay in the page cache: {e}"
        ))
    };
    let exe = std::fs::File::open("/proc/self/exe").map_err(|e| dropped(&e))?;
    nix::fcntl::posix_fadvise(
        &exe,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .map_err(|e| dropped(&format!("posix_fadvise DONTNEED: {e}")))?;
    Ok(Released {
        segment_bytes,
        kept_pages,
        rss_kib_before,
        rss_kib_after: rss_kib(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    static WRITABLE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(7);
    static TEXT: &str = "a read-only string of the test binary";

    fn within(segments: &[Range<usize>], addr: usize) -> bool {
        segments.iter().any(|s| s.contains(&addr))
    }

    /// A private mapping of a three-page file: page 0 read (the file's), page 1
    /// written (a private copy, as a breakpoint makes), page 2 never touched.
    #[test]
    fn pages_written_since_mapping_are_kept() -> io::Result<()> {
        let page = page_size();
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 * page])?;
        let f = std::fs::File::open(&path)?;
        // SAFETY: a fresh private mapping of a file held open, unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                3 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let at = base as usize;
        // SAFETY: all three pages are mapped readable and writable.
        unsafe {
            assert_eq!(std::ptr::read_volatile(at as *const u8), 7);
            std::ptr::write_volatile((at + page) as *mut u8, 9);
        }
        let pagemap = std::fs::File::open("/proc/self/pagemap")?;
        let (runs, kept) = file_page_runs(&pagemap, &(at..at + 3 * page))?;
        assert_eq!(kept, 1);
        assert_eq!(runs, vec![at..at + page, at + 2 * page..at + 3 * page]);
        // SAFETY: the mapping made above, no longer used.
        assert_eq!(unsafe { libc::munmap(base, 3 * page) }, 0);
        Ok(())
    }

    #[test]
    fn segments_hold_code_and_read_only_data_but_nothing_writable() {
        let segments = readonly_segments();
        assert!(!segments.is_empty());
        let page = page_size();
        for s in &segments {
            assert_eq!(s.start % page, 0, "{s:x?}");
            assert_eq!(s.end % page, 0, "{s:x?}");
        }
        let code = segments_hold_code_and_read_only_data_but_nothing_writable as fn() as usize;
        assert!(within(&segments, code), "code at {code:#x}: {segments:x?}");
        let text = TEXT.as_ptr() as usize;
        assert!(
            within(&segments, text),
            "rodata at {text:#x}: {segments:x?}"
        );
        let data = &WRITABLE as *const _ as usize;
        assert!(!within(&segments, data), "data at {data:#x}: {segments:x?}");
        // A heap address is in no segment at all.
        let heap = Box::new(1u64);
        assert!(!within(&segments, &*heap as *const u64 as usize));
    }
}
