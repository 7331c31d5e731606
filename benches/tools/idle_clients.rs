//! Opens many PostgreSQL client connections, logs each one in (trust authentication:
//! StartupMessage, AuthenticationOk, ..., ReadyForQuery) and then holds them all idle
//! until it is killed. Used by benches/run.sh to measure a pooler's memory per idle client.
//!
//! Standard library only, so the script builds it with plain `rustc -O` in a second:
//!
//!   idle_clients HOST PORT USER DATABASE COUNT [THREADS]
//!
//! Prints progress to stderr and, once every connection has either logged in or failed,
//! one line to stdout: `READY ok=N failed=M secs=S[ first_error=...]`. Then it sleeps until
//! SIGTERM/SIGINT (the default action ends it and the kernel closes the sockets). With
//! COUNT connections it needs COUNT file descriptors: raise `ulimit -n` first.

use std::io::{BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn startup(user: &str, db: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608u32.to_be_bytes()); // protocol 3.0
    for (k, v) in [("user", user), ("database", db), ("application_name", "idle_clients")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    m.extend_from_slice(&body);
    m
}

/// Logs one connection in; Ok once ReadyForQuery arrives.
fn login(addr: &std::net::SocketAddr, packet: &[u8]) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(addr, Duration::from_secs(10)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    (&s).write_all(packet).map_err(|e| format!("write: {e}"))?;
    let mut r = BufReader::with_capacity(512, &s);
    loop {
        let mut head = [0u8; 5];
        r.read_exact(&mut head).map_err(|e| format!("read: {e}"))?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=1 << 20).contains(&len) {
            return Err(format!("bad length {len} for '{}'", head[0] as char));
        }
        let mut body = vec![0u8; len - 4];
        r.read_exact(&mut body).map_err(|e| format!("read: {e}"))?;
        match head[0] {
            b'R' => {
                let code = body.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                if code != Some(0) {
                    return Err(format!("server asks for authentication {code:?}: use trust"));
                }
            }
            b'E' => {
                let text: String = body
                    .split(|&b| b == 0)
                    .filter(|f| f.first() == Some(&b'M'))
                    .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
                    .next()
                    .unwrap_or_default();
                return Err(format!("ErrorResponse: {text}"));
            }
            b'Z' => break,
            _ => {} // ParameterStatus, BackendKeyData, NoticeResponse
        }
    }
    s.set_read_timeout(None).ok();
    Ok(s)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        eprintln!("usage: idle_clients HOST PORT USER DATABASE COUNT [THREADS]");
        std::process::exit(2);
    }
    let addr = (args[1].as_str(), args[2].parse::<u16>().expect("PORT"))
        .to_socket_addrs()
        .expect("address")
        .next()
        .expect("address");
    let count: usize = args[5].parse().expect("COUNT");
    let threads: usize = args.get(6).map(|t| t.parse().expect("THREADS")).unwrap_or(4).max(1);
    let packet = Arc::new(startup(&args[3], &args[4]));

    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (next, failed, first_error, packet) = (next.clone(), failed.clone(), first_error.clone(), packet.clone());
            std::thread::spawn(move || {
                let mut held = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    match login(&addr, &packet) {
                        Ok(s) => held.push(s),
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_error.lock().unwrap().get_or_insert(e);
                        }
                    }
                    let done = held.len();
                    if done > 0 && done % 2000 == 0 {
                        eprintln!("idle_clients: a thread holds {done}");
                    }
                }
                held
            })
        })
        .collect();
    let held: Vec<Vec<TcpStream>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok: usize = held.iter().map(Vec::len).sum();
    let mut line = format!(
        "READY ok={ok} failed={} secs={:.2}",
        failed.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    if let Some(e) = first_error.lock().unwrap().as_ref() {
        line.push_str(&format!(" first_error={e}"));
    }
    println!("{line}");
    std::io::stdout().flush().ok();
    // Hold everything idle until killed.
    loop {
        std::thread::park();
    }
}
