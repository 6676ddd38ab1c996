//! The command line: `vfmig send`, `vfmig recv`, `vfmig demo`, with man-page quality `--help`.
//!
//! The doc comments here are clap's `--help` text, written for a terminal: `[::1]:7000` and
//! `zstd[:LEVEL]` are what the user types, not intra-doc links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::addr::{parse_connect, parse_listen, Endpoint};
use crate::progress::ProgressMode;
use crate::spec::{DeviceSpec, Profile};
use crate::units::{parse_link_rate, parse_size, UnitError};
use vfmig_pipeline::Rate;

const ABOUT: &str = "Move VFIO device migration state between hosts";

const LONG_ABOUT: &str = "\
vfmig moves the migration state of VFIO devices (GPUs, NICs, accelerators passed through to a VM) \
from a source host to a destination host. On the source it drives the kernel's VFIO migration v2 \
state machine (optionally PRE_COPY while the device runs, then STOP_COPY), reads the state from the \
data fd with io_uring, compresses it where that pays, and sends it over one or more authenticated \
TCP connections. The destination verifies every byte (CRC32C per frame, length and BLAKE3 digest per \
device), writes the stream in order into its device's RESUMING data fd, and lets the device validate \
it (RESUMING -> STOP). Only then does it acknowledge, and only then does `vfmig send` succeed.

Run `vfmig recv` on the destination first, then `vfmig send` on the source with the same number of \
--device options: devices pair by position. `vfmig demo` does both over loopback in one command.";

const SPEC_HELP: &str = "\
DEVICE SPECS (--device SPEC, repeatable; devices pair by position):
  emu:size=SIZE[,seed=N][,profile=mixed|zero|random|text][,precopy=SIZE|off]
      [,dirty-rate=SIZE/s][,p2p=on|off][,precopy-info=v1|v2][,reinit-after=SIZE]
      [,read-error-at=SIZE][,slow=SIZE/s][,refuse-resume=on|off][,data-fd=fuse|mem]
      An emulated migration device with a real kernel data fd.
        size        state size, a multiple of 4K (required)
        seed        content seed (default: the device's position, so both sides agree)
        profile     content mix (default mixed: ~2.5:1 with zstd; zero: all zero pages;
                    random: incompressible; text: highly compressible)
        precopy     PRE_COPY initial_bytes: the first SIZE bytes stream while the device
                    runs; `off`: no PRE_COPY capability (default: all of the state)
        dirty-rate  bytes per second the running device dirties (default: 0)
        p2p         VFIO_MIGRATION_P2P support, needed with several devices (default: on)
        precopy-info
                    v2: offers VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 (REINIT reports,
                    Linux 7.1), which the source opts in to (default: v1)
        reinit-after
                    re-initialise once in PRE_COPY after SIZE stream bytes and a report of
                    initial_bytes 0: the initial data is read again (default: never)
        read-error-at
                    fault injection (tests): reading the state fails with EIO at stream
                    byte SIZE (default: never)
        slow        fault injection (tests): the state is read at most SIZE bytes per
                    second (default: unthrottled)
        refuse-resume
                    fault injection (tests): on a destination, RESUMING -> STOP fails even
                    for a valid stream (default: off)
        data-fd     fuse: the data fd is a file on a FUSE mount (every feature; needs FUSE);
                    mem: a pipe fed by a device thread, memory speed and no FUSE, but
                    STOP_COPY-only (precopy defaults to off; precopy=SIZE and
                    read-error-at are refused) (default: fuse)
      Source and destination must give the same size, seed and profile.
  file:PATH
      Source: PATH is the state stream: a regular file, a FIFO (waits up to --timeout for a
      writer), or `-` for stdin. Destination: the stream is written to a temporary file (mode
      0600) in PATH's directory, fsynced and renamed onto PATH only after the whole stream
      verified; after a failure nothing is left at PATH (an existing file there is kept). An
      existing file is replaced only with --force, and the new file keeps its mode. Temporary
      files a killed receiver left for PATH are removed at start (only those of dead PIDs).
  vfio:PATH
      A real VFIO device with migration support: its cdev (/dev/vfio/devices/vfioN) or its sysfs
      device path (/sys/bus/pci/devices/0000:01:00.0).

UNITS (sizes and rates side by side):
  SIZE   --size, emu:size=, precopy=   512M, 2GiB, 4096   binary: K = 1024; KB/MB/GB/TB and
                                                          KiB/MiB/GiB/TiB mean the same; bare = bytes
  RATE   --max-bandwidth               2.5Gbit/s, 500Mbit/s   decimal bits (2.5G, 500M: bits too)
                                       300MB/s                decimal bytes (10^6)
                                       300MiB/s               binary bytes (2^20)
                                       a bare number is refused (bits or bytes?)
  dirty-rate=SIZE/s is a device's byte rate: binary, like a size.";

const JSON_HELP: &str = "\
JSON OUTPUT (--json): one object on stdout at the end, also on failure:
  outcome (\"ok\"|\"failed\"|\"in-doubt\"), role, error (the failure line or null), exit_code,
  guidance (in doubt: which side holds valid state and how to finish, else null), peer,
  elapsed_ms, downtime_ms, raw_bytes, wire_bytes, ratio (raw/wire), throughput_bytes_per_sec,
  limiting_stage (\"device\"|\"codec\"|\"network\"), stages_busy_ms, and devices: a list of
  { index, name, kind, raw_bytes, wire_bytes, precopy_bytes, ratio, throughput_bytes_per_sec,
  downtime_ms, accepted, final_state }, also on a migration failure. accepted is true only once
  the destination device took its state; final_state is where the device was left (\"RUNNING\",
  \"STOP\", ...; null if unreadable);
  ratio is null for an all-zero stream; a device's throughput and downtime are measured over
  the whole session (devices move concurrently and stop together). started_at_ns,
  first_data_at_ns (send: the first device-state frame handed to the transport) and
  final_ack_at_ns (the destination's final outcome received, or on recv sent) are wall-clock
  (CLOCK_REALTIME) nanoseconds since the epoch, null where the instant did not happen.";

const EXIT_HELP: &str = "\
EXIT STATUS:
  0  every destination device accepted its state (for send: the destination acknowledged it)
  1  the migration failed; one line on stderr names the cause
     (the source devices are walked back to RUNNING, the destination devices are reset)
  2  usage error: unknown option, bad value, bad device spec, a file or device path that does
     not exist, an unreadable key or certificate (with --json, the failure object is printed too)
  3  in doubt: the link was lost at the commit point, so this side cannot know the decision;
     its devices stay stopped with valid state (never resumed on their own) and the message
     (--json: \"outcome\": \"in-doubt\", \"guidance\") says which side to resume
  130, 143  cancelled by SIGINT or SIGTERM (128 + the signal's number, as shells expect); the
     devices were rolled back as for 1, and the JSON failure object says `cancelled` or
     `interrupted`";

const SEND_EXAMPLES: &str = "\
EXAMPLES:
  Send two emulated devices with pre-copy over 4 connections, authenticated with a key:
    vfmig send --connect 10.0.0.2:7000 --psk-file /etc/vfmig/key --streams 4 --precopy \\
        --device emu:size=2G,precopy=256M --device emu:size=2G,precopy=256M
  Send a file's contents (e.g. a saved device state) over a 2.5 Gbit/s budget:
    vfmig send --connect 10.0.0.2:7000 --psk-file key --max-bandwidth 2.5Gbit/s --device file:state.bin
  Stream from a pipe, machine-readable result:
    produce-state | vfmig send --connect 10.0.0.2:7000 --psk-file key --json --device file:-";

const RECV_EXAMPLES: &str = "\
EXAMPLES:
  Receive two emulated devices (the matching send is in `vfmig send --help`):
    vfmig recv --listen 0.0.0.0:7000 --psk-file /etc/vfmig/key \\
        --device emu:size=2G,precopy=256M --device emu:size=2G,precopy=256M
  Receive into a file, written atomically:
    vfmig recv --listen 0.0.0.0:7000 --psk-file key --device file:/var/lib/vfmig/state.bin
  Let the system pick the port (the bound address is printed as `vfmig: listening on ADDR`):
    vfmig recv --listen 127.0.0.1:0 --device emu:size=64M";

const DEMO_EXAMPLES: &str = "\
EXAMPLES:
  The default demo (2 devices x 512 MiB, mixed content, pre-copy, P2P quiesce):
    vfmig demo
  A quicker one, machine-readable:
    vfmig demo --size 64M --json";

const PROGRESS_HELP: &str = "\
PROGRESS (--progress auto|bar|log|none):
  auto (default): one bar per device on stderr when stderr is a terminal (and neither --json
  nor --quiet is given), with the bytes moved, rate, ETA and phase; `send ... > file` in a
  terminal still shows them. log: one line every --progress-interval seconds (default 5) with
  bytes, rate, ETA and phase, and one at the end, for journals and log files. Phases, the same
  on both sides: listening (recv), connecting (send), handshake, pre-copy, stop-copy,
  verifying, resuming, done, rollback. The final summary goes to stderr; with --json the report
  goes to stdout instead.";

/// `vfmig`: the command line.
#[derive(Debug, Parser)]
#[command(
    name = "vfmig",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_long_help = EXIT_HELP,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Source side: connect to a receiver and send device state.
    #[command(
        long_about = "Source side: connect to `vfmig recv` at ADDR, authenticate, and migrate the \
given devices. For each device: (optionally) PRE_COPY while it runs, then every device to \
RUNNING_P2P, then STOP_COPY, streaming the state. Succeeds (exit 0) only once the destination \
reports that every device accepted its state; the source devices are then left in STOP. On any \
failure they are walked back to RUNNING.",
        after_long_help = concat_help(&[SPEC_HELP, PROGRESS_HELP, JSON_HELP, EXIT_HELP, SEND_EXAMPLES])
    )]
    Send(SendArgs),
    /// Destination side: accept one migration and load the state into devices.
    #[command(
        long_about = "Destination side: listen on ADDR, accept one authenticated migration, and \
load each received device stream into the device at the same position. Nothing unverified \
reaches a device; at the end of each device the totals and digest are checked and the device \
moves RESUMING -> STOP, validating its state, before the source is told. Exits after one \
migration. Prints `vfmig: listening on ADDR` on stderr once the socket is bound.",
        after_long_help = concat_help(&[SPEC_HELP, PROGRESS_HELP, JSON_HELP, EXIT_HELP, RECV_EXAMPLES])
    )]
    Recv(RecvArgs),
    /// Migrate emulated devices over loopback in one command and print a summary.
    #[command(
        long_about = "Runs a receiver and a sender in this process over loopback: emulated devices \
with mixed content, pre-copy, and (with two or more devices) the RUNNING_P2P quiesce order. Prints \
sizes, compression ratio, throughput, downtime, the stage that limited the run, and whether the \
destination devices accepted their state.",
        after_long_help = concat_help(&[EXIT_HELP, DEMO_EXAMPLES])
    )]
    Demo(DemoArgs),
}

/// `--streams` help with the transport's default (chosen there by measurement).
fn streams_help() -> String {
    format!(
        "TCP connections per session, 1..=16. Default: one per {} cores this process may use \
         (CPU affinity and cgroup quota), at least 1 and at most {} (here: {}): on few cores \
         extra connections only cost CPU; on many, each spreads a flow's receive work onto \
         another core. The receiver accepts what the sender asks for.",
        vfmig_pipeline::CORES_PER_STREAM,
        vfmig_pipeline::DEFAULT_STREAMS_MAX,
        vfmig_pipeline::default_streams()
    )
}

/// `--workers` help with the default this process would use.
fn workers_help() -> String {
    format!(
        "Codec worker threads, 1..=64 (compression on send, decompression on recv). Default: the \
         cores this process may use (CPU affinity and cgroup quota), at least 2 and at most {} \
         (here: {}). A receiver runs as many as its buffer pool can feed beside the reorder \
         window.",
        vfmig_pipeline::DEFAULT_CODEC_WORKERS_MAX,
        vfmig_pipeline::default_codec_workers()
    )
}

/// Joins help sections (`concat!` only takes literals, not consts).
fn concat_help(parts: &[&str]) -> String {
    parts.join("\n\n")
}

/// Options of both sides.
#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// A device to migrate; repeat for several (see DEVICE SPECS below).
    #[arg(long = "device", short = 'd', value_name = "SPEC", required_unless_present = "control", value_parser = parse_spec)]
    pub devices: Vec<DeviceSpec>,

    /// Serve a control socket at unix:PATH (mode 0600, the same user only) and let one client,
    /// a VMM, add devices (by spec, or as fds passed with SCM_RIGHTS) and drive the migration
    /// with JSON commands; progress comes back as events. --device is then optional: those
    /// devices come first. See docs/CONTROL.md.
    #[arg(long, value_name = "unix:PATH", value_parser = crate::control::parse_control)]
    pub control: Option<crate::control::ControlAddr>,

    /// Pre-shared key file: both sides prove they hold the key (mutual HMAC-SHA-256
    /// challenge-response) before any device is touched. The whole file is the key (at least
    /// 16 bytes; a trailing newline is stripped).
    #[arg(long, value_name = "PATH")]
    pub psk_file: Option<PathBuf>,

    /// TLS 1.3: this side's certificate chain (PEM). Needs --tls-key and --tls-ca.
    #[arg(long, value_name = "PATH", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// TLS 1.3: this side's private key (PEM).
    #[arg(long, value_name = "PATH", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,

    /// TLS 1.3: the CA certificate(s) the peer's certificate must chain to (PEM).
    #[arg(long, value_name = "PATH", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,

    /// Accept a --psk-file or --tls-key that group or others may read (refused by default, as
    /// ssh refuses such keys).
    #[arg(long)]
    pub insecure_key_perms: bool,

    /// Allow a peer outside loopback without --psk-file or TLS. Without this, such a connection
    /// is refused.
    #[arg(long)]
    pub insecure: bool,

    /// TCP connections per session, 1..=16. The receiver accepts what the sender asks for.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16),
          long_help = streams_help())]
    pub streams: Option<u16>,

    /// Codec worker threads (compression on send, decompression on recv), 1..=64.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64),
          long_help = workers_help())]
    pub workers: Option<u16>,

    /// Seconds of silence after which the peer is declared dead; also bounds every wait (connect,
    /// handshake, a FIFO's writer).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,

    /// Print one JSON object with the outcome and per-device report on stdout at the end (also
    /// on failure). Disables progress bars under --progress auto.
    #[arg(long)]
    pub json: bool,

    /// No progress bars and no summary; only the failure line on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,

    /// Progress on stderr: auto (bars when stderr is a terminal, unless --json or --quiet),
    /// bar, log (one line every --progress-interval seconds with bytes, rate, ETA and phase, and
    /// one at the end: for journals and log files) or none.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,

    /// Seconds between two `--progress log` lines.
    #[arg(long, value_name = "SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub progress_interval: u64,
}

/// Compression choice for `--compress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressArg {
    /// Chosen at run time from the measured link and CPU throughput.
    Auto,
    /// No compression (all-zero chunks are still elided).
    None,
    /// LZ4.
    Lz4,
    /// zstd at a level (1..=19).
    Zstd(i32),
}

/// Why `--compress` did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressError {
    /// Not one of the choices.
    #[error("expected auto, none, lz4 or zstd[:LEVEL], got `{0}`")]
    Unknown(String),
    /// A zstd level outside 1..=19.
    #[error("zstd level must be 1..=19, got `{0}`")]
    Level(String),
}

/// Default zstd level for `--compress zstd`.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Parses `auto|none|lz4|zstd[:LEVEL]`.
pub fn parse_compress(s: &str) -> Result<CompressArg, CompressError> {
    match s {
        "auto" => Ok(CompressArg::Auto),
        "none" => Ok(CompressArg::None),
        "lz4" => Ok(CompressArg::Lz4),
        "zstd" => Ok(CompressArg::Zstd(DEFAULT_ZSTD_LEVEL)),
        _ => match s.strip_prefix("zstd:") {
            Some(l) => match l.parse::<i32>() {
                Ok(v) if (1..=19).contains(&v) => Ok(CompressArg::Zstd(v)),
                _ => Err(CompressError::Level(l.to_owned())),
            },
            None => Err(CompressError::Unknown(s.to_owned())),
        },
    }
}

fn parse_spec(s: &str) -> Result<DeviceSpec, crate::spec::SpecError> {
    s.parse()
}

fn parse_rate(s: &str) -> Result<Rate, UnitError> {
    parse_link_rate(s)
}

fn parse_demo_size(s: &str) -> Result<u64, UnitError> {
    match parse_size(s)? {
        0 => Err(UnitError::Zero),
        v => Ok(v),
    }
}

/// `vfmig send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Address of the receiver (`vfmig recv --listen`): HOST:PORT, e.g. 10.0.0.2:7000,
    /// dst.example.com:7000 (every address the name resolves to is tried in turn) or
    /// [fd00::2]:7000 (IPv6 in brackets).
    #[arg(long, value_name = "ADDR", value_parser = parse_connect)]
    pub connect: Endpoint,

    /// Compression: auto (chosen at run time from measured link and CPU throughput: compress
    /// when the network limits, less or not at all when the CPU does), none, lz4, or zstd[:LEVEL]
    /// (level 1..=19, default 3). All-zero chunks are always elided.
    #[arg(long, value_name = "CODEC", default_value = "auto", value_parser = parse_compress)]
    pub compress: CompressArg,

    /// Use PRE_COPY on devices that support it: stream the state while the device runs, and stop
    /// it only when what is left fits the downtime budget (--max-downtime).
    #[arg(long)]
    pub precopy: bool,

    /// Downtime budget in milliseconds for pre-copy: the switch to STOP_COPY happens once the
    /// remaining state is estimated to move within it.
    #[arg(long, value_name = "MS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub max_downtime: u64,

    /// Longest pre-copy in seconds: after it, --on-max-precopy decides when the remaining state
    /// still does not fit --max-downtime.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub max_precopy_time: u64,

    /// What happens when --max-precopy-time passes without the downtime estimate fitting
    /// --max-downtime: switchover (anyway; the report says if the downtime was exceeded) or
    /// abort (the migration fails and the source devices keep running).
    #[arg(long, value_name = "ACTION", value_enum, default_value_t = PrecopyLimitArg::Switchover)]
    pub on_max_precopy: PrecopyLimitArg,

    /// Cap on the wire rate, with its unit: bits per second with decimal multiples as link
    /// speeds are given (2.5Gbit/s, 500Mbit/s; the short forms 2.5G and 500M mean bits too), or
    /// bytes per second spelled with B/s (300MB/s = 300 * 10^6, 300MiB/s = 300 * 2^20). A bare
    /// number is refused. Default: no cap.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_bandwidth: Option<Rate>,

    /// Allow several devices of which some lack VFIO_MIGRATION_P2P (their peers may lose P2P
    /// writes while they stop). Refused by default, as QEMU does.
    #[arg(long)]
    pub allow_non_p2p: bool,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// `vfmig recv`.
#[derive(Debug, Args)]
pub struct RecvArgs {
    /// Address to listen on: :7000 or 7000 (every address, IPv6 and IPv4), 0.0.0.0:7000,
    /// [::1]:7000, or a host name; port 0 picks a free port (printed on stderr).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub listen: Endpoint,

    /// Replace an existing file at a `file:` destination's PATH (refused by default); the new
    /// file keeps the old one's mode.
    #[arg(long)]
    pub force: bool,

    /// Destination TLS: refuse sources without a certificate signed by --tls-ca.
    #[arg(long, requires = "tls_cert")]
    pub require_client_cert: bool,

    /// Seconds to wait for a source to connect before giving up (exit 1).
    #[arg(long, value_name = "SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub accept_timeout: u64,

    /// Accepted on `recv` too, so both sides can be given the same options; the value is
    /// checked, but the source chooses the codec and every frame says which one it used, so the
    /// destination decodes whatever arrives. No effect here.
    #[arg(long, value_name = "CODEC", default_value = "auto", value_parser = parse_compress)]
    #[allow(dead_code)] // parsed and validated only: the source decides
    pub compress: CompressArg,

    /// Accepted on `recv` too, for symmetric scripts; the source decides whether to pre-copy
    /// and the destination takes pre-copy data whenever it comes. No effect here.
    #[arg(long)]
    #[allow(dead_code)] // parsed only: the source decides
    pub precopy: bool,

    /// Accepted on `recv` too (milliseconds, 1..=3600000), for symmetric scripts; the downtime
    /// budget is applied by the source. No effect here.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    #[allow(dead_code)] // parsed and validated only: the source decides
    pub max_downtime: Option<u64>,

    /// Accepted on `recv` too (same RATE syntax as on `send`), for symmetric scripts; the cap
    /// is enforced by the source, which paces what it sends. No effect here.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    #[allow(dead_code)] // parsed and validated only: the source decides
    pub max_bandwidth: Option<Rate>,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// `--on-max-precopy`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum PrecopyLimitArg {
    /// Switch over anyway.
    Switchover,
    /// Abort the migration.
    Abort,
}

/// `--profile`: one of [`Profile::NAMES`], each listed in the help with its description.
fn profile_parser() -> impl clap::builder::TypedValueParser<Value = Profile> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new(
        Profile::ALL.map(|p| PossibleValue::new(p.as_str()).help(p.description())),
    )
    .try_map(|name| Profile::from_name(&name).ok_or("unknown profile"))
}

/// `vfmig demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// STOP_COPY state size of each device (binary suffixes: 512M = 512 MiB).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_demo_size)]
    pub size: u64,

    /// Number of emulated devices (1..=8); two or more exercise the RUNNING_P2P quiesce order.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=8))]
    pub devices: u16,

    /// Content profile of every device.
    #[arg(long, value_name = "PROFILE", default_value = "mixed", value_parser = profile_parser())]
    pub profile: Profile,

    /// Skip pre-copy (STOP_COPY only).
    #[arg(long)]
    pub no_precopy: bool,

    /// Compression, as for `vfmig send`.
    #[arg(long, value_name = "CODEC", default_value = "auto", value_parser = parse_compress)]
    pub compress: CompressArg,

    /// TCP connections, 1..=16.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16),
          long_help = streams_help())]
    pub streams: Option<u16>,

    /// Codec worker threads on each side, 1..=64.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64),
          long_help = workers_help())]
    pub workers: Option<u16>,

    /// Print the report as one JSON object on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,

    /// Progress on stderr: auto, bar, log or none (as for `vfmig send`).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn compress_accepts_the_documented_spellings_only() {
        assert_eq!(parse_compress("auto"), Ok(CompressArg::Auto));
        assert_eq!(parse_compress("none"), Ok(CompressArg::None));
        assert_eq!(parse_compress("lz4"), Ok(CompressArg::Lz4));
        assert_eq!(
            parse_compress("zstd"),
            Ok(CompressArg::Zstd(DEFAULT_ZSTD_LEVEL))
        );
        assert_eq!(parse_compress("zstd:19"), Ok(CompressArg::Zstd(19)));
        assert_eq!(
            parse_compress("zstd:0"),
            Err(CompressError::Level("0".into()))
        );
        assert_eq!(
            parse_compress("zstd:x"),
            Err(CompressError::Level("x".into()))
        );
        assert_eq!(
            parse_compress("gzip"),
            Err(CompressError::Unknown("gzip".into()))
        );
    }

    #[test]
    fn send_parses_every_option() {
        let cli = Cli::try_parse_from([
            "vfmig",
            "send",
            "--connect",
            "127.0.0.1:7000",
            "--device",
            "emu:size=1M",
            "-d",
            "file:/tmp/x",
            "--psk-file",
            "k",
            "--compress",
            "zstd:5",
            "--streams",
            "4",
            "--precopy",
            "--max-downtime",
            "50",
            "--max-bandwidth",
            "2.5Gbit/s",
            "--timeout",
            "9",
            "--json",
            "--insecure",
        ])
        .expect("parses");
        let Command::Send(s) = cli.command else {
            panic!("send expected");
        };
        assert_eq!(s.common.devices.len(), 2);
        assert_eq!(s.compress, CompressArg::Zstd(5));
        assert_eq!(s.common.streams, Some(4));
        assert_eq!(s.max_bandwidth.map(Rate::bytes_per_sec), Some(312_500_000));
        assert_eq!((s.max_downtime, s.common.timeout), (50, 9));
        assert!(s.precopy && s.common.json && s.common.insecure);
    }

    #[test]
    fn recv_accepts_the_issue_options_that_send_takes() {
        let cli = Cli::try_parse_from([
            "vfmig",
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--device",
            "emu:size=1M",
            "--compress",
            "zstd:5",
            "--precopy",
            "--max-downtime",
            "50",
            "--max-bandwidth",
            "2.5G",
            "--streams",
            "2",
            "--timeout",
            "9",
            "--json",
            "--insecure",
        ])
        .expect("parses");
        let Command::Recv(r) = cli.command else {
            panic!("recv expected");
        };
        assert_eq!(r.compress, CompressArg::Zstd(5));
        assert!(r.precopy);
        assert_eq!(r.max_downtime, Some(50));
        for bad in [
            ["--compress", "gz"],
            ["--max-downtime", "0"],
            ["--max-bandwidth", "0"],
        ] {
            let mut args = vec![
                "vfmig",
                "recv",
                "--listen",
                "127.0.0.1:0",
                "-d",
                "emu:size=1M",
            ];
            args.extend(bad);
            let err = Cli::try_parse_from(&args).expect_err("bad value refused on recv too");
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn usage_errors_are_clap_errors_that_exit_2() {
        for args in [
            vec!["vfmig", "send", "--connect", "127.0.0.1:1"],
            vec!["vfmig", "send", "--connect", "nohost", "-d", "emu:size=1M"],
            vec![
                "vfmig",
                "recv",
                "--listen",
                "127.0.0.1:1",
                "-d",
                "emu:size=1Q",
            ],
            vec![
                "vfmig",
                "recv",
                "--listen",
                "127.0.0.1:1",
                "-d",
                "emu:size=1M",
                "--streams",
                "0",
            ],
            vec![
                "vfmig",
                "recv",
                "--listen",
                "127.0.0.1:1",
                "-d",
                "emu:size=1M",
                "--tls-cert",
                "c",
            ],
            vec![
                "vfmig",
                "send",
                "--connect",
                "127.0.0.1:1",
                "-d",
                "emu:size=1M",
                "--compress",
                "gz",
            ],
            vec!["vfmig", "bogus"],
        ] {
            let err = Cli::try_parse_from(&args).expect_err("must be refused");
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }
}
