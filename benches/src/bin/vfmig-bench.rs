//! `vfmig-bench`: the link-scenario harness (issue 6).
//!
//! `vfmig-bench run [--short]` runs every scenario and prints the tables; `vfmig-bench side ...`
//! is one side of one migration (the harness starts two of them, in network namespaces when the
//! link is a rate-limited veth). See docs/BENCHMARKS.md.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use vfmig_benches::harness::{mbps, run_pair, Impl, Limit, Link, Row, SideResult};
use vfmig_benches::{cli_e2e, devices, reference, rss, vfmig_side};
use vfmig_vfio::emulated::DataFdBackend;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Issue 4's memory budget per side.
const RSS_BUDGET: u64 = 256 * MIB;

#[derive(Parser, Debug)]
#[command(about = "vfmig link-scenario benchmarks against the QEMU-style reference loop")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the scenarios and print the tables (and write CSV / markdown when asked).
    Run(RunArgs),
    /// One side of one migration (used by `run`).
    Side(SideArgs),
    /// The `vfmig` CLI end to end: `vfmig recv` + `vfmig send` as two processes with `file:`
    /// devices on tmpfs, against a plain 1 MiB read/write loop (issue 12).
    Cli(CliArgs),
    /// The plain loop's source: read 1 MiB of FILE, write it to the socket, repeat (used by `cli`).
    LoopSend(LoopArgs),
    /// The plain loop's destination: read the socket, write FILE, fsync, acknowledge (used by `cli`).
    LoopRecv(LoopArgs),
    /// Runs CMD, waits, prints `MEASURE` (exit, wall-clock start/exit, CPU, peak RSS) on stderr.
    Measure {
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<std::ffi::OsString>,
    },
}

#[derive(clap::Args, Debug)]
struct LoopArgs {
    /// Address to connect to (loop-send).
    #[arg(long, required_unless_present = "listen")]
    connect: Option<SocketAddr>,
    /// Address to listen on (loop-recv; port 0: any).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The file read (send) or written (recv).
    #[arg(long)]
    file: PathBuf,
}

#[derive(clap::Args, Debug)]
struct CliArgs {
    /// Quick mode: 4 MiB and 256 MiB rows, 3 runs each; scaling (if asked) on 256 MiB, 1 run.
    #[arg(long)]
    short: bool,
    /// State sizes (default 4M,1G,4G; 4M,256M with --short).
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    sizes: Vec<u64>,
    /// Content profiles: random, mixed (50% zero pages, 25% shared-library bytes, 25% random),
    /// zero (97% zero pages).
    #[arg(long, value_delimiter = ',', default_value = "random,mixed,zero")]
    profiles: Vec<String>,
    /// Runs per row, alternating vfmig and the loop; the median is reported (default 5; 3 with
    /// --short).
    #[arg(long)]
    runs: Option<usize>,
    /// Also run the scaling grid (--workers x --streams, --compress zstd, mixed).
    #[arg(long)]
    scaling: bool,
    /// Only the scaling grid.
    #[arg(long, requires = "scaling")]
    no_rows: bool,
    /// Scaling grid: codec workers (both sides).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    workers: Vec<u16>,
    /// Scaling grid: TCP connections (sender).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    streams: Vec<u16>,
    /// Scaling run size (default 1G; 256M with --short).
    #[arg(long, value_parser = parse_size)]
    scaling_size: Option<u64>,
    /// Runs per scaling cell (default 3; 1 with --short).
    #[arg(long)]
    scaling_runs: Option<usize>,
    /// vfmig without a pre-shared key (loopback only: frames carry a CRC32C instead of being
    /// sealed with AES-256-GCM), to show what sealing costs; the default runs with a PSK.
    #[arg(long)]
    no_key: bool,
    /// Run both processes under `taskset -c LIST` (default: the cores this process may use).
    #[arg(long)]
    cpus: Option<String>,
    /// Directory for the state files: tmpfs, so that the files move at memory speed.
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// The vfmig binary (default: target/release/vfmig beside this binary).
    #[arg(long)]
    vfmig: Option<PathBuf>,
    /// Write every row as CSV here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write the markdown tables here.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Quick mode: 256 MiB rows, 1 GiB RSS run, one repetition (a few minutes).
    #[arg(long)]
    short: bool,
    /// Device state size per throughput row (default 1 GiB; 256 MiB with --short).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Device state size for the peak-RSS runs (default 8 GiB; 1 GiB with --short).
    #[arg(long, value_parser = parse_size)]
    rss_size: Option<u64>,
    /// Repetitions per row; the row reports the median run (default 3; 1 with --short).
    #[arg(long)]
    repeat: Option<usize>,
    /// Links: `loopback` and tbf rates (`1gbit`, `2500mbit`, `10gbit`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "loopback,1gbit,2500mbit,10gbit"
    )]
    links: Vec<String>,
    /// Content profiles of the emulated device.
    #[arg(long, value_delimiter = ',', default_value = "random,mixed,zero")]
    profiles: Vec<String>,
    /// Data fds of the emulated devices, each a row of its own: `fuse` (a FUSE file: one
    /// request round trip per read or write) and `mem` (a pipe fed by a device thread: memory
    /// speed). `--data-fds fuse` runs the suite as before.
    #[arg(long, value_delimiter = ',', default_value = "fuse,mem", value_parser = parse_data_fd)]
    data_fds: Vec<DataFdBackend>,
    /// Skip the peak-RSS runs.
    #[arg(long)]
    no_rss: bool,
    /// Stop starting new rows after this many minutes (default 20; 5 with --short); rows not
    /// run are listed as such.
    #[arg(long)]
    budget_mins: Option<u64>,
    /// Write every row as CSV here (input of tools/bench/plot.py).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write the markdown tables here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// The namespace script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/netns.sh"))]
    netns: PathBuf,
    /// First TCP port to use (one per migration, counting up).
    #[arg(long, default_value_t = 47600)]
    port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Role {
    Send,
    Recv,
}

#[derive(clap::Args, Debug)]
struct SideArgs {
    /// `ref` or `vfmig`.
    #[arg(long = "impl", value_parser = parse_impl)]
    imp: Impl,
    #[arg(long, value_enum)]
    role: Role,
    /// Address to connect to (send) or listen on (recv).
    #[arg(long)]
    addr: SocketAddr,
    /// Device state size.
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Content profile (both sides: it is part of the device identity the handshake compares).
    #[arg(long, default_value = "mixed")]
    profile: String,
    /// Data fd of the emulated device: `fuse` or `mem`.
    #[arg(long, default_value = "fuse", value_parser = parse_data_fd)]
    data_fd: DataFdBackend,
}

fn parse_data_fd(s: &str) -> Result<DataFdBackend, String> {
    devices::data_fd(s).map_err(|e| e.to_string())
}

fn parse_impl(s: &str) -> Result<Impl, String> {
    Impl::from_name(s).ok_or_else(|| format!("unknown impl {s:?} (ref or vfmig)"))
}

/// `1G`, `256M`, `4096K` or plain bytes (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'G' | 'g')) => (&s[..i], GIB),
        Some((i, 'M' | 'm')) => (&s[..i], MIB),
        Some((i, 'K' | 'k')) => (&s[..i], 1024),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("bad size {s:?} (e.g. 1G, 256M)"))
}

fn parse_link(s: &str) -> Result<Link, String> {
    if s == "loopback" {
        return Ok(Link::Loopback);
    }
    let bits = s
        .strip_suffix("gbit")
        .and_then(|n| n.parse::<f64>().ok().map(|g| g * 1e9))
        .or_else(|| {
            s.strip_suffix("mbit")
                .and_then(|n| n.parse::<f64>().ok().map(|m| m * 1e6))
        })
        .filter(|b| b.is_finite() && *b >= 1e6)
        .ok_or_else(|| format!("bad link {s:?} (loopback, 1gbit, 2500mbit, ...)"))?;
    // Whole megabits: the range check above makes the cast exact enough and non-negative.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let mbit = (bits / 1e6).round() as u64;
    Ok(Link::Veth {
        bits_per_sec: mbit * 1_000_000,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Side(a) => side(&a),
        Cmd::Run(a) => run(&a),
        Cmd::Cli(a) => cli_bench(&a),
        Cmd::LoopSend(a) => match a.connect {
            Some(addr) => cli_e2e::loop_send(addr, &a.file)
                .map(|_| ())
                .map_err(Into::into),
            None => Err("loop-send needs --connect".into()),
        },
        Cmd::LoopRecv(a) => match a.listen {
            Some(addr) => cli_e2e::loop_recv(addr, &a.file)
                .map(|_| ())
                .map_err(Into::into),
            None => Err("loop-recv needs --listen".into()),
        },
        Cmd::Measure { cmd } => {
            return match cli_e2e::measure(&cmd) {
                // The child's code, as a shell would pass it on.
                Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                Err(e) => {
                    eprintln!("vfmig-bench measure: {e}");
                    ExitCode::from(127)
                }
            };
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfmig-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxErr = Box<dyn std::error::Error>;

fn side(a: &SideArgs) -> Result<(), BoxErr> {
    let cfg = reference::RefConfig::default();
    let result = match (a.imp, a.role) {
        (Impl::Reference, Role::Send) => {
            let mut dev = devices::source_with(a.size, &a.profile, a.data_fd)?;
            ref_result(&reference::send_to(&mut dev, a.addr, &cfg)?)
        }
        (Impl::Reference, Role::Recv) => {
            let mut dev = devices::destination_with(a.size, &a.profile, a.data_fd)?;
            let listener = TcpListener::bind(a.addr)?;
            println!("LISTENING");
            ref_result(&reference::recv_from(&mut dev, &listener, &cfg)?)
        }
        (Impl::Vfmig, Role::Send) => vfmig_side::send_with(a.addr, a.size, &a.profile, a.data_fd)?,
        (Impl::Vfmig, Role::Recv) => {
            vfmig_side::recv_with(a.addr, a.size, &a.profile, a.data_fd, || {
                println!("LISTENING")
            })?
        }
    };
    let result = SideResult {
        peak_rss: rss::peak_rss_bytes().unwrap_or(0),
        ..result
    };
    println!("{}", result.to_line());
    Ok(())
}

fn ref_result(out: &reference::RefOutcome) -> SideResult {
    SideResult {
        raw_bytes: out.bytes,
        // A 16-byte record header per read, and the END_OF_STATE header.
        wire_bytes: out.bytes + 16 * (out.records + 1),
        secs: out.elapsed.as_secs_f64(),
        peak_rss: 0,
        codec: "none".to_owned(),
        limiting: "-".to_owned(),
    }
}

/// The destination's address inside its namespace (`tools/netns.sh addr dst`).
const NETNS_DST_ADDR: &str = "198.18.0.2";

/// Sets a namespace link up (and down on drop).
struct NetnsLink<'a> {
    script: &'a PathBuf,
}

impl<'a> NetnsLink<'a> {
    /// `Ok(None)` when the script says it cannot run here (exit 77: not root).
    fn up(script: &'a PathBuf, rate: &str) -> Result<Option<NetnsLink<'a>>, BoxErr> {
        let st = Command::new(script).args(["up", rate]).status()?;
        match st.code() {
            Some(0) => Ok(Some(NetnsLink { script })),
            Some(77) => Ok(None),
            _ => Err(format!("{} up {rate} failed: {st}", script.display()).into()),
        }
    }
}

impl Drop for NetnsLink<'_> {
    fn drop(&mut self) {
        let _ = Command::new(self.script).arg("down").status();
    }
}

struct Plan<'a> {
    exe: PathBuf,
    netns: &'a PathBuf,
    port: u16,
    /// The data fd of the devices of the next migrations.
    data_fd: DataFdBackend,
}

impl Plan<'_> {
    fn side_cmd(&self, link: Link, imp: Impl, role: Role, size: u64, profile: &str) -> Command {
        let (mut cmd, host) = match link {
            Link::Loopback => (Command::new(&self.exe), "127.0.0.1"),
            Link::Veth { .. } => {
                let mut c = Command::new(self.netns);
                let ns = if role == Role::Send { "src" } else { "dst" };
                c.args(["exec", ns]).arg(&self.exe);
                (c, NETNS_DST_ADDR)
            }
        };
        cmd.args([
            "side",
            "--impl",
            imp.as_str(),
            "--role",
            if role == Role::Send { "send" } else { "recv" },
            "--addr",
            &format!("{host}:{}", self.port),
            "--size",
            &size.to_string(),
            "--profile",
            profile,
            "--data-fd",
            self.data_fd.as_str(),
        ]);
        cmd
    }

    fn migrate(&mut self, link: Link, imp: Impl, size: u64, profile: &str) -> Result<Row, BoxErr> {
        self.port = if self.port >= 65000 {
            47600
        } else {
            self.port + 1
        };
        let recv = self.side_cmd(link, imp, Role::Recv, size, profile);
        let send = self.side_cmd(link, imp, Role::Send, size, profile);
        // Generous: 8 GiB at 100 MB/s; a stuck side is killed and reported, never waited on forever.
        let limit = Duration::from_secs(60 + size / (100 * MIB));
        let (src, dst) = run_pair(recv, send, limit)?;
        Ok(Row {
            link,
            profile: profile.to_owned(),
            imp,
            src,
            dst,
        })
    }
}

fn median_row(mut rows: Vec<Row>) -> Option<Row> {
    rows.sort_by(|a, b| a.src.secs.total_cmp(&b.src.secs));
    let mid = rows.len() / 2;
    rows.into_iter().nth(mid)
}

fn run(a: &RunArgs) -> Result<(), BoxErr> {
    let t0 = Instant::now();
    let size = a.size.unwrap_or(if a.short { 256 * MIB } else { GIB });
    let rss_size = a.rss_size.unwrap_or(if a.short { GIB } else { 8 * GIB });
    let repeat = a.repeat.unwrap_or(if a.short { 1 } else { 3 }).max(1);
    let links = a
        .links
        .iter()
        .map(|s| parse_link(s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut plan = Plan {
        exe: std::env::current_exe()?,
        netns: &a.netns,
        port: a.port,
        data_fd: DataFdBackend::Fuse,
    };
    let data_fds: Vec<&str> = a.data_fds.iter().map(|d| d.as_str()).collect();
    println!(
        "vfmig-bench: {} per row, {repeat} run(s) per row (median), links {:?}, profiles {:?}, data fds {:?}",
        human(size),
        a.links,
        a.profiles,
        data_fds
    );
    let budget = Duration::from_secs(60 * a.budget_mins.unwrap_or(if a.short { 5 } else { 20 }));
    let mut rows: Vec<(DataFdBackend, Row, Row)> = Vec::new();
    // Rows that produced no figure, and why (no root for netns, a failed migration, the budget).
    let mut skipped: Vec<String> = Vec::new();
    for &link in &links {
        if t0.elapsed() > budget {
            skipped.push(format!(
                "{}: not run, suite budget of {budget:?} used up",
                link.label()
            ));
            continue;
        }
        let _guard = match link.tc_rate() {
            None => None,
            Some(rate) => match NetnsLink::up(&a.netns, &rate)? {
                Some(g) => Some(g),
                None => {
                    skipped.push(format!(
                        "{}: skipped, tools/netns.sh needs root",
                        link.label()
                    ));
                    continue;
                }
            },
        };
        for (profile, &data_fd) in a
            .profiles
            .iter()
            .flat_map(|p| a.data_fds.iter().map(move |d| (p, d)))
        {
            plan.data_fd = data_fd;
            if t0.elapsed() > budget {
                skipped.push(format!(
                    "{} {profile} data-fd={data_fd}: not run, suite budget of {budget:?} used up",
                    link.label()
                ));
                continue;
            }
            // Alternate the implementations so slow drifts in machine load hit both alike.
            let (mut ref_runs, mut vfmig_runs) = (Vec::new(), Vec::new());
            let mut failed = None;
            for _ in 0..repeat {
                let pair = plan
                    .migrate(link, Impl::Reference, size, profile)
                    .and_then(|r| Ok((r, plan.migrate(link, Impl::Vfmig, size, profile)?)));
                match pair {
                    Ok((r, v)) => {
                        ref_runs.push(r);
                        vfmig_runs.push(v);
                    }
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                println!(
                    "  {:<10} {:<7} {:<4} FAILED: {e}",
                    link.label(),
                    profile,
                    data_fd.as_str()
                );
                skipped.push(format!(
                    "{} {profile} data-fd={data_fd}: FAILED: {e}",
                    link.label()
                ));
                continue;
            }
            let rf = median_row(ref_runs).ok_or("no reference run")?;
            let vf = median_row(vfmig_runs).ok_or("no vfmig run")?;
            println!(
                "  {:<10} {:<7} {:<4} ref {:>8} MB/s ({})  vfmig {:>8} MB/s ({}, busiest {}, {:.2}:1 on the wire, {})  ratio {:.2}x",
                link.label(),
                profile,
                data_fd.as_str(),
                mbps(rf.throughput()),
                rf.limit(),
                mbps(vf.throughput()),
                vf.limit(),
                vf.src.limiting,
                vf.ratio(),
                vf.src.codec,
                vf.throughput() / rf.throughput()
            );
            rows.push((data_fd, rf, vf));
        }
    }
    let mut rss_rows = Vec::new();
    // Peak RSS with the first data fd asked for (FUSE by default, as before).
    plan.data_fd = a.data_fds.first().copied().unwrap_or_default();
    if !a.no_rss {
        for imp in [Impl::Reference, Impl::Vfmig] {
            if t0.elapsed() > budget {
                skipped.push(format!(
                    "peak RSS {}: not run, suite budget of {budget:?} used up",
                    imp.as_str()
                ));
                continue;
            }
            let r = match plan.migrate(Link::Loopback, imp, rss_size, "mixed") {
                Ok(r) => r,
                Err(e) => {
                    println!("  peak RSS {:<5} FAILED: {e}", imp.as_str());
                    skipped.push(format!(
                        "peak RSS {} {}: FAILED: {e}",
                        imp.as_str(),
                        human(rss_size)
                    ));
                    continue;
                }
            };
            println!(
                "  peak RSS {:<5} {}: source {}, destination {}",
                imp.as_str(),
                human(rss_size),
                human(r.src.peak_rss),
                human(r.dst.peak_rss)
            );
            rss_rows.push(r);
        }
    }
    let md = markdown(&rows, &rss_rows, &skipped, size, repeat);
    println!("\n{md}");
    println!("(suite took {:.0} s)", t0.elapsed().as_secs_f64());
    if let Some(p) = &a.markdown {
        fs::write(p, &md)?;
    }
    if let Some(p) = &a.csv {
        fs::write(p, csv(&rows))?;
    }
    Ok(())
}

/// The CPU list this process may run on (`Cpus_allowed_list`), for `taskset -c`.
fn own_cpu_list() -> Option<String> {
    fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|l| l.trim().to_owned())
}

fn cli_bench(a: &CliArgs) -> Result<(), BoxErr> {
    let t0 = Instant::now();
    let sizes = if a.sizes.is_empty() {
        if a.short {
            vec![4 * MIB, 256 * MIB]
        } else {
            vec![4 * MIB, GIB, 4 * GIB]
        }
    } else {
        a.sizes.clone()
    };
    let profiles = a
        .profiles
        .iter()
        .map(|p| {
            cli_e2e::Profile::from_name(p)
                .ok_or_else(|| format!("unknown profile {p:?} (random, mixed, zero)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bench = std::env::current_exe()?;
    let vfmig = match &a.vfmig {
        Some(p) => p.clone(),
        None => bench
            .parent()
            .map(|d| d.join("vfmig"))
            .ok_or("cannot locate target/release/vfmig; pass --vfmig")?,
    };
    if !vfmig.is_file() {
        return Err(format!(
            "{} not found: build it (cargo build --release -p vfmig) or pass --vfmig",
            vfmig.display()
        )
        .into());
    }
    let dir = a
        .dir
        .join(format!("vfmig-bench-cli-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let psk = if a.no_key {
        None
    } else {
        let psk = dir.join("psk");
        cli_e2e::write_psk(&psk)?;
        Some(psk)
    };
    let cpus = a.cpus.clone().or_else(own_cpu_list);
    let cores = match &cpus {
        Some(list) => count_cpu_list(list).ok_or_else(|| format!("bad --cpus {list:?}"))?,
        None => vfmig_pipeline::cores::available_cores(),
    };
    let cfg = cli_e2e::Config {
        sizes,
        profiles,
        runs: a.runs.unwrap_or(if a.short { 3 } else { 5 }).max(1),
        rows: !a.no_rows,
        workers: a.workers.clone(),
        streams: a.streams.clone(),
        scaling: a.scaling,
        scaling_size: a
            .scaling_size
            .unwrap_or(if a.short { 256 * MIB } else { GIB }),
        scaling_runs: a.scaling_runs.unwrap_or(if a.short { 1 } else { 3 }).max(1),
        dir: dir.clone(),
        programs: cli_e2e::Programs {
            bench,
            vfmig,
            psk,
            cpus,
        },
        cores,
    };
    println!(
        "vfmig-bench cli: sizes {:?}, profiles {:?}, {} run(s) per row, files in {}",
        cfg.sizes
            .iter()
            .map(|&s| cli_e2e::human(s))
            .collect::<Vec<_>>(),
        a.profiles,
        cfg.runs,
        dir.display()
    );
    let res = cli_e2e::run_suite(&cfg, &mut |l| println!("{l}"));
    let _ = fs::remove_dir_all(&dir);
    let out = res?;
    let md = cli_e2e::markdown(&out, &machine(), cfg.runs);
    println!("\n{md}");
    println!("(suite took {:.0} s)", t0.elapsed().as_secs_f64());
    if let Some(p) = &a.markdown {
        fs::write(p, &md)?;
    }
    if let Some(p) = &a.csv {
        fs::write(p, cli_e2e::csv(&out))?;
    }
    if out.rows.is_empty() && out.scaling.is_empty() {
        return Err("no row was measured".into());
    }
    Ok(())
}

/// Counts a CPU list (`0-3,8`).
fn count_cpu_list(list: &str) -> Option<usize> {
    let mut n = 0usize;
    for part in list.split(',').filter(|p| !p.trim().is_empty()) {
        n += match part.trim().split_once('-') {
            Some((a, b)) => {
                b.parse::<usize>()
                    .ok()?
                    .checked_sub(a.parse::<usize>().ok()?)?
                    + 1
            }
            None => part.trim().parse::<usize>().map(|_| 1).ok()?,
        };
    }
    (n > 0).then_some(n)
}

/// `nproc`, CPU model, kernel and memory, from /proc.
fn machine() -> String {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim())
        .to_owned();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    format!(
        "{cpus} CPUs ({model}), kernel {kernel}, {:.1} GiB memory",
        mem_kib as f64 / (1u64 << 20) as f64
    )
}

fn human(b: u64) -> String {
    if b >= GIB && b % GIB == 0 {
        format!("{} GiB", b / GIB)
    } else {
        format!("{:.1} MiB", b as f64 / MIB as f64)
    }
}

fn csv(rows: &[(DataFdBackend, Row, Row)]) -> String {
    let mut s = String::from(
        "link,link_bits_per_sec,profile,impl,raw_bytes,wire_bytes,secs,throughput_mbps,wire_ratio,ratio_to_ref,limit,codec,busiest_stage,src_peak_rss,dst_peak_rss,data_fd\n",
    );
    for (data_fd, rf, vf) in rows {
        for r in [rf, vf] {
            let link_bps = match r.link {
                Link::Loopback => 0,
                Link::Veth { bits_per_sec } => bits_per_sec,
            };
            s += &format!(
                "{},{},{},{},{},{},{:.6},{},{:.3},{:.3},{},{},{},{},{},{}\n",
                r.link.label(),
                link_bps,
                r.profile,
                r.imp.as_str(),
                r.src.raw_bytes,
                r.src.wire_bytes,
                r.src.secs,
                mbps(r.throughput()),
                r.ratio(),
                r.throughput() / rf.throughput(),
                r.limit(),
                r.src.codec,
                r.src.limiting,
                r.src.peak_rss,
                r.dst.peak_rss,
                data_fd.as_str()
            );
        }
    }
    s
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

fn markdown(
    rows: &[(DataFdBackend, Row, Row)],
    rss_rows: &[Row],
    skipped: &[String],
    size: u64,
    repeat: usize,
) -> String {
    let mut s = format!(
        "Machine: {}.\n\nThroughput: {} of emulated device state per row, median of {repeat} run(s); time from the \
         source device leaving RUNNING for STOP_COPY to the destination device accepting the state \
         (the downtime of a STOP_COPY-only migration). Data fd: `fuse`, the emulated device's FUSE \
         file (a kernel round trip per 1 MiB request), or `mem`, its memory-speed pipe.\n\n\
         | link | content | data fd | reference MB/s | vfmig MB/s | vfmig / reference | vfmig wire ratio, codec | limit: ref / vfmig (busiest vfmig stage) | downtime ref / vfmig (ms) |\n\
         |---|---|---|---:|---:|---:|---|---|---:|\n",
        machine(),
        human(size)
    );
    for (data_fd, rf, vf) in rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | **{:.2}x** | {:.2}:1, {} | {} / {} ({}) | {:.0} / {:.0} |\n",
            rf.link.label(),
            rf.profile,
            data_fd.as_str(),
            mbps(rf.throughput()),
            mbps(vf.throughput()),
            vf.throughput() / rf.throughput(),
            vf.ratio(),
            vf.src.codec,
            rf.limit(),
            vf.limit(),
            vf.src.limiting,
            rf.src.secs * 1e3,
            vf.src.secs * 1e3
        );
    }
    if !skipped.is_empty() {
        s += "\nNot measured:\n\n";
        for l in skipped {
            s += &format!("- {l}\n");
        }
    }
    if !rss_rows.is_empty() {
        s += "\nPeak RSS (VmHWM of each side's process), mixed content over loopback, data fd: the first of `--data-fds`:\n\n\
              | implementation | stream bytes | source peak RSS | destination peak RSS | < 256 MiB per side |\n\
              |---|---:|---:|---:|---|\n";
        for r in rss_rows {
            s += &format!(
                "| {} | {} | {} | {} | {} |\n",
                r.imp.as_str(),
                human(r.src.raw_bytes),
                human(r.src.peak_rss),
                human(r.dst.peak_rss),
                pass(r.src.peak_rss < RSS_BUDGET && r.dst.peak_rss < RSS_BUDGET)
            );
        }
    }
    s += "\nIssue 4 targets, from the rows above (FUSE data fd rows):\n\n";
    let fuse = |d: &DataFdBackend| *d == DataFdBackend::Fuse;
    let find = |label: &str, profile: &str| {
        rows.iter()
            .find(|(d, r, _)| fuse(d) && r.link.label() == label && r.profile == profile)
            .map(|(_, r, v)| v.throughput() / r.throughput())
    };
    if let Some(x) = find("loopback", "random") {
        s += &format!(
            "- loopback, incompressible >= reference: {:.2}x, {}\n",
            x,
            pass(x >= 1.0)
        );
    }
    for p in ["mixed", "zero"] {
        if let Some(x) = find("loopback", p) {
            // "Clearly faster": at least 1.2x.
            s += &format!(
                "- loopback, {p} clearly faster (>= 1.2x): {:.2}x, {}\n",
                x,
                pass(x >= 1.2)
            );
        }
    }
    if let Some((_, rf, vf)) = rows
        .iter()
        .find(|(d, r, _)| fuse(d) && r.link.label() == "veth 2.5G" && r.profile == "mixed")
    {
        let x = vf.throughput() / rf.throughput();
        s += &format!(
            "- 2.5 Gbit/s link, mixed >= 2x reference: {:.2}x, {}\n",
            x,
            pass(x >= 2.0)
        );
        s +=
            &format!(
            "- downtime, {} mixed over 2.5 Gbit/s: vfmig {:.0} ms, reference {:.0} ms (link {})\n",
            human(vf.src.raw_bytes),
            vf.src.secs * 1e3,
            rf.src.secs * 1e3,
            if vf.limit() == Limit::Link { "bound" } else { "not saturated" }
        );
    }
    for r in rss_rows.iter().filter(|r| r.imp == Impl::Vfmig) {
        s += &format!(
            "- {} with < 256 MiB peak RSS per side: source {}, destination {}, {}\n",
            human(r.src.raw_bytes),
            human(r.src.peak_rss),
            human(r.dst.peak_rss),
            pass(r.src.peak_rss < RSS_BUDGET && r.dst.peak_rss < RSS_BUDGET)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_takes_binary_units_and_refuses_zero_or_garbage() {
        assert_eq!(parse_size("1G"), Ok(GIB));
        assert_eq!(parse_size("256M"), Ok(256 * MIB));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn parse_link_reads_loopback_and_tc_rates() {
        assert_eq!(parse_link("loopback"), Ok(Link::Loopback));
        assert_eq!(
            parse_link("2.5gbit"),
            Ok(Link::Veth {
                bits_per_sec: 2_500_000_000
            })
        );
        assert_eq!(
            parse_link("2500mbit"),
            Ok(Link::Veth {
                bits_per_sec: 2_500_000_000
            })
        );
        assert!(parse_link("fast").is_err());
        assert!(parse_link("0gbit").is_err());
    }
}
