//! HTTP/1.1 to an upstream, driven inside the request's own task.
//!
//! hyper's client runs each connection as a task of its own and hands
//! requests, responses and body chunks to it over channels: every proxied
//! request woke two tasks and crossed four channels. Here the request's
//! task writes the request and reads the response on a pooled socket
//! itself. A response whose body has already arrived with its head (most
//! API responses) is answered at once and its connection goes back to the
//! pool before the downstream write; a longer one streams from the socket
//! and the connection goes back when the body ends cleanly.
//!
//! Framing follows RFC 9112: a request body is sent with its exact length
//! when known, chunked otherwise, while the response head is read (an
//! upstream may answer before it has read the whole body: an error stops
//! the upload, a success goes on to the client at once while the rest of
//! the body follows, and its end waits for the body's); a response
//! body is delimited by `Transfer-Encoding: chunked`, else
//! `Content-Length`, else the end of the connection, and there is none for
//! HEAD, 1xx, 204 and 304.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::Either;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::pool::{OpenSlot, Pool, ReqBody, SendError, WorkerPool};
use crate::config::cluster::{AnswerHead, H1Client};
use crate::http1::{
    has_token, last_coding, parse_length, parsed_value, poll_fill, write_chunk_size, write_length,
    BodyError, Chunk, Framed, Piece,
};
use crate::proxy::body::RequestBody;
use crate::proxy::http1::ClientGone;

/// Response header fields found in place, without the heap (Envoy's
/// default limit; a cluster that allows more spills beyond it).
const MAX_HEADERS: usize = 100;
/// Request bodies up to this size are written with the head in one call.
const COALESCE_BODY: usize = 16 * 1024;
/// How long a request body waits for the upstream's `100 Continue` when
/// the client's `Expect: 100-continue` is proxied (curl's own wait).
const CONTINUE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// One HTTP/1.1 connection to an endpoint.
#[derive(Debug)]
pub struct Connection {
    io: TcpStream,
    /// Bytes read and not yet consumed.
    buf: BytesMut,
    /// Where request heads are encoded (kept to spare an allocation).
    wbuf: Vec<u8>,
    /// Requests sent on it so far.
    pub(crate) uses: u32,
    /// When it was opened ([`now_ms`](super::now_ms), wrapping: ages
    /// below 49 days read right). Four bytes, beside `uses`: this struct
    /// is moved with every request's future, and a larger one costs
    /// copies.
    pub(crate) born_ms: u32,
    /// When it last went idle ([`now_ms`](super::now_ms), wrapping, as
    /// `born_ms`).
    pub(crate) idle_since_ms: u32,
    /// The pool's drains when it was made (see [`Pool::drain`]).
    generation: u32,
    /// Counts it among the endpoint's open connections while it lives.
    _open: OpenSlot,
}

impl Connection {
    /// Wraps a connected socket and its place among the endpoint's open
    /// connections.
    pub fn new(io: TcpStream, open: OpenSlot) -> Self {
        Connection {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
            wbuf: Vec::new(),
            uses: 0,
            born_ms: super::now_ms() as u32,
            idle_since_ms: super::now_ms() as u32,
            generation: open.generation(),
            _open: open,
        }
    }

    /// Whether its pool has not been drained since it was made.
    pub(super) fn undrained(&self) -> bool {
        self.generation == self._open.generation()
    }

    /// Its socket and its place among the open connections (for a
    /// connection of another kind, an upgrade's, made on it).
    pub(super) fn into_socket(self) -> (TcpStream, OpenSlot) {
        (self.io, self._open)
    }

    /// The connection's write buffer, to encode a request head into.
    pub fn take_wbuf(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.wbuf)
    }

    /// Keeps a small head buffer for the next request (a large one, grown
    /// by a body written with its head, is let go).
    fn keep_wbuf(&mut self, buf: Vec<u8>) {
        if buf.capacity() <= 4096 {
            self.wbuf = buf;
        }
    }

    /// Whether an idle connection can take another request: the peer has
    /// neither closed it nor sent anything since the last response. Costs
    /// a syscall only when the socket became readable while idle.
    pub fn is_usable(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// Where a finished connection goes back to, and how often it may be used.
#[derive(Clone)]
pub struct Return {
    /// The worker's part of the endpoint's pool.
    pub to: Arc<WorkerPool>,
    /// Requests per connection at most.
    pub max_uses: u32,
    /// An answer may have both `Content-Length` and chunked framing (the
    /// cluster's `allow_chunked_length`).
    pub allow_chunked_length: bool,
}

impl Return {
    fn put(&self, conn: Connection) {
        if conn.uses < self.max_uses && conn.buf.is_empty() {
            let mut conn = conn;
            conn.idle_since_ms = super::now_ms() as u32;
            self.to.put_idle(conn);
        }
    }
}

/// How the request body is sent.
enum Outgoing {
    None,
    Whole(Bytes),
    Stream(RequestBody, Option<u64>),
}

/// Sends one request on `conn` and reads the response head.
///
/// A reused connection can turn out to have been closed by the upstream
/// just as the request went out (its FIN not yet seen when the connection
/// left the idle list). When nothing at all came back on it, a request
/// that may safely be sent twice (an idempotent method, or one carrying an
/// idempotency key) whose body is at hand is sent once more on a fresh
/// connection, as nginx, HAProxy and Go's client do: otherwise an
/// upstream's keep-alive timeout shorter than ours turns into sporadic 502s.
///
/// Takes a request made ready by [`prepare`]. Not an `async fn`: the
/// future holds the encoded head but not the request, nor a second copy of
/// each argument (an `async fn` keeps its arguments beside the locals it
/// binds them to). It is moved whole a few times on every request's way,
/// so its size costs copies.
pub fn exchange<'a>(
    conn: Connection,
    req: Prepared,
    ret: Return,
    pool: &'a Pool,
    local: Option<&'a mut Option<SocketAddr>>,
) -> impl std::future::Future<Output = Result<Response<Body>, SendError>> + Send + 'a {
    let mut conn = conn;
    let mut local = local;
    // A system call, made only for an access log that asks for it.
    if let Some(l) = local.as_deref_mut() {
        *l = conn.io.local_addr().ok();
    }
    let reused = conn.uses > 0;
    conn.uses += 1;
    let Prepared {
        head,
        rest,
        stream,
        head_only,
        replayable,
        await_continue,
    } = req;
    // One byte for whichever the path taken reads (a streamed body is
    // never sent again, and only it may wait for 100 Continue): each
    // byte more of this future may cost a word, copied with every move.
    let replayable_or_waits = if stream.is_some() {
        await_continue
    } else {
        replayable
    };
    async move {
        if let Some((body, exact)) = stream {
            // Boxed: this state is large and rare, and every request's
            // future would otherwise be as large as it.
            let limits = pool.answer_head();
            let streamed =
                stream_exchange(&mut conn, &head, body, exact, replayable_or_waits, limits);
            let (head, rest) = Box::pin(streamed).await?;
            let (reusable, duplex) = match rest {
                Rest::Sent => (true, None),
                Rest::Dropped => (false, None),
                Rest::Later(duplex) => (true, Some(duplex)),
            };
            return finish(conn, head, head_only, reusable, &ret, duplex);
        }
        let resp = match send_and_read(&mut conn, &head, rest.as_ref(), pool.answer_head()).await {
            Ok(resp) => resp,
            Err(e) if reused && conn.buf.is_empty() && replayable_or_waits => {
                tracing::debug!(error = %e, "reused upstream connection was closed; sending again on a new one");
                drop(conn);
                // Boxed: rare, and connecting's state is large.
                let (fresh, resp) = Box::pin(async {
                    let (io, slot) = pool.tcp().await?;
                    if let Some(l) = local {
                        *l = io.local_addr().ok();
                    }
                    let mut fresh = Connection::new(io, slot);
                    fresh.uses = 1;
                    let resp =
                        send_and_read(&mut fresh, &head, rest.as_ref(), pool.answer_head()).await?;
                    Ok::<_, SendError>((fresh, resp))
                })
                .await?;
                conn = fresh;
                resp
            }
            Err(e) => return Err(e),
        };
        conn.keep_wbuf(head);
        finish(conn, resp, head_only, true, &ret, None)
    }
}

/// A request made ready to send: its head encoded (a small body
/// appended), the rest of its body, and what the exchange must know of it.
pub struct Prepared {
    head: Vec<u8>,
    rest: Option<Bytes>,
    /// A body still coming, and its length if declared.
    stream: Option<(RequestBody, Option<u64>)>,
    head_only: bool,
    /// That body waits for the upstream's `100 Continue` (see
    /// [`stream_exchange`]).
    await_continue: bool,
    /// It may be sent once more on a fresh connection (see [`exchange`]).
    replayable: bool,
}

/// Encodes `req`'s head into `head` (a buffer to reuse). The header map is
/// done with once encoded: it goes to `lend` when given (a retry will send
/// it again), else back to the worker's spare maps.
pub fn prepare(
    req: Request<ReqBody>,
    mut head: Vec<u8>,
    lend: Option<&mut Option<HeaderMap>>,
    how: H1Client,
) -> Prepared {
    let (parts, body) = req.into_parts();
    let outgoing = match body {
        Either::Right(mut full) => {
            // A buffered body is ready at once: no future (and no state
            // in the exchange's) to wait for it.
            let mut cx = Context::from_waker(Waker::noop());
            let b = match Pin::new(&mut full).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
                _ => Bytes::new(),
            };
            if b.is_empty() {
                Outgoing::None
            } else {
                Outgoing::Whole(b)
            }
        }
        Either::Left(down) if down.is_end_stream() => Outgoing::None,
        Either::Left(down) => {
            let exact = down.size_hint().exact();
            Outgoing::Stream(down, exact)
        }
    };
    head.clear();
    encode_head(&parts, &outgoing, &mut head, how);
    let head_only = parts.method == Method::HEAD;
    let replayable = replayable(parts.method.is_idempotent(), &parts.headers);
    // Still there only where the listener proxies 100-continue.
    let await_continue = matches!(outgoing, Outgoing::Stream(..))
        && parts
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    match lend {
        Some(slot) => *slot = Some(parts.headers),
        None => crate::spare::recycle(parts.headers),
    }
    let (rest, stream) = match outgoing {
        Outgoing::None => (None, None),
        Outgoing::Whole(b) if b.len() <= COALESCE_BODY => {
            head.extend_from_slice(&b);
            (None, None)
        }
        Outgoing::Whole(b) => (Some(b), None),
        Outgoing::Stream(body, exact) => (None, Some((body, exact))),
    };
    Prepared {
        head,
        rest,
        stream,
        head_only,
        replayable,
        await_continue,
    }
}

/// Whether a request may be sent again after its connection failed with
/// nothing received: RFC 9110's idempotent methods, or a request that
/// names an idempotency key (as Go's client also accepts).
fn replayable(idempotent_method: bool, headers: &HeaderMap) -> bool {
    idempotent_method
        || headers.contains_key("idempotency-key")
        || headers.contains_key("x-idempotency-key")
}

/// Writes a request head (with a small body already appended) and the rest
/// of its body, then reads the response head (within `limits`).
async fn send_and_read(
    conn: &mut Connection,
    head: &[u8],
    rest: Option<&Bytes>,
    limits: AnswerHead,
) -> Result<Head, SendError> {
    write_all(&mut conn.io, head).await?;
    if let Some(b) = rest {
        write_all(&mut conn.io, b).await?;
    }
    read_head(&mut conn.io, &mut conn.buf, limits).await
}

/// Turns a response head into the response, with a body that reads from
/// the connection (or the bytes that came with the head, in which case the
/// connection goes back to the pool at once). `duplex` holds the rest of a
/// request body still to be written, by the response body as it is read.
#[inline(always)]
fn finish(
    mut conn: Connection,
    resp: Head,
    head_only: bool,
    mut reusable: bool,
    ret: &Return,
    duplex: Option<Box<Duplex>>,
) -> Result<Response<Body>, SendError> {
    let Head {
        status,
        version,
        headers,
        close,
        both,
        framing,
    } = resp;
    if both && !ret.allow_chunked_length {
        // Envoy's protocol error, unless the cluster allows both framings.
        return Err(bad("both Content-Length and Transfer-Encoding"));
    }
    reusable &= !close;
    let framing = if head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else {
        framing
    };
    // A body that ends with the connection ends its reuse too (decided
    // here: a 204 or a HEAD answer has no length and keeps it).
    reusable &= framing != Framing::Close;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // Upgrades take their own path; a switch nobody asked for is a
        // broken upstream, not an answer to pass on.
        return Err(bad("101 Switching Protocols without an upgrade request"));
    }
    let body = match framing {
        Framing::Length(n) if n as usize <= conn.buf.len() && duplex.is_none() => {
            let data = conn.buf.split_to(n as usize).freeze();
            if reusable {
                ret.put(conn);
            }
            Body::whole(data)
        }
        Framing::Length(n) if n as usize <= conn.buf.len() => {
            // Answered whole before the request was all sent: the answer
            // goes on, and ends once the rest of the request has followed.
            let data = conn.buf.split_to(n as usize).freeze();
            Body {
                framed: Framed::Length(0),
                first: (!data.is_empty()).then_some(data),
                conn: Some(conn),
                ret: reusable.then(|| ret.clone()),
                duplex,
            }
        }
        framing => Body {
            framed: match framing {
                Framing::Length(n) => Framed::Length(n),
                Framing::Chunked => Framed::Chunked(Chunk::Size),
                Framing::Close => Framed::Close,
            },
            first: None,
            conn: Some(conn),
            ret: reusable.then(|| ret.clone()),
            duplex,
        },
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(response)
}

/// What became of a streamed request body by the time the response head
/// arrived.
enum Rest {
    /// All of it was written.
    Sent,
    /// Not all of it, and it will not be (the upstream refused it or
    /// stopped reading): the connection cannot be reused.
    Dropped,
    /// Not yet: the upstream answered a success first, which goes on to
    /// the client now while the rest of the body follows, written as the
    /// response body is read (full duplex, as Envoy does).
    Later(Box<Duplex>),
}

/// Writes the head and a streamed body while reading the response head.
/// The upstream may answer before it has read the whole body: an error or
/// a closing answer (a 413, say) ends the upload and is passed on at once
/// (also when writing failed because the upstream stopped reading); a
/// success is passed on at once too, and the rest of the body follows it.
///
/// With `await_continue` (a request's `Expect: 100-continue` proxied), the
/// body is not read from the client (which is what asks the client for
/// it) until the upstream's `100 Continue`, or its answer, or a second
/// without either (as curl waits for an upstream that ignores the header).
async fn stream_exchange(
    conn: &mut Connection,
    head: &[u8],
    body: RequestBody,
    exact: Option<u64>,
    await_continue: bool,
    limits: AnswerHead,
) -> Result<(Head, Rest), SendError> {
    let Connection { io, buf, .. } = conn;
    let mut upload = Upload::new(head, body, exact.is_none());
    if await_continue {
        upload.gate = Some(Box::pin(tokio::time::sleep(CONTINUE_WAIT)));
    }
    let mut sent = false;
    let mut send_error = None;
    let mut interim = false;
    let head = std::future::poll_fn(|cx| loop {
        if !sent && send_error.is_none() {
            match upload.poll(io, cx) {
                Poll::Ready(Ok(())) => sent = true,
                // The client's body failed: no answer can come for a
                // request the upstream will never see whole.
                Poll::Ready(Err(e @ SendError::Downstream { .. })) => return Poll::Ready(Err(e)),
                // Perhaps the upstream answered and stopped reading: see
                // whether an answer comes before giving up.
                Poll::Ready(Err(e)) => send_error = Some(e),
                Poll::Pending => {}
            }
        }
        match poll_read_head(io, buf, &mut interim, limits, cx) {
            // The upstream's 100 Continue: the body may come now.
            Poll::Pending if interim && upload.gate.is_some() => upload.gate = None,
            p => return p.map_err(|e| send_error.take().unwrap_or(e)),
        }
    })
    .await?;
    upload.gate = None;
    let rest = if sent {
        Rest::Sent
    } else if send_error.is_none() && head.status.as_u16() < 400 && !head.close {
        Rest::Later(Box::new(Duplex {
            upload: Some(upload),
            held_end: None,
        }))
    } else {
        Rest::Dropped
    };
    Ok((head, rest))
}

async fn write_all<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, b: &[u8]) -> Result<(), SendError> {
    w.write_all(b)
        .await
        .map_err(|e| SendError::Reset(format!("writing the request: {e}")))
}

/// A streamed request body on its way to the upstream: the head, then the
/// body as is when its length is known (it was declared), chunked
/// otherwise, with trailers only when chunked. Written as far as the
/// socket takes it whenever polled.
struct Upload {
    body: RequestBody,
    /// While set, the body is not read until it fires (see
    /// [`stream_exchange`]'s `await_continue`).
    gate: Option<Pin<Box<tokio::time::Sleep>>>,
    chunked: bool,
    /// Encoded and not yet written, in order.
    out: std::collections::VecDeque<Bytes>,
    /// The body ended (its end is in `out`).
    ended: bool,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("chunked", &self.chunked)
            .field("unwritten", &self.out.len())
            .field("ended", &self.ended)
            .finish()
    }
}

impl Upload {
    fn new(head: &[u8], body: RequestBody, chunked: bool) -> Upload {
        Upload {
            body,
            gate: None,
            chunked,
            out: std::collections::VecDeque::from([Bytes::copy_from_slice(head)]),
            ended: false,
        }
    }

    /// Writes what it can; ready once all of it is written.
    fn poll(&mut self, io: &TcpStream, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        let failed = |e: io::Error| SendError::Reset(format!("writing the request: {e}"));
        loop {
            while let Some(front) = self.out.front_mut() {
                ready!(io.poll_write_ready(cx)).map_err(failed)?;
                match io.try_write(front) {
                    Ok(n) if n == front.len() => {
                        self.out.pop_front();
                    }
                    Ok(n) => {
                        let _ = front.split_to(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(failed(e))),
                }
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            if let Some(gate) = self.gate.as_mut() {
                ready!(std::future::Future::poll(gate.as_mut(), cx));
                self.gate = None;
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Err(e)) => {
                    return Poll::Ready(Err(SendError::Downstream {
                        gone: e.is::<ClientGone>(),
                        why: e.to_string(),
                    }))
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) if self.chunked => {
                        let mut size = Vec::with_capacity(18);
                        write_chunk_size(&mut size, data.len());
                        self.out.push_back(size.into());
                        self.out.push_back(data);
                        self.out.push_back(Bytes::from_static(b"\r\n"));
                    }
                    Ok(data) => self.out.push_back(data),
                    Err(frame) => {
                        if let (true, Ok(trailers)) = (self.chunked, frame.into_trailers()) {
                            self.ended = true;
                            self.out.push_back(last_chunk(Some(&trailers)));
                        }
                    }
                },
                None => {
                    if self.chunked && !self.ended {
                        self.out.push_back(last_chunk(None));
                    }
                    self.ended = true;
                }
            }
        }
    }
}

/// The last chunk of a chunked body, with its trailers.
fn last_chunk(trailers: Option<&HeaderMap>) -> Bytes {
    let mut end = b"0\r\n".to_vec();
    for (name, value) in trailers.into_iter().flatten() {
        end.extend_from_slice(name.as_str().as_bytes());
        end.extend_from_slice(b": ");
        end.extend_from_slice(value.as_bytes());
        end.extend_from_slice(b"\r\n");
    }
    end.extend_from_slice(b"\r\n");
    end.into()
}

/// Methods whose requests carry a body by definition (an empty one gets
/// `content-length: 0`, as hyper sends).
fn expects_body(m: &Method) -> bool {
    matches!(*m, Method::POST | Method::PUT | Method::PATCH)
}

fn encode_head(parts: &http::request::Parts, body: &Outgoing, out: &mut Vec<u8>, how: H1Client) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    if how.absolute_url {
        // (Rare: a cluster's `send_fully_qualified_url`.)
        absolute_start(parts, out);
    }
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        // Framing is this hop's own; it is written below.
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        let at = out.len();
        out.extend_from_slice(name.as_str().as_bytes());
        if how.proper_case {
            proper_case(&mut out[at..]);
        }
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let at = out.len();
    match body {
        Outgoing::None if expects_body(&parts.method) => {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Outgoing::None => {}
        Outgoing::Whole(b) => write_length(out, b.len() as u64),
        Outgoing::Stream(_, Some(n)) => write_length(out, *n),
        Outgoing::Stream(_, None) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if how.proper_case && out.len() > at {
        let colon = out[at..].iter().position(|b| *b == b':').unwrap_or(0);
        proper_case(&mut out[at..at + colon]);
    }
    out.extend_from_slice(b"\r\n");
}

/// The scheme and authority of an absolute request target, `http://host`
/// (the request's Host, else its URI's authority).
fn absolute_start(parts: &http::request::Parts, out: &mut Vec<u8>) {
    let host = parts
        .headers
        .get(header::HOST)
        .map(|h| h.as_bytes())
        .or(parts.uri.authority().map(|a| a.as_str().as_bytes()));
    if let Some(host) = host {
        out.extend_from_slice(b"http://");
        out.extend_from_slice(host);
    }
}

/// Envoy's proper case for a header name: its first letter, and each
/// letter after a character that is neither letter nor digit, in upper
/// case (`x-request-id` becomes `X-Request-Id`).
fn proper_case(name: &mut [u8]) {
    let mut up = true;
    for b in name {
        if up {
            b.make_ascii_uppercase();
        }
        up = !b.is_ascii_alphanumeric();
    }
}

/// How the response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    Close,
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    /// The connection may not carry another request.
    close: bool,
    /// It had both `Content-Length` and chunked framing (taken as
    /// chunked).
    both: bool,
    framing: Framing,
}

fn bad(what: impl std::fmt::Display) -> SendError {
    SendError::Protocol(format!("invalid response from upstream: {what}"))
}

#[cold]
fn too_large() -> SendError {
    bad("response head over the cluster's max_response_headers_kb")
}

/// Reads until a final (non-1xx, or 101) response head is complete and
/// consumes it from `buf`.
async fn read_head<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    limits: AnswerHead,
) -> Result<Head, SendError> {
    loop {
        if let Some(head) = take_head(buf, &mut false, limits)? {
            return Ok(head);
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8 * 1024);
        }
        match rd.read_buf(buf).await {
            Ok(0) => {
                return Err(SendError::Reset(
                    "upstream closed the connection before a response".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(SendError::Reset(format!("reading the response: {e}"))),
        }
    }
}

/// The final response head at the start of `buf`, if all there (1xx
/// heads before it are skipped, and `interim` set when one was a
/// `100 Continue`; a 102 or 103 asks for nothing).
fn take_head(
    buf: &mut BytesMut,
    interim: &mut bool,
    limits: AnswerHead,
) -> Result<Option<Head>, SendError> {
    while !buf.is_empty() {
        match parse_head(buf, limits)? {
            // 100 Continue and friends: the answer follows.
            Some(head)
                if head.status.is_informational()
                    && head.status != StatusCode::SWITCHING_PROTOCOLS =>
            {
                *interim |= head.status == StatusCode::CONTINUE;
            }
            Some(head) => return Ok(Some(head)),
            None if buf.len() > limits.http1_unfinished_bytes() => return Err(too_large()),
            None => break,
        }
    }
    Ok(None)
}

/// [`read_head`] for a poll function (the socket shared with a writer).
fn poll_read_head(
    io: &TcpStream,
    buf: &mut BytesMut,
    interim: &mut bool,
    limits: AnswerHead,
    cx: &mut Context<'_>,
) -> Poll<Result<Head, SendError>> {
    loop {
        if let Some(head) = take_head(buf, interim, limits)? {
            return Poll::Ready(Ok(head));
        }
        match ready!(poll_fill(io, buf, cx)) {
            Ok(0) => {
                return Poll::Ready(Err(SendError::Reset(
                    "upstream closed the connection before a response".into(),
                )))
            }
            Ok(_) => {}
            Err(e) => {
                return Poll::Ready(Err(SendError::Reset(format!("reading the response: {e}"))))
            }
        }
    }
}

/// Parses a response head at the start of `buf`: `None` while incomplete;
/// when complete, consumes it. Header values share the head's bytes. A
/// head over the cluster's limits is refused: more header fields than
/// `max_headers_count` (up to [`MAX_HEADERS`] are found in place, beyond
/// that on the heap, only where the cluster allows more), more bytes of
/// field names and values than `max_response_headers_kb` (what Envoy
/// counts: not the status line, separators and line ends).
fn parse_head(buf: &mut BytesMut, limits: AnswerHead) -> Result<Option<Head>, SendError> {
    let max = usize::from(limits.fields);
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut at = [[0u32; 4]; MAX_HEADERS];
    let spilled: Vec<[u32; 4]>;
    let (len, status, at) = match locate(buf, &mut fields, &mut at)? {
        Located::Partial => return Ok(None),
        Located::Head { n, .. } if n > max => return Err(bad("too many header fields")),
        Located::Head { len, status, n } => (len, status, &at[..n]),
        Located::TooMany if max > MAX_HEADERS => match locate_spilled(buf, max)? {
            None => return Ok(None),
            Some((len, status, v)) => {
                spilled = v;
                (len, status, &spilled[..])
            }
        },
        Located::TooMany => return Err(bad("too many header fields")),
    };
    // Only a head longer than the limit needs its fields added up.
    if len > limits.http1_bytes() && field_bytes(at) > limits.http1_bytes() {
        return Err(too_large());
    }
    build_head(buf, len, status, at).map(Some)
}

/// The bytes of a head's field names and values.
#[cold]
fn field_bytes(at: &[[u32; 4]]) -> usize {
    at.iter()
        .map(|[n0, n1, v0, v1]| (n1 - n0 + v1 - v0) as usize)
        .sum()
}

/// [`locate`] for a head with more fields than [`MAX_HEADERS`], where the
/// cluster allows them: where its fields sit, on the heap.
#[cold]
#[inline(never)]
#[allow(clippy::type_complexity)]
fn locate_spilled(
    buf: &BytesMut,
    max: usize,
) -> Result<Option<(usize, (u16, bool), Vec<[u32; 4]>)>, SendError> {
    let mut fields = vec![std::mem::MaybeUninit::uninit(); max];
    let mut at = vec![[0u32; 4]; max];
    match locate(buf, &mut fields, &mut at)? {
        Located::Partial => Ok(None),
        Located::Head { len, status, n } => {
            at.truncate(n);
            Ok(Some((len, status, at)))
        }
        Located::TooMany => Err(bad("too many header fields")),
    }
}

/// What [`locate`] found.
enum Located {
    Partial,
    /// A head of `len` bytes with `n` fields (their places written) and
    /// its status line's status and version (`true` for HTTP/1.0).
    Head {
        len: usize,
        status: (u16, bool),
        n: usize,
    },
    /// More fields than there were places for.
    TooMany,
}

/// Finds a response head's status line and fields at the start of `buf`,
/// writing where each field sits into `at` (a head is refused long
/// before 4 GiB, so u32 offsets do), so that values can share its bytes
/// once it is frozen.
#[inline(always)]
fn locate<'b>(
    buf: &'b BytesMut,
    fields: &mut [std::mem::MaybeUninit<httparse::Header<'b>>],
    at: &mut [[u32; 4]],
) -> Result<Located, SendError> {
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, fields)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Located::Partial),
        Err(httparse::Error::TooManyHeaders) => return Ok(Located::TooMany),
        Err(e) => return Err(bad(e)),
    };
    let base = buf.as_ptr() as usize;
    let n = resp.headers.len();
    for (slot, h) in at.iter_mut().zip(resp.headers.iter()) {
        let name = (h.name.as_ptr() as usize - base) as u32;
        let value = (h.value.as_ptr() as usize - base) as u32;
        *slot = [
            name,
            name + h.name.len() as u32,
            value,
            value + h.value.len() as u32,
        ];
    }
    Ok(Located::Head {
        len,
        status: (resp.code.unwrap_or(0), resp.version == Some(0)),
        n,
    })
}

/// The head [`locate`] found, consumed from `buf`.
#[inline(always)]
fn build_head(
    buf: &mut BytesMut,
    len: usize,
    (code, http10): (u16, bool),
    at: &[[u32; 4]],
) -> Result<Head, SendError> {
    let status = StatusCode::from_u16(code).map_err(bad)?;
    let version = if http10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let n = at.len();
    let head = buf.split_to(len).freeze();
    let mut headers = crate::spare::header_map(n);
    let mut close = version == Version::HTTP_10;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    // Chunked applied twice is a framing the proxy will not reuse after.
    let mut chunked_twice = false;
    let mut other_coding = false;
    // This hop's own fields are not passed on (the handler would remove
    // them again): leaving them out of the map saves inserting and then
    // removing them from nearly every answer. A `Connection` that names
    // other fields stays, so that the handler removes those with it; a 101
    // keeps them all, for the upgrade is passed on.
    let hop_fields_stay = status == StatusCode::SWITCHING_PROTOCOLS;
    for &[n0, n1, v0, v1] in at {
        let name = crate::header_names::parse(&head[n0 as usize..n1 as usize]).map_err(bad)?;
        // SAFETY: a field value httparse accepted, default configuration.
        let value = unsafe { parsed_value(head.slice(v0 as usize..v1 as usize)) };
        if name == header::CONTENT_LENGTH {
            let v = parse_length(value.as_bytes()).ok_or_else(|| bad("bad content-length"))?;
            if length.is_some_and(|l| l != v) {
                return Err(bad("conflicting content-length"));
            }
            length = Some(v);
        } else if name == header::TRANSFER_ENCODING {
            let is_chunked = last_coding(value.as_bytes()).eq_ignore_ascii_case(b"chunked");
            chunked_twice |= chunked
                || value
                    .as_bytes()
                    .split(|b| *b == b',')
                    .filter(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
                    .count()
                    > 1;
            chunked = is_chunked;
            other_coding |= !chunked;
        } else if name == header::CONNECTION {
            let v = value.as_bytes();
            if has_token(v, "close") {
                close = true;
            } else if version == Version::HTTP_10 && has_token(v, "keep-alive") {
                close = false;
            }
            if !hop_fields_stay && names_only_hop_fields(v) {
                continue;
            }
        }
        if !hop_fields_stay
            && (name == header::TRANSFER_ENCODING
                || name == header::UPGRADE
                || matches!(name.as_str(), "keep-alive" | "proxy-connection"))
        {
            continue;
        }
        headers.append(name, value);
    }
    let both = chunked && length.is_some();
    let framing = if chunked {
        // Both: Transfer-Encoding wins (and the length is not passed on,
        // RFC 9112 section 6.3), but the connection is suspect; and unless
        // the cluster allows it, Envoy's protocol error (see `finish`).
        if length.is_some() {
            headers.remove(header::CONTENT_LENGTH);
        }
        close |= length.is_some() || chunked_twice;
        Framing::Chunked
    } else if other_coding {
        Framing::Close
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    Ok(Head {
        status,
        version,
        headers,
        close,
        both,
        framing,
    })
}

/// Whether a `Connection` value names only fields the proxy removes
/// anyway (and `close`).
fn names_only_hop_fields(v: &[u8]) -> bool {
    v.split(|b| *b == b',').all(|t| {
        let t = t.trim_ascii();
        t.is_empty() || crate::http1::is_own_hop_token(t)
    })
}

/// A response body from an HTTP/1.1 upstream.
#[derive(Debug)]
pub struct Body {
    framed: Framed,
    /// Data already read, handed out first.
    first: Option<Bytes>,
    /// The connection the rest comes from (`None` once the body ended).
    conn: Option<Connection>,
    /// Where the connection goes when the body ends cleanly (`None`: it
    /// may not be reused).
    ret: Option<Return>,
    /// Full duplex, when the upstream answered before it had the whole
    /// request body. Boxed: rare, and every response body is moved
    /// several times on its way.
    duplex: Option<Box<Duplex>>,
}

/// The rest of a request body the upstream answered before it had it all,
/// written as the answer is read, and the answer's end (with its
/// trailers), held back until the body is all written: the origin may
/// still be reading it.
#[derive(Debug)]
struct Duplex {
    upload: Option<Upload>,
    held_end: Option<Option<HeaderMap>>,
}

impl std::fmt::Debug for Return {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Return")
            .field("max_uses", &self.max_uses)
            .finish()
    }
}

impl Body {
    fn whole(data: Bytes) -> Self {
        Body {
            framed: Framed::Length(0),
            first: (!data.is_empty()).then_some(data),
            conn: None,
            ret: None,
            duplex: None,
        }
    }

    /// Whether part of the request body is still to be written.
    fn uploading(&self) -> bool {
        self.duplex.as_ref().is_some_and(|d| d.upload.is_some())
    }

    fn finish(&mut self) {
        if self.uploading() {
            // Never pooled out of step with its request.
            self.conn = None;
        }
        self.duplex = None;
        if let (Some(conn), Some(ret)) = (self.conn.take(), self.ret.take()) {
            ret.put(conn);
        }
    }
}

fn truncated() -> BodyError {
    "upstream closed the connection in the middle of the response body".into()
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(d) = this.duplex.as_mut() {
            if let (Some(up), Some(conn)) = (d.upload.as_mut(), this.conn.as_ref()) {
                match up.poll(&conn.io, cx) {
                    Poll::Ready(Ok(())) => d.upload = None,
                    Poll::Ready(Err(SendError::Downstream { why, .. })) => {
                        // The client's body failed: so does the exchange.
                        this.duplex = None;
                        this.conn = None;
                        return Poll::Ready(Some(Err(why.into())));
                    }
                    Poll::Ready(Err(_)) => {
                        // The upstream stopped reading; its answer may
                        // still end well, but the connection is not reused.
                        d.upload = None;
                        this.ret = None;
                    }
                    Poll::Pending => {}
                }
            }
        }
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if let Some(d) = this.duplex.as_mut() {
            if let Some(end) = d.held_end.take() {
                if d.upload.is_some() {
                    d.held_end = Some(end);
                    return Poll::Pending; // woken by the upload's progress
                }
                this.finish();
                return Poll::Ready(end.map(|t| Ok(Frame::trailers(t))));
            }
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.framed.decode(&mut conn.buf) {
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Piece::Data(data)) => {
                    if this.framed.is_complete()
                        && this.duplex.as_ref().is_none_or(|d| d.upload.is_none())
                    {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Piece::End(trailers))
                    if this.duplex.as_ref().is_some_and(|d| d.upload.is_some()) =>
                {
                    if let Some(d) = this.duplex.as_mut() {
                        d.held_end = Some(trailers);
                    }
                    return Poll::Pending; // woken by the upload's progress
                }
                Ok(Piece::End(trailers)) => {
                    this.finish();
                    return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                }
                Ok(Piece::NeedMore) => {
                    if ready!(poll_fill(&conn.io, &mut conn.buf, cx))? == 0 {
                        this.conn = None;
                        return Poll::Ready(match this.framed {
                            Framed::Close => None,
                            _ => Some(Err(truncated())),
                        });
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let first = self.first.as_ref().map_or(0, |b| b.len() as u64);
        match (&self.conn, self.framed) {
            (None, _) => SizeHint::with_exact(first),
            (Some(_), Framed::Length(n)) => SizeHint::with_exact(first + n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Limits of `n` header fields and Envoy's default size.
    fn fields(n: u16) -> AnswerHead {
        AnswerHead {
            fields: n,
            kib: None,
        }
    }

    fn parse(text: &str) -> Head {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_head(&mut buf, fields(100)).unwrap().unwrap()
    }

    #[test]
    fn header_field_counts_are_the_clusters() {
        let head = |n: usize| {
            let mut h = String::from("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n");
            for i in 1..n {
                h.push_str(&format!("x-f{i}: v\r\n"));
            }
            h.push_str("\r\n");
            BytesMut::from(h.as_bytes())
        };
        let too_many = |r: Result<Option<Head>, SendError>| matches!(r, Err(SendError::Protocol(why)) if why.contains("too many header fields"));
        // Fewer allowed than fit in place: counted.
        assert!(too_many(parse_head(&mut head(3), fields(2))));
        assert_eq!(
            parse_head(&mut head(2), fields(2))
                .unwrap()
                .unwrap()
                .headers
                .len(),
            2
        );
        // Envoy's default 100, and more where the cluster allows them.
        assert!(too_many(parse_head(&mut head(120), fields(100))));
        let h = parse_head(&mut head(120), fields(150)).unwrap().unwrap();
        assert_eq!((h.headers.len(), h.framing), (120, Framing::Length(0)));
        assert!(too_many(parse_head(&mut head(151), fields(150))));
        // Incomplete, with more fields than fit in place: wait for more.
        let mut partial = head(120);
        partial.truncate(partial.len() - 2);
        assert!(parse_head(&mut partial, fields(150)).unwrap().is_none());
    }

    #[test]
    fn header_sizes_are_the_clusters() {
        // A head whose field names and values (what Envoy counts) are
        // `bytes` long: `content-length` `0` and `x-big` with the rest.
        let head = |bytes: usize| {
            let mut h = String::from("HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-big: ");
            h.push_str(&"a".repeat(bytes - 20));
            h.push_str("\r\n\r\n");
            BytesMut::from(h.as_bytes())
        };
        let too_large = |r: Result<Option<Head>, SendError>| matches!(r, Err(SendError::Protocol(why)) if why.contains("max_response_headers_kb"));
        let kib = |k: u16| AnswerHead {
            fields: 100,
            kib: std::num::NonZeroU16::new(k),
        };
        // Envoy's 80 KiB for HTTP/1.1 by default.
        assert!(parse_head(&mut head(80 * 1024), fields(100))
            .unwrap()
            .is_some());
        assert!(too_large(parse_head(&mut head(80 * 1024 + 1), fields(100))));
        assert!(parse_head(&mut head(2048), kib(2)).unwrap().is_some());
        assert!(too_large(parse_head(&mut head(2049), kib(2))));
        // An unfinished head that can no longer end within the limit (with
        // room for line ends and a status line) is refused without waiting
        // for its end; short of that, it waits.
        let room = 2048 + 4 * 100 + 4096;
        assert_eq!(kib(2).http1_unfinished_bytes(), room);
        let mut partial = head(room + 100);
        partial.truncate(room + 1);
        assert!(too_large(take_head(&mut partial, &mut false, kib(2))));
        let mut partial = head(room + 100);
        partial.truncate(room);
        assert!(take_head(&mut partial, &mut false, kib(2))
            .unwrap()
            .is_none());
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let h = parse("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: b\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(5));
        assert!(!h.close);
        assert_eq!(h.headers["x-a"], "b");
        // Both framings: chunked, not reused, the length not passed on,
        // and marked (`finish` refuses it unless the cluster allows it).
        let h = parse(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 5\r\n\r\n",
        );
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.close && h.both, "both framings: do not reuse");
        assert!(!h.headers.contains_key(header::CONTENT_LENGTH));
        assert!(!parse("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n").both);
        let h = parse("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(h.framing, Framing::Close);
        // No Connection: close — a 204 or HEAD answer like this is reusable;
        // `exchange` ends reuse only when the body really runs to the close.
        assert!(!h.close);
        let h = parse(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        assert!(h.close, "chunked twice: do not reuse");
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n"[..]);
        assert!(
            parse_head(&mut buf, fields(100)).is_err(),
            "a sign is not a digit"
        );
        let h = parse("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n");
        assert!(!h.close);
        let h = parse("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
        assert!(h.close);
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"[..],
        );
        assert!(parse_head(&mut buf, fields(100)).is_err());
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
        assert!(parse_head(&mut buf, fields(100)).unwrap().is_none());
    }

    #[test]
    fn this_hops_fields_stay_out_of_the_answer() {
        let h = parse(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\ntransfer-encoding: chunked\r\nupgrade: h2c\r\nproxy-connection: x\r\nx-a: b\r\n\r\n",
        );
        assert_eq!(h.framing, Framing::Chunked);
        let names: Vec<&str> = h.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-a"]);
        // A Connection naming another field stays, for the handler to
        // remove both.
        let h = parse("HTTP/1.1 200 OK\r\nconnection: close, x-secret\r\nx-secret: 1\r\ncontent-length: 0\r\n\r\n");
        assert!(
            h.close && h.headers.contains_key("connection") && h.headers.contains_key("x-secret")
        );
        // A 101 passes its upgrade on.
        let h = parse(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        );
        assert_eq!(
            (
                h.headers["connection"].as_bytes(),
                h.headers["upgrade"].as_bytes()
            ),
            (&b"upgrade"[..], &b"websocket"[..])
        );
    }

    #[test]
    fn request_heads_carry_this_hops_framing() {
        let req = Request::post("/p?q=1")
            .header("host", "h")
            .header("content-length", "99")
            .header("transfer-encoding", "chunked")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        encode_head(
            &parts,
            &Outgoing::Whole(Bytes::from_static(b"abc")),
            &mut out,
            H1Client::default(),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: h\r\ncontent-length: 3\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_head(&parts, &Outgoing::None, &mut out, H1Client::default());
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("content-length: 0\r\n\r\n"));
    }

    /// A cluster's `http_protocol_options`: header names in proper case,
    /// the framing's too, and the absolute URL in the request line.
    #[test]
    fn request_heads_take_the_clusters_http1_options() {
        let req = Request::get("/p?q=1")
            .header("host", "api.example:8080")
            .header("x-request-id", "1")
            .header("x_under", "2")
            .header("www-authenticate", "3")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let how = H1Client {
            proper_case: true,
            absolute_url: true,
            allow_chunked_length: false,
        };
        let mut out = Vec::new();
        encode_head(
            &parts,
            &Outgoing::Whole(Bytes::from_static(b"abc")),
            &mut out,
            how,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET http://api.example:8080/p?q=1 HTTP/1.1\r\nHost: api.example:8080\r\n\
             X-Request-Id: 1\r\nX_Under: 2\r\nWww-Authenticate: 3\r\n\
             Content-Length: 3\r\n\r\n"
        );
    }
}
