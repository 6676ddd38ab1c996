//! P2P between emulated devices: each device can MMIO-write into its peers' BARs.
//!
//! A device initiates P2P only in RUNNING and PRE_COPY (`DeviceState::initiates_p2p`); it accepts
//! MMIO in every running state, RUNNING_P2P included (`DeviceState::mmio_works`). A write that
//! reaches a device in STOP, STOP_COPY, RESUMING or ERROR is discarded and counted as lost: that
//! is what quiescing every device to RUNNING_P2P before stopping any of them prevents.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{lock, Core, MMIO_REGS};

fn reg(offset: u64) -> usize {
    // The remainder is < MMIO_REGS, a small usize.
    usize::try_from((offset / 8) % MMIO_REGS as u64).unwrap_or(0)
}

/// A handle through which peers reach one device's MMIO.
#[derive(Clone, Debug)]
pub struct P2pPort {
    core: Arc<Mutex<Core>>,
    name: String,
}

impl P2pPort {
    pub(crate) fn new(core: Arc<Mutex<Core>>, name: String) -> P2pPort {
        P2pPort { core, name }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the device initiates P2P writes in its current state.
    pub fn initiates_p2p(&self) -> bool {
        lock(&self.core).state.initiates_p2p()
    }

    /// An MMIO write at `offset`: applied if MMIO works now (it changes device state: the block
    /// the offset selects is dirtied), else discarded and counted lost. Returns whether applied.
    pub fn mmio_write(&self, offset: u64, value: u64) -> bool {
        let mut c = lock(&self.core);
        c.tick();
        if c.mmio_works() {
            c.mmio[reg(offset)] = value;
            let block = (offset ^ value) % c.blocks;
            c.dirty_block(block);
            c.stats.mmio_accepted += 1;
            true
        } else {
            c.stats.mmio_lost += 1;
            false
        }
    }
}

impl P2pPort {
    /// An MMIO read at `offset`: the register while MMIO works, zero in STOP-like states (as
    /// mlx5 reads all zeros in STOP).
    pub fn mmio_read(&self, offset: u64) -> u64 {
        let mut c = lock(&self.core);
        c.tick();
        if c.mmio_works() {
            c.mmio[reg(offset)]
        } else {
            0
        }
    }
}

/// Totals of a fabric.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct P2pStats {
    /// P2P writes sent.
    pub sent: u64,
    /// Writes that reached a device whose MMIO did not work (discarded).
    pub lost: u64,
}

#[derive(Debug, Default)]
struct Totals {
    sent: AtomicU64,
    lost: AtomicU64,
}

/// Devices that send P2P writes into each other's MMIO.
#[derive(Debug, Default)]
pub struct P2pFabric {
    ports: Vec<P2pPort>,
    totals: Arc<Totals>,
    round: u64,
}

impl P2pFabric {
    /// A fabric of the given devices' ports.
    pub fn new(ports: Vec<P2pPort>) -> P2pFabric {
        P2pFabric {
            ports,
            totals: Arc::new(Totals::default()),
            round: 0,
        }
    }

    /// Runs `rounds` rounds synchronously: in each, every device that initiates P2P writes once
    /// to every peer. Deterministic; returns this call's counts.
    pub fn pump(&mut self, rounds: u64) -> P2pStats {
        let mut out = P2pStats::default();
        for _ in 0..rounds {
            self.round += 1;
            let r = pump_round(&self.ports, self.round);
            out.sent += r.sent;
            out.lost += r.lost;
        }
        self.totals.sent.fetch_add(out.sent, Ordering::Relaxed);
        self.totals.lost.fetch_add(out.lost, Ordering::Relaxed);
        out
    }

    /// Totals over every `pump` and background thread of this fabric.
    pub fn stats(&self) -> P2pStats {
        P2pStats {
            sent: self.totals.sent.load(Ordering::Relaxed),
            lost: self.totals.lost.load(Ordering::Relaxed),
        }
    }

    /// Pumps `rounds_per_sec` rounds per second on a thread until the returned handle is dropped.
    pub fn spawn(&self, rounds_per_sec: u64) -> std::io::Result<P2pTraffic> {
        let ports = self.ports.clone();
        let totals = self.totals.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let period = Duration::from_nanos(1_000_000_000 / rounds_per_sec.max(1));
        let thread = std::thread::Builder::new()
            .name("vfmig-emu-p2p".to_owned())
            .spawn(move || {
                let mut round = 1u64 << 32;
                let mut next = Instant::now();
                while !stop2.load(Ordering::Relaxed) {
                    round += 1;
                    let r = pump_round(&ports, round);
                    totals.sent.fetch_add(r.sent, Ordering::Relaxed);
                    totals.lost.fetch_add(r.lost, Ordering::Relaxed);
                    next += period;
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
            })?;
        Ok(P2pTraffic {
            stop,
            thread: Some(thread),
        })
    }
}

fn pump_round(ports: &[P2pPort], round: u64) -> P2pStats {
    let mut out = P2pStats::default();
    for (i, src) in ports.iter().enumerate() {
        if !src.initiates_p2p() {
            continue;
        }
        for (j, dst) in ports.iter().enumerate() {
            if i == j {
                continue;
            }
            out.sent += 1;
            if !dst.mmio_write(round.wrapping_mul(31) ^ i as u64, round) {
                out.lost += 1;
            }
        }
    }
    out
}

/// Background P2P traffic; stops (and joins its thread) on drop.
#[derive(Debug)]
pub struct P2pTraffic {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for P2pTraffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
