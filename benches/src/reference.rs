//! The reference loop: how QEMU moves VFIO device state today, to measure vfmig against.
//!
//! QEMU's `vfio_save_complete_precopy()` reads the data fd synchronously into one buffer
//! (`data_buffer_size`, 1 MiB by default) and puts each read on the migration stream behind a
//! `VFIO_MIG_FLAG_DEV_DATA_STATE` flag and a length; `vfio_load_state()` reads each record back and
//! writes it to the RESUMING data fd. There is no compression, no parallelism and no pipelining: a read
//! of the device, then a write of the socket, then the next read.
//!
//! This module does exactly that over one TCP connection, with the same framing (big-endian u64
//! flag, u64 length, payload; `VFIO_MIG_FLAG_END_OF_STATE` at the end). Both sides drive a real
//! [`MigrationDevice`]: the source walks to STOP_COPY and reads until the data fd returns 0, the
//! destination walks to RESUMING, writes every record in order and then walks RESUMING -> STOP, which
//! is where the device validates what it received. The destination then sends one status byte back
//! (QEMU has no per-device ack; we add one so the source can time the downtime the same way vfmig
//! does: from STOP_COPY entry to the destination device accepting its state).
//!
//! Memory: one buffer of [`REF_CHUNK`] + 16 bytes per side, whatever the state size.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use vfmig_vfio::{DeviceError, DeviceState, MigrationDevice};

/// Bytes read from the data fd per iteration: QEMU's default `data_buffer_size` (1 MiB).
pub const REF_CHUNK: usize = 1 << 20;

/// QEMU's `VFIO_MIG_FLAG_END_OF_STATE`.
pub const FLAG_END_OF_STATE: u64 = 0xffff_ffff_ef10_0001;
/// QEMU's `VFIO_MIG_FLAG_DEV_DATA_STATE`.
pub const FLAG_DEV_DATA_STATE: u64 = 0xffff_ffff_ef10_0004;

const HEADER: usize = 16;
const ACK_ACCEPTED: u8 = 0;
const ACK_REFUSED: u8 = 1;

/// Which side of the reference loop failed, and how.
#[derive(Debug, thiserror::Error)]
pub enum RefError {
    /// A device state change failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The walk to `state` returned no data fd.
    #[error("device {device}: entering {state} returned no data fd")]
    NoDataFd {
        /// Device name.
        device: String,
        /// The state entered.
        state: DeviceState,
    },
    /// Reading the STOP_COPY data fd failed.
    #[error("reading the data fd at stream offset {offset} failed: {source}")]
    DataFdRead {
        /// Bytes of the stream read before the failure.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing the RESUMING data fd failed (the device refused the bytes, or a short write).
    #[error("writing the data fd at stream offset {offset} failed: {source}")]
    DataFdWrite {
        /// Bytes of the stream written before the failure.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A socket operation failed (includes read timeouts and a vanished peer).
    #[error("socket {op} at stream offset {offset} failed: {source}")]
    Socket {
        /// `connect`, `accept`, `read`, `write` or `configure`.
        op: &'static str,
        /// Bytes of the stream moved before the failure.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A record header carried a flag other than DEV_DATA_STATE / END_OF_STATE.
    #[error("unknown record flag {flag:#x} at stream offset {offset}")]
    BadFlag {
        /// The flag read.
        flag: u64,
        /// Bytes of the stream received before it.
        offset: u64,
    },
    /// A record is longer than the receive buffer.
    #[error("record of {len} bytes at stream offset {offset} exceeds {max}")]
    RecordTooLong {
        /// The length read.
        len: u64,
        /// The buffer size.
        max: usize,
        /// Bytes of the stream received before it.
        offset: u64,
    },
    /// The destination device did not accept the state (its RESUMING -> STOP failed).
    #[error("the destination refused the state after {bytes} bytes")]
    Refused {
        /// Bytes sent.
        bytes: u64,
    },
    /// The destination sent an ack byte that means nothing.
    #[error("unknown ack byte {0:#x}")]
    BadAck(u8),
}

/// Socket options for the reference loop.
#[derive(Clone, Copy, Debug)]
pub struct RefConfig {
    /// Read/write timeout on the socket; nothing waits longer than this for the peer.
    pub io_timeout: Duration,
}

impl Default for RefConfig {
    fn default() -> Self {
        RefConfig {
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// What one side of a reference run measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefOutcome {
    /// Device state bytes moved (payload only).
    pub bytes: u64,
    /// Records (data fd reads on the source, data fd writes on the destination).
    pub records: u64,
    /// Source: from the STOP_COPY SET to the destination's ack (the downtime a VMM would see).
    /// Destination: from the RESUMING SET to the device accepting the state in STOP.
    pub elapsed: Duration,
}

impl RefOutcome {
    /// Payload throughput in bytes per second.
    pub fn bytes_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.bytes as f64 / secs
        } else {
            0.0
        }
    }
}

fn configure(sock: &TcpStream, cfg: &RefConfig) -> Result<(), RefError> {
    let err = |source| RefError::Socket {
        op: "configure",
        offset: 0,
        source,
    };
    sock.set_read_timeout(Some(cfg.io_timeout)).map_err(err)?;
    sock.set_write_timeout(Some(cfg.io_timeout)).map_err(err)?;
    Ok(())
}

/// Reads once, retrying only on EINTR. Returns 0 at the end of the stream.
fn read_once(f: &mut File, buf: &mut [u8], offset: u64) -> Result<usize, RefError> {
    loop {
        match f.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(RefError::DataFdRead { offset, source }),
        }
    }
}

/// Source side: STOP_COPY, then read 1 MiB, send it, repeat until the data fd returns 0; then wait
/// for the destination's verdict and leave the device in STOP.
///
/// On any failure the device is walked back to RUNNING (best effort) and the error returned.
pub fn send<D: MigrationDevice + ?Sized>(
    device: &mut D,
    sock: &mut TcpStream,
    cfg: &RefConfig,
) -> Result<RefOutcome, RefError> {
    configure(sock, cfg)?;
    let res = send_inner(device, sock);
    if res.is_err() {
        // QEMU's vfio_migration_cleanup path: back to RUNNING so the VM keeps going.
        let _ = device.set_state(DeviceState::Running);
    }
    res
}

fn send_inner<D: MigrationDevice + ?Sized>(
    device: &mut D,
    sock: &mut TcpStream,
) -> Result<RefOutcome, RefError> {
    let start = Instant::now();
    let fd = device
        .set_state(DeviceState::StopCopy)?
        .ok_or_else(|| RefError::NoDataFd {
            device: device.name().to_owned(),
            state: DeviceState::StopCopy,
        })?;
    let mut data_fd = File::from(fd);
    // Header and payload in one buffer so each record is one write, as QEMUFile coalesces them.
    let mut buf = vec![0u8; HEADER + REF_CHUNK];
    let mut bytes = 0u64;
    let mut records = 0u64;
    loop {
        let n = read_once(&mut data_fd, &mut buf[HEADER..], bytes)?;
        if n == 0 {
            break;
        }
        buf[..8].copy_from_slice(&FLAG_DEV_DATA_STATE.to_be_bytes());
        buf[8..HEADER].copy_from_slice(&(n as u64).to_be_bytes());
        sock.write_all(&buf[..HEADER + n])
            .map_err(|source| RefError::Socket {
                op: "write",
                offset: bytes,
                source,
            })?;
        bytes += n as u64;
        records += 1;
    }
    drop(data_fd);
    buf[..8].copy_from_slice(&FLAG_END_OF_STATE.to_be_bytes());
    buf[8..HEADER].copy_from_slice(&bytes.to_be_bytes());
    let sock_err = |op, source| RefError::Socket {
        op,
        offset: bytes,
        source,
    };
    sock.write_all(&buf[..HEADER])
        .map_err(|e| sock_err("write", e))?;
    let mut ack = [0u8; 1];
    sock.read_exact(&mut ack).map_err(|e| sock_err("read", e))?;
    let elapsed = start.elapsed();
    match ack[0] {
        ACK_ACCEPTED => {}
        ACK_REFUSED => return Err(RefError::Refused { bytes }),
        other => return Err(RefError::BadAck(other)),
    }
    device.set_state(DeviceState::Stop)?;
    Ok(RefOutcome {
        bytes,
        records,
        elapsed,
    })
}

/// Destination side: RESUMING, then write every record to the data fd in order; at END_OF_STATE
/// walk RESUMING -> STOP (the device validates) and tell the source the verdict.
///
/// On any failure the device is reset (best effort) and the source told, when the socket still works.
pub fn recv<D: MigrationDevice + ?Sized>(
    device: &mut D,
    sock: &mut TcpStream,
    cfg: &RefConfig,
) -> Result<RefOutcome, RefError> {
    configure(sock, cfg)?;
    let res = recv_inner(device, sock);
    let verdict = if res.is_ok() {
        ACK_ACCEPTED
    } else {
        let _ = device.reset();
        ACK_REFUSED
    };
    let ack = sock
        .write_all(&[verdict])
        .map_err(|source| RefError::Socket {
            op: "write",
            offset: res.as_ref().map_or(0, |o| o.bytes),
            source,
        });
    let out = res?;
    ack?;
    Ok(out)
}

fn recv_inner<D: MigrationDevice + ?Sized>(
    device: &mut D,
    sock: &mut TcpStream,
) -> Result<RefOutcome, RefError> {
    let start = Instant::now();
    let fd = device
        .set_state(DeviceState::Resuming)?
        .ok_or_else(|| RefError::NoDataFd {
            device: device.name().to_owned(),
            state: DeviceState::Resuming,
        })?;
    let mut data_fd = File::from(fd);
    let mut buf = vec![0u8; REF_CHUNK];
    let mut header = [0u8; HEADER];
    let mut bytes = 0u64;
    let mut records = 0u64;
    loop {
        sock.read_exact(&mut header)
            .map_err(|source| RefError::Socket {
                op: "read",
                offset: bytes,
                source,
            })?;
        let (flag, len) = split_header(&header);
        match flag {
            FLAG_END_OF_STATE => break,
            FLAG_DEV_DATA_STATE => {}
            flag => {
                return Err(RefError::BadFlag {
                    flag,
                    offset: bytes,
                })
            }
        }
        let n = usize::try_from(len)
            .ok()
            .filter(|&n| n <= REF_CHUNK)
            .ok_or(RefError::RecordTooLong {
                len,
                max: REF_CHUNK,
                offset: bytes,
            })?;
        let record = &mut buf[..n];
        sock.read_exact(record).map_err(|source| RefError::Socket {
            op: "read",
            offset: bytes,
            source,
        })?;
        data_fd
            .write_all(record)
            .map_err(|source| RefError::DataFdWrite {
                offset: bytes,
                source,
            })?;
        bytes += len;
        records += 1;
    }
    drop(data_fd);
    device.set_state(DeviceState::Stop)?;
    Ok(RefOutcome {
        bytes,
        records,
        elapsed: start.elapsed(),
    })
}

fn split_header(h: &[u8; HEADER]) -> (u64, u64) {
    let mut flag = [0u8; 8];
    let mut len = [0u8; 8];
    flag.copy_from_slice(&h[..8]);
    len.copy_from_slice(&h[8..]);
    (u64::from_be_bytes(flag), u64::from_be_bytes(len))
}

/// Connects to `addr` and runs [`send`].
pub fn send_to<D: MigrationDevice + ?Sized>(
    device: &mut D,
    addr: SocketAddr,
    cfg: &RefConfig,
) -> Result<RefOutcome, RefError> {
    let mut sock =
        TcpStream::connect_timeout(&addr, cfg.io_timeout).map_err(|source| RefError::Socket {
            op: "connect",
            offset: 0,
            source,
        })?;
    send(device, &mut sock, cfg)
}

/// Accepts one connection on `listener` and runs [`recv`].
pub fn recv_from<D: MigrationDevice + ?Sized>(
    device: &mut D,
    listener: &TcpListener,
    cfg: &RefConfig,
) -> Result<RefOutcome, RefError> {
    let mut sock = accept_timeout(listener, cfg.io_timeout).map_err(|source| RefError::Socket {
        op: "accept",
        offset: 0,
        source,
    })?;
    recv(device, &mut sock, cfg)
}

/// `accept` that gives up after `timeout` instead of waiting forever for a source.
pub fn accept_timeout(listener: &TcpListener, timeout: Duration) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let res = loop {
        match listener.accept() {
            Ok((sock, _)) => break Ok(sock),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break Err(io::Error::from(io::ErrorKind::TimedOut));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    listener.set_nonblocking(false)?;
    let sock = res?;
    sock.set_nonblocking(false)?;
    Ok(sock)
}

/// Both sides in one process over loopback TCP: the destination on a thread, the source on the
/// caller's. Returns (source, destination) outcomes.
pub fn run_loopback<S, D>(
    src: &mut S,
    dst: &mut D,
    cfg: &RefConfig,
) -> Result<(RefOutcome, RefOutcome), RefError>
where
    S: MigrationDevice + ?Sized,
    D: MigrationDevice + ?Sized,
{
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| RefError::Socket {
        op: "bind",
        offset: 0,
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| RefError::Socket {
        op: "bind",
        offset: 0,
        source,
    })?;
    std::thread::scope(|s| {
        let dst_side = s.spawn(|| recv_from(dst, &listener, cfg));
        let src_out = send_to(src, addr, cfg);
        let dst_out = dst_side.join().unwrap_or(Err(RefError::Socket {
            op: "join",
            offset: 0,
            source: io::Error::other("destination thread panicked"),
        }));
        Ok((src_out?, dst_out?))
    })
}
