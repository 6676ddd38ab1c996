//! A VMM as the control socket sees it (docs/CONTROL.md): connects, reads the greeting, sends
//! commands (with fds over SCM_RIGHTS), collects events, waits for replies. Every read is
//! bounded.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};

/// Upper bound on waiting for any one line.
pub const READ_LIMIT: Duration = Duration::from_secs(90);

pub struct Client {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
    /// Events received and not yet taken by [`Client::wait_event`].
    pub events: Vec<Value>,
    /// Every event name seen, in order.
    pub seen: Vec<String>,
    pub greeting: Value,
}

/// Connects and returns the first line the server sends (a greeting, or a refusal).
pub fn first_line(path: &Path) -> (UnixStream, Value) {
    let stream = UnixStream::connect(path).expect("connect to the control socket");
    stream.set_read_timeout(Some(READ_LIMIT)).expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("read the first line");
    let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    (stream, v)
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect to the control socket");
        stream.set_read_timeout(Some(READ_LIMIT)).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut c = Client {
            stream,
            reader,
            events: Vec::new(),
            seen: Vec::new(),
            greeting: Value::Null,
        };
        c.greeting = c.read_line().expect("greeting");
        assert!(c.greeting.get("vfmig").is_some(), "{}", c.greeting);
        c
    }

    /// Sends raw bytes, with `fds` attached to the first byte.
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[RawFd]) {
        if fds.is_empty() {
            self.stream.write_all(bytes).expect("write");
            return;
        }
        let cmsg = [ControlMessage::ScmRights(fds)];
        let n = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        self.stream.write_all(&bytes[n..]).expect("write rest");
    }

    fn read_line(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))),
            Err(e) => panic!(
                "no line from the control socket: {e} (events: {:?})",
                self.seen
            ),
        }
    }

    /// Reads until a reply (events are kept); `None` at end of stream.
    pub fn reply(&mut self) -> Option<Value> {
        loop {
            let v = self.read_line()?;
            if let Some(name) = v.get("event").and_then(Value::as_str) {
                self.seen.push(name.to_owned());
                self.events.push(v);
            } else {
                return Some(v);
            }
        }
    }

    /// Runs a command and returns its reply object (`return` or `error`, with the id).
    pub fn execute(&mut self, cmd: &str, args: Value, fds: &[RawFd]) -> Value {
        let mut line = json!({ "execute": cmd, "arguments": args, "id": cmd }).to_string();
        line.push('\n');
        self.send_raw(line.as_bytes(), fds);
        let r = self.reply().unwrap_or_else(|| panic!("no reply to {cmd}"));
        assert_eq!(r["id"], json!(cmd), "reply to another command: {r}");
        r
    }

    /// Runs a command that must succeed; returns its `return` value.
    pub fn ok(&mut self, cmd: &str, args: Value, fds: &[RawFd]) -> Value {
        let r = self.execute(cmd, args, fds);
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!("{cmd} failed: {r} (events: {:?})", self.seen),
        }
    }

    /// Runs a command that must fail; returns the error's class.
    pub fn err(&mut self, cmd: &str, args: Value, fds: &[RawFd]) -> String {
        let r = self.execute(cmd, args, fds);
        error_class(&r).unwrap_or_else(|| panic!("{cmd} should have failed: {r}"))
    }

    /// Waits for the next event called `name` (taking it and the events before it).
    pub fn wait_event(&mut self, name: &str) -> Value {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == json!(name)) {
                let e = self.events.remove(i);
                self.events.drain(..i);
                return e;
            }
            match self.read_line() {
                Some(v) if v.get("event").is_some() => {
                    self.seen
                        .push(v["event"].as_str().unwrap_or_default().to_owned());
                    self.events.push(v);
                }
                Some(v) => panic!("unexpected reply while waiting for {name}: {v}"),
                None => panic!(
                    "end of stream while waiting for {name}; saw {:?}",
                    self.seen
                ),
            }
        }
    }
}

pub fn error_class(r: &Value) -> Option<String> {
    r.get("error")?.get("class")?.as_str().map(str::to_owned)
}
