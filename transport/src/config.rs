//! Session configuration and the connection policy (who may connect without authentication).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::error::TransportError;
use vfmig_wire::declare::DeviceDecl;

/// Most TCP connections in one session.
pub const MAX_STREAMS: usize = 16;
/// Most devices in one session.
pub const MAX_DEVICES: usize = 64;
/// Largest reorder window / outstanding bytes a session may agree on.
pub const MAX_WINDOW_BYTES: u64 = 1 << 30;
/// Longest abort detail sent or accepted, in bytes.
pub const MAX_ABORT_DETAIL: usize = 1024;

/// How the two sides prove who they are.
#[derive(Clone, Default)]
pub enum AuthConfig {
    /// No authentication (allowed from loopback, over TLS with certificates, or with `insecure`).
    #[default]
    None,
    /// A pre-shared key: mutual HMAC-SHA-256 challenge-response during the handshake.
    Psk(Vec<u8>),
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthConfig::None => f.write_str("None"),
            // Never print the key.
            AuthConfig::Psk(k) => write!(f, "Psk(<{} bytes>)", k.len()),
        }
    }
}

/// TLS 1.3 with certificates (rustls, `ring` provider). Both sides present a certificate and
/// verify the peer's against `ca`; the destination checks the source's certificate only if
/// `require_client_cert` is set.
///
/// TLS connections do not use the io_uring zero-copy path: encryption needs a userspace copy
/// anyway, so each TLS connection is served by blocking rustls I/O on its own threads, feeding the
/// same session engine through a local socket pair (see `tls.rs`). The API is the same.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    /// Our certificate chain (PEM).
    pub cert: PathBuf,
    /// Our private key (PEM, PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificate(s) that sign the peer's certificate (PEM).
    pub ca: PathBuf,
    /// Source side: the name to verify in the destination's certificate. Default: the IP
    /// address connected to.
    pub server_name: Option<String>,
    /// Destination side: refuse sources without a certificate signed by `ca`.
    pub require_client_cert: bool,
}

/// Everything a session needs to know besides the peer's address.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// TCP connections per session (1..=[`MAX_STREAMS`]). The source offers this many; the
    /// destination accepts up to [`MAX_STREAMS`].
    ///
    /// Default 1, by measurement (`cargo bench -p vfmig-transport --bench cpu_per_gib`, loopback,
    /// 1 MiB frames, both sides in one process on 2 shared cores): 1, 2 and 4 connections cost
    /// 0.38, 0.42 and 0.44 CPU-seconds per GiB and moved 2.26, 1.63 and 1.15 GiB/s (best of
    /// three). Extra connections only add sockets and completions for the same CPUs. Use more
    /// where a single TCP flow is capped: per-flow rate limits, ECMP/LAG hashing, or a NIC that
    /// spreads flows over receive queues and cores.
    pub streams: usize,
    /// Authentication.
    pub auth: AuthConfig,
    /// TLS, if the wire must be encrypted.
    pub tls: Option<TlsConfig>,
    /// Allow unauthenticated, unencrypted connections with non-loopback peers.
    pub insecure: bool,
    /// Liveness: a peer silent for this long is declared dead; also the bound on every blocking
    /// wait inside the transport (send backpressure, handshake, flush on close).
    pub timeout: Duration,
    /// Send a keepalive on a connection that sent nothing for this long (must be below `timeout`).
    pub keepalive: Duration,
    /// Buffers in this side's [`crate::BufPool`] (default 40 x 1 MiB). The pool hands out the
    /// slot returned last first, so only the slots a stream keeps in flight are ever touched;
    /// the bound is what a side may hold when its consumer falls behind (the destination's
    /// reorder window plus the codec workers' input and output slots).
    pub pool_slots: usize,
    /// Bytes per buffer (a multiple of 4096); also the largest payload this side accepts.
    pub slot_size: usize,
    /// Reorder window (destination) and most unacknowledged bytes queued in the ring (source).
    /// Default 16 MiB: above the bandwidth-delay product of a 10 Gbit/s link at 10 ms RTT
    /// (12.5 MB), and small enough that a side's peak memory stays under 64 MiB.
    pub window_bytes: u64,
    /// Bound on establishing each TCP connection.
    pub connect_timeout: Duration,
    /// Destination: how long [`crate::Listener::accept`] waits for a source to connect.
    pub accept_timeout: Duration,
    /// Payloads of at least this many bytes go out with `SendZc` from the registered buffer;
    /// smaller ones with plain `Send`. `usize::MAX` (the default) turns zero-copy off: on
    /// loopback the kernel copies zero-copy sends anyway and `Send` measured 1.3-2.6x faster
    /// (see `ring/send.rs`); on a real NIC try `64 << 10`.
    pub zerocopy_min: usize,
    /// Destination: its declaration of each of its devices, in device-index order, sent in the
    /// handshake's `ServerAccept` and compared with the source's (docs/PROTOCOL.md, "Device
    /// declarations"): a pair that cannot work fails the handshake on both sides, before any
    /// device leaves RUNNING. `None` (the default) declares nothing and compares nothing.
    pub declared_devices: Option<Vec<DeviceDecl>>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            streams: 1,
            auth: AuthConfig::None,
            tls: None,
            insecure: false,
            timeout: Duration::from_secs(30),
            keepalive: Duration::from_secs(5),
            pool_slots: 40,
            slot_size: 1 << 20,
            window_bytes: 16 << 20,
            connect_timeout: Duration::from_secs(10),
            accept_timeout: Duration::from_secs(600),
            zerocopy_min: usize::MAX,
            declared_devices: None,
        }
    }
}

impl SessionConfig {
    /// Checks the settings against the hard limits.
    pub fn validate(&self) -> Result<(), TransportError> {
        let bad = |what, value: u64| Err(TransportError::Config { what, value });
        if self.streams == 0 || self.streams > MAX_STREAMS {
            return bad("streams", self.streams as u64);
        }
        if self.timeout.is_zero() {
            return bad("timeout", 0);
        }
        if self.keepalive.is_zero() || self.keepalive >= self.timeout {
            return bad(
                "keepalive",
                u64::try_from(self.keepalive.as_millis()).unwrap_or(u64::MAX),
            );
        }
        if self.slot_size == 0 || self.slot_size % 4096 != 0 {
            return bad("slot_size", self.slot_size as u64);
        }
        if self.pool_slots < 2 {
            return bad("pool_slots", self.pool_slots as u64);
        }
        if self.window_bytes == 0 || self.window_bytes > MAX_WINDOW_BYTES {
            return bad("window_bytes", self.window_bytes);
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout", 0);
        }
        Ok(())
    }

    /// Largest payload this side will send or accept: the slot size, capped by the protocol.
    pub fn max_payload(&self) -> u32 {
        u32::try_from(self.slot_size)
            .unwrap_or(u32::MAX)
            .min(vfmig_wire::MAX_PAYLOAD)
    }

    /// Whether the connection is protected by something (a key or TLS).
    pub fn is_protected(&self) -> bool {
        self.tls.is_some() || matches!(self.auth, AuthConfig::Psk(_))
    }
}

/// The connection policy: without PSK or TLS, only loopback peers are allowed, unless the
/// operator opted out with `insecure`. Returns the refusal to report, if any.
pub fn check_peer_policy(peer: SocketAddr, cfg: &SessionConfig) -> Result<(), TransportError> {
    if cfg.is_protected() || cfg.insecure || is_loopback(peer.ip()) {
        Ok(())
    } else {
        Err(TransportError::InsecureRefused { peer })
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        // An IPv4-mapped loopback (::ffff:127.0.0.1) is loopback too.
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn policy_refuses_non_loopback_without_key_or_tls_unless_insecure() {
        let mut cfg = SessionConfig::default();
        assert!(check_peer_policy(addr("127.0.0.1:1"), &cfg).is_ok());
        assert!(check_peer_policy(addr("127.9.9.9:1"), &cfg).is_ok());
        assert!(check_peer_policy(addr("[::1]:1"), &cfg).is_ok());
        assert!(check_peer_policy(addr("[::ffff:127.0.0.1]:1"), &cfg).is_ok());
        for peer in [
            "10.0.0.2:1",
            "192.168.1.1:9",
            "[fe80::1]:1",
            "[::ffff:10.0.0.1]:1",
        ] {
            assert!(matches!(
                check_peer_policy(addr(peer), &cfg),
                Err(TransportError::InsecureRefused { peer: p }) if p == addr(peer)
            ));
        }
        cfg.insecure = true;
        assert!(check_peer_policy(addr("10.0.0.2:1"), &cfg).is_ok());
        cfg.insecure = false;
        cfg.auth = AuthConfig::Psk(b"k".to_vec());
        assert!(check_peer_policy(addr("10.0.0.2:1"), &cfg).is_ok());
    }

    #[test]
    fn config_validation_refuses_out_of_range_settings() {
        assert!(SessionConfig::default().validate().is_ok());
        let bad = [
            SessionConfig {
                streams: 0,
                ..Default::default()
            },
            SessionConfig {
                streams: MAX_STREAMS + 1,
                ..Default::default()
            },
            SessionConfig {
                keepalive: Duration::from_secs(30),
                ..Default::default()
            },
            SessionConfig {
                slot_size: 1000,
                ..Default::default()
            },
            SessionConfig {
                window_bytes: MAX_WINDOW_BYTES + 1,
                ..Default::default()
            },
        ];
        for cfg in bad {
            assert!(matches!(cfg.validate(), Err(TransportError::Config { .. })));
        }
    }
}
