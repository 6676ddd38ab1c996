//! Codec throughput on real device content, per content profile and chunk size: the rungs that
//! vfmig's adaptive controller chooses between (LZ4 block, zstd levels 1 and 3), called the way
//! `pipeline/src/codec.rs` calls them (`lz4_flex::block::compress_into`, a reused
//! `zstd::bulk::Compressor`), plus zstd-1 decompression.
//!
//! The input is the first 8 MiB of an emulated device's STOP_COPY stream, read through its data
//! fd, so it is exactly what the pipeline's codec workers see (device record headers included).
//! The pipeline's own `Encoder` (zero elision and the entropy probe before these calls) is
//! crate-private; its effect shows in the end-to-end bench and in `vfmig-bench`.

use std::fs::File;
use std::io::Read;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vfmig_benches::devices;
use vfmig_vfio::{DeviceState, MigrationDevice};

const INPUT: usize = 8 << 20;
/// 64 KiB, 256 KiB, and 896 KiB (the pipeline's chunk for its default 1 MiB pool slot).
const CHUNKS: [usize; 3] = [64 << 10, 256 << 10, 896 << 10];

fn content(profile: &str) -> Vec<u8> {
    let mut dev = devices::source(INPUT as u64 * 2, profile).expect("device");
    let fd = dev
        .set_state(DeviceState::StopCopy)
        .expect("STOP_COPY")
        .expect("data fd");
    let mut f = File::from(fd);
    let mut buf = vec![0u8; INPUT];
    f.read_exact(&mut buf).expect("read device state");
    buf
}

fn codec(c: &mut Criterion) {
    for profile in ["random", "mixed", "zero", "text"] {
        let input = content(profile);
        let mut g = c.benchmark_group(format!("codec_{profile}"));
        g.throughput(Throughput::Bytes(INPUT as u64));
        g.sample_size(10);
        g.measurement_time(Duration::from_millis(1200));
        g.warm_up_time(Duration::from_millis(300));
        let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(CHUNKS[2]) + 64];
        for chunk in CHUNKS {
            let kib = chunk >> 10;
            g.bench_function(BenchmarkId::new("lz4", format!("{kib}KiB")), |b| {
                b.iter(|| {
                    let mut wire = 0usize;
                    for c in input.chunks(chunk) {
                        wire += lz4_flex::block::compress_into(c, &mut out).expect("lz4");
                    }
                    wire
                })
            });
            for level in [1, 3] {
                let mut z = zstd::bulk::Compressor::new(level).expect("zstd");
                g.bench_function(
                    BenchmarkId::new(format!("zstd{level}"), format!("{kib}KiB")),
                    |b| {
                        b.iter(|| {
                            let mut wire = 0usize;
                            for c in input.chunks(chunk) {
                                wire += z.compress_to_buffer(c, out.as_mut_slice()).expect("zstd");
                            }
                            wire
                        })
                    },
                );
            }
        }
        // Decompression of zstd-1 frames at the pipeline's chunk size.
        let chunk = CHUNKS[2];
        let mut z = zstd::bulk::Compressor::new(1).expect("zstd");
        let frames: Vec<Vec<u8>> = input
            .chunks(chunk)
            .map(|c| z.compress(c).expect("zstd"))
            .collect();
        let mut d = zstd::bulk::Decompressor::new().expect("zstd");
        let mut raw = vec![0u8; chunk];
        g.bench_function(
            BenchmarkId::new("zstd1_decompress", format!("{}KiB", chunk >> 10)),
            |b| {
                b.iter(|| {
                    let mut n = 0usize;
                    for f in &frames {
                        n += d
                            .decompress_to_buffer(f, raw.as_mut_slice())
                            .expect("zstd decompress");
                    }
                    n
                })
            },
        );
        g.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
