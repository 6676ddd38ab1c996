//! Round trips over real loopback TCP and real io_uring.
#![allow(clippy::cast_possible_truncation)] // test data sizes are small

mod common;

use common::*;
use vfmig_transport::SendSession;

/// Sends `frames` frames per device over `streams` connections (devices interleaved, lengths
/// varying so that connections run at different speeds) and checks that the destination gets
/// every frame verified, complete and in per-device order.
fn round_trip(streams: usize, ndev: usize, frames: u64) -> vfmig_transport::TransportStats {
    round_trip_with(cfg(streams), ndev, frames)
}

fn round_trip_with(
    c: vfmig_transport::SessionConfig,
    ndev: usize,
    frames: u64,
) -> vfmig_transport::TransportStats {
    let streams = c.streams;
    let (l, addr) = listen();
    let dst = accept_in_thread(l, c.clone());
    let src = SendSession::connect(addr, &c, devices(ndev)).unwrap();
    let pool = src.pool().clone();
    let dst = dst.join().unwrap().unwrap();
    assert_eq!(src.agreed().streams as usize, streams);
    assert_eq!(dst.agreed().devices.len(), ndev);
    assert_eq!(dst.agreed().session_id, src.agreed().session_id);

    let receiver = receive_in_order(dst, ndev);
    let mut n = 0usize;
    for seq in 0..frames {
        for d in 0..ndev {
            // 1 byte .. 64 KiB, irregular.
            let len = 1 + (n * 7919) % (64 << 10);
            send_data(&src, d as u16, seq, len);
            n += 1;
        }
    }
    let stats = src.close().unwrap();
    let next = receiver.join().unwrap();
    assert_eq!(next.iter().sum::<u64>(), frames * ndev as u64);
    assert!(next.iter().all(|&s| s == frames));
    assert!(stats.frames_sent >= frames * ndev as u64);
    // Every buffer came back from the ring (completions and zero-copy notifications).
    assert_eq!(pool.free(), pool.slots());
    stats
}

#[test]
fn frames_round_trip_in_order_over_one_connection() {
    round_trip(1, 2, 300);
}

#[test]
fn frames_round_trip_in_order_over_four_connections() {
    round_trip(4, 3, 300);
}

#[test]
fn zero_copy_sends_round_trip_and_return_every_buffer_after_notification() {
    let c = vfmig_transport::SessionConfig {
        zerocopy_min: 4096,
        ..cfg(2)
    };
    let stats = round_trip_with(c, 1, 200);
    assert!(stats.zerocopy_sends > 0);
}
