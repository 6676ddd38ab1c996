//! Drives two real VFIO migration devices (the kernel's `mtty` sample inside the nested guest of
//! `tools/mtty-harness`): first the device contract suite ([`vfmig_vfio::contract::run_all`]),
//! then every legal arc in one tour, the data fd with io_uring at offset -1, and a real
//! STOP_COPY -> RESUMING transfer proven by reading UART bytes back out of the destination.
//!
//! ```text
//! contract_vfio <source device> <destination device>
//!     e.g. /sys/bus/mdev/devices/<uuid>  (any path VfioDevice::open accepts)
//! contract_vfio uart-put <device> <port> <text>     put text into an mtty port's FIFO
//! contract_vfio uart-get <device> <port> <text>     bring the device to RUNNING, drain the port,
//!                                                   exit 0 iff it held exactly <text>
//! ```
//!
//! The `uart-*` modes let `tools/mtty-harness` load and check devices around a `vfmig send/recv`
//! run; mtty keeps its FIFOs and migration state across close and reopen.
//!
//! Every step prints one line (`ARC`, `URING`, `CHECK`, `QUIRK`, `BYTES`). `QUIRK` lines record
//! where the device differs from the uAPI text; they do not fail the run. Exit status 0 when every
//! `CHECK` passed, 1 otherwise, 2 on usage errors.

use std::fmt::Debug;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::process::ExitCode;

use io_uring::{opcode, types, IoUring};
use vfmig_vfio::contract::{run_all, ContractOptions};
use vfmig_vfio::{
    next_state, DeviceError, DeviceState, IovaRange, MigrationCaps, MigrationDevice, Transition,
    VfioDevice,
};

#[path = "mtty/uart.rs"]
mod uart;
use uart::{uart_drain, uart_put};

use DeviceState::{PreCopy, PreCopyP2p, Resuming, Running, RunningP2p, Stop, StopCopy};

/// Largest single read/write of the data fd, and the cap on total stream bytes handled here.
const CHUNK: usize = 4096;
const MAX_STREAM: usize = 1 << 20;

/// Counts failed checks; prints one line per check.
#[derive(Default)]
struct Report {
    failed: u32,
    checks: u32,
}

impl Report {
    fn check(&mut self, what: &str, ok: bool, detail: impl Debug) {
        self.checks += 1;
        if ok {
            println!("CHECK {what}: ok ({detail:?})");
        } else {
            self.failed += 1;
            println!("CHECK {what}: FAILED ({detail:?})");
        }
    }

    /// A difference from the uAPI text that the pipeline must tolerate; never fails the run.
    fn quirk(&self, what: &str, detail: impl Debug) {
        println!("QUIRK {what}: {detail:?}");
    }
}

/// One io_uring with one operation in flight at a time, on the data fd at offset -1.
struct Ring {
    ring: IoUring,
}

impl Ring {
    fn new() -> io::Result<Ring> {
        Ok(Ring {
            ring: IoUring::new(4)?,
        })
    }

    fn complete(&mut self, sqe: io_uring::squeue::Entry) -> io::Result<usize> {
        // SAFETY: the entry points at a buffer borrowed by the caller (`read`/`write` below) for
        // the whole of this call, and this call does not return until that entry's completion has
        // been reaped, so the kernel never touches the buffer after the borrow ends.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let cqe = self
            .ring
            .completion()
            .next()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
        let res = cqe.result();
        if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            Ok(usize::try_from(res).unwrap_or(0))
        }
    }

    fn read(&mut self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let sqe = opcode::Read::new(types::Fd(fd.as_raw_fd()), buf.as_mut_ptr(), len)
            .offset(u64::MAX) // -1: the stream's current position
            .build();
        let r = self.complete(sqe);
        println!(
            "URING read  fd={} off=-1 len={len} -> {}",
            fd.as_raw_fd(),
            show(&r)
        );
        r
    }

    fn write(&mut self, fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let sqe = opcode::Write::new(types::Fd(fd.as_raw_fd()), buf.as_ptr(), len)
            .offset(u64::MAX)
            .build();
        let r = self.complete(sqe);
        println!(
            "URING write fd={} off=-1 len={len} -> {}",
            fd.as_raw_fd(),
            show(&r)
        );
        r
    }

    /// Reads until 0 (end of stream, or mtty's "nothing now" in PRE_COPY) or ENOMSG.
    fn read_available(&mut self, fd: BorrowedFd<'_>, out: &mut Vec<u8>) -> io::Result<usize> {
        let mut buf = vec![0u8; CHUNK];
        let start = out.len();
        while out.len() < MAX_STREAM {
            match self.read(fd, &mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.raw_os_error() == Some(libc::ENOMSG) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(out.len() - start)
    }

    /// Writes all of `data` in chunks of `chunk` bytes (write boundaries need not match reads).
    fn write_all(&mut self, fd: BorrowedFd<'_>, data: &[u8], chunk: usize) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let end = (done + chunk.max(1)).min(data.len());
            match self.write(fd, &data[done..end])? {
                0 => return Err(io::Error::from_raw_os_error(libc::EIO)),
                n => done += n,
            }
        }
        Ok(())
    }
}

fn show<T: Debug>(r: &io::Result<T>) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("{} ({e})", errno_name(e.raw_os_error())),
    }
}

fn errno_name(errno: Option<i32>) -> &'static str {
    match errno {
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::ENOMEM) => "ENOMEM",
        Some(libc::EFAULT) => "EFAULT",
        Some(libc::ENOMSG) => "ENOMSG",
        Some(libc::ESPIPE) => "ESPIPE",
        Some(libc::EPERM) => "EPERM",
        Some(libc::ENODEV) => "ENODEV",
        Some(libc::ENOTTY) => "ENOTTY",
        Some(libc::EBUSY) => "EBUSY",
        Some(_) => "errno",
        None => "no errno",
    }
}

/// Every single arc the kernel's table allows for `caps`.
fn legal_arcs(caps: MigrationCaps) -> Vec<Transition> {
    let mut arcs = Vec::new();
    for from in DeviceState::ALL {
        for to in DeviceState::ALL {
            if from != to && next_state(from, to, caps).ok() == Some(to) {
                arcs.push(Transition { from, to });
            }
        }
    }
    arcs
}

/// One SET along `arc`, checked: the state afterwards, and a data fd exactly where the uAPI says
/// one is created (a continuing arc may return the same stream again or -1).
fn step(
    dev: &mut VfioDevice,
    arc: Transition,
    rep: &mut Report,
    seen: &mut Vec<Transition>,
) -> Option<OwnedFd> {
    let r = dev.set_single_state(arc.to);
    let now = dev.state();
    let (fd, ok) = match r {
        Ok(fd) => {
            let fd_ok =
                fd.is_some() == arc.opens_data_fd() || (arc.continues_data_fd() && fd.is_some());
            (fd, fd_ok && matches!(now, Ok(s) if s == arc.to))
        }
        Err(e) => {
            println!("ARC {arc}: SET failed: {e}");
            (None, false)
        }
    };
    if ok {
        println!(
            "ARC {arc}: ok, state now {}, data_fd {}",
            arc.to,
            match &fd {
                Some(fd) => format!("{} (new)", fd.as_raw_fd()),
                None => "none".into(),
            }
        );
        if !seen.contains(&arc) {
            seen.push(arc);
        }
    } else {
        rep.check(
            &format!("arc {arc}"),
            false,
            (&fd, now.map_err(|e| e.to_string())),
        );
    }
    if arc.continues_data_fd() && arc.to == StopCopy && fd.is_none() {
        rep.quirk(
            "PRE_COPY_P2P -> STOP_COPY returns data_fd -1",
            "keep reading the PRE_COPY fd",
        );
    }
    fd
}

fn name_of(d: &VfioDevice) -> String {
    d.name().to_owned()
}

/// The tour: every legal arc of a device with all three capabilities, in one walk from RUNNING,
/// reading the data fd at each streaming state and resuming the device from its own state.
fn arc_tour(dev: &mut VfioDevice, ring: &mut Ring, rep: &mut Report) -> Result<(), DeviceError> {
    println!("== arc tour on {}", dev.name());
    let mut seen = Vec::new();
    let arc = |from, to| Transition { from, to };
    let mut s = |d: &mut VfioDevice, a: Transition, rep: &mut Report| step(d, a, rep, &mut seen);

    s(dev, arc(Running, RunningP2p), rep);
    s(dev, arc(RunningP2p, Running), rep);
    let pre = s(dev, arc(Running, PreCopy), rep);
    if let Some(fd) = &pre {
        let info = dev.precopy_info(fd.as_fd());
        rep.check("PRE_COPY precopy_info", info.is_ok(), &info);
        let mut data = Vec::new();
        let n = ring.read_available(fd.as_fd(), &mut data);
        rep.check("PRE_COPY initial data read", n.is_ok(), &n);
    }
    s(dev, arc(PreCopy, PreCopyP2p), rep);
    s(dev, arc(PreCopyP2p, PreCopy), rep);
    s(dev, arc(PreCopy, Running), rep);
    drop(pre);
    s(dev, arc(Running, RunningP2p), rep);
    let pre_p2p = s(dev, arc(RunningP2p, PreCopyP2p), rep);
    s(dev, arc(PreCopyP2p, RunningP2p), rep);
    drop(pre_p2p);
    let pre_p2p = s(dev, arc(RunningP2p, PreCopyP2p), rep);
    let again = s(dev, arc(PreCopyP2p, StopCopy), rep);
    if let Some(fd) = again.as_ref().or(pre_p2p.as_ref()) {
        let mut data = Vec::new();
        let n = ring.read_available(fd.as_fd(), &mut data);
        rep.check("STOP_COPY read to end after PRE_COPY_P2P", n.is_ok(), &n);
    }
    s(dev, arc(StopCopy, Stop), rep);
    drop((pre_p2p, again));
    s(dev, arc(Stop, RunningP2p), rep);
    s(dev, arc(RunningP2p, Stop), rep);
    let sc = s(dev, arc(Stop, StopCopy), rep);
    let mut image = Vec::new();
    if let Some(fd) = &sc {
        let n = ring.read_available(fd.as_fd(), &mut image);
        rep.check("STOP_COPY (direct) read to end", n.is_ok(), &n);
    }
    s(dev, arc(StopCopy, Stop), rep);
    drop(sc);
    let res = s(dev, arc(Stop, Resuming), rep);
    if let Some(fd) = &res {
        let w = ring.write_all(fd.as_fd(), &image, 40);
        rep.check("RESUMING write own image", w.is_ok(), (image.len(), &w));
    }
    s(dev, arc(Resuming, Stop), rep);
    drop(res);
    s(dev, arc(Stop, RunningP2p), rep);
    s(dev, arc(RunningP2p, Running), rep);

    let legal = legal_arcs(dev.capabilities());
    let missing: Vec<String> = legal
        .iter()
        .filter(|a| !seen.contains(a))
        .map(ToString::to_string)
        .collect();
    rep.check(
        &format!(
            "every legal arc exercised ({} of {})",
            seen.len(),
            legal.len()
        ),
        missing.is_empty(),
        &missing,
    );
    Ok(())
}

/// The real transfer: bytes into the source UARTs, PRE_COPY then STOP_COPY on the source,
/// RESUMING on the destination, bytes read back out of the destination UARTs.
fn transfer(
    src: &mut VfioDevice,
    dst: &mut VfioDevice,
    ring: &mut Ring,
    rep: &mut Report,
) -> Result<(), DeviceError> {
    println!("== transfer {} -> {}", src.name(), dst.name());
    let msgs: [&[u8]; 2] = [b"vfmig:port0-ok!", b"vfmig:port1"];
    // Start from a clean FIFO on both sides.
    for bar in 0..2 {
        uart_drain(src, bar)?;
        uart_drain(dst, bar)?;
        uart_put(src, bar, msgs[bar as usize])?;
        println!(
            "BYTES put into source port {bar}: {:?}",
            String::from_utf8_lossy(msgs[bar as usize])
        );
    }
    let size = src.stop_copy_size()?;
    println!("MIG_DATA_SIZE (source) = {size}");

    let mut seen = Vec::new();
    let mut stream = Vec::new();
    let pre = src.set_state(PreCopy)?;
    let Some(pre) = pre else {
        rep.check("RUNNING -> PRE_COPY returns a data fd", false, "none");
        return Ok(());
    };
    let info0 = src.precopy_info(pre.as_fd())?;
    println!(
        "PRECOPY_INFO initial_bytes={} dirty_bytes={}",
        info0.initial_bytes, info0.dirty_bytes
    );
    let mut buf = vec![0u8; CHUNK];
    let first = ring.read(pre.as_fd(), &mut buf);
    if let Ok(n) = first {
        stream.extend_from_slice(&buf[..n]);
    }
    let info1 = src.precopy_info(pre.as_fd())?;
    println!(
        "PRECOPY_INFO initial_bytes={} dirty_bytes={}",
        info1.initial_bytes, info1.dirty_bytes
    );
    rep.check(
        "PRE_COPY read drains initial_bytes",
        matches!(first, Ok(n) if n as u64 == info0.initial_bytes) && info1.initial_bytes == 0,
        (&first, info1),
    );
    let drained = ring.read(pre.as_fd(), &mut buf);
    match &drained {
        Ok(0) => rep.quirk(
            "PRE_COPY read when drained returns 0, not ENOMSG",
            "treat 0 and ENOMSG both as 'no data for now'",
        ),
        Err(e) if e.raw_os_error() == Some(libc::ENOMSG) => {
            println!("PRE_COPY drained read gives ENOMSG as the uAPI says")
        }
        other => rep.check("PRE_COPY drained read is 0 or ENOMSG", false, show(other)),
    }
    for arc in [
        Transition {
            from: PreCopy,
            to: PreCopyP2p,
        },
        Transition {
            from: PreCopyP2p,
            to: StopCopy,
        },
    ] {
        if let Some(fd) = step(src, arc, rep, &mut seen) {
            rep.check("continuing arc returns no second stream", false, fd);
        }
    }
    let wrong = src.precopy_info(pre.as_fd());
    rep.check(
        "PRECOPY_INFO in STOP_COPY fails with EINVAL",
        wrong.as_ref().err().and_then(DeviceError::errno) == Some(libc::EINVAL),
        wrong.map_err(|e| e.to_string()),
    );
    let rest = ring.read_available(pre.as_fd(), &mut stream);
    rep.check("STOP_COPY read to end (0)", rest.is_ok(), &rest);
    rep.check(
        "stream length equals MIG_DATA_SIZE",
        stream.len() as u64 == size,
        (stream.len(), size),
    );
    step(
        src,
        Transition {
            from: StopCopy,
            to: Stop,
        },
        rep,
        &mut seen,
    );
    drop(pre);

    let res = dst.set_state(Resuming)?;
    let Some(res) = res else {
        rep.check("STOP -> RESUMING returns a data fd", false, "none");
        return Ok(());
    };
    // Different boundaries from the reads: 50 + the rest.
    let w = ring.write_all(res.as_fd(), &stream, 50);
    rep.check("RESUMING io_uring writes of the stream", w.is_ok(), &w);
    let resumed = dst.set_state(Running);
    rep.check(
        "destination RESUMING -> STOP -> RUNNING accepts the state",
        resumed.is_ok(),
        resumed.as_ref().map(|_| ()).map_err(|e| e.to_string()),
    );
    drop(res);
    for bar in 0..2u32 {
        let got = uart_drain(dst, bar)?;
        println!(
            "BYTES read back from destination port {bar}: {:?}",
            String::from_utf8_lossy(&got)
        );
        rep.check(
            &format!("destination port {bar} holds the source's bytes"),
            got == msgs[bar as usize],
            String::from_utf8_lossy(&got).into_owned(),
        );
    }
    src.set_state(Running)?;
    Ok(())
}

/// Behaviour at the edges: what the kernel driver does with bad use of the data fd.
fn edges(dev: &mut VfioDevice, ring: &mut Ring, rep: &mut Report) -> Result<(), DeviceError> {
    println!("== edges on {}", dev.name());
    let size = usize::try_from(dev.stop_copy_size()?).unwrap_or(0);

    // STOP_COPY -> PRE_COPY: the FSM refuses before any ioctl; the kernel refuses the raw SET.
    dev.set_state(Stop)?;
    let sc = dev.set_state(StopCopy)?;
    let fsm = dev.set_state(PreCopy);
    rep.check(
        "set_state(STOP_COPY -> PRE_COPY) refused by the FSM",
        matches!(fsm, Err(DeviceError::Fsm(_))),
        fsm.map(drop).map_err(|e| e.to_string()),
    );
    let raw = dev.set_single_state(PreCopy);
    rep.check(
        "raw SET STOP_COPY -> PRE_COPY gives EINVAL",
        raw.as_ref().err().and_then(io::Error::raw_os_error) == Some(libc::EINVAL),
        show(&raw.map(|f| f.is_some())),
    );
    if let Some(fd) = &sc {
        // SAFETY-free check of pread: std's read_at is pread(2).
        let file = std::fs::File::from(fd.try_clone().map_err(|source| DeviceError::Ioctl {
            device: name_of(dev),
            op: "dup(data_fd)",
            source,
        })?);
        let mut b = [0u8; 8];
        let p = std::os::unix::fs::FileExt::read_at(&file, &mut b, 0);
        rep.check(
            "pread on the data fd gives ESPIPE",
            p.as_ref().err().and_then(io::Error::raw_os_error) == Some(libc::ESPIPE),
            show(&p),
        );
        // epoll and poll
        // SAFETY: epoll_create1 takes no pointers.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep >= 0 {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: 0,
            };
            // SAFETY: `ev` is a live epoll_event for the call; both fds are open.
            let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) };
            let e = io::Error::last_os_error();
            if r < 0 && e.raw_os_error() == Some(libc::EPERM) {
                rep.quirk(
                    "epoll_ctl(ADD) on the data fd fails with EPERM",
                    "the driver has no .poll: never epoll it",
                );
            } else {
                println!(
                    "epoll_ctl(ADD) on the data fd: {}",
                    if r < 0 { e.to_string() } else { "ok".into() }
                );
            }
            // SAFETY: `ep` is our epoll fd, closed once.
            unsafe { libc::close(ep) };
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        println!("poll(data fd) = {n}, revents {:#x}", pfd.revents);
        let mut drain = Vec::new();
        ring.read_available(fd.as_fd(), &mut drain).ok();
        let after = ring.read(fd.as_fd(), &mut [0u8; 16]);
        rep.check(
            "STOP_COPY read after the end returns 0",
            matches!(after, Ok(0)),
            show(&after),
        );
    }
    dev.set_state(Stop)?;
    drop(sc);

    // Writing past the state size.
    let res = dev.set_state(Resuming)?;
    if let Some(fd) = &res {
        let big = vec![0u8; size + 1];
        let r = ring.write(fd.as_fd(), &big);
        if r.as_ref().err().and_then(io::Error::raw_os_error) == Some(libc::ENOMEM) {
            rep.quirk("RESUMING write past the state size", "ENOMEM");
        } else {
            println!("RESUMING write past the state size: {}", show(&r));
        }
        // A bad header is refused once the write crosses the header.
        let r = ring.write(fd.as_fd(), &vec![0u8; size.min(24)]);
        if r.as_ref().err().and_then(io::Error::raw_os_error) == Some(libc::EFAULT) {
            rep.quirk(
                "RESUMING write of a bad header",
                "EFAULT once the write crosses byte 24",
            );
        } else {
            println!("RESUMING write of a bad header: {}", show(&r));
        }
    }
    drop(res);
    dev.reset()?;
    let after_reset = dev.state();
    rep.check(
        "VFIO_DEVICE_RESET aborts RESUMING and returns to RUNNING",
        matches!(after_reset, Ok(Running)),
        after_reset.map_err(|e| e.to_string()),
    );

    // Too little data: RESUMING -> STOP fails.
    dev.set_state(Stop)?;
    let res = dev.set_state(Resuming)?;
    let short = dev.set_state(Stop);
    let errno = short.as_ref().err().and_then(DeviceError::errno);
    rep.check(
        "RESUMING -> STOP with no data fails",
        short.is_err(),
        short.as_ref().map(|_| ()).map_err(ToString::to_string),
    );
    if errno == Some(libc::EINVAL) {
        rep.quirk("RESUMING -> STOP with too little data", "EINVAL");
    }
    println!(
        "state after the failed RESUMING -> STOP: {:?}",
        dev.state().map_err(|e| e.to_string())
    );
    drop(res);
    dev.reset()?;
    rep.check(
        "reset after a failed resume",
        matches!(dev.state(), Ok(Running)),
        (),
    );

    // MMIO in STOP: the uAPI says a stopped device need not serve MMIO (mlx5 discards writes).
    dev.set_state(Stop)?;
    uart_drain(dev, 0)?;
    uart_put(dev, 0, b"S")?;
    let in_stop = uart_drain(dev, 0)?;
    if in_stop == b"S" {
        rep.quirk(
            "MMIO in STOP",
            "mtty still serves MMIO: a UART write in STOP is read back",
        );
    } else {
        println!("MMIO in STOP: UART write not read back ({in_stop:?})");
    }
    dev.set_state(Running)?;

    // DMA logging (mtty implements it as no-ops).
    if dev.optional_features().dma_logging {
        let range = IovaRange {
            iova: 0x10_0000,
            length: 0x10_0000,
        };
        let page = dev.dma_logging_start(&[range], 4096);
        rep.check(
            "DMA_LOGGING_START",
            page.is_ok(),
            page.as_ref().map_err(ToString::to_string),
        );
        let mut bitmap = vec![0u64; 4];
        let rp = dev.dma_logging_report(range.iova, range.length, 4096, &mut bitmap);
        match rp.as_ref().err().and_then(DeviceError::errno) {
            // The Debian kernel has no CONFIG_IOMMUFD_DRIVER, so iova_bitmap_alloc() is a stub.
            Some(libc::EOPNOTSUPP) => rep.quirk(
                "DMA_LOGGING_REPORT fails with EOPNOTSUPP",
                "kernel without IOMMUFD_DRIVER (iova_bitmap stub); START/STOP still work",
            ),
            _ => rep.check(
                "DMA_LOGGING_REPORT (mtty dirties nothing)",
                rp.is_ok() && bitmap.iter().all(|w| *w == 0),
                rp.map_err(|e| e.to_string()),
            ),
        }
        let bad = dev.dma_logging_start(&[range], 4096);
        rep.check(
            "second DMA_LOGGING_START refused before the ioctl",
            matches!(bad, Err(DeviceError::DmaLogging { .. })),
            bad.map_err(|e| e.to_string()),
        );
        let st = dev.dma_logging_stop();
        rep.check(
            "DMA_LOGGING_STOP",
            st.is_ok(),
            st.map_err(|e| e.to_string()),
        );
    } else {
        println!("DMA logging: not supported by {}", dev.name());
    }
    Ok(())
}

fn describe(dev: &mut VfioDevice) {
    let state = dev.state().map_err(|e| e.to_string());
    let size = dev.stop_copy_size().map_err(|e| e.to_string());
    println!(
        "DEVICE {}: caps {} ({:#x}), state {:?}, MIG_DATA_SIZE {:?}, optional {:?}, regions {}",
        dev.name(),
        dev.capabilities(),
        dev.capabilities().bits(),
        state,
        size,
        dev.optional_features(),
        dev.num_regions(),
    );
}

/// The contract suite, with the options a real driver needs: mtty returns 0 when PRE_COPY is
/// drained, stays in RESUMING after refusing a stream, and its MIG_DATA_SIZE is exact.
fn contract_suite(src: VfioDevice, dst: VfioDevice, rep: &mut Report) {
    println!(
        "== contract suite (vfmig_vfio::contract::run_all) on {} and {}",
        src.name(),
        dst.name()
    );
    let opts = ContractOptions {
        max_stream_bytes: MAX_STREAM as u64,
        read_chunk: CHUNK,
        allow_precopy_zero: true,
        exact_stop_copy_size: true,
        refusal_goes_to_error: false,
        ..ContractOptions::default()
    };
    // run_all calls each factory exactly once.
    let (mut src, mut dst) = (Some(src), Some(dst));
    let result = run_all(
        || src.take().expect("run_all asks for the source once"),
        || dst.take().expect("run_all asks for the destination once"),
        &opts,
    );
    match result {
        Ok(report) => {
            for arc in &report.arcs {
                println!("SUITE ARC {arc}: ok");
            }
            println!(
                "SUITE states visited: {}",
                report
                    .states
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for (check, why) in &report.skipped {
                println!("SUITE skipped {check}: needs {why}");
            }
            println!("SUITE STOP_COPY stream: {} bytes", report.stop_copy_bytes);
            rep.check(
                &format!("contract suite: {}", report.passed.join(", ")),
                true,
                report.caps.to_string(),
            );
        }
        Err(failure) => rep.check("contract suite", false, failure.to_string()),
    }
}

fn run(src_path: &str, dst_path: &str) -> Result<Report, DeviceError> {
    let mut rep = Report::default();
    contract_suite(
        VfioDevice::open(src_path)?,
        VfioDevice::open(dst_path)?,
        &mut rep,
    );
    // The suite owned (and closed) the devices; reopen them for the tour and the transfer.
    let mut src = VfioDevice::open(src_path)?;
    let mut dst = VfioDevice::open(dst_path)?;
    describe(&mut src);
    describe(&mut dst);
    let mut ring = Ring::new().map_err(|source| DeviceError::Open {
        path: "io_uring".into(),
        what: "io_uring_setup",
        source,
    })?;
    if src.capabilities() == MigrationCaps::ALL {
        arc_tour(&mut src, &mut ring, &mut rep)?;
    } else {
        println!("arc tour skipped: {} lacks some capability", src.name());
    }
    transfer(&mut src, &mut dst, &mut ring, &mut rep)?;
    edges(&mut dst, &mut ring, &mut rep)?;
    Ok(rep)
}

/// `uart-put` / `uart-get`.
fn uart_mode(mode: &str, path: &str, port: &str, text: &str) -> Result<bool, DeviceError> {
    let mut dev = VfioDevice::open(path)?;
    let bar = match port {
        "0" => 0,
        "1" => 1,
        _ => {
            println!("port must be 0 or 1, got {port}");
            return Ok(false);
        }
    };
    let state = dev.state()?;
    if mode == "uart-put" {
        uart_drain(&dev, bar)?;
        uart_put(&dev, bar, text.as_bytes())?;
        println!(
            "BYTES put into {} port {bar} (state {state}): {text:?}",
            dev.name()
        );
        return Ok(true);
    }
    if state != Running {
        dev.set_state(Running)?;
        println!("{}: {state} -> RUNNING before reading the UART", dev.name());
    }
    let got = uart_drain(&dev, bar)?;
    println!(
        "BYTES read back from {} port {bar}: {:?}",
        dev.name(),
        String::from_utf8_lossy(&got)
    );
    Ok(got == text.as_bytes())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    if let [_, mode @ ("uart-put" | "uart-get"), dev, port, text] = argv.as_slice() {
        return match uart_mode(mode, dev, port, text) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => {
                println!("RESULT {mode}: FAIL (bytes differ)");
                ExitCode::FAILURE
            }
            Err(e) => {
                println!("RESULT {mode}: FAIL ({e})");
                ExitCode::FAILURE
            }
        };
    }
    let [_, src, dst] = argv.as_slice() else {
        eprintln!(
            "usage: contract_vfio <source device> <destination device>\n       \
             contract_vfio uart-put|uart-get <device> <port> <text>"
        );
        return ExitCode::from(2);
    };
    match run(src, dst) {
        Ok(rep) if rep.failed == 0 => {
            println!("RESULT contract_vfio: PASS ({} checks)", rep.checks);
            ExitCode::SUCCESS
        }
        Ok(rep) => {
            println!(
                "RESULT contract_vfio: FAIL ({} of {} checks failed)",
                rep.failed, rep.checks
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("RESULT contract_vfio: FAIL ({e})");
            ExitCode::FAILURE
        }
    }
}
