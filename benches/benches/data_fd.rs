//! Reading a STOP_COPY data fd: the way vfmig's reader does it (io_uring `ReadFixed` at offset -1
//! into a registered pool slot, one read in flight per fd, 896 KiB chunks: `chunk_len` of the
//! default 1 MiB slot) against a plain synchronous `read()` loop (QEMU: 1 MiB buffer).
//!
//! The pipeline's reader is crate-private, so this bench drives the same kernel path with a
//! minimal ring of its own: it isolates what io_uring costs or saves on the data fd itself. The
//! pipeline's real gain, reading while other threads compress and send, shows in `e2e`.
//! Every iteration reads a fresh 64 MiB emulated device (random content) to the end (read 0).
//!
//! Both data fds of the emulated device are measured: `fuse` (the default: a FUSE file, one
//! kernel round trip per request; ids without prefix, as before) and `mem` (a pipe a device thread
//! fills: ids prefixed `mem_`). The `*_async` ids read 1 MiB with `IOSQE_ASYNC`, as the pipeline's
//! reader does; `1MiB-zero` does so on a device of zero content, which costs little to generate,
//! so that it shows the cost of the fd itself.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use io_uring::{opcode, squeue, types, IoUring};
use vfmig_benches::devices;
use vfmig_transport::BufPool;
use vfmig_vfio::emulated::{DataFdBackend, EmulatedDevice};
use vfmig_vfio::{DeviceState, MigrationDevice};

const SIZE: u64 = 64 << 20;
const SLOT_U32: u32 = 1 << 20;
const SLOT: usize = SLOT_U32 as usize;
const URING_CHUNK: u32 = SLOT_U32 - SLOT_U32 / 8;

fn stop_copy(profile: &str, data_fd: DataFdBackend) -> (EmulatedDevice, File) {
    let mut dev = devices::source_with(SIZE, profile, data_fd).expect("device");
    let fd = dev
        .set_state(DeviceState::StopCopy)
        .expect("STOP_COPY")
        .expect("data fd");
    (dev, File::from(fd))
}

/// QEMU's loop: `read()` into one buffer until 0.
fn read_loop(f: &mut File, buf: &mut [u8]) -> u64 {
    let mut total = 0u64;
    loop {
        let n = f.read(buf).expect("read data fd");
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

/// A ring with one pool registered, reading one chunk at a time.
struct UringReader {
    ring: IoUring,
    pool: BufPool,
}

impl UringReader {
    fn new() -> UringReader {
        let pool = BufPool::new(2, SLOT).expect("pool");
        let ring = IoUring::new(8).expect("io_uring");
        // SAFETY: the iovecs describe `pool`'s mapping; the pool is a field of the same struct
        // declared after `ring`, so it is dropped (unmapped) only after the ring that registered
        // it.
        unsafe { ring.submitter().register_buffers(&pool.iovecs()) }.expect("register buffers");
        UringReader { ring, pool }
    }

    fn read_all(&mut self, f: &File, chunk: u32, async_flag: bool) -> u64 {
        let mut buf = self.pool.acquire(Duration::from_secs(1)).expect("slot");
        let mut total = 0u64;
        loop {
            let sqe = opcode::ReadFixed::new(
                types::Fd(f.as_raw_fd()),
                buf.as_mut_ptr(),
                chunk.min(SLOT_U32),
                buf.index(),
            )
            .offset(u64::MAX)
            .build()
            .flags(if async_flag {
                squeue::Flags::ASYNC
            } else {
                squeue::Flags::empty()
            })
            .user_data(1);
            // SAFETY: the span is the first `chunk` (at most SLOT) bytes of the registered slot `buf` owns;
            // `buf` is not touched or dropped until this read's completion is reaped just below
            // (submit_and_wait(1) then pop), and it is the only operation in flight.
            unsafe { self.ring.submission().push(&sqe) }.expect("submission queue full");
            self.ring.submit_and_wait(1).expect("io_uring submit");
            let cqe = self.ring.completion().next().expect("completion");
            let n = cqe.result();
            assert!(n >= 0, "ReadFixed on the data fd failed: errno {}", -n);
            if n == 0 {
                return total;
            }
            total += u64::from(n.unsigned_abs());
        }
    }
}

fn data_fd(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_fd_read_64MiB");
    g.throughput(Throughput::Bytes(SIZE));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_millis(300));
    let profile = "random";
    let mut buf = vec![0u8; SLOT];
    let chunk = URING_CHUNK as usize;
    let mut uring = UringReader::new();
    for data_fd in [DataFdBackend::Fuse, DataFdBackend::Mem] {
        let pre = match data_fd {
            DataFdBackend::Fuse => "",
            DataFdBackend::Mem => "mem_",
        };
        g.bench_function(BenchmarkId::new(format!("{pre}read_loop"), "1MiB"), |b| {
            b.iter_batched(
                || stop_copy(profile, data_fd),
                |(_dev, mut f)| read_loop(&mut f, &mut buf),
                BatchSize::PerIteration,
            )
        });
        g.bench_function(BenchmarkId::new(format!("{pre}read_loop"), "896KiB"), |b| {
            b.iter_batched(
                || stop_copy(profile, data_fd),
                |(_dev, mut f)| read_loop(&mut f, &mut buf[..chunk]),
                BatchSize::PerIteration,
            )
        });
        g.bench_function(
            BenchmarkId::new(format!("{pre}io_uring_read_fixed"), "896KiB"),
            |b| {
                b.iter_batched(
                    || stop_copy(profile, data_fd),
                    |(_dev, f)| uring.read_all(&f, URING_CHUNK, false),
                    BatchSize::PerIteration,
                )
            },
        );
        g.bench_function(
            BenchmarkId::new(format!("{pre}io_uring_read_fixed_async"), "1MiB"),
            |b| {
                b.iter_batched(
                    || stop_copy(profile, data_fd),
                    |(_dev, f)| uring.read_all(&f, SLOT_U32, true),
                    BatchSize::PerIteration,
                )
            },
        );
        // Zero content: generating it costs little, so this id shows the fd's own cost.
        g.bench_function(
            BenchmarkId::new(format!("{pre}io_uring_read_fixed_async"), "1MiB-zero"),
            |b| {
                b.iter_batched(
                    || stop_copy("zero", data_fd),
                    |(_dev, f)| uring.read_all(&f, SLOT_U32, true),
                    BatchSize::PerIteration,
                )
            },
        );
    }
    g.finish();
}

criterion_group!(benches, data_fd);
criterion_main!(benches);
