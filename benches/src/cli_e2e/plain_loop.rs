//! The plain read/write loop that vfmig is compared with: `vfmig-bench loop-send` /
//! `loop-recv`, 1 MiB reads and writes over one TCP connection.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use super::{now_ns, LOOP_CHUNK};

/// Socket timeouts of the loop: a dead peer ends a side instead of hanging it.
const LOOP_TIMEOUT: Duration = Duration::from_secs(30);

/// `loop-send`: connects, then reads `file` 1 MiB at a time and writes each read to the socket;
/// at the end half-closes and waits for the receiver's one-byte acknowledgement (sent after its
/// fsync). Prints `LOOP first_data_ns=.. final_ack_ns=..` on stdout.
pub fn loop_send(addr: SocketAddr, file: &Path) -> io::Result<u64> {
    let mut f = File::open(file)?;
    let mut s = TcpStream::connect_timeout(&addr, LOOP_TIMEOUT)?;
    s.set_write_timeout(Some(LOOP_TIMEOUT))?;
    s.set_read_timeout(Some(LOOP_TIMEOUT))?;
    let mut buf = vec![0u8; LOOP_CHUNK];
    let mut total = 0u64;
    let mut first_data_ns = None;
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n])?;
        first_data_ns.get_or_insert_with(now_ns);
        total += n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    let final_ack_ns = now_ns();
    if ack[0] != 1 {
        return Err(io::Error::other("the receiver refused the stream"));
    }
    println!(
        "LOOP bytes={total} first_data_ns={} final_ack_ns={final_ack_ns}",
        first_data_ns.unwrap_or(0)
    );
    Ok(total)
}

/// `loop-recv`: listens on `listen` (prints `loop-recv: listening on ADDR` on stderr), accepts
/// one connection, reads it 1 MiB at a time and writes each read to `file` (created 0600,
/// truncated), fsyncs at the end of the stream and acknowledges with one byte.
pub fn loop_recv(listen: SocketAddr, file: &Path) -> io::Result<u64> {
    let l = TcpListener::bind(listen)?;
    eprintln!("loop-recv: listening on {}", l.local_addr()?);
    let (mut s, _) = l.accept()?;
    s.set_read_timeout(Some(LOOP_TIMEOUT))?;
    s.set_write_timeout(Some(LOOP_TIMEOUT))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)?;
    let mut buf = vec![0u8; LOOP_CHUNK];
    let mut total = 0u64;
    loop {
        let n = read_full(&mut s, &mut buf)?;
        if n == 0 {
            break;
        }
        f.write_all(&buf[..n])?;
        total += n as u64;
    }
    f.sync_all()?;
    s.write_all(&[1])?;
    // Wait for the sender to close, so that our exit never resets the acknowledgement.
    let _ = s.read(&mut [0u8; 1]);
    Ok(total)
}

/// Reads until `buf` is full or the end; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
