//! The stream digest's per-chunk hash (XXH3-128 of each chunk's raw bytes, once per byte on each
//! side): twox-hash, which the pipeline uses (AVX2 picked at run time where the CPU has it),
//! against xxhash-rust (built for the compile-time target features: SSE2 on x86-64), which it
//! used before. Both give the same values (`pipeline/src/digest.rs` tests that).
//!
//! `cargo bench -p vfmig-benches --bench chunk_hash`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// The pipeline's chunk for its default 1 MiB pool slot (a multiple of 8, as `Rng::fill` needs).
const CHUNK: usize = 896 << 10;

fn chunk_hash(c: &mut Criterion) {
    let mut data = vec![0u8; CHUNK];
    vfmig_benches::cli_e2e::Rng::new(0x9e37_79b9_7f4a_7c15).fill(&mut data);
    assert_eq!(
        twox_hash::XxHash3_128::oneshot(&data),
        xxhash_rust::xxh3::xxh3_128(&data)
    );
    let mut g = c.benchmark_group("chunk_hash");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function(BenchmarkId::new("twox-hash (runtime SIMD)", CHUNK), |b| {
        b.iter(|| twox_hash::XxHash3_128::oneshot(std::hint::black_box(&data)))
    });
    g.bench_function(
        BenchmarkId::new("xxhash-rust (compile-time SIMD)", CHUNK),
        |b| b.iter(|| xxhash_rust::xxh3::xxh3_128(std::hint::black_box(&data))),
    );
    g.finish();
}

criterion_group!(benches, chunk_hash);
criterion_main!(benches);
