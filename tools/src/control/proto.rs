//! The control protocol's messages (docs/CONTROL.md): JSON lines in the style of QMP.
//!
//! Client -> server: `{"execute": NAME, "arguments": {...}, "id": ANY}` (`arguments` and `id`
//! optional). Server -> client: the greeting, `{"return": {...}, "id": ID}`,
//! `{"error": {"class": CLASS, "desc": TEXT}, "id": ID}`, and events
//! `{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// The protocol version in the greeting.
pub const PROTOCOL_VERSION: u32 = 1;
/// The longest command line accepted (bytes, without the newline); a longer one is refused
/// whole.
pub const MAX_LINE: usize = 64 * 1024;

/// The `class` of an error reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Malformed JSON, or not a command object.
    GenericError,
    /// No such command.
    CommandNotFound,
    /// The command is valid but not in this step of the migration.
    InvalidState,
    /// A missing, unknown or badly typed argument.
    InvalidArgument,
    /// A descriptor missing, unexpected, too many, or of the wrong kind.
    FdError,
    /// A device could not be adopted.
    DeviceError,
    /// A bound was reached (command queue, devices).
    Busy,
    /// The migration step failed (the `failed` event has the details).
    MigrationFailed,
    /// The client's uid is not the server's.
    PermissionDenied,
}

impl ErrorClass {
    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::InvalidState => "InvalidState",
            ErrorClass::InvalidArgument => "InvalidArgument",
            ErrorClass::FdError => "FdError",
            ErrorClass::DeviceError => "DeviceError",
            ErrorClass::Busy => "Busy",
            ErrorClass::MigrationFailed => "MigrationFailed",
            ErrorClass::PermissionDenied => "PermissionDenied",
        }
    }
}

/// An error reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdError {
    /// Its class.
    pub class: ErrorClass,
    /// One line for people.
    pub desc: String,
}

impl CmdError {
    /// An error of `class`.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> CmdError {
        CmdError {
            class,
            desc: desc.into(),
        }
    }
}

/// `CommandNotFound` for `name`.
pub fn not_found(name: &str) -> CmdError {
    CmdError::new(
        ErrorClass::CommandNotFound,
        format!("the command `{name}` has not been found"),
    )
}

/// What a reply carries.
pub type Reply = Result<Value, CmdError>;

/// One parsed command.
#[derive(Debug)]
pub struct Request {
    /// Echoed in the reply.
    pub id: Option<Value>,
    /// The command name.
    pub execute: String,
    /// Its arguments (empty when absent).
    pub arguments: Map<String, Value>,
}

/// Parses one line; on failure, the id (when one could be read) and the error.
pub fn parse(line: &[u8]) -> Result<Request, (Option<Value>, CmdError)> {
    let v: Value = serde_json::from_slice(line).map_err(|e| {
        (
            None,
            CmdError::new(ErrorClass::GenericError, format!("JSON parse error: {e}")),
        )
    })?;
    let Value::Object(mut obj) = v else {
        return Err((
            None,
            CmdError::new(ErrorClass::GenericError, "expected a JSON object"),
        ));
    };
    let id = obj.remove("id");
    let execute = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        _ => {
            return Err((
                id,
                CmdError::new(
                    ErrorClass::GenericError,
                    "expected `execute` with a command name",
                ),
            ))
        }
    };
    let arguments = match obj.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err((
                id,
                CmdError::new(ErrorClass::GenericError, "`arguments` must be an object"),
            ))
        }
    };
    if let Some(k) = obj.keys().next() {
        return Err((
            id,
            CmdError::new(ErrorClass::GenericError, format!("unknown member `{k}`")),
        ));
    }
    Ok(Request {
        id,
        execute,
        arguments,
    })
}

impl Request {
    /// Refuses arguments outside `allowed`.
    pub fn only_args(&self, allowed: &[&str]) -> Result<(), CmdError> {
        match self
            .arguments
            .keys()
            .find(|k| !allowed.contains(&k.as_str()))
        {
            Some(k) => Err(CmdError::new(
                ErrorClass::InvalidArgument,
                format!("`{}` takes no argument `{k}`", self.execute),
            )),
            None => Ok(()),
        }
    }

    /// A string argument, if given.
    pub fn str_arg(&self, name: &str) -> Result<Option<&str>, CmdError> {
        match self.arguments.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(CmdError::new(
                ErrorClass::InvalidArgument,
                format!("`{name}` must be a string"),
            )),
        }
    }

    /// A boolean argument, `false` when absent.
    pub fn bool_arg(&self, name: &str) -> Result<bool, CmdError> {
        match self.arguments.get(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(CmdError::new(
                ErrorClass::InvalidArgument,
                format!("`{name}` must be true or false"),
            )),
        }
    }
}

/// The reply line to a command.
pub fn reply_line(id: Option<Value>, reply: Reply) -> String {
    let mut obj = match reply {
        Ok(v) => json!({ "return": v }),
        Err(e) => json!({ "error": { "class": e.class.name(), "desc": e.desc } }),
    };
    if let (Some(id), Value::Object(m)) = (id, &mut obj) {
        m.insert("id".into(), id);
    }
    obj.to_string()
}

/// An event line.
pub fn event_line(name: &str, data: Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({
        "event": name,
        "data": data,
        "timestamp": { "seconds": now.as_secs(), "microseconds": now.subsec_micros() },
    })
    .to_string()
}

/// The greeting, sent once when a client is accepted.
pub fn greeting(role: &str, commands: &[&str]) -> String {
    json!({
        "vfmig": {
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": PROTOCOL_VERSION,
            "role": role,
            "commands": commands,
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_with_and_without_arguments_and_id() {
        let r = parse(br#"{"execute":"status"}"#).expect("parse");
        assert_eq!(
            (r.execute.as_str(), r.id, r.arguments.len()),
            ("status", None, 0)
        );
        let r = parse(br#"{"execute":"add-device","arguments":{"spec":"emu:size=4K"},"id":7}"#)
            .expect("parse");
        assert_eq!(r.id, Some(json!(7)));
        assert_eq!(r.str_arg("spec"), Ok(Some("emu:size=4K")));
    }

    #[test]
    fn malformed_lines_get_errors_that_keep_the_id_when_readable() {
        for bad in [
            &b"{"[..],
            b"[1]",
            b"\"x\"",
            b"{\"id\":1}",
            b"{\"execute\":5}",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let (id, e) = parse(br#"{"execute":"x","arguments":[],"id":"a"}"#).expect_err("bad");
        assert_eq!((id, e.class), (Some(json!("a")), ErrorClass::GenericError));
        let (_, e) = parse(br#"{"execute":"x","extra":1}"#).expect_err("bad");
        assert!(e.desc.contains("extra"), "{e:?}");
    }

    #[test]
    fn replies_echo_the_id_and_name_the_class() {
        let ok = reply_line(Some(json!(3)), Ok(json!({})));
        assert_eq!(ok, r#"{"id":3,"return":{}}"#);
        let err = reply_line(None, Err(CmdError::new(ErrorClass::InvalidState, "no")));
        assert_eq!(err, r#"{"error":{"class":"InvalidState","desc":"no"}}"#);
    }
}
