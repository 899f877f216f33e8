//! Memory for connection openings, kept apart from the heap's long-lived objects.
//!
//! A connection's opening (routing, the CONNECT and its answer on the client side; the
//! request, policy and upstream dial on the server side) is a future of 2–3 KB, boxed
//! and freed once the connection is open (`proxy/outbound.rs` `accept`,
//! `hbone/server.rs` `handle_stream`). When many connections open at once, glibc placed
//! those boxes among the long-lived objects allocated meanwhile (connection records,
//! stream guards, h2 state), so once freed they left holes that kept their pages
//! resident: with 1,000 idle tunnels, the client node's worker arenas held 2.7 MB free
//! out of 7.1 MB (`malloc_stats`), about as much as 1,000 openings take.
//!
//! A [`Pool`] places each opening in a 4 KiB block of a 64 KiB region that holds nothing
//! else. A region whose blocks are all free goes back to the allocator whole (one spare
//! is kept, so that one connection at a time does not allocate and free a region each
//! time), where ztunnel's periodic `malloc_trim` returns its pages to the kernel.
//! Checked first, none of which frees a chunk once all its slots are free: `slab` (a
//! `Vec` that moves what it holds as it grows), `sharded-slab` (keeps its pages),
//! `bumpalo` (frees nothing one by one).
use std::{
    alloc::{Layout, alloc, dealloc, handle_alloc_error},
    collections::BTreeMap,
    mem::{align_of, size_of},
    pin::Pin,
    ptr::NonNull,
    sync::Mutex,
    task::{Context, Poll},
};

/// The size (and alignment) of one opening's block.
const BLOCK: usize = 4096;
/// Blocks per region.
const BLOCKS: usize = 16;
/// Every block of a region free.
const ALL_FREE: u16 = u16::MAX;
const REGION: Layout = match Layout::from_size_align(BLOCK * BLOCKS, BLOCK) {
    Ok(layout) => layout,
    Err(_) => panic!("a region's layout is valid"),
};

/// Regions of blocks for futures that live for a connection's opening only.
pub struct Pool {
    regions: Mutex<Regions>,
}

/// The pool of ztunnel's connection openings.
pub static OPENINGS: Pool = Pool::new();

struct Regions {
    /// The regions by base address.
    all: BTreeMap<usize, Region>,
    /// Base addresses of the regions with a free block, the one to take from last.
    with_room: Vec<usize>,
    /// How many regions have all their blocks free.
    empty: usize,
}

struct Region {
    base: NonNull<u8>,
    /// Bit `i` set: block `i` is free.
    free: u16,
}

// SAFETY: a region is memory the pool owns; the pointer is only used under its lock.
unsafe impl Send for Region {}

impl Pool {
    pub const fn new() -> Self {
        Pool {
            regions: Mutex::new(Regions {
                all: BTreeMap::new(),
                with_room: Vec::new(),
                empty: 0,
            }),
        }
    }

    /// `future`, in a block of its own if it fits one, else boxed as usual.
    pub fn boxed<F: Future>(&'static self, future: F) -> Opening<F> {
        if size_of::<F>() <= BLOCK && align_of::<F>() <= BLOCK {
            let block = self.take().cast::<F>();
            // SAFETY: the block is BLOCK bytes aligned to BLOCK, which `F` fits, and no
            // one else uses it until `give_back`.
            unsafe { block.as_ptr().write(future) };
            return Opening {
                future: block,
                pool: Some(self),
            };
        }
        Opening {
            future: NonNull::from(Box::leak(Box::new(future))),
            pool: None,
        }
    }

    /// How many regions the pool holds (with the spare).
    #[cfg(test)]
    fn regions(&self) -> usize {
        self.lock().all.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Regions> {
        self.regions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self) -> NonNull<u8> {
        let mut regions = self.lock();
        let key = match regions.with_room.last() {
            Some(&key) => key,
            None => {
                // SAFETY: REGION's size is not zero.
                let Some(base) = NonNull::new(unsafe { alloc(REGION) }) else {
                    handle_alloc_error(REGION)
                };
                let key = base.as_ptr().addr();
                regions.all.insert(
                    key,
                    Region {
                        base,
                        free: ALL_FREE,
                    },
                );
                regions.with_room.push(key);
                regions.empty += 1;
                key
            }
        };
        let regions = &mut *regions;
        let region = regions
            .all
            .get_mut(&key)
            .expect("a region with room is in the map");
        if region.free == ALL_FREE {
            regions.empty -= 1;
        }
        let i = region.free.trailing_zeros() as usize;
        region.free &= !(1 << i);
        // SAFETY: block `i` lies within the region's allocation.
        let block = unsafe { region.base.add(i * BLOCK) };
        if region.free == 0 {
            regions.with_room.pop();
        }
        block
    }

    fn give_back(&self, block: NonNull<u8>) {
        let addr = block.as_ptr().addr();
        let mut regions = self.lock();
        let regions = &mut *regions;
        let (&key, region) = regions
            .all
            .range_mut(..=addr)
            .next_back()
            .expect("a block comes from one of the pool's regions");
        let i = (addr - key) / BLOCK;
        debug_assert!(i < BLOCKS && region.free & (1 << i) == 0);
        if region.free == 0 {
            regions.with_room.push(key);
        }
        region.free |= 1 << i;
        if region.free != ALL_FREE {
            return;
        }
        regions.empty += 1;
        // Keep one empty region; free the others whole.
        if regions.empty > 1
            && let Some(region) = regions.all.remove(&key)
        {
            regions.empty -= 1;
            regions.with_room.retain(|&k| k != key);
            // SAFETY: the region came from `alloc(REGION)` and none of its blocks is in use.
            unsafe { dealloc(region.base.as_ptr(), REGION) };
        }
    }
}

/// A future in a pool's block (or a box of its own): pinned where it is until dropped.
pub struct Opening<F> {
    future: NonNull<F>,
    /// The pool whose block holds it; `None` when boxed.
    pool: Option<&'static Pool>,
}

// SAFETY: an `Opening` owns its future as a `Box` would; the pool is `Sync`.
unsafe impl<F: Send> Send for Opening<F> {}

// The future stays at its address whatever happens to the `Opening`.
impl<F> Unpin for Opening<F> {}

impl<F: Future> Future for Opening<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the future is owned by this `Opening`, valid until its drop, and never
        // moved.
        unsafe { Pin::new_unchecked(&mut *self.future.as_ptr()) }.poll(cx)
    }
}

impl<F> Drop for Opening<F> {
    fn drop(&mut self) {
        match self.pool {
            Some(pool) => {
                // SAFETY: the block holds a valid `F`, dropped once, here.
                unsafe { self.future.as_ptr().drop_in_place() };
                pool.give_back(self.future.cast());
            }
            // SAFETY: it came from `Box::leak` in `Pool::boxed`.
            None => drop(unsafe { Box::from_raw(self.future.as_ptr()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    /// Counts its drops; answers its value.
    struct Probe {
        value: u64,
        drops: Arc<AtomicUsize>,
        _pad: [u8; 2000],
    }

    impl Future for Probe {
        type Output = u64;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<u64> {
            Poll::Ready(self.value)
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.drops.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn probe(value: u64, drops: &Arc<AtomicUsize>) -> Probe {
        Probe {
            value,
            drops: drops.clone(),
            _pad: [0; 2000],
        }
    }

    #[tokio::test]
    async fn openings_run_and_drop_once_and_empty_regions_go_back_but_one() {
        static POOL: Pool = Pool::new();
        let drops = Arc::new(AtomicUsize::new(0));
        // 100 at once: seven regions of 16 blocks.
        let mut open: Vec<_> = (0..100).map(|i| POOL.boxed(probe(i, &drops))).collect();
        assert_eq!(POOL.regions(), 7);
        let mut addrs: Vec<usize> = open.iter().map(|o| o.future.as_ptr() as usize).collect();
        addrs.sort_unstable();
        addrs.dedup();
        assert_eq!(addrs.len(), 100, "every opening has a block of its own");
        // Every other one finishes first: no region empties.
        let mut i = 0;
        open.retain(|_| {
            i += 1;
            i % 2 == 0
        });
        assert_eq!(drops.load(Ordering::SeqCst), 50);
        assert_eq!(POOL.regions(), 7);
        assert_eq!(POOL.lock().empty, 0);
        // Freed blocks are taken again before a new region.
        let again: Vec<_> = (0..50).map(|i| POOL.boxed(probe(i, &drops))).collect();
        assert_eq!(POOL.regions(), 7);
        let mut sum = 0;
        for o in open.into_iter().chain(again) {
            sum += o.await;
        }
        assert_eq!(sum, (1..100).step_by(2).sum::<u64>() + (0..50).sum::<u64>());
        assert_eq!(drops.load(Ordering::SeqCst), 150);
        assert_eq!(POOL.regions(), 1, "all but one empty region went back");
        assert_eq!(POOL.lock().empty, 1);
        // One at a time uses the spare.
        for i in 0..20 {
            let o = POOL.boxed(probe(i, &drops));
            assert_eq!(POOL.lock().empty, 0);
            assert_eq!(o.await, i);
            assert_eq!((POOL.regions(), POOL.lock().empty), (1, 1));
        }
    }

    #[tokio::test]
    async fn a_future_larger_than_a_block_is_boxed() {
        static POOL: Pool = Pool::new();
        let big = [7u8; BLOCK + 1];
        let o = POOL.boxed(async move { big.iter().map(|&b| u64::from(b)).sum::<u64>() });
        assert!(o.pool.is_none());
        assert_eq!(POOL.regions(), 0);
        assert_eq!(o.await, 7 * (BLOCK as u64 + 1));
    }

    #[test]
    fn an_opening_dropped_unpolled_drops_its_future_on_another_thread() {
        static POOL: Pool = Pool::new();
        let drops = Arc::new(AtomicUsize::new(0));
        let o = POOL.boxed(probe(1, &drops));
        std::thread::spawn(move || drop(o))
            .join()
            .expect("the thread ends");
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        assert_eq!(POOL.regions(), 1);
    }
}
