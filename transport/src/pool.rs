//! A bounded pool of fixed-size buffers in one anonymous mapping, so that the whole pool can be
//! registered with io_uring (`register_buffers`) once and used with the `*Fixed` opcodes.
//!
//! A [`PoolBuf`] owns one slot exclusively until it is dropped, which returns the slot. Acquiring
//! blocks (bounded by a timeout) when every slot is out: this is the backpressure that keeps memory
//! independent of the device state size.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use memmap2::MmapMut;

/// Pool errors.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The mapping could not be created.
    #[error("mapping a buffer pool of {slots} x {slot_size} bytes failed: {source}")]
    Map {
        /// Slots asked for.
        slots: usize,
        /// Slot size asked for.
        slot_size: usize,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Bad geometry (zero, too many slots for a u16 buffer index, or not page-aligned).
    #[error("bad buffer pool geometry: {slots} slots of {slot_size} bytes")]
    Geometry {
        /// Slots asked for.
        slots: usize,
        /// Slot size asked for.
        slot_size: usize,
    },
    /// No slot came free within the timeout.
    #[error("no buffer came free within {waited:?} (all {slots} in use)")]
    Exhausted {
        /// How long we waited.
        waited: Duration,
        /// Pool size.
        slots: usize,
    },
}

struct PoolInner {
    // Keeps the mapping alive; every access goes through `base`.
    _map: MmapMut,
    base: *mut u8,
    slot_size: usize,
    slots: usize,
    /// Free slot indexes, used as a stack: the slot returned last is handed out first, so a
    /// steady stream cycles through as few slots as it keeps in flight. Those stay warm in the
    /// CPU caches, and slots never needed are never faulted in (resident memory follows the
    /// slots in flight, not the pool size).
    free: Mutex<Vec<u16>>,
    /// Signalled on every return, for [`BufPool::acquire`].
    returned: Condvar,
    /// Called once after a buffer comes back while `release_armed` is set: wakes a ring that
    /// waits for a free buffer (returns happen on consumer threads and wake nobody otherwise).
    on_release: Mutex<Option<ReleaseHook>>,
    release_armed: AtomicBool,
}

impl PoolInner {
    /// The free stack. A panic while it was held cannot leave it inconsistent (every critical
    /// section is one push or pop), so a poisoned lock is used as is.
    fn free_stack(&self) -> MutexGuard<'_, Vec<u16>> {
        self.free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What [`BufPool`] calls when an armed release happens.
pub(crate) type ReleaseHook = Arc<dyn Fn() + Send + Sync>;

// SAFETY: `base` points into `_map`, which lives as long as `PoolInner`. Slots are handed out
// exclusively (an index is on the free stack or owned by exactly one `PoolBuf`), so no two threads
// ever access the same bytes through the pool.
unsafe impl Send for PoolInner {}
// SAFETY: as above; shared access to `PoolInner` only reads immutable geometry and uses the
// mutex-protected free stack.
unsafe impl Sync for PoolInner {}

/// A bounded pool of equally sized, page-aligned buffers in one mapping.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<PoolInner>,
}

impl fmt::Debug for BufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufPool")
            .field("slots", &self.inner.slots)
            .field("slot_size", &self.inner.slot_size)
            .field("free", &self.free())
            .finish()
    }
}

impl BufPool {
    /// Most slots a pool may have: io_uring buffer indexes are u16.
    pub const MAX_SLOTS: usize = 1 << 15;

    /// Maps `slots` buffers of `slot_size` bytes (a multiple of 4096). Pages are faulted in on
    /// first use, so an idle pool costs address space, not memory.
    pub fn new(slots: usize, slot_size: usize) -> Result<BufPool, PoolError> {
        if slots == 0 || slots > Self::MAX_SLOTS || slot_size == 0 || slot_size % 4096 != 0 {
            return Err(PoolError::Geometry { slots, slot_size });
        }
        let len = slots
            .checked_mul(slot_size)
            .ok_or(PoolError::Geometry { slots, slot_size })?;
        let mut map = MmapMut::map_anon(len).map_err(|source| PoolError::Map {
            slots,
            slot_size,
            source,
        })?;
        let base = map.as_mut_ptr();
        // `slots <= MAX_SLOTS`, so every index fits in u16. Reversed, so slot 0 is handed out
        // first.
        let free = (0..slots)
            .rev()
            .map(|i| u16::try_from(i).map_err(|_| PoolError::Geometry { slots, slot_size }))
            .collect::<Result<Vec<u16>, PoolError>>()?;
        Ok(BufPool {
            inner: Arc::new(PoolInner {
                _map: map,
                base,
                slot_size,
                slots,
                free: Mutex::new(free),
                returned: Condvar::new(),
                on_release: Mutex::new(None),
                release_armed: AtomicBool::new(false),
            }),
        })
    }

    /// Bytes per buffer.
    pub fn slot_size(&self) -> usize {
        self.inner.slot_size
    }

    /// Number of buffers.
    pub fn slots(&self) -> usize {
        self.inner.slots
    }

    /// Buffers free right now.
    pub fn free(&self) -> usize {
        self.inner.free_stack().len()
    }

    /// Takes a buffer, waiting up to `timeout` for one to come free.
    pub fn acquire(&self, timeout: Duration) -> Result<PoolBuf, PoolError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut free = self.inner.free_stack();
        loop {
            if let Some(index) = free.pop() {
                return Ok(self.wrap(index));
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => timeout,
            };
            if left.is_zero() {
                return Err(PoolError::Exhausted {
                    waited: timeout,
                    slots: self.inner.slots,
                });
            }
            free = match self.inner.returned.wait_timeout(free, left) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Takes a buffer if one is free now.
    pub fn try_acquire(&self) -> Option<PoolBuf> {
        let index = self.inner.free_stack().pop();
        index.map(|i| self.wrap(i))
    }

    fn wrap(&self, index: u16) -> PoolBuf {
        PoolBuf {
            pool: Arc::clone(&self.inner),
            index,
            len: 0,
        }
    }

    /// Sets (or clears) what the next armed buffer return calls.
    pub(crate) fn set_release_hook(&self, hook: Option<ReleaseHook>) {
        if let Ok(mut g) = self.inner.on_release.lock() {
            *g = hook;
        }
    }

    /// Arms the release hook: the next buffer that comes back calls it (once). Check
    /// [`BufPool::free`] after arming: a buffer that came back before it called nothing.
    pub(crate) fn arm_release_hook(&self) {
        self.inner.release_armed.store(true, Ordering::SeqCst);
    }

    /// Whether `buf` is a slot of this pool (and not of another pool with the same geometry).
    pub fn owns(&self, buf: &PoolBuf) -> bool {
        Arc::ptr_eq(&self.inner, &buf.pool)
    }

    /// One iovec per slot, in index order, for `Submitter::register_buffers`. The memory stays
    /// mapped as long as any clone of this pool or any of its buffers lives; a ring that
    /// registered these must not outlive the pool (hold a clone next to the ring).
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        self.iovecs_of(0, self.inner.slots)
    }

    /// The iovecs of slots `first..first + n` (clamped to the pool), for registering slots one
    /// range at a time (`register_buffers_update`); the same lifetime rule as
    /// [`BufPool::iovecs`] applies.
    pub fn iovecs_of(&self, first: usize, n: usize) -> Vec<libc::iovec> {
        let end = first.saturating_add(n).min(self.inner.slots);
        (first.min(end)..end)
            .map(|i| libc::iovec {
                // SAFETY: `i < slots`, so the offset stays inside the mapping of
                // `slots * slot_size` bytes.
                iov_base: unsafe { self.inner.base.add(i * self.inner.slot_size) }.cast(),
                iov_len: self.inner.slot_size,
            })
            .collect()
    }
}

/// Exclusive ownership of one pool slot; returns it to the pool on drop.
pub struct PoolBuf {
    pool: Arc<PoolInner>,
    index: u16,
    len: usize,
}

impl fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuf")
            .field("index", &self.index)
            .field("len", &self.len)
            .finish()
    }
}

impl PoolBuf {
    /// The registered-buffer index (for `ReadFixed` / `WriteFixed` / `SendZc` with fixed buffers).
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Capacity (the pool's slot size).
    pub fn capacity(&self) -> usize {
        self.pool.slot_size
    }

    /// Bytes of valid data.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no byte is valid.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the valid length (e.g. after a read completed into the buffer).
    ///
    /// # Panics
    /// If `len` exceeds the capacity: that is a caller bug, never input-dependent.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "PoolBuf::set_len beyond capacity");
        self.len = len;
    }

    /// Start of the slot, for io_uring submissions. Valid while `self` lives.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: `index < slots` (established in `BufPool::new`), so the slot lies inside the
        // mapping, which `self.pool` keeps alive.
        unsafe {
            self.pool
                .base
                .add(usize::from(self.index) * self.pool.slot_size)
        }
    }

    /// Start of the slot (read-only), for send submissions.
    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: as in `as_mut_ptr`.
        unsafe {
            self.pool
                .base
                .add(usize::from(self.index) * self.pool.slot_size)
        }
    }

    /// The valid bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the slot is owned exclusively by `self` and lies inside the live mapping;
        // `len <= slot_size` is kept by `set_len`.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The whole slot, for filling. Call [`PoolBuf::set_len`] afterwards.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        let cap = self.capacity();
        let ptr = self.as_mut_ptr();
        // SAFETY: exclusive ownership of the slot (see `as_slice`); anonymous mappings are
        // zero-initialised, so every byte is initialised.
        unsafe { std::slice::from_raw_parts_mut(ptr, cap) }
    }

    /// The valid bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.spare_mut()[..len]
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        // The stack has room for every slot (it was built holding all of them).
        self.pool.free_stack().push(self.index);
        self.pool.returned.notify_one();
        if self.pool.release_armed.load(Ordering::SeqCst)
            && self.pool.release_armed.swap(false, Ordering::SeqCst)
        {
            let hook = self.pool.on_release.lock().ok().and_then(|g| g.clone());
            if let Some(f) = hook {
                f();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_returned_last_is_handed_out_first() {
        let pool = BufPool::new(8, 4096).unwrap();
        let a = pool.try_acquire().unwrap();
        let b = pool.try_acquire().unwrap();
        assert_eq!((a.index(), b.index()), (0, 1));
        drop(a);
        drop(b);
        // A steady stream keeps cycling through the two warm slots; slots 2..8 stay untouched.
        for _ in 0..4 {
            let x = pool.try_acquire().unwrap();
            let y = pool.try_acquire().unwrap();
            assert_eq!((x.index(), y.index()), (1, 0));
            drop(y);
            drop(x);
        }
        assert_eq!(pool.free(), 8);
    }

    #[test]
    fn acquire_waits_for_a_return_from_another_thread() {
        let pool = BufPool::new(1, 4096).unwrap();
        let held = pool.try_acquire().unwrap();
        let p2 = pool.clone();
        let t = std::thread::spawn(move || p2.acquire(Duration::from_secs(60)).map(|b| b.index()));
        std::thread::sleep(Duration::from_millis(20));
        drop(held);
        assert_eq!(t.join().unwrap().unwrap(), 0);
    }

    #[test]
    fn buffers_are_exclusive_and_return_on_drop() {
        let pool = BufPool::new(2, 4096).unwrap();
        let mut a = pool.try_acquire().unwrap();
        let b = pool.try_acquire().unwrap();
        assert_ne!(a.index(), b.index());
        assert!(pool.try_acquire().is_none());
        a.spare_mut()[..3].copy_from_slice(b"abc");
        a.set_len(3);
        assert_eq!(a.as_slice(), b"abc");
        drop(a);
        assert_eq!(pool.free(), 1);
        assert!(pool.acquire(Duration::from_millis(1)).is_ok());
    }

    #[test]
    fn exhausted_pool_times_out_with_typed_error() {
        let pool = BufPool::new(1, 4096).unwrap();
        let _held = pool.try_acquire().unwrap();
        assert!(matches!(
            pool.acquire(Duration::from_millis(5)),
            Err(PoolError::Exhausted { slots: 1, .. })
        ));
    }

    #[test]
    fn a_pool_owns_only_its_own_buffers() {
        let (a, b) = (
            BufPool::new(1, 4096).unwrap(),
            BufPool::new(1, 4096).unwrap(),
        );
        let x = a.try_acquire().unwrap();
        assert!(a.owns(&x));
        assert!(!b.owns(&x));
        assert!(a.clone().owns(&x));
    }

    #[test]
    fn an_armed_release_calls_the_hook_once() {
        let pool = BufPool::new(2, 4096).unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        pool.set_release_hook(Some(Arc::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        })));
        let (a, b) = (pool.try_acquire().unwrap(), pool.try_acquire().unwrap());
        drop(a);
        assert_eq!(calls.load(Ordering::SeqCst), 0, "not armed: no call");
        pool.arm_release_hook();
        drop(b);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        drop(pool.try_acquire().unwrap());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one call per arming");
    }

    #[test]
    fn bad_geometry_is_refused() {
        assert!(BufPool::new(0, 4096).is_err());
        assert!(BufPool::new(4, 1000).is_err());
        assert!(BufPool::new(BufPool::MAX_SLOTS + 1, 4096).is_err());
    }
}
