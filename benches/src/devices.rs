//! The emulated devices every benchmark migrates: the same config on both sides, so a
//! destination in another process (or network namespace) accepts exactly the source's stream.

use vfmig_vfio::emulated::{DataFdBackend, EmulatedConfig, EmulatedDevice, EmulatedError, Profile};

/// Content seed shared by every benchmark device.
pub const SEED: u64 = 0x7f4a_7c15;

/// Why a benchmark device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// The profile name is not one of `mixed`, `zero`, `random`, `text`.
    #[error("unknown content profile {0:?} (mixed, zero, random, text)")]
    Profile(String),
    /// The data fd kind is not `fuse` or `mem`.
    #[error("unknown data fd {0:?} (fuse, mem)")]
    DataFd(String),
    /// The device refused the config or its FUSE host could not start.
    #[error(transparent)]
    Emulated(#[from] EmulatedError),
}

/// The config of a benchmark device: `size` bytes of `profile` content, all of it streamed in
/// STOP_COPY (no PRE_COPY capability, so the whole state is downtime), no dirtying, no faults.
pub fn config(name: &str, size: u64, profile: &str) -> Result<EmulatedConfig, DevicesError> {
    let profile =
        Profile::from_name(profile).ok_or_else(|| DevicesError::Profile(profile.to_owned()))?;
    Ok(EmulatedConfig::new(name, size, SEED)
        .with_profile(profile)
        .with_precopy(None))
}

/// A source device in RUNNING.
pub fn source(size: u64, profile: &str) -> Result<EmulatedDevice, DevicesError> {
    Ok(EmulatedDevice::new(config("bench-src", size, profile)?)?)
}

/// A destination device in RUNNING, able to resume what [`source`] with the same size streams
/// (its own content profile does not matter: it validates the stream it is given).
pub fn destination(size: u64) -> Result<EmulatedDevice, DevicesError> {
    Ok(EmulatedDevice::new(config("bench-dst", size, "mixed")?)?)
}

/// Parses a data fd kind: `fuse` (a FUSE file, the default) or `mem` (the memory-speed pipe).
pub fn data_fd(name: &str) -> Result<DataFdBackend, DevicesError> {
    DataFdBackend::from_name(name).ok_or_else(|| DevicesError::DataFd(name.to_owned()))
}

/// [`config`] with the given kind of data fd (every benchmark device is STOP_COPY-only, which
/// the memory-speed data fd requires).
pub fn config_with(
    name: &str,
    size: u64,
    profile: &str,
    data_fd: DataFdBackend,
) -> Result<EmulatedConfig, DevicesError> {
    Ok(config(name, size, profile)?.with_data_fd(data_fd))
}

/// [`source`] with the given kind of data fd.
pub fn source_with(
    size: u64,
    profile: &str,
    data_fd: DataFdBackend,
) -> Result<EmulatedDevice, DevicesError> {
    Ok(EmulatedDevice::new(config_with(
        "bench-src",
        size,
        profile,
        data_fd,
    )?)?)
}

/// A destination device for a [`source_with`] of the same size and `profile` (the profile is
/// part of the device's compatibility identity, which the vfmig handshake compares), with the
/// given kind of data fd.
pub fn destination_with(
    size: u64,
    profile: &str,
    data_fd: DataFdBackend,
) -> Result<EmulatedDevice, DevicesError> {
    Ok(EmulatedDevice::new(config_with(
        "bench-dst",
        size,
        profile,
        data_fd,
    )?)?)
}
