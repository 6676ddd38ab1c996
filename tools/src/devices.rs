//! From parsed specs to [`MigrationDevice`]s, and from options to the transport's
//! [`SessionConfig`]: everything the command sets up before a migration starts.

use std::path::PathBuf;
use std::time::Duration;

use vfmig_transport::{AuthConfig, SessionConfig, TlsConfig};
use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice, Faults, PrecopyInfoVersion};
use vfmig_vfio::{MigrationDevice, VfioDevice};

use crate::cli::CommonArgs;
use crate::error::{CliError, DeviceLabel, UsageError};
use crate::file_device::{FileSink, FileSource};
use crate::spec::{DeviceSpec, EmuSpec, FileTarget, Precopy};

/// Shortest accepted pre-shared key, in bytes.
pub const MIN_PSK_LEN: usize = 16;

/// Which side a device is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `vfmig send`.
    Source,
    /// `vfmig recv`.
    Destination,
}

/// The devices of one side, in command-line order.
pub struct Devices {
    /// The devices, handed to the pipeline.
    pub list: Vec<Box<dyn MigrationDevice>>,
    /// Name and kind of each, for messages.
    pub labels: Vec<DeviceLabel>,
    /// Expected raw stream size of each, when known (for progress bars).
    pub totals: Vec<Option<u64>>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

/// The emulated device config for `spec` at position `index`. The seed defaults to the position,
/// so both sides agree without saying it; the destination never dirties.
pub fn emu_config(spec: &EmuSpec, index: usize, side: Side) -> EmulatedConfig {
    let seed = spec.seed.unwrap_or(index as u64);
    let precopy = match spec.precopy {
        Precopy::Whole => Some(u64::MAX),
        Precopy::Off => None,
        Precopy::Initial(n) => Some(n),
    };
    let dirty = match side {
        Side::Source => spec.dirty_rate.unwrap_or(0),
        Side::Destination => 0,
    };
    EmulatedConfig::new(format!("emu{index}"), spec.size, seed)
        .with_profile(spec.profile)
        .with_precopy(precopy)
        .with_p2p(spec.p2p)
        .with_dirty_rate(dirty)
        .with_precopy_info(
            if spec.precopy_info_v2 {
                PrecopyInfoVersion::V2
            } else {
                PrecopyInfoVersion::V1
            },
            spec.reinit_after,
        )
        .with_data_fd(spec.data_fd)
        .with_faults(Faults {
            read_error_at: spec.read_error_at,
            slow_bytes_per_sec: spec.slow,
            refuse_resume: spec.refuse_resume,
            ..Faults::default()
        })
}

fn emulated_error(index: usize, source: vfmig_vfio::emulated::EmulatedError) -> CliError {
    CliError::Emulated { index, source }
}

/// Checks what can be checked about the specs as a whole before opening anything.
pub fn check_specs(specs: &[DeviceSpec], side: Side) -> Result<(), UsageError> {
    let mut stdin_seen = false;
    let mut paths: Vec<(usize, PathBuf)> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        match spec {
            DeviceSpec::File(FileTarget::Stdio) if side == Side::Source => {
                if stdin_seen {
                    return Err(UsageError::StdinTwice);
                }
                stdin_seen = true;
            }
            DeviceSpec::File(FileTarget::Path(p)) if side == Side::Destination => {
                let canon = p
                    .parent()
                    .and_then(|d| {
                        let d = if d.as_os_str().is_empty() {
                            std::path::Path::new(".")
                        } else {
                            d
                        };
                        d.canonicalize().ok()
                    })
                    .zip(p.file_name())
                    .map_or_else(|| p.clone(), |(d, n)| d.join(n));
                if let Some((first, _)) = paths.iter().find(|(_, q)| *q == canon) {
                    return Err(UsageError::DuplicateFile {
                        first: *first,
                        second: i,
                        path: p.clone(),
                    });
                }
                paths.push((i, canon));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Opens every device of `specs` for `side`. `timeout` bounds a FIFO source's wait for a writer;
/// `replace` lets a destination `file:` replace an existing file (`--force`). A destination
/// `file:` first removes the temporary files a receiver that died left for the same path.
pub fn open(
    specs: &[DeviceSpec],
    side: Side,
    timeout: Duration,
    replace: bool,
) -> Result<Devices, CliError> {
    check_specs(specs, side)?;
    let mut devices = Devices {
        list: Vec::with_capacity(specs.len()),
        labels: Vec::with_capacity(specs.len()),
        totals: Vec::with_capacity(specs.len()),
    };
    for (index, spec) in specs.iter().enumerate() {
        let file_err = |source| CliError::Usage(UsageError::FileDevice { index, source });
        let (dev, total): (Box<dyn MigrationDevice>, Option<u64>) = match spec {
            DeviceSpec::Emu(e) => {
                let d = EmulatedDevice::new(emu_config(e, index, side))
                    .map_err(|err| emulated_error(index, err))?;
                (Box::new(d), Some(e.size))
            }
            DeviceSpec::File(t) => match side {
                Side::Source => {
                    let mut d = FileSource::open(t, timeout).map_err(file_err)?;
                    let size = d.stop_copy_size().ok().filter(|s| *s > 0);
                    (Box::new(d), size)
                }
                Side::Destination => {
                    let sink = FileSink::new(t, replace).map_err(file_err)?;
                    if let FileTarget::Path(p) = t {
                        for stale in crate::file_device::stale_temps(p) {
                            if std::fs::remove_file(&stale).is_ok() {
                                say!(
                                    "vfmig: removed {}, left by a receiver that is no longer running",
                                    stale.display()
                                );
                            }
                        }
                    }
                    (Box::new(sink), None)
                }
            },
            DeviceSpec::Vfio(p) => {
                if std::fs::symlink_metadata(p).is_err() {
                    return Err(CliError::Usage(UsageError::NoSuchDevice {
                        index,
                        path: p.clone(),
                    }));
                }
                let mut d = VfioDevice::open(p).map_err(|source| CliError::OpenDevice {
                    index,
                    kind: "vfio",
                    source,
                })?;
                let size = match side {
                    Side::Source => d.stop_copy_size().ok().filter(|s| *s > 0),
                    Side::Destination => None,
                };
                (Box::new(d), size)
            }
        };
        devices.labels.push(DeviceLabel {
            name: dev.name().to_owned(),
            kind: spec.kind(),
        });
        devices.totals.push(total);
        devices.list.push(dev);
    }
    Ok(devices)
}

/// Refuses a private key file that group or others may read, as ssh does, unless the operator
/// accepted it (`--insecure-key-perms`).
pub fn check_key_perms(
    what: &'static str,
    path: &std::path::Path,
    accept_any: bool,
) -> Result<(), UsageError> {
    use std::os::unix::fs::PermissionsExt;
    if accept_any {
        return Ok(());
    }
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => Err(UsageError::KeyPermissions {
            what,
            path: path.to_path_buf(),
            mode: m.permissions().mode() & 0o7777,
        }),
        // A missing file is reported by whoever reads it.
        _ => Ok(()),
    }
}

/// Reads a PSK file: the whole file is the key, one trailing newline (`\n` or `\r\n`) stripped.
/// A file group or others may read is refused unless `accept_any_perms`.
pub fn read_psk(path: &std::path::Path, accept_any_perms: bool) -> Result<Vec<u8>, UsageError> {
    let mut key = std::fs::read(path).map_err(|source| UsageError::PskFile {
        path: path.to_path_buf(),
        source,
    })?;
    check_key_perms("--psk-file", path, accept_any_perms)?;
    if key.ends_with(b"\n") {
        key.pop();
        if key.ends_with(b"\r") {
            key.pop();
        }
    }
    if key.len() < MIN_PSK_LEN {
        return Err(UsageError::PskTooShort {
            path: path.to_path_buf(),
            len: key.len(),
            min: MIN_PSK_LEN,
        });
    }
    Ok(key)
}

/// Pool buffers a side needs for `workers` codec workers to all have work: the transport's
/// window (reorder window on the destination, unacknowledged sends on the source), what it keeps
/// ready (8, plus one per connection of `cfg.streams`), an input and an output buffer per worker,
/// and one per device. Never fewer than the transport's default, so hosts that the default
/// already fits (up to 7 workers) keep exactly the default pool. A receiver asked for more
/// connections than its own default runs fewer workers rather than fail (the pipeline's check).
pub fn pool_slots_for(cfg: &SessionConfig, workers: usize, devices: usize) -> usize {
    let slot = u64::try_from(cfg.slot_size.max(1)).unwrap_or(u64::MAX);
    let window = usize::try_from(cfg.window_bytes.div_ceil(slot)).unwrap_or(usize::MAX);
    let need = window
        .saturating_add(8 + cfg.streams)
        .saturating_add(workers.saturating_mul(2))
        .saturating_add(devices.max(1));
    need.max(cfg.pool_slots)
}

/// The transport configuration for these options.
pub fn session_config(
    common: &CommonArgs,
    require_client_cert: bool,
) -> Result<SessionConfig, UsageError> {
    let mut cfg = SessionConfig {
        // Connections: --streams, else one per 8 usable cores, 1..=4 (see
        // `vfmig_pipeline::default_streams` for why). The receiver takes what the sender asks for.
        streams: common
            .streams
            .map_or_else(vfmig_pipeline::default_streams, usize::from),
        ..SessionConfig::default()
    };
    let workers = common
        .workers
        .map_or_else(vfmig_pipeline::default_codec_workers, usize::from);
    cfg.pool_slots = pool_slots_for(&cfg, workers, common.devices.len());
    if let Some(p) = &common.psk_file {
        cfg.auth = AuthConfig::Psk(read_psk(p, common.insecure_key_perms)?);
    }
    if let (Some(cert), Some(key), Some(ca)) = (&common.tls_cert, &common.tls_key, &common.tls_ca) {
        for (what, path) in [("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)] {
            std::fs::metadata(path).map_err(|source| UsageError::TlsFile {
                what,
                path: path.clone(),
                source,
            })?;
        }
        check_key_perms("--tls-key", key, common.insecure_key_perms)?;
        cfg.tls = Some(TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
            server_name: None,
            require_client_cert,
        });
    }
    cfg.insecure = common.insecure;
    cfg.timeout = Duration::from_secs(common.timeout);
    // Keepalive well inside the liveness timeout.
    cfg.keepalive = cfg.keepalive.min(cfg.timeout / 3);
    cfg.connect_timeout = cfg.connect_timeout.min(cfg.timeout);
    cfg.validate().map_err(UsageError::Transport)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Profile;

    #[test]
    fn pool_grows_only_for_more_workers_than_the_default_pool_feeds() {
        let cfg = SessionConfig::default();
        assert_eq!(pool_slots_for(&cfg, 2, 1), cfg.pool_slots);
        assert_eq!(pool_slots_for(&cfg, 7, 1), cfg.pool_slots);
        // 16 window + 9 transport + 32 for 16 workers + 1 device.
        assert_eq!(pool_slots_for(&cfg, 16, 1), 58);
        assert!(pool_slots_for(&cfg, 64, 4) > pool_slots_for(&cfg, 16, 4));
    }

    #[test]
    fn psk_file_strips_one_newline_and_refuses_short_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("k");
        std::fs::write(&p, "0123456789abcdef\r\n").expect("write");
        assert_eq!(read_psk(&p, true).expect("key"), b"0123456789abcdef");
        std::fs::write(&p, "short\n").expect("write");
        assert!(matches!(
            read_psk(&p, true),
            Err(UsageError::PskTooShort { len: 5, .. })
        ));
        assert!(matches!(
            read_psk(&dir.path().join("missing"), true),
            Err(UsageError::PskFile { .. })
        ));
    }

    #[test]
    fn stdin_twice_and_same_destination_file_twice_are_usage_errors() {
        let s: Vec<DeviceSpec> = vec![
            "file:-".parse().expect("spec"),
            "file:-".parse().expect("spec"),
        ];
        assert!(matches!(
            check_specs(&s, Side::Source),
            Err(UsageError::StdinTwice)
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let a = format!("file:{}/x", dir.path().display());
        let b = format!("file:{}/./x", dir.path().display());
        let s: Vec<DeviceSpec> = vec![a.parse().expect("spec"), b.parse().expect("spec")];
        assert!(matches!(
            check_specs(&s, Side::Destination),
            Err(UsageError::DuplicateFile {
                first: 0,
                second: 1,
                ..
            })
        ));
    }

    #[test]
    fn emu_config_follows_the_spec_and_destination_never_dirties() {
        let Ok(DeviceSpec::Emu(e)) =
            "emu:size=1M,precopy=off,p2p=off,dirty-rate=1M,profile=text".parse::<DeviceSpec>()
        else {
            panic!("spec parses");
        };
        let src = emu_config(&e, 3, Side::Source);
        assert_eq!(
            (src.size, src.seed, src.precopy, src.p2p, src.dirty_rate),
            (1 << 20, 3, None, false, 1 << 20)
        );
        assert_eq!(src.profile, Profile::Text);
        assert_eq!(emu_config(&e, 3, Side::Destination).dirty_rate, 0);
        assert_eq!(
            (src.precopy_info, src.reinit_after),
            (PrecopyInfoVersion::V1, None)
        );
        let Ok(DeviceSpec::Emu(v2)) =
            "emu:size=1M,precopy-info=v2,reinit-after=4K".parse::<DeviceSpec>()
        else {
            panic!("spec parses");
        };
        let cfg = emu_config(&v2, 0, Side::Source);
        assert_eq!(
            (cfg.precopy_info, cfg.reinit_after),
            (PrecopyInfoVersion::V2, Some(4096))
        );
    }
}
