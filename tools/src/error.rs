//! The command's errors and the one place that turns typed library errors into the one line an
//! operator reads ([`describe`]), plus the exit status of each ([`CliError::exit_code`]).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use vfmig_pipeline::{AbortReason, Phase, PipelineError};
use vfmig_transport::{FramePart, TransportError};
use vfmig_vfio::emulated::EmulatedError;
use vfmig_vfio::{DeviceError, DeviceState};
use vfmig_wire::declare::{DeclField, DeviceKind, DeviceMismatch};
use vfmig_wire::handshake::{HandshakeError, RefuseCode};

use crate::units::human_bytes;

use crate::file_device::FileDeviceError;

/// Exit status: the migration failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit status: usage error (clap's, or a bad value found after parsing).
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the migration is in doubt (docs/PROTOCOL.md, section 5.1): this side's devices
/// are left in STOP with valid state and the operator finishes it.
pub const EXIT_IN_DOUBT: u8 = 3;

/// One device of the command line, for naming it in messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLabel {
    /// The name given to the library (`MigrationDevice::name`).
    pub name: String,
    /// `emu`, `file` or `vfio`.
    pub kind: &'static str,
}

/// Usage errors: the arguments did not parse, or a value was found bad after parsing.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// The arguments did not parse (clap's message, for the `--json` failure object).
    #[error("{message}")]
    Arguments {
        /// Clap's one-line message.
        message: String,
    },
    /// The PSK file cannot be read.
    #[error("cannot read --psk-file {path}: {source}")]
    PskFile {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A key file that group or others may read.
    #[error("{what} {path} is readable by others (mode {mode:04o}): chmod 600 it, or pass --insecure-key-perms")]
    KeyPermissions {
        /// The option.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The PSK is too short to be a key.
    #[error("--psk-file {path} holds {len} bytes; a key needs at least {min}")]
    PskTooShort {
        /// The path.
        path: PathBuf,
        /// Its length (after stripping a trailing newline).
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// A `file:` device cannot be used as given.
    #[error("device {index} (file): {source}")]
    FileDevice {
        /// Position of the device.
        index: usize,
        /// Why.
        #[source]
        source: FileDeviceError,
    },
    /// A `vfio:` path that does not exist.
    #[error("device {index} (vfio): {path} does not exist")]
    NoSuchDevice {
        /// Position of the device.
        index: usize,
        /// The path given.
        path: PathBuf,
    },
    /// The same destination file given twice.
    #[error("devices {first} and {second} both write {path}")]
    DuplicateFile {
        /// First position.
        first: usize,
        /// Second position.
        second: usize,
        /// The path.
        path: PathBuf,
    },
    /// A TLS file cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    TlsFile {
        /// The option.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `file:-` used more than once.
    #[error("stdin (`file:-`) can feed only one device")]
    StdinTwice,
    /// The transport refused the configuration (TLS files, limits).
    #[error("{0}")]
    Transport(TransportError),
}

/// Everything the command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments: exit 2.
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// A device could not be opened or created (vfio open, emulated device set-up).
    #[error("device {index} ({kind}): {source}")]
    OpenDevice {
        /// Position of the device.
        index: usize,
        /// `emu` or `vfio`.
        kind: &'static str,
        /// Why.
        #[source]
        source: DeviceError,
    },
    /// An emulated device could not be set up (its FUSE mount, its memory).
    #[error("device {index} (emu): {source}")]
    Emulated {
        /// Position of the device.
        index: usize,
        /// Why.
        #[source]
        source: EmulatedError,
    },
    /// No address of the receiver accepted a connection.
    #[error("{host} unreachable")]
    Unreachable {
        /// The receiver as given.
        host: String,
        /// Each address tried, with its failure, in order.
        attempts: Vec<(std::net::SocketAddr, TransportError)>,
    },
    /// The receiver's host name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// The listening socket could not be bound on any of the addresses.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The (first) address tried.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: Box<TransportError>,
    },
    /// The listener could not be bound, or no source arrived.
    #[error("{0}")]
    Transport(TransportError),
    /// The migration failed.
    #[error("{error}")]
    Migration {
        /// The pipeline's error.
        error: Box<PipelineError>,
        /// The devices, by position, to name them in the message.
        devices: Vec<DeviceLabel>,
        /// Whether the command already printed a JSON report for this failure.
        report_printed: bool,
    },
    /// SIGINT or SIGTERM arrived before a source connected: nothing was migrated.
    #[error("interrupted (SIGINT/SIGTERM) while waiting for a source")]
    Interrupted,
    /// The control socket (`--control`) could not be served.
    #[error("{0}")]
    Control(crate::control::ControlError),
    /// The demo's verification found a difference although the pipeline reported success.
    #[error("verification failed: {what}")]
    Verification {
        /// What differed.
        what: String,
    },
}

impl CliError {
    /// The exit status for this error (see `--help`, EXIT STATUS): 128 + the signal's number
    /// for a command a signal cancelled.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            _ if self.in_doubt_guidance().is_some() => EXIT_IN_DOUBT,
            CliError::Interrupted => crate::signals::exit_status().unwrap_or(EXIT_FAILED),
            CliError::Migration { error, .. }
                if matches!(**error, PipelineError::Cancelled { .. }) =>
            {
                crate::signals::exit_status().unwrap_or(EXIT_FAILED)
            }
            _ => EXIT_FAILED,
        }
    }

    /// For a migration in doubt: which side holds valid state and how to finish.
    pub fn in_doubt_guidance(&self) -> Option<&'static str> {
        match self {
            CliError::Migration { error, .. } => error.in_doubt_guidance(),
            _ => None,
        }
    }

    /// Whether a JSON report was already printed for this failure.
    pub fn report_printed(&self) -> bool {
        matches!(
            self,
            CliError::Migration {
                report_printed: true,
                ..
            }
        )
    }
}

/// The one line (without the `vfmig: ` prefix) that names the cause of `e` so a person can act.
pub fn describe(e: &CliError) -> String {
    let line = match e {
        CliError::Usage(UsageError::Transport(t)) => describe_transport(t),
        CliError::Usage(UsageError::PskFile { path, source }) => {
            format!(
                "cannot read --psk-file {}: {}",
                path.display(),
                os_reason(source)
            )
        }
        CliError::Usage(UsageError::TlsFile { what, path, source }) => {
            format!(
                "cannot read {what} {}: {}",
                path.display(),
                os_reason(source)
            )
        }
        CliError::Usage(UsageError::FileDevice {
            index,
            source: FileDeviceError::Open { path, source },
        }) => format!(
            "device {index} (file): cannot open {}: {}",
            path.display(),
            os_reason(source)
        ),
        CliError::Usage(u) => u.to_string(),
        CliError::OpenDevice {
            index,
            kind,
            source,
        } => format!(
            "cannot open device {index} ({kind}): {}",
            describe_device(source)
        ),
        CliError::Emulated { index, source } => {
            format!("device {index} (emu): {}", describe_emulated(source))
        }
        CliError::Unreachable { host, attempts } => {
            let each: Vec<String> = attempts
                .iter()
                .map(|(a, e)| match e {
                    TransportError::Connect { source, .. } => format!("{a}: {}", os_reason(source)),
                    other => format!("{a}: {}", describe_transport(other)),
                })
                .collect();
            format!("{host} unreachable on every address: {}", each.join(", "))
        }
        CliError::Resolve { host, source } => format!(
            "cannot resolve host {host}: {}",
            source.to_string().to_lowercase()
        ),
        CliError::Bind { addr, source } => {
            let why = match &**source {
                TransportError::Io { source, .. } => os_reason(source),
                other => describe_transport(other),
            };
            let hint = match &**source {
                TransportError::Io { source, .. }
                    if source.raw_os_error() == Some(libc::EADDRINUSE) =>
                {
                    " (another process listens there: stop it or choose another port)"
                }
                _ => "",
            };
            format!("cannot listen on {addr}: {why}{hint}")
        }
        CliError::Transport(t) => describe_transport(t),
        CliError::Migration { error, devices, .. } => describe_pipeline(error, devices),
        CliError::Interrupted => {
            "interrupted (SIGINT/SIGTERM) while waiting for a source; nothing was migrated"
                .to_owned()
        }
        CliError::Verification { what } => format!("verification failed: {what}"),
        CliError::Control(e) => e.to_string(),
    };
    one_line(&line)
}

/// Collapses whitespace runs containing newlines so the message is exactly one line.
fn one_line(s: &str) -> String {
    s.split(['\n', '\r'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// `Connection refused` from an `io::Error`, without Rust's ` (os error 111)` suffix, lowercased.
fn os_reason(e: &io::Error) -> String {
    let text = match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_owned(),
        None => e.to_string(),
    };
    // "No such file" reads "no such file" mid-sentence; an acronym ("I/O error") keeps its case.
    let mut chars = text.chars();
    match (chars.next(), chars.clone().next()) {
        (Some(c), Some(next)) if next.is_lowercase() => c.to_lowercase().chain(chars).collect(),
        _ => text,
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if (s - s.round()).abs() < 0.05 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// An emulated device's set-up failure; a FUSE failure says what `emu:` needs.
fn describe_emulated(e: &EmulatedError) -> String {
    match e {
        EmulatedError::Host(source) => {
            let need = if std::path::Path::new("/dev/fuse").exists() {
                "emulated devices (`emu:`, `vfmig demo`) need FUSE: /dev/fuse usable by this user \
                 and the right to mount (root, CAP_SYS_ADMIN, or fusermount3 installed)"
            } else {
                "emulated devices (`emu:`, `vfmig demo`) need FUSE, and /dev/fuse does not exist \
                 (load the module: modprobe fuse)"
            };
            format!(
                "cannot mount the FUSE file system that serves its data fd: {}; {need}; `file:` devices \
                 and `emu:...,data-fd=mem` (STOP_COPY-only) need neither",
                os_reason(source)
            )
        }
        other => other.to_string(),
    }
}

fn describe_device(e: &DeviceError) -> String {
    match e {
        DeviceError::SetState {
            arc, now, source, ..
        } => {
            let now = now.map_or_else(String::new, |s| format!(", device now in {s}"));
            format!("{arc} failed: {}{now}", os_reason(source))
        }
        DeviceError::Ioctl { op, source, .. } => format!("{op} failed: {}", os_reason(source)),
        DeviceError::Open { path, what, source } => {
            format!("{what} {path}: {}", os_reason(source))
        }
        other => other.to_string(),
    }
}

/// A peer that closed or reset a connection, with the phase of the migration when known.
fn peer_closed(conn: usize, during: FramePart, phase: Option<Phase>) -> String {
    let at = match during {
        FramePart::Between => "between frames".to_owned(),
        FramePart::Handshake => "during the handshake".to_owned(),
        other => format!("in the middle of a {other}"),
    };
    let phase = phase.map_or_else(String::new, |p| format!(" in {p}"));
    format!("peer closed connection {conn} {at}{phase}: it exited, was killed or lost the network")
}

/// Transport errors, worded for an operator.
pub fn describe_transport(e: &TransportError) -> String {
    match e {
        TransportError::Connect { addr, source } => {
            format!("peer {addr} unreachable: {}", os_reason(source))
        }
        TransportError::AuthenticationFailed { peer } => format!(
            "authentication failed with {peer}: the two sides do not hold the same --psk-file key"
        ),
        TransportError::Handshake { peer, source, .. } => describe_handshake(*peer, source),
        TransportError::InsecureRefused { peer } => format!(
            "refused unauthenticated connection with non-loopback peer {peer}: use --psk-file or TLS on both sides (or --insecure)"
        ),
        TransportError::Tls {
            peer,
            source:
                rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType
                    | rustls::InvalidMessage::UnknownProtocolVersion,
                ),
        } => format!(
            "peer {peer} does not speak TLS but this side does: {SAME_SECURITY}"
        ),
        TransportError::Tls { peer, source } => format!("TLS with {peer} failed: {source}"),
        TransportError::TlsConfig { what, path, reason } => {
            format!("TLS configuration: cannot use {what} {path}: {reason}")
        }
        TransportError::PeerClosed { conn, during } => peer_closed(*conn, *during, None),
        TransportError::Closed => "peer closed the session before the migration finished".to_owned(),
        TransportError::Timeout { after, what } if after.is_zero() => {
            format!("timed out waiting for {what}")
        }
        TransportError::Timeout { after, what } => {
            format!("timed out after {} waiting for {what}", secs(*after))
        }
        TransportError::Corrupt {
            conn,
            device,
            seq,
            source,
        } => format!(
            "stream corrupted at frame {seq} of device {device} (connection {conn}): {source}"
        ),
        TransportError::Unauthentic { conn, .. } => format!(
            "a frame on connection {conn} failed authentication: it was changed, injected, replayed or reordered on the way; nothing of it reached a device"
        ),
        TransportError::PeerAborted { reason, detail } => {
            let why = abort_reason_text(*reason);
            if detail.is_empty() {
                format!("peer aborted the migration: {why}")
            } else {
                format!("peer aborted the migration: {why}: {detail}")
            }
        }
        TransportError::Io { op, source } => {
            let hint = if op.starts_with("io_uring") {
                memlock_hint(source)
            } else {
                ""
            };
            format!("{op} failed: {}{hint}", os_reason(source))
        }
        TransportError::Short {
            op,
            conn,
            done,
            wanted,
        } => format!(
            "connection {conn} broke mid-frame ({op}: {done} of {wanted} bytes): the peer closed it (it may have found the stream corrupt) or the network failed"
        ),
        other => other.to_string(),
    }
}

/// What to do when the two sides disagree on TLS.
const SAME_SECURITY: &str = "start both sides with the same security options (--tls-cert, \
--tls-key and --tls-ca on both, or neither)";

/// Names what sent `found` instead of a vfmig handshake: a TLS record, or a stranger's first
/// bytes shown as text.
fn describe_bad_magic(peer: std::net::SocketAddr, found: &[u8; 4]) -> String {
    // A TLS record: content type 20..=23 (alert 21, handshake 22), then version major 3.
    if (0x14..=0x17).contains(&found[0]) && found[1] == 0x03 {
        return format!("peer {peer} speaks TLS and this side does not: {SAME_SECURITY}");
    }
    let shown: String = found
        .iter()
        .take_while(|b| **b != 0)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                char::from(b).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect();
    let what = match found {
        b"SSH-" => " (an SSH client or server)",
        b"GET " | b"POST" | b"HEAD" | b"PUT " | b"HTTP" => " (HTTP)",
        _ => "",
    };
    format!("peer {peer} is not vfmig: it sent \"{shown}\"{what} instead of a vfmig handshake; check the address and port")
}

fn describe_handshake(peer: std::net::SocketAddr, e: &HandshakeError) -> String {
    match e {
        HandshakeError::BadMagic { found } => describe_bad_magic(peer, found),
        HandshakeError::AuthenticationFailed
        | HandshakeError::Refused {
            code: RefuseCode::AuthenticationFailed,
            ..
        } => format!(
            "authentication failed with {peer}: the two sides do not hold the same --psk-file key"
        ),
        HandshakeError::AuthModeMismatch { .. }
        | HandshakeError::Refused {
            code: RefuseCode::AuthModeMismatch,
            ..
        } => format!(
            "authentication failed with {peer}: only one side was given --psk-file"
        ),
        HandshakeError::DeviceCountMismatch {
            source_count,
            destination_count,
        } => format!(
            "the source has {source_count} devices and the destination {destination_count} (found in the handshake with {peer}; no device was touched): give both sides the same --device list"
        ),
        HandshakeError::DeviceMismatch(m) => format!(
            "{} (found in the handshake with {peer}; no device was touched): give both sides matching --device specs",
            describe_mismatch(m)
        ),
        HandshakeError::VersionMismatch { ours, theirs } => format!(
            "peer {peer} speaks protocol version {theirs}, this vfmig speaks {ours}: use the same vfmig on both sides"
        ),
        other => format!("handshake with {peer} failed: {other}"),
    }
}

fn kind_name(k: DeviceKind) -> &'static str {
    match k {
        DeviceKind::Unspecified => "unspecified",
        DeviceKind::Stream => "file",
        DeviceKind::Emulated => "emu",
        DeviceKind::Vfio => "vfio",
    }
}

/// `device 0: the source's size is 128.0 MiB, the destination's 64.0 MiB`.
fn describe_mismatch(m: &DeviceMismatch) -> String {
    let (s, d) = (&m.source, &m.destination);
    let i = m.index;
    let size = |v: Option<u64>| v.map_or_else(|| "unknown".to_owned(), human_bytes);
    match m.field {
        DeclField::Kind => format!(
            "device {i} differs in kind: the source's is {}, the destination's {}",
            kind_name(s.kind),
            kind_name(d.kind)
        ),
        DeclField::Size => format!(
            "device {i} ({}) differs in size: the source's is {} ({} bytes), the destination's {} ({} bytes)",
            kind_name(s.kind),
            size(s.size),
            s.size.unwrap_or(0),
            size(d.size),
            d.size.unwrap_or(0)
        ),
        DeclField::Compat => format!(
            "device {i} ({}) is not compatible: the source's is `{}`, the destination's `{}`",
            kind_name(s.kind),
            s.compat,
            d.compat
        ),
    }
}

fn abort_reason_text(r: AbortReason) -> String {
    match r {
        AbortReason::Cancelled => "cancelled by the operator".to_owned(),
        AbortReason::SourceDevice => "the source failed".to_owned(),
        AbortReason::DestinationDevice => "the destination failed".to_owned(),
        AbortReason::Protocol => "the peer broke the protocol".to_owned(),
        AbortReason::Integrity => "the stream failed verification".to_owned(),
        AbortReason::Timeout => "the peer timed out".to_owned(),
        AbortReason::Resources => "the peer ran out of buffers or queue space".to_owned(),
        AbortReason::Internal => "an internal error on the peer".to_owned(),
        AbortReason::DeviceRefused => "a destination device refused the state".to_owned(),
        AbortReason::DeviceMismatch => "the two sides were given different devices".to_owned(),
        AbortReason::Unknown(code) => format!("reason {code}"),
    }
}

/// `device 0 (emu)` for a device name, by looking it up among the command's devices.
fn label_by_name(name: &str, devices: &[DeviceLabel]) -> String {
    match devices.iter().position(|d| d.name == name) {
        Some(i) => format!("device {i} ({})", devices[i].kind),
        None => format!("device {name}"),
    }
}

fn label_by_index(index: u16, devices: &[DeviceLabel]) -> String {
    match devices.get(usize::from(index)) {
        Some(d) => format!("device {index} ({})", d.kind),
        None => format!("device {index}"),
    }
}

/// Pipeline errors, worded for an operator.
pub fn describe_pipeline(e: &PipelineError, devices: &[DeviceLabel]) -> String {
    match e {
        PipelineError::InDoubt { side, cause } => format!(
            "IN DOUBT on the {side}: {}; this side's devices stay stopped with valid state; {}",
            describe_pipeline(cause, devices),
            e.in_doubt_guidance().unwrap_or_default()
        ),
        // A dead peer: say what the migration was doing when it went.
        PipelineError::Transport {
            phase,
            source: TransportError::PeerClosed { conn, during },
        } => peer_closed(*conn, *during, Some(*phase)),
        PipelineError::Transport { source, .. } => describe_transport(source),
        PipelineError::SourceChanged {
            device,
            read,
            size_before,
            size_after,
            ..
        } => format!(
            "{} changed while it was read ({size_before} bytes when reading began, {size_after} at its end, {read} read): refusing a stream that is neither the old nor the new file",
            label_by_name(device, devices)
        ),
        PipelineError::SourceGone { phase, device } => format!(
            "the source closed the session during {phase} before the end of {}'s stream: it exited, was killed or lost the network",
            label_by_index(*device, devices)
        ),
        PipelineError::DeviceRefused { device, source } => format!(
            "destination {} refused the state: {}",
            label_by_name(device, devices),
            describe_device(source)
        ),
        // A `file:` FIFO source waits for its writer on STOP -> STOP_COPY, bounded by --timeout.
        PipelineError::Device {
            device,
            source: DeviceError::SetState { arc, source, .. },
            ..
        } if source.raw_os_error() == Some(libc::ETIMEDOUT)
            && arc.to == DeviceState::StopCopy
            && devices
                .iter()
                .any(|d| d.name == *device && d.kind == "file") =>
        {
            format!(
                "{}: no process opened the FIFO for writing within --timeout; start the writer (e.g. `produce-state > FIFO`) or raise --timeout",
                label_by_name(device, devices)
            )
        }
        PipelineError::Device {
            device,
            phase,
            source,
        } => format!(
            "{} failed in {phase}: {}",
            label_by_name(device, devices),
            describe_device(source)
        ),
        PipelineError::Read {
            device,
            phase,
            offset,
            source,
        } => format!(
            "reading {} failed at stream offset {offset} in {phase}: {}",
            label_by_name(device, devices),
            os_reason(source)
        ),
        PipelineError::Write {
            device,
            offset,
            source,
        } => format!(
            "writing {} failed at stream offset {offset}: {}",
            label_by_name(device, devices),
            os_reason(source)
        ),
        PipelineError::Decode {
            device,
            seq,
            failure,
            ..
        } => format!(
            "stream corrupted at frame {seq} of {}: {failure}",
            label_by_index(*device, devices)
        ),
        PipelineError::LengthMismatch {
            device,
            declared,
            received,
        } => format!(
            "stream corrupted: {} ended after {received} bytes, the source sent {declared}",
            label_by_index(*device, devices)
        ),
        PipelineError::DigestMismatch { device, .. } => format!(
            "stream corrupted: the digest of {} differs from the source's",
            label_by_index(*device, devices)
        ),
        PipelineError::PeerAborted {
            phase,
            reason,
            detail,
        } => {
            let why = abort_reason_text(*reason);
            // A device mismatch is about the set-up, whatever phase this side had reached.
            let phase = if *reason == AbortReason::DeviceMismatch {
                "at the start".to_owned()
            } else {
                format!("in {phase}")
            };
            if detail.is_empty() {
                format!("peer aborted the migration {phase} ({why})")
            } else {
                format!("peer aborted the migration {phase} ({why}); it reported: {detail}")
            }
        }
        PipelineError::P2pRequired { device, caps } => format!(
            "{} lacks VFIO_MIGRATION_P2P (capabilities {caps}); several devices need it (or pass --allow-non-p2p)",
            label_by_name(device, devices)
        ),
        PipelineError::DeviceCount {
            source_devices,
            destination_devices,
        } => format!(
            "the source has {source_devices} devices and the destination {destination_devices}: give both sides the same --device list"
        ),
        PipelineError::Timeout {
            phase,
            what,
            waited,
        } => format!("timed out after {} in {phase} waiting for {what}", secs(*waited)),
        PipelineError::Cancelled { phase } => format!(
            "cancelled (SIGINT/SIGTERM) in {phase}; source devices are walked back to RUNNING, destination devices reset"
        ),
        PipelineError::Uring { op, source } => {
            format!("io_uring {op} failed: {}{}", os_reason(source), memlock_hint(source))
        }
        other => other.to_string(),
    }
}

/// For an `ENOMEM` from io_uring set-up: the usual cause (the rings themselves count against
/// `RLIMIT_MEMLOCK` on recent kernels for a process without `CAP_IPC_LOCK`).
fn memlock_hint(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::ENOMEM) {
        "; io_uring rings count against the locked-memory limit: raise RLIMIT_MEMLOCK to at \
         least 1 MiB (`ulimit -l`, systemd LimitMEMLOCK=)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use vfmig_pipeline::Phase;
    use vfmig_vfio::{DeviceState, Transition};

    #[test]
    fn os_reasons_read_mid_sentence_and_acronyms_keep_their_case() {
        assert_eq!(
            os_reason(&io::Error::from_raw_os_error(libc::ENOENT)),
            "no such file or directory"
        );
        assert_eq!(
            os_reason(&io::Error::from_raw_os_error(libc::EIO)),
            "I/O error"
        );
    }

    fn labels() -> Vec<DeviceLabel> {
        vec![
            DeviceLabel {
                name: "emu0".into(),
                kind: "emu",
            },
            DeviceLabel {
                name: "state.bin".into(),
                kind: "file",
            },
        ]
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:7000".parse().expect("addr")
    }

    fn migration(error: PipelineError) -> CliError {
        CliError::Migration {
            error: Box::new(error),
            devices: labels(),
            report_printed: false,
        }
    }

    #[test]
    fn unreachable_peer_names_the_address_and_the_os_reason() {
        let e = CliError::Transport(TransportError::Connect {
            addr: addr(),
            source: Arc::new(io::Error::from_raw_os_error(libc::ECONNREFUSED)),
        });
        assert_eq!(
            describe(&e),
            "peer 127.0.0.1:7000 unreachable: connection refused"
        );
        assert_eq!(e.exit_code(), EXIT_FAILED);
    }

    #[test]
    fn wrong_key_says_authentication_failed() {
        let e = CliError::Transport(TransportError::AuthenticationFailed { peer: addr() });
        assert!(
            describe(&e).starts_with("authentication failed"),
            "{}",
            describe(&e)
        );
    }

    #[test]
    fn key_on_one_side_only_is_reported_as_an_authentication_failure() {
        let e = CliError::Transport(TransportError::Handshake {
            peer: addr(),
            conn: 0,
            source: HandshakeError::AuthenticationFailed,
        });
        assert!(
            describe(&e).starts_with("authentication failed"),
            "{}",
            describe(&e)
        );
    }

    #[test]
    fn refusing_destination_device_is_named_by_position_and_kind() {
        let e = migration(PipelineError::DeviceRefused {
            device: "emu0".into(),
            source: DeviceError::SetState {
                device: "emu0".into(),
                arc: Transition {
                    from: DeviceState::Resuming,
                    to: DeviceState::Stop,
                },
                target: DeviceState::Stop,
                now: Some(DeviceState::Error),
                source: io::Error::from_raw_os_error(libc::EINVAL),
            },
        });
        assert_eq!(
            describe(&e),
            "destination device 0 (emu) refused the state: RESUMING -> STOP failed: invalid argument, device now in ERROR"
        );
    }

    #[test]
    fn corrupt_frame_names_frame_and_device() {
        let e = CliError::Transport(TransportError::Corrupt {
            conn: 1,
            device: 0,
            seq: 42,
            source: vfmig_wire::WireError::BadFrameMagic { found: [0; 4] },
        });
        let msg = describe(&e);
        assert!(
            msg.starts_with("stream corrupted at frame 42 of device 0"),
            "{msg}"
        );
        let e = migration(PipelineError::DigestMismatch {
            device: 1,
            expected: [0; 32],
            computed: [1; 32],
        });
        assert!(describe(&e).contains("device 1 (file)"), "{}", describe(&e));
    }

    #[test]
    fn vanished_peer_says_where_the_stream_was_cut() {
        let e = CliError::Transport(TransportError::PeerClosed {
            conn: 1,
            during: FramePart::Payload,
        });
        assert_eq!(
            describe(&e),
            "peer closed connection 1 in the middle of a frame payload: it exited, was killed or lost the network"
        );
    }

    #[test]
    fn connection_cut_mid_frame_says_the_peer_closed_it() {
        let e = CliError::Transport(TransportError::Short {
            op: "send frame payload",
            conn: 0,
            done: 10,
            wanted: 20,
        });
        let msg = describe(&e);
        assert!(msg.starts_with("connection 0 broke mid-frame"), "{msg}");
        assert!(msg.contains("peer closed it"), "{msg}");
    }

    #[test]
    fn timeouts_say_after_how_many_seconds() {
        let e = migration(PipelineError::Timeout {
            phase: Phase::StopCopy,
            what: "the destination",
            waited: Duration::from_secs(30),
        });
        assert_eq!(
            describe(&e),
            "timed out after 30 s in stop-copy waiting for the destination"
        );
    }

    #[test]
    fn unreadable_files_are_named_with_the_os_reason() {
        let e = CliError::Usage(UsageError::PskFile {
            path: "/etc/vfmig/key".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        });
        assert_eq!(
            describe(&e),
            "cannot read --psk-file /etc/vfmig/key: no such file or directory"
        );
        assert_eq!(e.exit_code(), EXIT_USAGE);
    }

    #[test]
    fn usage_errors_exit_2_and_everything_else_1() {
        let u = CliError::Usage(UsageError::StdinTwice);
        assert_eq!(u.exit_code(), EXIT_USAGE);
        let f = CliError::Verification { what: "x".into() };
        assert_eq!(f.exit_code(), EXIT_FAILED);
    }

    #[test]
    fn in_doubt_exits_3_and_names_the_side_the_cause_and_how_to_finish() {
        let e = migration(PipelineError::InDoubt {
            side: vfmig_pipeline::Side::Source,
            cause: Box::new(PipelineError::Timeout {
                phase: Phase::Commit,
                what: "the destination's outcome",
                waited: Duration::from_secs(30),
            }),
        });
        assert_eq!(e.exit_code(), EXIT_IN_DOUBT);
        let msg = describe(&e);
        assert!(!msg.contains('\n'), "{msg:?}");
        assert!(
            msg.starts_with("IN DOUBT on the source: timed out after 30 s"),
            "{msg}"
        );
        assert!(msg.contains("the source sent commit"), "{msg}");
        let v: serde_json::Value =
            serde_json::from_str(&crate::report::failure_json("send", &e)).expect("JSON");
        assert_eq!(v["outcome"], "in-doubt");
        assert_eq!(v["exit_code"], 3);
        assert!(v["guidance"]
            .as_str()
            .is_some_and(|g| g.contains("roll the source back")));
        let f = migration(PipelineError::DestinationResumeFailed);
        assert_eq!(f.exit_code(), EXIT_FAILED);
        let v: serde_json::Value =
            serde_json::from_str(&crate::report::failure_json("send", &f)).expect("JSON");
        assert_eq!(v["outcome"], "failed");
        assert!(v["guidance"].is_null());
    }

    #[test]
    fn messages_are_always_exactly_one_line() {
        let e = migration(PipelineError::PeerAborted {
            phase: Phase::Resume,
            reason: AbortReason::DeviceRefused,
            detail: "line one\nline two\r\n".into(),
        });
        let msg = describe(&e);
        assert!(!msg.contains('\n') && !msg.contains('\r'), "{msg:?}");
        assert!(msg.contains("line one; line two"), "{msg}");
        assert!(
            msg.contains("a destination device refused the state"),
            "{msg}"
        );
    }
}
