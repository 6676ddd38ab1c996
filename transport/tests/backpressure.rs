//! A receiver whose pool is empty because the consumer holds every buffer: the engine parks the
//! next frame and is woken by the buffer's return itself (no polling), so with keepalives and
//! timeouts far away the stream still moves as fast as the consumer lets buffers go.
#![allow(clippy::cast_possible_truncation)] // test data sizes are small

mod common;

use std::time::Duration;

use common::*;
use vfmig_transport::{SessionConfig, TransportError};

const FRAMES: u64 = 40;
const LEN: usize = 32 << 10;

fn slow_clock() -> SessionConfig {
    SessionConfig {
        pool_slots: 4,
        // Nothing but a buffer's return can wake the receiving engine in time.
        keepalive: Duration::from_secs(60),
        timeout: Duration::from_secs(120),
        ..cfg(1)
    }
}

#[test]
fn a_consumer_returning_held_buffers_wakes_the_receiving_engine() {
    let (l, addr) = listen();
    let dst = accept_in_thread(l, slow_clock());
    let src = vfmig_transport::SendSession::connect(addr, &slow_clock(), devices(1)).unwrap();
    let dst = dst.join().unwrap().unwrap();
    let rx = std::thread::spawn(move || {
        let mut held = Vec::new();
        let mut next = 0u64;
        loop {
            // Far below the keepalive and timeout: only a wake-up on return gets a frame here.
            match dst.recv(Duration::from_secs(20)) {
                Ok(f) => {
                    assert_eq!(f.header.seq, next);
                    let p = f.payload.unwrap();
                    assert_eq!(p.as_slice(), &pattern(0, next, LEN)[..]);
                    next += 1;
                    held.push(p);
                    if held.len() == 4 {
                        // Every buffer of the pool is out; give them all back at once.
                        held.clear();
                    }
                }
                Err(TransportError::Closed) => return next,
                Err(e) => panic!("frame {next}: {e}"),
            }
        }
    });
    for seq in 0..FRAMES {
        send_data(&src, 0, seq, LEN);
    }
    src.close().unwrap();
    assert_eq!(rx.join().unwrap(), FRAMES);
}
