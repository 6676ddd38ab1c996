//! # vfmig-transport: sessions of N TCP connections between a source and a destination
//!
//! Owns: connecting, authenticating (PSK handshake from `vfmig-wire`, optional TLS 1.3), striping
//! frames over connections, reordering on receive, keepalive and liveness, and the registered
//! buffer pool shared with the pipeline's io_uring data-fd reader and writer.
//! Never touches: devices or compression, or the wire layout (that is `vfmig-wire`).
//!
//! Data in: on the source, [`FrameHeader`](vfmig_wire::FrameHeader)s with payloads in
//! [`PoolBuf`]s from [`SendSession::pool`]; on the destination, bytes from the network.
//! Data out: on the destination, verified [`Frame`]s in per-device order from
//! [`RecvSession::recv`]; on the source, the destination's control frames.
//!
//! Plain TCP runs on io_uring: one ring thread per session owns all N connections, sends payloads
//! straight from pool buffers (plain `Send`; `SendZc` from the registered buffer only when
//! [`SessionConfig::zerocopy_min`] is lowered, off by default) and receives payloads straight into
//! pool buffers (`ring`). If the pool
//! cannot be pinned (`RLIMIT_MEMLOCK` without `CAP_IPC_LOCK`), the ring runs without registered
//! buffers and only fixed-buffer zero-copy is lost. TLS connections
//! need a userspace copy for encryption anyway, so they run blocking rustls I/O on threads of
//! their own that feed the same engine through a local socket pair (`tls`); the API is the same.
//!
//! ```no_run
//! use std::time::Duration;
//! use vfmig_transport::{Listener, SendSession, SessionConfig};
//! use vfmig_wire::{Codec, FrameHeader, FrameKind};
//!
//! let cfg = SessionConfig::default();
//! let listener = Listener::bind("127.0.0.1:0".parse().unwrap())?;
//! let addr = listener.local_addr();
//! let dst = std::thread::spawn(move || listener.accept(&SessionConfig::default()));
//! let devices = vec![vfmig_wire::handshake::DeviceDesc {
//!     name: "gpu0".into(), caps: 0, state_size_hint: 0, decl: Default::default(),
//! }];
//! let src = SendSession::connect(addr, &cfg, devices)?;
//! let mut buf = src.pool().acquire(Duration::from_secs(1))?;
//! buf.spare_mut()[..4].copy_from_slice(b"data");
//! buf.set_len(4);
//! let h = FrameHeader { kind: FrameKind::StopCopyData, codec: Codec::Raw, device: 0, seq: 0,
//!     raw_len: 4, wire_len: 0, arg: 0, crc: 0 };
//! src.send(h, Some(buf))?;
//! let dst = dst.join().unwrap()?;
//! let frame = dst.recv(Duration::from_secs(5))?;
//! assert_eq!(frame.payload.unwrap().as_slice(), b"data");
//! src.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(unsafe_code)]

mod accept;
pub mod config;
pub mod error;
mod handshake_io;
mod liveness;
// `unsafe` lives only here and in `uring`: the buffer pool's mapping.
#[allow(unsafe_code)]
pub mod pool;
mod reorder;
mod ring;
mod session;
pub mod stats;
mod tls;
// The single io_uring ownership type (used by `ring` and by the pipeline's data-fd ring): every
// io_uring submission of the project is pushed there.
#[allow(unsafe_code)]
pub mod uring;

pub use accept::{HANDSHAKE_TIMEOUT, MAX_PENDING_HANDSHAKES};
pub use config::{check_peer_policy, AuthConfig, SessionConfig, TlsConfig};
pub use error::{FramePart, Limit, TransportError};
pub use pool::{BufPool, PoolBuf, PoolError};
pub use session::{Frame, Listener, RecvSession, SendSession};
pub use stats::TransportStats;
pub use vfmig_wire::handshake::{Agreed, DeviceDesc};
pub use vfmig_wire::AbortReason;
