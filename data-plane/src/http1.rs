//! HTTP/1.1 wire pieces both sides of the proxy share: chunked bodies
//! (RFC 9112 section 7.1), length fields and connection tokens.

use std::io;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::net::TcpStream;

/// An error while reading a body.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A chunk-size line longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;
/// Trailer sections longer than this are refused.
const MAX_TRAILERS: usize = 64 * 1024;
/// Trailer fields beyond this many are refused.
const MAX_TRAILER_FIELDS: usize = 100;

/// A header value from a head httparse accepted, sharing its bytes.
///
/// httparse admits in a field value exactly the bytes `HeaderValue`
/// does (visible ASCII, space, tab, obs-text; `parsed_values_are_valid`
/// checks every byte on each of httparse's code paths), so checking them
/// again would only cost time.
///
/// # Safety
///
/// `bytes` must be a field value httparse accepted with its default
/// configuration (obsolete line folding off).
pub(crate) unsafe fn parsed_value(bytes: Bytes) -> HeaderValue {
    // SAFETY: the caller passes a value httparse accepted, and every byte
    // httparse accepts in one is valid in a `HeaderValue` (see the test).
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

/// Whether a comma-separated header value lists `token` (any case).
pub(crate) fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether a token of a `Connection` value names a field the proxy
/// handles itself on every hop (or is `close`): nothing more to remove
/// for it.
pub(crate) fn is_own_hop_token(t: &[u8]) -> bool {
    [
        &b"close"[..],
        b"keep-alive",
        b"upgrade",
        b"transfer-encoding",
        b"proxy-connection",
    ]
    .iter()
    .any(|k| t.eq_ignore_ascii_case(k))
}

/// The last transfer coding of a `Transfer-Encoding` value.
pub(crate) fn last_coding(value: &[u8]) -> &[u8] {
    value
        .rsplit(|b| *b == b',')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

/// A `Content-Length` value: digits only (`parse` would take a `+`).
pub(crate) fn parse_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// One read without waiting. A read that leaves room in `buf` has taken
/// all the socket had, so the socket's readiness is cleared then (as
/// tokio's `AsyncRead` does): the next read waits for the poller instead
/// of costing a system call that would only say "would block".
pub(crate) fn read_some(io: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    let mut got = None;
    let r = io.try_io(tokio::io::Interest::READABLE, || {
        let n = io.try_read_buf(buf)?;
        if n > 0 && n < room {
            got = Some(n);
            // Clears the readiness this read was made on (not a newer one).
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match got {
        Some(n) => Ok(n),
        None => r,
    }
}

/// Reads more from the socket into `buf` when it is readable (growing the
/// buffer when it is nearly full); `Ok(0)` at the end of the stream.
pub(crate) fn poll_fill(
    io: &TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(io.poll_read_ready(cx))?;
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(16 * 1024);
        }
        match read_some(io, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return Poll::Ready(r),
        }
    }
}

/// Writes a chunk-size line for `n` bytes.
pub(crate) fn write_chunk_size(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Where a chunked body's decoding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// What one step of chunked decoding found.
pub(crate) enum Decoded {
    /// Moved on; decode again.
    Next(Chunk),
    /// Chunk data, and where decoding goes next.
    Data(Bytes, Chunk),
    /// The last chunk and its trailers (if any).
    End(Option<HeaderMap>),
    /// More bytes are needed.
    NeedMore,
}

/// One step of chunked decoding over what is buffered.
pub(crate) fn decode_chunk(step: Chunk, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
    match step {
        Chunk::Size => {
            // chunk-size [ BWS ";" ext ] CRLF, strictly: a proxy that ended
            // the line or the size elsewhere than its neighbours would
            // disagree with them on where the body ends (smuggling).
            let Some(i) = buf.iter().position(|b| *b == b'\n') else {
                return if buf.len() > MAX_CHUNK_LINE {
                    Err("chunk line too long".into())
                } else {
                    Ok(Decoded::NeedMore)
                };
            };
            if i > MAX_CHUNK_LINE {
                return Err("chunk line too long".into());
            }
            if i == 0 || buf[i - 1] != b'\r' {
                return Err("chunk size line does not end in CRLF".into());
            }
            let line = &buf[..i - 1];
            let hex = line
                .iter()
                .position(|b| !b.is_ascii_hexdigit())
                .unwrap_or(line.len());
            if hex == 0 || hex > 16 {
                return Err("bad chunk size".into());
            }
            let rest = &line[hex..];
            let ext = rest.trim_ascii_start();
            let blank_only = rest[..rest.len() - ext.len()]
                .iter()
                .all(|b| *b == b' ' || *b == b'\t');
            let ext_ok = ext.is_empty()
                || (ext[0] == b';'
                    && ext
                        .iter()
                        .all(|b| *b == b'\t' || (0x20..0x7f).contains(b) || *b >= 0x80));
            if !blank_only || !ext_ok {
                return Err("bad chunk extension".into());
            }
            let size = std::str::from_utf8(&line[..hex])
                .ok()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or("bad chunk size")?;
            buf.advance(i + 1);
            Ok(Decoded::Next(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Decoded::NeedMore);
            }
            let n = left.min(buf.len() as u64) as usize;
            let data = buf.split_to(n).freeze();
            let next = if left == n as u64 {
                Chunk::DataEnd
            } else {
                Chunk::Data(left - n as u64)
            };
            Ok(Decoded::Data(data, next))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Decoded::NeedMore);
            }
            if !buf.starts_with(b"\r\n") {
                return Err("missing CRLF after chunk data".into());
            }
            buf.advance(2);
            Ok(Decoded::Next(Chunk::Size))
        }
        Chunk::Trailers => {
            // Trailer fields, then an empty line.
            let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
            match httparse::parse_headers(buf, &mut fields) {
                Ok(httparse::Status::Complete((len, fields))) => {
                    let mut map = HeaderMap::new();
                    for f in fields {
                        if let (Ok(n), Ok(v)) = (
                            HeaderName::from_bytes(f.name.as_bytes()),
                            HeaderValue::from_bytes(f.value),
                        ) {
                            map.append(n, v);
                        }
                    }
                    buf.advance(len);
                    Ok(Decoded::End((!map.is_empty()).then_some(map)))
                }
                Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                    Err("trailers too large".into())
                }
                Ok(httparse::Status::Partial) => Ok(Decoded::NeedMore),
                Err(e) => Err(format!("bad trailers: {e}").into()),
            }
        }
    }
}

/// How a message body is delimited, and how far its decoding has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framed {
    /// This many bytes are still to come.
    Length(u64),
    /// Chunked, at this step.
    Chunked(Chunk),
    /// Until the connection ends.
    Close,
}

/// What [`Framed::decode`] found in the buffer.
pub(crate) enum Piece {
    /// Body data.
    Data(Bytes),
    /// The end of the body, with a chunked body's trailers.
    End(Option<HeaderMap>),
    /// More bytes are needed.
    NeedMore,
}

impl Framed {
    /// Takes the next piece of the body from `buf`, leaving whatever
    /// follows the body there.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Piece, BodyError> {
        loop {
            match *self {
                Framed::Length(0) => return Ok(Piece::End(None)),
                Framed::Length(_) | Framed::Close if buf.is_empty() => return Ok(Piece::NeedMore),
                Framed::Length(left) => {
                    let n = left.min(buf.len() as u64) as usize;
                    *self = Framed::Length(left - n as u64);
                    return Ok(Piece::Data(buf.split_to(n).freeze()));
                }
                Framed::Close => return Ok(Piece::Data(buf.split().freeze())),
                Framed::Chunked(step) => match decode_chunk(step, buf)? {
                    Decoded::Next(step) => *self = Framed::Chunked(step),
                    Decoded::Data(data, step) => {
                        *self = Framed::Chunked(step);
                        return Ok(Piece::Data(data));
                    }
                    Decoded::End(trailers) => return Ok(Piece::End(trailers)),
                    Decoded::NeedMore => return Ok(Piece::NeedMore),
                },
            }
        }
    }

    /// Whether the data decoded so far is all of the body (known before
    /// the next call only for a length).
    pub(crate) fn is_complete(&self) -> bool {
        *self == Framed::Length(0)
    }
}

/// Writes a `content-length` field.
pub(crate) fn write_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode_split_anywhere() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n";
        for split in 0..wire.len() {
            let mut buf = BytesMut::new();
            let mut fed = 0;
            let mut step = Chunk::Size;
            let mut out = Vec::new();
            let trailers = loop {
                match decode_chunk(step, &mut buf).unwrap() {
                    Decoded::Next(s) => step = s,
                    Decoded::Data(d, s) => {
                        out.extend_from_slice(&d);
                        step = s;
                    }
                    Decoded::End(t) => break t,
                    Decoded::NeedMore => {
                        let upto = if fed < split { split } else { wire.len() };
                        assert!(fed < upto, "stuck at {fed} (split {split})");
                        buf.extend_from_slice(&wire[fed..upto]);
                        fed = upto;
                    }
                }
            };
            assert_eq!(out, b"hello world", "split {split}");
            assert_eq!(trailers.unwrap()["x-t"], "1");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn bad_chunk_sizes_are_errors() {
        for wire in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"11111111111111111\r\n",
            b"+5\r\n",
            b" 5\r\n",
            b"5\n",
            b"2;\nxx\r\n",
            b"5 x\r\n",
            b"5;a\x01b\r\n",
        ] {
            let mut buf = BytesMut::from(wire);
            assert!(decode_chunk(Chunk::Size, &mut buf).is_err(), "{wire:?}");
        }
        let long = format!("5;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        let mut buf = BytesMut::from(long.as_bytes());
        assert!(decode_chunk(Chunk::Size, &mut buf).is_err(), "long line");
        for ok in [&b"5 \t;name=value\r\n"[..], b"5\r\n", b"A;x\r\n"] {
            let mut buf = BytesMut::from(ok);
            assert!(decode_chunk(Chunk::Size, &mut buf).is_ok(), "{ok:?}");
        }
        let mut buf = BytesMut::from(&b"x\n"[..]);
        assert!(
            decode_chunk(Chunk::DataEnd, &mut buf).is_err(),
            "bare LF after data"
        );
    }

    #[test]
    fn parsed_values_are_valid() {
        // Each byte alone and deep inside a long value, so that httparse's
        // 8-, 16- and 32-byte block matchers see it too.
        for (b, pad) in (0..=255u8).flat_map(|b| [(b, 0), (b, 37), (b, 70)]) {
            let mut head = b"HTTP/1.1 200 OK\r\nx: a".to_vec();
            head.extend(std::iter::repeat_n(b'v', pad));
            head.extend_from_slice(&[b, b'a']);
            head.extend_from_slice(b"\r\n\r\n");
            let mut fields = [httparse::EMPTY_HEADER; 4];
            let mut resp = httparse::Response::new(&mut fields);
            if let Ok(httparse::Status::Complete(_)) = resp.parse(&head) {
                let value = resp.headers[0].value;
                assert!(
                    HeaderValue::from_bytes(value).is_ok(),
                    "httparse accepts byte {b:#04x} (after {pad}) that HeaderValue refuses"
                );
            }
            let mut req = b"GET / HTTP/1.1\r\nx: a".to_vec();
            req.extend(std::iter::repeat_n(b'v', pad));
            req.extend_from_slice(&[b, b'a']);
            req.extend_from_slice(b"\r\n\r\n");
            let mut fields = [httparse::EMPTY_HEADER; 4];
            let mut r = httparse::Request::new(&mut fields);
            if let Ok(httparse::Status::Complete(_)) = r.parse(&req) {
                assert!(
                    HeaderValue::from_bytes(r.headers[0].value).is_ok(),
                    "request: {b:#04x}"
                );
            }
        }
    }

    #[test]
    fn tokens_lengths_and_sizes() {
        assert!(has_token(b"keep-alive, Close", "close"));
        assert!(!has_token(b"closed", "close"));
        assert_eq!(last_coding(b"gzip, Chunked "), b"Chunked");
        assert_eq!(parse_length(b" 42 "), Some(42));
        for bad in [&b"+5"[..], b"", b"4 2", b"-1", b"99999999999999999999"] {
            assert_eq!(parse_length(bad), None, "{bad:?}");
        }
        let mut out = Vec::new();
        write_chunk_size(&mut out, 0x1f0);
        write_chunk_size(&mut out, 0);
        assert_eq!(out, b"1f0\r\n0\r\n");
    }
}
