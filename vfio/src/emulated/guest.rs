//! Guest memory for device DMA: a memfd mapped with memmap2, and the device's DMA dirty log.
//!
//! The emulated device writes guest pages while it runs; with DMA logging started, each written
//! page's logging page is remembered until a REPORT reads and clears it. The log is sparse (a set
//! of dirty IOVAs), so tracking a huge IOVA range costs nothing until pages are written.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use memmap2::MmapMut;

use crate::dma::{self, DmaLoggingError, IovaRange};
use crate::emulated::content::{mix64, WyRand};
use crate::guest_memory::GuestMemoryAccess;

/// Guest page size used by the device's DMA writes.
pub const GUEST_PAGE_SIZE: u64 = 4096;
const GUEST_PAGE: usize = 4096;

/// A guest-memory region shared by the device (DMA writes) and the pipeline (which reads dirty
/// pages on the source and applies them on the destination).
///
/// The bytes live in a memfd ([`GuestMemory::fd`]); another mapping of the same fd sees the same
/// memory. Accesses through this type are serialised by an internal lock.
#[derive(Debug)]
pub struct GuestMemory {
    fd: OwnedFd,
    iova: u64,
    len: u64,
    map: Mutex<MmapMut>,
}

impl GuestMemory {
    /// A zero-filled region of `len` bytes (a multiple of [`GUEST_PAGE_SIZE`]) at `iova`.
    /// EINVAL for an empty or unaligned region, or one that wraps the IOVA space.
    pub fn new(iova: u64, len: u64) -> io::Result<GuestMemory> {
        if len == 0
            || len % GUEST_PAGE_SIZE != 0
            || iova % GUEST_PAGE_SIZE != 0
            || iova.checked_add(len).is_none()
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let name = c"vfmig-emu-guest";
        // SAFETY: `name` is a valid NUL-terminated string; memfd_create returns a new fd or -1.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd returned by memfd_create above and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = File::from(fd.try_clone()?);
        file.set_len(len)?;
        // The mapping must never outlive its pages: seal the size so that nobody holding the fd
        // handed out by `fd()` can shrink the file under it (a shrunk memfd faults with SIGBUS).
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS takes an integer argument and dereferences no pointer.
        if unsafe { libc::fcntl(raw, libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the file is `len` bytes and sealed against shrinking just above, so every page
        // of the mapping stays backed for its whole life; other mappings of the memfd (by holders
        // of `fd()`) can change the bytes, never the mapping's validity.
        let map = unsafe { MmapMut::map_mut(&file)? };
        Ok(GuestMemory {
            fd,
            iova,
            len,
            map: Mutex::new(map),
        })
    }

    /// The memfd holding the guest memory (map it, or `pread` it, to read dirty pages). Its size
    /// is sealed (`F_SEAL_SHRINK`): truncating it fails with EPERM.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// IOVA of the first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never empty (the constructor refuses 0); here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn range(&self, iova: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
        let off = iova
            .checked_sub(self.iova)
            .filter(|off| off.checked_add(n as u64).is_some_and(|e| e <= self.len))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        let off = usize::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
        Ok(off..off + n)
    }

    /// Copies guest memory at `iova` into `buf` (EFAULT outside the region).
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(iova, buf.len())?;
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        buf.copy_from_slice(&map[r]);
        Ok(())
    }

    /// Writes `data` into guest memory at `iova` (EFAULT outside the region).
    pub fn write(&self, iova: u64, data: &[u8]) -> io::Result<()> {
        let r = self.range(iova, data.len())?;
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map[r].copy_from_slice(data);
        Ok(())
    }

    /// Runs `f` on the mapped region (no copy), under the region's lock.
    pub fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        f(&map[..])
    }

    /// Runs `f` on the mapped region for writing (e.g. a destination applying dirty pages),
    /// under the region's lock.
    pub fn with_bytes_mut<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut map[..])
    }

    /// BLAKE3 of the whole region: equal digests mean equal guest memory.
    pub fn digest(&self) -> [u8; 32] {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        *blake3::hash(&map[..]).as_bytes()
    }

    /// One device DMA write of page `page` (index within the region); returns its IOVA.
    pub(crate) fn dma_write_page(&self, page: u64, seed: u64, counter: u64) -> io::Result<u64> {
        let iova = self.iova + page * GUEST_PAGE_SIZE;
        let r = self.range(iova, GUEST_PAGE)?;
        let mut rng = WyRand::new(mix64(seed ^ mix64(page) ^ counter.rotate_left(17)));
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for c in map[r].chunks_exact_mut(8) {
            c.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        Ok(iova)
    }

    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.len / GUEST_PAGE_SIZE
    }
}

impl GuestMemoryAccess for GuestMemory {
    fn ranges(&self) -> Vec<IovaRange> {
        vec![IovaRange {
            iova: self.iova(),
            length: self.len(),
        }]
    }

    fn read(&self, iova: u64, buf: &mut [u8]) -> io::Result<()> {
        GuestMemory::read(self, iova, buf)
    }

    fn write(&self, iova: u64, data: &[u8]) -> io::Result<()> {
        GuestMemory::write(self, iova, data)
    }
}

/// The device's DMA dirty log (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`).
#[derive(Debug, Default)]
pub(crate) struct DmaLog {
    tracked: Vec<IovaRange>,
    page_size: u64,
    /// Page-aligned IOVAs (at `page_size`) written since the last report covering them.
    dirty: BTreeSet<u64>,
    started: bool,
}

impl DmaLog {
    pub(crate) fn start(
        &mut self,
        ranges: &[IovaRange],
        page_size: u64,
    ) -> Result<u64, DmaLoggingError> {
        if self.started {
            return Err(DmaLoggingError::AlreadyStarted);
        }
        dma::validate_ranges(ranges, page_size)?;
        self.tracked = ranges.to_vec();
        self.page_size = page_size;
        self.dirty.clear();
        self.started = true;
        Ok(page_size)
    }

    pub(crate) fn stop(&mut self) -> Result<(), DmaLoggingError> {
        if !self.started {
            return Err(DmaLoggingError::NotStarted);
        }
        *self = DmaLog::default();
        Ok(())
    }

    /// Records a device write of `[iova, iova + len)`.
    pub(crate) fn record(&mut self, iova: u64, len: u64) {
        if !self.started || len == 0 {
            return;
        }
        let ps = self.page_size;
        let mut at = iova & !(ps - 1);
        let end = iova.saturating_add(len);
        while at < end {
            if self
                .tracked
                .iter()
                .any(|r| r.iova <= at && r.end().is_some_and(|e| at < e))
            {
                self.dirty.insert(at);
            }
            at = match at.checked_add(ps) {
                Some(a) => a,
                None => break,
            };
        }
    }

    /// REPORT: sets bit i of `bitmap` for every dirty page in `[iova, iova + length)` at
    /// `page_size` granularity, and clears those pages from the log.
    pub(crate) fn report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DmaLoggingError> {
        if !self.started {
            return Err(DmaLoggingError::NotStarted);
        }
        dma::validate_report(&self.tracked, iova, length, page_size, bitmap.len())?;
        let end = iova + length; // validate_report checked it does not wrap
        let lps = self.page_size;
        // Dirty logging pages that overlap the span.
        let start = iova & !(lps - 1);
        let hits: Vec<u64> = self.dirty.range(start..end).copied().collect();
        for d in hits {
            let lo = d.max(iova);
            let hi = d.saturating_add(lps).min(end);
            let mut bit = (lo - iova) / page_size;
            let last = (hi - 1 - iova) / page_size;
            while bit <= last {
                let (w, b) = (usize::try_from(bit / 64).unwrap_or(usize::MAX), bit % 64);
                if let Some(word) = bitmap.get_mut(w) {
                    *word |= 1 << b;
                }
                bit += 1;
            }
            self.dirty.remove(&d);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_that_wraps_the_iova_space_is_refused_with_einval() {
        // The last page would end at 2^64: `iova + page * 4096` of its DMA writes overflowed.
        let top = u64::MAX - (GUEST_PAGE_SIZE - 1);
        for (iova, len) in [(top, GUEST_PAGE_SIZE * 2), (GUEST_PAGE_SIZE, top)] {
            let err = GuestMemory::new(iova, len).unwrap_err();
            assert_eq!(
                err.raw_os_error(),
                Some(libc::EINVAL),
                "iova {iova:#x} len {len:#x}"
            );
        }
    }

    #[test]
    fn the_memfd_cannot_be_shrunk_under_the_mapping() {
        let g = GuestMemory::new(0, 2 * GUEST_PAGE_SIZE).unwrap();
        let f = File::from(g.fd().try_clone_to_owned().unwrap());
        let err = f.set_len(GUEST_PAGE_SIZE).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        // The mapping is intact: its last page is still readable and writable.
        let last = GUEST_PAGE_SIZE;
        g.write(last, &[7u8; 8]).unwrap();
        let mut back = [0u8; 8];
        g.read(last, &mut back).unwrap();
        assert_eq!(back, [7u8; 8]);
    }

    #[test]
    fn a_region_ending_just_below_the_top_of_the_iova_space_is_accepted() {
        let iova = u64::MAX - (2 * GUEST_PAGE_SIZE - 1);
        let g = GuestMemory::new(iova, GUEST_PAGE_SIZE).unwrap();
        assert_eq!(g.dma_write_page(0, 1, 1).unwrap(), iova);
    }
}
