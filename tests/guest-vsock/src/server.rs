//! The guest's one long-lived process: per port, a pool of worker threads that each block in
//! `accept` on the shared listener and serve what they accepted. No fork, and no thread spawn,
//! per connection: on an emulated guest kernel a fork+exec costs ~0.45 s and a thread spawn
//! ~0.2 s. The pool grows by one worker whenever its last idle worker takes a connection (so
//! every accepted connection is served at once, however many arrive), and shrinks back to two
//! idle workers afterwards: vsock wakes every thread waiting in `accept` on each connection,
//! and 65 waiting workers made each connection cost ~0.4 s of emulated guest kernel time.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::protocol::{self, Pattern, StatsReport};
use crate::socket::{local_cid, VsockListener, VsockStream, VMADDR_CID_HOST};

/// Workers keep their buffers on the heap; a small stack lets 64+ run at once in a small guest.
const WORKER_STACK: usize = 256 * 1024;
/// Beyond this many workers per port, connections wait in the listen backlog.
const MAX_WORKERS: usize = 200;
/// Idle workers kept after a burst; more would all wake on every new connection.
const MAX_IDLE: usize = 2;
const IO_BUF: usize = 64 * 1024;
const BACKLOG: i32 = 256;
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

/// Serves one connection; `buf` is the worker's reusable I/O buffer (`IO_BUF` bytes).
type Handler = fn(&VsockStream, &mut [u8]) -> io::Result<()>;

/// One port's listener and worker pool.
struct Pool {
    name: &'static str,
    listener: VsockListener,
    handler: Handler,
    /// Workers waiting in `accept`.
    idle: AtomicUsize,
    workers: AtomicUsize,
}

/// Listens on every port of `protocol`, prints the ready line, and serves until killed.
pub fn serve() -> io::Result<()> {
    // One malloc arena: per-thread arenas cost mmaps and page faults, slow under emulation.
    // SAFETY: mallopt only tunes glibc's allocator; called before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let counters = Arc::new(Counters::default());
    let ports: [(u32, &'static str, Handler); 4] = [
        (protocol::ECHO_PORT, "echo", echo),
        (protocol::SINK_PORT, "sink", sink),
        (protocol::SOURCE_PORT, "source", source),
        (protocol::DIAL_PORT, "dial", dial),
    ];
    for (number, name, handler) in ports {
        let pool = Arc::new(Pool {
            name,
            listener: VsockListener::bind(number, BACKLOG)?,
            handler,
            idle: AtomicUsize::new(0),
            workers: AtomicUsize::new(0),
        });
        spawn_worker(&pool, &counters)?;
    }
    let stats = VsockListener::bind(protocol::STATS_PORT, BACKLOG)?;
    let cid = match local_cid() {
        Ok(cid) => cid.to_string(),
        Err(e) => format!("unknown({e})"),
    };
    println!("{} cid={cid}", protocol::READY_MARKER);
    // The main thread answers STATS; the workers never all end.
    stats_loop(&stats, &counters);
    Err(io::Error::other("the stats loop ended"))
}

/// Adds an idle worker to `pool` unless it has `MAX_WORKERS` already.
fn spawn_worker(pool: &Arc<Pool>, c: &Arc<Counters>) -> io::Result<()> {
    if pool.workers.fetch_add(1, Ordering::SeqCst) >= MAX_WORKERS {
        pool.workers.fetch_sub(1, Ordering::SeqCst);
        return Ok(());
    }
    pool.idle.fetch_add(1, Ordering::SeqCst);
    let (p, counters) = (pool.clone(), c.clone());
    let spawned = thread::Builder::new()
        .name(pool.name.into())
        .stack_size(WORKER_STACK)
        .spawn(move || worker(&p, &counters));
    if let Err(e) = spawned {
        pool.idle.fetch_sub(1, Ordering::SeqCst);
        pool.workers.fetch_sub(1, Ordering::SeqCst);
        return Err(e);
    }
    Ok(())
}

fn worker(pool: &Arc<Pool>, c: &Arc<Counters>) {
    let mut buf = vec![0u8; IO_BUF];
    loop {
        let stream = match pool.listener.accept() {
            Ok((s, _peer)) => s,
            Err(e) => {
                // EMFILE and friends: back off rather than spin; the host test will notice.
                eprintln!("dormouse-vsock-test: {}: accept: {e}", pool.name);
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        c.accepted.fetch_add(1, Ordering::SeqCst);
        c.active.fetch_add(1, Ordering::SeqCst);
        // Busy now: if nobody else is left waiting in accept, add a worker who is.
        if pool.idle.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Err(e) = spawn_worker(pool, c) {
                note_error(c, pool.name, &e);
            }
        }
        let result = (pool.handler)(&stream, &mut buf);
        // Closed before `active` drops, so active == 0 means every socket is closed.
        drop(stream);
        if let Err(e) = result {
            note_error(c, pool.name, &e);
        }
        c.active.fetch_sub(1, Ordering::SeqCst);
        if pool.idle.load(Ordering::SeqCst) >= MAX_IDLE {
            pool.workers.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        pool.idle.fetch_add(1, Ordering::SeqCst);
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

fn echo(s: &VsockStream, buf: &mut [u8]) -> io::Result<()> {
    let (mut r, mut w) = (s, s);
    loop {
        let n = r.read(buf)?;
        let Some(data) = buf.get(..n).filter(|d| !d.is_empty()) else {
            break;
        };
        w.write_all(data)?;
    }
    finish(s);
    Ok(())
}

fn sink(s: &VsockStream, buf: &mut [u8]) -> io::Result<()> {
    let mut hash = Sha256::new();
    let mut total: u64 = 0;
    let mut r = s;
    loop {
        let n = r.read(buf)?;
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

fn source(s: &VsockStream, buf: &mut [u8]) -> io::Result<()> {
    let line = read_request(s)?;
    let (len, seed) = protocol::parse_source_request(&line).ok_or_else(|| bad_request(&line))?;
    let sha = send_pattern(s, len, seed, buf)?;
    (&*s).write_all(format!("{sha}\n").as_bytes())?;
    finish(s);
    Ok(())
}

/// Writes `len` bytes of `Pattern::new(seed)`; returns their SHA-256.
fn send_pattern(s: &VsockStream, len: u64, seed: u64, buf: &mut [u8]) -> io::Result<String> {
    if buf.is_empty() {
        return Err(io::Error::other("no I/O buffer"));
    }
    let mut pattern = Pattern::new(seed);
    let mut hash = Sha256::new();
    let mut left = len;
    let mut w = s;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let chunk = buf.get_mut(..n).unwrap_or_default();
        pattern.fill(chunk);
        hash.update(&*chunk);
        w.write_all(chunk)?;
        left -= n as u64;
    }
    Ok(protocol::hex(&hash.finalize()))
}

fn dial(s: &VsockStream, buf: &mut [u8]) -> io::Result<()> {
    let line = read_request(s)?;
    let (port, len, seed) =
        protocol::parse_dial_request(&line).ok_or_else(|| bad_request(&line))?;
    let answer = match dial_host(port, len, seed, buf) {
        Ok(d) => format!(
            "DIALED local_port={} sent={len} sha={} echoed={} echo_sha={}\n",
            d.local_port, d.sent_sha, d.echoed, d.echo_sha
        ),
        Err(e) => format!("DIAL-ERROR {e}\n"),
    };
    (&*s).write_all(answer.as_bytes())?;
    finish(s);
    Ok(())
}

struct Dialed {
    local_port: u32,
    sent_sha: String,
    echoed: u64,
    echo_sha: String,
}

/// Guest-initiated: connect to the host, send the pattern, half-close, then read whatever the
/// host sends back (the test's host side echoes) to EOF.
fn dial_host(port: u32, len: u64, seed: u64, buf: &mut [u8]) -> io::Result<Dialed> {
    let c = VsockStream::connect(VMADDR_CID_HOST, port)?;
    let (_, local_port) = c.local_addr()?;
    let sent_sha = send_pattern(&c, len, seed, buf)?;
    c.shutdown_write()?;
    let mut hash = Sha256::new();
    let mut echoed: u64 = 0;
    let mut r = &c;
    loop {
        let n = r.read(buf)?;
        let Some(data) = buf.get(..n).filter(|d| !d.is_empty()) else {
            break;
        };
        hash.update(data);
        echoed = echoed.saturating_add(n as u64);
    }
    Ok(Dialed {
        local_port,
        sent_sha,
        echoed,
        echo_sha: protocol::hex(&hash.finalize()),
    })
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
