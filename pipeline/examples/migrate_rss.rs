//! Migrates N GiB of emulated device state over loopback, source and destination in two
//! processes, and prints the throughput and each side's peak RSS (`VmHWM`).
//!
//! ```sh
//! cargo run --release -p vfmig-pipeline --example migrate_rss -- 8            # 8 GiB, mixed
//! cargo run --release -p vfmig-pipeline --example migrate_rss -- 1 random none
//! ```
//!
//! Arguments: `SIZE [PROFILE [COMPRESS]]` with SIZE in GiB (`8`) or MiB (`512M`), PROFILE one of mixed, zero, random, text and
//! COMPRESS one of auto, none, lz4, zstd:LEVEL. The process re-executes itself with
//! `--destination` for the receiving side.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use vfmig_pipeline::{
    Compress, DestinationOptions, DestinationSession, Report, SourceOptions, SourceSession,
};
use vfmig_transport::Listener;
use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice, Profile};

type Error = Box<dyn std::error::Error>;

fn profile(s: &str) -> Result<Profile, Error> {
    Ok(match s {
        "mixed" => Profile::Mixed,
        "zero" => Profile::Zero,
        "random" => Profile::Random,
        "text" => Profile::Text,
        _ => return Err(format!("unknown profile {s}").into()),
    })
}

fn compress(s: &str) -> Result<Compress, Error> {
    Ok(match s {
        "auto" => Compress::Auto,
        "none" => Compress::None,
        "lz4" => Compress::Lz4,
        _ => match s.strip_prefix("zstd:") {
            Some(l) => Compress::Zstd(l.parse()?),
            None if s == "zstd" => Compress::Zstd(3),
            None => return Err(format!("unknown compression {s}").into()),
        },
    })
}

/// `8` is 8 GiB, `512M` is 512 MiB.
fn size(s: &str) -> Result<u64, Error> {
    let bytes = match s.strip_suffix('M') {
        Some(mib) => mib.parse::<u64>()? << 20,
        None => s.parse::<u64>()? << 30,
    };
    if bytes == 0 {
        return Err("size must be positive".into());
    }
    Ok(bytes)
}

fn config(size: u64, profile: Profile) -> EmulatedConfig {
    EmulatedConfig {
        name: "emu0".into(),
        size,
        profile,
        precopy: None,
        ..EmulatedConfig::default()
    }
}

/// Peak resident set size of this process, in KiB.
fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn destination(size: u64, profile: Profile) -> Result<(), Error> {
    let target = EmulatedDevice::new(config(size, profile))?.destination()?;
    let listener = Listener::bind("127.0.0.1:0".parse()?)?;
    println!("PORT {}", listener.local_addr().port());
    std::io::stdout().flush()?;
    let mut session = DestinationSession::new(vec![target], DestinationOptions::default());
    let report = session.run(&listener)?;
    println!(
        "DEST raw_bytes={} elapsed_ms={} hwm_kib={} stages={:?}",
        report.raw_bytes,
        report.elapsed.as_millis(),
        vm_hwm_kib(),
        report.stages
    );
    Ok(())
}

fn print_report(r: &Report, hwm_kib: u64) {
    let gib = r.raw_bytes as f64 / f64::from(1u32 << 30);
    println!(
        "source: {gib:.2} GiB raw, {:.2} GiB wire (ratio {:.2}, codec {}), {:.2} s, {:.0} MiB/s, downtime {:?}",
        r.wire_bytes as f64 / f64::from(1u32 << 30),
        r.ratio,
        r.codec,
        r.elapsed.as_secs_f64(),
        r.throughput_bps / f64::from(1u32 << 20),
        r.downtime.unwrap_or_default(),
    );
    println!(
        "source stages: reader {:?}, codec {:?} (all workers), send {:?}, waiting downstream {:?}; limited by {:?}",
        r.stages.data_fd, r.stages.codec, r.stages.network, r.stages.waiting_downstream, r.limiting_stage
    );
    println!("source peak RSS: {} MiB", hwm_kib / 1024);
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--destination") {
        let bytes = size(args.get(1).ok_or("missing size")?)?;
        let p = profile(args.get(2).map_or("mixed", String::as_str))?;
        return destination(bytes, p);
    }
    let size_arg = args.first().map_or("1", String::as_str).to_owned();
    let bytes = size(&size_arg)?;
    let prof = args.get(1).map_or("mixed", String::as_str).to_owned();
    let comp = compress(args.get(2).map_or("auto", String::as_str))?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--destination", &size_arg, &prof])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no child stdout")?).lines();
    let port: u16 = loop {
        let line = lines.next().ok_or("destination exited early")??;
        if let Some(p) = line.strip_prefix("PORT ") {
            break p.trim().parse()?;
        }
    };
    let source = EmulatedDevice::new(config(bytes, profile(&prof)?))?;
    let t0 = Instant::now();
    let mut session = SourceSession::new(
        vec![source],
        SourceOptions {
            compress: comp,
            ..SourceOptions::default()
        },
    );
    let report = session.run(([127, 0, 0, 1], port).into());
    let hwm = vm_hwm_kib();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait()?;
    let report = report?;
    print_report(&report, hwm);
    for l in &rest {
        if let Some(d) = l.strip_prefix("DEST ") {
            let hwm: u64 = d
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("hwm_kib="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            println!("destination peak RSS: {} MiB ({d})", hwm / 1024);
        }
    }
    println!(
        "wall {:.2} s, destination exit {status}",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
