//! portico-dp's own HTTP/2 server, from raw h2c frames and from hyper's
//! client: flow control both ways, malformed requests ending their
//! connection, header lists over the limit answered 431, protocol errors ending only their
//! connection with the right GOAWAY, and floods cut off.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use portico_integration::upstream::Upstream;
use serde_json::json;

use super::dp_common::{h2_sender, rt, Env};

pub(super) const DATA: u8 = 0;
pub(super) const HEADERS: u8 = 1;
pub(super) const RST_STREAM: u8 = 3;
pub(super) const SETTINGS: u8 = 4;
pub(super) const PING: u8 = 6;
pub(super) const GOAWAY: u8 = 7;
pub(super) const WINDOW_UPDATE: u8 = 8;
pub(super) const CONTINUATION: u8 = 9;
pub(super) const END_STREAM: u8 = 1;
pub(super) const END_HEADERS: u8 = 4;

pub(super) const PROTOCOL_ERROR: u32 = 1;
pub(super) const FRAME_SIZE_ERROR: u32 = 6;
pub(super) const COMPRESSION_ERROR: u32 = 9;
pub(super) const ENHANCE_YOUR_CALM: u32 = 0xb;
pub(super) const INTERNAL_ERROR: u32 = 2;

#[derive(Debug)]
pub(super) struct Frame {
    pub(super) kind: u8,
    pub(super) flags: u8,
    pub(super) stream: u32,
    pub(super) payload: Vec<u8>,
}

/// A client speaking raw HTTP/2 frames.
pub(super) struct Raw {
    pub(super) s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects, sends the preface and SETTINGS with `settings`.
    pub(super) fn connect(port: u16, settings: &[(u16, u32)]) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        Raw::over(s, settings)
    }

    /// Starts HTTP/2 on a connected socket: preface and SETTINGS.
    pub(super) fn over(s: TcpStream, settings: &[(u16, u32)]) -> Raw {
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut c = Raw { s, buf: Vec::new() };
        c.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let mut p = Vec::new();
        for (id, v) in settings {
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(&v.to_be_bytes());
        }
        c.send(SETTINGS, 0, 0, &p);
        c
    }

    fn write(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("write");
    }

    pub(super) fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let n = payload.len();
        let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        self.write(&f);
    }

    /// The next frame; `None` at the end of the connection.
    pub(super) fn frame(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]),
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut b = [0u8; 16 * 1024];
            match self.s.read(&mut b) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Frames until one that `want` accepts (SETTINGS are acknowledged).
    pub(super) fn until(&mut self, what: &str, want: impl Fn(&Frame) -> bool) -> Frame {
        loop {
            let f = self
                .frame()
                .unwrap_or_else(|| panic!("connection ended before {what}"));
            if f.kind == SETTINGS && f.flags & 1 == 0 {
                self.send(SETTINGS, 1, 0, &[]);
            }
            if want(&f) {
                return f;
            }
        }
    }

    /// The GOAWAY that ends the connection: its error code.
    pub(super) fn goaway(&mut self) -> u32 {
        let f = self.until("GOAWAY", |f| f.kind == GOAWAY);
        let code = u32::from_be_bytes([f.payload[4], f.payload[5], f.payload[6], f.payload[7]]);
        let mut rest = Vec::new();
        let _ = self.s.read_to_end(&mut rest);
        code
    }

    /// Appends DATA payloads to `got` until one ends its stream.
    fn rest_of_body(&mut self, got: &mut Vec<u8>) {
        loop {
            let f = self.until("DATA", |f| f.kind == DATA);
            got.extend_from_slice(&f.payload);
            if f.flags & END_STREAM != 0 {
                break;
            }
        }
    }

    /// No frame arrives within `ms` (flow control holding data back).
    fn quiet(&mut self, ms: u64) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .expect("timeout");
        let mut b = [0u8; 1024];
        let r = self.s.read(&mut b);
        self.s
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        match r {
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                false
            }
            Err(e) => matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }

    /// A request's frames on `stream`; the body, if any, in one DATA.
    pub(super) fn request(&mut self, stream: u32, fields: &[(&str, &str)], body: Option<&[u8]>) {
        let flags = if body.is_none() {
            END_HEADERS | END_STREAM
        } else {
            END_HEADERS
        };
        self.send(HEADERS, flags, stream, &block(fields));
        if let Some(b) = body {
            self.send(DATA, END_STREAM, stream, b);
        }
    }
}

fn int(out: &mut Vec<u8>, prefix: u8, mut n: usize) {
    let max = (1usize << prefix) - 1;
    if n < max {
        out.push(n as u8);
        return;
    }
    out.push(max as u8);
    n -= max;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

/// A header block of literal fields without indexing.
pub(super) fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, v) in fields {
        out.push(0);
        int(&mut out, 7, n.len());
        out.extend_from_slice(n.as_bytes());
        int(&mut out, 7, v.len());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

pub(super) fn get(path: &str) -> Vec<(&'static str, String)> {
    vec![
        (":method", "GET".into()),
        (":scheme", "http".into()),
        (":path", path.into()),
        (":authority", "gw".into()),
    ]
}

pub(super) fn fields<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(n, v)| (*n, v.as_str())).collect()
}

/// The first field of a response header block: `0x88` is `:status 200`.
/// A leading dynamic table size update (`0x20`, the server's first block
/// sets the client's table to 0) is skipped.
pub(super) fn first_field(f: &Frame) -> u8 {
    match f.payload.as_slice() {
        [0x20, b, ..] => *b,
        [b, ..] => *b,
        [] => panic!("empty header block"),
    }
}

/// The error code of a RST_STREAM.
pub(super) fn rst_code(f: &Frame) -> u32 {
    u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]])
}

#[test]
fn h2_downstream_flow_control_refusals_and_floods() {
    let up = Upstream::start("u");
    let env = Env::one_route(&[&up], json!({}));
    let _dp = env.dp("dp1", &[]);
    let port = env.port;

    // Flow control, both ways: a client window of 100 bytes holds the
    // answer back after 100 bytes until the client opens it.
    let mut c = Raw::connect(port, &[(4, 100)]);
    let body = vec![b'x'; 1000];
    let mut post = get("/a/echo");
    post[0].1 = "POST".into();
    post.push(("content-length", "1000".into()));
    c.request(1, &fields(&post), Some(&body));
    let h = c.until("response HEADERS", |f| f.kind == HEADERS);
    assert_eq!(h.payload[0], 0x20, "the first block sets the table size");
    assert_eq!(
        (h.stream, first_field(&h)),
        (1, 0x88),
        "200 on stream 1: {h:?}"
    );
    let mut got = Vec::new();
    while got.len() < 100 {
        let f = c.until("DATA", |f| f.kind == DATA);
        assert_eq!(f.flags & END_STREAM, 0, "not all of it fits the window");
        got.extend_from_slice(&f.payload);
    }
    assert_eq!(got.len(), 100, "exactly the window's worth");
    assert!(c.quiet(300), "nothing more until the window opens");
    c.send(WINDOW_UPDATE, 0, 1, &100_000u32.to_be_bytes());
    c.rest_of_body(&mut got);
    assert!(got.starts_with(b"POST /a/echo\n"), "{:?}", &got[..20]);
    assert!(got.ends_with(&body), "the body comes back whole");

    // Windows are per stream: with the client's initial window at 0, two
    // answers wait; opening one stream's window lets that one finish
    // while the other still waits.
    let mut c = Raw::connect(port, &[(4, 0)]);
    c.request(1, &fields(&get("/a/one")), None);
    c.request(3, &fields(&get("/a/three")), None);
    // The two heads, in either order.
    let a = c.until("a head", |f| f.kind == HEADERS).stream;
    let b = c.until("the other head", |f| f.kind == HEADERS).stream;
    assert_eq!(a + b, 4, "heads of streams 1 and 3");
    assert!(c.quiet(200), "no DATA without window");
    c.send(WINDOW_UPDATE, 0, 3, &100_000u32.to_be_bytes());
    let d = c.until("stream 3's end", |f| {
        f.kind == DATA && f.flags & END_STREAM != 0
    });
    assert_eq!(d.stream, 3, "only the stream whose window opened");
    assert!(c.quiet(200), "stream 1 still waits");
    c.send(WINDOW_UPDATE, 0, 1, &100_000u32.to_be_bytes());
    let d = c.until("stream 1's end", |f| {
        f.kind == DATA && f.flags & END_STREAM != 0
    });
    assert_eq!(d.stream, 1);

    // Request trailers end a request body, and reach the upstream.
    let mut c = Raw::connect(port, &[]);
    let mut post = get("/a/echo");
    post[0].1 = "POST".into();
    c.send(HEADERS, END_HEADERS, 1, &block(&fields(&post)));
    c.send(DATA, 0, 1, b"before trailers");
    c.send(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &block(&[("x-trailer", "t")]),
    );
    let mut got = Vec::new();
    c.rest_of_body(&mut got);
    assert!(
        got.ends_with(b"before trailers\ntrailer x-trailer: t"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // A client that sends its preface, SETTINGS and first request in one
    // write and waits (without acknowledging the server's SETTINGS) is
    // answered.
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut first = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    first.extend_from_slice(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
    let b = block(&fields(&get("/a/once")));
    first.extend_from_slice(&[0, (b.len() >> 8) as u8, b.len() as u8, HEADERS]);
    first.extend_from_slice(&[END_HEADERS | END_STREAM, 0, 0, 0, 1]);
    first.extend_from_slice(&b);
    s.write_all(&first).expect("write");
    let mut c = Raw { s, buf: Vec::new() };
    let h = loop {
        let f = c.frame().expect("an answer before the end");
        if f.kind == HEADERS {
            break f;
        }
    };
    assert_eq!((h.stream, first_field(&h)), (1, 0x88));

    // A malformed request ends its connection with a GOAWAY (Envoy's
    // default; `malformed_http2_requests_end_their_connection_unless_asked`
    // has a listener that resets the stream alone).
    let mut upper = get("/a/x");
    upper.push(("X-Upper", "1".into()));
    let mut no_path = get("/a/x");
    no_path.remove(2);
    let mut bad_len = get("/a/x");
    bad_len.push(("content-length", "5".into()));
    let mut hop = get("/a/x");
    hop.push(("connection", "keep-alive".into()));
    let mut spaced = get("/a/x");
    spaced.push(("x-spaced", " 1".into()));
    let mut two_lens = get("/a/x");
    two_lens.push(("content-length", "0".into()));
    two_lens.push(("content-length", "1".into()));
    for (what, f) in [
        ("upper-case name", &upper),
        ("no :path", &no_path),
        ("content-length without a body", &bad_len),
        ("connection-specific header", &hop),
        ("content-lengths that disagree", &two_lens),
    ] {
        let mut c = Raw::connect(port, &[]);
        c.request(1, &fields(f), None);
        assert_eq!(c.goaway(), PROTOCOL_ERROR, "{what}");
    }
    // Whitespace around a value is taken, trimmed, as Envoy takes it.
    let mut c = Raw::connect(port, &[]);
    c.request(1, &fields(&spaced), None);
    let h = c.until("response", |f| f.kind == HEADERS);
    assert_eq!(first_field(&h), 0x88, "200 with a value in spaces");
    let mut got = Vec::new();
    c.rest_of_body(&mut got);
    let echo = String::from_utf8_lossy(&got);
    assert!(echo.contains("\nx-spaced: 1\n"), "{echo}");
    c.request(15, &fields(&get("/a/fine")), None);
    let h = c.until("response", |f| f.kind == HEADERS);
    assert_eq!((h.stream, first_field(&h)), (15, 0x88));
    // Headers over the listener's limit (60 KiB), split over CONTINUATION
    // frames: 431 for that stream.
    let mut big = block(&fields(&get("/a/big")));
    big.extend_from_slice(&block(&[("x-big", &"a".repeat(70 * 1024))]));
    let mut parts = big.chunks(16_384).peekable();
    let first = parts.next().expect("a first part");
    c.send(HEADERS, END_STREAM, 17, first);
    while let Some(p) = parts.next() {
        let f = if parts.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        c.send(CONTINUATION, f, 17, p);
    }
    let h = c.until("431", |f| f.kind == HEADERS && f.stream == 17);
    assert!(
        h.payload.windows(3).any(|w| w == b"431"),
        "431 for headers too large: {h:?}"
    );
    // PING is answered with its payload.
    c.send(PING, 0, 0, b"12345678");
    let p = c.until("PING ack", |f| f.kind == PING);
    assert_eq!((p.flags, p.payload.as_slice()), (1, &b"12345678"[..]));

    // Protocol errors end their connection with a GOAWAY naming them.
    let mut c = Raw::connect(port, &[]);
    c.send(DATA, 0, 1, &vec![0; 20_000]);
    assert_eq!(c.goaway(), FRAME_SIZE_ERROR, "frame over 16384 bytes");
    let mut c = Raw::connect(port, &[]);
    c.send(DATA, 0, 0, b"x");
    assert_eq!(c.goaway(), PROTOCOL_ERROR, "DATA on stream 0");
    let mut c = Raw::connect(port, &[]);
    c.send(HEADERS, END_HEADERS | END_STREAM, 1, &[0x80]);
    assert_eq!(c.goaway(), COMPRESSION_ERROR, "header index 0");
    let mut c = Raw::connect(port, &[]);
    c.send(HEADERS, END_HEADERS, 2, &block(&fields(&get("/a/x"))));
    assert_eq!(c.goaway(), PROTOCOL_ERROR, "even stream id");
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut c = Raw { s, buf: Vec::new() };
    c.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    c.send(PING, 0, 0, b"12345678");
    assert_eq!(c.goaway(), PROTOCOL_ERROR, "first frame not SETTINGS");

    // Floods: a header block that never ends, and streams reset as soon
    // as they are opened (CVE-2023-44487).
    let mut c = Raw::connect(port, &[]);
    c.send(HEADERS, 0, 1, &block(&fields(&get("/a/x"))));
    let continuation = {
        let mut f = vec![0x00, 0x40, 0x00, CONTINUATION, 0, 0, 0, 0, 1];
        f.extend_from_slice(&[0u8; 16_384]);
        f
    };
    for _ in 0..64 {
        if c.s.write_all(&continuation).is_err() {
            break;
        }
    }
    assert_eq!(c.goaway(), ENHANCE_YOUR_CALM, "endless header block");
    let mut c = Raw::connect(port, &[]);
    let slow = get("/a/slow/2000");
    let mut burst = Vec::new();
    for i in 0..200u32 {
        let id = 2 * i + 1;
        let b = block(&fields(&slow));
        let n = b.len();
        burst.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8, HEADERS]);
        burst.push(END_HEADERS | END_STREAM);
        burst.extend_from_slice(&id.to_be_bytes());
        burst.extend_from_slice(&b);
        burst.extend_from_slice(&[0, 0, 4, RST_STREAM, 0]);
        burst.extend_from_slice(&id.to_be_bytes());
        burst.extend_from_slice(&8u32.to_be_bytes()); // CANCEL
    }
    let _ = c.s.write_all(&burst);
    assert_eq!(c.goaway(), ENHANCE_YOUR_CALM, "rapid reset");

    // None of that disturbed anyone else: a body larger than both
    // receive windows (1 MiB per stream, 2 MiB per connection) goes up
    // and comes back whole through hyper's client.
    rt().block_on(async {
        let mut tx = h2_sender::<Full<Bytes>>(port).await;
        let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let req = hyper::Request::builder()
            .method("POST")
            .uri("http://gw/a/echo")
            .version(http::Version::HTTP_2)
            .body(Full::new(Bytes::from(big.clone())))
            .expect("request");
        let resp = tx.send_request(req).await.expect("answer");
        assert_eq!(resp.status(), 200);
        let got = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(
            got.ends_with(&big),
            "3 MiB echoed whole ({} bytes)",
            got.len()
        );
    });
}
