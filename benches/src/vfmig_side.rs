//! One side of a vfmig migration with default settings (adaptive compression, the default
//! number of connections and codec workers), as the harness runs it in its own process.
//!
//! The only non-default setting is authentication: the transport refuses unauthenticated
//! non-loopback peers, so both sides use a fixed benchmark PSK (its cost is the handshake only).

use std::net::SocketAddr;
use std::time::Duration;

use vfmig_pipeline::{
    DestinationOptions, DestinationSession, PipelineError, Report, SourceOptions, SourceSession,
    Stage,
};
use vfmig_transport::{AuthConfig, Listener, SessionConfig, TransportError};
use vfmig_vfio::emulated::DataFdBackend;

use crate::devices::{self, DevicesError};
use crate::harness::SideResult;

/// The benchmark PSK (not a secret: the links are private namespaces or loopback).
const BENCH_PSK: &[u8] = b"vfmig-bench pre-shared key, not a secret";

/// Why a vfmig side failed.
#[derive(Debug, thiserror::Error)]
pub enum VfmigSideError {
    /// The device could not be made.
    #[error(transparent)]
    Device(#[from] DevicesError),
    /// Binding the listener failed.
    #[error(transparent)]
    Bind(#[from] TransportError),
    /// The migration failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

/// Default transport settings plus the benchmark PSK.
pub fn session_config() -> SessionConfig {
    SessionConfig {
        auth: AuthConfig::Psk(BENCH_PSK.to_vec()),
        ..SessionConfig::default()
    }
}

fn result(r: &Report, secs: Duration) -> SideResult {
    SideResult {
        raw_bytes: r.raw_bytes,
        wire_bytes: r.wire_bytes,
        secs: secs.as_secs_f64(),
        peak_rss: 0,
        codec: r.codec.clone(),
        limiting: match r.limiting_stage {
            Stage::DataFd => "data-fd",
            Stage::Codec => "codec",
            Stage::Network => "network",
        }
        .to_owned(),
    }
}

/// Source: migrates one `size`-byte `profile` device to `addr`. `secs` is the pipeline's downtime
/// (first device leaving RUNNING to the last `DevicePrepared`).
pub fn send(addr: SocketAddr, size: u64, profile: &str) -> Result<SideResult, VfmigSideError> {
    send_with(addr, size, profile, DataFdBackend::Fuse)
}

/// [`send`] from a device with the given kind of data fd.
pub fn send_with(
    addr: SocketAddr,
    size: u64,
    profile: &str,
    data_fd: DataFdBackend,
) -> Result<SideResult, VfmigSideError> {
    let dev = devices::source_with(size, profile, data_fd)?;
    let opts = SourceOptions {
        session: session_config(),
        ..SourceOptions::default()
    };
    let mut s = SourceSession::new(vec![dev], opts);
    let r = s.run(addr)?;
    Ok(result(&r, r.downtime.unwrap_or(r.elapsed)))
}

/// Destination: binds `addr`, calls `listening` once bound, accepts one source and resumes its
/// device. `secs` is the session's wall time.
pub fn recv(
    addr: SocketAddr,
    size: u64,
    listening: impl FnOnce(),
) -> Result<SideResult, VfmigSideError> {
    recv_with(addr, size, "mixed", DataFdBackend::Fuse, listening)
}

/// [`recv`] into a device with the given kind of data fd, for a source of `profile` (part of the
/// device identity the handshake compares).
pub fn recv_with(
    addr: SocketAddr,
    size: u64,
    profile: &str,
    data_fd: DataFdBackend,
    listening: impl FnOnce(),
) -> Result<SideResult, VfmigSideError> {
    let dev = devices::destination_with(size, profile, data_fd)?;
    let listener = Listener::bind(addr)?;
    listening();
    let opts = DestinationOptions {
        session: session_config(),
        ..DestinationOptions::default()
    };
    let mut s = DestinationSession::new(vec![dev], opts);
    let r = s.run(&listener)?;
    Ok(result(&r, r.elapsed))
}
