//! The emulated device's state model, behind the device lock ([`Core`]): block versions and
//! digests, time-driven dirtying and device DMA, the state digest, the MMIO register file and
//! whether MMIO works, and the counters ([`EmulatedStats`]).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use xxhash_rust::xxh3::xxh3_64;

use crate::state::{DeviceState, MigrationCaps};

use super::bits::BitSet;
use super::format::{self, StreamError, HEADER_LEN};
use super::guest::{DmaLog, GuestMemory, GUEST_PAGE_SIZE};
use super::resume::ResumeStream;
use super::save::SaveStream;
use super::{content, lock, EmulatedConfig};

/// The device's open data fd stream, if any.
#[derive(Debug)]
pub(super) enum Stream {
    Save(Box<SaveStream>),
    Resume(Arc<Mutex<ResumeStream>>),
}

impl Stream {
    pub(super) fn id(&self) -> u64 {
        match self {
            Stream::Save(s) => s.id,
            Stream::Resume(r) => lock(r).id,
        }
    }
}

/// Counters of an emulated device (for tests and reports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmulatedStats {
    /// Blocks dirtied since creation.
    pub blocks_dirtied: u64,
    /// Guest pages written by DMA since creation.
    pub dma_pages_written: u64,
    /// MMIO writes received and applied.
    pub mmio_accepted: u64,
    /// MMIO writes received while MMIO did not work (discarded).
    pub mmio_lost: u64,
    /// Largest FUSE READ request seen by the process-wide mount (the negotiated read size).
    pub max_read_request: u64,
    /// Largest FUSE WRITE request seen by the process-wide mount.
    pub max_write_request: u64,
    /// Re-initialisations in PRE_COPY (`reinit_after`).
    pub precopy_reinits: u64,
    /// The `initial_bytes` a `precopy_info` would have reported when the device last left
    /// PRE_COPY for STOP_COPY (0: every initial byte was read in PRE_COPY).
    pub initial_bytes_at_precopy_exit: Option<u64>,
}

/// Everything behind the device lock, shared with the data fd servers and P2P ports.
#[derive(Debug)]
pub(crate) struct Core {
    pub(super) cfg: EmulatedConfig,
    pub(super) caps: MigrationCaps,
    pub(super) blocks: u64,
    pub(super) block_size: u64,
    pub(super) state: DeviceState,
    pub(super) versions: Vec<u32>,
    pub(super) hashes: Vec<u64>,
    /// Version each `hashes` entry was computed at (`u32::MAX`: none).
    pub(super) hashed: Vec<u32>,
    pub(super) stream: Option<Stream>,
    /// After a successful resume: the imported state's digest. The device then holds a state it
    /// cannot regenerate, and refuses to save until reset.
    pub(super) imported: Option<[u8; 32]>,
    pub(super) last_resume_error: Option<StreamError>,
    pub(super) rng: content::WyRand,
    pub(super) last_tick: Instant,
    pub(super) dirty_carry: u128,
    pub(super) dma_carry: u128,
    pub(super) fail_arc_used: bool,
    pub(super) guest: Option<Arc<GuestMemory>>,
    pub(super) dma_log: DmaLog,
    pub(super) dma_counter: u64,
    pub(super) stats: EmulatedStats,
    /// The MMIO BAR: a small register file (not part of the migrated stream; an applied write
    /// also dirties a state block, which is).
    pub(super) mmio: [u64; MMIO_REGS],
    /// `MIG_PRECOPY_INFOv2` was opted in to (lasts for the device's life, as for an open fd).
    pub(super) precopy_info_v2: bool,
}

/// 64-bit registers in the emulated MMIO BAR.
pub const MMIO_REGS: usize = 64;

impl Core {
    pub(super) fn block_len(&self, i: u64) -> u64 {
        self.block_size.min(self.cfg.size - i * self.block_size)
    }

    /// Record bytes of the blocks in `set` (all full-size but possibly the last one).
    pub(super) fn set_bytes(&self, set: &BitSet) -> u64 {
        let full = set.count() * (HEADER_LEN as u64 + self.block_size);
        let last = self.blocks - 1;
        if set.contains(last) {
            full - (self.block_size - self.block_len(last))
        } else {
            full
        }
    }

    pub(super) fn vidx(i: u64) -> usize {
        // Block indices are < `blocks`, which was checked to fit in usize at creation.
        usize::try_from(i).unwrap_or(usize::MAX)
    }

    /// Lazily applies the time-driven activity since the last call: dirtying and DMA writes.
    pub(super) fn tick(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_tick).as_nanos();
        self.last_tick = now;
        if !self.state.is_running() {
            return;
        }
        if self.cfg.dirty_rate > 0 {
            self.dirty_carry += elapsed * u128::from(self.cfg.dirty_rate);
            let per_block = u128::from(self.block_size) * 1_000_000_000;
            let n = (self.dirty_carry / per_block).min(u128::from(self.blocks));
            self.dirty_carry -= n * per_block;
            // n <= blocks, a u64.
            let n = u64::try_from(n).unwrap_or(self.blocks);
            if n >= self.blocks {
                // Everything is dirty already; do not carry a backlog.
                self.dirty_carry = 0;
            }
            self.dirty_random(n);
        }
        if let Some(g) = self.cfg.guest.filter(|g| g.dma_pages_per_sec > 0) {
            self.dma_carry += elapsed * u128::from(g.dma_pages_per_sec);
            let pages = g.len / GUEST_PAGE_SIZE;
            let n = (self.dma_carry / 1_000_000_000).min(u128::from(pages));
            self.dma_carry -= n * 1_000_000_000;
            self.dma_random(u64::try_from(n).unwrap_or(pages));
        }
    }

    pub(super) fn dirty_random(&mut self, n: u64) {
        for _ in 0..n {
            let i = self.rng.below(self.blocks);
            self.dirty_block(i);
        }
    }

    pub(super) fn dirty_block(&mut self, i: u64) {
        if i >= self.blocks {
            return;
        }
        let v = &mut self.versions[Self::vidx(i)];
        // Version u32::MAX is reserved for "no hash"; skip it.
        *v = match v.wrapping_add(1) {
            u32::MAX => 0,
            n => n,
        };
        self.stats.blocks_dirtied += 1;
        if let Some(Stream::Save(s)) = &mut self.stream {
            if !s.unsent.contains(i) && !s.reinit.contains(i) {
                s.dirty.insert(i);
            }
        }
    }

    pub(super) fn dma_random(&mut self, n: u64) {
        let Some(g) = self.guest.clone() else { return };
        for _ in 0..n {
            let page = self.rng.below(g.pages());
            self.dma_write(&g, page);
        }
    }

    pub(super) fn dma_write(&mut self, g: &GuestMemory, page: u64) {
        self.dma_counter += 1;
        if let Ok(iova) = g.dma_write_page(page, self.cfg.seed, self.dma_counter) {
            self.dma_log.record(iova, GUEST_PAGE_SIZE);
            self.stats.dma_pages_written += 1;
        }
    }

    /// The digest of block `i` at its current version, generating it if needed.
    fn block_hash(&mut self, i: u64, scratch: &mut Vec<u8>) -> u64 {
        let k = Self::vidx(i);
        if self.hashed[k] == self.versions[k] {
            return self.hashes[k];
        }
        let len = Self::vidx(self.block_len(i));
        scratch.resize(len, 0);
        content::fill_range(
            self.cfg.profile,
            self.cfg.seed,
            i * self.block_size,
            self.versions[k],
            scratch,
        );
        let h = xxh3_64(scratch);
        self.hashes[k] = h;
        self.hashed[k] = self.versions[k];
        h
    }

    pub(super) fn state_digest(&mut self) -> [u8; 32] {
        if let Some(d) = self.imported {
            return d;
        }
        let mut scratch = Vec::new();
        for i in 0..self.blocks {
            self.block_hash(i, &mut scratch);
        }
        format::state_digest(self.cfg.size, self.block_size, self.hashes.iter().copied())
    }

    /// Whether MMIO works now (see [`Quirks::stop_serves_mmio`](super::Quirks::stop_serves_mmio)).
    pub(crate) fn mmio_works(&self) -> bool {
        if self.cfg.quirks.stop_serves_mmio {
            self.state != DeviceState::Error
        } else {
            self.state.mmio_works()
        }
    }
}
