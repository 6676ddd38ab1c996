//! Memory proof: reads an emulated device (default 8 GiB, random profile) to the end in
//! STOP_COPY through its data fd, and prints bytes, seconds, GB/s and peak RSS (VmHWM).
//!
//! `cargo run --release -p vfmig-vfio --example stopcopy_rss -- [SIZE_GIB] [PROFILE] [CHUNK_KIB] [resume]`
//!
//! With `resume`, every chunk is also written to a destination device's RESUMING fd, which then
//! validates the stream on RESUMING -> STOP; the digests of both devices are compared.

use std::fs::File;
use std::io::{Read, Write};
use std::time::Instant;

use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice, Profile};
use vfmig_vfio::{DeviceState, MigrationDevice};

fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU seconds of the whole process (all threads), from /proc/self/stat.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses): utime and stime are 14 and 15.
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let gib: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(8);
    let profile = match args.next() {
        Some(p) => Profile::from_name(&p).ok_or("profile: mixed|zero|random|text")?,
        None => Profile::Random,
    };
    let chunk_kib: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1024);
    let resume = args.next().as_deref() == Some("resume");
    let cfg = EmulatedConfig::new("rss", gib << 30, 42).with_profile(profile);
    let mut dev = EmulatedDevice::new(cfg)?;
    let expect = dev.stop_copy_size()?;
    let fd = dev
        .set_state(DeviceState::StopCopy)?
        .ok_or("STOP_COPY returned no data fd")?;
    let mut f = File::from(fd);
    let mut dst = if resume {
        let mut d = dev.destination()?;
        let wfd = d
            .set_state(DeviceState::Resuming)?
            .ok_or("RESUMING returned no data fd")?;
        Some((d, File::from(wfd)))
    } else {
        None
    };
    // Page-aligned, like the pipeline's registered pool: a 1 MiB read is one FUSE request.
    let mut buf = memmap2::MmapMut::map_anon(chunk_kib * 1024)?;
    let start = Instant::now();
    let cpu0 = cpu_seconds().unwrap_or(0.0);
    let mut total = 0u64;
    let mut reads = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        reads += 1;
        if let Some((_, w)) = &mut dst {
            w.write_all(&buf[..n])?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds().unwrap_or(0.0) - cpu0;
    dev.set_state(DeviceState::Stop)?;
    if let Some((mut d, w)) = dst {
        drop(w);
        d.set_state(DeviceState::Stop)?;
        let same = d.state_digest().is_some() && d.state_digest() == dev.state_digest();
        println!("resumed: destination accepted the stream, digests equal: {same}");
        if !same {
            return Err("destination state differs".into());
        }
    }
    let stats = dev.stats();
    println!(
        "profile={} bytes={} expected={} reads={} seconds={:.3} GB/s={:.3} cpu_seconds={:.2} GB/cpu-s={:.3} peak_rss_mib={:.1} max_fuse_read={} KiB max_fuse_write={} KiB",
        profile.as_str(),
        total,
        expect,
        reads,
        secs,
        total as f64 / secs / 1e9,
        cpu,
        total as f64 / cpu.max(0.01) / 1e9,
        vm_hwm_kib().unwrap_or(0) as f64 / 1024.0,
        stats.max_read_request / 1024,
        stats.max_write_request / 1024,
    );
    if total != expect {
        return Err(format!("read {total} bytes, stop_copy_size said {expect}").into());
    }
    Ok(())
}
