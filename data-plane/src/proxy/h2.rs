//! Portico's own HTTP/2 server (h2c with prior knowledge; RFC 9113).
//!
//! One task per connection owns the socket, the HPACK decoder and every
//! stream's state: it reads frames, runs each stream's handler future and
//! response body itself (no task per stream, no lock around the stream
//! table) and writes what they produce, batched, in one write per pass.
//! A stream's future is polled with a waker that queues the stream's id
//! and wakes the connection, so a pass polls only the streams that have
//! something to do.
//!
//! A request body is the one piece shared with other tasks (an HTTP/2
//! upstream's connection task may be the one reading it): its frames wait
//! in a small locked queue, and what the reader consumed is credited back
//! to the client as WINDOW_UPDATE, so the client can never have more in
//! flight than the windows this server advertised.
//!
//! Refusals follow RFC 9113 and Envoy: a malformed request ends its
//! connection with GOAWAY PROTOCOL_ERROR (Envoy's default) or, where the
//! listener says `stream_error_on_invalid_http_message`, gets RST_STREAM
//! PROTOCOL_ERROR alone (whitespace around a value is trimmed, as Envoy
//! takes it); header lists over the listener's size limit a 431; over
//! its `max_headers_count`, or with a header name with an underscore
//! where the listener refuses them, RST_STREAM INTERNAL_ERROR (Envoy's
//! answer); streams over the concurrency limit REFUSED_STREAM; protocol
//! violations end the connection with a GOAWAY naming the error. Floods are bounded: header
//! blocks by size, control-frame answers by the write buffer (reading
//! stops while it is full), streams reset by the client before their
//! answer and streams this server had to reset by count.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::body::{RequestBody, ResponseBody};
use super::handler::{handle, Conn};
use super::header_rules::{admit, Admit};
use super::http1::{linger_close, push_date, ClientGone};
use super::server;
use super::stream_idle::{self, HasRouteIdle, RouteIdle};
use crate::config::listener::{H2Limits, HeaderRules};
use crate::h2::frame::{self, flag, kind, setting, Head, Reason};
use crate::h2::hpack::{self, Decoder, Name};
use crate::http1::{parse_length, poll_fill, BodyError};
use crate::stats::Stats;

/// The HPACK table size this server allows the client (the default).
const TABLE_SIZE: usize = 4096;
/// Above this many unsent bytes the connection stops reading frames and
/// polling response bodies until the client has read some.
const WRITE_HIGH: usize = 256 * 1024;
/// Streams a client may reset before their answer, beyond half of those it
/// opened, before the connection is ended (CVE-2023-44487, "rapid reset").
const MAX_EARLY_RESETS: u64 = 100;
/// A reset within this long of a stream's opening, before its answer, is
/// premature.
const EARLY: Duration = Duration::from_secs(1);
/// Streams this server may have to reset for the client's errors before it
/// ends the connection.
const MAX_ERROR_RESETS: u64 = 1024;

/// Serves an HTTP/2 connection whose first bytes (at least the preface,
/// when the protocol was sniffed) are in `buf`.
pub(super) async fn serve(
    io: TcpStream,
    buf: BytesMut,
    conn: Arc<Conn>,
    drain: watch::Receiver<bool>,
) {
    let (max_headers, idle_timeout, stream_idle_timeout) = {
        let lr = conn.listener.load();
        let c = &lr.config;
        (c.max_request_headers, c.idle_timeout, c.stream_idle_timeout)
    };
    // The listener's drain, or the HCM's age limit for connections.
    let aged = server::drain_or_age(drain, server::aged_at(&conn));
    let aged_stats = conn.shared.stats.clone();
    let drain = Box::pin(async move {
        if aged.await {
            aged_stats
                .downstream_cx_max_duration_reached
                .fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut c = Connection::new(
        io,
        buf,
        conn,
        max_headers,
        idle_timeout,
        stream_idle_timeout,
        drain,
    );
    poll_fn(|cx| c.poll(cx)).await;
    if let Some(why) = &c.closed_by {
        tracing::debug!(peer = %c.conn.peer, "HTTP/2 connection ended: {why}");
    }
    // The GOAWAY is written; what the client still sends is read and
    // dropped for a moment, so that unread input does not turn the close
    // into a reset that destroys the GOAWAY in flight.
    linger_close(Arc::new(c.io)).await;
}

/// A connection-level protocol error: the GOAWAY's code and its text.
struct ConnError(Reason, String);

fn err(reason: Reason, why: impl Into<String>) -> ConnError {
    ConnError(reason, why.into())
}

/// Ids past any stream's (client stream ids are below 2^31) for the
/// connection's own timers, woken like streams so that they are polled
/// only when they fire, not on every pass.
const DRAIN_ID: u32 = u32::MAX;
const IDLE_ID: u32 = u32::MAX - 1;
const TICK_ID: u32 = u32::MAX - 2;
const PING_ID: u32 = u32::MAX - 3;

/// Stream ids as their own hash (they are distinct small odd numbers).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u32 stream ids are hashed")
    }
    fn write_u32(&mut self, n: u32) {
        // Spread the bits for hashbrown's top-7-bit control bytes.
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The open streams. However the connection ends — even dropped from
/// outside by the drain timeout — the request bodies other tasks hold
/// learn that it is gone.
#[derive(Default)]
struct Streams(HashMap<u32, Stream, BuildHasherDefault<IdHasher>>);

impl std::ops::Deref for Streams {
    type Target = HashMap<u32, Stream, BuildHasherDefault<IdHasher>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Streams {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Streams {
    fn abort_all(&mut self) {
        for (_, s) in self.0.drain() {
            if let Some(r) = &s.recv {
                r.fail(Fail::Gone);
            }
        }
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.abort_all();
    }
}

/// What other tasks hand the connection: streams woken and request-body
/// bytes consumed.
#[derive(Default)]
struct Ready(Mutex<ReadyInner>);

#[derive(Default)]
struct ReadyInner {
    woken: Vec<u32>,
    released: Vec<(u32, u32)>,
    /// The connection task's waker.
    waker: Option<Waker>,
    /// The connection is inside its poll: it looks again before sleeping,
    /// so no wake-up is needed.
    polling: bool,
}

impl Ready {
    fn lock(&self) -> MutexGuard<'_, ReadyInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, f: impl FnOnce(&mut ReadyInner)) {
        let mut g = self.lock();
        f(&mut g);
        if !g.polling {
            if let Some(w) = &g.waker {
                w.wake_by_ref();
            }
        }
    }

    fn release(&self, id: u32, n: usize) {
        if n > 0 {
            self.push(|r| r.released.push((id, n as u32)));
        }
    }

    /// Asks the connection to send stream `id` its `100 Continue` (a
    /// release of nothing says so).
    fn ask_continue(&self, id: u32) {
        self.push(|r| r.released.push((id, 0)));
    }
}

/// A stream's waker: queues the stream once until the connection polls it.
struct StreamWake {
    id: u32,
    queued: AtomicBool,
    ready: Arc<Ready>,
    /// The route's stream idle timeout, set by the handler.
    route_idle: RouteIdle,
}

impl StreamWake {
    /// A timer's waker for its next poll (it may queue its id again).
    fn rearm(self: &Arc<Self>) -> Waker {
        self.queued.store(false, Ordering::Release);
        Waker::from(self.clone())
    }
}

impl HasRouteIdle for StreamWake {
    fn route_idle(&self) -> &RouteIdle {
        &self.route_idle
    }
}

impl Wake for StreamWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.ready.push(|r| r.woken.push(self.id));
        }
    }
}

type Handler = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

/// Where a stream's answer is.
// The body lives in the stream table, moved once; boxing it would cost an
// allocation per request.
#[allow(clippy::large_enum_variant)]
enum Task {
    /// The handler is still working.
    Handler(Handler),
    /// The head is sent; the body streams.
    Body(ResponseBody),
    /// The answer is complete (or the stream was reset).
    Done,
}

struct Stream {
    wake: Arc<StreamWake>,
    waker: Waker,
    task: Task,
    /// Response data waiting for flow-control window.
    pending: Bytes,
    /// The pending data ends the stream.
    pending_end: bool,
    /// What the client lets this server send on the stream.
    send_window: i64,
    /// The request body's queue, while the client may still send.
    recv: Option<Arc<Recv>>,
    /// What the client may still send on the stream.
    recv_window: i64,
    /// Consumed request-body bytes not yet credited back.
    recv_unacked: u32,
    /// The client has ended its side.
    remote_closed: bool,
    /// A HEAD request: the answer has no body.
    head_only: bool,
    /// The request's declared Content-Length, and what arrived so far.
    expect_len: Option<u64>,
    got_len: u64,
    /// Listed in `Out::blocked`.
    blocked: bool,
    /// The stream idle tick of its last activity (a frame from the
    /// client, or an answer's head or data sent).
    active: u32,
    /// When the stream opened (for telling rapid resets from
    /// cancellations).
    opened_at: Instant,
}

/// Queues a stream for this pass unless it is queued already.
fn requeue(woken: &mut Vec<u32>, id: u32, s: &Stream) {
    if !s.wake.queued.swap(true, Ordering::AcqRel) {
        woken.push(id);
    }
}

/// What the connection writes, and the send-side flow-control state the
/// streams share.
struct Out {
    wbuf: Vec<u8>,
    wpos: usize,
    /// What the client lets this server send on the connection.
    conn_send: i64,
    /// The client's SETTINGS_INITIAL_WINDOW_SIZE and SETTINGS_MAX_FRAME_SIZE.
    peer_initial_window: i64,
    peer_max_frame: usize,
    /// Streams whose data waits for the connection window.
    blocked: Vec<u32>,
    /// Streams not polled because the write buffer was full.
    deferred: Vec<u32>,
    /// Streams this server reset for the client's errors.
    error_resets: u64,
    /// The client's decoder was told the table size (0).
    table_sized: bool,
    /// Stream idle ticks so far.
    ticks: u32,
}

impl Out {
    fn unsent(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    fn rst(&mut self, id: u32, reason: Reason) {
        if ![Reason::NO_ERROR, Reason::CANCEL, Reason::REFUSED_STREAM].contains(&reason) {
            self.error_resets += 1;
        }
        frame::write_rst(&mut self.wbuf, id, reason);
    }

    /// Writes a header block as HEADERS (and CONTINUATION when it is over
    /// the client's frame size); `at` is where 9 bytes were reserved for
    /// the HEADERS frame header before the block was encoded.
    fn finish_headers(&mut self, at: usize, id: u32, end_stream: bool) {
        let end = if end_stream { flag::END_STREAM } else { 0 };
        let len = self.wbuf.len() - at - 9;
        if len <= self.peer_max_frame {
            frame::put_head(
                &mut self.wbuf,
                at,
                len,
                kind::HEADERS,
                end | flag::END_HEADERS,
                id,
            );
            return;
        }
        let block = self.wbuf.split_off(at + 9);
        self.wbuf.truncate(at);
        let mut chunks = block.chunks(self.peer_max_frame).peekable();
        let mut first = true;
        while let Some(c) = chunks.next() {
            let last = chunks.peek().is_none();
            let (k, mut f) = if first {
                (kind::HEADERS, end)
            } else {
                (kind::CONTINUATION, 0)
            };
            if last {
                f |= flag::END_HEADERS;
            }
            frame::write_head(&mut self.wbuf, c.len(), k, f, id);
            self.wbuf.extend_from_slice(c);
            first = false;
        }
    }

    /// Sends as much of `data` as the windows allow; the rest waits in the
    /// stream. True when all of it (and the end, if `end`) went out.
    fn send_data(&mut self, s: &mut Stream, id: u32, mut data: Bytes, end: bool) -> bool {
        loop {
            if data.is_empty() {
                if end {
                    frame::write_head(&mut self.wbuf, 0, kind::DATA, flag::END_STREAM, id);
                }
                return true;
            }
            let room = s
                .send_window
                .min(self.conn_send)
                .min(self.peer_max_frame as i64);
            if room <= 0 {
                s.pending = data;
                s.pending_end = end;
                if self.conn_send <= 0 && !s.blocked {
                    s.blocked = true;
                    self.blocked.push(id);
                }
                return false;
            }
            let n = (room as usize).min(data.len());
            let last = n == data.len();
            let f = if last && end { flag::END_STREAM } else { 0 };
            frame::write_head(&mut self.wbuf, n, kind::DATA, f, id);
            self.wbuf.extend_from_slice(&data[..n]);
            s.send_window -= n as i64;
            self.conn_send -= n as i64;
            s.active = self.ticks;
            if last {
                // The end (if any) went with this frame.
                return true;
            }
            data.advance(n);
        }
    }

    /// Writes a response head.
    fn response_head(&mut self, id: u32, parts: &http::response::Parts, end: bool) {
        let at = self.wbuf.len();
        self.wbuf.extend_from_slice(&[0; 9]);
        if !self.table_sized {
            // The encoder never indexes: its table is set to size 0 once,
            // which is within whatever SETTINGS_HEADER_TABLE_SIZE the
            // client sends, now or later (RFC 7541 section 4.2).
            self.table_sized = true;
            self.wbuf.push(0x20);
        }
        hpack::encode_status(&mut self.wbuf, parts.status.as_u16());
        let mut has_date = false;
        for (name, value) in &parts.headers {
            if is_connection_specific(name) {
                continue;
            }
            has_date |= name == header::DATE;
            hpack::encode_field(&mut self.wbuf, name, value.as_bytes());
        }
        if !has_date {
            hpack::encode_name_and_len(&mut self.wbuf, &header::DATE, 29);
            push_date(&mut self.wbuf);
        }
        self.finish_headers(at, id, end);
    }

    /// Writes a `100 Continue` head (a stream's interim answer).
    fn interim_continue(&mut self, id: u32) {
        let at = self.wbuf.len();
        self.wbuf.extend_from_slice(&[0; 9]);
        if !self.table_sized {
            self.table_sized = true;
            self.wbuf.push(0x20);
        }
        hpack::encode_status(&mut self.wbuf, 100);
        self.finish_headers(at, id, false);
    }

    /// Writes trailers, which end the stream.
    fn trailers(&mut self, id: u32, trailers: &HeaderMap) {
        let at = self.wbuf.len();
        self.wbuf.extend_from_slice(&[0; 9]);
        for (name, value) in trailers {
            if !is_connection_specific(name) {
                hpack::encode_field(&mut self.wbuf, name, value.as_bytes());
            }
        }
        self.finish_headers(at, id, true);
    }
}

/// Headers that belong to one HTTP/1.1 hop and are malformed in HTTP/2
/// (RFC 9113 section 8.2.2).
fn is_connection_specific(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::TE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// What a pass over a stream decided.
enum Step {
    Keep,
    Remove,
}

/// A header block's fields as they decode.
#[derive(Default)]
struct Fields {
    method: Option<Bytes>,
    scheme: Option<Bytes>,
    authority: Option<Bytes>,
    path: Option<Bytes>,
    headers: HeaderMap,
    regular_seen: bool,
    pseudo_seen: bool,
    /// Sum of the fields' sizes (RFC 7541 4.1).
    size: usize,
    /// Fields kept, pseudo-headers included (Envoy counts its map).
    count: usize,
    too_large: bool,
    /// Over the listener's `max_headers_count`: the stream is reset, as
    /// Envoy's HTTP/2 codec does (HTTP/1.1 gets a 431).
    too_many: bool,
    /// A header name with an underscore, where the listener refuses them
    /// (`headers_with_underscores_action: REJECT_REQUEST`): the stream is
    /// reset, as Envoy does for HTTP/2.
    underscore: bool,
    malformed: Option<&'static str>,
}

impl Fields {
    fn add(
        &mut self,
        name: Name,
        value: Bytes,
        size: usize,
        limit: usize,
        rules: HeaderRules,
        stats: &Stats,
    ) {
        self.size += size;
        if self.size > limit {
            // Stop collecting: a block of repeated references to a large
            // table entry would otherwise build a huge map.
            self.too_large = true;
        }
        if self.too_large || self.too_many || self.underscore || self.malformed.is_some() {
            return;
        }
        let slot = match name {
            Name::Method => &mut self.method,
            Name::Scheme => &mut self.scheme,
            Name::Authority => &mut self.authority,
            Name::Path => &mut self.path,
            Name::Status => return self.malformed = Some(":status in a request"),
            Name::Protocol => return self.malformed = Some(":protocol (extended CONNECT)"),
            Name::Invalid => return self.malformed = Some("invalid header name"),
            Name::Header(n) => {
                self.regular_seen = true;
                match admit(&rules, n.as_str().as_bytes(), stats) {
                    Admit::Keep => {}
                    Admit::Drop => return,
                    Admit::Refuse => return self.underscore = true,
                }
                if is_connection_specific(&n) && !(n == header::TE && &value[..] == b"trailers") {
                    return self.malformed = Some("connection-specific header");
                }
                // RFC 9113 section 8.2.1 calls whitespace around a value
                // malformed; Envoy takes it (so as not to break clients
                // that send it), and so does this server, trimmed as an
                // HTTP/1.1 field's value is.
                let value =
                    if value.first().zip(value.last()).is_some_and(|(a, z)| {
                        matches!(a, b' ' | b'\t') || matches!(z, b' ' | b'\t')
                    }) {
                        trim_whitespace(value)
                    } else {
                        value
                    };
                let Ok(v) = HeaderValue::from_maybe_shared(value) else {
                    return self.malformed = Some("invalid header value");
                };
                // Cookie crumbs are one header again for HTTP/1.1
                // (RFC 9113 section 8.2.3).
                if n == header::COOKIE {
                    if let Some(prev) = self.headers.get_mut(header::COOKIE) {
                        let mut joined = Vec::with_capacity(prev.len() + 2 + v.len());
                        joined.extend_from_slice(prev.as_bytes());
                        joined.extend_from_slice(b"; ");
                        joined.extend_from_slice(v.as_bytes());
                        if let Ok(j) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
                            *prev = j;
                        }
                        return;
                    }
                }
                // Counted as entries, so that cookie crumbs joined above
                // count once (as in Envoy).
                self.count += 1;
                if self.count > rules.max_count {
                    self.too_many = true;
                } else if self.headers.try_append(n, v).is_err() {
                    self.too_large = true;
                }
                return;
            }
        };
        self.count += 1;
        if self.count > rules.max_count {
            return self.too_many = true;
        }
        self.pseudo_seen = true;
        if self.regular_seen {
            self.malformed = Some("pseudo-header after a regular header");
        } else if slot.is_some() {
            self.malformed = Some("duplicate pseudo-header");
        } else {
            *slot = Some(value);
        }
    }

    /// The request the fields make, with its declared length.
    fn request(self) -> Result<(Request<()>, Option<u64>), &'static str> {
        if let Some(m) = self.malformed {
            return Err(m);
        }
        let method =
            Method::from_bytes(&self.method.ok_or("no :method")?).map_err(|_| "invalid :method")?;
        let mut parts = http::uri::Parts::default();
        if method == Method::CONNECT {
            if self.scheme.is_some() || self.path.is_some() {
                return Err(":scheme or :path in CONNECT");
            }
            let a = self.authority.ok_or("CONNECT without :authority")?;
            parts.authority =
                Some(Authority::from_maybe_shared(a).map_err(|_| "invalid :authority")?);
        } else {
            let scheme = self.scheme.ok_or("no :scheme")?;
            let path = self.path.ok_or("no :path")?;
            if path.is_empty() {
                return Err("empty :path");
            }
            if let Some(a) = self.authority {
                parts.scheme = Some(match &scheme[..] {
                    b"http" => Scheme::HTTP,
                    b"https" => Scheme::HTTPS,
                    s => Scheme::try_from(s).map_err(|_| "invalid :scheme")?,
                });
                parts.authority =
                    Some(Authority::from_maybe_shared(a).map_err(|_| "invalid :authority")?);
            }
            parts.path_and_query =
                Some(PathAndQuery::from_maybe_shared(path).map_err(|_| "invalid :path")?);
        }
        let uri = Uri::from_parts(parts).map_err(|_| "invalid request target")?;
        // Several content-length fields must agree (RFC 9110 section 8.6).
        let mut len = None;
        for v in self.headers.get_all(header::CONTENT_LENGTH) {
            let n = parse_length(v.as_bytes()).ok_or("invalid content-length")?;
            if len.is_some_and(|m| m != n) {
                return Err("content-length fields disagree");
            }
            len = Some(n);
        }
        let mut req = Request::new(());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_2;
        *req.headers_mut() = self.headers;
        Ok((req, len))
    }
}

/// A value without the spaces and tabs around it.
#[cold]
fn trim_whitespace(v: Bytes) -> Bytes {
    let blank = |b: &u8| matches!(b, b' ' | b'\t');
    let start = v.iter().position(|b| !blank(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !blank(b)).map_or(start, |i| i + 1);
    v.slice(start..end)
}

/// A header block split over HEADERS and CONTINUATION frames.
struct Partial {
    stream: u32,
    end_stream: bool,
    block: BytesMut,
}

struct Connection {
    io: TcpStream,
    conn: Arc<Conn>,
    rbuf: BytesMut,
    out: Out,
    dec: Decoder,
    streams: Streams,
    ready: Arc<Ready>,
    /// Streams to poll in this pass.
    woken: Vec<u32>,
    released: Vec<(u32, u32)>,
    /// The read buffer holds bytes not yet parsed (from the protocol sniff).
    unparsed: bool,
    preface_seen: bool,
    settings_seen: bool,
    /// The highest stream id the client opened.
    last_id: u32,
    /// Set when this server sent GOAWAY: no new streams.
    goaway_sent: bool,
    /// The client sent GOAWAY.
    peer_goaway: bool,
    /// No more frames are read (end of stream, or a connection error).
    read_closed: bool,
    /// Why the connection ended, for the log.
    closed_by: Option<String>,
    /// What the client may still send on the connection, and what was
    /// consumed but not yet credited back.
    conn_recv: i64,
    conn_unacked: u32,
    partial: Option<Partial>,
    max_header_list: usize,
    /// The listener's rules on request header fields.
    header_rules: HeaderRules,
    /// The largest header block accepted.
    max_block: usize,
    opened: u64,
    early_resets: u64,
    /// The listener's drain: when it fires, GOAWAY.
    drain: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    drain_wake: Arc<StreamWake>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    idle_wake: Arc<StreamWake>,
    /// The listener's stream idle timeout (see [`super::stream_idle`]).
    stream_idle: Option<Duration>,
    /// Streams after which the connection is drained (the HCM's
    /// `max_requests_per_connection`).
    max_requests: Option<u64>,
    /// The HCM's `proxy_100_continue`: a stream that expects `100
    /// Continue` is told it when its body is first read (after an
    /// HTTP/1.1 upstream's own 100), not at once.
    proxy_continue: bool,
    /// Its tick; with the listener's off, armed by the first stream whose
    /// route sets its own.
    tick: Option<Tick>,
    tick_wake: Arc<StreamWake>,
    /// The keep-alive PINGs (`connection_keepalive`).
    ping: Option<Ping>,
    ping_wake: Arc<StreamWake>,
    /// Frames received so far (an unanswered PING's wait starts again
    /// while others come, as Envoy's does).
    frames_in: u64,
    /// When the last stream ended.
    idle_since: Instant,
    /// Since when unsent output has waited for the socket.
    write_stalled_since: Option<Instant>,
    /// To be closed at once (the client stopped reading).
    dead: bool,
    /// The listener's HTTP/2 limits (streams, windows).
    h2: H2Limits,
}

impl Connection {
    fn new(
        io: TcpStream,
        rbuf: BytesMut,
        conn: Arc<Conn>,
        max_header_list: usize,
        idle_timeout: Option<Duration>,
        stream_idle_timeout: Option<Duration>,
        drain: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Connection {
        let (max_requests, header_rules, h2, proxy_continue) = {
            let c = &conn.listener.load().config;
            (
                c.max_requests_per_connection,
                c.header_rules,
                c.h2,
                c.proxy_100_continue,
            )
        };
        let mut wbuf = Vec::with_capacity(16 * 1024);
        frame::write_settings(
            &mut wbuf,
            &[
                (setting::MAX_CONCURRENT_STREAMS, h2.max_streams),
                (setting::INITIAL_WINDOW_SIZE, h2.stream_window),
                (setting::MAX_HEADER_LIST_SIZE, max_header_list as u32),
            ],
        );
        if h2.conn_window > frame::DEFAULT_WINDOW as u32 {
            frame::write_window_update(&mut wbuf, 0, h2.conn_window - frame::DEFAULT_WINDOW as u32);
        }
        let now = Instant::now();
        let unparsed = !rbuf.is_empty();
        let ready = Arc::new(Ready::default());
        let timer = |id| {
            Arc::new(StreamWake {
                id,
                queued: AtomicBool::new(true),
                ready: ready.clone(),
                route_idle: RouteIdle::default(),
            })
        };
        let (drain_wake, idle_wake, tick_wake) = (timer(DRAIN_ID), timer(IDLE_ID), timer(TICK_ID));
        let ping_wake = timer(PING_ID);
        Connection {
            io,
            conn,
            rbuf,
            out: Out {
                wbuf,
                wpos: 0,
                conn_send: frame::DEFAULT_WINDOW,
                peer_initial_window: frame::DEFAULT_WINDOW,
                peer_max_frame: frame::DEFAULT_MAX_FRAME,
                blocked: Vec::new(),
                deferred: Vec::new(),
                error_resets: 0,
                table_sized: false,
                ticks: 0,
            },
            dec: Decoder::new(TABLE_SIZE),
            streams: Streams::default(),
            ready,
            // The timers are polled once to register their wakers.
            woken: vec![DRAIN_ID, IDLE_ID, TICK_ID, PING_ID],
            released: Vec::new(),
            unparsed,
            preface_seen: false,
            settings_seen: false,
            last_id: 0,
            goaway_sent: false,
            peer_goaway: false,
            read_closed: false,
            closed_by: None,
            // At least the protocol's default window (the config's floor).
            conn_recv: i64::from(h2.conn_window),
            h2,
            conn_unacked: 0,
            partial: None,
            max_header_list,
            header_rules,
            max_block: max_header_list.saturating_mul(2).max(64 * 1024),
            opened: 0,
            early_resets: 0,
            drain: Some(drain),
            drain_wake,
            idle: idle_timeout.map(|d| (d, Box::pin(tokio::time::sleep_until(now + d)))),
            idle_wake,
            stream_idle: stream_idle_timeout,
            max_requests,
            proxy_continue,
            tick: stream_idle_timeout.map(|d| Tick::new(stream_idle::period(d))),
            tick_wake,
            ping: h2.keepalive.map(|(interval, timeout)| Ping {
                interval,
                timeout,
                sleep: Box::pin(tokio::time::sleep_until(now + interval)),
                awaiting: None,
            }),
            ping_wake,
            frames_in: 0,
            idle_since: now,
            write_stalled_since: None,
            dead: false,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.unparsed {
            // What came with the preface (often SETTINGS and the first
            // requests) is handled before waiting for more.
            self.unparsed = false;
            if let Err(e) = self.frames() {
                self.fail(e);
            }
        }
        {
            let mut r = self.ready.lock();
            r.polling = true;
            if !r.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                r.waker = Some(cx.waker().clone());
            }
        }
        for _ in 0..64 {
            if !tokio::task::coop::has_budget_remaining() {
                // Every socket and stream would now answer "not ready":
                // passes over them would be wasted. Yield instead.
                break;
            }
            let mut busy = false;
            if !self.read_closed && self.out.unsent() < WRITE_HIGH {
                match poll_fill(&self.io, &mut self.rbuf, cx) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        busy = true;
                        if let Err(e) = self.frames() {
                            self.fail(e);
                        }
                    }
                    Poll::Ready(r) => {
                        busy = true;
                        self.read_closed = true;
                        self.closed_by.get_or_insert_with(|| match r {
                            Err(e) => format!("read failed: {e}"),
                            Ok(_) => "client closed the connection".into(),
                        });
                        self.abort_all();
                    }
                    Poll::Pending => {}
                }
            }
            busy |= self.take_ready();
            self.run_streams();
            if self.dead {
                self.abort_all();
                return Poll::Ready(());
            }
            self.credit();
            if let Err(e) = self.flush(cx) {
                self.closed_by
                    .get_or_insert_with(|| format!("write failed: {e}"));
                self.abort_all();
                return Poll::Ready(());
            }
            if self.out.unsent() < WRITE_HIGH && !self.out.deferred.is_empty() {
                for id in std::mem::take(&mut self.out.deferred) {
                    if let Some(s) = self.streams.get(&id) {
                        requeue(&mut self.woken, id, s);
                    }
                }
                busy = true;
            }
            if self.out.unsent() == 0
                && (self.read_closed || self.goaway_sent || self.peer_goaway)
                && self.streams.is_empty()
            {
                return Poll::Ready(());
            }
            if busy {
                continue;
            }
            {
                let mut r = self.ready.lock();
                if !r.woken.is_empty() || !r.released.is_empty() {
                    continue;
                }
                r.polling = false;
            }
            return Poll::Pending;
        }
        // Fair to the worker's other connections: yield, come back soon.
        self.ready.lock().polling = false;
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The drain timer fired (or is polled for the first time).
    fn poll_drain(&mut self) {
        let Some(d) = &mut self.drain else {
            return;
        };
        let waker = self.drain_wake.rearm();
        if d.as_mut().poll(&mut Context::from_waker(&waker)).is_ready() {
            self.drain = None;
            self.go_away(Reason::NO_ERROR, "draining");
        }
    }

    /// The idle timer fired (or is polled for the first time): GOAWAY if
    /// the connection has had no stream for the idle timeout, else the
    /// timer is re-armed for when it might have. It is not moved as
    /// streams come and go, only when it fires early.
    fn poll_idle(&mut self) {
        let waker = self.idle_wake.rearm();
        let mut cx = Context::from_waker(&waker);
        loop {
            let limit = match &mut self.idle {
                None => return,
                Some((d, sleep)) => {
                    if sleep.as_mut().poll(&mut cx).is_pending() {
                        return;
                    }
                    *d
                }
            };
            let now = Instant::now();
            let due = if self.streams.is_empty() {
                self.idle_since + limit
            } else {
                now + limit
            };
            if now >= due && !self.goaway_sent {
                self.idle = None;
                self.go_away(Reason::NO_ERROR, "idle timeout");
                return;
            }
            if let Some((_, sleep)) = &mut self.idle {
                sleep
                    .as_mut()
                    .reset(due.max(now + Duration::from_millis(1)));
            }
        }
    }

    /// The stream idle tick fired (or is polled for the first time). A
    /// stream without activity for the timeout ends: with a 408 when its
    /// answer has not started, else with RST_STREAM(CANCEL) (an upstream
    /// that stalled, or a client that stopped opening its window). A
    /// connection whose writes made no progress for as long is closed.
    fn poll_tick(&mut self) {
        let waker = self.tick_wake.rearm();
        let mut cx = Context::from_waker(&waker);
        let Some(Tick { period, sleep }) = &mut self.tick else {
            return;
        };
        if sleep.as_mut().poll(&mut cx).is_pending() {
            return;
        }
        let period = *period;
        sleep.as_mut().reset(Instant::now() + period);
        // Polled once more so that the new deadline wakes this waker.
        let _ = sleep.as_mut().poll(&mut cx);
        self.out.ticks = self.out.ticks.wrapping_add(1);
        if self.stream_idle.is_some_and(|timeout| {
            self.write_stalled_since
                .is_some_and(|t| t.elapsed() >= timeout)
        }) {
            self.closed_by = Some("the client stopped reading".into());
            self.dead = true;
            return;
        }
        let ticks = self.out.ticks;
        let listener_on = self.stream_idle.is_some();
        let idle: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| {
                let limit = s.wake.route_idle.limit();
                // With the listener's timeout off, only routes' apply.
                (listener_on || limit != stream_idle::Limit::Listener)
                    && stream_idle::ticks_for(limit, period)
                        .is_some_and(|n| ticks.wrapping_sub(s.active) > n)
            })
            .map(|(&id, _)| id)
            .collect();
        let conn = self.conn.clone();
        let stats = &conn.shared.stats;
        for id in idle {
            stats
                .downstream_rq_idle_timeout
                .fetch_add(1, Ordering::Relaxed);
            let Some(s) = self.streams.get(&id) else {
                continue;
            };
            if matches!(s.task, Task::Handler(_)) {
                stats.count_status(408);
                let (parts, ()) = Response::builder()
                    .status(StatusCode::REQUEST_TIMEOUT)
                    .body(())
                    .unwrap_or_default()
                    .into_parts();
                self.out.response_head(id, &parts, true);
                if !s.remote_closed {
                    self.out.rst(id, Reason::NO_ERROR);
                }
            } else {
                self.out.rst(id, Reason::CANCEL);
            }
            self.remove(id);
        }
    }

    /// The keep-alive timer fired (or is polled for the first time): a
    /// PING goes out, or the one out is overdue: the connection is closed
    /// at once (Envoy's keep-alive timeout), unless frames came meanwhile
    /// (then it waits a whole timeout again, where Envoy counts from the
    /// last frame: up to twice as long in all).
    fn poll_ping(&mut self) {
        let waker = self.ping_wake.rearm();
        let mut cx = Context::from_waker(&waker);
        let frames_in = self.frames_in;
        let Some(p) = &mut self.ping else {
            return;
        };
        if p.sleep.as_mut().poll(&mut cx).is_pending() {
            return;
        }
        let now = Instant::now();
        match p.awaiting {
            None => {
                let payload = fastrand::u64(..);
                frame::write_head(&mut self.out.wbuf, 8, kind::PING, 0, 0);
                self.out.wbuf.extend_from_slice(&payload.to_be_bytes());
                p.awaiting = Some((payload, frames_in));
            }
            Some((payload, seen)) if seen != frames_in => p.awaiting = Some((payload, frames_in)),
            Some(_) => {
                tracing::debug!(peer = %self.conn.peer, "HTTP/2 keep-alive PING not answered: closing");
                self.closed_by = Some("keep-alive PING not answered".into());
                self.dead = true;
                return;
            }
        }
        p.sleep.as_mut().reset(now + p.timeout);
        // Polled once more so that the new deadline wakes this waker.
        let _ = p.sleep.as_mut().poll(&mut cx);
    }

    /// A PING's ACK came: the one awaited ends its wait; the next goes
    /// out an interval later.
    fn on_ping_ack(&mut self, payload: &[u8]) {
        let Some(p) = &mut self.ping else {
            return;
        };
        if p.awaiting
            .is_some_and(|(sent, _)| payload == sent.to_be_bytes())
        {
            p.awaiting = None;
            p.sleep.as_mut().reset(Instant::now() + p.interval);
            // Polled again, so that the new deadline wakes it.
            Wake::wake_by_ref(&self.ping_wake);
        }
    }

    /// Sends GOAWAY: streams open now finish, no new ones start.
    fn go_away(&mut self, reason: Reason, why: &str) {
        // A second GOAWAY only to name an error after a graceful one.
        if self.goaway_sent && (reason == Reason::NO_ERROR || self.closed_by.is_some()) {
            return;
        }
        self.goaway_sent = true;
        frame::write_goaway(&mut self.out.wbuf, self.last_id, reason, why);
        if reason != Reason::NO_ERROR {
            self.closed_by
                .get_or_insert_with(|| format!("{reason}: {why}"));
        }
    }

    /// A connection error: GOAWAY with the reason, every stream ends.
    fn fail(&mut self, e: ConnError) {
        tracing::debug!(peer = %self.conn.peer, "HTTP/2 connection error {}: {}", e.0, e.1);
        self.go_away(e.0, &e.1);
        self.read_closed = true;
        self.abort_all();
    }

    fn abort_all(&mut self) {
        self.streams.abort_all();
    }

    fn flush(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.out.wpos < self.out.wbuf.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.out.wbuf[self.out.wpos..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.out.wpos += n;
                    self.write_stalled_since = None;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {
                    if self.write_stalled_since.is_none() {
                        self.write_stalled_since = Some(Instant::now());
                    }
                    return Ok(());
                }
            }
        }
        self.out.wbuf.clear();
        self.out.wpos = 0;
        Ok(())
    }

    /// Moves what other tasks queued into this pass; true if anything.
    fn take_ready(&mut self) -> bool {
        let mut r = self.ready.lock();
        if r.woken.is_empty() && r.released.is_empty() {
            return false;
        }
        if self.woken.is_empty() {
            std::mem::swap(&mut self.woken, &mut r.woken);
        } else {
            self.woken.append(&mut r.woken);
        }
        self.released.append(&mut r.released);
        true
    }

    /// Credits consumed request-body bytes back to the client.
    fn credit(&mut self) {
        for (id, n) in self.released.drain(..) {
            if n == 0 {
                // A `100 Continue` asked for, unless the answer has begun.
                let open = self
                    .streams
                    .get(&id)
                    .is_some_and(|s| !s.remote_closed && matches!(s.task, Task::Handler(_)));
                if open {
                    self.out.interim_continue(id);
                }
                continue;
            }
            self.conn_unacked += n;
            if let Some(s) = self.streams.get_mut(&id) {
                if !s.remote_closed {
                    s.recv_unacked += n;
                    if s.recv_unacked >= self.h2.stream_window / 2 {
                        frame::write_window_update(&mut self.out.wbuf, id, s.recv_unacked);
                        s.recv_window += i64::from(s.recv_unacked);
                        s.recv_unacked = 0;
                    }
                }
            }
        }
        // Credited in batches, but at once when the client's window runs
        // low: streams whose bodies wait unread must not hold up the ones
        // being read.
        let window = self.h2.conn_window;
        let low = self.conn_recv < i64::from(window / 2);
        if self.conn_unacked > 0 && (self.conn_unacked >= window / 2 || low) && !self.read_closed {
            frame::write_window_update(&mut self.out.wbuf, 0, self.conn_unacked);
            self.conn_recv += i64::from(self.conn_unacked);
            self.conn_unacked = 0;
        }
    }

    fn run_streams(&mut self) {
        let mut i = 0;
        while i < self.woken.len() {
            let id = self.woken[i];
            i += 1;
            if id == DRAIN_ID {
                self.poll_drain();
                continue;
            }
            if id == IDLE_ID {
                self.poll_idle();
                continue;
            }
            if id == TICK_ID {
                self.poll_tick();
                continue;
            }
            if id == PING_ID {
                self.poll_ping();
                continue;
            }
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.wake.queued.store(false, Ordering::Release);
            let step = step(s, id, &mut self.out);
            if self.stream_idle.is_none() {
                if let stream_idle::Limit::After(d) = s.wake.route_idle.limit() {
                    self.tick_for_route(d);
                }
            }
            if let Step::Remove = step {
                self.remove(id);
            }
        }
        self.woken.clear();
    }

    /// With the listener's stream idle timeout off, a route's own needs a
    /// tick: armed at a fifth of the shortest such timeout seen (a longer
    /// tick never cuts a stream early, only late).
    fn tick_for_route(&mut self, timeout: Duration) {
        let period = stream_idle::period(timeout);
        if self.tick.as_ref().is_some_and(|t| t.period <= period) {
            return;
        }
        self.tick = Some(Tick::new(period));
        // Polled once, so that it wakes the connection when due.
        self.poll_tick();
    }

    fn remove(&mut self, id: u32) {
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        if let Some(r) = &s.recv {
            r.fail(Fail::Reset);
        }
        if self.streams.is_empty() && self.idle.is_some() {
            self.idle_since = Instant::now();
        }
    }

    /// Handles every complete frame in the read buffer.
    fn frames(&mut self) -> Result<(), ConnError> {
        if !self.preface_seen {
            let n = self.rbuf.len().min(frame::PREFACE.len());
            if self.rbuf[..n] != frame::PREFACE[..n] {
                return Err(err(
                    Reason::PROTOCOL_ERROR,
                    "not an HTTP/2 connection preface",
                ));
            }
            if n < frame::PREFACE.len() {
                return Ok(());
            }
            self.rbuf.advance(n);
            self.preface_seen = true;
        }
        while self.rbuf.len() >= 9 && !self.read_closed {
            let head = Head::parse(&self.rbuf[..9]);
            if head.len > frame::DEFAULT_MAX_FRAME {
                return Err(err(
                    Reason::FRAME_SIZE_ERROR,
                    format!("frame of {} bytes over the 16384 limit", head.len),
                ));
            }
            if self.rbuf.len() < 9 + head.len {
                self.rbuf.reserve(9 + head.len - self.rbuf.len());
                return Ok(());
            }
            self.rbuf.advance(9);
            let payload = self.rbuf.split_to(head.len).freeze();
            self.frame(head, payload)?;
        }
        Ok(())
    }

    fn frame(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        self.frames_in = self.frames_in.wrapping_add(1);
        if !self.settings_seen && (head.kind != kind::SETTINGS || head.has(flag::ACK)) {
            return Err(err(Reason::PROTOCOL_ERROR, "first frame is not SETTINGS"));
        }
        if let Some(p) = &self.partial {
            if head.kind != kind::CONTINUATION || head.stream != p.stream {
                return Err(err(
                    Reason::PROTOCOL_ERROR,
                    "header block interrupted before its END_HEADERS",
                ));
            }
        }
        match head.kind {
            kind::DATA => self.on_data(head, payload),
            kind::HEADERS => self.on_headers(head, payload),
            kind::PRIORITY => {
                if head.stream == 0 {
                    return Err(err(Reason::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                // Priorities are ignored; a malformed one resets its
                // stream if the stream is open (never an idle one).
                if payload.len() != 5 && self.streams.contains_key(&head.stream) {
                    return self.reset(head.stream, Reason::FRAME_SIZE_ERROR);
                }
                Ok(())
            }
            kind::RST_STREAM => self.on_rst(head, &payload),
            kind::SETTINGS => self.on_settings(head, &payload),
            kind::PUSH_PROMISE => Err(err(Reason::PROTOCOL_ERROR, "PUSH_PROMISE from a client")),
            kind::PING => {
                if head.stream != 0 {
                    return Err(err(Reason::PROTOCOL_ERROR, "PING on a stream"));
                }
                if payload.len() != 8 {
                    return Err(err(Reason::FRAME_SIZE_ERROR, "PING not 8 bytes"));
                }
                if !head.has(flag::ACK) {
                    frame::write_head(&mut self.out.wbuf, 8, kind::PING, flag::ACK, 0);
                    self.out.wbuf.extend_from_slice(&payload);
                } else {
                    self.on_ping_ack(&payload);
                }
                Ok(())
            }
            kind::GOAWAY => {
                if head.stream != 0 {
                    return Err(err(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                if payload.len() < 8 {
                    return Err(err(Reason::FRAME_SIZE_ERROR, "GOAWAY under 8 bytes"));
                }
                self.peer_goaway = true;
                Ok(())
            }
            kind::WINDOW_UPDATE => self.on_window_update(head, &payload),
            kind::CONTINUATION => {
                let Some(p) = &mut self.partial else {
                    return Err(err(Reason::PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
                };
                if p.block.len() + payload.len() > self.max_block {
                    return Err(err(
                        Reason::ENHANCE_YOUR_CALM,
                        format!("header block over {} bytes", self.max_block),
                    ));
                }
                p.block.extend_from_slice(&payload);
                if head.has(flag::END_HEADERS) {
                    let p = self.partial.take().expect("checked above");
                    self.header_block(p.stream, p.end_stream, p.block.freeze())?;
                }
                Ok(())
            }
            _ => Ok(()), // unknown frame types are ignored (RFC 9113 5.5)
        }
    }

    /// A request that breaks HTTP/2's message rules (RFC 9113 section
    /// 8.1.1): the connection ends with a GOAWAY naming it, as Envoy's
    /// does by default, or, where the listener says
    /// `stream_error_on_invalid_http_message`, the stream alone is reset.
    fn messaging_error(&mut self, id: u32, why: &str) -> Result<(), ConnError> {
        let stats = &self.conn.shared.stats;
        stats.rx_messaging_error.fetch_add(1, Ordering::Relaxed);
        if self.h2.stream_error_on_invalid {
            tracing::debug!(peer = %self.conn.peer, stream = id, "malformed request: {why}");
            return self.reset(id, Reason::PROTOCOL_ERROR);
        }
        Err(err(
            Reason::PROTOCOL_ERROR,
            format!("malformed request on stream {id}: {why}"),
        ))
    }

    /// Resets a stream for an error of the client's; too many such
    /// resets end the connection.
    fn reset(&mut self, id: u32, reason: Reason) -> Result<(), ConnError> {
        self.out.rst(id, reason);
        self.remove(id);
        if self.out.error_resets > MAX_ERROR_RESETS {
            return Err(err(
                Reason::ENHANCE_YOUR_CALM,
                format!("over {MAX_ERROR_RESETS} streams reset for errors"),
            ));
        }
        Ok(())
    }

    fn on_settings(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream != 0 {
            return Err(err(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if head.has(flag::ACK) {
            if !payload.is_empty() {
                return Err(err(Reason::FRAME_SIZE_ERROR, "SETTINGS ACK with a payload"));
            }
            return Ok(());
        }
        if !payload.len().is_multiple_of(6) {
            return Err(err(
                Reason::FRAME_SIZE_ERROR,
                "SETTINGS not a multiple of 6 bytes",
            ));
        }
        self.settings_seen = true;
        // Applied once per frame: a frame repeating the window setting
        // must not cost a walk over every stream per entry.
        let mut window = None;
        for s in payload.chunks(6) {
            let id = u16::from_be_bytes([s[0], s[1]]);
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match id {
                setting::ENABLE_PUSH | setting::ENABLE_CONNECT_PROTOCOL if v > 1 => {
                    return Err(err(
                        Reason::PROTOCOL_ERROR,
                        format!("setting {id:#x} = {v}"),
                    ));
                }
                setting::INITIAL_WINDOW_SIZE => {
                    let v = i64::from(v);
                    if v > frame::MAX_WINDOW {
                        return Err(err(
                            Reason::FLOW_CONTROL_ERROR,
                            format!("SETTINGS_INITIAL_WINDOW_SIZE {v} over 2^31-1"),
                        ));
                    }
                    window = Some(v);
                }
                setting::MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME as u32..1 << 24).contains(&v) {
                        return Err(err(
                            Reason::PROTOCOL_ERROR,
                            format!("SETTINGS_MAX_FRAME_SIZE {v} out of range"),
                        ));
                    }
                    self.out.peer_max_frame = v as usize;
                }
                // The encoder never indexes, and its first block sets the
                // client's table to size 0 (whatever the client allows);
                // the rest do not change what this server sends.
                setting::HEADER_TABLE_SIZE
                | setting::MAX_CONCURRENT_STREAMS
                | setting::MAX_HEADER_LIST_SIZE => {}
                _ => {}
            }
        }
        if let Some(v) = window {
            let delta = v - self.out.peer_initial_window;
            self.out.peer_initial_window = v;
            for (&sid, s) in self.streams.iter_mut() {
                s.send_window += delta;
                if s.send_window > frame::MAX_WINDOW {
                    return Err(err(Reason::FLOW_CONTROL_ERROR, "stream window over 2^31-1"));
                }
                if delta > 0 && !s.pending.is_empty() {
                    requeue(&mut self.woken, sid, s);
                }
            }
        }
        frame::write_head(&mut self.out.wbuf, 0, kind::SETTINGS, flag::ACK, 0);
        Ok(())
    }

    fn on_window_update(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if payload.len() != 4 {
            return Err(err(Reason::FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes"));
        }
        let inc = i64::from(
            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff,
        );
        if head.stream == 0 {
            if inc == 0 {
                return Err(err(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            self.out.conn_send += inc;
            if self.out.conn_send > frame::MAX_WINDOW {
                return Err(err(
                    Reason::FLOW_CONTROL_ERROR,
                    "connection window over 2^31-1",
                ));
            }
            for id in self.out.blocked.drain(..) {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.blocked = false;
                    requeue(&mut self.woken, id, s);
                }
            }
            return Ok(());
        }
        if head.stream > self.last_id {
            return Err(err(
                Reason::PROTOCOL_ERROR,
                "WINDOW_UPDATE on an idle stream",
            ));
        }
        let Some(s) = self.streams.get_mut(&head.stream) else {
            return Ok(()); // closed: ignored
        };
        if inc == 0 {
            return self.reset(head.stream, Reason::PROTOCOL_ERROR);
        }
        s.send_window += inc;
        if s.send_window > frame::MAX_WINDOW {
            return self.reset(head.stream, Reason::FLOW_CONTROL_ERROR);
        }
        if !s.pending.is_empty() {
            requeue(&mut self.woken, head.stream, s);
        }
        Ok(())
    }

    fn on_rst(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(err(Reason::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
        }
        if payload.len() != 4 {
            return Err(err(Reason::FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes"));
        }
        if head.stream > self.last_id {
            return Err(err(Reason::PROTOCOL_ERROR, "RST_STREAM on an idle stream"));
        }
        if let Some(s) = self.streams.get(&head.stream) {
            // Envoy's rule: a stream reset before its answer and within a
            // second of opening is premature; a connection where they
            // are over half of the streams is an attack, not cancelled
            // calls.
            if matches!(s.task, Task::Handler(_)) && s.opened_at.elapsed() < EARLY {
                self.early_resets += 1;
                if self.early_resets > MAX_EARLY_RESETS && self.early_resets * 2 > self.opened {
                    return Err(err(
                        Reason::ENHANCE_YOUR_CALM,
                        "too many streams reset before their answer",
                    ));
                }
            }
            self.remove(head.stream);
        }
        Ok(())
    }

    fn on_data(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        let id = head.stream;
        if id == 0 {
            return Err(err(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let total = payload.len();
        self.conn_recv -= total as i64;
        if self.conn_recv < 0 {
            return Err(err(
                Reason::FLOW_CONTROL_ERROR,
                "DATA over the connection window",
            ));
        }
        let data = unpad(head, payload)?;
        let Some(s) = self.streams.get_mut(&id) else {
            if id > self.last_id {
                return Err(err(Reason::PROTOCOL_ERROR, "DATA on an idle stream"));
            }
            // A stream already closed (or reset): its bytes still count
            // against the connection window, and are credited back.
            self.conn_unacked += total as u32;
            return Ok(());
        };
        if s.remote_closed {
            self.conn_unacked += total as u32;
            return self.reset(id, Reason::STREAM_CLOSED);
        }
        s.active = self.out.ticks;
        s.recv_window -= total as i64;
        if s.recv_window < 0 {
            self.conn_unacked += total as u32;
            return self.reset(id, Reason::FLOW_CONTROL_ERROR);
        }
        // Padding is credited back at once; data when it is consumed.
        let pad = (total - data.len()) as u32;
        self.conn_unacked += pad;
        s.recv_unacked += pad;
        s.got_len += data.len() as u64;
        let end = head.has(flag::END_STREAM);
        let bad_len = match s.expect_len {
            Some(n) => s.got_len > n || (end && s.got_len != n),
            None => false,
        };
        if bad_len {
            self.conn_unacked += data.len() as u32;
            return self.messaging_error(id, "body length differs from content-length");
        }
        let recv = s.recv.clone();
        if end {
            s.remote_closed = true;
            s.recv = None;
        }
        let Some(recv) = recv else {
            // No body reader (an answer given without reading it).
            self.conn_unacked += data.len() as u32;
            return Ok(());
        };
        let mut st = recv.lock();
        if st.dropped {
            drop(st);
            self.conn_unacked += data.len() as u32;
        } else {
            if !data.is_empty() {
                st.buffered += data.len();
                push_chunk(&mut st.chunks, data);
            }
            st.end |= end;
            if let Some(w) = st.reader.take() {
                w.wake();
            }
        }
        Ok(())
    }

    fn on_headers(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        let id = head.stream;
        if id == 0 {
            return Err(err(Reason::PROTOCOL_ERROR, "HEADERS on stream 0"));
        }
        let mut block = unpad(head, payload)?;
        if head.has(flag::PRIORITY) {
            if block.len() < 5 {
                return Err(err(
                    Reason::FRAME_SIZE_ERROR,
                    "HEADERS priority fields cut short",
                ));
            }
            block.advance(5);
        }
        let end_stream = head.has(flag::END_STREAM);
        if head.has(flag::END_HEADERS) {
            return self.header_block(id, end_stream, block);
        }
        if block.len() > self.max_block {
            return Err(err(
                Reason::ENHANCE_YOUR_CALM,
                format!("header block over {} bytes", self.max_block),
            ));
        }
        self.partial = Some(Partial {
            stream: id,
            end_stream,
            block: BytesMut::from(&block[..]),
        });
        Ok(())
    }

    /// A complete header block: a new request, or a request's trailers.
    fn header_block(&mut self, id: u32, end_stream: bool, block: Bytes) -> Result<(), ConnError> {
        // Decoded whatever happens to the stream: the table must stay in
        // step with the client's.
        let mut f = Fields {
            headers: crate::spare::header_map(8),
            ..Fields::default()
        };
        let (limit, rules) = (self.max_header_list, self.header_rules);
        let stats = &self.conn.shared.stats;
        self.dec
            .decode(&block, self.max_block, |n, v, size| {
                f.add(n, v, size, limit, rules, stats)
            })
            .map_err(|e| err(Reason::COMPRESSION_ERROR, e.to_string()))?;
        if id.is_multiple_of(2) {
            return Err(err(Reason::PROTOCOL_ERROR, "even stream id from a client"));
        }
        if let Some(s) = self.streams.get_mut(&id) {
            // Trailers.
            if s.remote_closed {
                return self.reset(id, Reason::STREAM_CLOSED);
            }
            // Envoy's HTTP/2 codec resets these with INTERNAL_ERROR.
            if f.too_large || f.too_many || f.underscore {
                return self.reset(id, Reason::INTERNAL_ERROR);
            }
            let why = if !end_stream {
                Some("trailers without END_STREAM")
            } else if f.pseudo_seen {
                Some("pseudo-header in trailers")
            } else if f.malformed.is_some() {
                f.malformed
            } else if s.expect_len.is_some_and(|n| n != s.got_len) {
                Some("body length differs from content-length")
            } else {
                None
            };
            if let Some(why) = why {
                return self.messaging_error(id, why);
            }
            s.remote_closed = true;
            s.active = self.out.ticks;
            if let Some(recv) = s.recv.take() {
                let mut st = recv.lock();
                if !st.dropped {
                    st.trailers = Some(f.headers);
                    st.end = true;
                    if let Some(w) = st.reader.take() {
                        w.wake();
                    }
                }
            }
            return Ok(());
        }
        if id <= self.last_id {
            // A stream already closed; nothing more to do with it.
            return Ok(());
        }
        self.last_id = id;
        if self.goaway_sent {
            return Ok(()); // past the GOAWAY: the client retries elsewhere
        }
        if self.streams.len() >= self.h2.max_streams as usize {
            self.out.rst(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        self.opened += 1;
        if self.max_requests.is_some_and(|m| self.opened >= m) {
            // This stream is served; the client opens the next elsewhere.
            self.conn
                .shared
                .stats
                .downstream_cx_max_requests_reached
                .fetch_add(1, Ordering::Relaxed);
            self.go_away(Reason::NO_ERROR, "max requests per connection");
        }
        if f.too_many {
            tracing::debug!(peer = %self.conn.peer, stream = id, "over max_headers_count");
            return self.reset(id, Reason::INTERNAL_ERROR);
        }
        if f.underscore {
            tracing::debug!(peer = %self.conn.peer, stream = id, "header name with an underscore");
            return self.reset(id, Reason::INTERNAL_ERROR);
        }
        let too_large = f.too_large;
        let (req, expect_len) = match f.request() {
            Ok(r) => r,
            Err(why) => return self.messaging_error(id, why),
        };
        if end_stream && expect_len.is_some_and(|n| n != 0) {
            return self.messaging_error(id, "content-length without a body");
        }
        let head_only = req.method() == Method::HEAD;
        // A 431 never reads its body: what arrives is credited back at once.
        let recv = (!end_stream && !too_large).then(|| Arc::new(Recv::default()));
        // A client waiting to be asked for its body is asked at once, as
        // Envoy asks; where the listener proxies 100-continue, when its
        // body is first read (see `proxy_continue`).
        let owes_continue = recv.is_some()
            && req
                .headers()
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if owes_continue && !self.proxy_continue {
            self.out.interim_continue(id);
        }
        let wake = Arc::new(StreamWake {
            id,
            queued: AtomicBool::new(true),
            ready: self.ready.clone(),
            route_idle: RouteIdle::default(),
        });
        let task = if too_large {
            // Answered here; the stream still exists until both sides end.
            let mut r = Response::new(ResponseBody::local(
                Bytes::from_static(b"request headers too large\n"),
                super::body::Guard::new(self.conn.shared.stats.clone()),
            ));
            *r.status_mut() = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
            Task::Handler(Box::pin(std::future::ready(Ok(r))))
        } else {
            let body = RequestBody::Http2(Body {
                recv: recv.clone(),
                ready: self.ready.clone(),
                id,
                owes_continue: owes_continue && self.proxy_continue,
                len: expect_len,
            });
            // Boxed straight from the call: a wrapping future would be
            // one more copy of a large state.
            Task::Handler(Box::pin(handle(
                self.conn.clone(),
                req.map(|()| body),
                Some(wake.clone() as Arc<dyn HasRouteIdle>),
            )))
        };
        self.streams.insert(
            id,
            Stream {
                waker: Waker::from(wake.clone()),
                wake,
                task,
                pending: Bytes::new(),
                pending_end: false,
                send_window: self.out.peer_initial_window,
                recv,
                recv_window: i64::from(self.h2.stream_window),
                recv_unacked: 0,
                remote_closed: end_stream,
                head_only,
                expect_len,
                got_len: 0,
                blocked: false,
                active: self.out.ticks,
                opened_at: Instant::now(),
            },
        );
        self.woken.push(id);
        Ok(())
    }
}

/// Queues request-body data. Small pieces are copied, and joined to a
/// small piece before them, so that a client sending one byte per frame
/// neither pins its read buffers nor builds a queue entry per byte.
fn push_chunk(chunks: &mut VecDeque<Bytes>, data: Bytes) {
    const SMALL: usize = 1024;
    if data.len() >= SMALL {
        chunks.push_back(data);
        return;
    }
    match chunks.back_mut() {
        Some(last) if last.len() < 4 * SMALL => {
            let mut joined = BytesMut::with_capacity(last.len() + data.len());
            joined.extend_from_slice(last);
            joined.extend_from_slice(&data);
            *last = joined.freeze();
        }
        _ => chunks.push_back(Bytes::copy_from_slice(&data)),
    }
}

/// Strips a DATA or HEADERS frame's padding.
fn unpad(head: Head, mut payload: Bytes) -> Result<Bytes, ConnError> {
    if !head.has(flag::PADDED) {
        return Ok(payload);
    }
    let Some(&pad) = payload.first() else {
        return Err(err(
            Reason::FRAME_SIZE_ERROR,
            "padded frame without its pad length",
        ));
    };
    let pad = usize::from(pad);
    if pad >= payload.len() {
        return Err(err(Reason::PROTOCOL_ERROR, "padding as long as the frame"));
    }
    payload.truncate(payload.len() - pad);
    payload.advance(1);
    Ok(payload)
}

/// The reason an HTTP/2 upstream reset its stream with, if that is what
/// ended a response body: passed on, so that a gRPC client sees the
/// upstream's CANCEL or REFUSED_STREAM rather than an internal error.
fn upstream_reason(e: &(dyn std::error::Error + 'static)) -> Option<Reason> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err
            .downcast_ref::<::h2::Error>()
            .and_then(::h2::Error::reason)
        {
            return Some(Reason(u32::from(r)));
        }
        // An io::Error's `source` skips the error it wraps.
        cur = match err.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// The keep-alive PINGs of a connection.
struct Ping {
    interval: Duration,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    /// The payload of the PING out, and the frames received by when its
    /// wait last started.
    awaiting: Option<(u64, u64)>,
}

/// The stream idle timeout's tick.
struct Tick {
    period: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl Tick {
    fn new(period: Duration) -> Tick {
        Tick {
            period,
            sleep: Box::pin(tokio::time::sleep(period)),
        }
    }
}

fn panicked(out: &mut Out, id: u32) -> Step {
    tracing::error!(stream = id, "request handling panicked; stream reset");
    frame::write_rst(&mut out.wbuf, id, Reason::INTERNAL_ERROR);
    Step::Remove
}

/// Advances a stream as far as it goes now.
fn step(s: &mut Stream, id: u32, out: &mut Out) -> Step {
    let waker = s.waker.clone();
    let mut cx = Context::from_waker(&waker);
    loop {
        match &mut s.task {
            Task::Handler(fut) => {
                // A panic in one request ends that stream, not the
                // connection's others (as a task per stream would).
                let polled = catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx)));
                let resp = match polled {
                    Ok(Poll::Ready(Ok(resp))) => resp,
                    Ok(Poll::Pending) => return Step::Keep,
                    Err(_) => return panicked(out, id),
                };
                let (parts, body) = resp.into_parts();
                let status = parts.status;
                let bodiless = s.head_only
                    || status == StatusCode::NO_CONTENT
                    || status == StatusCode::NOT_MODIFIED
                    || status.is_informational();
                let end = bodiless || body.is_end_stream();
                out.response_head(id, &parts, end);
                crate::spare::recycle(parts.headers);
                s.active = out.ticks;
                s.task = if end { Task::Done } else { Task::Body(body) };
            }
            Task::Body(_) => {
                if !s.pending.is_empty() {
                    let data = std::mem::take(&mut s.pending);
                    if !out.send_data(s, id, data, s.pending_end) {
                        return Step::Keep;
                    }
                    if s.pending_end {
                        s.task = Task::Done;
                        continue;
                    }
                }
                if out.unsent() >= WRITE_HIGH {
                    out.deferred.push(id);
                    return Step::Keep;
                }
                let Task::Body(body) = &mut s.task else {
                    unreachable!("matched above")
                };
                let polled = match catch_unwind(AssertUnwindSafe(|| {
                    Pin::new(&mut *body).poll_frame(&mut cx)
                })) {
                    Ok(p) => p,
                    Err(_) => return panicked(out, id),
                };
                let end = body.is_end_stream();
                match polled {
                    Poll::Pending => return Step::Keep,
                    Poll::Ready(None) => {
                        out.send_data(s, id, Bytes::new(), true);
                        s.task = Task::Done;
                    }
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => {
                            if !out.send_data(s, id, data, end) {
                                return Step::Keep;
                            }
                            if end {
                                s.task = Task::Done;
                            }
                        }
                        Err(frame) => {
                            if let Ok(t) = frame.into_trailers() {
                                out.trailers(id, &t);
                            } else {
                                out.send_data(s, id, Bytes::new(), true);
                            }
                            s.task = Task::Done;
                        }
                    },
                    Poll::Ready(Some(Err(e))) => {
                        let reason = upstream_reason(&*e).unwrap_or(Reason::INTERNAL_ERROR);
                        tracing::debug!(stream = id, error = %e, %reason, "response body failed; stream reset");
                        frame::write_rst(&mut out.wbuf, id, reason);
                        return Step::Remove;
                    }
                }
            }
            Task::Done => {
                if !s.remote_closed {
                    // The answer is complete before the request: the client
                    // need not send the rest (RFC 9113 section 8.1).
                    frame::write_rst(&mut out.wbuf, id, Reason::NO_ERROR);
                }
                return Step::Remove;
            }
        }
    }
}

/// Why a request body cannot go on.
#[derive(Clone, Copy, Debug)]
enum Fail {
    /// The client reset the stream (or the stream ended).
    Reset,
    /// The connection is gone.
    Gone,
}

/// A request body's frames between the connection and its reader.
#[derive(Default)]
struct Recv(Mutex<RecvState>);

#[derive(Default)]
struct RecvState {
    chunks: VecDeque<Bytes>,
    buffered: usize,
    trailers: Option<HeaderMap>,
    end: bool,
    fail: Option<Fail>,
    reader: Option<Waker>,
    /// The reader is gone: data is credited back as it arrives.
    dropped: bool,
}

impl Recv {
    fn lock(&self) -> MutexGuard<'_, RecvState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, why: Fail) {
        let mut st = self.lock();
        if !st.end {
            st.fail = Some(why);
        }
        if let Some(w) = st.reader.take() {
            w.wake();
        }
    }
}

/// The body of an HTTP/2 request.
pub struct Body {
    recv: Option<Arc<Recv>>,
    ready: Arc<Ready>,
    id: u32,
    /// The client waits for `100 Continue`, to be sent when the body is
    /// first read.
    owes_continue: bool,
    len: Option<u64>,
}

impl Body {
    /// Tells later whether the client has sent the whole body (its
    /// END_STREAM arrived); `None` when it already has.
    pub(super) fn received(&self) -> Option<Received> {
        let r = self.recv.as_ref()?;
        Some(Received(r.clone()))
    }
}

/// Whether a request body's END_STREAM has arrived (see [`Body::received`]).
pub struct Received(Arc<Recv>);

impl Received {
    /// The client has sent all of it.
    pub fn whole(&self) -> bool {
        self.0.lock().end
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("h2::Body")
            .field("stream", &self.id)
            .field("open", &self.recv.is_some())
            .finish()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.owes_continue {
            self.owes_continue = false;
            self.ready.ask_continue(self.id);
        }
        let Some(recv) = &self.recv else {
            return Poll::Ready(None);
        };
        let mut st = recv.lock();
        if let Some(c) = st.chunks.pop_front() {
            st.buffered -= c.len();
            drop(st);
            self.ready.release(self.id, c.len());
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        if let Some(t) = st.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        if st.end {
            drop(st);
            self.recv = None;
            return Poll::Ready(None);
        }
        if let Some(f) = st.fail {
            drop(st);
            self.recv = None;
            let why = match f {
                Fail::Reset => "the client reset the stream",
                Fail::Gone => "the connection closed",
            };
            return Poll::Ready(Some(Err(Box::new(ClientGone(why.into())))));
        }
        if !st.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.reader = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        match &self.recv {
            None => true,
            Some(r) => {
                let st = r.lock();
                st.end && st.chunks.is_empty() && st.trailers.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (self.len, &self.recv) {
            (_, None) => SizeHint::with_exact(0),
            (Some(n), _) => SizeHint::with_exact(n),
            (None, _) => SizeHint::default(),
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Some(r) = self.recv.take() {
            let n = {
                let mut st = r.lock();
                st.dropped = true;
                st.chunks.clear();
                std::mem::take(&mut st.buffered)
            };
            self.ready.release(self.id, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_reset_reason_is_passed_on() {
        let direct: BodyError = Box::new(::h2::Error::from(::h2::Reason::CANCEL));
        assert_eq!(upstream_reason(&*direct), Some(Reason::CANCEL));
        let wrapped: BodyError = Box::new(io::Error::other(::h2::Error::from(
            ::h2::Reason::REFUSED_STREAM,
        )));
        assert_eq!(upstream_reason(&*wrapped), Some(Reason::REFUSED_STREAM));
        let other: BodyError = Box::new(io::Error::other("connection closed"));
        assert_eq!(upstream_reason(&*other), None);
    }
}
