//! The insecure-connection policy over a real non-loopback path: two network namespaces created
//! by the test and joined by a veth pair (addresses from 198.19.0.0/16, reserved for
//! benchmarking, existing only inside those namespaces). The destination runs in one namespace,
//! the source in the other; each side is this test binary re-executed with `ip netns exec`.
//!
//! Needs root and iproute2; without them the test says so and does nothing.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use vfmig_transport::{Listener, SendSession, SessionConfig, TransportError};

const ENV_ROLE: &str = "VFMIG_NETNS_ROLE";
const ENV_ADDR: &str = "VFMIG_NETNS_ADDR";

fn cfg(insecure: bool) -> SessionConfig {
    SessionConfig {
        insecure,
        streams: 2,
        timeout: Duration::from_secs(5),
        keepalive: Duration::from_millis(500),
        pool_slots: 8,
        slot_size: 64 << 10,
        window_bytes: 1 << 20,
        connect_timeout: Duration::from_secs(3),
        accept_timeout: Duration::from_secs(10),
        ..SessionConfig::default()
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Namespaces and veth, removed on drop (deleting a namespace deletes its veth end).
struct Netns {
    dst: String,
    src: String,
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.dst]);
        ip(&["netns", "del", &self.src]);
    }
}

fn setup() -> Option<(Netns, String, String)> {
    let id = std::process::id() % 60_000;
    let n = Netns {
        dst: format!("vfmig-t{id}-d"),
        src: format!("vfmig-t{id}-s"),
    };
    let (vd, vs) = (format!("vft{id}d"), format!("vft{id}s"));
    let (a, b) = (id / 250 % 250, id % 250 / 2 * 2);
    let (dst_ip, src_ip) = (format!("198.19.{a}.{b}"), format!("198.19.{a}.{}", b + 1));
    let ok = ip(&["netns", "add", &n.dst])
        && ip(&["netns", "add", &n.src])
        && ip(&["link", "add", &vd, "type", "veth", "peer", "name", &vs])
        && ip(&["link", "set", &vd, "netns", &n.dst])
        && ip(&["link", "set", &vs, "netns", &n.src])
        && ip(&[
            "-n",
            &n.dst,
            "addr",
            "add",
            &format!("{dst_ip}/31"),
            "dev",
            &vd,
        ])
        && ip(&[
            "-n",
            &n.src,
            "addr",
            "add",
            &format!("{src_ip}/31"),
            "dev",
            &vs,
        ])
        && ip(&["-n", &n.dst, "link", "set", &vd, "up"])
        && ip(&["-n", &n.src, "link", "set", &vs, "up"])
        && ip(&["-n", &n.dst, "link", "set", "lo", "up"])
        && ip(&["-n", &n.src, "link", "set", "lo", "up"]);
    if !ok {
        // Clean up whatever was created (the guard), before giving up.
        drop(n);
        return None;
    }
    Some((n, dst_ip, src_ip))
}

fn run_in(ns: &str, test: &str, role: &str, addr: &str) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args([
            "--exact",
            test,
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(ENV_ROLE, role)
        .env(ENV_ADDR, addr)
        .spawn()
        .unwrap()
}

#[test]
fn non_loopback_source_is_refused_without_key_or_tls_and_accepted_with_insecure() {
    if std::env::var_os(ENV_ROLE).is_some() {
        return;
    }
    let Some((ns, dst_ip, _src_ip)) = setup() else {
        eprintln!("netns test not run: needs root and iproute2 (ip netns add failed)");
        return;
    };
    for insecure in [false, true] {
        let role = if insecure { "insecure" } else { "strict" };
        let mut dst = run_in(&ns.dst, "netns_destination", role, &dst_ip);
        // Give the destination a moment to bind; the source retries its connect anyway.
        let mut src = run_in(&ns.src, "netns_source", role, &dst_ip);
        let (d, s) = (dst.wait().unwrap(), src.wait().unwrap());
        assert!(d.success(), "destination ({role}) failed");
        assert!(s.success(), "source ({role}) failed");
    }
}

#[test]
#[ignore = "runs inside a namespace, started by the test above"]
fn netns_destination() {
    let (Ok(role), Ok(addr)) = (std::env::var(ENV_ROLE), std::env::var(ENV_ADDR)) else {
        return;
    };
    let ip: IpAddr = addr.parse().unwrap();
    // The parent's pid picks the port; both children see the same parent.
    let l = Listener::bind(SocketAddr::new(ip, parent_port())).unwrap();
    if role == "strict" {
        // The unauthenticated stranger is dropped, and the destination keeps waiting for a source
        // until its accept timeout.
        let c = SessionConfig {
            accept_timeout: Duration::from_secs(3),
            ..cfg(false)
        };
        let mut dropped = Vec::new();
        let r = l.accept_reporting(&c, &mut |_, e| dropped.push(e.clone()));
        assert!(matches!(r, Err(TransportError::Timeout { .. })), "{r:?}");
        assert!(
            matches!(dropped.first(), Some(TransportError::InsecureRefused { peer }) if !peer.ip().is_loopback()),
            "{dropped:?}"
        );
        return;
    }
    let s = l.accept(&cfg(true)).unwrap();
    assert_eq!(s.agreed().streams, 2);
    let f = s.recv(Duration::from_secs(5)).unwrap();
    assert_eq!(f.header.seq, 0);
    assert!(matches!(
        s.recv(Duration::from_secs(5)),
        Err(TransportError::Closed)
    ));
}

fn parent_port() -> u16 {
    // `ip netns exec` runs us as a child of the outer test process.
    let ppid = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| s.rsplit(')').next().map(str::to_owned))
        .and_then(|s| s.split_whitespace().nth(1).map(str::to_owned))
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or(0);
    47_000 + u16::try_from(ppid % 1000).unwrap_or(0)
}

#[test]
#[ignore = "runs inside a namespace, started by the test above"]
fn netns_source() {
    let (Ok(role), Ok(addr)) = (std::env::var(ENV_ROLE), std::env::var(ENV_ADDR)) else {
        return;
    };
    let to = SocketAddr::new(addr.parse().unwrap(), parent_port());
    let devices = vec![vfmig_transport::DeviceDesc {
        name: "d".into(),
        caps: 0,
        state_size_hint: 0,
        decl: Default::default(),
    }];
    if role == "strict" {
        // The source refuses on its own before connecting...
        let r = SendSession::connect(to, &cfg(false), devices);
        assert!(
            matches!(r, Err(TransportError::InsecureRefused { .. })),
            "{r:?}"
        );
        // ...and the destination refuses a connection that tries anyway.
        let s = connect_retrying(to);
        drop(s);
        return;
    }
    let s = (0..50)
        .find_map(
            |_| match SendSession::connect(to, &cfg(true), devices.clone()) {
                Ok(s) => Some(s),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(100));
                    None
                }
            },
        )
        .expect("connect");
    let mut b = s.pool().acquire(Duration::from_secs(5)).unwrap();
    b.spare_mut()[..3].copy_from_slice(b"abc");
    b.set_len(3);
    let h = vfmig_wire::FrameHeader {
        kind: vfmig_wire::FrameKind::StopCopyData,
        codec: vfmig_wire::Codec::Raw,
        device: 0,
        seq: 0,
        raw_len: 3,
        wire_len: 0,
        arg: 0,
        crc: 0,
    };
    s.send(h, Some(b)).unwrap();
    s.close().unwrap();
}

fn connect_retrying(to: SocketAddr) -> std::net::TcpStream {
    for _ in 0..50 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
            // Stay until the destination has seen us.
            std::thread::sleep(Duration::from_millis(300));
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("could not reach the destination at {to}");
}
