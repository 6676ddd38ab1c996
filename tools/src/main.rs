//! # vfmig: the command line (`send`, `recv`, `demo`)
//!
//! Owns: argument parsing, device specs, exit codes, progress bars, the JSON report, and turning
//! typed library errors into one-line messages ([`error::describe`]). Never touches: anything a
//! library can own (the device FSM, the wire format, the pipeline). Data in: arguments, key and
//! certificate files, `file:` streams; data out: exit status, one line on stderr on failure, a
//! summary or a JSON report.

// `unsafe` only in `control::fdpass` (taking ownership of descriptors received over the
// control socket), which allows it for itself.
#![deny(unsafe_code)]

/// Writes a line to stderr, ignoring errors (a closed stderr must not turn into a panic).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

mod addr;
mod cli;
mod control;
mod demo;
mod devices;
mod error;
mod file_device;
mod migrate;
mod progress;
mod report;
mod run;
mod signals;
mod spec;
mod units;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::error::{describe, CliError};

fn main() -> ExitCode {
    report::mark_process_start();
    install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help / --version print to stdout and exit 0; every usage error exits 2 (with
            // --json, after the failure object on stdout).
            if e.use_stderr() {
                let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
                if wants_json(&args) {
                    let usage = CliError::Usage(error::UsageError::Arguments {
                        message: clap_message(&e),
                    });
                    out_line(&report::failure_json(role_of(&args), &usage));
                }
            }
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { error::EXIT_USAGE } else { 0 });
        }
    };
    let cancel = signals::Cancel::default();
    if let Err(e) = signals::install(&cancel) {
        say!("vfmig: cannot set up signal handling: {e}");
        return ExitCode::from(error::EXIT_FAILED);
    }
    let (role, json) = match &cli.command {
        Command::Send(a) => ("send", a.common.json),
        Command::Recv(a) => ("recv", a.common.json),
        Command::Demo(a) => ("demo", a.json),
    };
    let result = match cli.command {
        Command::Send(a) => run::send(a, &cancel),
        Command::Recv(a) => run::recv(a, &cancel),
        Command::Demo(a) => demo::run(a, &cancel),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            fail(role, &e, json);
            ExitCode::from(e.exit_code())
        }
    }
}

/// Whether the raw arguments ask for JSON (`--json` before any `--`), for errors found before
/// the arguments parsed.
fn wants_json(args: &[std::ffi::OsString]) -> bool {
    args.iter()
        .skip(1)
        .take_while(|a| a.as_os_str() != "--")
        .any(|a| a.as_os_str() == "--json")
}

/// The subcommand named in the raw arguments, for the failure object's `role`.
fn role_of(args: &[std::ffi::OsString]) -> &'static str {
    match args.get(1).and_then(|a| a.to_str()) {
        Some("send") => "send",
        Some("recv") => "recv",
        Some("demo") => "demo",
        _ => "vfmig",
    }
}

/// Clap's error as one line, without its `error: ` prefix and usage lines.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

/// Writes one line to stdout, ignoring errors (e.g. `vfmig ... --json | head -c 10`).
pub(crate) fn out_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Writes text to stderr as is, ignoring errors.
pub(crate) fn err_text(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Reports a failure: the one line on stderr, and with `--json` a failure object on stdout unless
/// the command already printed its own (a migration failure carries its report).
fn fail(role: &'static str, e: &CliError, json: bool) {
    if json && !e.report_printed() {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", report::failure_json(role, e));
    }
    say!("vfmig: {}", describe(e));
}

/// Last resort: a panic prints one line and exits 1 (no backtrace, no abort message).
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let line = format!("{what}{at}").replace('\n', " ");
        say!("vfmig: internal error (a bug, please report it): {line}");
        std::process::exit(i32::from(error::EXIT_FAILED));
    }));
}
