//! HTTP/1.1 downstream connections, served in the connection's own task.
//!
//! One task reads a request head, runs the handler, writes the response
//! and goes back for the next head: no dispatcher task, no channels, and a
//! response whose body is already there (most API answers) leaves in one
//! write with its head. Request heads are parsed with httparse into
//! header values that share the read buffer.
//!
//! Framing follows RFC 9112: a request body is chunked when
//! `Transfer-Encoding` ends in `chunked`, else `Content-Length` long, else
//! empty; a request with both headers is the classic smuggling vector and
//! is refused with a 400 by the handler (so it is logged), then the
//! connection closes. A response is sent with its exact length when known,
//! chunked to HTTP/1.1 clients otherwise, and delimited by the close to
//! HTTP/1.0 clients. Malformed heads get a 400, heads over the listener's
//! limit a 431, and a head that does not arrive within the header timeout
//! a 408; each then closes its connection and nothing else.
//!
//! A request body is read from the socket by whoever consumes it (the
//! upstream client, in the same task, or hyper's HTTP/2 client task); it
//! hands the read buffer back when it ends cleanly, and the connection is
//! closed when it was abandoned part way.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};

use super::body::{RequestBody, ResponseBody};
use super::handler::{handle, Conn};
use super::header_rules::{admit, Admit};
use super::quiet::Quiet;
use super::server;
use super::stream_idle::{self, Activity, Progress, Watch};
use crate::config::listener::{HeaderRules, Underscores};
use crate::http1::{
    has_token, last_coding, parse_length, parsed_value, poll_fill, read_some, write_chunk_size,
    write_length, BodyError, Chunk, Framed, Piece,
};
use crate::stats::Stats;

/// Request header fields parsed in room on the stack; a listener that
/// allows more (`max_headers_count`) gets heap room for a head with more.
const MAX_HEADERS: usize = 100;
/// Response data up to this much is gathered before a write.
const COALESCE: usize = 16 * 1024;
/// What is written when a client waits for `100 Continue`.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// Trailer fields never passed on (RFC 9110 section 6.5.1: framing,
/// routing, authentication and the like).
const FORBIDDEN_TRAILERS: [HeaderName; 8] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::HOST,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::SET_COOKIE,
    header::AUTHORIZATION,
    header::TRAILER,
];

/// In the extensions of a request that had both `Content-Length` and
/// `Transfer-Encoding`: the handler refuses it.
#[derive(Debug, Clone, Copy)]
pub struct FramingConflict;

/// The client's side of an upgraded connection, once the 101 is written.
#[derive(Debug)]
pub struct Upgraded {
    /// The client's socket.
    pub io: TcpStream,
    /// Bytes the client sent after its request, already read.
    pub read_ahead: Bytes,
}

/// In the extensions of a request that asks for an upgrade: yields the
/// client's connection if the response is a `101 Switching Protocols`.
#[derive(Debug, Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    /// The future connection (only the first caller gets it).
    pub fn take(&self) -> Option<oneshot::Receiver<Upgraded>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Serves HTTP/1.1 on `io` until the client closes, a request ends the
/// connection, or the listener drains. `buf` holds bytes already read.
pub(super) async fn serve(
    io: TcpStream,
    mut buf: BytesMut,
    conn: Arc<Conn>,
    drain: watch::Receiver<bool>,
) {
    let io = Arc::new(io);
    let mut wbuf: Vec<u8> = Vec::with_capacity(1024);
    // The HCM's connection limits: after so many requests, or at an age,
    // the connection ends after its current answer (or at once if idle).
    let max_requests = conn.listener.load().config.max_requests_per_connection;
    let aged_at = server::aged_at(&conn);
    let aged = || aged_at.is_some_and(|at| tokio::time::Instant::now() >= at);
    let count_aged = || {
        conn.shared
            .stats
            .downstream_cx_max_duration_reached
            .fetch_add(1, Relaxed)
    };
    // Both polled only when they fire (`Quiet`), not each time the
    // connection waits for a request.
    // (With `http1_safe_max_connection_duration`, age alone never ends
    // the connection while it waits: the next answer says it is the last.)
    let age_ends_idle = !conn.listener.load().config.http1_safe_max_duration;
    let mut drained = Quiet::new(Box::pin(server::drain_or_age(
        drain.clone(),
        aged_at.filter(|_| age_ends_idle),
    )));
    // The idle timer is armed once per idle period, not per request: when
    // it fires after requests were served, it is pushed back.
    let mut idle: Option<Quiet<Pin<Box<tokio::time::Sleep>>>> = None;
    let mut served: u64 = 0;
    let mut served_at_arm: u64 = 0;
    // The stream idle timeout: armed at the first request, kept after.
    let progress = Progress::default();
    let mut watch: Option<Watch> = None;
    loop {
        let (header_timeout, idle_timeout, max_head, rules, stream_idle) = {
            let lr = conn.listener.load();
            let c = &lr.config;
            (
                c.request_headers_timeout,
                c.idle_timeout,
                c.max_request_headers.max(8192),
                c.header_rules,
                c.stream_idle_timeout,
            )
        };
        let stats = &conn.shared.stats;
        // Empty lines between requests are allowed (RFC 9112 section 2.2);
        // they do not start a head, so its timeout does not run for them.
        while buf.first().is_some_and(|b| *b == b'\r' || *b == b'\n') {
            let _ = buf.split_to(1);
        }
        // Wait for the first byte of the next request.
        if buf.is_empty() {
            if idle_timeout.is_none() {
                idle = None; // the listener's idle timeout was turned off
            }
            if let (Some(d), None) = (idle_timeout, &idle) {
                idle = Some(Quiet::new(Box::pin(tokio::time::sleep(d))));
                served_at_arm = served;
            }
            let read = loop {
                let timer = async {
                    match idle.as_mut() {
                        Some(s) => s.await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    r = fill(&io, &mut buf) => break r,
                    by_age = &mut drained => {
                        if by_age {
                            count_aged();
                        }
                        return;
                    }
                    _ = timer => {
                        if served == served_at_arm {
                            return; // idle for a whole period
                        }
                        if let (Some(s), Some(d)) = (idle.as_mut(), idle_timeout) {
                            s.get_mut().as_mut().reset(tokio::time::Instant::now() + d);
                        }
                        served_at_arm = served;
                    }
                }
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        let head = match parse_head(&mut buf, max_head, rules, stats) {
            Ok(Some(h)) => Ok(h),
            Ok(None) => {
                // The rest of the head is due within the header timeout.
                let deadline = tokio::time::Instant::now() + header_timeout;
                loop {
                    match tokio::time::timeout_at(deadline, fill(&io, &mut buf)).await {
                        Err(_) => break Err(Refusal::TIMEOUT),
                        Ok(Ok(0) | Err(_)) => return,
                        Ok(Ok(_)) => {}
                    }
                    match parse_head(&mut buf, max_head, rules, stats) {
                        Ok(Some(h)) => break Ok(h),
                        Ok(None) => {}
                        Err(r) => break Err(r),
                    }
                }
            }
            Err(r) => Err(r),
        };
        let head = match head {
            Ok(h) => h,
            Err(r) => {
                conn.shared.stats.count_status(r.status.as_u16());
                refuse(io, &r).await;
                return;
            }
        };
        served += 1;

        let Parsed {
            method,
            uri,
            version,
            headers,
            framing,
            mut keep_alive,
            expect_continue,
            upgrade,
            trailers,
            conflict,
        } = head;
        let head_only = method == Method::HEAD;
        // Told when the final response starts, after which `100 Continue`
        // may no longer be sent.
        let answered = expect_continue.then(|| Arc::new(AtomicBool::new(false)));
        let (body, mut back) = match framing {
            BodyFraming::None | BodyFraming::Length(0) => (Body::empty(), None),
            BodyFraming::Length(n) => Body::reading(
                io.clone(),
                std::mem::take(&mut buf),
                Framed::Length(n),
                answered.clone(),
                &progress,
            ),
            BodyFraming::Chunked => {
                let (mut body, back) = Body::reading(
                    io.clone(),
                    std::mem::take(&mut buf),
                    Framed::Chunked(Chunk::Size),
                    answered.clone(),
                    &progress,
                );
                // Trailers are header fields too (Envoy's codec applies
                // the rules to them).
                if rules != HeaderRules::default() {
                    if let Some(r) = body.reading.as_mut() {
                        r.trailer_rules = Some((rules, conn.shared.stats.clone()));
                    }
                }
                (body, back)
            }
        };
        let mut req = Request::new(RequestBody::Http1(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = headers;
        // An upgrade's bytes follow its head at once, so one with a body
        // is served as a plain request.
        let upgrade_tx = (upgrade && back.is_none()).then(|| {
            let (tx, rx) = oneshot::channel();
            req.extensions_mut()
                .insert(OnUpgrade(Arc::new(Mutex::new(Some(rx)))));
            tx
        });
        if conflict {
            req.extensions_mut().insert(FramingConflict);
            keep_alive = false;
        }
        match (stream_idle, &watch) {
            (None, _) => watch = None,
            (Some(t), Some(w)) if w.is_for(t) => {}
            (Some(t), _) => watch = Some(Watch::new(t)),
        }
        // The answer is taken straight out of the race's result: every
        // move of a response (368 bytes) is a copy.
        let mut resp = tokio::select! {
            biased;
            r = handle(conn.clone(), req, Some(progress.for_stream())) => match r {
                Ok(r) => r,
                Err(never) => match never {},
            },
            () = Watch::expiry(watch.as_mut(), &progress) => {
                // No answer, and nothing moved for the timeout.
                let stats = &conn.shared.stats;
                stats.downstream_rq_idle_timeout.fetch_add(1, Relaxed);
                stats.count_status(408);
                refuse(io, &Refusal::STREAM_TIMEOUT).await;
                return;
            }
        };
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS && upgrade_tx.is_some();
        keep_alive &= !draining(&drain);
        if max_requests.is_some_and(|m| served >= m) && keep_alive {
            keep_alive = false;
            conn.shared
                .stats
                .downstream_cx_max_requests_reached
                .fetch_add(1, Relaxed);
        }
        if keep_alive && aged() {
            keep_alive = false;
            count_aged();
        }
        if let Some(a) = &answered {
            a.store(true, Relaxed);
        }
        // A body already given up cannot be skipped: say so in this answer.
        if let Some(rx) = back.as_mut() {
            match rx.try_recv() {
                Ok(rest) => {
                    buf = rest;
                    back = None;
                }
                Err(oneshot::error::TryRecvError::Closed) => {
                    keep_alive = false;
                    back = None;
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
        }
        let reply = Reply {
            head_only,
            version,
            trailers,
            switching,
        };
        // With the listener's stream idle timeout off, the route's own
        // (if it set one) watches the answer; the next request starts
        // without it again (see above).
        if watch.is_none() {
            if let stream_idle::Limit::After(d) = progress.route_limit() {
                watch = Some(Watch::new(d));
            }
        }
        let mut activity = Activity::new(watch.as_mut(), &progress);
        let written = write_response(
            &io,
            &mut wbuf,
            &mut resp,
            &reply,
            &mut keep_alive,
            &mut activity,
        )
        .await;
        // Done with (the request's guard records it): before an upgrade
        // hands the connection over.
        drop(resp);
        if written.as_ref().is_err_and(stream_idle::is_idle_out) {
            // The upstream or the client stalled part way: the close
            // tells the client the answer is cut.
            conn.shared
                .stats
                .downstream_rq_idle_timeout
                .fetch_add(1, Relaxed);
        }
        match written {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                if back.is_some() {
                    shut_for_holder(&io);
                }
                return;
            }
        }
        if wbuf.capacity() > 64 * 1024 {
            wbuf = Vec::with_capacity(1024);
        }
        if switching {
            let (Some(tx), None) = (upgrade_tx, back) else {
                return;
            };
            if let Ok(io) = Arc::try_unwrap(io) {
                let _ = tx.send(Upgraded {
                    io,
                    read_ahead: buf.split().freeze(),
                });
            }
            return;
        }
        if let Some(back) = back {
            // Whoever reads the body gives the buffer back at its clean
            // end; dropped part way, the rest of it is unread and the
            // connection cannot carry another request. Bounded: a holder
            // that neither reads nor lets go must not keep the connection.
            let limit = idle_timeout.unwrap_or(Duration::from_secs(3600));
            let returned = tokio::select! {
                r = back => r.ok(),
                by_age = &mut drained => {
                    // Unless the answer already said it was the last.
                    if by_age && keep_alive {
                        count_aged();
                    }
                    None
                }
                _ = tokio::time::sleep(limit) => None,
            };
            match returned {
                Some(rest) => buf = rest,
                None => {
                    // Wakes the holder's reads with an error, so it lets
                    // go of the socket too.
                    let _ = socket2::SockRef::from(&*io).shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
        if !keep_alive {
            linger_close(io).await;
            return;
        }
    }
}

fn draining(drain: &watch::Receiver<bool>) -> bool {
    *drain.borrow() || drain.has_changed().is_err()
}

/// Reads more from the socket into `buf`; `Ok(0)` at its end.
pub(super) async fn fill(io: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8 * 1024);
        }
        match read_some(io, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => io.readable().await?,
            r => return r,
        }
    }
}

/// Writes all of `data`, counting each write as the stream's activity.
async fn write_all(io: &TcpStream, mut data: &[u8], act: &mut Activity<'_>) -> io::Result<()> {
    while !data.is_empty() {
        match io.try_write(data) {
            Ok(n) => {
                data = &data[n..];
                act.progress.bump();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => act.wait(io.writable()).await??,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Closes after a last answer: FIN first, then what the client still
/// sends is read and dropped (bounded) so that unread input does not turn
/// the close into a reset that could destroy the answer in flight.
pub(super) async fn linger_close(io: Arc<TcpStream>) {
    let Ok(mut io) = Arc::try_unwrap(io) else {
        return;
    };
    if io.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut sink = [0u8; 4096];
        for _ in 0..256 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// A request refused before it reached the handler.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    status: StatusCode,
    why: &'static str,
}

impl Refusal {
    const TIMEOUT: Refusal = Refusal {
        status: StatusCode::REQUEST_TIMEOUT,
        why: "request headers not received in time\n",
    };
    /// Envoy's answer when the stream idle timeout ends a request.
    const STREAM_TIMEOUT: Refusal = Refusal {
        status: StatusCode::REQUEST_TIMEOUT,
        why: "stream timeout\n",
    };
    const TOO_LARGE: Refusal = Refusal {
        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        why: "request headers too large\n",
    };
    const TOO_MANY: Refusal = Refusal {
        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        why: "too many request headers\n",
    };

    fn bad(why: &'static str) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            why,
        }
    }
}

async fn refuse(io: Arc<TcpStream>, r: &Refusal) {
    let text = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\ndate: {}\r\n\r\n{}",
        r.status.as_str(),
        r.status.canonical_reason().unwrap_or(""),
        r.why.len(),
        httpdate::fmt_http_date(std::time::SystemTime::now()),
        r.why
    );
    let progress = Progress::default();
    if write_all(&io, text.as_bytes(), &mut Activity::new(None, &progress))
        .await
        .is_ok()
    {
        linger_close(io).await;
    }
}

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
struct Parsed {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    framing: BodyFraming,
    /// The client lets the connection carry another request.
    keep_alive: bool,
    expect_continue: bool,
    /// It asks for a protocol upgrade.
    upgrade: bool,
    /// It accepts trailers (`TE: trailers`).
    trailers: bool,
    /// It has both `Content-Length` and `Transfer-Encoding`.
    conflict: bool,
}

/// Lines in a head so far: a bound on its fields.
fn line_count(buf: &[u8]) -> usize {
    buf.iter().filter(|b| **b == b'\n').count()
}

/// Where a complete head's parts are, by [`scan`].
struct Scanned {
    len: usize,
    method: Method,
    version: Version,
    /// The request target's span.
    target: (usize, usize),
    /// Fields: each one's name and value spans are in `at[..n]`.
    n: usize,
}

/// Parses a head with room for as many fields as `fields` holds, and
/// notes where each sits in `at` (under `max_head`, far below 4 GiB), so
/// that they can share the head's bytes once frozen.
fn scan<'b>(
    buf: &'b [u8],
    max_head: usize,
    fields: &mut [std::mem::MaybeUninit<httparse::Header<'b>>],
    at: &mut [[u32; 4]],
) -> Result<Option<Scanned>, Refusal> {
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, fields)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => return Err(Refusal::TOO_LARGE),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TOO_MANY),
        Err(_) => return Err(Refusal::bad("malformed request\n")),
    };
    if len > max_head {
        return Err(Refusal::TOO_LARGE);
    }
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| Refusal::bad("bad method\n"))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let base = buf.as_ptr() as usize;
    let path = req.path.unwrap_or_default();
    let p0 = path.as_ptr() as usize - base;
    for (slot, h) in at.iter_mut().zip(req.headers.iter()) {
        let name = (h.name.as_ptr() as usize - base) as u32;
        let value = (h.value.as_ptr() as usize - base) as u32;
        *slot = [
            name,
            name + h.name.len() as u32,
            value,
            value + h.value.len() as u32,
        ];
    }
    Ok(Some(Scanned {
        len,
        method,
        version,
        target: (p0, p0 + path.len()),
        n: req.headers.len(),
    }))
}

/// Parses a request head at the start of `buf`: `None` while incomplete;
/// when complete, consumes it. Header values share the head's bytes.
/// The listener's [`HeaderRules`] apply here, as they do in Envoy's codec.
fn parse_head(
    buf: &mut BytesMut,
    max_head: usize,
    rules: HeaderRules,
    stats: &Stats,
) -> Result<Option<Parsed>, Refusal> {
    let mut at = [[0u32; 4]; MAX_HEADERS];
    let mut more_at = Vec::new();
    let scanned = {
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        scan(buf, max_head, &mut fields, &mut at)
    };
    let (scanned, at) = match scanned {
        Err(r)
            if r == Refusal::TOO_MANY
                && (rules.max_count > MAX_HEADERS || rules.underscores == Underscores::Drop) =>
        {
            // Room for every line the buffer holds (not for the
            // configured limit, which may be anything up to 2^32).
            let room = line_count(buf) + 1;
            let mut fields = vec![std::mem::MaybeUninit::uninit(); room];
            more_at.resize(room, [0u32; 4]);
            (scan(buf, max_head, &mut fields, &mut more_at), &more_at[..])
        }
        r => (r, &at[..]),
    };
    let Some(Scanned {
        len,
        method,
        version,
        target,
        n,
    }) = scanned?
    else {
        return Ok(None);
    };
    let head = buf.split_to(len).freeze();
    let target = head.slice(target.0..target.1);
    let uri = if target.first() == Some(&b'/') {
        PathAndQuery::from_maybe_shared(target).map(Uri::from)
    } else {
        Uri::from_maybe_shared(target)
    }
    .map_err(|_| Refusal::bad("bad request target\n"))?;

    // Room for what the proxy adds (x-forwarded-*, x-request-id, host,
    // route edits): a map that grows rehashes every entry.
    let mut headers = crate::spare::header_map(n + 8);
    let mut keep_alive = version == Version::HTTP_11;
    // `close` anywhere wins over `keep-alive` anywhere.
    let mut close = false;
    let mut length: Option<u64> = None;
    let mut te = false;
    let mut chunked = false;
    let mut expect_continue = false;
    let mut upgrade = false;
    let mut trailers = false;
    for &[n0, n1, v0, v1] in &at[..n] {
        let raw = &head[n0 as usize..n1 as usize];
        match admit(&rules, raw, stats) {
            Admit::Keep => {}
            Admit::Drop => continue,
            Admit::Refuse => return Err(Refusal::bad("header name with an underscore\n")),
        }
        let name =
            crate::header_names::parse(raw).map_err(|_| Refusal::bad("bad header name\n"))?;
        // SAFETY: a field value httparse accepted, default configuration.
        let value = unsafe { parsed_value(head.slice(v0 as usize..v1 as usize)) };
        if name == header::CONTENT_LENGTH {
            // A list of equal values is one length (RFC 9110 section 8.6).
            let mut v = None;
            for part in value.as_bytes().split(|b| *b == b',') {
                let n = parse_length(part).ok_or(Refusal::bad("bad content-length\n"))?;
                if v.is_some_and(|v| v != n) || length.is_some_and(|l| l != n) {
                    return Err(Refusal::bad("conflicting content-length\n"));
                }
                v = Some(n);
            }
            length = v;
        } else if name == header::TRANSFER_ENCODING {
            te = true;
            chunked = last_coding(value.as_bytes()).eq_ignore_ascii_case(b"chunked");
        } else if name == header::CONNECTION {
            let v = value.as_bytes();
            close |= has_token(v, "close");
            keep_alive |= has_token(v, "keep-alive");
        } else if name == header::EXPECT {
            expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        } else if name == header::UPGRADE {
            upgrade = true;
        } else if name == header::TE {
            trailers |= has_token(value.as_bytes(), "trailers");
        }
        headers.append(name, value);
    }
    // Counted as Envoy counts: after dropping.
    if headers.len() > rules.max_count {
        return Err(Refusal::TOO_MANY);
    }
    let conflict = te && length.is_some();
    let framing = if conflict {
        BodyFraming::None
    } else if te {
        // A request body must end in `chunked` to be delimited at all
        // (RFC 9112 section 6.3), and HTTP/1.0 has no transfer codings.
        if !chunked || version == Version::HTTP_10 {
            return Err(Refusal::bad("unsupported transfer-encoding\n"));
        }
        BodyFraming::Chunked
    } else {
        length.map_or(BodyFraming::None, BodyFraming::Length)
    };
    Ok(Some(Parsed {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive: keep_alive && !close,
        expect_continue: expect_continue && version == Version::HTTP_11,
        upgrade,
        trailers,
        conflict,
    }))
}

/// What the response to one request depends on.
struct Reply {
    head_only: bool,
    version: Version,
    trailers: bool,
    switching: bool,
}

/// How the response body is delimited on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    None,
    Length(u64),
    Chunked,
    Close,
}

/// Whoever still reads a cut answer's request body (an HTTP/2 upstream's
/// pump) holds the socket open: it is shut, so that the client sees the
/// cut now and the holder's reads fail and let go. (Out of line: rare.)
#[cold]
#[inline(never)]
fn shut_for_holder(io: &TcpStream) {
    let _ = socket2::SockRef::from(io).shutdown(std::net::Shutdown::Both);
}

/// Writes a response. `Ok(false)`: the body could not be sent whole and
/// the connection must close; `keep_alive` is cleared when the response
/// ends the connection.
///
/// `resp` stays the caller's to drop (taken by reference: moved into this
/// future, a response would be copied whole once more); an answer without
/// a body lets go of its upstream side before the head is written.
async fn write_response(
    io: &TcpStream,
    wbuf: &mut Vec<u8>,
    resp: &mut Response<ResponseBody>,
    r: &Reply,
    keep_alive: &mut bool,
    act: &mut Activity<'_>,
) -> io::Result<bool> {
    let status = resp.status();
    wbuf.clear();
    wbuf.extend_from_slice(b"HTTP/1.1 ");
    wbuf.extend_from_slice(status.as_str().as_bytes());
    wbuf.push(b' ');
    wbuf.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    wbuf.extend_from_slice(b"\r\n");
    // No body, and no length either, for 1xx and 204; 304 and HEAD answers
    // keep the length they describe.
    let bodiless_status = status.is_informational() || status == StatusCode::NO_CONTENT;
    let no_body = bodiless_status || r.head_only || status == StatusCode::NOT_MODIFIED;
    let mut declared: Option<u64> = None;
    let mut has_date = false;
    for (name, value) in resp.headers() {
        if r.switching {
            // The switch's own headers (Connection, Upgrade) go as they are.
        } else if name == header::CONTENT_LENGTH {
            if bodiless_status {
                continue;
            }
            match parse_length(value.as_bytes()) {
                Some(n) if declared.is_none() => declared = Some(n),
                _ => continue,
            }
        } else if name == header::TRANSFER_ENCODING {
            continue; // framing is this hop's own
        } else if name == header::CONNECTION {
            if has_token(value.as_bytes(), "close") {
                *keep_alive = false;
            }
            continue;
        } else if name == header::DATE {
            has_date = true;
        }
        wbuf.extend_from_slice(name.as_str().as_bytes());
        wbuf.extend_from_slice(b": ");
        wbuf.extend_from_slice(value.as_bytes());
        wbuf.extend_from_slice(b"\r\n");
    }
    crate::spare::recycle(std::mem::take(resp.headers_mut()));
    let body = resp.body_mut();
    let out = if r.switching || no_body {
        Out::None
    } else if let Some(n) = declared {
        Out::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        write_length(wbuf, n);
        Out::Length(n)
    } else if r.version == Version::HTTP_11 {
        wbuf.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Out::Chunked
    } else {
        *keep_alive = false;
        Out::Close
    };
    if !r.switching {
        if !*keep_alive {
            wbuf.extend_from_slice(b"connection: close\r\n");
        } else if r.version == Version::HTTP_10 {
            wbuf.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    if !has_date {
        wbuf.extend_from_slice(b"date: ");
        push_date(wbuf);
        wbuf.extend_from_slice(b"\r\n");
    }
    wbuf.extend_from_slice(b"\r\n");
    if out == Out::None {
        body.release_upstream();
        write_all(io, wbuf, act).await?;
        return Ok(true);
    }

    // The head waits for body data that is ready now, so that a short
    // answer leaves in one write; it goes alone if the body is slow.
    let mut left = match out {
        Out::Length(n) => n,
        _ => u64::MAX,
    };
    // More data than the declared length: the rest cannot be framed.
    let mut overflow = false;
    loop {
        let frame = if wbuf.is_empty() {
            act.wait(body.frame()).await?
        } else {
            let polled =
                std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await;
            match polled {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    write_all(io, wbuf, act).await?;
                    wbuf.clear();
                    continue;
                }
            }
        };
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => act.progress.bump(),
                Ok(mut data) => {
                    if left == 0 {
                        write_all(io, wbuf, act).await?;
                        return Ok(false);
                    }
                    if (data.len() as u64) > left {
                        data.truncate(left as usize);
                        overflow = true;
                    }
                    left -= data.len() as u64;
                    if out == Out::Chunked {
                        write_chunk_size(wbuf, data.len());
                    }
                    if data.len() <= COALESCE {
                        wbuf.extend_from_slice(&data);
                    } else {
                        write_all(io, wbuf, act).await?;
                        wbuf.clear();
                        write_all(io, &data, act).await?;
                    }
                    if out == Out::Chunked {
                        wbuf.extend_from_slice(b"\r\n");
                    }
                    if wbuf.len() >= COALESCE {
                        write_all(io, wbuf, act).await?;
                        wbuf.clear();
                    }
                }
                Err(frame) => {
                    if let (Out::Chunked, Ok(t)) = (out, frame.into_trailers()) {
                        return end_chunked(io, wbuf, r.trailers.then_some(&t), act).await;
                    }
                }
            },
            None => {
                return match out {
                    Out::Chunked => end_chunked(io, wbuf, None, act).await,
                    _ => {
                        write_all(io, wbuf, act).await?;
                        // Short of its length, or longer: cut; a body
                        // delimited by the close ends with it (and
                        // `keep_alive` is already off).
                        Ok(match out {
                            Out::Length(_) => left == 0 && !overflow,
                            _ => true,
                        })
                    }
                };
            }
            Some(Err(_)) => {
                // The upstream failed mid-body: what was sent stands, and
                // the close (no last chunk) tells the client it is cut.
                write_all(io, wbuf, act).await?;
                return Ok(false);
            }
        }
    }
}

async fn end_chunked(
    io: &TcpStream,
    wbuf: &mut Vec<u8>,
    trailers: Option<&HeaderMap>,
    act: &mut Activity<'_>,
) -> io::Result<bool> {
    wbuf.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        if FORBIDDEN_TRAILERS.contains(name) {
            continue;
        }
        wbuf.extend_from_slice(name.as_str().as_bytes());
        wbuf.extend_from_slice(b": ");
        wbuf.extend_from_slice(value.as_bytes());
        wbuf.extend_from_slice(b"\r\n");
    }
    wbuf.extend_from_slice(b"\r\n");
    write_all(io, wbuf, act).await?;
    Ok(true)
}

/// Appends the current time as an HTTP date, formatted once a second.
pub(super) fn push_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_empty() {
            *c = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(c.1.as_bytes());
    });
}

/// A request body being read from the client's socket.
#[derive(Debug)]
struct Reading {
    io: Arc<TcpStream>,
    /// Bytes read and not yet consumed (the body's, then perhaps the next
    /// request's).
    buf: BytesMut,
    framed: Framed,
    /// How much of `100 Continue` is still to be written.
    continue_left: usize,
    /// Set when the final response starts (then no `100 Continue`).
    answered: Option<Arc<AtomicBool>>,
    /// Where the buffer goes at the body's clean end.
    back: Option<oneshot::Sender<BytesMut>>,
    /// The stream's activity, bumped by each read.
    progress: Progress,
    /// Set at the body's clean end, for whoever asked (see
    /// [`Body::received`]).
    ended: Option<Arc<AtomicBool>>,
    /// The listener's header rules, for a chunked body's trailers (when
    /// they are not the defaults).
    trailer_rules: Option<(HeaderRules, Arc<Stats>)>,
}

/// The body of an HTTP/1.1 request.
#[derive(Debug, Default)]
pub struct Body {
    /// `None` once the body has ended (or when there is none).
    reading: Option<Box<Reading>>,
}

impl Body {
    fn empty() -> Self {
        Body { reading: None }
    }

    fn reading(
        io: Arc<TcpStream>,
        buf: BytesMut,
        framed: Framed,
        answered: Option<Arc<AtomicBool>>,
        progress: &Progress,
    ) -> (Self, Option<oneshot::Receiver<BytesMut>>) {
        let (tx, rx) = oneshot::channel();
        let body = Body {
            reading: Some(Box::new(Reading {
                io,
                buf,
                framed,
                continue_left: if answered.is_some() {
                    CONTINUE.len()
                } else {
                    0
                },
                answered,
                back: Some(tx),
                progress: progress.clone(),
                ended: None,
                trailer_rules: None,
            })),
        };
        (body, Some(rx))
    }

    /// The body ended cleanly: the buffer goes back to the connection
    /// (after the socket handle, so that the connection holds the only one).
    /// A flag set when the body has been received whole; `None` when it
    /// already has.
    pub(super) fn received(&mut self) -> Option<Arc<AtomicBool>> {
        let r = self.reading.as_mut()?;
        Some(r.ended.get_or_insert_with(Default::default).clone())
    }

    fn finish(&mut self) {
        if let Some(r) = self.reading.take() {
            let Reading {
                io,
                buf,
                back,
                ended,
                ..
            } = *r;
            drop(io);
            if let Some(e) = ended {
                e.store(true, Relaxed);
            }
            if let Some(tx) = back {
                let _ = tx.send(buf);
            }
        }
    }
}

impl Drop for Body {
    /// A body dropped part way whose rest has already arrived is skipped,
    /// so that its connection can carry the next request.
    fn drop(&mut self) {
        let Some(r) = self.reading.as_mut() else {
            return;
        };
        if r.continue_left > 0 {
            return; // the client has not been asked for it
        }
        loop {
            match r.framed.decode(&mut r.buf) {
                Ok(Piece::Data(_)) if r.framed.is_complete() => break self.finish(),
                Ok(Piece::Data(_)) => {}
                Ok(Piece::End(_)) => break self.finish(),
                Ok(Piece::NeedMore) | Err(_) => break,
            }
        }
    }
}

/// The client went away (closed or reset its connection) in the middle of
/// its request body; other body errors are the client's malformed input.
#[derive(Debug, thiserror::Error)]
#[error("client went away in the middle of the request body: {0}")]
pub struct ClientGone(pub String);

/// The listener's header rules on a request's trailers: names with an
/// underscore dropped or refused, and the field count.
fn check_trailers(t: &mut HeaderMap, rules: HeaderRules, stats: &Stats) -> Result<(), BodyError> {
    let mut dropped: Vec<HeaderName> = Vec::new();
    for n in t.keys() {
        for _ in t.get_all(n) {
            match admit(&rules, n.as_str().as_bytes(), stats) {
                Admit::Keep => {}
                Admit::Drop => dropped.push(n.clone()),
                Admit::Refuse => return Err("trailer name with an underscore".into()),
            }
        }
    }
    for n in dropped {
        t.remove(&n);
    }
    if t.len() > rules.max_count {
        return Err("too many trailer fields".into());
    }
    Ok(())
}

fn gone(why: impl std::fmt::Display) -> BodyError {
    Box::new(ClientGone(why.to_string()))
}

impl Reading {
    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.answered.as_ref().is_some_and(|a| a.load(Relaxed)) {
            self.continue_left = 0;
        }
        while self.continue_left > 0 {
            ready!(self.io.poll_write_ready(cx))?;
            let from = CONTINUE.len() - self.continue_left;
            match self.io.try_write(&CONTINUE[from..]) {
                Ok(n) => self.continue_left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            let Some(r) = this.reading.as_mut() else {
                return Poll::Ready(None);
            };
            if let Err(e) = ready!(r.poll_continue(cx)) {
                this.reading = None;
                return Poll::Ready(Some(Err(gone(e))));
            }
            match r.framed.decode(&mut r.buf) {
                Err(e) => {
                    this.reading = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Piece::Data(data)) => {
                    if r.framed.is_complete() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Piece::End(mut trailers)) => {
                    if let (Some(t), Some((rules, stats))) = (trailers.as_mut(), &r.trailer_rules) {
                        if let Err(e) = check_trailers(t, *rules, stats) {
                            this.reading = None;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                    this.finish();
                    return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                }
                Ok(Piece::NeedMore) => {}
            }
            match ready!(poll_fill(&r.io, &mut r.buf, cx)) {
                Ok(0) => {
                    this.reading = None;
                    return Poll::Ready(Some(Err(gone("closed"))));
                }
                Ok(_) => r.progress.bump(),
                Err(e) => {
                    this.reading = None;
                    return Poll::Ready(Some(Err(gone(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reading.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading.as_deref().map(|r| r.framed) {
            None => SizeHint::with_exact(0),
            Some(Framed::Length(n)) => SizeHint::with_exact(n),
            Some(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<Parsed>, Refusal> {
        parse_with(text, HeaderRules::default(), &Stats::default())
    }

    fn parse_with(
        text: &str,
        rules: HeaderRules,
        stats: &Stats,
    ) -> Result<Option<Parsed>, Refusal> {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_head(&mut buf, 64 * 1024, rules, stats)
    }

    fn status(text: &str) -> u16 {
        parse(text).expect_err("refused").status.as_u16()
    }

    #[test]
    fn request_framing_follows_rfc_9112() {
        let p = parse("POST /a?b=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(p.framing, BodyFraming::Length(5));
        assert_eq!(p.uri.path_and_query().unwrap().as_str(), "/a?b=1");
        assert!(p.keep_alive);
        assert_eq!(p.headers["host"], "h");
        let p = parse("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.framing, BodyFraming::Chunked);
        let p = parse("POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(p.conflict, "both framing headers");
        let p = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!p.keep_alive, "HTTP/1.0 closes unless asked");
        let p = parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(p.keep_alive);
        let p = parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!p.keep_alive);
        let p = parse("GET / HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!p.keep_alive, "close wins wherever it is");
        let p = parse("GET http://gw:8/x HTTP/1.1\r\nUpgrade: websocket\r\nExpect: 100-continue\r\nTE: trailers\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.uri.authority().unwrap().as_str(), "gw:8");
        assert!(p.upgrade && p.expect_continue && p.trailers);
        let p = parse("POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.framing, BodyFraming::Length(3));
        assert!(parse("GET / HTTP/1.1\r\nHost: h\r\n").unwrap().is_none());
    }

    #[test]
    fn bad_heads_are_refused_with_the_right_status() {
        assert_eq!(status("GARBAGE\r\n\r\n"), 400);
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n"), 400);
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
        let mut buf = BytesMut::from(format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(9000)).as_str());
        assert_eq!(
            parse_head(&mut buf, 8192, HeaderRules::default(), &Stats::default())
                .expect_err("too large")
                .status,
            431
        );
    }

    /// Random heads under random rules: no panic; a parsed head keeps
    /// within the limit, and holds no underscore name where they are
    /// dropped; a refusal is a 400 or a 431.
    #[test]
    fn random_heads_under_random_rules() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let stats = Stats::default();
        for _ in 0..3_000 {
            let fields = next() % 260;
            let mut text = String::from("GET /p HTTP/1.1\r\n");
            for i in 0..fields {
                let name = match next() % 4 {
                    0 => format!("x_{i}"),
                    1 => "cookie".to_string(),
                    _ => format!("x-{i}"),
                };
                text.push_str(&format!("{name}: v{i}\r\n"));
            }
            text.push_str("\r\n");
            let rules = HeaderRules {
                max_count: [1, 3, 50, 100, 101, 200, 1 << 20][(next() % 7) as usize],
                underscores: [Underscores::Allow, Underscores::Reject, Underscores::Drop]
                    [(next() % 3) as usize],
            };
            match parse_with(&text, rules, &stats) {
                Ok(Some(head)) => {
                    assert!(head.headers.len() <= rules.max_count, "{rules:?}");
                    if rules.underscores != Underscores::Allow {
                        assert!(
                            head.headers.keys().all(|n| !n.as_str().contains('_')),
                            "{rules:?}"
                        );
                    }
                }
                Ok(None) => panic!("a complete head is complete"),
                Err(r) => assert!(
                    r.status == StatusCode::BAD_REQUEST
                        || r.status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "{r:?}"
                ),
            }
        }
    }

    #[test]
    fn header_rules() {
        let fields = |n: usize| -> String {
            let f: String = (0..n).map(|i| format!("x-{i}: v\r\n")).collect();
            format!("GET / HTTP/1.1\r\n{f}\r\n")
        };
        let stats = Stats::default();
        let rules = |max_count, underscores| HeaderRules {
            max_count,
            underscores,
        };
        // A lower limit than the stack's room, and a higher one (heap room).
        let few = rules(3, Underscores::Allow);
        assert!(parse_with(&fields(3), few, &stats).is_ok());
        let r = parse_with(&fields(4), few, &stats).expect_err("over");
        assert_eq!(r, Refusal::TOO_MANY);
        let lots = rules(250, Underscores::Allow);
        let head = parse_with(&fields(250), lots, &stats)
            .expect("parsed")
            .expect("complete");
        assert_eq!(head.headers.len(), 250);
        assert_eq!(head.headers["x-249"], "v");
        let r = parse_with(&fields(251), lots, &stats).expect_err("over");
        assert_eq!(r, Refusal::TOO_MANY);

        // The configured limit does not size the room: a huge one costs
        // no more than the head's own lines.
        let huge = rules(u32::MAX as usize, Underscores::Allow);
        let head = parse_with(&fields(300), huge, &stats)
            .expect("parsed")
            .expect("complete");
        assert_eq!(head.headers.len(), 300);
        // Counted after dropping, as Envoy counts: two fields and two
        // dropped ones fit a limit of 2, also past the stack's room.
        let text = "GET / HTTP/1.1\r\nx-a: 1\r\nb_1: 2\r\nx-c: 3\r\nd_2: 4\r\n\r\n";
        let two = rules(2, Underscores::Drop);
        let head = parse_with(text, two, &stats)
            .expect("parsed")
            .expect("complete");
        assert_eq!(head.headers.len(), 2);
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..150 {
            many.push_str(&format!("x_{i}: v\r\n"));
        }
        many.push_str("x-kept: v\r\n\r\n");
        let head = parse_with(&many, rules(100, Underscores::Drop), &stats)
            .expect("parsed")
            .expect("complete");
        assert_eq!(head.headers.len(), 1);
        let stats = Stats::default();

        let text = "GET / HTTP/1.1\r\nx_user: a\r\nx-user: b\r\nmy_id: c\r\n\r\n";
        let head = parse_with(text, HeaderRules::default(), &stats)
            .expect("parsed")
            .expect("complete");
        assert_eq!(head.headers.len(), 3, "allowed by default");
        let head = parse_with(text, rules(100, Underscores::Drop), &stats)
            .expect("parsed")
            .expect("complete");
        assert_eq!(head.headers.len(), 1);
        assert_eq!(head.headers["x-user"], "b");
        assert_eq!(stats.dropped_headers_with_underscores.load(Relaxed), 2);
        let r = parse_with(text, rules(100, Underscores::Reject), &stats).expect_err("refused");
        assert_eq!(r.status, 400);
        assert_eq!(
            stats
                .requests_rejected_with_underscores_in_headers
                .load(Relaxed),
            1
        );
    }
}
