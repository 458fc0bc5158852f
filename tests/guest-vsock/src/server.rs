//! The guest's one long-lived process: a listening thread per port and a thread per
//! connection. No fork per connection: on an emulated guest kernel a fork+exec costs ~0.45 s.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::protocol::{self, Pattern, StatsReport};
use crate::socket::{local_cid, VsockListener, VsockStream, VMADDR_CID_HOST};

/// Per-connection threads keep their buffers on the heap; a small stack lets 64+ run at once
/// in a small guest.
const CONN_STACK: usize = 256 * 1024;
const IO_BUF: usize = 64 * 1024;
const BACKLOG: i32 = 256;
/// The host's reply to a DIAL is a short line; more is cut off.
const MAX_DIAL_REPLY: usize = 4096;
/// Console output is slow under emulation: report only the first few handler errors.
const MAX_ERRORS_PRINTED: u64 = 16;

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    active: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    fn report(&self) -> StatsReport {
        StatsReport {
            accepted: self.accepted.load(Ordering::SeqCst),
            active: self.active.load(Ordering::SeqCst),
            errors: self.errors.load(Ordering::SeqCst),
        }
    }
}

type Handler = fn(&VsockStream) -> io::Result<()>;

/// Listens on every port of `protocol`, prints the ready line, and serves until killed.
pub fn serve() -> io::Result<()> {
    let counters = Arc::new(Counters::default());
    let ports: [(u32, &'static str, Handler); 4] = [
        (protocol::ECHO_PORT, "echo", echo),
        (protocol::SINK_PORT, "sink", sink),
        (protocol::SOURCE_PORT, "source", source),
        (protocol::DIAL_PORT, "dial", dial),
    ];
    let mut threads = Vec::new();
    for (port, name, handler) in ports {
        let listener = VsockListener::bind(port, BACKLOG)?;
        let c = counters.clone();
        threads.push(
            thread::Builder::new()
                .name(name.into())
                .spawn(move || accept_loop(&listener, name, handler, &c))?,
        );
    }
    let stats = VsockListener::bind(protocol::STATS_PORT, BACKLOG)?;
    let c = counters.clone();
    threads.push(
        thread::Builder::new()
            .name("stats".into())
            .spawn(move || stats_loop(&stats, &c))?,
    );
    let cid = match local_cid() {
        Ok(cid) => cid.to_string(),
        Err(e) => format!("unknown({e})"),
    };
    println!("{} cid={cid}", protocol::READY_MARKER);
    for t in threads {
        let _ = t.join();
    }
    Err(io::Error::other("every listener thread ended"))
}

fn accept_loop(listener: &VsockListener, name: &'static str, handler: Handler, c: &Arc<Counters>) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _peer)) => s,
            Err(e) => {
                // EMFILE and friends: back off rather than spin; the host test will notice.
                eprintln!("dormouse-vsock-test: {name}: accept: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        c.accepted.fetch_add(1, Ordering::SeqCst);
        c.active.fetch_add(1, Ordering::SeqCst);
        let counters = c.clone();
        let spawned = thread::Builder::new()
            .stack_size(CONN_STACK)
            .spawn(move || {
                let result = handler(&stream);
                // Closed before `active` drops, so active == 0 means every socket is closed.
                drop(stream);
                if let Err(e) = result {
                    note_error(&counters, name, &e);
                }
                counters.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            note_error(c, name, &e);
            c.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn note_error(c: &Counters, name: &str, e: &io::Error) {
    let n = c.errors.fetch_add(1, Ordering::SeqCst);
    if n < MAX_ERRORS_PRINTED {
        eprintln!("dormouse-vsock-test: {name}: {e}");
    }
}

fn stats_loop(listener: &VsockListener, c: &Counters) {
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = (&s).write_all(c.report().to_line().as_bytes());
            }
            Err(e) => {
                eprintln!("dormouse-vsock-test: stats: accept: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Half-closes our side; the peer may already be gone, which is fine at this point.
fn finish(s: &VsockStream) {
    let _ = s.shutdown_write();
}

fn echo(s: &VsockStream) -> io::Result<()> {
    let mut buf = vec![0u8; IO_BUF];
    let (mut r, mut w) = (s, s);
    loop {
        let n = r.read(&mut buf)?;
        let Some(data) = buf.get(..n).filter(|d| !d.is_empty()) else {
            break;
        };
        w.write_all(data)?;
    }
    finish(s);
    Ok(())
}

fn sink(s: &VsockStream) -> io::Result<()> {
    let mut buf = vec![0u8; IO_BUF];
    let mut hash = Sha256::new();
    let mut total: u64 = 0;
    let mut r = s;
    loop {
        let n = r.read(&mut buf)?;
        let Some(data) = buf.get(..n).filter(|d| !d.is_empty()) else {
            break;
        };
        hash.update(data);
        total = total.saturating_add(n as u64);
    }
    let line = format!("{total} {}\n", protocol::hex(&hash.finalize()));
    (&*s).write_all(line.as_bytes())?;
    finish(s);
    Ok(())
}

fn source(s: &VsockStream) -> io::Result<()> {
    let line = read_request(s)?;
    let (len, seed) = protocol::parse_source_request(&line).ok_or_else(|| bad_request(&line))?;
    let sha = send_pattern(s, len, seed)?;
    (&*s).write_all(format!("{sha}\n").as_bytes())?;
    finish(s);
    Ok(())
}

/// Writes `len` bytes of `Pattern::new(seed)`; returns their SHA-256.
fn send_pattern(s: &VsockStream, len: u64, seed: u64) -> io::Result<String> {
    let mut pattern = Pattern::new(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; IO_BUF];
    let mut left = len;
    let mut w = s;
    while left > 0 {
        let n = left.min(IO_BUF as u64) as usize;
        let chunk = buf.get_mut(..n).unwrap_or_default();
        pattern.fill(chunk);
        hash.update(&*chunk);
        w.write_all(chunk)?;
        left -= n as u64;
    }
    Ok(protocol::hex(&hash.finalize()))
}

fn dial(s: &VsockStream) -> io::Result<()> {
    let line = read_request(s)?;
    let (port, len, seed) =
        protocol::parse_dial_request(&line).ok_or_else(|| bad_request(&line))?;
    let answer = match dial_host(port, len, seed) {
        Ok((local_port, sha, reply)) => {
            format!("DIALED local_port={local_port} sha={sha} reply={reply}\n")
        }
        Err(e) => format!("DIAL-ERROR {e}\n"),
    };
    (&*s).write_all(answer.as_bytes())?;
    finish(s);
    Ok(())
}

/// Guest-initiated: connect to the host, send the pattern, half-close, read the reply.
fn dial_host(port: u32, len: u64, seed: u64) -> io::Result<(u32, String, String)> {
    let c = VsockStream::connect(VMADDR_CID_HOST, port)?;
    let (_, local_port) = c.local_addr()?;
    let sha = send_pattern(&c, len, seed)?;
    c.shutdown_write()?;
    let mut reply = Vec::new();
    (&c).take(MAX_DIAL_REPLY as u64).read_to_end(&mut reply)?;
    // One line back to the host: no newlines from the reply.
    let reply = String::from_utf8_lossy(&reply)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join("_");
    Ok((local_port, sha, reply))
}

/// Reads one request line. The host sends nothing after it, so reading past `\n` loses nothing.
fn read_request(s: &VsockStream) -> io::Result<String> {
    let mut line = Vec::with_capacity(protocol::MAX_REQUEST_LINE);
    let mut buf = [0u8; protocol::MAX_REQUEST_LINE];
    let mut r = s;
    loop {
        let n = r.read(&mut buf)?;
        let data = buf.get(..n).unwrap_or_default();
        if data.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the request line ended",
            ));
        }
        line.extend_from_slice(data);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() > protocol::MAX_REQUEST_LINE {
            return Err(bad_request(&String::from_utf8_lossy(&line)));
        }
    }
}

fn bad_request(line: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("bad request line {line:?}"),
    )
}
