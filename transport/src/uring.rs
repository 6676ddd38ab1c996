//! The one io_uring ownership type of the project: [`Uring`], a ring whose every submission owns
//! the memory it references. The transport's engine (`ring.rs`) and the pipeline's data-fd reader
//! and writer both run on it; this module is the only place that pushes submission entries, so
//! the `unsafe` of io_uring is audited here and nowhere else.
//!
//! # Ownership invariant
//! A submission is pushed together with its owner: an [`IoBuf`] (the memory the kernel reads or
//! writes: a pool slot, a boxed heap buffer) and the caller's own bookkeeping `T`. Both move into
//! the in-flight table, keyed by the entry's `user_data`, before the kernel can see the entry,
//! and come back from [`Uring::pop`] only with that entry's completion, when the kernel is done
//! with the memory. A zero-copy send is the one exception to "one completion": its buffer stays in
//! the table until the kernel's notification (`IORING_CQE_F_NOTIF`), and only `T` and the result
//! come back with the first completion. Memory never moves while the kernel holds it: heap
//! buffers are boxed slices (the box moves, the bytes do not), pool slots live in the pool's
//! mapping, which the [`BufPool`] clones in the table and in `fixed` keep mapped. Spans are
//! checked against the buffer before an entry is built, so no caller can point the kernel outside
//! memory the table owns.
//!
//! # Dropping
//! Dropping a ring with submissions in flight cancels each by its `user_data`, reaps completions
//! until the table is empty or the drain deadline passes ([`Uring::set_drain_limit`]), and then
//! leaks (never frees, never returns to the pool) exactly the owners still in the table, with the
//! ring itself: only that memory may still be touched by the kernel.
//!
//! # Registered buffers
//! A ring built with a pool starts with a sparse fixed-buffer table (nothing pinned) and registers
//! a slot the first time an operation on that slot can use it ([`Uring::fix`]): `ReadFixed` /
//! `WriteFixed` for data fds, `SendZc` from a fixed buffer. A session therefore pins only the
//! slots it touches: registering a whole 64 MiB pool up front faulted in and pinned all of it
//! before the first byte moved (20 to 250 ms on the 2-core 6.18 test VM, where the first touch of
//! a page is slow), even for a 4 MiB state. The transport's send and receive path uses plain
//! `Send` / `Recv`, which need no registration, so by default only the data ring of each side
//! registers, each slot once. Where the kernel refuses to pin a slot (`RLIMIT_MEMLOCK` without
//! `CAP_IPC_LOCK`: `ENOMEM`, `EPERM`), that slot runs unregistered (plain `Read` / `Write` /
//! `SendZc` without a fixed index); [`Uring::unpinned_errno`] says so. Kernels without sparse
//! tables (before 5.19) get the whole pool registered at once, as before.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::pool::{BufPool, PoolBuf};

/// `user_data` of cancel requests (their completions carry no owner).
const CANCEL_UD: u64 = u64::MAX;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: set in a zero-copy notification's result when the kernel
/// copied the data after all.
const ZC_COPIED: u32 = 1 << 31;
/// `IORING_SEND_ZC_REPORT_USAGE`: ask the kernel to say in the notification whether it copied.
const ZC_REPORT_USAGE: u16 = 1 << 3;
/// Default bound on waiting for cancelled submissions when a ring is dropped.
const DRAIN_DEFAULT: Duration = Duration::from_secs(2);

/// Memory a submission reads or writes, owned by the ring while the kernel may touch it.
#[derive(Debug)]
pub enum IoBuf {
    /// No memory (a zero-length operation).
    Empty,
    /// A slot of a [`BufPool`] (may be used as a registered buffer).
    Pool(PoolBuf),
    /// Heap bytes; a boxed slice never moves while the box lives.
    Heap(Box<[u8]>),
}

impl IoBuf {
    /// Bytes the kernel may be given (a pool slot's whole capacity).
    pub fn capacity(&self) -> usize {
        match self {
            IoBuf::Empty => 0,
            IoBuf::Pool(b) => b.capacity(),
            IoBuf::Heap(h) => h.len(),
        }
    }

    /// The pool buffer, if this is one.
    pub fn into_pool(self) -> Option<PoolBuf> {
        match self {
            IoBuf::Pool(b) => Some(b),
            _ => None,
        }
    }

    /// The start of `at..at + len`, if that span lies inside the buffer.
    fn span(&mut self, at: usize, len: usize) -> Option<*mut u8> {
        let end = at.checked_add(len)?;
        if end > self.capacity() {
            return None;
        }
        let base = match self {
            IoBuf::Empty => return (len == 0).then(std::ptr::null_mut),
            IoBuf::Pool(b) => b.spare_mut().as_mut_ptr(),
            IoBuf::Heap(h) => h.as_mut_ptr(),
        };
        // `at <= capacity` (checked above), so the offset stays inside (or one past) the buffer.
        Some(base.wrapping_add(at))
    }
}

/// One operation, described by spans of its own [`IoBuf`] (never by raw pointers).
#[derive(Debug, Clone, Copy)]
pub enum Io {
    /// `send(2)` of `buf[at..at + len]` with `flags` (`MSG_*`).
    Send {
        fd: RawFd,
        at: usize,
        len: usize,
        flags: i32,
    },
    /// Zero-copy send of `buf[at..at + len]`, from the registered slot when the buffer is a
    /// registered pool slot ([`Uring::fix`]); the buffer is held until the kernel's notification.
    SendZc {
        fd: RawFd,
        at: usize,
        len: usize,
        flags: i32,
    },
    /// `recv(2)` into `buf[at..at + len]` with `flags`.
    Recv {
        fd: RawFd,
        at: usize,
        len: usize,
        flags: i32,
    },
    /// `read` into `buf[at..at + len]` at `offset` (`u64::MAX`: the current position), as
    /// `ReadFixed` when the slot is registered. `punt` sends it straight to io-wq (`ASYNC`).
    Read {
        fd: RawFd,
        at: usize,
        len: usize,
        offset: u64,
        punt: bool,
    },
    /// `write` of `buf[at..at + len]` at `offset`, as `WriteFixed` when the slot is registered.
    Write {
        fd: RawFd,
        at: usize,
        len: usize,
        offset: u64,
        punt: bool,
    },
    /// One-shot readiness of `fd` for `events` (`POLLIN`, ...); the result is the `revents`
    /// mask. References no memory (push it with [`IoBuf::Empty`]).
    Poll { fd: RawFd, events: u32 },
}

/// A submission: what to do, the memory it works on, and the caller's bookkeeping.
#[derive(Debug)]
pub struct Sub<T> {
    /// The operation.
    pub io: Io,
    /// The memory it references.
    pub buf: IoBuf,
    /// Comes back with the completion.
    pub owner: T,
}

/// A completion: the owner and its buffer back (the kernel is done with the buffer, except for
/// a zero-copy send whose notification is still due: then `buf` is [`IoBuf::Empty`] and the
/// ring keeps the real one until the notification).
#[derive(Debug)]
pub struct Completion<T> {
    /// What the caller pushed with the submission.
    pub owner: T,
    /// The submission's memory.
    pub buf: IoBuf,
    /// Bytes transferred, or a negative errno.
    pub result: i32,
    /// The CQE flags (`IORING_CQE_F_*`).
    pub flags: u32,
}

/// A submission that was not pushed, handed back whole with the reason.
#[derive(Debug)]
pub struct Refused<T> {
    /// Why.
    pub error: io::Error,
    /// The submissions, unchanged (the kernel never saw them).
    pub subs: Vec<Sub<T>>,
}

#[derive(Debug)]
struct Entry<T> {
    /// `None` once handed back while the zero-copy notification is still due.
    owner: Option<T>,
    buf: IoBuf,
    zc: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotReg {
    No,
    Yes,
    Refused,
}

/// Which pool slots this ring has registered (lazily, one slot at a time).
#[derive(Debug)]
struct Fixed {
    pool: BufPool,
    slots: Vec<SlotReg>,
    /// The table is sparse: slots are registered on first use. `false`: either every slot was
    /// registered at creation or none could be.
    lazy: bool,
    /// The errno of the first refusal to pin, if any.
    refused: Option<i32>,
}

/// An io_uring instance that owns the memory of every submission in flight (module docs).
pub struct Uring<T> {
    // Field order: the ring (and with it any registration) goes before the pool clone in
    // `fixed`, and before the table whose buffers it may reference.
    ring: ManuallyDrop<IoUring>,
    table: Vec<Option<Entry<T>>>,
    free: Vec<usize>,
    /// Entries in the table (owners not yet handed back or buffers held for a notification).
    live: usize,
    /// Zero-copy sends whose notification is still due.
    zc_pending: usize,
    /// Zero-copy notifications that reported a copy, not yet taken.
    zc_copied: u64,
    fixed: Option<Fixed>,
    drain: Duration,
}

impl<T> std::fmt::Debug for Uring<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("live", &self.live)
            .field("zc_pending", &self.zc_pending)
            .field("fixed", &self.fixed)
            .finish()
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn refused_pin(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOMEM) | Some(libc::EPERM))
}

/// A length for an SQE (every span was checked against a buffer, and buffers are below 4 GiB
/// where lengths matter; longer spans are refused when pushed).
fn len32(len: usize) -> Option<u32> {
    u32::try_from(len).ok()
}

impl<T> Uring<T> {
    /// A ring with `entries` submission slots. With `pool`, its slots can be used as registered
    /// buffers (registered lazily, module docs).
    pub fn new(entries: u32, pool: Option<&BufPool>) -> io::Result<Uring<T>> {
        let ring = IoUring::new(entries)?;
        let fixed = match pool {
            None => None,
            Some(pool) => Some(Self::table_for(&ring, pool)?),
        };
        Ok(Uring {
            ring: ManuallyDrop::new(ring),
            table: Vec::new(),
            free: Vec::new(),
            live: 0,
            zc_pending: 0,
            zc_copied: 0,
            fixed,
            drain: DRAIN_DEFAULT,
        })
    }

    /// Like [`Uring::new`], but the pool's slots are never registered (as if the kernel had
    /// refused with `ENOMEM`): for tests of the unregistered path.
    pub fn unregistered(entries: u32, pool: &BufPool) -> io::Result<Uring<T>> {
        let mut r = Self::new(entries, None)?;
        r.fixed = Some(Fixed {
            pool: pool.clone(),
            slots: vec![SlotReg::Refused; pool.slots()],
            lazy: false,
            refused: Some(libc::ENOMEM),
        });
        Ok(r)
    }

    fn table_for(ring: &IoUring, pool: &BufPool) -> io::Result<Fixed> {
        let slots = pool.slots();
        let n = u32::try_from(slots).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut fixed = Fixed {
            pool: pool.clone(),
            slots: vec![SlotReg::No; slots],
            lazy: true,
            refused: None,
        };
        if !memlock_allows(slots.saturating_mul(pool.slot_size())) {
            // The whole pool could never be pinned. Pinning slot by slot up to the limit would
            // take the locked-memory budget that this user's other rings need (it is per user,
            // shared by every process of the user): run unregistered, as a whole-pool
            // registration refused with ENOMEM would.
            fixed.lazy = false;
            fixed.slots.fill(SlotReg::Refused);
            fixed.refused = Some(libc::ENOMEM);
            return Ok(fixed);
        }
        match ring.submitter().register_buffers_sparse(n) {
            Ok(()) => return Ok(fixed),
            // Sparse tables need 5.19; fall back to registering everything now.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) if refused_pin(&e) => {
                fixed.lazy = false;
                fixed.slots.fill(SlotReg::Refused);
                fixed.refused = Some(errno(&e));
                return Ok(fixed);
            }
            Err(e) => return Err(e),
        }
        fixed.lazy = false;
        let iovecs = pool.iovecs();
        // SAFETY: the iovecs describe the pool's mapping, which stays mapped while any `BufPool`
        // clone lives; `fixed.pool` is one, and the ring (which holds the registration) is
        // dropped or leaked before it (field order of `Uring`, and `Drop`).
        match unsafe { ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => fixed.slots.fill(SlotReg::Yes),
            Err(e) if refused_pin(&e) => {
                fixed.slots.fill(SlotReg::Refused);
                fixed.refused = Some(errno(&e));
            }
            Err(e) => return Err(e),
        }
        Ok(fixed)
    }

    /// The registered-buffer index of `buf`, registering its slot with this ring on first use;
    /// `None` when it cannot be used as a fixed buffer (not a slot of this ring's pool, or the
    /// kernel refused to pin it).
    pub fn fix(&mut self, buf: &PoolBuf) -> Option<u16> {
        let fixed = self.fixed.as_mut()?;
        if !fixed.pool.owns(buf) {
            return None;
        }
        let i = usize::from(buf.index());
        match fixed.slots.get(i).copied()? {
            SlotReg::Yes => return Some(buf.index()),
            SlotReg::Refused => return None,
            SlotReg::No => {}
        }
        let iov = fixed.pool.iovecs_of(i, 1);
        let at = u32::from(buf.index());
        // SAFETY: as in `table_for`: the iovec is slot `i` of the pool's mapping, kept mapped by
        // `fixed.pool` for as long as the ring (and so the registration) lives.
        let r = unsafe {
            self.ring
                .submitter()
                .register_buffers_update(at, &iov, None)
        };
        match r {
            Ok(()) => {
                fixed.slots[i] = SlotReg::Yes;
                Some(buf.index())
            }
            Err(e) => {
                // ENOMEM / EPERM: over RLIMIT_MEMLOCK. Anything else: this slot simply stays
                // unregistered; the operation works the same without it.
                fixed.slots[i] = SlotReg::Refused;
                fixed.refused.get_or_insert(errno(&e));
                None
            }
        }
    }

    /// `None` while every slot this ring tried to register was pinned; otherwise the errno of
    /// the first refusal (`ENOMEM` or `EPERM`: `RLIMIT_MEMLOCK`).
    pub fn unpinned_errno(&self) -> Option<i32> {
        self.fixed.as_ref().and_then(|f| f.refused)
    }

    /// Slots registered with this ring so far.
    pub fn registered_slots(&self) -> usize {
        self.fixed.as_ref().map_or(0, |f| {
            f.slots.iter().filter(|s| **s == SlotReg::Yes).count()
        })
    }

    /// Whether the pool was registered lazily (a sparse table).
    pub fn lazy_registration(&self) -> bool {
        self.fixed.as_ref().is_some_and(|f| f.lazy)
    }

    /// Bounds how long dropping the ring waits for cancelled submissions (default 2 s).
    pub fn set_drain_limit(&mut self, limit: Duration) {
        self.drain = limit;
    }

    /// Submissions whose owner or buffer the ring still holds.
    pub fn in_flight(&self) -> usize {
        self.live
    }

    /// Zero-copy sends whose notification is still due.
    pub fn zc_pending(&self) -> usize {
        self.zc_pending
    }

    /// Zero-copy notifications that said the kernel copied after all, since the last call.
    pub fn take_zc_copied(&mut self) -> u64 {
        std::mem::take(&mut self.zc_copied)
    }

    /// Pushes one submission. On failure it comes back whole.
    pub fn push(&mut self, sub: Sub<T>) -> Result<(), Refused<T>> {
        self.push_all(vec![sub], false)
    }

    /// Pushes submissions as one contiguous run of entries; with `linked`, each but the last is
    /// linked to the next (`IOSQE_IO_LINK`: the next starts only after it succeeded in full).
    /// Either every submission is pushed or none is (they come back in [`Refused`]).
    pub fn push_all(&mut self, subs: Vec<Sub<T>>, linked: bool) -> Result<(), Refused<T>> {
        let refuse = |error: io::Error, subs: Vec<Sub<T>>| Err(Refused { error, subs });
        if subs.len() > self.ring.params().sq_entries() as usize {
            return refuse(io::Error::from(io::ErrorKind::InvalidInput), subs);
        }
        let room = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if room < subs.len() {
            if let Err(e) = self.ring.submit() {
                return refuse(e, subs);
            }
            let sq = self.ring.submission();
            if sq.capacity() - sq.len() < subs.len() {
                return refuse(io::Error::from_raw_os_error(libc::EBUSY), subs);
            }
        }
        // Decide the registered index of every pool buffer first (this may register a slot).
        let mut fixed_idx = Vec::with_capacity(subs.len());
        for s in &subs {
            let idx = match (&s.io, &s.buf) {
                (Io::Read { .. } | Io::Write { .. } | Io::SendZc { .. }, IoBuf::Pool(b)) => {
                    self.fix(b)
                }
                _ => None,
            };
            fixed_idx.push(idx);
        }
        // Build every entry before anything moves into the table, so that a bad span refuses
        // the whole run untouched. Pointers are taken from buffers whose bytes do not move when
        // the buffers themselves move into the table (module docs).
        let mut subs = subs;
        let mut entries = Vec::with_capacity(subs.len());
        let n = subs.len();
        for (k, s) in subs.iter_mut().enumerate() {
            match build(&s.io, &mut s.buf, fixed_idx[k]) {
                Some(e) => {
                    let e = if linked && k + 1 < n {
                        e.flags(squeue::Flags::IO_LINK)
                    } else {
                        e
                    };
                    entries.push(e);
                }
                None => {
                    return refuse(
                        io::Error::new(io::ErrorKind::InvalidInput, "span outside the buffer"),
                        subs,
                    )
                }
            }
        }
        let mut sq = self.ring.submission();
        for (s, e) in subs.into_iter().zip(entries) {
            let zc = matches!(s.io, Io::SendZc { .. });
            let ud = {
                let entry = Entry {
                    owner: Some(s.owner),
                    buf: s.buf,
                    zc,
                };
                self.live += 1;
                if let Some(i) = self.free.pop() {
                    self.table[i] = Some(entry);
                    i
                } else {
                    self.table.push(Some(entry));
                    self.table.len() - 1
                }
            };
            let e = e.user_data(ud as u64);
            // SAFETY: every address in `e` lies in the buffer of the table entry `ud` just
            // inserted (span checked by `build`), whose bytes stay valid and in place until that
            // entry leaves the table, which happens only when the kernel is done with it (its
            // completion, or the notification of a zero-copy send) or never (leaked in `Drop`).
            // Room for every entry was checked above, so this push cannot fail half-way.
            let pushed = unsafe { sq.push(&e) };
            debug_assert!(pushed.is_ok(), "room was checked");
        }
        Ok(())
    }

    /// Hands queued entries to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit().map(drop)
    }

    /// Submits and waits up to `timeout` for at least one completion (at once if one is
    /// ready). A timeout or a signal is not an error: [`Uring::pop`] then yields nothing.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        if !self.ring.completion().is_empty() {
            return self.submit();
        }
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The next completion whose owner comes back, if one is ready. Completions of cancel
    /// requests and zero-copy notifications are consumed here (see [`Uring::take_zc_copied`]).
    pub fn pop(&mut self) -> Option<Completion<T>> {
        loop {
            let cqe = self.ring.completion().next()?;
            let (ud, result, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
            if ud == CANCEL_UD {
                continue;
            }
            let Some(i) = usize::try_from(ud).ok().filter(|&i| i < self.table.len()) else {
                continue;
            };
            let Some(entry) = self.table[i].as_mut() else {
                continue;
            };
            if entry.zc && cqueue::notif(flags) {
                // The kernel no longer references the buffer.
                if u32::from_ne_bytes(result.to_ne_bytes()) & ZC_COPIED != 0 {
                    self.zc_copied += 1;
                }
                self.zc_pending = self.zc_pending.saturating_sub(1);
                if let Some(e) = self.remove(i) {
                    if let Some(owner) = e.owner {
                        // Only reachable if the first completion never came; hand it back.
                        return Some(Completion {
                            owner,
                            buf: e.buf,
                            result,
                            flags,
                        });
                    }
                }
                continue;
            }
            if entry.zc && cqueue::more(flags) {
                // The result is in, the buffer stays until the notification.
                let Some(owner) = entry.owner.take() else {
                    continue;
                };
                self.zc_pending += 1;
                return Some(Completion {
                    owner,
                    buf: IoBuf::Empty,
                    result,
                    flags,
                });
            }
            let e = self.remove(i)?;
            let Some(owner) = e.owner else {
                continue;
            };
            return Some(Completion {
                owner,
                buf: e.buf,
                result,
                flags,
            });
        }
    }

    fn remove(&mut self, i: usize) -> Option<Entry<T>> {
        let e = self.table.get_mut(i)?.take()?;
        self.free.push(i);
        self.live -= 1;
        Some(e)
    }

    /// Asks the kernel to cancel every submission in flight (each by its `user_data`: a
    /// cancel-any request cancelled only the first match on the 6.x kernels tried). Their
    /// completions (`-ECANCELED`, or whatever they finished with) come through [`Uring::pop`].
    pub fn cancel_all(&mut self) {
        let live: Vec<u64> = (0..self.table.len())
            .filter(|&i| self.table[i].as_ref().is_some_and(|e| e.owner.is_some()))
            .map(|i| i as u64)
            .collect();
        for ud in live {
            let e = opcode::AsyncCancel::new(ud).build().user_data(CANCEL_UD);
            loop {
                // SAFETY: a cancel entry references no memory.
                if unsafe { self.ring.submission().push(&e) }.is_ok() {
                    break;
                }
                if self.ring.submit().is_err() {
                    return;
                }
            }
        }
        let _ = self.ring.submit();
    }

    /// Cancels what is in flight and reaps until nothing is, or `limit` passed; completions are
    /// dropped (their owners and buffers freed: the kernel is done with them). Returns whether
    /// the table is empty.
    pub fn drain(&mut self, limit: Duration) -> bool {
        if self.live == 0 {
            return true;
        }
        self.cancel_all();
        let deadline = Instant::now() + limit;
        while self.live > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.wait(left.min(Duration::from_millis(100))).is_err() {
                break;
            }
            while self.pop().is_some() {}
        }
        self.live == 0
    }

    /// The ring's file descriptor.
    pub fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// Whether `bytes` more may be pinned by this process: it has `CAP_IPC_LOCK`, or its
/// `RLIMIT_MEMLOCK` is unlimited or at least `bytes`. Read from `/proc/self`; where that cannot be
/// read, `true` (registration then simply fails slot by slot if the kernel refuses).
fn memlock_allows(bytes: usize) -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    if cap_eff.is_some_and(|c| c & (1 << CAP_IPC_LOCK) != 0) {
        return true;
    }
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let Some(soft) = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max locked memory"))
        .and_then(|rest| rest.split_whitespace().next().map(str::to_owned))
    else {
        return true;
    };
    soft == "unlimited"
        || soft
            .parse::<u64>()
            .map_or(true, |limit| limit >= bytes as u64)
}

/// A new eventfd (counter 0, close-on-exec): what a ring thread keeps a read posted on so that
/// other threads can wake it.
pub(crate) fn eventfd() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd(2) takes no pointers; the return value is checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd(2), is valid and owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Builds the entry of `io` on `buf` (user_data still unset), or `None` if the span is outside
/// the buffer or too long for one operation.
fn build(io: &Io, buf: &mut IoBuf, fixed: Option<u16>) -> Option<squeue::Entry> {
    let e = match *io {
        Io::Poll { fd, events } => opcode::PollAdd::new(types::Fd(fd), events).build(),
        Io::Send { fd, at, len, flags } => {
            let p = buf.span(at, len)?;
            opcode::Send::new(types::Fd(fd), p.cast_const(), len32(len)?)
                .flags(flags)
                .build()
        }
        Io::SendZc { fd, at, len, flags } => {
            let p = buf.span(at, len)?;
            // A fixed index is the slot's start; the span is an address inside it.
            opcode::SendZc::new(types::Fd(fd), p.cast_const(), len32(len)?)
                .buf_index(fixed)
                .flags(flags)
                .zc_flags(ZC_REPORT_USAGE)
                .build()
        }
        Io::Recv { fd, at, len, flags } => {
            let p = buf.span(at, len)?;
            opcode::Recv::new(types::Fd(fd), p, len32(len)?)
                .flags(flags)
                .build()
        }
        Io::Read {
            fd,
            at,
            len,
            offset,
            punt,
        } => {
            let p = buf.span(at, len)?;
            let e = match fixed {
                Some(idx) => opcode::ReadFixed::new(types::Fd(fd), p, len32(len)?, idx)
                    .offset(offset)
                    .build(),
                None => opcode::Read::new(types::Fd(fd), p, len32(len)?)
                    .offset(offset)
                    .build(),
            };
            if punt {
                e.flags(squeue::Flags::ASYNC)
            } else {
                e
            }
        }
        Io::Write {
            fd,
            at,
            len,
            offset,
            punt,
        } => {
            let p = buf.span(at, len)?;
            let e = match fixed {
                Some(idx) => {
                    opcode::WriteFixed::new(types::Fd(fd), p.cast_const(), len32(len)?, idx)
                        .offset(offset)
                        .build()
                }
                None => opcode::Write::new(types::Fd(fd), p.cast_const(), len32(len)?)
                    .offset(offset)
                    .build(),
            };
            if punt {
                e.flags(squeue::Flags::ASYNC)
            } else {
                e
            }
        }
    };
    Some(e)
}

impl<T> Drop for Uring<T> {
    fn drop(&mut self) {
        let limit = self.drain;
        if self.drain(limit) {
            // SAFETY: `self.ring` is dropped exactly once, here, and never used after.
            unsafe { ManuallyDrop::drop(&mut self.ring) };
            return;
        }
        // The kernel may still touch the buffers of these entries: never free them, never hand a
        // pool slot back. The ring goes with them, and so does the pool clone of its
        // registration, so the pool's mapping stays as the kernel last saw it.
        for e in self.table.drain(..).flatten() {
            std::mem::forget(e);
        }
        if let Some(f) = self.fixed.take() {
            std::mem::forget(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn owners_come_back_with_their_completion() {
        let pool = BufPool::new(2, 4096).unwrap();
        let mut r: Uring<&str> = Uring::new(8, Some(&pool)).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut buf = pool.try_acquire().unwrap();
        buf.spare_mut()[..5].copy_from_slice(b"hello");
        r.push(Sub {
            io: Io::Write {
                fd: a.as_raw_fd(),
                at: 1,
                len: 4,
                offset: u64::MAX,
                punt: false,
            },
            buf: IoBuf::Pool(buf),
            owner: "w",
        })
        .unwrap();
        r.wait(Duration::from_secs(5)).unwrap();
        let c = r.pop().unwrap();
        assert_eq!((c.owner, c.result), ("w", 4));
        assert!(matches!(c.buf, IoBuf::Pool(_)));
        assert_eq!(r.in_flight(), 0);
        assert_eq!(r.registered_slots(), 1, "only the slot used was registered");
        let mut got = [0u8; 4];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ello");
    }

    #[test]
    fn a_span_outside_the_buffer_is_refused_and_handed_back() {
        let mut r: Uring<u32> = Uring::new(8, None).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let e = r
            .push(Sub {
                io: Io::Recv {
                    fd: a.as_raw_fd(),
                    at: 4,
                    len: 8,
                    flags: 0,
                },
                buf: IoBuf::Heap(vec![0u8; 10].into_boxed_slice()),
                owner: 7,
            })
            .unwrap_err();
        assert_eq!(e.subs.len(), 1);
        assert_eq!(e.subs[0].owner, 7);
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn linked_runs_go_out_in_order() {
        let mut r: Uring<u8> = Uring::new(8, None).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let sub = |s: &[u8], o| Sub {
            io: Io::Send {
                fd: a.as_raw_fd(),
                at: 0,
                len: s.len(),
                flags: libc::MSG_NOSIGNAL,
            },
            buf: IoBuf::Heap(s.to_vec().into_boxed_slice()),
            owner: o,
        };
        r.push_all(vec![sub(b"head", 1), sub(b"body", 2)], true)
            .unwrap();
        let mut owners = Vec::new();
        while owners.len() < 2 {
            r.wait(Duration::from_secs(5)).unwrap();
            while let Some(c) = r.pop() {
                assert_eq!(c.result, 4);
                owners.push(c.owner);
            }
        }
        owners.sort_unstable();
        assert_eq!(owners, [1, 2]);
        let mut got = [0u8; 8];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"headbody");
    }

    #[test]
    fn dropping_cancels_parked_reads_and_returns_their_buffers() {
        let pool = BufPool::new(2, 4096).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let mut r: Uring<()> = Uring::new(8, Some(&pool)).unwrap();
        for _ in 0..2 {
            let buf = pool.try_acquire().unwrap();
            r.push(Sub {
                io: Io::Read {
                    fd: a.as_raw_fd(),
                    at: 0,
                    len: 4096,
                    offset: u64::MAX,
                    punt: false,
                },
                buf: IoBuf::Pool(buf),
                owner: (),
            })
            .unwrap();
        }
        r.submit().unwrap();
        assert_eq!(pool.free(), 0);
        drop(r);
        assert_eq!(pool.free(), 2);
    }

    #[test]
    fn a_poll_completes_when_its_fd_becomes_readable() {
        let mut r: Uring<char> = Uring::new(4, None).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let events = u32::try_from(libc::POLLIN).unwrap();
        r.push(Sub {
            io: Io::Poll {
                fd: a.as_raw_fd(),
                events,
            },
            buf: IoBuf::Empty,
            owner: 'p',
        })
        .unwrap();
        r.submit().unwrap();
        r.wait(Duration::ZERO).unwrap();
        assert!(r.pop().is_none(), "nothing to read yet");
        b.write_all(b"x").unwrap();
        r.wait(Duration::from_secs(5)).unwrap();
        let c = r.pop().unwrap();
        assert_eq!(c.owner, 'p');
        assert_ne!(u32::try_from(c.result).unwrap() & events, 0);
    }

    #[test]
    fn unregistered_rings_move_the_same_bytes() {
        let pool = BufPool::new(1, 4096).unwrap();
        let mut r: Uring<()> = Uring::unregistered(8, &pool).unwrap();
        assert_eq!(r.unpinned_errno(), Some(libc::ENOMEM));
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"xyz").unwrap();
        let buf = pool.try_acquire().unwrap();
        r.push(Sub {
            io: Io::Read {
                fd: a.as_raw_fd(),
                at: 2,
                len: 100,
                offset: u64::MAX,
                punt: true,
            },
            buf: IoBuf::Pool(buf),
            owner: (),
        })
        .unwrap();
        r.wait(Duration::from_secs(5)).unwrap();
        let c = r.pop().unwrap();
        assert_eq!(c.result, 3);
        let mut buf = c.buf.into_pool().unwrap();
        buf.set_len(5);
        assert_eq!(&buf.as_slice()[2..], b"xyz");
        assert_eq!(r.registered_slots(), 0);
    }
}
