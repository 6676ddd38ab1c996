//! The control socket: one client at a time, bounded reading, replies and events.
//!
//! The server thread owns the socket and is its only writer; the migration runs on a worker
//! thread (see [`super::source`], [`super::destination`]) that sends replies and events through
//! a bounded channel. Nothing a client sends reaches the migration except well-formed commands
//! valid in the current step; a client that closes the connection (or cannot be written to)
//! cancels the migration, with rollback.

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::{json, Value};
use vfmig_vfio::MigrationDevice;

use super::fdpass;
use super::proto::{self, CmdError, ErrorClass, Reply, Request, MAX_LINE};
use super::worker::{Emitter, Reports, Snapshot};
use super::{ControlAddr, ControlError, DeviceSet};
use crate::devices::Side;
use crate::error::CliError;
use crate::signals::Cancel;

/// Replies and events waiting for the server thread to write them.
pub const OUT_QUEUE: usize = 256;
/// Descriptors held for one command line at most (more are closed and the command refused).
pub const MAX_PENDING_FDS: usize = 8;
/// Bytes read per round; every complete line is answered before the next read.
const READ_CHUNK: usize = 4096;
/// A client that does not read its replies for this long is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the server looks at the worker when the socket is quiet.
const POLL_MS: u16 = 20;

/// What the worker sends to the client.
#[derive(Debug)]
pub enum Out {
    /// The reply to the command with this id.
    Reply(Option<Value>, Reply),
    /// An event.
    Event(&'static str, Value),
}

/// Where a side's migration is, as the server needs to know it.
#[derive(Debug)]
pub enum Outcome {
    /// Not started: `quit` and a vanished client end the process.
    Idle,
    /// Started and not over.
    Running,
    /// Over (given once); the process ends when the client leaves or says `quit`.
    Ended(Result<(), CliError>),
}

/// What the server knows of a side without asking it.
#[derive(Debug)]
pub struct Shared {
    /// Which side.
    pub side: Side,
    /// The side's commands besides those the server answers.
    pub commands: &'static [&'static str],
    /// The devices added so far.
    pub devices: DeviceSet,
    /// `start` was accepted: no more devices.
    pub started: bool,
    /// `--timeout` (a FIFO source's wait for its writer).
    pub timeout: Duration,
    /// What `status` answers.
    pub snapshot: Snapshot,
}

impl Shared {
    /// Before `start`, with the devices of `--device`.
    pub fn new(
        side: Side,
        commands: &'static [&'static str],
        devices: DeviceSet,
        timeout: Duration,
    ) -> Shared {
        Shared {
            side,
            commands,
            devices,
            started: false,
            timeout,
            snapshot: Snapshot::new(),
        }
    }
}

impl Shared {
    /// `start` was accepted: no more devices, `status` answers `state`. Returns the devices and
    /// what the worker reports through (to the client on `out`; `--json`).
    pub fn start(
        &mut self,
        state: &'static str,
        out: Emitter,
        json: bool,
    ) -> (Vec<Box<dyn MigrationDevice>>, Reports) {
        let devices = std::mem::take(&mut self.devices);
        self.started = true;
        self.snapshot.set(json!({ "state": state }));
        let rep = Reports::new(out, self.snapshot.clone(), devices.labels, json);
        (devices.list, rep)
    }
}

/// One side's commands. The server itself answers `add-device`, `status`, `cancel`, `quit`
/// and `qmp_capabilities`.
pub trait Backend {
    /// The state the server reads and `add-device` fills.
    fn shared(&mut self) -> &mut Shared;
    /// Runs one of [`Shared::commands`] (which take no fd). `None`: the worker replies later.
    fn execute(&mut self, req: &Request) -> Option<Reply>;
    /// Cancel, with rollback: the client left mid-migration, or SIGINT / SIGTERM came.
    fn cancel(&mut self);
    /// Where the migration is.
    fn poll_outcome(&mut self) -> Outcome;
}

/// Removes the socket file when the server ends.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Creates the socket at `path`, mode 0600 from the start (umask around `bind`).
fn bind(path: &Path) -> Result<(UnixListener, SocketFile), ControlError> {
    let err = |op, source| ControlError::Socket {
        path: path.to_owned(),
        op,
        source,
    };
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(ControlError::Exists {
            path: path.to_owned(),
        });
    }
    use nix::sys::stat::{umask, Mode};
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(|e| err("bind", e))?;
    let file = SocketFile(path.to_owned());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err("chmod 0600", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| err("set non-blocking", e))?;
    Ok((listener, file))
}

/// A complete command line with the descriptors that came with it, or why it is refused.
type Line = Result<(Vec<u8>, Vec<OwnedFd>), CmdError>;

/// The connected client.
struct Conn {
    stream: UnixStream,
    line: Vec<u8>,
    fds: Vec<OwnedFd>,
    overlong: bool,
    fd_overflow: bool,
}

impl Conn {
    fn write_line(&mut self, line: &str) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.stream.write_all(&bytes)
    }

    /// Adds read bytes to the current line; returns the complete lines with their descriptors
    /// (an error for a line that was too long or brought too many descriptors).
    fn take_lines(&mut self, bytes: &[u8]) -> Vec<Line> {
        let mut done = Vec::new();
        let mut parts = bytes.split(|b| *b == b'\n').peekable();
        while let Some(part) = parts.next() {
            if !self.overlong {
                if self.line.len() + part.len() > MAX_LINE {
                    self.overlong = true;
                    self.line = Vec::new();
                } else {
                    self.line.extend_from_slice(part);
                }
            }
            if parts.peek().is_none() {
                break;
            }
            // A newline ended this part.
            let fds = std::mem::take(&mut self.fds);
            let line = std::mem::take(&mut self.line);
            if std::mem::take(&mut self.overlong) {
                self.fd_overflow = false;
                done.push(Err(CmdError::new(
                    ErrorClass::GenericError,
                    format!("line longer than {MAX_LINE} bytes; ignored"),
                )));
            } else if std::mem::take(&mut self.fd_overflow) {
                done.push(Err(CmdError::new(
                    ErrorClass::FdError,
                    format!(
                        "more than {MAX_PENDING_FDS} fds with one command; all were closed and \
                         the command ignored"
                    ),
                )));
            } else if line.iter().all(u8::is_ascii_whitespace) {
                if !fds.is_empty() {
                    done.push(Err(CmdError::new(
                        ErrorClass::FdError,
                        format!("{} fds came without a command; closed", fds.len()),
                    )));
                }
            } else {
                done.push(Ok((line, fds)));
            }
        }
        done
    }

    fn add_fds(&mut self, fds: Vec<OwnedFd>, truncated: bool) {
        if truncated || self.fds.len() + fds.len() > MAX_PENDING_FDS {
            self.fd_overflow = true;
            self.fds.clear();
        } else {
            self.fds.extend(fds);
        }
    }
}

/// Writes one error line to a client that is refused, and drops it.
fn refuse(stream: UnixStream, class: ErrorClass, desc: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let mut s = stream;
    let line = proto::reply_line(None, Err(CmdError::new(class, desc)));
    let _ = s.write_all(format!("{line}\n").as_bytes());
}

/// The server loop state.
struct Server<B: Backend> {
    backend: B,
    conn: Option<Conn>,
    /// The client left (or was dropped); no other is accepted.
    gone: bool,
    quit: bool,
    running: bool,
    ended: Option<Result<(), CliError>>,
    owner: u32,
}

impl<B: Backend> Server<B> {
    fn send(&mut self, line: &str) {
        if let Some(c) = &mut self.conn {
            if c.write_line(line).is_err() {
                self.lose_client();
            }
        }
    }

    fn lose_client(&mut self) {
        self.conn = None;
        if !self.gone {
            self.gone = true;
            // A `start` in the same read as the hang-up counts.
            self.refresh();
            if self.running {
                say!("vfmig: the control client left mid-migration: cancelling (rollback)");
                self.backend.cancel();
            }
        }
    }

    fn accept(&mut self, listener: &UnixListener) {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        if self.conn.is_some() || self.gone {
            refuse(
                stream,
                ErrorClass::Busy,
                "another client is (or was) connected: one client per vfmig process",
            );
            return;
        }
        match fdpass::peer_uid(&stream) {
            Ok(uid) if uid == self.owner => {}
            Ok(uid) => {
                say!(
                    "vfmig: refused a control client with uid {uid} (not {})",
                    self.owner
                );
                refuse(
                    stream,
                    ErrorClass::PermissionDenied,
                    "only the user running vfmig may connect",
                );
                return;
            }
            Err(_) => return,
        }
        if stream.set_nonblocking(false).is_err()
            || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
        {
            return;
        }
        self.conn = Some(Conn {
            stream,
            line: Vec::new(),
            fds: Vec::new(),
            overlong: false,
            fd_overflow: false,
        });
        let sh = self.backend.shared();
        let role = match sh.side {
            Side::Source => "source",
            Side::Destination => "destination",
        };
        let mut commands = vec!["add-device", "status", "cancel", "quit"];
        commands.extend_from_slice(sh.commands);
        let greeting = proto::greeting(role, &commands);
        self.send(&greeting);
    }

    fn read(&mut self) {
        let Some(c) = &mut self.conn else { return };
        let mut buf = [0u8; READ_CHUNK];
        let got = match fdpass::recv_with_fds(&c.stream, &mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(_) => {
                self.lose_client();
                return;
            }
        };
        if got.len == 0 && got.fds.is_empty() {
            self.lose_client();
            return;
        }
        c.add_fds(got.fds, got.truncated);
        let lines = c.take_lines(&buf[..got.len]);
        for line in lines {
            match line {
                Ok((text, fds)) => self.dispatch(&text, fds),
                Err(e) => self.send(&proto::reply_line(None, Err(e))),
            }
        }
    }

    fn dispatch(&mut self, text: &[u8], fds: Vec<OwnedFd>) {
        let req = match proto::parse(text) {
            Ok(r) => r,
            Err((id, e)) => return self.send(&proto::reply_line(id, Err(e))),
        };
        let name = req.execute.as_str();
        let reply = if name != "add-device" && !fds.is_empty() {
            Some(Err(CmdError::new(
                ErrorClass::FdError,
                format!(
                    "`{name}` takes no fd; the {} that came with it were closed",
                    fds.len()
                ),
            )))
        } else if name == "quit" {
            self.refresh();
            Some(if self.running {
                Err(CmdError::new(
                    ErrorClass::InvalidState,
                    "a migration is in progress: `cancel` it, or wait for its end",
                ))
            } else {
                self.quit = true;
                Ok(json!({}))
            })
        } else if name == "qmp_capabilities" {
            Some(Ok(json!({})))
        } else if name == "add-device" {
            let sh = self.backend.shared();
            Some(if sh.started {
                Err(CmdError::new(
                    ErrorClass::InvalidState,
                    "devices are added before `start`",
                ))
            } else {
                sh.devices.add(&req, fds, sh.side, sh.timeout)
            })
        } else if name == "status" {
            let sh = self.backend.shared();
            let before = (!sh.started).then_some(&sh.devices);
            Some(req.only_args(&[]).map(|()| sh.snapshot.status(before)))
        } else if name == "cancel" {
            self.refresh();
            Some(req.only_args(&[]).and_then(|()| {
                if self.running {
                    self.backend.cancel();
                    Ok(json!({}))
                } else {
                    Err(CmdError::new(
                        ErrorClass::InvalidState,
                        "no migration in progress",
                    ))
                }
            }))
        } else if self.backend.shared().commands.contains(&name) {
            self.backend.execute(&req)
        } else {
            Some(Err(proto::not_found(name)))
        };
        if let Some(reply) = reply {
            self.send(&proto::reply_line(req.id, reply));
        }
    }

    /// Asks the backend where the migration is.
    fn refresh(&mut self) {
        match self.backend.poll_outcome() {
            Outcome::Idle => self.running = false,
            Outcome::Running => self.running = true,
            Outcome::Ended(r) => {
                self.running = false;
                self.ended = Some(r);
            }
        }
    }

    fn drain(&mut self, out: &Receiver<Out>) {
        while let Ok(o) = out.try_recv() {
            let line = match o {
                Out::Reply(id, r) => proto::reply_line(id, r),
                Out::Event(name, data) => proto::event_line(name, data),
            };
            self.send(&line);
        }
    }
}

/// Serves the control socket at `addr` until the migration is over and the client left (or
/// said `quit`); returns the migration's result. `make` builds the side's backend around the
/// channel its worker writes to.
pub fn serve<B: Backend>(
    addr: &ControlAddr,
    cancel: &Cancel,
    make: impl FnOnce(Sender<Out>) -> B,
) -> Result<(), CliError> {
    let (listener, _file) = bind(&addr.path).map_err(CliError::Control)?;
    let (tx, out) = bounded(OUT_QUEUE);
    let mut s = Server {
        backend: make(tx),
        conn: None,
        gone: false,
        quit: false,
        running: false,
        ended: None,
        owner: nix::unistd::geteuid().as_raw(),
    };
    say!("vfmig: control socket at {}", addr.path.display());
    let mut interrupted = false;
    loop {
        s.refresh();
        s.drain(&out);
        if !s.running && (s.gone || s.quit || interrupted) {
            s.drain(&out);
            return match s.ended.take() {
                Some(r) => r,
                None if interrupted => Err(CliError::Interrupted),
                None => {
                    say!("vfmig: the control client left before a migration started");
                    Ok(())
                }
            };
        }
        if cancel.is_cancelled() && !interrupted {
            interrupted = true;
            s.backend.cancel();
        }
        let (listen_ready, conn_ready) = {
            let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            if let Some(c) = &s.conn {
                fds.push(PollFd::new(c.stream.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::from(POLL_MS)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    return Err(CliError::Control(ControlError::Socket {
                        path: addr.path.clone(),
                        op: "poll",
                        source: e.into(),
                    }))
                }
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), fds.get(1).is_some_and(ready))
        };
        if listen_ready {
            s.accept(&listener);
        }
        if conn_ready {
            s.read();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().expect("pair");
        (
            Conn {
                stream: a,
                line: Vec::new(),
                fds: Vec::new(),
                overlong: false,
                fd_overflow: false,
            },
            b,
        )
    }

    #[test]
    fn lines_split_across_reads_are_joined_and_blank_lines_skipped() {
        let (mut c, _peer) = conn();
        assert!(c.take_lines(b"{\"execute\":").is_empty());
        let got = c.take_lines(b"\"status\"}\n\n  \n{\"exe");
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].as_ref().expect("line").0,
            b"{\"execute\":\"status\"}"
        );
        assert_eq!(c.line, b"{\"exe");
    }

    #[test]
    fn an_overlong_line_is_refused_once_and_the_next_line_is_read() {
        let (mut c, _peer) = conn();
        let big = vec![b'x'; MAX_LINE + 1];
        assert!(c.take_lines(&big).is_empty());
        assert!(c.line.is_empty(), "nothing of an overlong line is kept");
        let got = c.take_lines(b"tail\n{}\n");
        assert_eq!(got.len(), 2);
        assert!(got[0].is_err());
        assert_eq!(got[1].as_ref().expect("line").0, b"{}");
    }

    #[test]
    fn too_many_fds_refuse_the_command_and_keep_none() {
        let (mut c, _peer) = conn();
        let fds: Vec<OwnedFd> = (0..=MAX_PENDING_FDS)
            .map(|_| std::fs::File::open("/dev/null").expect("open").into())
            .collect();
        c.add_fds(fds, false);
        assert!(c.fds.is_empty());
        let got = c.take_lines(b"{\"execute\":\"add-device\"}\n");
        assert_eq!(
            got[0].as_ref().err().map(|e| e.class),
            Some(ErrorClass::FdError)
        );
    }
}
