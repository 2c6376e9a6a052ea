//! Random bad input against a running `portico-dp`: HTTP/2 frame sequences
//! (valid requests with bytes flipped, frames of every type with random
//! flags, stream ids and payloads) and HTTP/1.1 request heads and bodies
//! with bytes flipped, dropped and repeated. Whatever arrives, no task
//! panics (the debug build checks arithmetic too), every connection is
//! closed in the end (no leaked connection or request counters), and the
//! gateway still serves both protocols. The generator is seeded, so a
//! failure replays; `PORTICO_FUZZ_SEED` picks another seed.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use portico_integration::rng::Rng;
use portico_integration::upstream::Upstream;
use portico_integration::wait_for;
use serde_json::json;

use super::dp_common::{http1, Env};
use super::dp_h2_downstream::{block, fields, first_field, get, Raw, HEADERS};

/// Damage for valid inputs.
trait Mutate {
    /// `b` with a few bytes flipped, dropped, inserted or repeated.
    fn mutate(&mut self, b: &mut Vec<u8>);
}

impl Mutate for Rng {
    fn mutate(&mut self, b: &mut Vec<u8>) {
        for _ in 0..=self.below(4) {
            if b.is_empty() {
                b.push(self.bits() as u8);
                continue;
            }
            let at = self.below(b.len() as u64) as usize;
            match self.below(5) {
                0 => b[at] ^= 1 << self.below(8),
                1 => b[at] = self.bits() as u8,
                2 => {
                    b.remove(at);
                }
                3 => b.insert(at, self.bits() as u8),
                _ => {
                    let end = (at + 1 + self.below(16) as usize).min(b.len());
                    let piece = b[at..end].to_vec();
                    b.splice(at..at, piece);
                }
            }
        }
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let n = payload.len();
    out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// One HTTP/2 connection's worth of frames after the preface.
fn h2_frames(r: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let mut settings = Vec::new();
    let n = if r.chance(25) { 1 + r.below(3) } else { 0 };
    for _ in 0..n {
        settings.extend_from_slice(&(r.below(8) as u16).to_be_bytes());
        settings.extend_from_slice(&(r.bits() as u32 >> r.below(32)).to_be_bytes());
    }
    frame(&mut out, 4, 0, 0, &settings);
    let streams = [0u32, 1, 2, 3, 5, 7, 0x7fff_ffff, r.bits() as u32];
    for _ in 0..1 + r.below(12) {
        let stream = streams[r.below(streams.len() as u64) as usize];
        match r.below(10) {
            // A request, perhaps damaged, perhaps with a body.
            0..=3 => {
                let mut req = get("/a/echo");
                if r.chance(30) {
                    req[0].1 = "POST".into();
                    req.push(("content-length", r.below(40).to_string()));
                }
                let mut b = block(&fields(&req));
                if r.chance(30) {
                    r.mutate(&mut b);
                }
                let flags = [4u8, 5, 0, 1, 0x24, 0x08 | 4][r.below(6) as usize];
                let mut payload = b;
                if flags & 0x08 != 0 {
                    payload.insert(0, r.below(8) as u8);
                    payload.extend(std::iter::repeat_n(0, 3));
                }
                if flags & 0x20 != 0 {
                    let mut p = r.bytes(5);
                    p.extend_from_slice(&payload);
                    payload = p;
                }
                frame(&mut out, 1, flags, stream, &payload);
                if r.chance(40) {
                    let n = r.below(48) as usize;
                    frame(&mut out, 0, r.below(2) as u8, stream, &r.bytes(n));
                }
            }
            // A well-formed control frame, so that a connection lives on
            // to see more.
            4..=6 => {
                let word = |r: &mut Rng| (r.bits() as u32 >> r.below(32)).to_be_bytes();
                match r.below(5) {
                    0 => frame(&mut out, 8, 0, stream, &word(r)),
                    1 => frame(&mut out, 3, 0, stream, &(r.below(14) as u32).to_be_bytes()),
                    2 => frame(&mut out, 6, r.below(2) as u8, 0, &r.bytes(8)),
                    3 => {
                        let mut p = word(r).to_vec();
                        p.push(r.bits() as u8);
                        frame(&mut out, 2, 0, stream, &p)
                    }
                    _ => {
                        let id = [1u16, 3, 4, 6][r.below(4) as usize];
                        let mut p = id.to_be_bytes().to_vec();
                        p.extend_from_slice(&(r.below(1 << 20) as u32).to_be_bytes());
                        frame(&mut out, 4, 0, 0, &p)
                    }
                }
            }
            // A frame of any type, typed-looking payload sizes included.
            _ => {
                let kind = r.below(11) as u8;
                let len = match r.below(3) {
                    0 => [0usize, 4, 5, 8, 9][r.below(5) as usize],
                    1 => r.below(64) as usize,
                    _ => r.below(20_000) as usize,
                };
                let flags = r.bits() as u8;
                let payload = r.bytes(len);
                frame(&mut out, kind, flags, stream, &payload);
            }
        }
    }
    out
}

/// One HTTP/1.1 connection's bytes: requests, some damaged.
fn h1_bytes(r: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + r.below(3) {
        let mut req = match r.below(4) {
            0 => b"GET /a/x HTTP/1.1\r\nhost: gw\r\nx-a: 1\r\n\r\n".to_vec(),
            1 => b"POST /a/echo HTTP/1.1\r\nhost: gw\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
            2 => b"POST /a/echo HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n".to_vec(),
            _ => b"GET /a/x?q=%20 HTTP/1.0\r\nhost: gw\r\nconnection: keep-alive\r\nexpect: 100-continue\r\n\r\n".to_vec(),
        };
        if r.chance(70) {
            r.mutate(&mut req);
        }
        out.extend_from_slice(&req);
    }
    out
}

/// Sends `bytes`, half-closes, and reads whatever comes back until the
/// gateway closes (it must, within the read timeout).
fn exchange(port: u16, preface: &[u8], bytes: &[u8]) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The gateway may close before taking it all: that is an answer too.
    let _ = s.write_all(preface).and_then(|_| s.write_all(bytes));
    let _ = s.shutdown(Shutdown::Write);
    let mut sink = [0u8; 16 * 1024];
    loop {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the gateway did not close the connection: {e}"),
        }
    }
}

#[test]
fn random_frames_and_heads_never_take_the_gateway_down() {
    let up = Upstream::start("u");
    let env = Env::one_route(&[&up], json!({}));
    let dp = env.dp("dp1", &[]);
    let port = env.port;
    let seed: u64 = std::env::var("PORTICO_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026_1128);
    println!("seed {seed}");
    const PER_THREAD: u64 = 400;
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut r = Rng(seed ^ (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                for _ in 0..PER_THREAD {
                    if r.chance(50) {
                        let frames = h2_frames(&mut r);
                        exchange(port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", &frames);
                    } else {
                        let bytes = h1_bytes(&mut r);
                        exchange(port, b"", &bytes);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("fuzz thread");
    }
    let total = dp.stat("http.downstream_cx_total");
    assert!(
        total > 4 * PER_THREAD,
        "every connection reached the gateway: {total}"
    );
    println!(
        "{total} connections, {} requests, {} answered 4xx",
        dp.stat("http.downstream_rq_total"),
        dp.stat("http.downstream_rq_4xx")
    );
    let logs = dp.logs();
    assert!(!logs.contains("panicked"), "a task panicked:\n{logs}");
    let settled = wait_for(Duration::from_secs(15), || {
        let open = dp.stat("http.downstream_cx_active");
        let active = dp.stat("http.downstream_rq_active");
        let upstream = dp.stat("cluster.s.upstream_rq_active");
        (open + active + upstream == 0).then_some(())
    });
    assert!(
        settled.is_some(),
        "connections or requests left counted: cx {} rq {} upstream rq {}",
        dp.stat("http.downstream_cx_active"),
        dp.stat("http.downstream_rq_active"),
        dp.stat("cluster.s.upstream_rq_active"),
    );
    // Still serving, both protocols.
    assert_eq!(
        http1(port, "GET", "/a/x", "gw", &[], "")
            .expect("HTTP/1.1 after the fuzzing")
            .status,
        200
    );
    let mut c = Raw::connect(port, &[]);
    c.request(1, &fields(&get("/a/x")), None);
    let h = c.until("an answer", |f| f.kind == HEADERS);
    assert_eq!(first_field(&h), 0x88, "h2c after the fuzzing");
}
