//! End-to-end migration of an emulated device over loopback TCP, in one process: vfmig's
//! pipeline (default options: adaptive compression, default connections) against the QEMU-style
//! reference loop, for incompressible, mixed and mostly-zero state. Every iteration migrates a
//! fresh device pair and the destination device validates the stream (RESUMING -> STOP), so a
//! wrong transfer fails the bench instead of producing a number.
//!
//! The time measured is the downtime a VMM sees: from the source leaving RUNNING (towards
//! STOP_COPY) to the destination's acceptance (vfmig: `Report::downtime`; reference: the same
//! span, timed by the loop). Connection setup before it and session teardown after it are not
//! counted, for either implementation.
//!
//! Each pair is measured with the emulated device's FUSE data fd (ids `reference`, `vfmig`, as
//! before) and with its memory-speed pipe data fd (ids `reference-mem`, `vfmig-mem`).
//!
//! For link-limited scenarios and separate processes, use `vfmig-bench run` (docs/BENCHMARKS.md).

use std::thread;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vfmig_benches::devices;
use vfmig_benches::reference::{run_loopback, RefConfig};
use vfmig_benches::vfmig_side::session_config;
use vfmig_pipeline::{DestinationOptions, DestinationSession, SourceOptions, SourceSession};
use vfmig_transport::Listener;
use vfmig_vfio::emulated::{DataFdBackend, EmulatedDevice};

const SIZE: u64 = 64 << 20;

fn pair(profile: &str, data_fd: DataFdBackend) -> (EmulatedDevice, EmulatedDevice) {
    (
        devices::source_with(SIZE, profile, data_fd).expect("source device"),
        // Same profile: it is part of the identity the vfmig handshake compares.
        devices::destination_with(SIZE, profile, data_fd).expect("destination device"),
    )
}

fn migrate_vfmig(src: EmulatedDevice, dst: EmulatedDevice) -> Duration {
    let listener = Listener::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = listener.local_addr();
    let receiver = thread::spawn(move || {
        let opts = DestinationOptions {
            session: session_config(),
            ..DestinationOptions::default()
        };
        DestinationSession::new(vec![dst], opts).run(&listener)
    });
    let opts = SourceOptions {
        session: session_config(),
        ..SourceOptions::default()
    };
    let report = SourceSession::new(vec![src], opts)
        .run(addr)
        .expect("vfmig source");
    let dst_report = receiver
        .join()
        .unwrap_or_else(|_| panic!("destination thread panicked"))
        .expect("vfmig destination");
    assert_eq!(report.raw_bytes, dst_report.raw_bytes);
    report
        .downtime
        .expect("a successful run reports its downtime")
}

fn migrate_reference(mut src: EmulatedDevice, mut dst: EmulatedDevice) -> Duration {
    let (s, d) = run_loopback(&mut src, &mut dst, &RefConfig::default()).expect("reference loop");
    assert_eq!(s.bytes, d.bytes);
    s.elapsed
}

/// Sums the downtime of `iters` migrations of fresh device pairs.
fn downtime_of(
    iters: u64,
    profile: &str,
    data_fd: DataFdBackend,
    migrate: fn(EmulatedDevice, EmulatedDevice) -> Duration,
) -> Duration {
    (0..iters)
        .map(|_| {
            let (s, d) = pair(profile, data_fd);
            migrate(s, d)
        })
        .sum()
}

fn e2e(c: &mut Criterion) {
    let mut g = c.benchmark_group("e2e_loopback_64MiB");
    g.throughput(Throughput::Bytes(SIZE));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_millis(500));
    for (data_fd, suffix) in [(DataFdBackend::Fuse, ""), (DataFdBackend::Mem, "-mem")] {
        for profile in ["random", "mixed", "zero"] {
            g.bench_function(
                BenchmarkId::new(format!("reference{suffix}"), profile),
                |b| b.iter_custom(|iters| downtime_of(iters, profile, data_fd, migrate_reference)),
            );
            g.bench_function(BenchmarkId::new(format!("vfmig{suffix}"), profile), |b| {
                b.iter_custom(|iters| downtime_of(iters, profile, data_fd, migrate_vfmig))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, e2e);
criterion_main!(benches);
