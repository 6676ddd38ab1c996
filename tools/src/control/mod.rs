//! `vfmig send --control unix:PATH` and `vfmig recv --control unix:PATH`: a VMM drives the
//! migration over a UNIX socket and hands over its device fds (docs/CONTROL.md).
//!
//! - [`server`]: the socket (0600, owner-only by `SO_PEERCRED`), one client at a time, bounded
//!   line reading with the descriptors that came with each line, replies and events.
//! - [`source`] / [`destination`]: what the commands do on each side; the session runs on a
//!   worker thread and never depends on the client behaving.
//! - [`fdpass`]: the only `unsafe` of the CLI (taking ownership of received descriptors).
//! - [`fd_sink`]: a destination `file` device that is a client's fd.

pub mod destination;
pub mod fd_sink;
pub mod fdpass;
pub mod proto;
pub mod server;
pub mod source;
pub mod worker;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use vfmig_vfio::{MigrationDevice, VfioDevice};

use crate::devices::{self, Side};
use crate::error::DeviceLabel;
use crate::file_device::FileSource;
use crate::spec::DeviceSpec;
use proto::{CmdError, ErrorClass, Request};

/// At most this many devices per session.
pub const MAX_DEVICES: usize = 64;

/// `--control unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlAddr {
    /// The socket's path.
    pub path: PathBuf,
}

/// A `--control` value that is not `unix:PATH`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected unix:PATH, got `{0}`")]
pub struct ControlAddrError(String);

/// Parses `unix:PATH`.
pub fn parse_control(s: &str) -> Result<ControlAddr, ControlAddrError> {
    match s.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => Ok(ControlAddr { path: p.into() }),
        _ => Err(ControlAddrError(s.to_owned())),
    }
}

/// Why the control socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Something already exists at the socket's path.
    #[error("{path} exists (remove it, or choose another --control path)")]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// Creating, binding or polling the socket failed.
    #[error("control socket {path}: {op}: {source}")]
    Socket {
        /// The path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The devices a client added, in session order.
#[derive(Default)]
pub struct DeviceSet {
    /// The devices.
    pub list: Vec<Box<dyn MigrationDevice>>,
    /// Their names and kinds.
    pub labels: Vec<DeviceLabel>,
}

impl From<devices::Devices> for DeviceSet {
    /// The devices of `--device`, first in the session.
    fn from(d: devices::Devices) -> DeviceSet {
        DeviceSet {
            list: d.list,
            labels: d.labels,
        }
    }
}

impl std::fmt::Debug for DeviceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSet")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl DeviceSet {
    /// `add-device`: a device by spec (`{"spec": "emu:..."}`, opened by vfmig, no fd), or an fd
    /// the client opened (`{"kind": "file"|"vfio", "name": N}`, or
    /// `{"kind": "vfio-group", "name": DEVICE}` with the group's fd).
    pub fn add(
        &mut self,
        req: &Request,
        mut fds: Vec<OwnedFd>,
        side: Side,
        timeout: Duration,
    ) -> Result<Value, CmdError> {
        req.only_args(&["spec", "kind", "name", "force"])?;
        if self.list.len() >= MAX_DEVICES {
            return Err(CmdError::new(
                ErrorClass::Busy,
                format!("at most {MAX_DEVICES} devices"),
            ));
        }
        let index = self.list.len();
        let (dev, kind): (Box<dyn MigrationDevice>, &'static str) =
            match (req.str_arg("spec")?, req.str_arg("kind")?) {
                (Some(spec), None) => {
                    if !fds.is_empty() {
                        return Err(fd_err("a device given by `spec` takes no fd"));
                    }
                    self.open_spec(spec, index, side, timeout, req.bool_arg("force")?)?
                }
                (None, Some(kind)) => {
                    let name = req.str_arg("name")?.ok_or_else(|| {
                        CmdError::new(ErrorClass::InvalidArgument, "`kind` needs a `name`")
                    })?;
                    if fds.len() != 1 {
                        return Err(fd_err(format!(
                            "`kind` {kind} takes exactly 1 fd, {} came with the command",
                            fds.len()
                        )));
                    }
                    let fd = fds.remove(0);
                    from_fd(kind, name, fd, side, timeout)?
                }
                _ => {
                    return Err(CmdError::new(
                        ErrorClass::InvalidArgument,
                        "give either `spec` or `kind` (with `name` and one fd)",
                    ))
                }
            };
        let name = dev.name().to_owned();
        self.labels.push(DeviceLabel {
            name: name.clone(),
            kind,
        });
        self.list.push(dev);
        Ok(json!({ "index": index, "name": name, "kind": kind }))
    }

    fn open_spec(
        &self,
        spec: &str,
        index: usize,
        side: Side,
        timeout: Duration,
        force: bool,
    ) -> Result<(Box<dyn MigrationDevice>, &'static str), CmdError> {
        let mut spec: DeviceSpec = spec.parse().map_err(|e: crate::spec::SpecError| {
            CmdError::new(ErrorClass::InvalidArgument, e.to_string())
        })?;
        // The seed defaults to the device's position, as on the command line.
        if let DeviceSpec::Emu(e) = &mut spec {
            e.seed = Some(e.seed.unwrap_or(index as u64));
        }
        let kind = spec.kind();
        let mut opened = devices::open(std::slice::from_ref(&spec), side, timeout, force)
            .map_err(|e| CmdError::new(ErrorClass::DeviceError, crate::error::describe(&e)))?;
        let dev = opened
            .list
            .pop()
            .ok_or_else(|| CmdError::new(ErrorClass::DeviceError, "no device opened"))?;
        Ok((dev, kind))
    }
}

fn fd_err(desc: impl Into<String>) -> CmdError {
    CmdError::new(ErrorClass::FdError, desc)
}

fn device_err(e: impl std::fmt::Display) -> CmdError {
    CmdError::new(ErrorClass::DeviceError, e.to_string())
}

/// Adopts a client's fd as a device of `kind`.
fn from_fd(
    kind: &str,
    name: &str,
    fd: OwnedFd,
    side: Side,
    timeout: Duration,
) -> Result<(Box<dyn MigrationDevice>, &'static str), CmdError> {
    Ok(match (kind, side) {
        ("file", Side::Source) => (
            Box::new(FileSource::from_fd(fd, name.to_owned(), timeout).map_err(device_err)?),
            "file",
        ),
        ("file", Side::Destination) => (
            Box::new(fd_sink::FdSink::new(fd, name.to_owned()).map_err(device_err)?),
            "file",
        ),
        ("vfio", _) => (
            Box::new(VfioDevice::from_fd(fd, name).map_err(device_err)?),
            "vfio",
        ),
        ("vfio-group", _) => (
            Box::new(VfioDevice::from_group_fd(fd, name).map_err(device_err)?),
            "vfio",
        ),
        _ => {
            return Err(CmdError::new(
                ErrorClass::InvalidArgument,
                format!("unknown kind `{kind}` (file, vfio, vfio-group)"),
            ))
        }
    })
}

/// The device states last reported, so that `device-state` fires on changes only.
#[derive(Debug, Default)]
pub struct StateWatch(Vec<Value>);

impl StateWatch {
    /// Sends `device-state` for each device whose state changed since the last call (all of
    /// them the first time).
    pub fn emit<D: MigrationDevice>(&mut self, devices: &mut [D], out: &worker::Emitter) {
        let now = device_states(devices);
        for (i, d) in now.iter().enumerate() {
            if self.0.get(i) != Some(d) {
                out.event("device-state", d.clone());
            }
        }
        self.0 = now;
    }
}

/// The device states as event data: `[{"index", "name", "state"}]` (state: the uAPI name, or
/// null when it cannot be read).
pub fn device_states<D: MigrationDevice>(devices: &mut [D]) -> Vec<Value> {
    devices
        .iter_mut()
        .enumerate()
        .map(|(index, d)| {
            let state = d.state().ok().map(|s| s.to_string());
            json!({ "index": index, "name": d.name(), "state": state })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_addresses_need_the_unix_prefix_and_a_path() {
        assert_eq!(
            parse_control("unix:/run/vfmig.sock").map(|a| a.path),
            Ok(PathBuf::from("/run/vfmig.sock"))
        );
        assert!(parse_control("unix:").is_err());
        assert!(parse_control("/run/vfmig.sock").is_err());
        assert!(parse_control("tcp:1.2.3.4:5").is_err());
    }
}
