//! Request-smuggling guard for HTTP/1.1 downstream connections.
//!
//! A request carrying both `Content-Length` and `Transfer-Encoding` is the
//! classic smuggling vector (RFC 9112 section 6.1). hyper frames such a
//! request by `Transfer-Encoding`, silently drops the `Content-Length` and
//! closes the connection afterwards: safe, but the request still reaches
//! the upstream and nobody is told. Envoy answers 400 instead, and so do we.
//! hyper no longer shows the dropped header to the handler, so this module
//! watches the raw bytes as hyper reads them: [`Scanned`] wraps the socket
//! and follows HTTP/1.1 message framing (header block, then a
//! `Content-Length` or chunked body) just far enough to number each
//! request head and note the first one that has both headers. The handler
//! counts the requests it is given and refuses that one.
//!
//! The scan stops for good at what it cannot follow (an HTTP/2 preface, a
//! malformed head, a Transfer-Encoding that is not chunked): hyper rejects
//! those itself and closes, and it never reuses a connection after a
//! conflicting head, so nothing behind one can be smuggled either way.
//! Upgrades and CONNECT are followed like any request: if hyper refuses the
//! upgrade it keeps parsing requests, in step with the scan; if it accepts,
//! the bytes after are the tunnel's, and whatever the scan makes of them
//! can only name request numbers hyper never hands to the handler.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest header line kept; hyper answers 431 to longer heads anyway
/// (its limit is the listener's header size, far below this), so a line
/// cut here never reaches a handler.
const LINE_KEEP: usize = 256 * 1024;

/// What the scan found, shared with the connection's request handler.
#[derive(Debug, Default)]
pub struct Verdict {
    /// 1-based number of the first request head with both `Content-Length`
    /// and `Transfer-Encoding`; 0 while none.
    conflicting: AtomicU32,
}

impl Verdict {
    /// Whether request number `n` (1-based, in connection order) had both
    /// framing headers.
    pub fn is_conflicting(&self, n: u32) -> bool {
        n != 0 && self.conflicting.load(Relaxed) == n
    }
}

/// Where the scan is in the byte stream.
#[derive(Debug)]
enum State {
    /// In a request head: the request line, then header lines.
    Head(Head),
    /// Skipping this many bytes of a `Content-Length` body.
    Body(u64),
    /// Reading a chunk-size line of a chunked body.
    ChunkSize { size: u64, digits: bool, ext: bool },
    /// Skipping this many bytes of chunk data, then its CRLF.
    ChunkData(u64),
    /// Reading trailer lines after the last chunk; `empty` while the
    /// current line has no bytes yet.
    Trailers { empty: bool },
    /// No longer following the stream.
    Off,
}

#[derive(Debug, Default)]
struct Head {
    seen_request_line: bool,
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
}

/// Follows HTTP/1.1 request framing over arbitrarily split reads.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    /// Number of the request whose head is being read (1-based).
    request: u32,
    /// A head line split across reads, kept until its end arrives. Lines
    /// that arrive whole (the usual case) are read in place, uncopied.
    partial: Vec<u8>,
    verdict: Arc<Verdict>,
}

impl Scanner {
    /// A scanner at the start of a connection.
    pub fn new(verdict: Arc<Verdict>) -> Self {
        Scanner {
            state: State::Head(Head::default()),
            request: 1,
            partial: Vec::new(),
            verdict,
        }
    }

    /// Feeds the next bytes read from the client.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Body(left) => {
                    let n = (*left).min(data.len() as u64) as usize;
                    *left -= n as u64;
                    data = &data[n..];
                    if *left == 0 {
                        self.next_request();
                    }
                }
                State::ChunkData(left) => {
                    let n = (*left).min(data.len() as u64) as usize;
                    *left -= n as u64;
                    data = &data[n..];
                    if *left == 0 {
                        // The CRLF after the data: read as an empty
                        // chunk-size line prefix, which the size line's
                        // parser skips.
                        self.state = State::ChunkSize {
                            size: 0,
                            digits: false,
                            ext: false,
                        };
                    }
                }
                State::ChunkSize { size, digits, ext } => {
                    let b = data[0];
                    data = &data[1..];
                    match b {
                        b'\n' if !*digits => {} // the CRLF ending chunk data
                        b'\n' => {
                            self.state = if *size == 0 {
                                State::Trailers { empty: true }
                            } else {
                                State::ChunkData(*size)
                            };
                        }
                        b'\r' => {}
                        _ if *ext => {}
                        b';' | b' ' | b'\t' if *digits => *ext = true,
                        _ => match (b as char).to_digit(16) {
                            Some(d) if *size < (1 << 56) => {
                                *size = *size * 16 + u64::from(d);
                                *digits = true;
                            }
                            _ => self.state = State::Off,
                        },
                    }
                }
                State::Trailers { empty } => {
                    let b = data[0];
                    data = &data[1..];
                    match b {
                        b'\n' if *empty => self.next_request(),
                        b'\n' => *empty = true,
                        b'\r' => {}
                        _ => *empty = false,
                    }
                }
                State::Head(_) => {
                    let end = data.iter().position(|&b| b == b'\n');
                    match end {
                        Some(i) if self.partial.is_empty() => {
                            let (line, rest) = data.split_at(i + 1);
                            data = rest;
                            self.end_of_line(line);
                        }
                        Some(i) => {
                            let (line, rest) = data.split_at(i + 1);
                            data = rest;
                            let mut whole = std::mem::take(&mut self.partial);
                            let room = LINE_KEEP.saturating_sub(whole.len());
                            whole.extend_from_slice(&line[..line.len().min(room)]);
                            self.end_of_line(&whole);
                            // Keep a small buffer for the next split line.
                            whole.clear();
                            if whole.capacity() <= 1024 {
                                self.partial = whole;
                            }
                        }
                        None => {
                            let room = LINE_KEEP.saturating_sub(self.partial.len());
                            self.partial
                                .extend_from_slice(&data[..data.len().min(room)]);
                            data = &[];
                        }
                    }
                }
            }
        }
    }

    fn next_request(&mut self) {
        self.request = self.request.saturating_add(1);
        self.state = State::Head(Head::default());
    }

    fn end_of_line(&mut self, line: &[u8]) {
        let State::Head(head) = &mut self.state else {
            return;
        };
        let line = trim_eol(line);
        if !head.seen_request_line {
            if line.is_empty() {
                // Empty lines before a request line are ignored (RFC 9112
                // section 2.2).
            } else if line.starts_with(b"PRI * HTTP/2") {
                self.state = State::Off;
                return;
            } else {
                head.seen_request_line = true;
            }
            return;
        }
        if line.is_empty() {
            self.end_of_head();
            return;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            self.state = State::Off;
            return;
        };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(b"content-length") {
            match std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                Some(n) => head.content_length = Some(n),
                // hyper rejects it with a 400; nothing more to follow.
                None => self.state = State::Off,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            head.transfer_encoding = true;
            let last = value.rsplit(|&b| b == b',').next().map(trim);
            head.chunked = last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        }
    }

    fn end_of_head(&mut self) {
        let State::Head(head) = &self.state else {
            return;
        };
        if head.transfer_encoding && head.content_length.is_some() {
            let _ = self
                .verdict
                .conflicting
                .compare_exchange(0, self.request, Relaxed, Relaxed);
            self.state = State::Off;
        } else if head.transfer_encoding && !head.chunked {
            // hyper refuses it (400) and closes.
            self.state = State::Off;
        } else if head.chunked {
            self.state = State::ChunkSize {
                size: 0,
                digits: false,
                ext: false,
            };
        } else {
            match head.content_length {
                Some(n) if n > 0 => self.state = State::Body(n),
                _ => self.next_request(),
            }
        }
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !b.is_ascii_whitespace());
    let end = v.iter().rposition(|b| !b.is_ascii_whitespace());
    match (start, end) {
        (Some(s), Some(e)) => &v[s..=e],
        _ => &[],
    }
}

/// A downstream socket whose incoming bytes pass through a [`Scanner`].
pub struct Scanned<IO> {
    io: IO,
    scanner: Scanner,
}

impl<IO> Scanned<IO> {
    /// Wraps `io`; the scan's findings go to `verdict`.
    pub fn new(io: IO, verdict: Arc<Verdict>) -> Self {
        Scanned {
            io,
            scanner: Scanner::new(verdict),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Scanned<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if !matches!(this.scanner.state, State::Off) {
                this.scanner.feed(&buf.filled()[before..]);
            }
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Scanned<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` split at every possible pair of points and returns
    /// the verdict, which must not depend on the split.
    fn scan(input: &[u8]) -> u32 {
        let mut seen = None;
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let v = Arc::new(Verdict::default());
                let mut s = Scanner::new(v.clone());
                s.feed(&input[..i]);
                s.feed(&input[i..j]);
                s.feed(&input[j..]);
                let got = v.conflicting.load(Relaxed);
                assert_eq!(*seen.get_or_insert(got), got, "split at {i}/{j}");
            }
        }
        seen.unwrap_or(0)
    }

    #[test]
    fn flags_the_conflicting_head_in_either_order() {
        assert_eq!(
            scan(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            1
        );
        assert_eq!(
            scan(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n"),
            1
        );
    }

    #[test]
    fn numbers_requests_across_bodies() {
        let input = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhe\r\nl\r\n0\r\nx-t: 1\r\n\r\n\
POST /d HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(scan(input), 4);
    }

    #[test]
    fn header_lookalikes_in_bodies_are_not_heads() {
        let body = "Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let input = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}GET / HTTP/1.1\r\n\r\n",
            body.len()
        );
        assert_eq!(scan(input.as_bytes()), 0);
        let chunked = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        assert_eq!(scan(chunked.as_bytes()), 0);
    }

    #[test]
    fn stops_at_http2_and_follows_refused_upgrades() {
        assert_eq!(
            scan(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            0
        );
        // `Upgrade: h2c` that hyper ignores: the next request is number 2.
        assert_eq!(
            scan(b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            2
        );
    }

    #[test]
    fn long_values_are_read_whole() {
        // A length padded with zeros past any short prefix still frames
        // the body as hyper does.
        let input = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}5\r\n\r\nX\r\n\r\n\
POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "0".repeat(200)
        );
        let v = Arc::new(Verdict::default());
        let mut s = Scanner::new(v.clone());
        s.feed(input.as_bytes());
        assert_eq!(v.conflicting.load(Relaxed), 2);
    }
}
